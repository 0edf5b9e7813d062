"""Convert a LoRA-family file: key spelling, precision, algorithm (to plain LoRA), metadata.

Targets (`to`):
- 'kohya': every module in kohya/LyCORIS spelling (`lora_unet_...lora_down.weight`, `.alpha`), tensors as they
  are (a diffusers/PEFT file's alphas come from its `lora_adapter_metadata`, or 1 per rank when it has none).
- 'diffusers': `unet.<path>.lora_A.weight` / `text_encoder(_2).<path>.lora_B.weight`, which diffusers'
  `load_lora_weights` and PEFT read; alpha/rank is folded into the factors (√ on each), since that format
  carries no alpha. Modules that are not plain LoRA need `rule` (they are first turned into LoRA).
- 'lora': plain LoRA in kohya spelling, for tools that read only LoRA: plain LoRA modules are kept exactly;
  LoHa, LoKr, Tucker LoCon and full modules become LoRA by an SVD of their real ΔW at `rule`'s rank; DoRA and
  IA3 modules, whose change depends on the weight, need the base checkpoint (`model`), from which their real
  ΔW = W' - W0 is computed.
Normalization-layer changes (train_norm: `w_norm`/`b_norm`) are kept by 'kohya'; 'diffusers' and 'lora' have no
form for them, so they are left out, and the result's notes and metadata say how many.
`dtype` casts every tensor; `strip_metadata` keeps only what loaders need (network and architecture facts, the
hashes); `set_metadata` / `drop_metadata` edit keys last. Hashes are always recomputed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lib_lora.errors import ConfigError
from lib_lora.info import NetworkInfo, describe
from lib_lora.keys import to_peft_key
from lib_lora.networks import LoadedNetwork, NetworkModule, load_network
from lib_lora.networks.lora import LoRAModule
from lib_lora.ops import linalg
from lib_lora.ops.checkpoint_keys import checkpoint_targets
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
from lib_lora.ops.modules import ModuleDelta, is_norm, module_delta, norm_note
from lib_lora.ops.output import RANKS_KEY, Source, build_metadata, lora_tensors, network_facts, rank_figures, save_lora
from lib_lora.ops.resize import ModuleRank, reduce_module
from lib_lora.ops.stream import TensorReader

TARGETS = ("kohya", "diffusers", "lora")
LOADER_FACTS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_v2",
                "ss_base_model_version", "modelspec.sai_model_spec", "modelspec.architecture")


@dataclass(frozen=True)
class ConvertRequest:
    input: str
    output: str
    to: str = "kohya"
    rule: RankRule | None = None  # rank of modules turned into LoRA
    model: str | None = None  # base checkpoint: needed to turn DoRA / IA3 into LoRA
    dtype: str | None = None
    strip_metadata: bool = False
    set_metadata: tuple[tuple[str, str], ...] = ()
    drop_metadata: tuple[str, ...] = ()
    svd: str = "auto"
    device: str = "auto"
    force: bool = False

    def __post_init__(self):
        if self.to not in TARGETS:
            raise ConfigError("to", self.to, f"must be one of {', '.join(TARGETS)}")
        if self.rule is not None and not isinstance(self.rule, RankRule):
            raise ConfigError("rule", self.rule, "must be a RankRule")
        if self.svd not in linalg.SVD_MODES:
            raise ConfigError("svd", self.svd, f"must be one of {', '.join(linalg.SVD_MODES)}")
        for pair in self.set_metadata:
            if len(pair) != 2 or not all(isinstance(x, str) for x in pair) or not pair[0]:
                raise ConfigError("set_metadata", pair, "must be (key, value) strings")
        check_dtype("dtype", self.dtype)
        check_device(self.device)


@dataclass
class ConvertResult:
    output: str
    modules: dict[str, ModuleRank]  # modules turned into LoRA, with the rank kept
    info: NetworkInfo
    seconds: float
    notes: list[str] = field(default_factory=list)


def _plain(module: NetworkModule) -> bool:
    return isinstance(module, LoRAModule) and module.lora_mid is None and module.dora_scale is None


def _needs_model(module: NetworkModule) -> bool:
    return module.dora_scale is not None or module.algo == "ia3"


class _Weights:
    """The base checkpoint's weights of LoRA targets (DoRA and IA3 need W0), read one at a time."""

    def __init__(self, path: str, net: LoadedNetwork):
        self.reader = TensorReader(check_input("model", path))
        self.targets = checkpoint_targets(self.reader.shapes(), net.arch)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.targets:
            raise ConfigError("model", self.reader.path, f"has no weight for {name} (another architecture?)")
        return self.targets[name].shape

    def weight(self, name: str) -> torch.Tensor:
        target = self.targets[name]
        with self.reader:
            w = self.reader.read(target.key).to(torch.float32)
        return w if target.rows is None else w[target.rows[0] : target.rows[1]]


def _real_delta(name: str, module: NetworkModule, weights: _Weights, device) -> ModuleDelta:
    """ΔW = W'(multiplier 1) - W0 of a module whose change depends on W0."""
    w0 = weights.weight(name).to(device)
    module.check_shape(w0.shape)
    dense = (module.to(device).merged(w0, 1.0) - w0).reshape(w0.shape[0], -1)
    return ModuleDelta(name, tuple(w0.shape), module, dense=dense)


