"""kohya folder layout: `<repeats>_<name>` sub-folders, image listing, caption files.

A training folder holds one sub-folder per concept named `<repeats>_<class tokens>` (`10_sks dog`: 10 repeats,
class tokens "sks dog"). Sub-folders whose name does not start with a positive integer and `_` are skipped with
a warning (sd-scripts does the same: people keep `logs/` or `samples/` beside their concepts); a training folder
with no matching sub-folder at all is an error that lists what it found.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lib_lora.errors import ConfigError, FileFormatError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
OTHER_CAPTION_EXTENSIONS = (".txt", ".caption", ".tags")


@dataclass(frozen=True)
class KohyaDir:
    """A `<repeats>_<name>` folder."""

    path: Path
    num_repeats: int
    class_tokens: str | None  # None when the name after `_` is empty
    is_reg: bool


def parse_kohya_dir_name(name: str) -> tuple[int, str | None] | None:
    """`"10_sks dog"` -> (10, "sks dog"); `"10"` -> (10, None); None when the name has no positive repeat count."""
    head, _, tail = name.partition("_")
    if not head.isdigit() or int(head) < 1:
        return None
    return int(head), (tail.strip() or None)


def kohya_dirs(root: Path, *, is_reg: bool, option: str) -> tuple[list[KohyaDir], list[str]]:
    """The concept folders under `root`, sorted by name, and warnings for skipped sub-folders.

    Raises:
        ConfigError(option, root, ...): the folder does not exist or holds no `<repeats>_<name>` folder.
    """
    if not root.is_dir():
        raise ConfigError(option, str(root), "folder not found")
    found, warnings = [], []
    subdirs = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)
    for sub in subdirs:
        parsed = parse_kohya_dir_name(sub.name)
        if parsed is None:
            warnings.append(f"{option}: skipped {sub} (not named '<repeats>_<name>', e.g. '10_sks dog')")
            continue
        found.append(KohyaDir(sub, parsed[0], parsed[1], is_reg))
    if not found:
        images = list_images(root)
        hint = (f"; it holds {len(images)} images directly: move them into a sub-folder such as '10_name'"
                if images else f"; sub-folders found: {[p.name for p in subdirs] or 'none'}")
        raise ConfigError(option, str(root), f"no '<repeats>_<name>' sub-folder (e.g. '10_sks dog'){hint}")
    return found, warnings


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder` (not recursive, as sd-scripts), sorted by name; hidden files skipped."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def caption_path(image: Path, extension: str) -> Path:
    """The caption file of an image: same stem, `extension` (`.txt`, `.caption`, ...)."""
    return image.with_name(image.stem + extension)


def read_caption(path: Path, *, all_lines: bool = False) -> str:
    """The caption in a caption file: UTF-8 (a BOM is tolerated), first non-empty line, stripped. With
    `all_lines` (enable_wildcard: one line is picked per use), every non-empty line, stripped, joined by "\n".

    Raises:
        FileFormatError: the file is not UTF-8 (names the byte offset), or cannot be read.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FileFormatError(str(path), f"caption file cannot be read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FileFormatError(str(path), f"caption is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset "
                              f"{exc.start}); re-save the file as UTF-8") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if all_lines:
        return "\n".join(lines)
    return lines[0] if lines else ""


def other_caption_files(image: Path, extension: str) -> list[Path]:
    """Caption-like files of an image with another extension (to explain a wrong `caption_extension`)."""
    return [caption_path(image, ext) for ext in OTHER_CAPTION_EXTENSIONS
            if ext != extension and caption_path(image, ext).is_file()]
