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


Terms = list[tuple[float, torch.Tensor, torch.Tensor]]  # Σ coef · up @ down


def terms(net: LoadedNetwork, name: str, coef: float = 1.0) -> Terms:
    """ΔW of a module as low-rank terms (scale folded into the coefficient), float64."""
    d = module_delta(name, net.modules[name], net.arch)
    return [(coef * d.scale, d.up.double(), d.down.double())]


def _inner(a: Terms, b: Terms) -> float:
    """<Σ a, Σ b> (Frobenius) from the factors: tr((Uaᵀ Ub)(Vb Vaᵀ)), never forming a matrix."""
    return sum(ca * cb * float(torch.sum((ua.T @ ub) * (da @ db.T))) for ca, ua, da in a for cb, ub, db in b)


def rel_terms(a: Terms, b: Terms) -> float:
    """||A - B|| / ||B|| for low-rank sums A, B (cheap for layers of any size)."""
    diff = _inner(a, a) - 2 * _inner(a, b) + _inner(b, b)
    return (max(diff, 0.0) / _inner(b, b)) ** 0.5
