"""The base of every LoRA-family algorithm: one module that changes one weight.

An algorithm subclass declares its file format as data (`tensor_names`, `detect_names`) and
implements `delta` (ΔW, scale included, before the user multiplier). The base class supplies:

- `merged(w0, m)`: the weight with the change applied at multiplier m, computed in float32. With a
  `dora_scale` tensor (DoRA weight decomposition, any algorithm) the rows (or columns) of W0 + ΔW are
  renormalised to `dora_scale`, and m interpolates between W0 and that result.
- `bypass(x, base_out, layer, m)`: the same change applied to a layer's output without touching its
  weight (training, previews). The default runs the layer's op with W' - W0; LoRA overrides it with
  the cheap low-rank path.
- `state_dict()` (nn.Module's) gives exactly the file's tensors under their file suffixes.

Scale convention (kohya, A1111, ComfyUI): scale = alpha / rank when the file has both, else 1.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lib_lora.errors import NonFiniteError, ShapeMismatchError


@dataclass(frozen=True)
class LayerOp:
    """How the targeted layer applies its weight: linear, conv2d with its geometry, or a normalization layer's
    affine weight and bias (group_norm: `groups` groups; layer_norm: over `normalized_shape`; both with `eps`)."""

    kind: str  # 'linear' | 'conv' | 'group_norm' | 'layer_norm'
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    pointwise: bool = False  # a 1x1 conv that is a per-pixel matrix product (stride 1, no padding, one group)
    normalized_shape: tuple[int, ...] = ()
    eps: float = 1e-5

    @classmethod
    def of(cls, module: nn.Module) -> LayerOp:
        if isinstance(module, nn.Conv2d):
            geometry = (tuple(module.stride), module.padding, tuple(module.dilation), module.groups)
            pointwise = tuple(module.kernel_size) == (1, 1) and geometry[0] == (1, 1) and geometry[1] in (
                (0, 0), "valid") and geometry[2] == (1, 1) and geometry[3] == 1
            return cls("conv", *geometry, pointwise=pointwise)
        if isinstance(module, nn.GroupNorm):
            return cls("group_norm", groups=module.num_groups, eps=module.eps)
        if isinstance(module, nn.LayerNorm):
            return cls("layer_norm", normalized_shape=tuple(module.normalized_shape), eps=module.eps)
        return cls("linear")

    def __call__(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        if self.kind == "group_norm":
            return F.group_norm(x, self.groups, weight.reshape(-1), None if bias is None else bias.reshape(-1),
                                self.eps)
        if self.kind == "layer_norm":
            shape = self.normalized_shape
            return F.layer_norm(x, shape, weight.reshape(shape), None if bias is None else bias.reshape(shape),
                                self.eps)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def _as_float(t: Tensor) -> Tensor:
    return t.to(torch.float32)


def all_finite(t: Tensor) -> bool:
    """True when no element is NaN or inf: the extremes (one min/max pass in the tensor's own dtype, no float32
    copy) are finite exactly when every element is, since torch's min/max propagate NaN."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


