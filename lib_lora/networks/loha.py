"""LoHa (LyCORIS): ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha/rank, rank = rows of w1_b.

File format: `hada_w1_a` [out, r], `hada_w1_b` [r, in·kh·kw], `hada_w2_a`, `hada_w2_b`, `alpha`; with Tucker
(convs): `hada_t1`/`hada_t2` [r, r, kh, kw], `hada_w*_a` [r, out], `hada_w*_b` [r, in].
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lib_lora.errors import ShapeMismatchError
from lib_lora.networks.base import NetworkModule
from lib_lora.networks.registry import register

_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def _factor(a: Tensor, b: Tensor, t: Tensor | None) -> Tensor:
    if t is None:
        return a @ b
    # Tucker: t [r, r, kh, kw] joined with a [r, out] and b [r, in] -> [out, in, kh, kw]
    return torch.einsum("i j k l, j r, i p -> p r k l", t, b, a)


@register
class LoHaModule(NetworkModule):
    algo = "loha"
    tensor_names = (*_NAMES, "hada_t1", "hada_t2")
    detect_names = ("hada_w1_a",)

    def __init__(self, name: str, tensors: Mapping[str, Tensor], trainable: bool = False):
        super().__init__(name)
        for key in self.tensor_names:
            if key in tensors:
                setattr(self, key, nn.Parameter(tensors[key], requires_grad=trainable))
            else:
                setattr(self, key, None)

    @classmethod
    def _from_tensors(cls, name: str, tensors: Mapping[str, Tensor], source: str) -> LoHaModule:
        missing = [k for k in _NAMES if k not in tensors]
        if missing:
            raise ShapeMismatchError(source, f"{name}.{missing[0]}", ("present",), ("missing",), "LoHa needs all four")
        if ("hada_t1" in tensors) != ("hada_t2" in tensors):
            raise ShapeMismatchError(source, f"{name}.hada_t1", ("both t1 and t2",), ("only one",))
        return cls(name, {k: v.detach() for k, v in tensors.items() if k in cls.tensor_names})

    @classmethod
    def create(cls, name: str, shape: torch.Size, rank: int, alpha: float | None = None, *,
               generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
               use_tucker: bool = False) -> LoHaModule:
        """Trainable LoHa initialised as LyCORIS does: w1 random, w2_a zero so ΔW starts at 0. With `use_tucker` a
        k x k convolution gets LyCORIS' Tucker form (`hada_t1`/`hada_t2` [r, r, kh, kw], factors [r, out], [r, in])."""
        kernel = tuple(shape[2:])

        def normal(*size, std=1.0):
            return torch.randn(*size, generator=generator, dtype=dtype) * std

        if use_tucker and any(k > 1 for k in kernel):
            out_f, in_f = shape[0], shape[1]
            t = {"hada_t1": normal(rank, rank, *kernel, std=0.1), "hada_t2": normal(rank, rank, *kernel, std=0.1),
                 "hada_w1_a": normal(rank, out_f, std=0.1), "hada_w1_b": normal(rank, in_f),
                 "hada_w2_a": torch.zeros(rank, out_f, dtype=dtype), "hada_w2_b": normal(rank, in_f)}
        else:
            out_f, in_f = shape[0], math.prod(shape[1:])
            t = {"hada_w1_a": normal(out_f, rank, std=0.1), "hada_w1_b": normal(rank, in_f),
                 "hada_w2_a": torch.zeros(out_f, rank, dtype=dtype), "hada_w2_b": normal(rank, in_f)}
        module = cls(name, t, trainable=True)
        module.alpha = torch.tensor(float(alpha or rank))
        return module

    @property
    def rank(self) -> int:
        return self.hada_w1_b.shape[0]

    has_max_norm = True

    @torch.no_grad()
    def scale_change_(self, ratio: float) -> None:
        root = math.sqrt(ratio)  # ΔW = w1 ⊙ w2, each linear in its `a` factor
        self.hada_w1_a.mul_(root)
        self.hada_w2_a.mul_(root)

    def delta_shape(self) -> tuple[int, ...]:
        if self.hada_t1 is not None:
            return (self.hada_w1_a.shape[1], self.hada_w1_b.shape[1], *self.hada_t1.shape[2:])
        return (self.hada_w1_a.shape[0], self.hada_w1_b.shape[1])

    def delta(self, w0: Tensor) -> Tensor:
        f = {k: None if getattr(self, k) is None else getattr(self, k).to(torch.float32) for k in self.tensor_names}
        w1 = _factor(f["hada_w1_a"], f["hada_w1_b"], f["hada_t1"])
        w2 = _factor(f["hada_w2_a"], f["hada_w2_b"], f["hada_t2"])
        return (w1 * w2).reshape(w0.shape) * self.scale
