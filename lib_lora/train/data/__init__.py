"""Data pipeline: kohya folders and dataset TOMLs, captions, aspect buckets, images, epoch order, caches.

Typical use by the loop:
    dataset = build_dataset(cfg.data, seed=seed, prior_loss_weight=cfg.loss.prior_loss_weight)  # checks all
    LatentCache(encode_images, encoder_id, to_disk=...).build(dataset)   # optional
    sampler = EpochSampler(dataset, seed)                                 # or EpochSampler(..., state=saved)
    for plan in sampler.epoch_batches():
        batch = dataset.load_batch(plan, seed)
        ...
        saved = sampler.state()
Names are re-exported lazily so that importing the config does not load the image code.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_dataset": "dataset", "ImageDataset": "dataset", "DataProgress": "records", "DatasetGroup": "dataset",
    "EpochSampler": "sampler", "epoch_plan": "sampler",
    "LatentCache": "cache", "TextEncoderCache": "cache", "CacheStats": "cache",
    "Batch": "records", "BatchPlan": "records", "SamplerState": "records", "DatasetError": "records",
    "Problem": "records", "ImageItem": "records", "Placement": "records",
    "DataConfig": "config", "DatasetConfig": "config", "SubsetConfig": "config",
    "DatasetOptions": "config", "SubsetOptions": "config",
    "BucketPlanner": "buckets", "BucketReport": "buckets", "make_bucket_resolutions": "buckets",
    "process_caption": "captions", "tag_frequency": "captions",
    "dataset_metadata": "summary", "debug_report": "summary",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
