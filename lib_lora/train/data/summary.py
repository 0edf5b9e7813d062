"""sd-scripts' dataset metadata (`ss_tag_frequency`, `ss_dataset_dirs`, `ss_datasets`, `ss_bucket_info`, image
counts) from a built dataset, in the shapes sd-scripts writes, for the metadata writer.

Two shapes exist, as in sd-scripts: runs from kohya folders (`train_data_dir`) write the legacy per-run keys
(`ss_resolution`, `ss_flip_aug`, `ss_reg_dataset_dirs`, `ss_bucket_info`, ...); runs from a dataset TOML write
`ss_datasets`, one JSON entry per dataset. Both write `ss_tag_frequency` and `ss_dataset_dirs`.
"""
from __future__ import annotations

import json
from typing import Any

from lib_lora.train.data.captions import tag_frequency
from lib_lora.train.data.config import DataConfig
from lib_lora.train.data.dataset import DatasetGroup, ImageDataset, SubsetSummary


def _unique(name: str, taken: dict[str, Any]) -> str:
    """sd-scripts numbers repeated folder names: "x", "x (2)", "x (3)"."""
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name} ({n})", n + 1
    return candidate


def tag_frequencies(dataset: ImageDataset, dataset_index: int | None = None) -> dict[str, dict[str, int]]:
    """{folder name: {tag: images}} (all subsets, regularisation included; a folder in two datasets counted once)."""
    out: dict[str, dict[str, int]] = {}
    seen_in: dict[str, int] = {}
    for sub in dataset.subsets:
        if dataset_index is not None and sub.dataset_index != dataset_index:
            continue
        name = sub.config.name
        if name in seen_in and seen_in[name] != sub.dataset_index:
            continue  # sd-scripts keeps a directory used by several datasets only once
        seen_in[name] = sub.dataset_index
        merged = out.setdefault(name, {})
        for tag, count in tag_frequency(sub.tag_texts or sub.captions).items():
            merged[tag] = merged.get(tag, 0) + count
    return out


def dataset_dirs(dataset: ImageDataset, *, reg: bool = False) -> dict[str, dict[str, int]]:
    """{folder name: {"n_repeats", "img_count"}} of the training (or regularisation) subsets."""
    out: dict[str, dict[str, int]] = {}
    for sub in dataset.subsets:
        if sub.config.is_reg == reg:
            out[_unique(sub.config.name, out)] = {"n_repeats": sub.config.num_repeats,
                                                           "img_count": sub.img_count}
    return out


def bucket_info(group: DatasetGroup) -> dict[str, Any] | None:
    """`ss_bucket_info` of one dataset (None without bucketing, as sd-scripts)."""
    return group.buckets.to_ss_dict() if group.config.enable_bucket else None


def _subset_entry(sub: SubsetSummary, is_dreambooth: bool) -> dict[str, Any]:
    c = sub.config
    entry: dict[str, Any] = {
        "img_count": sub.img_count, "num_repeats": c.num_repeats, "color_aug": c.color_aug,
        "flip_aug": c.flip_aug, "random_crop": c.random_crop, "shuffle_caption": c.shuffle_caption,
        "keep_tokens": c.keep_tokens, "keep_tokens_separator": c.keep_tokens_separator,
        "secondary_separator": c.secondary_separator, "enable_wildcard": c.enable_wildcard,
        "caption_prefix": c.caption_prefix, "caption_suffix": c.caption_suffix,
        "resize_interpolation": c.resize_interpolation}
    if c.image_dir is not None:
        entry["image_dir"] = c.image_dir.name
    if is_dreambooth:
        entry.update(class_tokens=c.class_tokens, is_reg=c.is_reg)
    else:
        entry["metadata_file"] = c.metadata_file.name if c.metadata_file is not None else None
    return entry


def datasets_entries(dataset: ImageDataset) -> list[dict[str, Any]]:
    """`ss_datasets`: one entry per dataset, as sd-scripts' config path writes them."""
    entries = []
    for group in dataset.groups:
        cfg = group.config
        # sd-scripts: a dataset whose subsets all have a metadata_file is a fine-tuning dataset
        is_dreambooth = any(s.metadata_file is None for s in cfg.subsets)
        entries.append({
            "is_dreambooth": is_dreambooth, "batch_size_per_device": cfg.batch_size,
            "num_train_images": group.num_train_images, "num_reg_images": group.num_reg_images,
            "resolution": list(cfg.resolution), "enable_bucket": cfg.enable_bucket,
            "min_bucket_reso": cfg.min_bucket_reso if cfg.enable_bucket else None,
            "max_bucket_reso": cfg.max_bucket_reso if cfg.enable_bucket else None,
            "tag_frequency": tag_frequencies(dataset, group.index), "bucket_info": bucket_info(group),
            "resize_interpolation": None,
            "subsets": [_subset_entry(s, is_dreambooth) for s in dataset.subsets if s.dataset_index == group.index],
        })
    return entries


