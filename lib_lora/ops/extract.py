"""Extract a LoRA from a fine-tuned checkpoint and its base (sd-scripts' extract_lora_from_models), streamed.

The modules are sd-scripts' networks.lora ones: attention blocks and text-encoder attention/MLP layers, and
with `conv_dim` also the ResNet blocks and samplers (their 3x3 convs at `conv_dim`, their linear and 1x1
layers at `dim`). Per module, ΔW = tuned - base (in float32) is approximated at the rank the rule gives
(capped, as sd-scripts does, at the layer's in and out channels): up = U·S, down = Vh, alpha = rank, both
clamped to ±(the `clamp_quantile` quantile of their values). The text encoders are left out when no weight
of theirs moved by more than `min_diff` (sd-scripts' test). Beyond sd-scripts: the dynamic rank methods of
resize, and a randomized SVD of the leading ranks where that is enough (see `linalg.decompose`).
Both checkpoints are read one tensor at a time; nothing but the LoRA is kept.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from lib_lora.errors import (
    ArchMismatchError,
    ConfigError,
    FileFormatError,
    KeyMapError,
    NonFiniteError,
    ShapeMismatchError,
)
from lib_lora.info import NetworkInfo, describe
from lib_lora.io import model_hash
from lib_lora.networks.base import all_finite
from lib_lora.ops import linalg
from lib_lora.ops.checkpoint_keys import CheckpointTarget, checkpoint_targets, sd_scripts_selection
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
from lib_lora.ops.linalg import SVD_MODES, RankRule
from lib_lora.ops.output import RANKS_KEY, Source, build_metadata, lora_tensors, network_facts, rank_figures, save_lora
from lib_lora.ops.resize import ModuleRank
from lib_lora.ops.stream import TensorReader
from lib_lora.sd.components import detect_arch
from lib_lora.types import Arch

BASE_VERSION = {Arch.SD1: "sd_v1", Arch.SD2: "sd_v2", Arch.SDXL: "sdxl_base_v1-0"}
MODELSPEC_ARCH = {Arch.SD1: "stable-diffusion-v1", Arch.SD2: "stable-diffusion-v2-512",
                  Arch.SDXL: "stable-diffusion-xl-v1-base"}


@dataclass(frozen=True)
class ExtractRequest:
    """LoRA of `tuned` - `base`; `dim` (and `conv_dim` for 3x3 convs, None: none) are the ranks, or the caps of a
    dynamic `method` with `param`. `svd`: 'auto', 'full' or 'lowrank' (randomized)."""

    base: str
    tuned: str
    output: str
    dim: int = 4
    conv_dim: int | None = None
    method: str = "fixed"
    param: float | None = None
    clamp_quantile: float | None = 0.99
    min_diff: float = 0.01
    svd: str = "auto"
    dtype: str = "fp16"
    device: str = "auto"
    force: bool = False

    def __post_init__(self):
        self.rule  # noqa: B018 - validates dim, conv_dim, method and param
        if self.svd not in SVD_MODES:
            raise ConfigError("svd", self.svd, f"must be one of {', '.join(SVD_MODES)}")
        if self.svd == "lowrank" and self.method == "sv_cumulative":
            raise ConfigError("svd", self.svd, "sv_cumulative needs every singular value: use 'full' or 'auto'")
        if self.clamp_quantile is not None and not 0 < self.clamp_quantile <= 1:
            raise ConfigError("clamp_quantile", self.clamp_quantile, "must be in (0, 1] or None")
        if not self.min_diff >= 0:
            raise ConfigError("min_diff", self.min_diff, "must be >= 0")
        check_dtype("dtype", self.dtype, allow_none=False)
        check_device(self.device)

    @property
    def rule(self) -> RankRule:
        return RankRule(self.dim, self.conv_dim, self.method, self.param)


@dataclass
class ExtractResult:
    output: str
    arch: Arch
    modules: dict[str, ModuleRank]
    text_encoder_skipped: bool
    text_encoder_max_diff: float
    svd_used: dict[str, int]  # 'full' / 'lowrank' -> modules
    info: NetworkInfo
    seconds: float
    notes: list[str] = field(default_factory=list)


def _open(path: str, field: str) -> tuple[TensorReader, Arch]:
    reader = TensorReader(check_input(field, path))
    try:
        return reader, detect_arch(reader.names())
    except KeyMapError as exc:
        raise FileFormatError(path, str(exc)) from None


def _selected(request: ExtractRequest, base: TensorReader, tuned: TensorReader, arch: Arch
              ) -> dict[str, list[CheckpointTarget]]:
    """File key -> the targets of it to extract, checked against the tuned model's shapes."""
    shapes = base.shapes()
    by_key: dict[str, list[CheckpointTarget]] = {}
    for target in checkpoint_targets(shapes, arch).values():
        if not sd_scripts_selection(target, request.conv_dim is not None):
            continue
        if target.key not in tuned.header.tensors:
            raise ShapeMismatchError(tuned.path, target.key, shapes[target.key], ("missing",),
                                     f"the base {base.path} has it")
        if tuned.shape(target.key) != shapes[target.key]:
            raise ShapeMismatchError(tuned.path, target.key, shapes[target.key], tuned.shape(target.key),
                                     f"shape in the base {base.path}")
        by_key.setdefault(target.key, []).append(target)
    return {k: by_key[k] for k in base.names() if k in by_key}


