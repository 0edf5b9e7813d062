"""Optimizer registry: sd-scripts' `optimizer_type` names -> an entry that builds the optimizer from param groups.

Optional packages (bitsandbytes, lion-pytorch, prodigyopt, dadaptation, schedulefree, transformers for
Adafactor) are imported only when their optimizer is built. The trainer makes the parameter groups (text
encoder / U-Net / LoRA+ / block-wise lrs); an entry adds sd-scripts' defaults and quirks:
- SGDNesterov: `nesterov=True`, `momentum=0.9` unless given.
- Adafactor: `relative_step=True` unless given (also forced by `warmup_init=True`); with relative_step the
  optimizer computes its own lr, so group lrs are dropped and the schedule becomes "adafactor".
- AdamW8bit / Lion8bit: bitsandbytes >= 0.45 runs them on CPU; an older build that cannot is caught by a
  one-step probe and reported with the advice to pick AdamW.
- Schedule-free AdamW keeps two weight sequences: `train()` before steps, `eval()` before evaluation, sampling
  and saving (`BuiltOptimizer.train_mode` / `eval_mode`).
"""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from lib_lora.errors import ConfigError

ParamGroup = dict[str, Any]  # {"params": [tensors], "lr": float, ...any per-group option}


@dataclass(frozen=True)
class OptimizerEntry:
    """A registered optimizer: where its class lives and what sd-scripts does around it."""

    name: str  # sd-scripts spelling, e.g. "AdamW8bit"
    module: str
    class_name: str
    package: str | None  # pip package when optional
    description: str
    defaults: tuple[tuple[str, Any], ...] = ()  # added to optimizer_args unless given (shown in ss_optimizer)
    fixed: tuple[tuple[str, Any], ...] = ()  # always passed, not shown (SGDNesterov's nesterov=True)
    schedule_free: bool = False
    adaptive_lr: bool = False  # D-Adaptation / Prodigy: the lr is a multiplier of an estimated step, ~1.0
    bitsandbytes: bool = False

    def load_class(self) -> type[torch.optim.Optimizer]:
        """Import the optimizer class; ConfigError naming the package when it is not installed."""
        try:
            module = importlib.import_module(self.module)
        except ImportError as exc:
            raise ConfigError("optimizer_type", self.name, f"needs the Python package '{self.package}' "
                              f"(pip install {self.package}); it could not be imported: {exc}") from None
        cls = getattr(module, self.class_name, None)
        if cls is None:
            raise ConfigError("optimizer_type", self.name, f"{self.module} has no {self.class_name}: the installed "
                              f"{self.package} is too old or too new")
        return cls


OPTIMIZERS: dict[str, OptimizerEntry] = {}


def register(entry: OptimizerEntry) -> OptimizerEntry:
    """Add an optimizer (looked up case-insensitively, as sd-scripts does)."""
    key = entry.name.lower()
    if key in OPTIMIZERS:
        raise ValueError(f"optimizer {entry.name!r} registered twice")
    OPTIMIZERS[key] = entry
    return entry


for _entry in (
    OptimizerEntry("AdamW", "torch.optim", "AdamW", None, "torch AdamW (sd-scripts' default)"),
    OptimizerEntry("AdamW8bit", "bitsandbytes.optim", "AdamW8bit", "bitsandbytes", "AdamW with 8-bit states",
                   bitsandbytes=True),
    OptimizerEntry("Lion8bit", "bitsandbytes.optim", "Lion8bit", "bitsandbytes", "Lion with 8-bit states",
                   bitsandbytes=True),
    OptimizerEntry("Lion", "lion_pytorch", "Lion", "lion-pytorch", "Lion (sign updates; use ~1/3-1/10 of AdamW's lr)"),
    OptimizerEntry("SGDNesterov", "torch.optim", "SGD", None, "SGD with Nesterov momentum",
                   defaults=(("momentum", 0.9),), fixed=(("nesterov", True),)),
    OptimizerEntry("Adafactor", "transformers.optimization", "Adafactor", "transformers",
                   "Adafactor (relative_step=True by default: lr computed by the optimizer)",
                   defaults=(("relative_step", True),)),
    OptimizerEntry("Prodigy", "prodigyopt", "Prodigy", "prodigyopt", "Prodigy (adaptive step size; lr ~1.0)",
                   adaptive_lr=True),
    OptimizerEntry("DAdaptAdam", "dadaptation", "DAdaptAdam", "dadaptation", "D-Adaptation Adam (lr ~1.0)",
                   adaptive_lr=True),
    OptimizerEntry("AdamWScheduleFree", "schedulefree", "AdamWScheduleFree", "schedulefree",
                   "schedule-free AdamW (no lr schedule; train()/eval() modes)", schedule_free=True),
):
    register(_entry)


def optimizer_names() -> list[str]:
    """Registered optimizer names in sd-scripts spelling, for UI choices and messages."""
    return [e.name for e in OPTIMIZERS.values()]


def get_entry(name: str) -> OptimizerEntry:
    """The entry for an optimizer name (case-insensitive; empty = AdamW as in sd-scripts)."""
    key = str(name).strip().lower() or "adamw"
    entry = OPTIMIZERS.get(key)
    if entry is None:
        raise ConfigError("optimizer_type", name, f"unknown optimizer; known: {', '.join(optimizer_names())}")
    return entry


