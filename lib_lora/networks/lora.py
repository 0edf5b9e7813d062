"""LoRA and LoCon (kohya networks.lora, LyCORIS locon): ΔW = up @ down · alpha/rank.

File format: `lora_down.weight` [r, in(, kh, kw)], `lora_up.weight` [out, r(, 1, 1)], `alpha` (0-dim),
optional `lora_mid.weight` [r, r, kh, kw] (Tucker/CP decomposition of a conv: down and up are then 1x1),
optional `dora_scale` (DoRA). Conv layers: down carries the layer's kernel, stride and padding; up is 1x1.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lib_lora.errors import ShapeMismatchError
from lib_lora.networks.base import LayerOp, NetworkModule
from lib_lora.networks.registry import register


class _Weight(nn.Module):
    """Holds one parameter under `.weight`, so state-dict keys read `lora_down.weight` as files do."""

    def __init__(self, tensor: Tensor, trainable: bool = False):
        super().__init__()
        self.weight = nn.Parameter(tensor, requires_grad=trainable)


@register
class LoRAModule(NetworkModule):
    algo = "lora"
    tensor_names = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
    detect_names = ("lora_down.weight", "lora_up.weight")

    def __init__(self, name: str, down: Tensor, up: Tensor, mid: Tensor | None = None, trainable: bool = False):
        super().__init__(name)
        self.lora_down = _Weight(down, trainable)
        self.lora_up = _Weight(up, trainable)
        self.lora_mid = _Weight(mid, trainable) if mid is not None else None
        # training only: DyLoRA's unit (train a random leading block of ranks each step, so any prefix works alone)
        self.dylora_unit = 0
        # training only: how rank dropout rescales the kept ranks: "keep" = by 1 / (1 - rate) (sd-scripts), "none"
        # (LyCORIS' default), "mean" = by 1 / the share kept this call (LyCORIS rank_dropout_scale)
        self.rank_dropout_rescale = "keep"
        # training only: ΔW (scale included, [out, in·k·k]) computed for this forward/backward pass together with
        # other modules of the same shape (`TrainableNetwork.share_deltas`); None outside such a pass
        self.shared_delta: Tensor | None = None

    @classmethod
    def _from_tensors(cls, name: str, tensors: Mapping[str, Tensor], source: str) -> LoRAModule:
        missing = [k for k in ("lora_down.weight", "lora_up.weight") if k not in tensors]
        if missing:
            raise ShapeMismatchError(source, f"{name}.{missing[0]}", ("present",), ("missing",), "LoRA needs both")
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        mid = tensors.get("lora_mid.weight")
        rank = down.shape[0]
        if up.dim() < 2 or up.shape[1] != rank or (mid is not None and tuple(mid.shape[:2]) != (rank, rank)):
            raise ShapeMismatchError(source, f"{name}.lora_up.weight", (up.shape[0], rank), tuple(up.shape),
                                     "rank of lora_up must equal rows of lora_down")
        return cls(name, down.detach(), up.detach(), None if mid is None else mid.detach())

    @classmethod
    def create(cls, name: str, shape: torch.Size, rank: int, alpha: float | None = None, *,
               generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
               dora_weight: Tensor | None = None, use_tucker: bool = False) -> LoRAModule:
        """A new trainable module for a weight of `shape`, initialised as kohya does (up = 0).

        With `dora_weight` (the base weight W0) it is a DoRA module: a trainable magnitude per output row,
        initialised to the row norms of W0 (LyCORIS' default orientation), so training starts at W0. With
        `use_tucker` a k x k convolution gets LyCORIS' Tucker form: 1x1 down, k x k `lora_mid` [r, r, kh, kw]
        (initialised like down), 1x1 up.
        """
        out_f, in_f = shape[0], shape[1]
        kernel = tuple(shape[2:])
        tucker = use_tucker and any(k > 1 for k in kernel)
        down = torch.empty((rank, in_f, *(len(kernel) * [1] if tucker else kernel)), dtype=dtype)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        up = torch.zeros((out_f, rank, *([1] * len(kernel))), dtype=dtype)
        mid = None
        if tucker:
            mid = torch.empty((rank, rank, *kernel), dtype=dtype)
            nn.init.kaiming_uniform_(mid, a=math.sqrt(5), generator=generator)
        module = cls(name, down, up, mid, trainable=True)
        module.alpha = torch.tensor(float(alpha or rank))
        if dora_weight is not None:
            norms = dora_weight.detach().to(torch.float32).reshape(out_f, -1).norm(dim=1)
            module.dora_scale = nn.Parameter(norms.reshape(out_f, *([1] * (len(shape) - 1))).to(dtype))
        return module

    @property
    def rank(self) -> int:
        return self.lora_down.weight.shape[0]

    has_max_norm = True

    @torch.no_grad()
    def scale_change_(self, ratio: float) -> None:
        root = math.sqrt(ratio)  # ΔW is linear in each of up and down
        self.lora_up.weight.mul_(root)
        self.lora_down.weight.mul_(root)

    def delta_shape(self) -> tuple[int, ...]:
        down, up = self.lora_down.weight, self.lora_up.weight
        if self.lora_mid is not None:
            return (up.shape[0], down.shape[1], *self.lora_mid.weight.shape[2:])
        return (up.shape[0], *down.shape[1:])

    def check_shape(self, target_shape: torch.Size) -> None:
        produced = self.delta_shape()
        if produced[0] != target_shape[0] or math.prod(produced[1:]) != math.prod(target_shape[1:]):
            self._shape_error(target_shape, produced)
        super().check_shape(target_shape)

    def delta(self, w0: Tensor) -> Tensor:
        down = self.lora_down.weight.to(torch.float32)
        up = self.lora_up.weight.to(torch.float32)
        if self.lora_mid is None:
            dw = up.flatten(1) @ down.flatten(1)
        else:
            mid = self.lora_mid.weight.to(torch.float32)
            dw = torch.einsum("n m k l, i n, m j -> i j k l", mid, up.flatten(1), down.flatten(1))
        return dw.reshape(w0.shape) * self.scale

    def merged(self, w0: Tensor, multiplier: float) -> Tensor:
        if self.dora_scale is not None or self.lora_mid is not None:
            return super().merged(w0, multiplier)
        if self.shared_delta is not None:  # every use of ΔW goes through the shared one while it is set
            base = w0.to(torch.float32)
            return torch.add(base.reshape(self.shared_delta.shape), self.shared_delta.to(torch.float32),
                             alpha=multiplier).reshape(w0.shape)
        # one fused multiply-add into a float32 copy of W0: the hot path of applying a LoRA
        up = self.lora_up.weight.flatten(1).to(torch.float32)
        down = self.lora_down.weight.flatten(1).to(torch.float32)
        base = w0.to(torch.float32).reshape(up.shape[0], -1)
        return torch.addmm(base, up, down, alpha=multiplier * self.scale).reshape(w0.shape)

    def rebuilt_forward(self, x: Tensor, module: nn.Module, layer: LayerOp, multiplier: float) -> Tensor | None:
        """Rebuild when it costs fewer operations than the low-rank bypass (LyCORIS' "rebuild" mode).

        Extra work over the frozen layer, in multiply-adds (forward + backward): bypass ≈ 3·rows·r·(in + out);
        rebuild ≈ rows·in·out (the weight gradient it needs) + 3·in·out·r (building ΔW and its gradients). Small
        layers and few rows favour rebuilding (and it launches 2 kernels instead of 5); SD-sized layers at
        training resolutions favour the bypass. With `shared_delta` set, ΔW is built already and `delta_groups`
        admitted this module only where rebuilding is the cheaper path at any input size.
        """
        shared = self.shared_delta
        w0 = module.weight
        if shared is not None:
            weight = torch.add(w0.reshape(shared.shape), shared, alpha=multiplier)
        else:
            if self.dora_scale is not None or self.lora_mid is not None or self.bypass_only or (
                    self.training and self.varies_per_call):
                return None
            down, up = self.lora_down.weight, self.lora_up.weight
            out_f, in_f, r = w0.shape[0], w0[0].numel(), down.shape[0]
            if layer.kind == "linear":
                rows = x.numel() // x.shape[-1]
            else:  # output positions of the conv
                rows = x.shape[0] * x.shape[-1] * x.shape[-2] // (layer.stride[0] * layer.stride[1])
            if not rebuild_is_cheaper(rows, in_f, out_f, r, build=True):
                return None
            # in the wider of the two dtypes: an fp16 file on a float32 model must not round W0 to fp16
            dtype = torch.promote_types(w0.dtype, up.dtype)
            weight = torch.addmm(w0.reshape(out_f, -1).to(dtype), up.reshape(out_f, r).to(dtype),
                                 down.reshape(r, -1).to(dtype), alpha=multiplier * self.scale)
        if not torch.is_autocast_enabled():
            weight = weight.to(x.dtype)
        if layer.pointwise and x.device.type == "cpu":
            return pointwise_conv(x, weight, module.bias)
        return layer(x, weight.reshape(w0.shape), module.bias)

    @property
    def varies_per_call(self) -> bool:
        """Training draws something at every call (dropouts, DyLoRA's ranks): ΔW is then no single matrix."""
        return bool(self.dropout or self.rank_dropout or self.module_dropout or self.dylora_unit)

    def _factors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, float]:
        """(down, up, scale) used this step: all ranks, or DyLoRA's random leading block while training."""
        down, up = self.lora_down.weight, self.lora_up.weight
        if down.dtype != dtype:
            down, up = down.to(dtype), up.to(dtype)
        if not (self.training and self.dylora_unit):
            return down, up, self.scale
        # DyLoRA (Valipour et al. 2022), as sd-scripts trains it: a random prefix of k ranks, only its last
        # `unit` ranks get gradients this step, scale alpha/k
        unit = self.dylora_unit
        k = unit * int(torch.randint(1, self.rank // unit + 1, ()))
        down = torch.cat([down[: k - unit].detach(), down[k - unit : k]])
        up = torch.cat([up[:, : k - unit].detach(), up[:, k - unit : k]], dim=1)
        return down, up, float(self.alpha) / k

    def bypass(self, x: Tensor, base_out: Tensor, layer: LayerOp, w0: Tensor, multiplier: float,
               b0: Tensor | None = None) -> Tensor:
        if self.training and self.module_dropout and float(torch.rand(())) < self.module_dropout:
            return base_out
        if self.dora_scale is not None:
            return super().bypass(x, base_out, layer, w0, multiplier, b0)
        if self.shared_delta is not None:  # every use of ΔW goes through the shared one while it is set
            return base_out + layer(x, (self.shared_delta * multiplier).reshape(w0.shape).to(x.dtype))
        down, up, scale = self._factors(x.dtype)
        if layer.kind == "linear":
            h = F.linear(x, down if down.dim() == 2 else down.flatten(1))
        elif self.lora_mid is None:
            if down.dim() == 2:  # a Linear-shaped file on a 1x1 conv
                down, up = down[:, :, None, None], up[:, :, None, None]
            h = layer(x, down)
        else:
            h = F.conv2d(F.conv2d(x, down), self.lora_mid.weight.to(x.dtype), None, layer.stride, layer.padding,
                         layer.dilation)
        if self.training and self.dropout:
            h = F.dropout(h, p=self.dropout)
        if self.training and self.rank_dropout:
            # one keep/drop decision per sample and rank channel, survivors rescaled (sd-scripts' rank_dropout)
            shape = (h.shape[0], *([1] * (h.dim() - 2)), h.shape[-1]) if layer.kind == "linear" else \
                (h.shape[0], h.shape[1], *([1] * (h.dim() - 2)))
            keep = (torch.rand(shape, device=h.device) > self.rank_dropout).to(h.dtype)
            h = h * keep
            if self.rank_dropout_rescale == "keep":
                scale = scale / (1.0 - self.rank_dropout)
            elif self.rank_dropout_rescale == "mean":  # LyCORIS rank_dropout_scale: by the share actually kept
                h = h / keep.mean().clamp(min=1.0 / keep.numel())
        if layer.kind == "linear":
            h = F.linear(h, up if up.dim() == 2 else up.flatten(1))
        else:
            h = F.conv2d(h, up)
        return base_out + h * (multiplier * scale)


def rebuild_is_cheaper(rows: int, in_f: int, out_f: int, rank: int, *, build: bool) -> bool:
    """Multiply-adds over the frozen layer, forward + backward: rebuilding costs rows·in·out (the weight gradient)
    plus, with `build`, 3·in·out·r (making ΔW and its gradients); the low-rank bypass costs 3·rows·r·(in + out)."""
    return rows * in_f * out_f + (3 * in_f * out_f * rank if build else 0) <= 3 * rows * rank * (in_f + out_f)


def pointwise_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A 1x1 convolution (stride 1, no padding, one group) of NCHW `x` with `weight` [out, in], as a batched matrix
    product. On the CPU this ran 1.2-2.9x faster than the convolution kernel when the weight needs a gradient
    (measured forward + backward, 4x32x8x8 to 2x320x64x64 inputs); the values are the same up to rounding."""
    n, c, h, w = x.shape
    flat = x.reshape(n, c, h * w)
    batch_weight = weight.unsqueeze(0).expand(n, -1, -1)
    if bias is None:
        out = torch.bmm(batch_weight, flat)
    else:
        out = torch.baddbmm(bias.to(flat.dtype).reshape(1, -1, 1).expand(n, -1, h * w), batch_weight, flat)
    return out.reshape(n, -1, h, w)


@dataclass(frozen=True)
class DeltaGroup:
    """LoRA modules of one shape (out, in·k·k, rank, dtype, device) whose ΔW are computed in one batched product;
    `scale` is their common alpha/rank, or a [n, 1, 1] tensor of their scales when those differ. Their factors are
    listed once here: the per-step work is then two stacks, one product and one unbind."""

    members: tuple[LoRAModule, ...]
    ups: tuple[Tensor, ...]
    downs: tuple[Tensor, ...]
    shape: tuple[int, int, int]  # (out, rank, in·k·k)
    scale: float | Tensor


def delta_groups(modules: Iterable[NetworkModule], max_elements: int) -> list[DeltaGroup]:
    """Group by shape the plain LoRA modules (no Tucker mid, DoRA, dropouts or DyLoRA) whose weight has at most
    `max_elements` elements and is cheaper to rebuild than to bypass once ΔW is built, at any input size
    (`rebuild_is_cheaper` without the build term); groups of one gain nothing and are left out."""
    by_shape: dict[tuple, list[LoRAModule]] = defaultdict(list)
    for m in modules:
        if not isinstance(m, LoRAModule) or m.lora_mid is not None or m.dora_scale is not None or m.varies_per_call \
                or m.bypass_only:
            continue
        up, down = m.lora_up.weight, m.lora_down.weight
        out_f, in_f = up.shape[0], down[0].numel()
        # without the build term the number of rows cancels out: one row decides for every input size
        if out_f * in_f <= max_elements and rebuild_is_cheaper(1, in_f, out_f, m.rank, build=False):
            by_shape[(out_f, in_f, m.rank, up.dtype, up.device, up.dim())].append(m)
    groups = []
    for (out_f, in_f, rank, dtype, device, _), members in by_shape.items():
        if len(members) < 2:
            continue
        scales = [m.scale for m in members]
        scale = scales[0] if len(set(scales)) == 1 else \
            torch.tensor(scales, dtype=dtype, device=device).reshape(-1, 1, 1)
        groups.append(DeltaGroup(tuple(members), tuple(m.lora_up.weight for m in members),
                                 tuple(m.lora_down.weight for m in members), (out_f, rank, in_f), scale))
    return groups


@contextmanager
def shared_deltas(groups: Sequence[DeltaGroup]) -> Iterator[None]:
    """Within the block, each module of `groups` holds its ΔW (scale included) as `shared_delta`, computed with
    its group in one batched product, and uses it wherever it applies ΔW: one kernel and one backward node per
    group instead of one per module, the same values up to rounding. The block must span the forward and backward
    pass that use them (ΔW is tied to the parameters' values when the block opened).

    A module whose output does not reach the loss (a text-encoder layer past the one clip skip reads) would get
    zero gradients from the batched product where it gets none on its own; those are reset to None when the block
    closes, so optimizers skip it (no weight decay) exactly as before.
    """
    # (group, whether each member's ΔW got a gradient, members without a gradient when the block opened)
    passes: list[tuple[DeltaGroup, list[bool], list[int]]] = []
    try:
        for group in groups:
            n, (out_f, rank, in_f) = len(group.members), group.shape
            ups = torch.stack(group.ups).reshape(n, out_f, rank)
            downs = torch.stack(group.downs).reshape(n, rank, in_f)
            deltas = (torch.bmm(ups, downs) * group.scale).unbind(0)
            reached = [False] * n
            if deltas[0].requires_grad:
                deltas[0].grad_fn.register_prehook(lambda grads, seen=reached: _mark(seen, grads))
            fresh = [i for i, (up, down) in enumerate(zip(group.ups, group.downs))
                     if up.grad is None and down.grad is None]
            passes.append((group, reached, fresh))
            for module, delta in zip(group.members, deltas):
                module.__dict__["shared_delta"] = delta  # a plain attribute: nn.Module's setattr is slow per step
        yield
    finally:
        for group, reached, fresh in passes:
            for module in group.members:
                module.__dict__["shared_delta"] = None
            for i in fresh:
                if not reached[i]:
                    group.ups[i].grad = group.downs[i].grad = None


def _mark(seen: list[bool], grads: tuple[Tensor | None, ...]) -> None:
    for i, g in enumerate(grads):
        if g is not None:
            seen[i] = True
