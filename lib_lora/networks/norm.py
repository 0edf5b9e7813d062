"""Normalization-layer changes (LyCORIS `NormModule`, trained with `network_args = ["train_norm=True"]`): a
GroupNorm's or LayerNorm's affine weight and bias get a learned additive change.

File format (LyCORIS, and what A1111's built-in Lora reads, `network_norm.py`): `w_norm` [C] (the weight's change),
`b_norm` [C] (the bias' change; A1111 loads a module only when both are present, LyCORIS writes both). No alpha, no
scale: W' = W + m·w_norm, b' = b + m·b_norm at multiplier m (A1111's `updown · multiplier`, `ex_bias · multiplier`).
Training starts at zero (LyCORIS), so at the base model.

Applied without touching the weights (training, previews), the layer's output becomes norm(x; W, b) +
norm(x; m·w_norm, m·b_norm), the two being one normalisation of x with affine parameters that add up; where the
module is the only one on its layer it computes norm(x; W + m·w_norm, b + m·b_norm) once instead (`rebuilt_forward`).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lib_lora.errors import ShapeMismatchError
from lib_lora.networks.base import LayerOp, NetworkModule
from lib_lora.networks.registry import register


def _float_norm(layer: LayerOp, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The normalisation in float32 (as the LDM code's GroupNorm32 computes it), returned in x's dtype."""
    out = layer(x.to(torch.float32), weight.to(torch.float32), None if bias is None else bias.to(torch.float32))
    return out.to(x.dtype)


@register
class NormModule(NetworkModule):
    algo = "norm"
    tensor_names = ("w_norm", "b_norm")
    detect_names = ("w_norm",)
    uses_alpha = False

    def __init__(self, name: str, w_norm: Tensor, b_norm: Tensor | None = None, trainable: bool = False):
        super().__init__(name)
        self.w_norm = nn.Parameter(w_norm, requires_grad=trainable)
        self.b_norm = None if b_norm is None else nn.Parameter(b_norm, requires_grad=trainable)

    @classmethod
    def _from_tensors(cls, name: str, tensors: Mapping[str, Tensor], source: str) -> NormModule:
        w, b = tensors["w_norm"], tensors.get("b_norm")
        if w.dim() != 1:
            raise ShapeMismatchError(source, f"{name}.w_norm", ("C",), tuple(w.shape),
                                     "one value per channel of the normalization layer")
        if b is not None and tuple(b.shape) != tuple(w.shape):
            raise ShapeMismatchError(source, f"{name}.b_norm", tuple(w.shape), tuple(b.shape),
                                     "b_norm must have the shape of w_norm")
        return cls(name, w.detach(), None if b is None else b.detach())

    @classmethod
    def create(cls, name: str, shape: torch.Size, rank: int = 0, alpha: float | None = None, *, bias: bool = True,
               generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> NormModule:
        """Trainable change of a normalization layer whose weight has `shape`, starting at zero (rank and alpha do
        not apply); `bias`: the layer has a bias (every GroupNorm/LayerNorm of SD models does)."""
        size = int(torch.Size(shape).numel())
        b = torch.zeros(size, dtype=dtype) if bias else None
        return cls(name, torch.zeros(size, dtype=dtype), b, trainable=True)

    # -- shapes -----------------------------------------------------------------------------------

    def delta_shape(self) -> tuple[int, ...]:
        return tuple(self.w_norm.shape)

    # -- math -------------------------------------------------------------------------------------

    def delta(self, w0: Tensor) -> Tensor:
        return self.w_norm.to(torch.float32).reshape(w0.shape)

    def bias_delta(self) -> Tensor | None:
        return self.b_norm

    def _dropped(self) -> bool:
        return bool(self.training and self.module_dropout and float(torch.rand(())) < self.module_dropout)

    def rebuilt_forward(self, x: Tensor, module: nn.Module, layer: LayerOp, multiplier: float) -> Tensor | None:
        """One normalisation with the changed affine parameters (the merged weight, computed as the merge does)."""
        if self.bypass_only or self.dora_scale is not None or (self.training and self.module_dropout):
            return None
        w0, b0 = module.weight, getattr(module, "bias", None)
        weight = self.merged(w0, multiplier)
        bias = self.merged_bias(b0, multiplier)
        return _float_norm(layer, x, weight, bias)

    def bypass(self, x: Tensor, base_out: Tensor, layer: LayerOp, w0: Tensor, multiplier: float,
               b0: Tensor | None = None) -> Tensor:
        if self._dropped():
            return base_out
        if self.dora_scale is not None:
            return super().bypass(x, base_out, layer, w0, multiplier, b0)
        bias = None if self.b_norm is None else multiplier * self.b_norm.to(torch.float32)
        extra = _float_norm(layer, x, multiplier * self.delta(w0), bias)
        return base_out + extra.to(base_out.dtype)
