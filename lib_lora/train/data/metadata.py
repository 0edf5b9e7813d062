"""Fine-tuning metadata (sd-scripts' FineTuningDataset): which images a subset holds and their captions.

A metadata file is a JSON object mapping image keys to `{"caption": ..., "tags": ...}` (what sd-scripts'
`merge_captions_to_metadata.py` / `merge_dd_tags_to_metadata.py` write), or JSON Lines of
`{"image_path": ..., "caption": ..., "tags": ...}` (a `.jsonl` file). A key is an absolute path or a path relative
to the subset's `image_dir`; a key without an image extension (the file stem, as those scripts write by default)
is looked up with each image extension.

The caption is sd-scripts': caption and tags joined by `caption_separator` (no space: "a cat" + "," + "solo");
with `enable_wildcard`, the tags are added to every line of a multi-line caption, otherwise the first line is the
caption. `ss_tag_frequency` counts the tags only, under the metadata file's name.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib_lora.train.data.config import SubsetConfig
from lib_lora.train.data.folders import IMAGE_EXTENSIONS
from lib_lora.train.data.records import Problem


@dataclass(frozen=True)
class MetadataImage:
    """One image listed in a metadata file."""

    path: Path
    caption: str  # as the dataset uses it (caption and tags joined)
    tags: str  # the tags alone ("" when none), for ss_tag_frequency


def compose_caption(caption: str, tags: str, separator: str = ",", wildcard: bool = False) -> str:
    """sd-scripts' fine-tuning caption: `caption + separator + tags` (either part may be empty).

    Example: compose_caption("a cat\\na pet", "solo, red", wildcard=True) -> "a cat,solo, red\\na pet,solo, red"
    """
    if not tags:
        return caption
    if wildcard:
        tags = tags.replace("\n", separator)
        lines = [line for line in caption.split("\n") if line.strip()] or [""]
        return "\n".join(f"{line}{separator}{tags}" if line else tags for line in lines)
    first = caption.split("\n")[0]
    return f"{first}{separator}{tags}" if first else tags


def _read_entries(path: Path) -> list[tuple[str, Any]]:
    """(key, entry) pairs of a metadata JSON / JSONL file. Raises ValueError with a reason naming the line."""
    text = path.read_bytes().decode("utf-8-sig")
    if path.suffix.lower() == ".jsonl":
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"line {number} is not JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("image_path"), str):
                raise ValueError(f"line {number} needs an object with an \"image_path\" string")
            entries.append((record["image_path"], record))
        return entries
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(doc, dict):
        raise ValueError("expected a JSON object mapping image keys to {\"caption\", \"tags\"}")
    return list(doc.items())


def _text(entry: dict[str, Any], field: str) -> str:
    value = entry.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"\"{field}\" must be text, not {type(value).__name__}")
    return value.strip()


def resolve_image_key(key: str, image_dir: Path | None) -> Path | None:
    """The image file a metadata key names, or None when there is none."""
    path = Path(key)
    if not path.is_absolute():
        if image_dir is None:
            return None
        path = image_dir / path
    if path.is_file():
        return path
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
            candidate = path.with_name(path.name + ext)
            if candidate.is_file():
                return candidate
    return None


def _missing(key: str, image_dir: Path | None) -> str:
    if Path(key).is_absolute():
        return "no such image"
    if image_dir is None:
        return "a relative key needs image_dir (train_data_dir with in_json)"
    return f"no such image in {image_dir}"


def metadata_images(sub: SubsetConfig) -> tuple[list[MetadataImage], list[Problem]]:
    """The images a fine-tuning subset lists (sorted by path), and every problem found (unreadable file, bad
    entries, images that do not exist)."""
    file = sub.metadata_file
    assert file is not None
    try:
        entries = _read_entries(file)
    except FileNotFoundError:
        return [], [Problem(str(file), "metadata_file not found")]
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return [], [Problem(str(file), f"metadata_file cannot be read: {exc}")]
    images: dict[Path, MetadataImage] = {}
    problems = []
    for key, entry in entries:
        try:
            if not isinstance(entry, dict):
                raise ValueError("expected an object with \"caption\" and/or \"tags\"")
            caption, tags = _text(entry, "caption"), _text(entry, "tags")
        except ValueError as exc:
            problems.append(Problem(str(file), f"entry {key!r}: {exc}"))
            continue
        path = resolve_image_key(key, sub.image_dir)
        if path is None:
            problems.append(Problem(str(file), f"entry {key!r}: {_missing(key, sub.image_dir)}"))
        elif path in images:
            problems.append(Problem(str(file), f"entry {key!r}: {path.name} is listed twice"))
        else:
            images[path] = MetadataImage(path, compose_caption(caption, tags, sub.caption_separator,
                                                               sub.enable_wildcard), tags)
    return [images[p] for p in sorted(images)], problems
