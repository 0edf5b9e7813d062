"""Learning-rate schedules: pure multiplier functions (step -> factor of each group's base lr), a registry, LambdaLR.

The curves are those of transformers' schedule functions, which sd-scripts' `get_scheduler_fix` calls:
linear warmup `step / max(1, warmup)` first, then the decay over `progress = (step - warmup) / (total - warmup)`.
`cosine_with_restarts` takes an optional floor (`lr_scheduler_min_lr_ratio`), the patch users apply so a restart
never spends a long tail near lr 0: `min + (1 - min) * 0.5 * (1 + cos(pi * ((cycles * progress) % 1)))`, 0 once
progress >= 1; with min = 0 this is transformers' curve exactly.

Steps count optimizer steps. Under accelerate, sd-scripts builds the schedule over `max_train_steps *
num_processes` because accelerate's scheduler wrapper steps it once per process: the loop passes that total.
"""
from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from lib_lora.errors import ConfigError

POLYNOMIAL_LR_END = 1e-7  # transformers' default lr_end for the polynomial schedule


@dataclass(frozen=True, kw_only=True)
class ScheduleSpec:
    """Everything a schedule needs. `base_lr` is only read by `polynomial` (its lr_end is absolute)."""

    name: str
    total_steps: int
    warmup_steps: int = 0
    num_cycles: int = 1
    power: float = 1.0
    min_lr_ratio: float = 0.0
    lr_end: float = POLYNOMIAL_LR_END
    base_lr: float | None = None
    torch_class: str | None = None  # sd-scripts' lr_scheduler_type: a torch.optim.lr_scheduler class, replaces `name`
    torch_args: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", get_entry(self.name).name)
        if self.total_steps < 1:
            raise ConfigError("max_train_steps", self.total_steps, "the schedule needs at least 1 step")
        if self.warmup_steps < 0:
            raise ConfigError("lr_warmup_steps", self.warmup_steps, "must be >= 0")
        if self.num_cycles < 1:
            raise ConfigError("lr_scheduler_num_cycles", self.num_cycles, "must be >= 1")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("lr_scheduler_min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")


def resolve_warmup(value: int | float, total_steps: int) -> int:
    """Warmup steps from `lr_warmup_steps`: an int is steps, a float < 1 a ratio of the total (truncated)."""
    if isinstance(value, float):
        if not 0.0 <= value < 1.0:
            raise ConfigError("lr_warmup_steps", value, "a float is a ratio of the total steps and must be < 1")
        return int(value * total_steps)
    return int(value)


def _warmup(step: int, spec: ScheduleSpec) -> float | None:
    """The warmup ramp 0 -> 1 while step < warmup_steps, else None."""
    if step < spec.warmup_steps:
        return step / max(1, spec.warmup_steps)
    return None


def _progress(step: int, spec: ScheduleSpec) -> float:
    return (step - spec.warmup_steps) / max(1, spec.total_steps - spec.warmup_steps)


def constant(step: int, spec: ScheduleSpec) -> float:
    """lr fixed (warmup ignored, as transformers' `constant`)."""
    return 1.0


def constant_with_warmup(step: int, spec: ScheduleSpec) -> float:
    """Linear ramp 0 -> 1 over the warmup, then 1."""
    ramp = _warmup(step, spec)
    return 1.0 if ramp is None else ramp


def linear(step: int, spec: ScheduleSpec) -> float:
    """Warmup, then linear decay to 0 at total_steps."""
    ramp = _warmup(step, spec)
    if ramp is not None:
        return ramp
    return max(0.0, (spec.total_steps - step) / max(1, spec.total_steps - spec.warmup_steps))


def cosine(step: int, spec: ScheduleSpec) -> float:
    """Warmup, then half a cosine from 1 to 0 at total_steps."""
    ramp = _warmup(step, spec)
    if ramp is not None:
        return ramp
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * _progress(step, spec))))


def cosine_with_restarts(step: int, spec: ScheduleSpec) -> float:
    """Warmup, then `num_cycles` cosine decays with hard restarts, each down to the floor `min_lr_ratio`."""
    ramp = _warmup(step, spec)
    if ramp is not None:
        return ramp
    progress = _progress(step, spec)
    if progress >= 1.0:
        return 0.0
    wave = 0.5 * (1.0 + math.cos(math.pi * ((spec.num_cycles * progress) % 1.0)))
    return max(0.0, spec.min_lr_ratio + (1.0 - spec.min_lr_ratio) * wave)