@dataclass
class BuiltOptimizer:
    """An optimizer built from a registry entry, with what the loop and the metadata need to know."""

    optimizer: torch.optim.Optimizer
    entry: OptimizerEntry
    kwargs: dict[str, Any]  # the optimizer_args used, sd-scripts' defaults included
    scheduler_override: str | None = None  # "adafactor" when Adafactor computes its own lr
    notes: tuple[str, ...] = ()

    @property
    def ss_optimizer(self) -> str:
        """sd-scripts' `ss_optimizer` string, e.g. 'bitsandbytes.optim.adamw.AdamW8bit(weight_decay=0.1)'."""
        cls = type(self.optimizer)
        args = ",".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{cls.__module__}.{cls.__name__}" + (f"({args})" if args else "")

    def train_mode(self) -> None:
        """Call before training steps (schedule-free optimizers switch weight sequences; others: nothing)."""
        if self.entry.schedule_free:
            self.optimizer.train()

    def eval_mode(self) -> None:
        """Call before evaluation, sampling or saving (schedule-free: evaluate at the averaged weights)."""
        if self.entry.schedule_free:
            self.optimizer.eval()


def build_optimizer(name: str, param_groups: Sequence[ParamGroup], lr: float,
                    args: Mapping[str, Any] | None = None) -> BuiltOptimizer:
    """Build optimizer `name` over `param_groups` (dicts with "params" and usually "lr").

    Args:
        name: registry name, case-insensitive ("adamw8bit" works).
        param_groups: the groups; a group without "lr" uses `lr`.
        lr: base learning rate (the optimizer's default lr; polynomial schedules read it).
        args: parsed `optimizer_args`, e.g. {"weight_decay": 0.1, "betas": (0.9, 0.99)}.

    Raises:
        ConfigError: unknown name, missing package, bad optimizer_args, or an optimizer that cannot run here.
    """
    entry = get_entry(name)
    kwargs = {**dict(entry.defaults), **dict(args or {})}
    groups = [dict(g) for g in param_groups]
    if not groups or not any(len(list(g["params"])) for g in groups):
        raise ConfigError("optimizer_type", entry.name, "no trainable parameters were given to the optimizer")
    notes: list[str] = []
    scheduler_override = None
    opt_lr: float | None = lr
    if entry.name == "Adafactor":
        opt_lr, scheduler_override = _adafactor_lr(kwargs, groups, lr, notes)
    if entry.adaptive_lr:
        lrs = {g.get("lr", lr) for g in groups}
        if min(lrs) <= 0.1:
            notes.append(f"{entry.name} adapts its step size: an lr around 1.0 is usual (got {sorted(lrs)})")
    cls = entry.load_class()
    if entry.bitsandbytes and _on_cpu(groups):
        _check_bitsandbytes_cpu(entry)
    optimizer = _construct(entry, cls, groups, opt_lr, kwargs)
    built = BuiltOptimizer(optimizer, entry, kwargs, scheduler_override, tuple(notes))
    built.train_mode()
    return built


def _adafactor_lr(kwargs: dict[str, Any], groups: list[ParamGroup], lr: float,
                  notes: list[str]) -> tuple[float | None, str | None]:
    if kwargs.get("warmup_init") and not kwargs["relative_step"]:
        notes.append("Adafactor: warmup_init=True needs relative_step, so relative_step was set to True")
        kwargs["relative_step"] = True
    if not kwargs["relative_step"]:
        return lr, None
    if len({g.get("lr") for g in groups if "lr" in g}) > 1:
        notes.append("Adafactor with relative_step computes its own lr: unet_lr / text_encoder_lr are ignored")
    for group in groups:
        group.pop("lr", None)
    notes.append(f"Adafactor with relative_step: lr {lr} is only reported as initial lr; scheduler 'adafactor'")
    return None, "adafactor"


def _on_cpu(groups: list[ParamGroup]) -> bool:
    return any(p.device.type == "cpu" for g in groups for p in g["params"])


def _construct(entry: OptimizerEntry, cls: type, groups: list[ParamGroup], lr: float | None,
               kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    implicit = {}
    accepted = inspect.signature(cls.__init__).parameters
    if entry.module == "torch.optim" and not {"foreach", "fused"} & set(kwargs):
        # torch picks its per-tensor loop on CPU; the fused (or multi-tensor) kernels are several times faster for
        # a LoRA's hundreds of small parameters (same update rule; not recorded in ss_optimizer)
        implicit["fused" if "fused" in accepted else "foreach"] = True
    try:
        return cls(groups, lr=lr, **dict(entry.fixed), **implicit, **kwargs)
    except (TypeError, ValueError) as exc:
        accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params", "lr")]
        raise ConfigError("optimizer_args", kwargs, f"{entry.name} ({cls.__module__}.{cls.__name__}) refused "
                          f"them: {exc}; it accepts: {', '.join(accepted)}") from None


@cache
def _bitsandbytes_cpu_error(module: str, class_name: str) -> str | None:
    """None when the installed bitsandbytes can step this optimizer on CPU, else its error text."""
    cls = getattr(importlib.import_module(module), class_name)
    param = torch.nn.Parameter(torch.zeros(4096))  # >= min_8bit_size, so the 8-bit path is what runs
    try:
        opt = cls([param], lr=1e-3)
        param.grad = torch.ones_like(param)
        opt.step()
    except (RuntimeError, NotImplementedError, AttributeError, TypeError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _check_bitsandbytes_cpu(entry: OptimizerEntry) -> None:
    error = _bitsandbytes_cpu_error(entry.module, entry.class_name)
    if error is not None:
        import bitsandbytes

        raise ConfigError("optimizer_type", entry.name, f"the installed bitsandbytes {bitsandbytes.__version__} "
                          f"cannot run its 8-bit optimizers on CPU ({error}); pick AdamW for CPU training")
