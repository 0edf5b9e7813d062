"""Helpers of the LoRA-tool tests: data paths, ΔW of a module, file fingerprints."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from lib_lora.networks import LoadedNetwork
from lib_lora.ops.modules import module_delta

DATA = Path(__file__).resolve().parents[1] / "data" / "ops"
SD_SCRIPTS = DATA / "sd-scripts"
SMALL_A, SMALL_B = DATA / "small_a.safetensors", DATA / "small_b.safetensors"


def delta(net: LoadedNetwork, name: str) -> torch.Tensor:
    """ΔW of one module of a loaded file as [out, in·kh·kw] float32 (scale included)."""
    return module_delta(name, net.modules[name], net.arch).matrix()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def fingerprint(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
