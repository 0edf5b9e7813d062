"""sd-scripts' block-wise training options (lr weights per block, dims/alphas per block) and their block ids.

sd-scripts counts blocks its own way: SD1/SD2 lr weights are 12 down + 1 mid + 12 up and block dims 25
(IN00..IN11, M00, OUT00..OUT11); SDXL lr weights are 9 down + 3 mid + 9 up and block dims 23 (time embedding,
IN00..IN08, three middle parts, OUT00..OUT08, out). `BlockwiseConfig` keeps the values as written (its counting);
`lr_weights_by_block` / `dims_by_block` turn them into `blocks.py` ids. SDXL's three middle parts share the one id
M00, so they must agree; the time-embedding and out slots hold no LoRA module and are dropped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lib_lora.blocks import BLOCK_IDS_26
from lib_lora.errors import ConfigError
from lib_lora.train.coerce import check
from lib_lora.types import Arch

if TYPE_CHECKING:
    from lib_lora.train.config import NetworkConfig

LR_WEIGHT_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")
LrWeight = str | tuple[float, ...]  # a preset such as "sine+0.5", or one value per block


def _lr_preset(name: str, value: str) -> tuple[str, float]:
    """(preset, offset) of a preset lr weight such as "sine+0.5"; ConfigError naming `name` otherwise."""
    preset, _, base = value.partition("+")
    check(preset in LR_WEIGHT_PRESETS, name, value,
          f"a preset must be one of {', '.join(LR_WEIGHT_PRESETS)} (optionally '+<float>'), "
          "or give comma-separated numbers")
    if not base:
        return preset, 0.0
    try:
        return preset, float(base)
    except ValueError:
        raise ConfigError(name, value, f"'+{base}' is not a number") from None


@dataclass(frozen=True, kw_only=True)
class BlockwiseConfig:
    """sd-scripts' block-wise lr weights and dims, as written (its counting); see `lr_weights_by_block`."""

    down_lr_weight: LrWeight | None = None
    mid_lr_weight: tuple[float, ...] | None = None
    up_lr_weight: LrWeight | None = None
    block_lr_zero_threshold: float = 0.0
    block_dims: tuple[int, ...] | None = None
    block_alphas: tuple[float, ...] | None = None
    conv_block_dims: tuple[int, ...] | None = None
    conv_block_alphas: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("down_lr_weight", "up_lr_weight"):
            value = getattr(self, name)
            if isinstance(value, str):
                _lr_preset(name, value)
        for name in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas"):
            value = getattr(self, name)
            if value is not None:
                # sd-scripts counts 25 blocks for SD1/SD2 (IN00..IN11, M00, OUT00..OUT11) and 23 for SDXL.
                check(len(value) in (23, 25), name, value, f"needs 25 values (SD1/SD2) or 23 (SDXL), got {len(value)}")
                check(all(v >= 0 for v in value), name, value, "values must be >= 0")
        check(self.block_alphas is None or self.block_dims is not None, "block_alphas", self.block_alphas,
              "needs block_dims")
        check(self.conv_block_alphas is None or self.conv_block_dims is not None, "conv_block_alphas",
              self.conv_block_alphas, "needs conv_block_dims")

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.down_lr_weight, self.mid_lr_weight, self.up_lr_weight,
                                           self.block_dims, self.conv_block_dims))


@dataclass(frozen=True)
class BlockRank:
    """Rank and alpha of one block's modules (dim 0: the block gets no module)."""

    dim: int
    alpha: float


def _sd_counts(arch: Arch) -> tuple[int, int]:
    return (9, 3) if arch is Arch.SDXL else (12, 1)


def _expand_lr(value: LrWeight | None, n: int, name: str) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, str):
        preset, offset = _lr_preset(name, value)
        ramp = [i / (n - 1) for i in range(n)]
        curves = {"sine": [math.sin(math.pi * r / 2) for r in ramp], "linear": ramp, "zeros": [0.0] * n,
                  "cosine": [math.sin(math.pi * r / 2) for r in reversed(ramp)], "reverse_linear": ramp[::-1]}
        return [v + offset for v in curves[preset]]
    if len(value) > n:
        raise ConfigError(name, value, f"{len(value)} values for {n} blocks")
    return list(value) + [1.0] * (n - len(value))  # sd-scripts fills missing blocks with 1
