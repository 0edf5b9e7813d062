"""Bake LoRAs into a single-file checkpoint (SD1/SD2/SDXL), tensor by tensor.

The checkpoint is streamed: each tensor is read, merged if LoRAs target it, cast to the output dtype and
written, so the merge holds a few tensors of the model at a time (plus the LoRAs) instead of the model twice;
the next tensor is read and the last one hashed and written by worker threads while this one is merged.

The math is WeightPatcher's, call for call: the weight in float32, each LoRA of the stack applied in order with
`NetworkModule.merged` at its strength (te/unet, lbw block weights), fused q/k/v row blocks each on its own rows,
the bias changed where an algorithm carries one (train_norm layers: a norm's weight and bias), cast back to the
tensor's dtype (or the one asked for). A float32 merge therefore equals what WeightPatcher writes into the loaded
model, bit for bit. Everything that can be checked is checked before the output is opened (architecture, module
names, shapes, NaN in the LoRAs); the checkpoint's own tensors are checked as they stream, and any error or cancel
leaves no output file.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lib_lora.errors import ConfigError, FileFormatError, KeyMapError, NonFiniteError
from lib_lora.networks.base import all_finite
from lib_lora.ops.checkpoint_keys import CheckpointTarget, checkpoint_targets
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
from lib_lora.ops.inputs import LoraInput, load_inputs
from lib_lora.ops.output import OPERATION_KEY, Source
from lib_lora.ops.stream import Entry, StreamWriter, TensorReader
from lib_lora.patching import Entry as StackEntry
from lib_lora.patching import fits_dtype
from lib_lora.sd.components import detect_arch
from lib_lora.types import Arch

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class MergeModelRequest:
    """Merge `loras` into `model`, write `output` (dtype None: each tensor keeps its dtype)."""

    model: str
    loras: tuple[LoraInput, ...]
    output: str
    dtype: str | None = None
    device: str = "auto"
    force: bool = False

    def __post_init__(self):
        if not self.loras or not all(isinstance(i, LoraInput) for i in self.loras):
            raise ConfigError("loras", self.loras, "a non-empty tuple of LoraInput")
        check_dtype("dtype", self.dtype)
        check_device(self.device)


@dataclass
class MergeModelResult:
    output: str
    arch: Arch
    applied: dict[str, int]  # LoRA name -> modules merged
    unmatched: dict[str, list[str]]  # LoRA name -> its modules the model lacks
    tensors: int
    seconds: float
    notes: list[str] = field(default_factory=list)


@dataclass
class _Plan:
    weights: dict[str, list[tuple[CheckpointTarget, list[StackEntry]]]]  # file key -> targets of it and stacks
    biases: dict[str, list[StackEntry]]  # bias key -> stack of modules with a bias change
    applied: dict[str, int]
    unmatched: dict[str, list[str]]


def _plan(request: MergeModelRequest, targets: dict[str, CheckpointTarget], arch: Arch, model: str) -> _Plan:
    nets = load_inputs(request.loras, arch=arch)
    plan = _Plan({}, {}, {}, {})
    stacks: dict[str, list[StackEntry]] = {}
    for owner, (spec, net) in enumerate(zip(request.loras, nets)):
        app = spec.application(net, arch)
        matched = [n for n in net.modules if n in targets]
        if not matched:
            raise KeyMapError(f"{net.path}: none of its {len(net.modules)} modules exist in {model} "
                              f"({arch.label}; first: {sorted(net.modules)[:3]}): a LoRA for another model?")
        label = net.name if net.name not in plan.applied else f"{net.name}#{owner}"
        plan.applied[label] = 0
        plan.unmatched[label] = sorted(n for n in net.modules if n not in targets)
        for name in matched:
            module = net.modules[name]
            module.check_shape(torch.Size(targets[name].shape))
            strength = app.strength_of(name, arch)
            if strength == 0.0:
                continue
            stacks.setdefault(name, []).append(StackEntry(owner, module, float(strength)))
            plan.applied[label] += 1
    for name in sorted(stacks, key=lambda n: (targets[n].key, targets[n].rows or (0, 0))):
        t = targets[name]
        plan.weights.setdefault(t.key, []).append((t, stacks[name]))
        if t.rows is None and any(e.module.bias_delta() is not None for e in stacks[name]):
            plan.biases[t.key[: -len("weight")] + "bias"] = stacks[name]
    return plan


@torch.no_grad()
def _merge_weight(w0: torch.Tensor, parts: list[tuple[CheckpointTarget, list[StackEntry]]],
                  device: torch.device) -> torch.Tensor:
    """WeightPatcher._write_slot's arithmetic on a file tensor (float32 result)."""
    fused = any(t.rows is not None for t, _ in parts)
    weight = w0.to(device=device, dtype=torch.float32, copy=fused)
    for target, entries in parts:
        part = weight if target.rows is None else weight[target.rows[0] : target.rows[1]]
        for e in entries:
            part = e.module.to(device).merged(part, e.strength)
        if target.rows is None:
            weight = part
        else:
            weight[target.rows[0] : target.rows[1]] = part
    return weight


