"""Listing and checking every subset's files before anything is trained.

A subset's images are the image files directly in its `image_dir` (kohya / DreamBooth style; captions from caption
files), or those its `metadata_file` lists (fine-tuning style; captions from the metadata). Each image is decoded
(`probe_image`), each caption file read as UTF-8, each mask of a mask folder matched and size-checked; every
problem is collected so that one error lists them all.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lib_lora.errors import FileFormatError
from lib_lora.train.data.config import DatasetConfig, SubsetConfig
from lib_lora.train.data.folders import IMAGE_EXTENSIONS, caption_path, list_images, other_caption_files, read_caption
from lib_lora.train.data.images import probe_image
from lib_lora.train.data.masks import MaskFolder
from lib_lora.train.data.metadata import metadata_images
from lib_lora.train.data.records import DataProgress, Problem, ProgressCallback, Size


@dataclass(frozen=True)
class Listed:
    """An image a subset holds, before checking: its caption when the metadata gives it (None: caption file)."""

    path: Path
    caption: str | None = None
    tags: str = ""


@dataclass(frozen=True)
class Found:
    """A checked image."""

    path: Path
    size: Size
    caption: str
    caption_missing: bool
    mask: Path | None
    tag_text: str  # what ss_tag_frequency counts: the caption, or a fine-tuning subset's tags


@dataclass
class Scan:
    """What scanning found, before buckets: images per (dataset, subset), problems, warnings."""

    images: dict[tuple[int, int], list[Found]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def split_for_validation(paths: list[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """(train, validation): a seeded shuffle, the last round(n * fraction) images (at least 1) held out."""
    if fraction <= 0 or len(paths) < 2:
        return list(paths), []
    shuffled = list(paths)
    random.Random(seed).shuffle(shuffled)
    held = min(len(paths) - 1, max(1, round(len(paths) * fraction)))
    return shuffled[:-held], shuffled[-held:]


def _all_listed(sub: SubsetConfig, scan: Scan) -> list[Listed] | None:
    """Every image of the subset (None when its folder or metadata cannot be used: a problem is recorded)."""
    if sub.metadata_file is not None:
        images, problems = metadata_images(sub)
        scan.problems.extend(problems)
        return None if problems and not images else [Listed(m.path, m.caption, m.tags) for m in images]
    assert sub.image_dir is not None
    if not sub.image_dir.is_dir():
        scan.problems.append(Problem(str(sub.image_dir), "image folder not found"))
        return None
    return [Listed(p) for p in list_images(sub.image_dir)]


def _for_split(listed: list[Listed], sub: SubsetConfig, options: DatasetConfig, split: str,
               seed: int) -> list[Listed]:
    if split == "all" or sub.is_reg and split == "train":
        return listed
    if sub.is_reg:  # regularisation images are never held out
        return []
    seed = options.validation_seed if options.validation_seed is not None else seed
    train, held = split_for_validation([x.path for x in listed], options.validation_split, seed)
    keep = set(train if split == "train" else held)
    return [x for x in listed if x.path in keep]


def _caption(sub: SubsetConfig, entry: Listed, scan: Scan) -> tuple[str, bool] | None:
    """(caption, caption file missing), or None after recording a problem."""
    if entry.caption is not None:
        return entry.caption, False
    cap_file = caption_path(entry.path, sub.caption_extension)
    if not cap_file.is_file():
        return sub.class_tokens or "", True
    try:
        return read_caption(cap_file, all_lines=sub.enable_wildcard), False
    except FileFormatError as exc:
        scan.problems.append(Problem(exc.path, exc.reason))
        return None


def _check_subset(sub: SubsetConfig, listed: list[Listed], masks: MaskFolder | None, scan: Scan,
                  tick: Callable[[Path], None]) -> list[Found]:
    found: list[Found] = []
    for entry in listed:
        tick(entry.path)
        try:
            size = probe_image(entry.path)
        except FileFormatError as exc:
            scan.problems.append(Problem(exc.path, exc.reason))
            continue
        mask = None
        if masks is not None:
            mask, problem = masks.mask_for(entry.path, size)
            if problem is not None:
                scan.problems.append(problem)
                continue
        caption = _caption(sub, entry, scan)
        if caption is not None:
            found.append(Found(entry.path, size, caption[0], caption[1], mask,
                               entry.tags if sub.metadata_file is not None else caption[0]))
    missing = [f for f in found if f.caption_missing]
    if missing:
        fallback = f"class tokens {sub.class_tokens!r}" if sub.class_tokens else "an empty caption"
        hinted = [h for f in missing for h in other_caption_files(f.path, sub.caption_extension)]
        hint = (f"; {len(hinted)} caption files with another extension exist (e.g. {hinted[0].name}): set "
                f"caption_extension" if hinted else "")
        scan.warnings.append(f"{sub.location}: {len(missing)} of {len(listed)} images have no "
                             f"'{sub.caption_extension}' caption; using {fallback}{hint}")
    return found


def _mask_folder(sub: SubsetConfig, listed: list[Listed], scan: Scan) -> MaskFolder | None:
    if sub.conditioning_data_dir is None:
        return None
    masks = MaskFolder.scan(sub.conditioning_data_dir)
    scan.problems.extend(masks.problems)
    unused = masks.unused([x.path for x in listed])
    if unused:
        scan.warnings.append(f"{masks.folder}: {len(unused)} masks match no image of {sub.location} and are "
                             f"unused (e.g. {unused[0].name})")
    return masks


def scan_datasets(datasets: Sequence[DatasetConfig], split: str, seed: int,
                  progress: ProgressCallback | None) -> Scan:
    """List and check every subset of `datasets` for `split` ("train", "validation", "all")."""
    scan = Scan()
    todo: list[tuple[tuple[int, int], SubsetConfig, list[Listed], MaskFolder | None]] = []
    for i, ds in enumerate(datasets):
        for j, sub in enumerate(ds.subsets):
            listed = _all_listed(sub, scan)
            if listed is None:
                continue
            masks = _mask_folder(sub, listed, scan)
            chosen = _for_split(listed, sub, ds, split, seed)
            if not chosen and split != "validation":
                what = "the metadata lists no image" if sub.metadata_file is not None else \
                    f"no images ({', '.join(IMAGE_EXTENSIONS)})"
                scan.warnings.append(f"{sub.location}: {what}; subset skipped")
            todo.append(((i, j), sub, chosen, masks))
    total, done = sum(len(t[2]) for t in todo), [0]

    def tick(path: Path) -> None:
        done[0] += 1
        if progress is not None:
            progress(DataProgress("checking images", done[0], total, str(path)))

    for key, sub, chosen, masks in todo:
        scan.images[key] = _check_subset(sub, chosen, masks, scan, tick)
    return scan
