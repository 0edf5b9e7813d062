"""Diag-OFT (LyCORIS `algo = "diag-oft"`, orthogonal finetuning, Qiu et al. 2023): the output rows of the weight
are rotated, block by block, by orthogonal matrices R_k built from skew-symmetric Q_k (Cayley transform).

File format (LyCORIS, and what A1111's built-in Lora reads):
- `oft_blocks` [n, s, s]: n blocks of size s, n·s = the layer's output size; Q_k = B_k - B_kᵀ and
  R_k = (I + Q_k)(I - Q_k)⁻¹ (so all-zero blocks are the identity: training starts at the base model);
- `alpha` (0-dim): the COFT *constraint* c, not a scale: when c != 0, ||Q||_F over all blocks is clamped to
  c · (output size), as A1111 does it (`(min(‖Q‖, c·out) + 1e-8) / (‖Q‖ + 1e-8)`; LyCORIS' own clamp differs from
  it by that 1e-8 only);
- `rescale` [out, 1(, 1, 1)], optional (rescaled OFT): a learned factor per output row;
- old LyCORIS files store R itself as `oft_diag` [n, s, s] (no Cayley transform, no constraint);
- sd-scripts' `networks.oft` writes the same tensors under `oft_unet_*` module names (`keys.parse_file_key` reads
  them); its network_dim is the number of blocks and its alpha the constraint (sd-scripts clamps even at alpha 0,
  A1111 and we treat 0 as unconstrained).

The weight becomes W' = rescale · blockdiag(R)ᵀ W (rows of W taken s at a time; A1111's
`einsum("k n m, k n ... -> k m ...", R, W)`), the bias is left alone, and a multiplier m interpolates linearly:
W + m·(W' - W), which is A1111's `updown · multiplier` and LyCORIS' `m·R + (1 - m)·I` (equal without rescale).

Block layout (LyCORIS): `network_dim` d gives (s, n) = `factorization(out, d)`, s <= n: a d that divides the output
size is one of the two factors (the block size when d² <= out, else the number of blocks); any other d falls back to
the most balanced split with s <= d. The module's `rank` is n, the number of blocks (A1111's "dim", LyCORIS' "lora_dim
equivalent").
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lib_lora.errors import ShapeMismatchError
from lib_lora.networks.base import LayerOp, NetworkModule
from lib_lora.networks.lokr import factorization
from lib_lora.networks.registry import register

# A1111's guard against 0/0 in the constraint clamp
_CLAMP_EPS = 1e-8


def cayley_minus_identity(blocks: Tensor, constraint: float = 0.0) -> Tensor:
    """R - I for each block, R = (I + Q)(I - Q)⁻¹ with Q = B - Bᵀ (float32).

    Written as 2·Q·(I - Q)⁻¹ (the same matrix: (I + Q) - (I - Q) = 2Q), which keeps the small change of a rotation
    near the identity free of the cancellation in R - I. A non-zero `constraint` (already multiplied by the output
    size) bounds ‖Q‖_F over all blocks, as A1111 does it.
    """
    b = blocks.to(torch.float32)
    q = b - b.transpose(-1, -2)
    if constraint != 0:
        norm = torch.linalg.vector_norm(q)
        q = q * ((torch.clamp(norm, max=constraint) + _CLAMP_EPS) / (norm + _CLAMP_EPS))
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return 2 * torch.linalg.solve(eye - q, q, left=False)


@register
class OFTModule(NetworkModule):
    algo = "diag-oft"
    tensor_names = ("oft_blocks", "oft_diag", "rescale")
    detect_names = ("oft_blocks", "oft_diag")
    alpha_is_scale = False  # alpha holds the constraint

    def __init__(self, name: str, blocks: Tensor, rescale: Tensor | None = None, *, stores_rotation: bool = False,
                 trainable: bool = False):
        super().__init__(name)
        # the file's name for the tensor: `oft_blocks` (B, Cayley-transformed) or old LyCORIS `oft_diag` (R itself)
        self.stores_rotation = stores_rotation
        param = nn.Parameter(blocks, requires_grad=trainable)
        if stores_rotation:
            self.oft_diag, self.oft_blocks = param, None
        else:
            self.oft_blocks, self.oft_diag = param, None
        self.rescale = None if rescale is None else nn.Parameter(rescale, requires_grad=trainable)

    @classmethod
    def _from_tensors(cls, name: str, tensors: Mapping[str, Tensor], source: str) -> OFTModule:
        key = "oft_blocks" if "oft_blocks" in tensors else "oft_diag"
        blocks = tensors[key]
        if blocks.dim() == 4:
            raise ShapeMismatchError(source, f"{name}.{key}", ("n", "s", "s"), tuple(blocks.shape),
                                     "a 4-dim oft_blocks is LyCORIS BOFT (butterfly OFT), which is not supported")
        if blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2]:
            raise ShapeMismatchError(source, f"{name}.{key}", ("n", "s", "s"), tuple(blocks.shape),
                                     "OFT blocks are n square matrices")
        rescale = tensors.get("rescale")
        return cls(name, blocks.detach(), None if rescale is None else rescale.detach(),
                   stores_rotation=key == "oft_diag")

    @classmethod
    def create(cls, name: str, shape: torch.Size, rank: int, alpha: float | None = None, *, constraint: float = 0.0,
               rescaled: bool = False, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> OFTModule:
        """Trainable Diag-OFT as LyCORIS builds it: zero blocks (R = I) and rescale = 1, so training starts at the
        base model. `rank` is `network_dim` (see the module docstring); `alpha` (network_alpha) has no meaning for OFT:
        the file's alpha holds `constraint`."""
        out = shape[0]
        size, count = factorization(out, rank)
        rescale = torch.ones(out, *([1] * (len(shape) - 1)), dtype=dtype) if rescaled else None
        module = cls(name, torch.zeros(count, size, size, dtype=dtype), rescale, trainable=True)
        module.alpha = torch.tensor(float(constraint))
        return module

    # -- shapes -----------------------------------------------------------------------------------

    @property
    def blocks(self) -> Tensor:
        return self.oft_diag if self.stores_rotation else self.oft_blocks

    @property
    def rank(self) -> int:
        return self.blocks.shape[0]

    @property
    def block_size(self) -> int:
        return self.blocks.shape[1]

    @property
    def scale(self) -> float:
        return 1.0

    @property
    def constraint(self) -> float:
        """The COFT constraint as the file stores it (alpha; 0 = none)."""
        return 0.0 if self.alpha is None or self.stores_rotation else float(self.alpha)

    def check_shape(self, target_shape: torch.Size) -> None:
        out = target_shape[0]
        if self.rank * self.block_size != out:
            self._shape_error(target_shape, (self.rank * self.block_size,),
                              f"{self.rank} blocks of {self.block_size} rows must cover the {out} output rows")
        if self.rescale is not None and self.rescale.numel() != out:
            raise ShapeMismatchError(self.source or "network", f"{self.lora_name}.rescale", (out,),
                                     tuple(self.rescale.shape), "one factor per output row")
        super().check_shape(target_shape)

    has_max_norm = True

    def max_norm_value(self) -> Tensor:
        """LyCORIS bounds the norm of `oft_blocks` for OFT (not of ΔW)."""
        return self.blocks.detach().to(torch.float32).norm()

    @torch.no_grad()
    def scale_change_(self, ratio: float) -> None:
        self.blocks.mul_(ratio)

    # -- math -------------------------------------------------------------------------------------

    def rotation_minus_identity(self) -> Tensor:
        """R - I per block [n, s, s], float32."""
        if self.stores_rotation:
            r = self.oft_diag.to(torch.float32)
            return r - torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
        return cayley_minus_identity(self.oft_blocks, self.constraint * self._out_size())

    def _out_size(self) -> int:
        return self.rank * self.block_size

    def _rescale(self, ndim: int, channel_dim: int) -> Tensor | None:
        if self.rescale is None:
            return None
        shape = [1] * ndim
        shape[channel_dim] = -1
        return self.rescale.to(torch.float32).reshape(shape)

    def delta(self, w0: Tensor) -> Tensor:
        """rescale · Rᵀ W0 - W0, computed as rescale · (R - I)ᵀ W0 + (rescale - 1) · W0."""
        w = w0.to(torch.float32)
        rmi = self.rotation_minus_identity()
        n, s = self.rank, self.block_size
        dw = torch.bmm(rmi.transpose(1, 2), w.reshape(n, s, -1)).reshape(w.shape)
        rescale = self._rescale(w.dim(), 0)
        if rescale is not None:
            dw = rescale * dw + (rescale - 1) * w
        return dw

    def bypass(self, x: Tensor, base_out: Tensor, layer: LayerOp, w0: Tensor, multiplier: float,
               b0: Tensor | None = None) -> Tensor:
        """Rotate the layer's output instead of its weight: (R - I)ᵀ acts on the output channels of W0·x, which is
        the layer's output less its bias `b0` (the bias is not rotated, as in the merged weight)."""
        if self.training and self.module_dropout and float(torch.rand(())) < self.module_dropout:
            return base_out
        if self.dora_scale is not None:
            return super().bypass(x, base_out, layer, w0, multiplier, b0)
        channel = base_out.dim() - 1 if layer.kind == "linear" else 1
        y = base_out.to(torch.float32)
        if b0 is not None:
            shape = [1] * y.dim()
            shape[channel] = -1
            y = y - b0.to(torch.float32).reshape(shape)
        moved = y.movedim(channel, -1)
        n, s = self.rank, self.block_size
        rotated = (moved.reshape(*moved.shape[:-1], n, 1, s) @ self.rotation_minus_identity()).reshape(moved.shape)
        dy = rotated.movedim(-1, channel)
        rescale = self._rescale(y.dim(), channel)
        if rescale is not None:
            dy = rescale * dy + (rescale - 1) * y
        return base_out + (multiplier * dy).to(base_out.dtype)
