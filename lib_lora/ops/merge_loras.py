"""Merge LoRAs into one: exactly (ranks stacked) or to a rank by SVD (sd-scripts' svd_merge_lora).

Every input acts with its strength (te/unet, lbw block weights as in a prompt), and the output's ΔW per module
is Σ strengthᵢ·ΔWᵢ:
- 'exact': the factors are stacked, up = [c₁up₁ | c₂up₂ | ...], down = [down₁; down₂; ...] with cᵢ the
  strength times the input's alpha/rank (split as √|cᵢ| on each factor for fp16's range), alpha = total rank:
  lossless. Any ranks and alphas; LoHa and LoKr enter by their exact low-rank form (`modules`), Tucker and full
  modules cannot (use 'svd').
Normalization-layer changes (train_norm: `w_norm`/`b_norm`, vectors) are added up at their strengths in both modes:
that is exact.
- 'svd': the sum truncated by a `RankRule` (fixed rank or a dynamic method), written as sd-scripts'
  svd_merge_lora writes it: up = U·S, down = Vh, alpha = rank. By default that is the best approximation of
  the sum at that rank, and when every input has a low-rank form its SVD comes from the stacked factors
  (exact, fast). sd-scripts also clamps both factors at their 0.99 quantile, which moves the result away from
  that approximation (by 1-26 % per module on tests/data/ops/small_*); `clamp_quantile=0.99` reproduces its
  files: the threshold depends on the signs LAPACK gives the singular vectors, so that path takes the full
  SVD of the summed ΔW, as sd-scripts does.

sd-scripts' `merge_lora.py` does neither: without `--concat` it adds the factors (up₁ + up₂)(down₁ + down₂),
whose product is not the sum of the deltas; with `--concat` it scales both factors of an input by its ratio
(and by √(alpha/first alpha)), so an input acts with ratio² · rank/total rank instead of ratio.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lib_lora.errors import ConfigError, ShapeMismatchError
from lib_lora.info import NetworkInfo, describe
from lib_lora.ops import linalg
from lib_lora.ops.common import (
    DTYPES,
    Progress,
    ShouldStop,
    Ticker,
    check_device,
    check_dtype,
    check_output,
    resolve_device,
)
from lib_lora.ops.inputs import LoraInput, common_arch, load_inputs
from lib_lora.ops.linalg import RankRule
from lib_lora.ops.modules import ModuleDelta, is_norm, module_delta, norm_note, norm_tensors
from lib_lora.ops.output import RANKS_KEY, Source, build_metadata, lora_tensors, network_facts, rank_figures, save_lora
from lib_lora.ops.resize import ModuleRank
from lib_lora.types import Arch

MODES = ("exact", "svd")


@dataclass(frozen=True)
class MergeLorasRequest:
    inputs: tuple[LoraInput, ...]
    output: str
    mode: str = "exact"
    rule: RankRule | None = None  # 'svd': the rank rule (required)
    clamp_quantile: float | None = None  # 'svd': sd-scripts' clamp of the factors (it uses 0.99); None: off
    dtype: str | None = None  # None: the first input's
    device: str = "auto"
    force: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError("mode", self.mode, f"must be one of {', '.join(MODES)}")
        if self.mode == "svd" and not isinstance(self.rule, RankRule):
            raise ConfigError("rule", self.rule, "an svd merge needs a RankRule (the output rank)")
        if self.mode == "exact" and self.rule is not None:
            raise ConfigError("rule", self.rule, "an exact merge keeps every rank; use mode 'svd' for a rank")
        if self.clamp_quantile is not None and not 0 < self.clamp_quantile <= 1:
            raise ConfigError("clamp_quantile", self.clamp_quantile, "must be in (0, 1] or None")
        if not all(isinstance(i, LoraInput) for i in self.inputs) or not self.inputs:
            raise ConfigError("inputs", self.inputs, "a non-empty tuple of LoraInput")
        check_dtype("dtype", self.dtype)
        check_device(self.device)


@dataclass
class MergeResult:
    output: str
    modules: dict[str, ModuleRank]
    info: NetworkInfo
    seconds: float
    notes: list[str] = field(default_factory=list)


@dataclass
class _Term:
    delta: ModuleDelta
    strength: float
    source: str


def _check_shapes(name: str, terms: Sequence[_Term]) -> tuple[int, ...]:
    first = terms[0]
    for t in terms[1:]:
        if t.delta.matrix_shape != first.delta.matrix_shape:
            raise ShapeMismatchError(t.source, name, first.delta.matrix_shape, t.delta.matrix_shape,
                                     f"{first.source} has this module in another shape (different architectures?)")
    return max((t.delta.shape for t in terms), key=len)  # 4-D (a conv's kernel) wins over a flattened spelling


def _norm_terms(name: str, found, arch: Arch) -> list:
    """(module, strength) of one normalization layer's changes in the inputs that have it, strength 0 left out."""
    for n, _ in found:
        if not is_norm(n.modules[name]):
            raise ShapeMismatchError(n.path or n.name, name, ("C",), ("matrix",), "another input changes this "
                                     "normalization layer's weight and bias (train_norm); this one has a "
                                     f"{n.modules[name].algo} module there")
    terms = [(n.modules[name], float(app.strength_of(name, arch))) for n, app in found]
    size = terms[0][0].w_norm.shape
    for (module, _), (n, _) in zip(terms, found):
        if module.w_norm.shape != size:
            raise ShapeMismatchError(n.path or n.name, f"{name}.w_norm", tuple(size), tuple(module.w_norm.shape),
                                     "another input has this normalization layer in another size")
    return [(m, s) for m, s in terms if s != 0.0]