def cosine_with_min_lr(step: int, spec: ScheduleSpec) -> float:
    """transformers' cosine with a floor: num_cycles half-waves (sd-scripts passes cycles / 2) within [min, 1]."""
    ramp = _warmup(step, spec)
    if ramp is not None:
        return ramp
    wave = 0.5 * (1.0 + math.cos(math.pi * spec.num_cycles * _progress(step, spec)))
    return max(0.0, wave * (1.0 - spec.min_lr_ratio) + spec.min_lr_ratio)


def polynomial(step: int, spec: ScheduleSpec) -> float:
    """Warmup, then (lr - lr_end) * remaining**power + lr_end; lr_end (absolute, 1e-7) after total_steps."""
    if spec.base_lr is None:
        raise ConfigError("lr_scheduler", "polynomial", "needs the base learning rate (ScheduleSpec.base_lr)")
    if spec.base_lr <= spec.lr_end:
        raise ConfigError("learning_rate", spec.base_lr, f"polynomial decay needs a learning rate > lr_end "
                          f"({spec.lr_end})")
    ramp = _warmup(step, spec)
    if ramp is not None:
        return ramp
    end = spec.lr_end / spec.base_lr
    if step > spec.total_steps:
        return end
    remaining = 1.0 - (step - spec.warmup_steps) / max(1, spec.total_steps - spec.warmup_steps)
    return (1.0 - end) * remaining ** spec.power + end


def adafactor(step: int, spec: ScheduleSpec) -> float:
    """Adafactor with relative_step computes its own lr; the schedule only reports it (see `AdafactorLR`)."""
    return 1.0


@dataclass(frozen=True)
class SchedulerEntry:
    """A registered schedule: its sd-scripts name and its pure multiplier function."""

    name: str
    multiplier: Callable[[int, ScheduleSpec], float]
    uses_warmup: bool
    description: str


SCHEDULERS: dict[str, SchedulerEntry] = {}


def register(entry: SchedulerEntry) -> SchedulerEntry:
    """Add a schedule to the registry (names are lower case and unique)."""
    if entry.name != entry.name.lower() or entry.name in SCHEDULERS:
        raise ValueError(f"scheduler name {entry.name!r} must be lower case and unique")
    SCHEDULERS[entry.name] = entry
    return entry


for _entry in (
    SchedulerEntry("constant", constant, False, "lr fixed"),
    SchedulerEntry("constant_with_warmup", constant_with_warmup, True, "linear ramp over the warmup, then fixed"),
    SchedulerEntry("linear", linear, True, "linear decay to 0 at the end"),
    SchedulerEntry("cosine", cosine, True, "cosine decay to 0 at the end"),
    SchedulerEntry("cosine_with_restarts", cosine_with_restarts, True,
                   "cosine decay repeated lr_scheduler_num_cycles times, floor lr_scheduler_min_lr_ratio"),
    SchedulerEntry("cosine_with_min_lr", cosine_with_min_lr, True, "cosine decay to lr_scheduler_min_lr_ratio"),
    SchedulerEntry("polynomial", polynomial, True, "polynomial decay, power lr_scheduler_power"),
    SchedulerEntry("adafactor", adafactor, False, "Adafactor's own relative-step lr (set automatically)"),
):
    register(_entry)


def scheduler_names() -> list[str]:
    """Registered schedule names, for choices in the UI and in error messages."""
    return list(SCHEDULERS)


def get_entry(name: str) -> SchedulerEntry:
    """The registry entry of a schedule name (case-insensitive); ConfigError listing the known ones otherwise."""
    entry = SCHEDULERS.get(str(name).strip().lower())
    if entry is None:
        raise ConfigError("lr_scheduler", name, f"unknown scheduler; known: {', '.join(SCHEDULERS)}")
    return entry


def multiplier(spec: ScheduleSpec, step: int) -> float:
    """The factor applied to every group's base lr at optimizer step `step` (0-based)."""
    if spec.torch_class is not None:
        table = _torch_factors(spec)
        return table[min(step, len(table) - 1)]
    return SCHEDULERS[spec.name].multiplier(step, spec)


# ---------------------------------------------------------------------------- torch classes (lr_scheduler_type)

TORCH_MODULE = "torch.optim.lr_scheduler"
_NEEDS_METRICS = ("ReduceLROnPlateau",)


