"""Resize a LoRA to a fixed rank or by sd-scripts' dynamic rules, through the factors.

sd-scripts' `resize_lora.py` forms each module's up @ down and takes a full SVD of it; here the SVD comes from
the factors (`linalg.factor_svd`: QR of each, SVD of the r x r core), which is exact and costs O((m + n) r²).
The output is what sd-scripts writes: up = U·S and down = Vh of the kept ranks, alpha = (alpha/rank) · new rank
so the scale is unchanged, kept-energy figures per module. Modules that are not plain LoRA (LoHa, LoKr, Tucker
LoCon, full) are resized from their ΔW by a full SVD and written as plain LoRA (scale 1). A DoRA magnitude
vector is kept as it is (it rescales rows of W0 + ΔW, whatever ΔW's rank). As in sd-scripts' resize, `conv_rank`
applies to every convolution, 1x1 ones included.
"""
from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field

import torch

from lib_lora.errors import ConfigError
from lib_lora.info import NetworkInfo, describe
from lib_lora.networks import load_network
from lib_lora.ops import linalg
from lib_lora.ops.common import (
    DTYPES,
    Progress,
    ShouldStop,
    Ticker,
    check_device,
    check_dtype,
    check_input,
    check_output,
    resolve_device,
)
from lib_lora.ops.linalg import RankRule
from lib_lora.ops.modules import ModuleDelta, is_norm, module_delta, norm_note, norm_tensors
from lib_lora.ops.output import RANKS_KEY, Source, build_metadata, lora_tensors, network_facts, rank_figures, save_lora


@dataclass(frozen=True)
class ResizeRequest:
    """Resize `input` to `rule` and write `output` (dtype None: the input's)."""

    input: str
    output: str
    rule: RankRule = field(default_factory=RankRule)
    dtype: str | None = None
    device: str = "auto"
    force: bool = False

    def __post_init__(self):
        if not isinstance(self.rule, RankRule):
            raise ConfigError("rule", self.rule, "must be a RankRule")
        check_dtype("dtype", self.dtype)
        check_device(self.device)


@dataclass(frozen=True)
class ModuleRank:
    """One module of an output: its rank before and after, its alpha, and what the kept ranks hold."""

    old_rank: int | None
    rank: int
    alpha: float
    sum_kept: float
    fro_kept: float
    max_ratio: float

    def line(self, name: str) -> str:
        """sd-scripts' verbose line, with the rank."""
        return (f"{name:75} | sum(S) retained: {self.sum_kept:.1%}, fro retained: {self.fro_kept:.1%}, "
                f"max(S) ratio: {self.max_ratio:0.1f} | rank {self.old_rank} -> {self.rank}, alpha {self.alpha:g}")


@dataclass
class ResizeResult:
    output: str
    modules: dict[str, ModuleRank]
    info: NetworkInfo
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def mean_fro_kept(self) -> float:
        """Mean Frobenius fraction kept over modules with a non-zero ΔW (sd-scripts' average)."""
        values = [m.fro_kept for m in self.modules.values() if not math.isnan(m.fro_kept)]
        return statistics.fmean(values) if values else math.nan

    def report(self) -> str:
        lines = [m.line(n) for n, m in sorted(self.modules.items())]
        values = [m.fro_kept for m in self.modules.values() if not math.isnan(m.fro_kept)]
        spread = statistics.pstdev(values) if len(values) > 1 else 0.0
        lines.append(f"Average Frobenius norm retention: {self.mean_fro_kept:.2%} | std: {spread:0.3f}")
        return "\n".join(lines)