def _to_lora(delta: ModuleDelta, rule: RankRule | None, mode: str, device) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   float, ModuleRank]:
    if rule is None:
        raise ConfigError("rule", None, f"{delta.name} is {delta.module.algo}: give the rank to turn it into LoRA")
    return reduce_module(delta, rule, device, conv_rank_for_1x1=False, svd=mode)


def _diffusers_tensors(name: str, up, down, alpha: float, shape, dtype, arch) -> dict[str, torch.Tensor]:
    root = math.sqrt(alpha / down.shape[0])  # the format has no alpha: fold the scale into both factors
    kohya = lora_tensors(name, up * root, down * root, alpha, shape, dtype)
    return {to_peft_key(name, suffix, arch): t for key, t in kohya.items()
            if (suffix := key[len(name) + 1:]) != "alpha"}


def _metadata(request: ConvertRequest, net: LoadedNetwork, network: dict[str, str], results,
              left_out: int) -> dict[str, str]:
    base = net.metadata
    if request.strip_metadata:
        base = {k: v for k, v in base.items() if k in LOADER_FACTS}
    meta = build_metadata(base, operation=f"convert to {request.to}",
                          comment=f"converted to {request.to}" + (f" ({request.dtype})" if request.dtype else ""),
                          params={"to": request.to, "rule": request.rule.describe() if request.rule else None,
                                  "dtype": request.dtype, "strip_metadata": request.strip_metadata,
                                  **({"norm_layers_left_out": left_out} if left_out else {})},
                          sources=[Source.of(net.path)], network=network,
                          extra={RANKS_KEY: rank_figures(results)} if results else None)
    if request.strip_metadata:
        meta = {k: v for k, v in meta.items() if k in LOADER_FACTS}
    for key in request.drop_metadata:
        meta.pop(key, None)
    meta.update(dict(request.set_metadata))
    return meta


def convert(request: ConvertRequest, progress: Progress | None = None,
            should_stop: ShouldStop | None = None) -> ConvertResult:
    """Convert a LoRA-family file; see the module docstring. Nothing is written on error or cancel.

    Raises:
        ConfigError: bad request or output path; a module that cannot be converted as asked (naming it).
        FileFormatError, NonFiniteError, ShapeMismatchError: the input or the model.  OperationCancelled.
    """
    src = check_input("input", request.input)
    out = check_output(request.output, [src, *([request.model] if request.model else [])], request.force)
    device = resolve_device(request.device)
    net = load_network(src)
    weights = _Weights(request.model, net) if request.model else None
    ticker = Ticker(len(net.modules), progress, should_stop)
    tensors, results, ranks, alphas, spatial = {}, {}, {}, {}, {}
    left_out = {n for n, m in net.modules.items() if is_norm(m)} if request.to != "kohya" else set()
    with torch.no_grad():
        for name in sorted(net.modules):
            module = net.modules[name]
            dtype = DTYPES[request.dtype] if request.dtype else next(iter(module.parameters())).dtype
            if request.to == "kohya":
                tensors.update({f"{name}.{k}": v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype)
                                for k, v in module.file_tensors().items()})
                ticker.step(name)
                continue
            if name in left_out:
                ticker.step(f"{name}: left out (no {request.to} form)")
                continue
            if _needs_model(module):
                if weights is None:
                    raise ConfigError("model", None, f"{name} is {'DoRA' if module.dora_scale is not None else 'IA3'}"
                                                     ": its change depends on the weight; give the base checkpoint")
                delta = _real_delta(name, module, weights, device)
            else:
                known = {name: weights.shape(name)} if weights else None
                delta = module_delta(name, module, net.arch, known)
            if _plain(module):
                up, down, alpha = delta.up, delta.down, delta.scale * delta.rank
            else:
                up, down, alpha, results[name] = _to_lora(delta, request.rule, request.svd, device)
            ranks[name], alphas[name], spatial[name] = down.shape[0], alpha, delta.spatial
            if request.to == "diffusers":
                tensors.update(_diffusers_tensors(name, up, down, alpha, delta.shape, dtype, net.arch))
            else:
                tensors.update(lora_tensors(name, up, down, alpha, delta.shape, dtype))
            ticker.step(name)
    if not tensors:
        raise ConfigError("to", request.to, f"{src} has only normalization-layer changes (train_norm), which "
                                            f"{request.to} cannot carry: nothing would be written")
    network = network_facts(ranks, alphas, spatial) if ranks else {}
    meta = _metadata(request, net, network, results, len(left_out))
    ticker.check()
    save_lora(tensors, meta, out)
    notes = [f"{len(results)} modules turned into LoRA"] if results else []
    if left_out:
        notes.append(norm_note(len(left_out), f"left out: the {request.to} format has no form for them, so the "
                                              "file no longer changes those layers"))
    return ConvertResult(str(out), results, describe(out), ticker.seconds, notes)
