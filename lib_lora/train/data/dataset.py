"""The image dataset: built and checked completely before training, then loaded batch by batch.

`build_dataset` lists every subset's images (`scan`: image folders or fine-tuning metadata), checks that each
decodes, that each caption file is UTF-8 and that each mask of a mask folder fits, places images into buckets,
and raises one `DatasetError` listing every problem (unreadable or corrupt images, bad captions, missing or
mismatched masks, images too small for their bucket, missing folders) before any step runs; nothing is skipped
silently. A caption file that is missing is not an error: the subset's class tokens are used (the folder name
for kohya folders), or an empty caption when there are none; the count is reported in `warnings`.

Regularisation images are balanced as sd-scripts does: their repeats are raised (or cut) so that an epoch
holds as many regularisation samples as training samples; their loss weight is `prior_loss_weight`.
"""
from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from lib_lora.train.data.buckets import BucketPlanner, BucketReport, bucket_report
from lib_lora.train.data.captions import process_caption
from lib_lora.train.data.config import DataConfig, DatasetConfig, SubsetConfig
from lib_lora.train.data.images import Augment, PreparedImage, prepare_image
from lib_lora.train.data.records import Batch, BatchPlan, DatasetError, ImageItem, Problem, ProgressCallback, Size
from lib_lora.train.data.scan import Scan, scan_datasets

if TYPE_CHECKING:
    from lib_lora.train.data.cache import LatentCache, TextEncoderCache

SPLITS = ("train", "validation", "all")


@dataclass(frozen=True)
class SubsetSummary:
    """What a subset turned out to hold (for ss_dataset_dirs / ss_tag_frequency / ss_datasets)."""

    config: SubsetConfig
    dataset_index: int
    img_count: int
    captions: tuple[str, ...]  # as read (class tokens or "" where the caption file is missing)
    tag_texts: tuple[str, ...] = ()  # what ss_tag_frequency counts (a fine-tuning subset's tags, else captions)


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
        return sum(self.group_batches(group) for group in self.groups)

    def group_batches(self, group: DatasetGroup) -> int:
        """Batches of one dataset in one epoch."""
        counts: dict[Size, int] = {}
        for idx, reps in zip(group.items, group.repeats):
            reso = self.items[idx].placement.bucket_reso
            counts[reso] = counts.get(reso, 0) + reps
        return sum(math.ceil(n / group.config.batch_size) for n in counts.values())

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

    def prepare(self, item: ImageItem, augment: Augment, rng: random.Random) -> PreparedImage:
        """Pixels (and mask: the alpha channel, or the mask file) of one use of an image."""
        sub = self.subset(item)
        return prepare_image(item.path, item.placement, augment, rng, keep_alpha=sub.alpha_mask,
                             interpolation=sub.resize_interpolation, mask=item.mask)

    @staticmethod
    def use_rng(seed: int, plan: BatchPlan, slot: int) -> random.Random:
        """The random source of one use of an image: a function of (seed, epoch, batch index, slot) only."""
        return random.Random(f"{seed}/{plan.epoch}/{plan.index}/{slot}")

    def use_choices(self, item: ImageItem, rng: random.Random, epoch: int) -> tuple[bool, str]:
        """(flipped, caption) of one use of an image, drawn first from its rng (as `load_batch` does)."""
        flip = self.subset(item).flip_aug and not self.evaluation and rng.random() < 0.5
        return flip, self.caption_for(item, rng, epoch)

    def load_batch(self, plan: BatchPlan, seed: int) -> Batch:
        """Load the images (or cached latents) and captions of a batch; random choices come from
        (seed, epoch, batch index, slot), so the same plan always gives the same batch."""
        pixels, latents, masks, captions, flips = [], [], [], [], []
        original_hw, crop_tl, target_hw, text_outputs = [], [], [], []
        for slot, idx in enumerate(plan.items):
            item, rng = self.items[idx], self.use_rng(seed, plan, slot)
            sub = self.subset(item)
            flip, caption = self.use_choices(item, rng, plan.epoch)
            captions.append(caption)
            if self.latent_cache is not None:
                cached = self.latent_cache.get(idx, flip)
                latents.append(cached.latents)
                mask, original, ltrb = cached.alpha, cached.original_size, cached.crop_ltrb
                if mask is not None and flip:
                    mask = mask.flip(-1)
            else:
                augment = Augment(flip=flip, random_crop=sub.random_crop and not self.evaluation,
                                  color_aug=sub.color_aug and not self.evaluation)
                prepared = self.prepare(item, augment, rng)
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
    scan = scan_datasets(datasets, split, seed, progress)
    if scan.problems:
        raise DatasetError(f"{len(scan.problems)} problem(s) in the dataset; fix them before training "
                           "(nothing was trained):", scan.problems)
    items, groups, subsets = _index(datasets, scan)
    if not any(not items[i].is_reg for g in groups for i in g.items):
        dirs = [Problem(str(s.location), "no images") for ds in datasets for s in ds.subsets if not s.is_reg]
        raise DatasetError(f"the {split} dataset is empty: no training image found", dirs)
    return ImageDataset(items, groups, subsets, split=split,
                        evaluation=split == "validation" if evaluation is None else evaluation,
                        prior_loss_weight=prior_loss_weight, warnings=tuple(scan.warnings))


def _index(datasets: tuple[DatasetConfig, ...],
           scan: Scan) -> tuple[tuple[ImageItem, ...], tuple[DatasetGroup, ...], tuple[SubsetSummary, ...]]:
    items: list[ImageItem] = []
    groups, subsets, problems = [], [], []
    for i, ds in enumerate(datasets):
        planner = BucketPlanner(ds)
        idx, reps, reg_idx, reg_reps = [], [], [], []
        for j, sub in enumerate(ds.subsets):
            found = scan.images.get((i, j), [])
            subsets.append(SubsetSummary(sub, i, len(found), tuple(f.caption for f in found),
                                         tuple(f.tag_text for f in found)))
            for f in found:
                try:
                    placement = planner.place(f.size)
                except ValueError as exc:
                    problems.append(Problem(str(f.path), str(exc)))
                    continue
                items.append(ImageItem(len(items), f.path, f.caption, f.caption_missing, i, j, sub.is_reg, f.size,
                                       placement, f.mask))
                (reg_idx if sub.is_reg else idx).append(len(items) - 1)
                (reg_reps if sub.is_reg else reps).append(sub.num_repeats)
        num_train = sum(reps)
        balanced = balance_reg_repeats(num_train, reg_reps)
        kept = [(k, r) for k, r in zip(reg_idx, balanced) if r > 0]
        all_idx, all_reps = idx + [k for k, _ in kept], reps + [r for _, r in kept]
        report = bucket_report((items[k].placement, r) for k, r in zip(all_idx, all_reps))
        groups.append(DatasetGroup(i, ds, tuple(all_idx), tuple(all_reps), num_train, sum(reg_reps), report))
    if problems:
        raise DatasetError(f"{len(problems)} image(s) fit no bucket (lower bucket_reso_steps, or turn "
                           "bucket_no_upscale off so they may be enlarged):", problems)
    return tuple(items), tuple(groups), tuple(subsets)
