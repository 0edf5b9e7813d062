"""Network modules as the tools see them: ΔW as a low-rank product where it is one, else as a matrix.

A plain LoRA/LoCon module is ΔW = up @ down · scale with up [out, r] and down [r, in·kh·kw]: the tools work on
those factors and never build ΔW. LoHa and LoKr are low-rank products too, exactly: (A₁B₁)⊙(A₂B₂) =
(A₁ ⊙ᵣ A₂)(B₁ ⊙꜀ B₂) with row- and column-wise Khatri-Rao products (rank r₁r₂), and kron(P₁Q₁, P₂Q₂) =
kron(P₁, P₂)·kron(Q₁, Q₂); where that rank is below min(out, in·kh·kw) they are handled as factors as well.
Other modules (Tucker forms, full) are read as their ΔW. Writing any of them as LoRA needs the weight's shape:
from the module when its tensors carry the kernel, else from the model's weights when given, else from the
U-Net's layer names (3x3 convolutions are the ResNet convs, samplers and
conv_in/conv_out; proj_in/proj_out are 1x1 convs in SD1 and linear in SD2/SDXL; shortcuts are 1x1).
IA3 and DoRA change the weight depending on its values, so they have no ΔW without the model.
Normalization-layer changes (`train_norm`: `w_norm`/`b_norm`) are vectors, not low-rank products: the tools carry
them as they are, or add them up at their strengths (`norm_tensors`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lib_lora.errors import ConfigError
from lib_lora.keys import kohya_to_path
from lib_lora.networks import NetworkModule
from lib_lora.networks.full import FullModule
from lib_lora.networks.loha import LoHaModule
from lib_lora.networks.lokr import LoKrModule
from lib_lora.networks.lora import LoRAModule
from lib_lora.networks.norm import NormModule
from lib_lora.types import Arch, Component

_CONV3_LEAVES = ("conv1", "conv2", "conv", "op", "in_layers.2", "out_layers.3")
_CONV3_TOP = ("conv_in", "conv_out", "input_blocks.0.0", "out.2")
_CONV1_LEAVES = ("conv_shortcut", "skip_connection")


@dataclass
class ModuleDelta:
    """ΔW of one module (scale included, multiplier not): factors when it is a plain low-rank product."""

    name: str
    shape: tuple[int, ...]
    module: NetworkModule
    up: Tensor | None = None  # [out, r] float32
    down: Tensor | None = None  # [r, in·kh·kw] float32
    scale: float = 1.0
    dense: Tensor | None = None  # ΔW [out, in·kh·kw] already computed (e.g. from the model's weights)

    @property
    def factored(self) -> bool:
        return self.up is not None

    @property
    def rank(self) -> int | None:
        return None if self.down is None else self.down.shape[0]

    @property
    def spatial(self) -> bool:
        return len(self.shape) == 4 and tuple(self.shape[2:]) != (1, 1)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return self.shape[0], math.prod(self.shape[1:])

    def matrix(self, device: torch.device | str = "cpu") -> Tensor:
        """ΔW as [out, in·kh·kw] float32."""
        if self.dense is not None:
            return self.dense.to(device)
        if self.factored:
            return (self.up.to(device) @ self.down.to(device)) * self.scale
        w0 = torch.zeros(1, device=device).expand(*self.shape)
        return self.module.to(device).delta(w0).reshape(self.matrix_shape).to(torch.float32)


def named_shape(name: str, out_f: int, inner: int, arch: Arch) -> tuple[int, ...]:
    """A weight shape from a U-Net layer name when only (out, in·kh·kw) is known (see the module docstring)."""
    comp, path = kohya_to_path(name)
    if comp is not Component.UNET:
        return (out_f, inner)
    if (path in _CONV3_TOP or path.endswith(tuple("." + leaf for leaf in _CONV3_LEAVES))) and inner % 9 == 0:
        return (out_f, inner // 9, 3, 3)
    if path.endswith(tuple("." + leaf for leaf in _CONV1_LEAVES)):
        return (out_f, inner, 1, 1)
    if arch is Arch.SD1 and path.endswith((".proj_in", ".proj_out")):
        return (out_f, inner, 1, 1)
    return (out_f, inner)


def _lokr_shape(module: LoKrModule) -> tuple[int, ...]:
    """kron(w1, w2)'s shape: [a·b, c·d(, kh, kw)], each factor full or a product of two."""
    a, c = (module.lokr_w1.shape if module.lokr_w1 is not None
            else (module.lokr_w1_a.shape[0], module.lokr_w1_b.shape[1]))
    if module.lokr_w2 is not None:
        w2 = tuple(module.lokr_w2.shape)
        return (a * w2[0], c * w2[1], *w2[2:])
    if module.lokr_t2 is not None:  # Tucker: t2 [r, r, kh, kw], w2_a [r, b], w2_b [r, d]
        return (a * module.lokr_w2_a.shape[1], c * module.lokr_w2_b.shape[1], *module.lokr_t2.shape[2:])
    return (a * module.lokr_w2_a.shape[0], c * module.lokr_w2_b.shape[1])


