"""The linear algebra of the LoRA tools: rank rules (sd-scripts' dynamic methods), the SVD of a low-rank product
through its factors, randomized SVD, and sd-scripts' quantile clamp.

Rank rules follow sd-scripts' `resize_lora.py` to the letter, so dynamic resizes pick the same ranks: the index
functions clamp to [1, len(S) - 1] where len(S) is the full SVD's length min(out, in·k·k), and the rank is that
index + 1 (one more singular value than the threshold count: sd-scripts' rule, kept so files match); a zero
matrix (largest singular value <= 1e-6) gets rank 1; the rank never exceeds the requested (maximum) rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lib_lora.errors import ConfigError

METHODS = ("fixed", "sv_ratio", "sv_fro", "sv_cumulative")
MIN_SV = 1e-6  # sd-scripts: a matrix whose largest singular value is below this is treated as zero
QUANTILE_LIMIT = 1 << 24  # torch.quantile refuses larger inputs


@dataclass(frozen=True)
class RankRule:
    """How many ranks a module keeps.

    rank: the fixed rank, or the cap of a dynamic method (sd-scripts' `new_rank`).
    conv_rank: the same for k x k convolutions (sd-scripts' `new_conv_rank`); None: `rank`.
    method: 'fixed', or sd-scripts' dynamic 'sv_ratio' (keep singular values above max/param), 'sv_fro' (keep
        a Frobenius-norm fraction param), 'sv_cumulative' (keep a fraction param of the sum of singular values).
    param: the dynamic method's parameter.
    """

    rank: int | None = 32
    conv_rank: int | None = None
    method: str = "fixed"
    param: float | None = None

    def __post_init__(self):
        for field, value in (("rank", self.rank), ("conv_rank", self.conv_rank)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(field, value, "must be a whole number >= 1")
        if self.method not in METHODS:
            raise ConfigError("method", self.method, f"must be one of {', '.join(METHODS)}")
        if self.method == "fixed":
            if self.rank is None:
                raise ConfigError("rank", None, "a fixed rank needs a number (None is only for dynamic methods)")
            if self.param is not None:
                raise ConfigError("param", self.param, "only the dynamic methods take a parameter")
            return
        if self.param is None:
            raise ConfigError("param", None, f"{self.method} needs a parameter")
        if self.method == "sv_ratio" and not self.param >= 1:
            raise ConfigError("param", self.param, "sv_ratio is max(S)/min(S) kept: a number >= 1")
        if self.method in ("sv_fro", "sv_cumulative") and not 0 < self.param <= 1:
            raise ConfigError("param", self.param, f"{self.method} is a fraction in (0, 1]")

    @property
    def dynamic(self) -> bool:
        return self.method != "fixed"

    def cap(self, kernel_is_spatial: bool) -> int:
        """The most ranks a module may keep (no cap: a dynamic method without `rank`)."""
        value = (self.conv_rank or self.rank) if kernel_is_spatial else self.rank
        return value if value is not None else 1 << 30

    def describe(self) -> str:
        conv = f", conv {self.conv_rank}" if self.conv_rank and self.conv_rank != self.rank else ""
        if self.dynamic:
            cap = f" (at most rank {self.rank}{conv})" if self.rank else (f" (conv at most {self.conv_rank})"
                                                                         if self.conv_rank else "")
            return f"{self.method} {self.param:g}{cap}"
        return f"rank {self.rank}{conv}"


@dataclass(frozen=True)
class RankChoice:
    """The rank kept for one module and how much of it survives (sd-scripts' verbose figures)."""

    rank: int
    sum_kept: float  # sum(S kept) / sum(S)
    fro_kept: float  # ||S kept|| / ||S||: the Frobenius fraction of ΔW kept
    max_ratio: float  # S[0] / S[rank - 1]


def _clamp_index(index: int, full_len: int) -> int:
    return max(1, min(index, full_len - 1))


def choose_rank(s: Tensor, rule: RankRule, cap: int, full_len: int, total_sq: float | None = None) -> int:
    """The rank sd-scripts' `rank_resize` picks from singular values `s` (descending, unscaled).

    `s` may be the leading singular values only (a truncated SVD) when `total_sq` gives ||A||² (for sv_fro):
    sv_ratio and sv_fro then decide exactly as with all of them, because any rank beyond `len(s)` is capped.
    """
    s = s.to(torch.float64)
    if rule.method == "sv_ratio":
        index = _clamp_index(int((s > s[0] / rule.param).sum()), full_len)
        new = index + 1
    elif rule.method == "sv_cumulative":
        cumulative = torch.cumsum(s, 0) / s.sum()
        new = _clamp_index(int(torch.searchsorted(cumulative, rule.param)) + 1, full_len) + 1
    elif rule.method == "sv_fro":
        squares = s.pow(2)
        cumulative = torch.cumsum(squares, 0) / (squares.sum() if total_sq is None else total_sq)
        new = _clamp_index(int(torch.searchsorted(cumulative, rule.param ** 2)) + 1, full_len) + 1
    else:
        new = cap
    if float(s[0]) <= MIN_SV:
        return 1
    return min(new, cap)


def kept(s: Tensor, rank: int, total_sq: float | None = None, complete: bool = True) -> RankChoice:
    """Figures of keeping `rank` of `s`; with a truncated `s` (`complete` False) the Frobenius total comes from
    `total_sq` and the sum of all singular values is unknown (NaN). A zero matrix has NaN fractions, as in
    sd-scripts' log (and its average leaves them out)."""
    s = s.to(torch.float64).abs()
    squares = s.pow(2)
    fro = math.sqrt(float(squares.sum()) if total_sq is None else total_sq)
    total = float(s.sum()) if complete else math.nan
    last = float(s[rank - 1]) if rank <= len(s) else 0.0
    return RankChoice(
        rank,
        float(s[:rank].sum()) / total if total > 0 else math.nan,
        math.sqrt(float(squares[:rank].sum())) / fro if fro > 0 else math.nan,
        float(s[0]) / last if last > 0 else math.inf,
    )


@dataclass
class SVD:
    """A (possibly truncated) SVD: A ≈ u @ diag(s) @ vh."""

    u: Tensor
    s: Tensor
    vh: Tensor

    def factors(self, rank: int) -> tuple[Tensor, Tensor]:
        """(up, down) of rank `rank`, singular values in `up` as sd-scripts stores them."""
        return self.u[:, :rank] * self.s[:rank], self.vh[:rank]


def factor_svd(up: Tensor, down: Tensor) -> SVD:
    """SVD of `up @ down` ([m, r] @ [r, n]) without forming it: QR of each factor, SVD of the small core.

    up = Qu Ru, downᵀ = Qd Rd  =>  up @ down = Qu (Ru Rdᵀ) Qdᵀ; the core is at most r x r, so the cost is
    O((m + n) r²) instead of the O(m n min(m, n)) of a full SVD, and the result is exact (float64 here).
    """
    qu, ru = torch.linalg.qr(up.to(torch.float64))
    qd, rd = torch.linalg.qr(down.to(torch.float64).T)
    uc, s, vch = torch.linalg.svd(ru @ rd.T, full_matrices=False)
    return SVD(qu @ uc, s, vch @ qd.T)


def full_svd(matrix: Tensor) -> SVD:
    u, s, vh = torch.linalg.svd(matrix.to(torch.float32), full_matrices=False)
    return SVD(u, s, vh)


def lowrank_svd(matrix: Tensor, k: int, niter: int = 2) -> SVD:
    """Randomized SVD (Halko et al. 2011) of the leading k ranks, with oversampling; k is capped at min(m, n)."""
    m, n = matrix.shape
    q = min(k + max(8, k // 4), m, n)
    u, s, v = torch.svd_lowrank(matrix.to(torch.float32), q=q, niter=niter)
    return SVD(u[:, :k], s[:k], v[:, :k].T)


def quantile(values: Tensor, q: float) -> Tensor:
    """torch.quantile (linear interpolation), also for inputs over its 2**24-element limit."""
    flat = values.flatten().to(torch.float32)
    if flat.numel() <= QUANTILE_LIMIT:
        return torch.quantile(flat, q)
    pos = q * (flat.numel() - 1)
    lo, frac = int(math.floor(pos)), pos - math.floor(pos)
    a = torch.kthvalue(flat, lo + 1).values
    b = torch.kthvalue(flat, min(lo + 2, flat.numel())).values
    return a + (b - a) * frac


def clamp_quantile(up: Tensor, down: Tensor, q: float | None) -> tuple[Tensor, Tensor]:
    """sd-scripts' outlier clamp of extracted factors: both clamped to ±(q-quantile of all their values).
    None: no clamp (q = 1 still clamps negative values beyond -max, as sd-scripts does)."""
    if q is None:
        return up, down
    hi = quantile(torch.cat([up.flatten(), down.flatten()]), q)
    return up.clamp(-hi, hi), down.clamp(-hi, hi)


def truncate(svd: SVD, rule: RankRule, spatial: bool, full_len: int, limit: int | None = None
             ) -> tuple[Tensor, Tensor, RankChoice]:
    """(up, down, choice) of the ranks `rule` keeps of `svd` (never more than it has, nor than `limit`)."""
    rank = choose_rank(svd.s, rule, rule.cap(spatial), full_len)
    rank = min(rank, len(svd.s), limit or rank)
    up, down = svd.factors(rank)
    return up.to(torch.float32), down.to(torch.float32), kept(svd.s, rank)


SVD_MODES = ("auto", "full", "lowrank")


def decompose(matrix: Tensor, rule: RankRule, spatial: bool, limit: int | None = None, mode: str = "auto"
              ) -> tuple[Tensor, Tensor, RankChoice, str]:
    """(up, down, choice, 'full'|'lowrank') approximating `matrix` [m, n] by the ranks `rule` keeps.

    'auto' takes the randomized SVD of the leading ranks when they are at most a quarter of min(m, n), and the
    full SVD otherwise or for sv_cumulative, which needs the sum of every singular value.
    """
    m, n = matrix.shape
    full_len = min(m, n)
    cap = min(rule.cap(spatial), limit or full_len, full_len)
    full = mode == "full" or rule.method == "sv_cumulative" or (mode == "auto" and 4 * cap > full_len)
    if full:
        svd, total_sq = full_svd(matrix), None
    else:
        svd = lowrank_svd(matrix, cap)
        total_sq = float(matrix.to(torch.float64).pow(2).sum())
    rank = min(choose_rank(svd.s, rule, cap, full_len, total_sq), len(svd.s))
    up, down = svd.factors(rank)
    return (up.to(torch.float32), down.to(torch.float32), kept(svd.s, rank, total_sq, complete=full),
            "full" if full else "lowrank")
