"""Hashes the LoRA ecosystem computes, exactly as those tools compute them.

- `addnet_hash` (= `sshs_model_hash`): sha256 over the tensor data of a safetensors file, i.e. every
  byte after the 8-byte length and the JSON header. Metadata edits do not change it.
- `legacy_hash` (= `sshs_legacy_hash`, old A1111 model hash): first 8 hex of sha256 of the 64 KiB at 1 MiB.
- A1111 short hash: the first 12 hex of the addnet hash.
"""
from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Mapping

import torch
from safetensors.torch import save as st_save_bytes

CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike, start: int = 0) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def addnet_hash(path: str | os.PathLike) -> str:
    """sha256 of a safetensors file's data section (what sd-scripts, A1111 and additional-networks use)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return sha256_file(path, 8 + n)


def addnet_hash_of_bytes(buf: bytes) -> str:
    (n,) = struct.unpack("<Q", buf[:8])
    return hashlib.sha256(memoryview(buf)[8 + n :]).hexdigest()


def legacy_hash_of_bytes(buf: bytes) -> str:
    return hashlib.sha256(memoryview(buf)[0x100000:0x110000]).hexdigest()[:8]


def model_hash(path: str | os.PathLike) -> str:
    """Old A1111 checkpoint hash (`ss_sd_model_hash`): sha256 of 64 KiB at offset 1 MiB, 8 hex."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def precalculate_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) for tensors about to be saved, as sd-scripts computes them.

    Only the `ss_*` training facts go into the serialisation hashed for the legacy hash, so user notes
    (titles, descriptions) added later do not change it.
    """
    training_facts = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    prepared = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    buf = st_save_bytes(prepared, training_facts or None)
    return addnet_hash_of_bytes(buf), legacy_hash_of_bytes(buf)


def short_hash(full_hash: str) -> str:
    """The hash A1111 shows in infotext (`Lora hashes: "name: abcdef012345"`)."""
    h = full_hash[2:] if full_hash.startswith("0x") else full_hash
    return h[:12]