def _diff(base: TensorReader, tuned: TensorReader, key: str, device: torch.device) -> torch.Tensor:
    a, b = base.read(key), tuned.read(key)
    for reader, t in ((base, a), (tuned, b)):
        if not all_finite(t):
            raise NonFiniteError(reader.path, key)
    return b.to(device, torch.float32) - a.to(device, torch.float32)


def _te_max_diff(base, tuned, keys: list[str], device, ticker: Ticker) -> float:
    biggest = 0.0
    for key in keys:
        biggest = max(biggest, float(_diff(base, tuned, key, device).abs().max()))
        ticker.step(f"text encoder: {key}")
    return biggest


def _extract_one(matrix: torch.Tensor, target: CheckpointTarget, request: ExtractRequest):
    shape = target.shape
    up, down, choice, how = linalg.decompose(matrix.reshape(shape[0], -1), request.rule, target.spatial,
                                             min(shape[0], shape[1]), request.svd)
    up, down = linalg.clamp_quantile(up, down, request.clamp_quantile)
    record = ModuleRank(None, choice.rank, float(choice.rank), choice.sum_kept, choice.fro_kept, choice.max_ratio)
    return up, down, record, how


def extract(request: ExtractRequest, progress: Progress | None = None,
            should_stop: ShouldStop | None = None) -> ExtractResult:
    """Extract a LoRA; see the module docstring. Nothing is written on error or cancel.

    Raises:
        ConfigError: bad request or output path.  FileFormatError: not SD1/SD2/SDXL checkpoints.
        ArchMismatchError: base and tuned of different architectures.  ShapeMismatchError: a weight of another
        shape in one than in the other.  NonFiniteError: NaN/inf in a weight.  OperationCancelled.
    """
    out = check_output(request.output, [request.base, request.tuned], request.force)
    device = resolve_device(request.device)
    base, arch = _open(request.base, "base")
    tuned, tuned_arch = _open(request.tuned, "tuned")
    if arch is not tuned_arch:
        raise ArchMismatchError(f"{request.base} is {arch.label} but {request.tuned} is {tuned_arch.label}")
    dtype = DTYPES[request.dtype]
    results: dict[str, ModuleRank] = {}
    tensors: dict[str, torch.Tensor] = {}
    used = {"full": 0, "lowrank": 0}
    with base, tuned, torch.no_grad():
        selected = _selected(request, base, tuned, arch)
        te_keys = [k for k, ts in selected.items() if ts[0].role.startswith("te_")]
        ticker = Ticker(len(te_keys) + len(selected), progress, should_stop)
        te_diff = _te_max_diff(base, tuned, te_keys, device, ticker)
        skip_te = te_diff <= request.min_diff
        for key, targets in selected.items():
            if skip_te and key in te_keys:
                ticker.step(f"{key}: text encoder unchanged")
                continue
            diff = _diff(base, tuned, key, device)
            for target in targets:
                part = diff if target.rows is None else diff[target.rows[0] : target.rows[1]]
                up, down, results[target.name], how = _extract_one(part, target, request)
                used[how] += 1
                tensors.update(lora_tensors(target.name, up, down, results[target.name].alpha, target.shape, dtype))
            ticker.step(key)
    notes = [f"text encoder unchanged (max |ΔW| {te_diff:.3g} <= min_diff {request.min_diff:g}): U-Net only"
             if skip_te else f"text encoder changed (max |ΔW| {te_diff:.3g})"]
    meta = _metadata(request, arch, results, selected, base.path)
    ticker.check()
    save_lora(tensors, meta, out)
    return ExtractResult(str(out), arch, results, skip_te, te_diff, used, describe(out), ticker.seconds, notes)


def _metadata(request: ExtractRequest, arch: Arch, results, selected, base_path: str) -> dict[str, str]:
    spatial = {t.name: t.spatial for ts in selected.values() for t in ts}
    network = network_facts({n: r.rank for n, r in results.items()}, {n: r.alpha for n, r in results.items()},
                            spatial)
    if request.rule.dynamic:
        network["ss_network_dim"] = network["ss_network_alpha"] = "Dynamic"
    base_facts = {"ss_v2": str(arch is Arch.SD2), "ss_base_model_version": BASE_VERSION[arch],
                  "ss_sd_model_name": Path(base_path).name, "ss_sd_model_hash": model_hash(base_path),
                  "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": f"{MODELSPEC_ARCH[arch]}/lora",
                  "modelspec.title": Path(request.output).stem}
    sources = [Source.model(request.base), Source.model(request.tuned)]
    params = {"rule": request.rule.describe(), "clamp_quantile": request.clamp_quantile,
              "min_diff": request.min_diff, "svd": request.svd, "dtype": request.dtype}
    meta = build_metadata(base_facts, operation="extract", comment=f"extracted from {Path(request.tuned).name} - "
                          f"{Path(request.base).name} at {request.rule.describe()}", params=params, sources=sources,
                          network=network, extra={RANKS_KEY: rank_figures(results)})
    return meta

