"""Latent and text-encoder-output caches, in memory and/or on disk (safetensors), that know no model family.

The caller passes the encoders: `encode_images((B,3,H,W) in [-1,1]) -> latents` and
`encode_captions(list[str]) -> tensor or dict of tensors` (batch first), plus an `encoder_id` string that
changes whenever the encoder would produce other values (model hash, dtype, clip skip, ...).

Each entry is keyed by everything its value depends on: the image file (size + mtime, or its sha256 with
`hash_content`), its mask file if any, bucket, resize, crop, flip and alpha settings and the encoder id for
latents; the caption text and encoder id for text outputs. A disk file whose stored key differs is re-encoded
and overwritten (atomically); a matching one is reused. Disk files sit next to the image
(`<image name>.latents.safetensors`, `<image name>.te.safetensors`) or in `cache_dir`.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lib_lora.errors import FileFormatError
from lib_lora.io import load_file, read_metadata, save_file
from lib_lora.io.hashes import sha256_file
from lib_lora.train.data.dataset import ImageDataset
from lib_lora.train.data.images import Augment
from lib_lora.train.data.records import DataProgress, ImageItem, ProgressCallback, Size

EncodeImages = Callable[[torch.Tensor], torch.Tensor]
EncodeCaptions = Callable[[list[str]], Any]  # a (B, ...) tensor or a dict of them
CACHE_VERSION = 1
KEY_FIELD = "lora_studio_cache_key"


@dataclass(frozen=True)
class CacheStats:
    """How many entries were encoded now and how many were reused (memory or disk)."""

    encoded: int
    reused: int


@dataclass
class CachedLatent:
    latents: torch.Tensor  # (C, h, w)
    alpha: torch.Tensor | None  # (H, W) in [0, 1], unflipped
    original_size: Size
    crop_ltrb: tuple[int, int, int, int]


def _file_identity(path: Path, hash_content: bool) -> dict[str, Any]:
    if hash_content:
        return {"sha256": sha256_file(path)}
    stat = path.stat()
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _cache_file(image: Path, cache_dir: Path | None, suffix: str) -> Path:
    if cache_dir is None:
        return image.with_name(f"{image.name}.{suffix}.safetensors")
    digest = hashlib.sha1(str(image.resolve()).encode()).hexdigest()[:12]
    return cache_dir / f"{digest}-{image.name}.{suffix}.safetensors"


def _stored_key(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        return read_metadata(path).get(KEY_FIELD)
    except FileFormatError:
        return None  # a broken cache file is simply rebuilt


class LatentCache:
    """VAE latents of every image (and of its mirror image when the subset flips)."""

    def __init__(self, encode_images: EncodeImages, encoder_id: str, *, to_disk: bool = False,
                 in_memory: bool = True, cache_dir: Path | None = None, batch_size: int = 1,
                 hash_content: bool = False):
        if not (to_disk or in_memory):
            raise ValueError("a latent cache must keep entries in memory, on disk, or both")
        self.encode, self.encoder_id = encode_images, encoder_id
        self.to_disk, self.in_memory, self.cache_dir = to_disk, in_memory, cache_dir
        self.batch_size, self.hash_content = batch_size, hash_content
        self._memory: dict[str, dict[str, Any]] = {}
        self._items: dict[int, tuple[str, Path | None]] = {}

    def key(self, dataset: ImageDataset, item: ImageItem) -> str:
        """Everything the cached latents depend on, as a string."""
        sub = dataset.subset(item)
        return json.dumps({
            "v": CACHE_VERSION, "image": str(item.path.resolve()), **_file_identity(item.path, self.hash_content),
            "bucket": item.placement.bucket_reso, "resized": item.placement.resized_size, "flip": sub.flip_aug,
            "alpha": sub.alpha_mask, "interpolation": sub.resize_interpolation, "encoder": self.encoder_id,
            **({} if item.mask is None else {"mask": str(item.mask.resolve()),
                                             "mask_file": _file_identity(item.mask, self.hash_content)}),
        }, sort_keys=True)

    def build(self, dataset: ImageDataset, progress: ProgressCallback | None = None) -> CacheStats:
        """Encode what is not cached yet, and attach the cache to `dataset` (its batches then carry latents)."""
        pending: dict[Size, list[tuple[ImageItem, str, Path | None]]] = {}
        reused = 0
        for item in dataset.items:
            key = self.key(dataset, item)
            path = _cache_file(item.path, self.cache_dir, "latents") if self.to_disk else None
            self._items[item.index] = (key, path)
            if key in self._memory or (path is not None and _stored_key(path) == key):
                reused += 1
                if self.in_memory and key not in self._memory:
                    self._memory[key] = self._read(path)
                continue
            pending.setdefault(item.placement.bucket_reso, []).append((item, key, path))
        total = sum(len(v) for v in pending.values())
        done = 0
        for entries in pending.values():
            for start in range(0, len(entries), self.batch_size):
                chunk = entries[start:start + self.batch_size]
                self._encode_chunk(dataset, chunk)
                done += len(chunk)
                if progress is not None:
                    progress(DataProgress("caching latents", done, total, str(chunk[-1][0].path)))
        dataset.latent_cache = self
        return CacheStats(encoded=total, reused=reused)

    def _encode_chunk(self, dataset: ImageDataset, chunk: list[tuple[ImageItem, str, Path | None]]) -> None:
        prepared = [dataset.prepare(item, Augment(), random.Random(0)) for item, _, _ in chunk]
        pixels = torch.stack([p.pixels for p in prepared])
        with torch.no_grad():
            latents = self.encode(pixels).detach().float().cpu()
            flips = [dataset.subset(item).flip_aug for item, _, _ in chunk]
            flipped = self.encode(pixels.flip(-1)).detach().float().cpu() if any(flips) else None
        for k, ((_item, key, path), prep) in enumerate(zip(chunk, prepared)):
            entry: dict[str, Any] = {"latents": latents[k].clone(), "original_size": prep.original_size,
                                     "crop_ltrb": prep.crop_ltrb, "alpha": prep.alpha}
            entry["latents_flipped"] = flipped[k].clone() if flipped is not None and flips[k] else None
            if path is not None:
                self._write(path, key, entry)
            if self.in_memory:
                self._memory[key] = entry

    @staticmethod
    def _write(path: Path, key: str, entry: dict[str, Any]) -> None:
        tensors = {name: entry[name] for name in ("latents", "latents_flipped", "alpha") if entry[name] is not None}
        meta = {KEY_FIELD: key, "original_size": json.dumps(list(entry["original_size"])),
                "crop_ltrb": json.dumps(list(entry["crop_ltrb"]))}
        save_file(tensors, path, meta)

    @staticmethod
    def _read(path: Path | None) -> dict[str, Any]:
        loaded = load_file(path)
        return {"latents": loaded.tensors["latents"], "latents_flipped": loaded.tensors.get("latents_flipped"),
                "alpha": loaded.tensors.get("alpha"),
                "original_size": tuple(json.loads(loaded.metadata["original_size"])),
                "crop_ltrb": tuple(json.loads(loaded.metadata["crop_ltrb"]))}

    def get(self, item_index: int, flipped: bool = False) -> CachedLatent:
        """The cached latents of an image (its mirror image's when `flipped`)."""
        key, path = self._items[item_index]
        entry = self._memory[key] if key in self._memory else self._read(path)
        latents = entry["latents_flipped"] if flipped else entry["latents"]
        if latents is None:
            raise KeyError(f"no flipped latents cached for item {item_index} (its subset has flip_aug off)")
        return CachedLatent(latents, entry["alpha"], entry["original_size"], entry["crop_ltrb"])


class TextEncoderCache:
    """Text-encoder outputs of every image's (fixed) caption; identical captions are encoded once."""

    def __init__(self, encode_captions: EncodeCaptions, encoder_id: str, *, to_disk: bool = False,
                 cache_dir: Path | None = None, batch_size: int = 8):
        self.encode, self.encoder_id = encode_captions, encoder_id
        self.to_disk, self.cache_dir, self.batch_size = to_disk, cache_dir, batch_size
        self._memory: dict[str, Any] = {}
        self._items: dict[int, str] = {}

    def key(self, caption: str) -> str:
        return json.dumps({"v": CACHE_VERSION, "caption": caption, "encoder": self.encoder_id}, sort_keys=True)

    def build(self, dataset: ImageDataset, progress: ProgressCallback | None = None) -> CacheStats:
        """Encode every caption not cached yet, and attach the cache to `dataset`."""
        pending: dict[str, tuple[str, list[Path]]] = {}
        reused = 0
        for item in dataset.items:
            # Caching is refused for captions that vary (config check), so this rng draws nothing.
            caption = dataset.caption_for(item, random.Random(0), epoch=1)
            key = self.key(caption)
            self._items[item.index] = key
            path = _cache_file(item.path, self.cache_dir, "te") if self.to_disk else None
            on_disk = path is not None and _stored_key(path) == key
            if key in self._memory or on_disk:
                reused += 1
                if key not in self._memory:
                    self._memory[key] = self._read(path)
                elif path is not None and not on_disk:
                    self._write(path, key, self._memory[key])
            else:
                pending.setdefault(key, (caption, []))[1].extend([path] if path is not None else [])
        keys, done = list(pending), 0
        for start in range(0, len(keys), self.batch_size):
            chunk = keys[start:start + self.batch_size]
            with torch.no_grad():
                outputs = self.encode([pending[k][0] for k in chunk])
            for n, key in enumerate(chunk):
                value = _index_output(outputs, n)
                self._memory[key] = value
                for path in pending[key][1]:
                    self._write(path, key, value)
            done += len(chunk)
            if progress is not None:
                progress(DataProgress("caching text encoder outputs", done, len(keys)))
        dataset.text_cache = self
        return CacheStats(encoded=len(keys), reused=reused)

    @staticmethod
    def _write(path: Path, key: str, value: Any) -> None:
        tensors = dict(value) if isinstance(value, Mapping) else {"output": value}
        save_file(tensors, path, {KEY_FIELD: key, "kind": "dict" if isinstance(value, Mapping) else "tensor"})

    @staticmethod
    def _read(path: Path) -> Any:
        loaded = load_file(path)
        return loaded.tensors if loaded.metadata.get("kind") == "dict" else loaded.tensors["output"]

    def get(self, item_index: int) -> Any:
        return self._memory[self._items[item_index]]

    @staticmethod
    def stack(values: list[Any]) -> Any:
        """Batch per-image outputs back together (a tensor, or a dict of tensors)."""
        if isinstance(values[0], Mapping):
            return {k: torch.stack([v[k] for v in values]) for k in values[0]}
        return torch.stack(values)


def _index_output(outputs: Any, n: int) -> Any:
    if isinstance(outputs, Mapping):
        return {k: v[n].detach().cpu().clone() for k, v in outputs.items()}
    return outputs[n].detach().cpu().clone()