def dataset_metadata(dataset: ImageDataset, data: DataConfig, *, num_batches_per_epoch: int | None = None,
                     total_batch_size: int | None = None) -> dict[str, str]:
    """The dataset-side `ss_*` values (strings), in the legacy or the dataset-TOML shape like sd-scripts.

    Args:
        num_batches_per_epoch: batches per epoch per process (defaults to the dataset's own count).
        total_batch_size: batch size x processes x accumulation steps (legacy shape only).
    """
    meta: dict[str, Any] = {
        "ss_num_train_images": dataset.num_train_images, "ss_num_reg_images": dataset.num_reg_images,
        "ss_num_batches_per_epoch": num_batches_per_epoch or dataset.num_batches_per_epoch,
        "ss_tag_frequency": json.dumps(tag_frequencies(dataset)), "ss_dataset_dirs": json.dumps(dataset_dirs(dataset)),
    }
    if data.dataset_config is not None:
        meta["ss_datasets"] = json.dumps(datasets_entries(dataset))
    else:
        group, sub = dataset.groups[0], dataset.groups[0].config.subsets[0]
        cfg = group.config
        meta.update({
            "ss_batch_size_per_device": cfg.batch_size, "ss_total_batch_size": total_batch_size or cfg.batch_size,
            "ss_resolution": cfg.resolution, "ss_color_aug": sub.color_aug, "ss_flip_aug": sub.flip_aug,
            "ss_random_crop": sub.random_crop, "ss_shuffle_caption": sub.shuffle_caption,
            "ss_enable_bucket": cfg.enable_bucket, "ss_bucket_no_upscale": cfg.bucket_no_upscale and cfg.enable_bucket,
            "ss_min_bucket_reso": cfg.min_bucket_reso if cfg.enable_bucket else None,
            "ss_max_bucket_reso": cfg.max_bucket_reso if cfg.enable_bucket else None,
            "ss_keep_tokens": sub.keep_tokens, "ss_reg_dataset_dirs": json.dumps(dataset_dirs(dataset, reg=True)),
            "ss_bucket_info": json.dumps(bucket_info(group)),
        })
    return {k: str(v) for k, v in meta.items()}


# ---------------------------------------------------------------------------------------------------- debug_dataset


def _sample_uses(dataset: ImageDataset, seed: int, per_subset: int) -> dict[tuple[int, int], list[str]]:
    """The first uses of each subset's images in epoch 1, as training will see them: step, file, sizes, flip and
    the processed caption (same random draws as `load_batch`), one line each."""
    from lib_lora.train.data.sampler import epoch_plan

    out: dict[tuple[int, int], list[str]] = {}
    for plan in epoch_plan(dataset, seed, 1):
        for slot, idx in enumerate(plan.items):
            item = dataset.items[idx]
            lines = out.setdefault((item.dataset_index, item.subset_index), [])
            if len(lines) >= per_subset:
                continue
            flip, caption = dataset.use_choices(item, dataset.use_rng(seed, plan, slot), plan.epoch)
            (w, h), (bw, bh) = item.size, item.placement.bucket_reso
            extra = "".join([", flipped" if flip else "", f", mask {item.mask.name}" if item.mask else ""])
            written = item.caption.replace("\n", " | ")
            shown = f'"{caption}"' + (f' (written: "{written}")' if written != caption else "")
            lines.append(f"    step {plan.index + 1}: {item.path.name} {w}x{h} -> {bw}x{bh}{extra}: {shown}")
    return out


def _subset_line(sub: SubsetSummary) -> str:
    c = sub.config
    parts = [f"{sub.img_count} images x {c.num_repeats} repeats"]
    if c.is_reg:
        parts.append("regularisation")
    if c.metadata_file is not None:
        parts.append(f"captions from {c.metadata_file}")
    if c.conditioning_data_dir is not None:
        parts.append(f"masks from {c.conditioning_data_dir}")
    elif c.alpha_mask:
        parts.append("alpha channel as mask")
    return f"  {c.location}: {', '.join(parts)}"


def debug_report(data: DataConfig, seed: int, *, samples: int = 3, prior_loss_weight: float = 1.0) -> str:
    """What sd-scripts' `debug_dataset` shows, as text: per dataset its buckets and steps per epoch, per subset its
    images, repeats and the first `samples` captions as processed for training (epoch 1, `seed`). Builds and checks
    the dataset (a `DatasetError` lists every problem); loads no model and writes nothing.

    Example: print(debug_report(cfg.data, seed=cfg.run.seed or 0))
    """
    from lib_lora.train.data.dataset import build_dataset

    dataset = build_dataset(data, split="train", seed=seed, prior_loss_weight=prior_loss_weight)
    uses = _sample_uses(dataset, seed, samples)
    lines = [f"debug_dataset: {len(dataset.items)} images, {dataset.num_train_images} training samples per epoch "
             f"(repeats included), {dataset.num_reg_images} regularisation, {dataset.num_batches_per_epoch} steps "
             f"per epoch, seed {seed}; nothing is trained or written"]
    lines += [f"warning: {w}" for w in dataset.warnings]
    for group in dataset.groups:
        cfg = group.config
        w, h = cfg.resolution
        bucketing = (f"buckets {cfg.min_bucket_reso}..{cfg.max_bucket_reso} step {cfg.bucket_reso_steps}"
                     + (", no upscale" if cfg.bucket_no_upscale else "") if cfg.enable_bucket else "no bucketing")
        lines.append(f"dataset {group.index}: resolution {w}x{h}, batch size {cfg.batch_size}, {bucketing}, "
                     f"{dataset.group_batches(group)} steps per epoch")
        for j, sub in enumerate(s for s in dataset.subsets if s.dataset_index == group.index):
            lines.append(_subset_line(sub))
            lines += uses.get((group.index, j), [])
        lines += ["  " + line for line in group.buckets.describe().splitlines()]
    return "\n".join(lines)