def _one_middle(values: list[float], name: str) -> float:
    if len(set(values)) > 1:
        raise ConfigError(name, values, "SDXL's middle block is one block id (M00) here: give equal values")
    return values[0]


def lr_weights_by_block(blockwise: BlockwiseConfig, arch: Arch) -> dict[str, float] | None:
    """U-Net block id -> lr multiplier from down/mid/up_lr_weight (None when not set); values at or below
    block_lr_zero_threshold become 0 (those blocks are then not trained)."""
    if all(v is None for v in (blockwise.down_lr_weight, blockwise.mid_lr_weight, blockwise.up_lr_weight)):
        return None
    n, n_mid = _sd_counts(arch)
    down = _expand_lr(blockwise.down_lr_weight, n, "down_lr_weight") or [1.0] * n
    up = _expand_lr(blockwise.up_lr_weight, n, "up_lr_weight") or [1.0] * n
    mid = list(blockwise.mid_lr_weight or [1.0])
    if len(mid) > n_mid:
        raise ConfigError("mid_lr_weight", mid, f"{len(mid)} values for {n_mid} middle block(s)")
    weights = {f"IN{i:02d}": w for i, w in enumerate(down)}
    weights["M00"] = _one_middle(mid, "mid_lr_weight")
    weights.update({f"OUT{i:02d}": w for i, w in enumerate(up)})
    return {k: (w if w > blockwise.block_lr_zero_threshold else 0.0) for k, w in weights.items()}


def _block_values(values: tuple, arch: Arch, name: str) -> dict[str, Any]:
    if arch is not Arch.SDXL:
        if len(values) != 25:
            raise ConfigError(name, values, f"{arch.label} needs 25 values (IN00..IN11, M00, OUT00..OUT11)")
        return dict(zip(BLOCK_IDS_26[1:], values))
    if len(values) != 23:
        raise ConfigError(name, values, "SDXL needs 23 values (time embedding, IN00..IN08, 3 middle, OUT00..08, out)")
    out = {f"IN{i:02d}": values[1 + i] for i in range(9)}
    out["M00"] = _one_middle(list(values[10:13]), name)
    out.update({f"OUT{i:02d}": values[13 + i] for i in range(9)})
    return out


def dims_by_block(network: NetworkConfig, arch: Arch, *, conv: bool = False) -> dict[str, BlockRank] | None:
    """U-Net block id -> (dim, alpha) for linear (or 3x3 conv) modules, from block_dims / block_alphas
    (conv_block_*), defaulting to network_dim / alpha (conv_dim / conv_alpha). None when not block-wise.
    A block whose lr weight is 0 gets dim 0 (no module), as sd-scripts does."""
    bw = network.blockwise
    dims, alphas = (bw.conv_block_dims, bw.conv_block_alphas) if conv else (bw.block_dims, bw.block_alphas)
    lrs = lr_weights_by_block(bw, arch)
    if dims is None and lrs is None:
        return None
    default_dim = network.network_args.conv_dim if conv else network.network_dim
    # conv: conv_alpha as given, 1.0 when unset (sd-scripts, also with conv_block_dims and no conv_dim); 0 = dim below
    conv_alpha = network.network_args.conv_alpha
    default_alpha = (1.0 if conv_alpha is None else conv_alpha) if conv else network.alpha
    if dims is None and default_dim is None:
        return None  # no conv modules at all
    ids = list(lrs) if lrs is not None else list(_block_values(dims, arch, "block_dims"))
    dim_of = _block_values(dims, arch, "conv_block_dims" if conv else "block_dims") if dims else {}
    alpha_of = _block_values(alphas, arch, "conv_block_alphas" if conv else "block_alphas") if alphas else {}
    out = {}
    for block in ids:
        dim = 0 if lrs is not None and lrs[block] == 0 else int(dim_of.get(block, default_dim))
        alpha = float(alpha_of.get(block, default_alpha))
        out[block] = BlockRank(dim, float(dim) if alpha == 0 else alpha)
    return out