def torch_scheduler_class(name: str) -> type:
    """A scheduler class of torch.optim.lr_scheduler by name (`CosineAnnealingLR` or its dotted path), as
    sd-scripts' `lr_scheduler_type` names it. Classes from other modules are refused: a config file does not
    import code here."""
    import torch.optim.lr_scheduler as lr_scheduler

    short = name.strip()
    if short.startswith(TORCH_MODULE + "."):
        short = short[len(TORCH_MODULE) + 1:]
    if "." in short:
        raise ConfigError("lr_scheduler_type", name, f"only classes of {TORCH_MODULE} are loaded (a config file "
                                                     "does not import other code here)")
    cls = getattr(lr_scheduler, short, None)
    if not (isinstance(cls, type) and issubclass(cls, lr_scheduler.LRScheduler)) or short == "LambdaLR":
        known = sorted(n for n, c in vars(lr_scheduler).items() if isinstance(c, type)
                       and issubclass(c, lr_scheduler.LRScheduler) and n not in ("LRScheduler", "LambdaLR",
                                                                                   *_NEEDS_METRICS))
        raise ConfigError("lr_scheduler_type", name, f"not a scheduler class of {TORCH_MODULE}; known: "
                                                     f"{', '.join(known)}")
    if short in _NEEDS_METRICS:
        raise ConfigError("lr_scheduler_type", name, "steps on a validation metric, not on the step count")
    return cls


def _probe(spec: ScheduleSpec) -> LRScheduler:
    # One parameter at lr 1.0: the lr the class gives at each step is the multiplier of every group's base lr.
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    try:
        return torch_scheduler_class(spec.torch_class)(optimizer, **dict(spec.torch_args))
    except (TypeError, ValueError) as exc:
        raise ConfigError("lr_scheduler_args", dict(spec.torch_args), f"{spec.torch_class}: {exc}") from None


@functools.lru_cache(maxsize=8)
def _torch_factors(spec: ScheduleSpec) -> tuple[float, ...]:
    sched = _probe(spec)
    factors = [sched.get_last_lr()[0]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": there is no training here
        for _ in range(spec.total_steps):
            sched.step()
            factors.append(sched.get_last_lr()[0])
    return tuple(factors)


def check_torch_scheduler(name: str, args: tuple[tuple[str, Any], ...]) -> None:
    """Raise ConfigError now, before a run, for an unknown class or arguments the class does not take."""
    _probe(ScheduleSpec(name="constant", total_steps=1, torch_class=name, torch_args=args))


class ScheduledLR(LambdaLR):
    """LambdaLR over a registered pure schedule. `state_dict` holds only plain values (weights_only-safe)."""

    def __init__(self, optimizer: torch.optim.Optimizer, spec: ScheduleSpec, last_epoch: int = -1):
        self.spec = spec
        super().__init__(optimizer, partial(multiplier, spec), last_epoch=last_epoch)

    def multiplier(self, step: int) -> float:
        return multiplier(self.spec, step)

    def scale(self, factor: float) -> None:
        """Multiply every group's base lr (and current lr) by `factor`: the divergence guard's lr cut."""
        self.base_lrs = [lr * factor for lr in self.base_lrs]
        for group in self.optimizer.param_groups:
            if group.get("lr") is not None:
                group["lr"] *= factor
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("spec", None)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        spec = self.spec
        super().load_state_dict(state_dict)
        self.spec = spec


class AdafactorLR(ScheduledLR):
    """Reports the lr Adafactor computes itself with relative_step (transformers' `AdafactorSchedule` idea)."""

    def __init__(self, optimizer: torch.optim.Optimizer, spec: ScheduleSpec, initial_lr: float):
        for group in optimizer.param_groups:
            # relative_step groups carry lr None; LambdaLR needs a number to start from.
            group["initial_lr"] = initial_lr
        super().__init__(optimizer, spec)

    def get_lr(self) -> list[float]:
        opt = self.optimizer
        get = getattr(opt, "_get_lr", None)
        lrs = [get(g, opt.state[g["params"][0]]) for g in opt.param_groups
               if get is not None and g["params"][0] in opt.state and opt.state[g["params"][0]].get("step")]
        return lrs if len(lrs) == len(opt.param_groups) else list(self.base_lrs)


def build_scheduler(optimizer: torch.optim.Optimizer, spec: ScheduleSpec) -> ScheduledLR:
    """A LambdaLR-compatible scheduler for `optimizer` following `spec`.

    Polynomial takes its base lr from `optimizer.defaults["lr"]` when the spec has none, as transformers does.
    """
    if spec.name == "adafactor":
        lr = optimizer.defaults.get("lr")
        return AdafactorLR(optimizer, spec, initial_lr=float(lr) if lr is not None else 0.0)
    if spec.name == "polynomial" and spec.base_lr is None:
        spec = replace(spec, base_lr=float(optimizer.defaults["lr"]))
    if any(g.get("lr") is None for g in optimizer.param_groups):
        raise ConfigError("lr_scheduler", spec.name, "the optimizer has groups without an lr (Adafactor with "
                          "relative_step); use lr_scheduler = 'adafactor'")
    return ScheduledLR(optimizer, spec)
