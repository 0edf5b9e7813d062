"""Editing the user-facing metadata of a LoRA file (title, trigger words, description, ...) in place.

The file is rewritten atomically (`save_file`: temporary file, fsync, rename), tensors untouched, and the
precomputed `sshs_model_hash` / `sshs_legacy_hash` recomputed for the new file, so the web UI's short hash stays
what it computes from the file.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from lib_lora.errors import ConfigError, FileFormatError
from lib_lora.io.hashes import precalculate_hashes
from lib_lora.io.safetensors_io import load_file, save_file

# The fields the metadata editor offers, and the keys sd-scripts writes them to (modelspec.*).
EDITABLE = {"title": "modelspec.title", "trigger_words": "modelspec.trigger_phrase",
            "description": "modelspec.description", "author": "modelspec.author", "tags": "modelspec.tags"}
_COMPUTED = ("sshs_model_hash", "sshs_legacy_hash")


def edit_metadata(path: str | os.PathLike, changes: Mapping[str, str | None]) -> dict[str, str]:
    """Set (or with None / "" remove) metadata keys of a `.safetensors` LoRA file; returns the new metadata.

    Keys may be metadata keys (`modelspec.title`) or the editor's names (`title`, `trigger_words`, ...).

    Raises:
        FileFormatError: not a safetensors file, unreadable. ConfigError: an attempt to set the computed hashes.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise FileFormatError(str(path), "metadata can only be written to .safetensors files")
    loaded = load_file(path)
    metadata = dict(loaded.metadata)
    for key, value in changes.items():
        key = EDITABLE.get(key, key)
        if key in _COMPUTED:
            raise ConfigError(key, value, "is computed from the file; it cannot be set")
        text = (value or "").strip()
        if text:
            metadata[key] = text
        else:
            metadata.pop(key, None)
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = precalculate_hashes(loaded.tensors, metadata)
    save_file(loaded.tensors, path, metadata)
    return metadata
