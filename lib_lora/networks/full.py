"""Full difference (LyCORIS full / "diff"): the file stores ΔW itself, and optionally the bias change.

File format: `diff` (shape of the weight), optional `diff_b` (shape of the bias). No alpha scaling.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lib_lora.networks.base import NetworkModule
from lib_lora.networks.registry import register


@register
class FullModule(NetworkModule):
    algo = "full"
    tensor_names = ("diff", "diff_b")
    detect_names = ("diff",)
    uses_alpha = False

    def __init__(self, name: str, diff: Tensor, diff_b: Tensor | None = None, trainable: bool = False):
        super().__init__(name)
        self.diff = nn.Parameter(diff, requires_grad=trainable)
        self.diff_b = None if diff_b is None else nn.Parameter(diff_b, requires_grad=trainable)

    @classmethod
    def _from_tensors(cls, name: str, tensors: Mapping[str, Tensor], source: str) -> FullModule:
        diff_b = tensors.get("diff_b")
        return cls(name, tensors["diff"].detach(), None if diff_b is None else diff_b.detach())

    @classmethod
    def create(cls, name: str, shape: torch.Size, rank: int = 0, alpha: float | None = None, *,
               generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> FullModule:
        return cls(name, torch.zeros(shape, dtype=dtype), trainable=True)

    def delta_shape(self) -> tuple[int, ...]:
        return tuple(self.diff.shape)

    def delta(self, w0: Tensor) -> Tensor:
        return self.diff.to(torch.float32).reshape(w0.shape)

    def bias_delta(self) -> Tensor | None:
        return self.diff_b