def _exact(name: str, terms: Sequence[_Term]):
    for t in terms:
        if not t.delta.factored:
            raise ConfigError("mode", "exact", f"{t.source}: {name} ({t.delta.module.algo}) has no low-rank form to "
                                               "stack; use mode 'svd'")
    ups, downs = [], []
    for t in terms:
        c = t.strength * t.delta.scale
        root = math.sqrt(abs(c))
        ups.append(t.delta.up * math.copysign(root, c))
        downs.append(t.delta.down * root)
    up, down = torch.cat(ups, 1), torch.cat(downs, 0)
    rank = down.shape[0]
    return up, down, float(rank), ModuleRank(None, rank, float(rank), 1.0, 1.0, 1.0)


def _svd(name: str, terms: Sequence[_Term], shape, rule: RankRule, clamp: float | None, device):
    if clamp is None and all(t.delta.factored for t in terms):  # sd-scripts' clamp needs LAPACK's signs
        up = torch.cat([t.delta.up.to(device) * (t.strength * t.delta.scale) for t in terms], 1)
        down = torch.cat([t.delta.down.to(device) for t in terms], 0)
        svd = linalg.factor_svd(up, down)
    else:
        svd = linalg.full_svd(sum(t.delta.matrix(device) * t.strength for t in terms))
    spatial = len(shape) == 4 and tuple(shape[2:]) != (1, 1)
    # sd-scripts caps the rank at the layer's in and out channels (not in·kh·kw)
    up, down, choice = linalg.truncate(svd, rule, spatial, min(terms[0].delta.matrix_shape), min(shape[0], shape[1]))
    up, down = linalg.clamp_quantile(up, down, clamp)
    rank = choice.rank
    return up, down, float(rank), ModuleRank(None, rank, float(rank), choice.sum_kept, choice.fro_kept,
                                             choice.max_ratio)


def merge_loras(request: MergeLorasRequest, progress: Progress | None = None,
                should_stop: ShouldStop | None = None) -> MergeResult:
    """Merge LoRA-family files into one LoRA; see the module docstring. Nothing is written on error or cancel.

    Raises:
        ConfigError: bad request or output path; 'exact' with non-LoRA modules; DoRA/IA3 inputs.
        ArchMismatchError: SDXL and SD1/SD2 files together.  ShapeMismatchError: one module, two shapes.
        FileFormatError, NonFiniteError: an input.  OperationCancelled: `should_stop()` returned True.
    """
    out = check_output(request.output, [i.path for i in request.inputs], request.force)
    device = resolve_device(request.device)
    nets = load_inputs(request.inputs)
    arch = common_arch(nets)
    apps = [i.application(n, arch) for i, n in zip(request.inputs, nets)]
    names = sorted({name for n in nets for name in n.modules})
    ticker = Ticker(len(names), progress, should_stop)
    dtype = DTYPES[request.dtype] if request.dtype else next(iter(next(iter(nets[0].modules.values())).parameters())
                                                              ).dtype
    tensors, results, spatial, norms = {}, {}, {}, 0
    with torch.no_grad():
        for name in names:
            found = [(n, app) for n, app in zip(nets, apps) if name in n.modules]
            if any(is_norm(n.modules[name]) for n, _ in found):  # vectors: they add up exactly, in either mode
                norm_terms = _norm_terms(name, found, arch)
                if norm_terms:
                    tensors.update(norm_tensors(name, norm_terms, dtype))
                    norms += 1
                ticker.step(name)
                continue
            terms = [_Term(module_delta(name, n.modules[name], arch), app.strength_of(name, arch), n.path or n.name)
                     for n, app in found]
            terms = [t for t in terms if t.strength != 0.0]
            if terms:
                shape = _check_shapes(name, terms)
                if request.mode == "exact":
                    up, down, alpha, results[name] = _exact(name, terms)
                else:
                    up, down, alpha, results[name] = _svd(name, terms, shape, request.rule, request.clamp_quantile,
                                                          device)
                spatial[name] = len(shape) == 4 and tuple(shape[2:]) != (1, 1)
                tensors.update(lora_tensors(name, up, down, alpha, shape, dtype))
            ticker.step(name)
    if not tensors:
        raise ConfigError("inputs", [i.path for i in request.inputs], "every module has strength 0: nothing to merge")
    network = network_facts({n: r.rank for n, r in results.items()}, {n: r.alpha for n, r in results.items()},
                            spatial)
    what = ", ".join(f"{n.name} ({i.describe()})" for n, i in zip(nets, request.inputs))
    params = {"mode": request.mode, "inputs": [i.describe() for i in request.inputs]}
    extra = {"ss_base_model_version": nets[0].metadata.get("ss_base_model_version", "")}
    if request.mode == "svd":
        params.update(rule=request.rule.describe(), clamp_quantile=request.clamp_quantile)
        extra[RANKS_KEY] = rank_figures(results)
    meta = build_metadata(nets[0].metadata, operation=f"merge-loras ({request.mode})",
                          comment=f"{request.mode} merge of {what}", params=params,
                          sources=[Source.of(n.path) for n in nets], network=network, merged=True,
                          extra={k: v for k, v in extra.items() if v} | {"modelspec.title": out.stem})
    ticker.check()
    save_lora(tensors, meta, out)
    notes = [norm_note(norms, "added up at their strengths")] if norms else []
    return MergeResult(str(out), results, describe(out), ticker.seconds, notes)

