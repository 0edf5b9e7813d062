"""The image dataset: built and checked completely before training, then loaded batch by batch.

`build_dataset` lists every subset's images, checks that each decodes and that each caption file is UTF-8,
places images into buckets, and raises one `DatasetError` listing every problem (unreadable or corrupt images,
bad captions, images too small for their bucket, missing folders) before any step runs; nothing is skipped
silently. A caption file that is missing is not an error: the subset's class tokens are used (the folder name
for kohya folders), or an empty caption when there are none; the count is reported in `warnings`.

Regularisation images are balanced as sd-scripts does: their repeats are raised (or cut) so that an epoch
holds as many regularisation samples as training samples; their loss weight is `prior_loss_weight`.
"""
from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lib_lora.errors import FileFormatError
from lib_lora.train.data.buckets import BucketPlanner, BucketReport, bucket_report
from lib_lora.train.data.captions import process_caption
from lib_lora.train.data.config import DataConfig, DatasetConfig, SubsetConfig
from lib_lora.train.data.folders import IMAGE_EXTENSIONS, caption_path, list_images, other_caption_files, read_caption
from lib_lora.train.data.images import Augment, prepare_image, probe_image
from lib_lora.train.data.records import Batch, BatchPlan, DatasetError, ImageItem, Problem, Size

if TYPE_CHECKING:
    from lib_lora.train.data.cache import LatentCache, TextEncoderCache

SPLITS = ("train", "validation", "all")


@dataclass(frozen=True)
class DataProgress:
    """Progress of a long data task (checking images, caching): `done` of `total`, the file being handled."""

    stage: str
    done: int
    total: int
    path: str = ""


ProgressCallback = Callable[[DataProgress], None]


@dataclass(frozen=True)
class SubsetSummary:
    """What a subset turned out to hold (for ss_dataset_dirs / ss_tag_frequency / ss_datasets)."""

    config: SubsetConfig
    dataset_index: int
    img_count: int
    captions: tuple[str, ...]  # as read (class tokens or "" where the caption file is missing)


@dataclass(frozen=True)
class DatasetGroup:
    """One dataset of the config after building: its images, their repeats, its buckets."""

    index: int
    config: DatasetConfig
    items: tuple[int, ...]
    repeats: tuple[int, ...]  # per item, regularisation balancing applied
    num_train_images: int  # training samples per epoch (repeats included)
    num_reg_images: int  # regularisation images x repeats as found (before balancing), as sd-scripts reports
    buckets: BucketReport


class ImageDataset:
    """Images, captions and buckets of a run; `load_batch(plan, seed)` turns a `BatchPlan` into a `Batch`."""

    def __init__(self, items: tuple[ImageItem, ...], groups: tuple[DatasetGroup, ...],
                 subsets: tuple[SubsetSummary, ...], *, split: str, evaluation: bool, prior_loss_weight: float,
                 warnings: tuple[str, ...] = ()):
        self.items, self.groups, self.subsets = items, groups, subsets
        self.split, self.evaluation, self.prior_loss_weight = split, evaluation, prior_loss_weight
        self.warnings = warnings
        self.latent_cache: LatentCache | None = None
        self.text_cache: TextEncoderCache | None = None

    def subset(self, item: ImageItem) -> SubsetConfig:
        return self.groups[item.dataset_index].config.subsets[item.subset_index]

    @property
    def num_train_images(self) -> int:
        return sum(g.num_train_images for g in self.groups)

    @property
    def num_reg_images(self) -> int:
        return sum(g.num_reg_images for g in self.groups)

    @property
    def num_batches_per_epoch(self) -> int:
        """Batches in one epoch over all datasets (every bucket's last batch may be partial)."""
        total = 0
        for group in self.groups:
            counts: dict[Size, int] = {}
            for idx, reps in zip(group.items, group.repeats):
                reso = self.items[idx].placement.bucket_reso
                counts[reso] = counts.get(reso, 0) + reps
            total += sum(math.ceil(n / group.config.batch_size) for n in counts.values())
        return total

    @property
    def fingerprint(self) -> str:
        """Identifies images, repeats, buckets and batch sizes: a saved data order only fits the same dataset."""
        h = hashlib.sha256()
        for group in self.groups:
            h.update(f"{group.index}:{group.config.batch_size}".encode())
            for idx, reps in zip(group.items, group.repeats):
                item = self.items[idx]
                h.update(f"|{item.path}:{reps}:{item.placement.bucket_reso}".encode())
        return h.hexdigest()[:16]

    def caption_for(self, item: ImageItem, rng: random.Random, epoch: int) -> str:
        """The caption of one use of an image; evaluation uses fixed captions (no shuffle, no dropout)."""
        options = self.subset(item)
        if self.evaluation:
            options = replace(options, shuffle_caption=False, caption_dropout_rate=0.0,
                              caption_dropout_every_n_epochs=0, caption_tag_dropout_rate=0.0)
        return process_caption(item.caption, options, rng, epoch)

    def load_batch(self, plan: BatchPlan, seed: int) -> Batch:
        """Load the images (or cached latents) and captions of a batch; random choices come from
        (seed, epoch, batch index, slot), so the same plan always gives the same batch."""
        pixels, latents, masks, captions, flips = [], [], [], [], []
        original_hw, crop_tl, target_hw, text_outputs = [], [], [], []
        for slot, idx in enumerate(plan.items):
            item, rng = self.items[idx], random.Random(f"{seed}/{plan.epoch}/{plan.index}/{slot}")
            sub = self.subset(item)
            flip = sub.flip_aug and not self.evaluation and rng.random() < 0.5
            captions.append(self.caption_for(item, rng, plan.epoch))
            if self.latent_cache is not None:
                cached = self.latent_cache.get(idx, flip)
                latents.append(cached.latents)
                mask, original, ltrb = cached.alpha, cached.original_size, cached.crop_ltrb
                if mask is not None and flip:
                    mask = mask.flip(-1)
            else:
                augment = Augment(flip=flip, random_crop=sub.random_crop and not self.evaluation,
                                  color_aug=sub.color_aug and not self.evaluation)
                prepared = prepare_image(item.path, item.placement, augment, rng, keep_alpha=sub.alpha_mask,
                                         interpolation=sub.resize_interpolation)
                pixels.append(prepared.pixels)
                mask, original, ltrb = prepared.alpha, prepared.original_size, prepared.crop_ltrb
            masks.append(mask)
            flips.append(flip)
            target = item.placement.bucket_reso
            left = target[0] - ltrb[2] if flip else ltrb[0]  # a flipped crop box is mirrored
            original_hw.append((original[1], original[0]))
            crop_tl.append((ltrb[1], left))
            target_hw.append((target[1], target[0]))
            if self.text_cache is not None:
                text_outputs.append(self.text_cache.get(idx))
        return Batch(
            plan=plan, captions=captions,
            loss_weights=torch.tensor([self.prior_loss_weight if self.items[i].is_reg else 1.0 for i in plan.items]),
            is_reg=tuple(self.items[i].is_reg for i in plan.items), flipped=tuple(flips),
            paths=tuple(str(self.items[i].path) for i in plan.items),
            original_sizes_hw=torch.tensor(original_hw, dtype=torch.long),
            crop_top_lefts=torch.tensor(crop_tl, dtype=torch.long),
            target_sizes_hw=torch.tensor(target_hw, dtype=torch.long),
            images=torch.stack(pixels) if pixels else None, latents=torch.stack(latents) if latents else None,
            alpha_masks=_stack_masks(masks),
            text_encoder_outputs=self.text_cache.stack(text_outputs) if self.text_cache is not None else None)


