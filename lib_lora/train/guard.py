"""Divergence guard: notice a run going wrong while it happens, roll back to the last good state, lower the lr.

A step is bad when its loss is NaN/inf (immediately divergent) or above `spike_factor` x the smoothed baseline
(the median of the last `window` good losses). `patience` bad steps in a row count as divergence. The guard
keeps an in-memory snapshot (network + optimizer state) taken every `snapshot_every` good steps; on divergence
the loop restores it, scales the lr by `lr_decay` and continues; after `max_rollbacks` it stops with a report.

A new snapshot is only trusted once the `patience` steps after it were good too: the first steps of a blow-up
often still look normal (or cannot be judged before a baseline exists), and a snapshot taken there would hold
weights that are already broken.

The baseline is never learned from a diverged stretch: on a rollback to the snapshot of step S, the losses of
steps after S + 1 are forgotten (the loss of step S + 1 was computed on the snapshot's own weights, so it is
kept), and from then on one remembered loss is enough for a baseline. Otherwise a run that blew up early (lr 10:
0.15, then ~1.1 once the lr is lowered) would take the blown-up level for normal and end "finished".
"""
from __future__ import annotations

import copy
import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from lib_lora.train.config import GuardConfig


@dataclass(frozen=True)
class Verdict:
    """What the loop should do after a step: 'ok', 'rollback' or 'stop' (rollbacks exhausted)."""

    action: str
    reason: str = ""


@dataclass
class Snapshot:
    step: int
    network: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


def _cpu_copy(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


class DivergenceGuard:
    def __init__(self, cfg: GuardConfig):
        self.cfg = cfg
        self.enabled = cfg.divergence_guard
        self.recent: deque[tuple[int, float]] = deque(maxlen=cfg.guard_window)  # (step, loss) of good steps
        self.anchored = False  # after a rollback the kept losses are known good: one is enough for a baseline
        self.bad_streak = 0
        self.rollbacks = 0
        self.snapshot: Snapshot | None = None  # trusted
        self.pending: Snapshot | None = None  # taken, waiting for `patience` good steps
        self.events: list[str] = []

    @property
    def baseline(self) -> float | None:
        # Two good losses suffice: a too-high lr often blows up by the third step, and a baseline that waited for
        # more would be made of the blow-up itself (measured: lr 1e-1 on the embedded model, 0.15 -> 1.2 at step
        # 3). A noisy short baseline is harmless: only `patience` bad steps in a row count.
        needed = 1 if self.anchored else min(2, self.recent.maxlen)
        return statistics.median(loss for _, loss in self.recent) if len(self.recent) >= needed else None

    def check(self, step: int, loss: float) -> Verdict:
        """Judge one step's loss (call once per optimizer step)."""
        if not self.enabled:
            return Verdict("ok")
        if not math.isfinite(loss):
            return self._diverged(step, f"loss is {loss} at step {step}")
        base = self.baseline
        if base is not None and loss > self.cfg.guard_spike_factor * base:
            self.bad_streak += 1
            if self.bad_streak >= self.cfg.guard_patience:
                return self._diverged(step, f"loss {loss:.4g} stayed above {self.cfg.guard_spike_factor:g} x the "
                                            f"baseline {base:.4g} for {self.bad_streak} steps (step {step})")
            return Verdict("ok")
        self.bad_streak = 0
        self.recent.append((step, loss))
        if self.pending is not None and step - self.pending.step >= max(1, self.cfg.guard_patience):
            self.snapshot, self.pending = self.pending, None
        return Verdict("ok")

    def _diverged(self, step: int, reason: str) -> Verdict:
        self.bad_streak = 0
        self.pending = None
        if self.snapshot is None or self.rollbacks >= self.cfg.guard_max_rollbacks:
            why = "no good state to return to" if self.snapshot is None else \
                f"{self.rollbacks} rollbacks already (guard_max_rollbacks)"
            self.events.append(f"stop: {reason}; {why}")
            return Verdict("stop", f"{reason}; {why}")
        self.rollbacks += 1
        self.events.append(f"rollback {self.rollbacks}: {reason}; back to step {self.snapshot.step}")
        return Verdict("rollback", reason)

    def wants_snapshot(self, step: int) -> bool:
        every = self.cfg.guard_snapshot_every_n_steps
        last = self.pending or self.snapshot
        return self.enabled and self.bad_streak == 0 and (last is None or step - last.step >= every)

    def take(self, step: int, network: dict[str, torch.Tensor], optimizer: dict[str, Any], *, trusted: bool = False,
             **extra) -> None:
        """Snapshot the state after `step`; `trusted` for the starting state, which needs no confirmation."""
        snap = Snapshot(step, _cpu_copy(network), _cpu_copy(optimizer), _cpu_copy(extra))
        if trusted:
            self.snapshot, self.pending = snap, None
        else:
            self.pending = snap

    def after_rollback(self) -> None:
        """Forget the losses of the diverged stretch (those after the first step on the restored snapshot), so
        the baseline stays the one the good weights gave."""
        self.bad_streak = 0
        if self.snapshot is not None:
            kept = [(step, loss) for step, loss in self.recent if step <= self.snapshot.step + 1]
            self.recent.clear()
            self.recent.extend(kept)
            self.anchored = bool(kept)

    @property
    def unconfirmed_steps(self) -> int:
        """Steps at the end of the run that were above the baseline but fewer than `patience`."""
        return self.bad_streak

    def report(self) -> str:
        if not self.events:
            return "divergence guard: no intervention"
        return "divergence guard: " + "; ".join(self.events)