def weight_shape(name: str, module: NetworkModule, arch: Arch,
                 known: Mapping[str, tuple[int, ...]] | None = None) -> tuple[int, ...]:
    if known and name in known:
        return tuple(known[name])
    if isinstance(module, FullModule):
        return tuple(module.diff.shape)
    produced = _lokr_shape(module) if isinstance(module, LoKrModule) else module.delta_shape()
    if produced is None:
        raise ConfigError("input", name, f"a {module.algo} module changes the weight by its values: this needs "
                                         "the model (base checkpoint)")
    if len(produced) == 4 or (isinstance(module, LoRAModule) and module.lora_down.weight.dim() == 2):
        return tuple(produced)
    return named_shape(name, produced[0], math.prod(produced[1:]), arch)


def _loha_factors(m: LoHaModule) -> tuple[Tensor, Tensor] | None:
    if m.hada_t1 is not None:
        return None
    a1, b1, a2, b2 = (t.detach().to(torch.float32) for t in (m.hada_w1_a, m.hada_w1_b, m.hada_w2_a, m.hada_w2_b))
    up = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)
    down = (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])
    return up, down


def _split(full: Tensor | None, a: Tensor | None, b: Tensor | None) -> tuple[Tensor, Tensor]:
    """A kron factor as P @ Q: its own low-rank pair, or the full matrix times an identity (the smaller side)."""
    if full is None:
        return a.detach().to(torch.float32), b.detach().to(torch.float32).flatten(1)
    w = full.detach().to(torch.float32).flatten(1)
    if w.shape[0] <= w.shape[1]:
        return torch.eye(w.shape[0]), w
    return w, torch.eye(w.shape[1])


def _lokr_factors(m: LoKrModule) -> tuple[Tensor, Tensor] | None:
    if m.lokr_t2 is not None:
        return None
    p1, q1 = _split(m.lokr_w1, m.lokr_w1_a, m.lokr_w1_b)
    p2, q2 = _split(m.lokr_w2, m.lokr_w2_a, m.lokr_w2_b)
    return torch.kron(p1, p2), torch.kron(q1, q2)


def module_delta(name: str, module: NetworkModule, arch: Arch,
                 known: Mapping[str, tuple[int, ...]] | None = None) -> ModuleDelta:
    """The module as a ΔW (factors for plain LoRA). DoRA and IA3 are refused: their change needs W0."""
    if module.dora_scale is not None or module.algo == "ia3":
        what = "DoRA" if module.dora_scale is not None else "IA3"
        raise ConfigError("input", name, f"a {what} module's change depends on the model's weights; give the base "
                                         "model (convert with --model) to turn it into plain LoRA")
    shape = weight_shape(name, module, arch, known)
    if isinstance(module, LoRAModule) and module.lora_mid is None:
        up = module.lora_up.weight.detach().flatten(1).to(torch.float32)
        down = module.lora_down.weight.detach().flatten(1).to(torch.float32)
        return ModuleDelta(name, shape, module, up, down, module.scale)
    factors = _loha_factors(module) if isinstance(module, LoHaModule) else (
        _lokr_factors(module) if isinstance(module, LoKrModule) else None)
    if factors is not None and factors[1].shape[0] < min(shape[0], math.prod(shape[1:])):
        return ModuleDelta(name, shape, module, factors[0], factors[1], module.scale)
    return ModuleDelta(name, shape, module)


def is_norm(module: NetworkModule) -> bool:
    """A normalization layer's change (`w_norm`/`b_norm`): no ΔW matrix, no rank."""
    return isinstance(module, NormModule)


def norm_tensors(name: str, terms: Sequence[tuple[NormModule, float]], dtype: torch.dtype) -> dict[str, Tensor]:
    """`w_norm`/`b_norm` of normalization-layer changes added up at their strengths: the layer's weight becomes
    W + Σ sᵢ·w_normᵢ and its bias b + Σ sᵢ·b_normᵢ (a missing b_norm counts as zero; none at all: none written)."""
    w = sum(m.w_norm.detach().to(torch.float32) * s for m, s in terms)
    biases = [(m.b_norm, s) for m, s in terms if m.b_norm is not None]
    out = {f"{name}.w_norm": w.to("cpu", dtype).contiguous()}
    if biases:
        b = sum(t.detach().to(torch.float32) * s for t, s in biases)
        out[f"{name}.b_norm"] = b.to("cpu", dtype).contiguous()
    return out


def norm_note(count: int, what: str) -> str:
    return f"{count} normalization-layer changes (train_norm: w_norm/b_norm) {what}"
