"""WeightPatcher: the only way lib_lora changes a model's weights, and always with a way back.

Two modes:
- 'merge': each targeted weight is backed up once (bit-exact copy), the stack of LoRAs is applied in
  float32 and cast back to the weight's dtype; `restore()` copies the backups back, bit for bit.
  Changing one LoRA's strength re-merges only the weights that LoRA touches.
- 'hooked' (bypass): no weight is written; each targeted layer's forward adds the LoRA stack's change
  to its output (fused q/k/v weights of OpenCLIP attention get a parametrization instead). Used for
  training and where merging is not wanted; `restore()` removes the hooks.

`apply()` validates everything it can (architecture, names, shapes) before touching the model, and
if anything fails while writing, every weight it already rewrote is put back as it was, so the model
is unchanged after any failure.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lib_lora import blocks
from lib_lora.blocks import BlockWeights
from lib_lora.errors import ArchMismatchError, KeyMapError, NonFiniteError
from lib_lora.keys import ModelTargets, Target
from lib_lora.networks import LoadedNetwork, NetworkModule
from lib_lora.networks.base import LayerOp
from lib_lora.types import Arch, component_of

MODES = ("merge", "hooked")


def fits_dtype(weight: Tensor, dtype: torch.dtype) -> bool:
    """True when a float32 weight is finite and stays finite cast to `dtype` (one min/max pass; NaN fails)."""
    if weight.numel() == 0:
        return True
    lo, hi = torch.aminmax(weight)
    limit = torch.finfo(dtype).max
    return bool(lo >= -limit) and bool(hi <= limit)


@dataclass(frozen=True)
class Application:
    """One network in the stack and its strengths (A1111's te/unet multipliers, lbw block weights)."""

    network: LoadedNetwork
    te: float = 1.0
    unet: float = 1.0
    blocks: BlockWeights | None = None

    def strength_of(self, name: str, arch: Arch) -> float:
        comp = component_of(name)
        base = self.te if comp is not None and comp.is_text_encoder else self.unet
        return base * (self.blocks[blocks.block_of(name, arch)] if self.blocks is not None else 1.0)


@dataclass(frozen=True)
class Entry:
    """One network module acting on one target, at a strength."""

    owner: int  # index of the Application in the stack
    module: NetworkModule
    strength: float

    @property
    def signature(self) -> tuple[int, int, float]:
        return (self.owner, id(self.module), self.strength)


@dataclass
class ApplyReport:
    """What an apply did: modules applied per network, names the model lacks, keys nobody understood."""

    applied: dict[str, int] = field(default_factory=dict)
    unmatched_modules: dict[str, list[str]] = field(default_factory=dict)
    unused_keys: dict[str, list[str]] = field(default_factory=dict)
    rewritten: int = 0


@dataclass(eq=False)
class _Slot:
    """One parameter of the model that one or more targets change (q/k/v share a fused weight)."""

    module: nn.Module
    attr: str
    targets: list[Target]

    @property
    def param(self) -> Tensor:
        return getattr(self.module, self.attr)


def _check_arch(network: LoadedNetwork, model_arch: Arch) -> None:
    guess = network.file_arch()
    file_is_xl = guess.arch is Arch.SDXL
    if file_is_xl != (model_arch is Arch.SDXL):
        where = network.path or network.name
        raise ArchMismatchError(
            f"{where}: this LoRA is for {guess.arch.label if file_is_xl else 'SD1.x/SD2.x'} ({guess.reason}); "
            f"the model is {model_arch.label}"
        )


class WeightPatcher:
    """Applies stacks of LoRA-family networks to one model's targets; see the module docstring."""

    def __init__(self, targets: ModelTargets, mode: str = "merge"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.targets = targets
        self.mode = mode
        self._slots: dict[tuple[int, str], _Slot] = {}
        self._slot_of: dict[str, _Slot] = {}
        for t in targets.targets.values():
            attr = "in_proj_weight" if t.rows is not None else "weight"
            slot = self._slots.setdefault((id(t.module), attr), _Slot(t.module, attr, []))
            slot.targets.append(t)
            self._slot_of[t.name] = slot
        self._entries: dict[str, tuple[Entry, ...]] = {}  # target name -> current stack
        self._backups: dict[tuple[int, str], Tensor] = {}
        self._hooks: dict[str, _Hook] = {}
        self._param_hooks: dict[tuple[int, str], _ParamDelta] = {}

    # ------------------------------------------------------------------------------------ public

    @property
    def active(self) -> bool:
        return bool(self._entries)

    def apply(self, applications: Sequence[Application]) -> ApplyReport:
        """Make the model carry exactly this stack (an empty stack restores it).

        Raises:
            ArchMismatchError, KeyMapError, ShapeMismatchError, NonFiniteError: nothing changed in the model.
        """
        desired, report = self._plan(applications)
        changed = [name for name in set(desired) | set(self._entries)
                   if tuple(e.signature for e in desired.get(name, ())) !=
                   tuple(e.signature for e in self._entries.get(name, ()))]
        if self.mode == "merge":
            report.rewritten = self._merge(changed, desired)
        else:
            self._hook(changed, desired)
            report.rewritten = 0
        return report

    def restore(self) -> None:
        """Put every weight back exactly as it was (merge) or remove every hook (hooked)."""
        self.apply([])

    @contextlib.contextmanager
    def applied(self, applications: Sequence[Application]) -> Iterator[ApplyReport]:
        """`with patcher.applied([...]):` apply for the block, restore afterwards even on errors."""
        try:
            yield self.apply(applications)
        finally:
            self.restore()

    # ------------------------------------------------------------------------------------ planning

    def _plan(self, applications: Sequence[Application]) -> tuple[dict[str, tuple[Entry, ...]], ApplyReport]:
        report = ApplyReport()
        stacks: dict[str, list[Entry]] = {}
        device = self._device()
        for owner, app in enumerate(applications):
            net = app.network
            _check_arch(net, self.targets.arch)
            matched = [n for n in net.modules if n in self.targets]
            missing = sorted(n for n in net.modules if n not in self.targets)
            if not matched:
                raise KeyMapError(
                    f"{net.path or net.name}: none of its {len(net.modules)} modules exist in this "
                    f"{self.targets.arch.label} model (first: {missing[:3]})"
                )
            label = net.name if net.name not in report.applied else f"{net.name}#{owner}"
            report.applied[label] = 0
            report.unmatched_modules[label] = missing
            report.unused_keys[label] = list(net.unmatched_keys)
            for name in matched:
                module = net.modules[name]
                module.check_shape(self.targets[name].shape)
                strength = app.strength_of(name, self.targets.arch)
                if strength == 0.0:
                    continue
                if module.lora_device() != device:
                    module.to(device)
                stacks.setdefault(name, []).append(Entry(owner, module, float(strength)))
                report.applied[label] += 1
        return {k: tuple(v) for k, v in stacks.items()}, report

    def _device(self) -> torch.device:
        for t in self.targets.targets.values():
            return t.param.device
        return torch.device("cpu")

    # -------------------------------------------------------------------------------------- merge

    def _merge(self, changed: list[str], desired: dict[str, tuple[Entry, ...]]) -> int:
        slots = {id(self._slot_of[n]): self._slot_of[n] for n in changed}
        previous = dict(self._entries)
        done: list[_Slot] = []
        try:
            for slot in slots.values():
                self._write_slot(slot, desired)
                done.append(slot)
        except BaseException:
            for slot in done:  # put back what this call rewrote: the model must be unchanged on failure
                self._write_slot(slot, previous)
            raise
        for name in changed:
            if desired.get(name):
                self._entries[name] = desired[name]
            else:
                self._entries.pop(name, None)
        return len(slots)

    @torch.no_grad()
    def _write_slot(self, slot: _Slot, stacks: dict[str, tuple[Entry, ...]]) -> None:
        key = (id(slot.module), slot.attr)
        param = slot.param
        has_work = any(stacks.get(t.name) for t in slot.targets)
        backup = self._backups.get(key)
        if not has_work:
            if backup is not None:
                param.copy_(backup.to(param.device))
                del self._backups[key]
            self._restore_bias(slot)
            return
        if backup is None:
            backup = param.detach().to("cpu" if param.is_cuda else param.device, copy=True)
            self._backups[key] = backup
        fused = any(t.rows is not None for t in slot.targets)  # row blocks are written in place: copy first
        weight = backup.to(device=param.device, dtype=torch.float32, copy=fused)
        for t in slot.targets:
            entries = stacks.get(t.name, ())
            if not entries:
                continue
            part = weight if t.rows is None else weight[t.rows[0] : t.rows[1]]
            for e in entries:
                part = e.module.merged(part, e.strength)
            if t.rows is None:
                weight = part
            else:
                weight[t.rows[0] : t.rows[1]] = part
        if not fits_dtype(weight, param.dtype):
            raise NonFiniteError(slot.targets[0].name, f"{slot.attr} after merge", "(a strength too large?)")
        param.copy_(weight)
        self._write_bias(slot, stacks)

    def _write_bias(self, slot: _Slot, stacks: dict[str, tuple[Entry, ...]]) -> None:
        if slot.attr != "weight" or getattr(slot.module, "bias", None) is None:
            return
        entries = stacks.get(slot.targets[0].name, ())
        if not any(e.module.bias_delta() is not None for e in entries):
            self._restore_bias(slot)
            return
        key = (id(slot.module), "bias")
        bias = slot.module.bias
        backup = self._backups.setdefault(key, bias.detach().to("cpu" if bias.is_cuda else bias.device, copy=True))
        value = backup.to(device=bias.device, dtype=torch.float32)
        for e in entries:
            value = e.module.merged_bias(value, e.strength)
        bias.copy_(value.to(bias.dtype))

    def _restore_bias(self, slot: _Slot) -> None:
        backup = self._backups.pop((id(slot.module), "bias"), None)
        if backup is not None:
            slot.module.bias.copy_(backup.to(slot.module.bias.device))

    # -------------------------------------------------------------------------------------- hooks

    def _hook(self, changed: list[str], desired: dict[str, tuple[Entry, ...]]) -> None:
        for name in changed:
            target = self.targets[name]
            entries = desired.get(name, ())
            if target.hook == "param" or target.rows is not None:
                self._hook_param(target, entries)
            elif entries:
                hook = self._hooks.get(name)
                if hook is None:
                    hook = self._hooks[name] = _Hook(target.module)
                hook.entries = entries
            elif name in self._hooks:
                self._hooks.pop(name).remove()
            if entries:
                self._entries[name] = entries
            else:
                self._entries.pop(name, None)

    def _hook_param(self, target: Target, entries: tuple[Entry, ...]) -> None:
        module = target.module
        attr = "in_proj_weight" if target.rows is not None else "weight"
        key = (id(module), attr)
        delta = self._param_hooks.get(key)
        if delta is None and entries:
            delta = self._param_hooks[key] = _ParamDelta()
            parametrize.register_parametrization(module, attr, delta, unsafe=True)
        if delta is None:
            return
        delta.parts[target.rows] = entries
        if not any(delta.parts.values()):
            parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
            del self._param_hooks[key]


class _Hook:
    """Wraps one layer's forward; the LoRA stack in `entries` is read at every call."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.layer = LayerOp.of(module)
        self.entries: tuple[Entry, ...] = ()
        self.previous = module.__dict__.get("forward")  # another instance-level wrapper, if any
        original = module.forward

        def forward(x, *args, **kwargs):
            entries = self.entries
            if len(entries) == 1 and not args and not kwargs:
                rebuilt = entries[0].module.rebuilt_forward(x, self.module, self.layer, entries[0].strength)
                if rebuilt is not None:
                    return rebuilt
            out = original(x, *args, **kwargs)
            for e in entries:
                out = e.module.bypass(x, out, self.layer, self.module.weight, e.strength,
                                     getattr(self.module, "bias", None))
            return out

        self.wrapper = forward
        module.forward = forward

    def remove(self) -> None:
        if self.module.__dict__.get("forward") is not self.wrapper:
            raise RuntimeError(f"forward of {type(self.module).__name__} was re-wrapped by someone else; not removing")
        if self.previous is None:
            del self.module.forward
        else:
            self.module.forward = self.previous


class _ParamDelta(nn.Module):
    """Parametrization of a weight its parent reads directly: W -> W' from the LoRA stack, per row block
    (fused q/k/v) or whole (key None). Differentiable, so training works through it."""

    def __init__(self):
        super().__init__()
        self.parts: dict[tuple[int, int] | None, tuple[Entry, ...]] = {}

    def forward(self, weight: Tensor) -> Tensor:
        out = weight
        for rows, entries in self.parts.items():
            if not entries:
                continue
            part = weight if rows is None else weight[rows[0] : rows[1]]
            merged = part.to(torch.float32)
            for e in entries:
                merged = e.module.merged(merged, e.strength)
            merged = merged.to(weight.dtype)
            out = merged if rows is None else torch.cat([out[: rows[0]], merged, out[rows[1] :]], dim=0)
        return out