class NetworkModule(nn.Module):
    """One LoRA-family module (one target weight). Subclasses: one per algorithm, in their own file."""

    algo: ClassVar[str] = ""
    tensor_names: ClassVar[tuple[str, ...]] = ()  # file suffixes this algorithm reads (besides alpha, dora_scale)
    detect_names: ClassVar[tuple[str, ...]] = ()  # any of these present => this algorithm
    uses_alpha: ClassVar[bool] = True
    alpha_is_scale: ClassVar[bool] = True  # alpha / rank scales ΔW (OFT stores its constraint under alpha instead)

    def __init__(self, name: str):
        super().__init__()
        self.lora_name = name
        self.source = ""  # file the tensors came from, for error messages
        self._alpha: Tensor | None = None
        self._scale: float | None = None  # alpha / rank as a Python float, computed once (hot in training)
        self.dora_scale: nn.Parameter | None = None
        # training only (module.train()): sd-scripts' network_dropout (on the down projection's output) and
        # rank_dropout (whole rank channels per sample, rescaled) for LoRA; module_dropout (skip the module for a
        # step) for every algorithm
        self.dropout = 0.0
        self.rank_dropout = 0.0
        self.module_dropout = 0.0
        # training only (LyCORIS bypass_mode): always add the change to the layer's output, never rebuild the weight
        self.bypass_only = False

    def lora_device(self) -> torch.device:
        """Device of the module's tensors (cpu when it has none)."""
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    # -- format -----------------------------------------------------------------------------------

    @classmethod
    def claims(cls, suffixes: set[str]) -> bool:
        return any(s in suffixes for s in cls.detect_names)

    @classmethod
    def owned(cls) -> tuple[str, ...]:
        return (*cls.tensor_names, *(("alpha",) if cls.uses_alpha else ()), "dora_scale")

    @classmethod
    def from_tensors(cls, name: str, tensors: Mapping[str, Tensor], source: str = "") -> NetworkModule:
        """Build the module from a file's tensors for one module (keys are file suffixes)."""
        for suffix, t in tensors.items():
            if not all_finite(t):
                raise NonFiniteError(source or "network", f"{name}.{suffix}")
        module = cls._from_tensors(name, tensors, source)
        module.source = source
        if cls.uses_alpha and "alpha" in tensors:
            module.alpha = tensors["alpha"].detach().to(torch.float32).reshape(())
        if "dora_scale" in tensors:
            module.dora_scale = nn.Parameter(tensors["dora_scale"].detach(), requires_grad=False)
        return module

    @classmethod
    def _from_tensors(cls, name: str, tensors: Mapping[str, Tensor], source: str) -> NetworkModule:
        raise NotImplementedError

    def file_tensors(self) -> dict[str, Tensor]:
        """Tensors as the file stores them, keyed by suffix (alpha as a 0-dim tensor)."""
        out = {k: v for k, v in self.state_dict().items() if k not in ("alpha", "dora_scale")}
        if self.uses_alpha and self.alpha is not None:
            out["alpha"] = self.alpha.clone()
        if self.dora_scale is not None:
            out["dora_scale"] = self.dora_scale.detach()
        return out

    # -- shapes -----------------------------------------------------------------------------------

    @property
    def rank(self) -> int | None:
        return None

    @property
    def alpha(self) -> Tensor | None:
        return self._alpha

    @alpha.setter
    def alpha(self, value: Tensor | None) -> None:
        self._alpha, self._scale = value, None

    @property
    def scale(self) -> float:
        if self._scale is None:
            rank = self.rank
            self._scale = float(self._alpha) / rank if self.uses_alpha and self._alpha is not None and rank else 1.0
        return self._scale

    def check_shape(self, target_shape: torch.Size) -> None:
        """Raise ShapeMismatchError when this module cannot change a weight of `target_shape`."""
        produced = self.delta_shape()
        if produced is not None and int(torch.Size(produced).numel()) != int(torch.Size(target_shape).numel()):
            self._shape_error(target_shape, produced)
        if self.dora_scale is not None:
            out = target_shape[0]
            ok = self.dora_scale.shape[0] == out or (self.dora_scale.shape[0] == 1 and self.dora_scale.numel() ==
                                                      target_shape[1])
            if not ok:
                raise ShapeMismatchError(self.source or "network", f"{self.lora_name}.dora_scale",
                                         (out, 1), tuple(self.dora_scale.shape), "one norm per output row")

    def _shape_error(self, target_shape, produced, detail: str = "") -> None:
        raise ShapeMismatchError(self.source or "network", self.lora_name, tuple(target_shape), tuple(produced),
                                 detail or f"{self.algo} change does not fit the model's weight")

    def delta_shape(self) -> tuple[int, ...] | None:
        """Shape of ΔW this module produces (None when it follows the weight, e.g. IA3)."""
        return None

    # -- math -------------------------------------------------------------------------------------

    def delta(self, w0: Tensor) -> Tensor:
        """ΔW in float32 with the shape of `w0`, scale included, multiplier not."""
        raise NotImplementedError

    def bias_delta(self) -> Tensor | None:
        return None

    # -- scale_weight_norms (sd-scripts / LyCORIS max-norm regularisation) -------------------------

    has_max_norm: ClassVar[bool] = False  # LyCORIS bounds no norm for IA3 and full

    @torch.no_grad()
    def max_norm_value(self) -> Tensor:
        """The norm scale_weight_norms bounds: ‖ΔW‖ (scale included)."""
        return self.delta(torch.zeros(self.delta_shape(), device=self.lora_device())).norm()

    def scale_change_(self, ratio: float) -> None:
        """Multiply `max_norm_value` by `ratio` in place (ratio < 1)."""
        raise NotImplementedError(f"{self.algo} has no max-norm regularisation")


    def merged(self, w0: Tensor, multiplier: float) -> Tensor:
        """W' at `multiplier` in float32 (w0 is converted)."""
        w0 = _as_float(w0)
        dw = self.delta(w0)
        if self.dora_scale is None:
            return w0 + multiplier * dw
        decomposed = self._decompose(w0 + dw)
        return w0 + multiplier * (decomposed - w0)

    def _decompose(self, w: Tensor) -> Tensor:
        """DoRA: rescale the rows (dora_scale [out,1,..]) or columns ([1,in,..]) of w to dora_scale."""
        scale = _as_float(self.dora_scale)
        eps = torch.finfo(torch.float32).eps
        if scale.shape[0] == w.shape[0] and (scale.dim() == 1 or scale.shape[1] == 1):
            norm = w.reshape(w.shape[0], -1).norm(dim=1) + eps
            return w * (scale.reshape(-1) / norm).reshape(-1, *([1] * (w.dim() - 1)))
        cols = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1) + eps
        return w * (scale.reshape(-1) / cols).reshape(1, -1, *([1] * (w.dim() - 2)))

    def merged_bias(self, b0: Tensor | None, multiplier: float) -> Tensor | None:
        db = self.bias_delta()
        if db is None:
            return b0
        base = torch.zeros_like(db, dtype=torch.float32) if b0 is None else _as_float(b0)
        return base + multiplier * _as_float(db)

    def rebuilt_forward(self, x: Tensor, module: nn.Module, layer: LayerOp, multiplier: float) -> Tensor | None:
        """The layer's output computed with W' = W0 + ΔW in one op, replacing the base layer's own forward, or
        None where the bypass path (`bypass`) is cheaper or required. Algorithms that can rebuild cheaply
        override it."""
        return None

    def bypass(self, x: Tensor, base_out: Tensor, layer: LayerOp, w0: Tensor, multiplier: float,
               b0: Tensor | None = None) -> Tensor:
        """Layer output with this change applied, computed beside the frozen weight `w0` (and bias `b0`, which
        algorithms acting on the layer's output rather than adding to it need)."""
        if self.training and self.module_dropout and float(torch.rand(())) < self.module_dropout:
            return base_out
        dw = self.merged(w0, multiplier) - _as_float(w0)
        db = self.bias_delta()
        extra = layer(x, dw.to(x.dtype), None if db is None else (multiplier * db).to(x.dtype))
        return base_out + extra