def _out_dtype(dtype: torch.dtype, wanted: torch.dtype | None) -> torch.dtype:
    return wanted if wanted is not None and dtype in _FLOATS else dtype


def _metadata(reader: TensorReader, request: MergeModelRequest, plan: _Plan, out: Path) -> dict[str, str]:
    meta = {k: v for k, v in reader.metadata.items() if not k.startswith("sshs_") and k != OPERATION_KEY}
    sources = [Source.model(request.model).as_dict()]
    sources += [{**Source.of(i.path).as_dict(), "strength": i.describe()} for i in request.loras]
    meta[OPERATION_KEY] = json.dumps({"operation": "merge-into-model", "dtype": request.dtype, "sources": sources,
                                      "applied": plan.applied}, ensure_ascii=False)
    meta["modelspec.title"] = out.stem
    meta["modelspec.merged_from"] = ", ".join(Path(p).stem for p in (request.model, *(i.path for i in request.loras)))
    return meta


def merge_into_model(request: MergeModelRequest, progress: Progress | None = None,
                     should_stop: ShouldStop | None = None) -> MergeModelResult:
    """Merge LoRAs into a checkpoint; see the module docstring.

    Raises:
        ConfigError: bad request or output path.  FileFormatError: not an SD1/SD2/SDXL single-file checkpoint.
        ArchMismatchError: an SDXL LoRA on an SD1/SD2 model or the reverse.  KeyMapError: a LoRA none of whose
        modules the model has.  ShapeMismatchError: a module that does not fit its weight.
        NonFiniteError: NaN/inf in a LoRA, in a model tensor, or a merged weight out of the dtype's range.
        OperationCancelled: `should_stop()` returned True (no output).
    """
    model = check_input("model", request.model)
    out = check_output(request.output, [model, *(i.path for i in request.loras)], request.force)
    device = resolve_device(request.device)
    wanted = DTYPES[request.dtype] if request.dtype else None
    reader = TensorReader(model)
    shapes = reader.shapes()
    try:
        arch = detect_arch(shapes)
    except KeyMapError as exc:
        raise FileFormatError(model, str(exc)) from None
    plan = _plan(request, checkpoint_targets(shapes, arch, norms=True), arch, model)
    order = reader.names()
    entries = [Entry(k, _out_dtype(reader.dtype(k), wanted), shapes[k]) for k in order]
    ticker = Ticker(len(order), progress, should_stop)
    with reader, StreamWriter(out, entries, _metadata(reader, request, plan, out), background=True) as writer:
        for entry, (_, source) in zip(entries, reader.stream(order)):
            changed = entry.name in plan.weights or entry.name in plan.biases
            if not changed and source.dtype in _FLOATS and not all_finite(source):
                raise NonFiniteError(model, entry.name)
            tensor = source
            if entry.name in plan.weights:
                tensor = _merge_weight(source, plan.weights[entry.name], device)
            elif entry.name in plan.biases:
                tensor = source.to(device=device, dtype=torch.float32)
                for e in plan.biases[entry.name]:
                    tensor = e.module.merged_bias(tensor, e.strength)
            # a merged tensor is checked once, after merging (NaN in the source shows there too; then it is named)
            if changed and not fits_dtype(tensor, entry.dtype):
                if not all_finite(source):
                    raise NonFiniteError(model, entry.name)
                raise NonFiniteError(model, entry.name, f"after merging into {entry.dtype} (a strength too large?)")
            writer.write(entry.name, tensor.to("cpu", entry.dtype))
            ticker.step(entry.name)
    _copy_yaml(model, out, request.force)
    return MergeModelResult(str(out), arch, plan.applied, plan.unmatched, len(order), ticker.seconds)


def _copy_yaml(model: str, out: Path, force: bool) -> None:
    """The web UI reads `<checkpoint>.yaml` beside a checkpoint: the merged model gets its source's."""
    src = Path(model).with_suffix(".yaml")
    dst = out.with_suffix(".yaml")
    if src.is_file() and (force or not dst.exists()):
        tmp = dst.with_name(f".{dst.name}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)

