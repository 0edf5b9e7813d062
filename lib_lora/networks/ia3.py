"""(IA)^3 (LyCORIS ia3): a learned rescaling of the weight's output rows (or input columns).

File format: `weight` [out] (or [in] with `on_input` true; convs may store [1, out, 1, 1]), `on_input`
(0-dim). ΔW = W0 · w broadcast over rows (columns); no alpha scaling.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lib_lora.errors import ShapeMismatchError
from lib_lora.networks.base import NetworkModule
from lib_lora.networks.registry import register


@register
class IA3Module(NetworkModule):
    algo = "ia3"
    tensor_names = ("weight", "on_input")
    detect_names = ("weight",)
    uses_alpha = False

    def __init__(self, name: str, weight: Tensor, on_input: bool = False, trainable: bool = False):
        super().__init__(name)
        self.weight = nn.Parameter(weight, requires_grad=trainable)
        self.on_input = bool(on_input)

    @classmethod
    def _from_tensors(cls, name: str, tensors: Mapping[str, Tensor], source: str) -> IA3Module:
        on_input = bool(tensors["on_input"].item()) if "on_input" in tensors else False
        return cls(name, tensors["weight"].detach(), on_input)

    @classmethod
    def create(cls, name: str, shape: torch.Size, rank: int = 0, alpha: float | None = None, *, on_input: bool = False,
               generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> IA3Module:
        """Trainable IA3 starting at ΔW = 0 (rank and alpha do not apply)."""
        return cls(name, torch.zeros(shape[1] if on_input else shape[0], dtype=dtype), on_input, trainable=True)

    def file_tensors(self) -> dict[str, Tensor]:
        return {"weight": self.weight.detach(), "on_input": torch.tensor(self.on_input)}

    def check_shape(self, target_shape: torch.Size) -> None:
        want = target_shape[1] if self.on_input else target_shape[0]
        if self.weight.numel() != want:
            raise ShapeMismatchError(self.source or "network", f"{self.lora_name}.weight", (want,),
                                     tuple(self.weight.shape), "one factor per " + ("input" if self.on_input else
                                                                                   "output") + " channel")

    def delta(self, w0: Tensor) -> Tensor:
        w = self.weight.to(torch.float32).reshape(-1)
        if self.on_input:
            return w0 * w.reshape(1, -1, *([1] * (w0.dim() - 2)))
        return w0 * w.reshape(-1, *([1] * (w0.dim() - 1)))
