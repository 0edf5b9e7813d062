"""LoKr (LyCORIS): ΔW = kron(w1, w2) · alpha/rank, where each factor may itself be low rank.

File format: `lokr_w1` [a, c] or `lokr_w1_a` [a, r] + `lokr_w1_b` [r, c]; `lokr_w2` [b, d(, kh, kw)] or
`lokr_w2_a` [b, r] + `lokr_w2_b` [r, d·kh·kw], or with Tucker `lokr_t2` [r, r, kh, kw], `lokr_w2_a` [r, b],
`lokr_w2_b` [r, d]; `alpha`. The weight is [a·b, c·d(, kh, kw)]. rank = rows of w1_b, else of w2_b;
with both factors full there is no rank and the scale is 1 (as A1111 and ComfyUI read it).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lib_lora.errors import ShapeMismatchError
from lib_lora.networks.base import NetworkModule
from lib_lora.networks.registry import register


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split `dimension` into (m, n), m <= n, m*n == dimension, m as close to `factor` (or sqrt) as possible."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n, length = new_m, new_n, new_m + new_n
    return (m, n) if m <= n else (n, m)


@register
class LoKrModule(NetworkModule):
    algo = "lokr"
    tensor_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    detect_names = ("lokr_w1", "lokr_w1_a")

    def __init__(self, name: str, tensors: Mapping[str, Tensor], trainable: bool = False):
        super().__init__(name)
        for key in self.tensor_names:
            setattr(self, key, nn.Parameter(tensors[key], requires_grad=trainable) if key in tensors else None)

    @classmethod
    def _from_tensors(cls, name: str, tensors: Mapping[str, Tensor], source: str) -> LoKrModule:
        has1 = "lokr_w1" in tensors or ("lokr_w1_a" in tensors and "lokr_w1_b" in tensors)
        has2 = "lokr_w2" in tensors or ("lokr_w2_a" in tensors and "lokr_w2_b" in tensors)
        if not (has1 and has2):
            which = "lokr_w1" if not has1 else "lokr_w2"
            raise ShapeMismatchError(source, f"{name}.{which}", ("present",), ("missing",), "LoKr needs both factors")
        return cls(name, {k: v.detach() for k, v in tensors.items() if k in cls.tensor_names})

    @classmethod
    def create(cls, name: str, shape: torch.Size, rank: int, alpha: float | None = None, *, factor: int = -1,
               use_tucker: bool = False, decompose_both: bool = False, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> LoKrModule:
        """Trainable LoKr as LyCORIS builds it, ΔW = 0 at the start.

        The weight [out, in(, kh, kw)] splits as out = a·b, in = c·d (`factorization` by `factor`); w1 [a, c] is
        full (low rank [a, r] x [r, c] with `decompose_both` when r < max(a, c)/2); w2 [b, d(, kh, kw)] is low rank
        [b, r] x [r, d·kh·kw] (Tucker with `use_tucker` on a k x k conv) unless r >= max(b, d)/2, where it is full
        (LyCORIS' rule: a dim at or above the layer's size, e.g. 100000, asks for full factors). With both factors
        full the scale is 1. Initialisation (LyCORIS): w1, w2_a, t2 Kaiming-uniform; w2_b, or a full w2, zero.
        """
        a, b = factorization(shape[0], factor)
        c, d = factorization(shape[1], factor)
        kernel = tuple(shape[2:])

        def kaiming(*size):
            t = torch.empty(*size, dtype=dtype)
            nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
            return t

        t: dict[str, Tensor] = {}
        if decompose_both and rank < max(a, c) / 2:
            t["lokr_w1_a"], t["lokr_w1_b"] = kaiming(a, rank), kaiming(rank, c)
        else:
            t["lokr_w1"] = kaiming(a, c)
        if rank >= max(b, d) / 2:
            t["lokr_w2"] = torch.zeros(b, d, *kernel, dtype=dtype)
        elif use_tucker and any(k > 1 for k in kernel):
            t["lokr_t2"] = kaiming(rank, rank, *kernel)
            t["lokr_w2_a"], t["lokr_w2_b"] = kaiming(rank, b), torch.zeros(rank, d, dtype=dtype)
        else:
            t["lokr_w2_a"], t["lokr_w2_b"] = kaiming(b, rank), torch.zeros(rank, d * math.prod(kernel), dtype=dtype)
        module = cls(name, t, trainable=True)
        module.alpha = torch.tensor(float(alpha or rank))
        return module

    @property
    def rank(self) -> int | None:
        if self.lokr_w1_b is not None:
            return self.lokr_w1_b.shape[0]
        if self.lokr_w2_b is not None:
            return self.lokr_w2_b.shape[0]
        return None

    def delta_shape(self) -> tuple[int, ...]:
        """[a·b, c·d(, kh, kw)]: with a full 4-dim w2 or Tucker's t2 the kernel is the factors' own."""
        a = (self.lokr_w1 if self.lokr_w1 is not None else self.lokr_w1_a).shape[0]
        c = (self.lokr_w1 if self.lokr_w1 is not None else self.lokr_w1_b).shape[1]
        if self.lokr_w2 is not None:
            b, d, *kernel = self.lokr_w2.shape
        elif self.lokr_t2 is not None:
            b, d, kernel = self.lokr_w2_a.shape[1], self.lokr_w2_b.shape[1], list(self.lokr_t2.shape[2:])
        else:
            b, d, kernel = self.lokr_w2_a.shape[0], self.lokr_w2_b.shape[1], []
        return (a * b, c * d, *kernel)

    has_max_norm = True

    @torch.no_grad()
    def scale_change_(self, ratio: float) -> None:
        (self.lokr_w1 if self.lokr_w1 is not None else self.lokr_w1_a).mul_(ratio)  # kron is linear in w1

    def _w1(self) -> Tensor:
        if self.lokr_w1 is not None:
            return self.lokr_w1.to(torch.float32)
        return self.lokr_w1_a.to(torch.float32) @ self.lokr_w1_b.to(torch.float32)

    def _w2(self, kernel: tuple[int, ...]) -> Tensor:
        if self.lokr_w2 is not None:
            return self.lokr_w2.to(torch.float32)
        a, b = self.lokr_w2_a.to(torch.float32), self.lokr_w2_b.to(torch.float32)
        if self.lokr_t2 is not None:
            # einsum returns a permuted view; kron needs contiguous memory
            return torch.einsum("i j k l, i p, j r -> p r k l", self.lokr_t2.to(torch.float32), a, b).contiguous()
        w2 = a @ b
        return w2.reshape(w2.shape[0], -1, *kernel) if kernel else w2

    def check_shape(self, target_shape: torch.Size) -> None:
        w1, w2 = self._w1(), self._w2(())
        out = w1.shape[0] * w2.shape[0]
        inner = w1.shape[1] * (w2.numel() // w2.shape[0])
        if out != target_shape[0] or inner != math.prod(target_shape[1:]):
            self._shape_error(target_shape, (out, inner), "kron(w1, w2) gives [a*b, c*d*kh*kw]")
        super().check_shape(target_shape)

    def delta(self, w0: Tensor) -> Tensor:
        kernel = tuple(w0.shape[2:])
        w1 = self._w1()
        w2 = self._w2(kernel)
        if kernel and w2.dim() == 2:
            w2 = w2.reshape(w2.shape[0], -1, *kernel)
        if kernel:
            w1 = w1.reshape(*w1.shape, *([1] * len(kernel)))
        return torch.kron(w1, w2).reshape(w0.shape) * self.scale
