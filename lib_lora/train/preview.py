"""What a run's dataset holds, before training: per folder the images, repeats, class/trigger, caption coverage and
most frequent tags; the buckets; steps per epoch and in total; every problem at once (unreadable images, bad caption
encodings, empty captions, missing folders). Uses the same checks as training (`build_dataset`), so a preview
without problems means the data part of the run will start.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from lib_lora.train.config import TrainConfig
from lib_lora.train.data.captions import tag_frequency
from lib_lora.train.data.folders import caption_path, list_images
from lib_lora.train.data.records import DatasetError, Problem

TOP_TAGS = 8


@dataclass(frozen=True)
class FolderPreview:
    """One subset (folder) of the dataset."""

    path: str
    images: int
    repeats: int
    is_reg: bool
    class_tokens: str
    captions_found: int
    empty_captions: int
    top_tags: tuple[tuple[str, int], ...]

    @property
    def caption_coverage(self) -> float:
        return self.captions_found / self.images if self.images else 0.0


@dataclass(frozen=True)
class DatasetPreview:
    """The whole dataset as a run would see it. `problems` empty means it builds."""

    folders: tuple[FolderPreview, ...]
    buckets: tuple[tuple[tuple[int, int], int], ...] = ()  # (resolution, images with repeats)
    samples_per_epoch: int = 0
    batches_per_epoch: int = 0
    steps_per_epoch: int = 0
    total_steps: int = 0
    epochs: int = 0
    problems: tuple[Problem, ...] = ()
    warnings: tuple[str, ...] = field(default_factory=tuple)
    summary: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems


def _folder(sub) -> tuple[FolderPreview, list[Problem]]:
    problems: list[Problem] = []
    if not sub.image_dir.is_dir():
        return FolderPreview(str(sub.image_dir), 0, sub.num_repeats, sub.is_reg, sub.class_tokens or "", 0, 0, ()), \
            [Problem(str(sub.image_dir), "image folder not found")]
    images = list_images(sub.image_dir)
    captions, found, empty = [], 0, 0
    for path in images:
        cap = caption_path(path, sub.caption_extension)
        if not cap.is_file():
            captions.append(sub.class_tokens or "")
            continue
        found += 1
        try:
            text = cap.read_bytes().decode("utf-8-sig").strip()
        except UnicodeDecodeError:
            continue  # build_dataset reports the bad encoding
        empty += not text
        captions.append(text)
        if not text:
            problems.append(Problem(str(cap), "empty caption"))
    top = Counter(tag_frequency(captions)).most_common(TOP_TAGS)
    return FolderPreview(str(sub.image_dir), len(images), sub.num_repeats, sub.is_reg, sub.class_tokens or "", found,
                         empty, tuple(top)), problems


def preview_dataset(cfg: TrainConfig) -> DatasetPreview:
    """Scan and check the dataset of `cfg` (nothing is trained or written)."""
    from lib_lora.train.data import EpochSampler, build_dataset

    folders, problems = [], []
    for sub in cfg.data.subsets:
        folder, found = _folder(sub)
        folders.append(folder)
        problems += found
    seed = cfg.run.seed if cfg.run.seed is not None else 0
    try:
        dataset = build_dataset(cfg.data, split="train", seed=seed, prior_loss_weight=cfg.loss.prior_loss_weight)
    except DatasetError as exc:
        known = {(p.path, p.reason) for p in problems}
        problems += [p for p in exc.problems if (p.path, p.reason) not in known] or [Problem("dataset", exc.summary)]
        return DatasetPreview(tuple(folders), problems=tuple(problems), summary=exc.summary)
    buckets: Counter = Counter()
    for group in dataset.groups:
        for bucket in group.buckets.buckets:
            buckets[tuple(bucket.resolution)] += bucket.count
    batches = EpochSampler(dataset, seed).batches_per_epoch
    steps_per_epoch = math.ceil(batches / cfg.run.gradient_accumulation_steps)
    total = cfg.total_steps(batches)
    return DatasetPreview(
        tuple(folders), tuple(sorted(buckets.items())), dataset.num_train_images, batches, steps_per_epoch, total,
        math.ceil(total / max(1, steps_per_epoch)), tuple(problems), tuple(dataset.warnings),
        f"{dataset.num_train_images} samples per epoch (repeats included), {batches} batches, {total} steps")