def reduce_module(delta: ModuleDelta, rule: RankRule, device: torch.device, conv_rank_for_1x1: bool = True,
                  svd: str = "full") -> tuple[torch.Tensor, torch.Tensor, float, ModuleRank]:
    """(up, down, alpha, ModuleRank): `delta` at the ranks `rule` keeps. Factors go through `factor_svd` and keep
    their alpha/rank; a dense ΔW goes through `linalg.decompose` (`svd` mode) and gets alpha = rank."""
    # sd-scripts' resize gives every convolution (1x1 too) the conv rank; its merge and extract only k x k ones
    conv = len(delta.shape) == 4 if conv_rank_for_1x1 else delta.spatial
    if delta.factored:
        s = linalg.factor_svd(delta.up.to(device), delta.down.to(device))
        up, down, choice = linalg.truncate(s, rule, conv, min(delta.matrix_shape))
        alpha = delta.scale * choice.rank  # sd-scripts: alpha/rank unchanged, so the kept ranks act as before
    else:
        up, down, choice, _ = linalg.decompose(delta.matrix(device), rule, conv, mode=svd)
        alpha = float(choice.rank)
    return up, down, alpha, ModuleRank(delta.rank, choice.rank, alpha, choice.sum_kept, choice.fro_kept,
                                       choice.max_ratio)


def resize(request: ResizeRequest, progress: Progress | None = None,
           should_stop: ShouldStop | None = None) -> ResizeResult:
    """Resize a LoRA-family file; see the module docstring. Nothing is written on error or cancel.

    Raises:
        ConfigError: bad request, output path problems, IA3 modules (no ΔW without the model).
        FileFormatError, NonFiniteError, ShapeMismatchError: the input file.
        OperationCancelled: `should_stop()` returned True.
    """
    src = check_input("input", request.input)
    out = check_output(request.output, [src], request.force)
    device = resolve_device(request.device)
    net = load_network(src)
    ticker = Ticker(len(net.modules), progress, should_stop)
    tensors: dict[str, torch.Tensor] = {}
    results: dict[str, ModuleRank] = {}
    spatial: dict[str, bool] = {}
    norms = 0
    with torch.no_grad():
        for name in sorted(net.modules):
            module = net.modules[name]
            dtype = DTYPES[request.dtype] if request.dtype else next(iter(module.parameters())).dtype
            if is_norm(module):  # a vector per layer: nothing to resize
                tensors.update(norm_tensors(name, [(module, 1.0)], dtype))
                norms += 1
                ticker.step(name)
                continue
            dora = module.dora_scale
            if dora is not None:
                module.dora_scale = None  # ΔW's factors are resized; the magnitude vector is kept as it is
            try:
                delta = module_delta(name, module, net.arch)
            finally:
                module.dora_scale = dora
            up, down, alpha, results[name] = reduce_module(delta, request.rule, device)
            spatial[name] = delta.spatial
            tensors.update(lora_tensors(name, up, down, alpha, delta.shape, dtype))
            if dora is not None:
                tensors[f"{name}.dora_scale"] = dora.detach().to("cpu", dtype).contiguous()
            ticker.step(name)
    if not results:
        raise ConfigError("input", src, "has only normalization-layer changes (train_norm): nothing has a rank")
    ranks = {n: r.rank for n, r in results.items()}
    network = network_facts(ranks, {n: r.alpha for n, r in results.items()}, spatial)
    if request.rule.dynamic:
        network["ss_network_dim"] = network["ss_network_alpha"] = "Dynamic"  # sd-scripts writes this for dynamic
    old = max((r.old_rank or 0) for r in results.values())
    rule = request.rule
    conv = f" (conv: {rule.conv_rank})" if rule.conv_rank and rule.conv_rank != rule.rank else ""
    comment = (f"Dynamic resize with {rule.method}: {rule.param:g} from {old}" if rule.dynamic
               else f"dimension is resized from {old} to {rule.rank}{conv}")  # sd-scripts' wording
    meta = build_metadata(net.metadata, operation="resize", comment=comment,
                          params={"rule": request.rule.describe(), "dtype": request.dtype},
                          sources=[Source.of(src)], network=network,
                          extra={RANKS_KEY: rank_figures(results)})
    ticker.check()
    save_lora(tensors, meta, out)
    notes = [norm_note(norms, "kept as they are")] if norms else []
    return ResizeResult(str(out), results, describe(out), ticker.seconds, notes)


def resize_path_default(input_path: str, rule: RankRule) -> str:
    """A default output name beside the input: NAME-r32.safetensors, NAME-sv_fro0.9.safetensors."""
    stem, _ = os.path.splitext(input_path)
    tag = f"{rule.method}{rule.param:g}" if rule.dynamic else f"r{rule.rank}"
    return f"{stem}-{tag}.safetensors"