def _stack_masks(masks: list[torch.Tensor | None]) -> torch.Tensor | None:
    if all(m is None for m in masks):
        return None
    shape = next(m for m in masks if m is not None).shape
    return torch.stack([m if m is not None else torch.ones(shape) for m in masks])


# ---------------------------------------------------------------------------------------------------- building


@dataclass
class _Scan:
    """What scanning found, before buckets: images per (dataset, subset), problems, warnings."""

    images: dict[tuple[int, int], list[tuple[Path, Size, str, bool]]]
    problems: list[Problem]
    warnings: list[str]


def split_for_validation(paths: list[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """(train, validation): a seeded shuffle, the last round(n * fraction) images (at least 1) held out."""
    if fraction <= 0 or len(paths) < 2:
        return list(paths), []
    shuffled = list(paths)
    random.Random(seed).shuffle(shuffled)
    held = min(len(paths) - 1, max(1, round(len(paths) * fraction)))
    return shuffled[:-held], shuffled[-held:]


def _subset_images(sub: SubsetConfig, options: DatasetConfig, split: str, seed: int) -> list[Path]:
    images = list_images(sub.image_dir)
    if split == "all" or sub.is_reg and split == "train":
        return images
    if sub.is_reg:  # regularisation images are never held out
        return []
    seed = options.validation_seed if options.validation_seed is not None else seed
    train, held = split_for_validation(images, options.validation_split, seed)
    return train if split == "train" else held


def _read_subset(sub: SubsetConfig, paths: list[Path], scan: _Scan, key: tuple[int, int],
                 progress: ProgressCallback | None, done: list[int], total: int) -> None:
    found, missing, hinted = [], 0, []
    for path in paths:
        done[0] += 1
        if progress is not None:
            progress(DataProgress("checking images", done[0], total, str(path)))
        try:
            size = probe_image(path)
        except FileFormatError as exc:
            scan.problems.append(Problem(exc.path, exc.reason))
            continue
        cap_file = caption_path(path, sub.caption_extension)
        if cap_file.is_file():
            try:
                found.append((path, size, read_caption(cap_file), False))
            except FileFormatError as exc:
                scan.problems.append(Problem(exc.path, exc.reason))
            continue
        missing += 1
        hinted += other_caption_files(path, sub.caption_extension)
        found.append((path, size, sub.class_tokens or "", True))
    if missing:
        fallback = f"class tokens {sub.class_tokens!r}" if sub.class_tokens else "an empty caption"
        hint = (f"; {len(hinted)} caption files with another extension exist (e.g. {hinted[0].name}): set "
                f"caption_extension" if hinted else "")
        scan.warnings.append(f"{sub.image_dir}: {missing} of {len(paths)} images have no "
                             f"'{sub.caption_extension}' caption; using {fallback}{hint}")
    scan.images[key] = found


def _scan(datasets: Sequence[DatasetConfig], split: str, seed: int, progress: ProgressCallback | None) -> _Scan:
    scan = _Scan({}, [], [])
    listed: dict[tuple[int, int], list[Path]] = {}
    for i, ds in enumerate(datasets):
        for j, sub in enumerate(ds.subsets):
            if not sub.image_dir.is_dir():
                scan.problems.append(Problem(str(sub.image_dir), "image folder not found"))
                continue
            listed[(i, j)] = _subset_images(sub, ds, split, seed)
            if not listed[(i, j)] and split != "validation":
                scan.warnings.append(f"{sub.image_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}); subset skipped")
    total, done = sum(len(v) for v in listed.values()), [0]
    for (i, j), paths in listed.items():
        _read_subset(datasets[i].subsets[j], paths, scan, (i, j), progress, done, total)
    return scan


def balance_reg_repeats(num_train: int, reg_repeats: list[int]) -> list[int]:
    """sd-scripts' balancing: regularisation repeats raised one by one (or the list cut short) until the
    regularisation samples equal the training samples."""
    if not reg_repeats:
        return []
    out, n, first = [0] * len(reg_repeats), 0, True
    while n < num_train:
        for k, reps in enumerate(reg_repeats):
            add = reps if first else 1
            out[k] += add
            n += add
            if n >= num_train:
                break
        first = False
    return out


def build_dataset(data: DataConfig | Sequence[DatasetConfig], *, split: str = "train", seed: int = 0,
                  prior_loss_weight: float = 1.0, evaluation: bool | None = None,
                  progress: ProgressCallback | None = None) -> ImageDataset:
    """Check and index every image of `data`.

    Args:
        data: the data config (or its datasets).
        split: "train" (validation_split held out), "validation" (only the held-out images), "all".
        seed: the run seed (used for the validation split when a dataset sets no validation_seed).
        prior_loss_weight: loss weight of regularisation images.
        evaluation: fixed captions and no augmentation; default True for the validation split.
        progress: called once per image checked.

    Raises:
        DatasetError: every problem found (unreadable images, bad captions, missing folders, images that fit no
            bucket), or no image at all.
        ConfigError: bucket settings that cannot make a bucket.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    datasets = tuple(data.datasets if isinstance(data, DataConfig) else data)
    scan = _scan(datasets, split, seed, progress)
    if scan.problems:
        raise DatasetError(f"{len(scan.problems)} problem(s) in the dataset; fix them before training "
                           "(nothing was trained):", scan.problems)
    items, groups, subsets = _index(datasets, scan)
    if not any(not items[i].is_reg for g in groups for i in g.items):
        dirs = [Problem(str(s.image_dir), "no images") for ds in datasets for s in ds.subsets if not s.is_reg]
        raise DatasetError(f"the {split} dataset is empty: no training image found", dirs)
    return ImageDataset(items, groups, subsets, split=split,
                        evaluation=split == "validation" if evaluation is None else evaluation,
                        prior_loss_weight=prior_loss_weight, warnings=tuple(scan.warnings))


def _index(datasets: tuple[DatasetConfig, ...],
           scan: _Scan) -> tuple[tuple[ImageItem, ...], tuple[DatasetGroup, ...], tuple[SubsetSummary, ...]]:
    items: list[ImageItem] = []
    groups, subsets, problems = [], [], []
    for i, ds in enumerate(datasets):
        planner = BucketPlanner(ds)
        idx, reps, reg_idx, reg_reps = [], [], [], []
        for j, sub in enumerate(ds.subsets):
            found = scan.images.get((i, j), [])
            subsets.append(SubsetSummary(sub, i, len(found), tuple(c for _, _, c, _ in found)))
            for path, size, caption, missing in found:
                try:
                    placement = planner.place(size)
                except ValueError as exc:
                    problems.append(Problem(str(path), str(exc)))
                    continue
                items.append(ImageItem(len(items), path, caption, missing, i, j, sub.is_reg, size, placement))
                (reg_idx if sub.is_reg else idx).append(len(items) - 1)
                (reg_reps if sub.is_reg else reps).append(sub.num_repeats)
        num_train = sum(reps)
        balanced = balance_reg_repeats(num_train, reg_reps)
        kept = [(k, r) for k, r in zip(reg_idx, balanced) if r > 0]
        all_idx, all_reps = idx + [k for k, _ in kept], reps + [r for _, r in kept]
        report = bucket_report((items[k].placement, r) for k, r in zip(all_idx, all_reps))
        groups.append(DatasetGroup(i, ds, tuple(all_idx), tuple(all_reps), num_train, sum(reg_reps), report))
    if problems:
        raise DatasetError(f"{len(problems)} image(s) fit no bucket:", problems)
    return tuple(items), tuple(groups), tuple(subsets)
