"""ProgressEvent: what a running training tells its listeners (CLI tqdm, the UI's loss chart, TensorBoard)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

KINDS = ("start", "cache", "step", "epoch", "validation", "sample", "save", "rollback", "warning", "done", "stopped",
         "error")


@dataclass(frozen=True)
class ProgressEvent:
    """One event. `kind` is one of KINDS; fields not relevant to a kind keep their defaults.

    step/total_steps: optimizer steps done / planned; loss: this step's loss, smoothed: its moving average;
    lrs: lr per parameter group name; it_per_s and eta_s from a moving window; paths: files written
    (samples, saves); message: human-readable text (warnings, rollbacks, the final report).
    """

    kind: str
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    loss: float | None = None
    smoothed: float | None = None
    val_loss: float | None = None
    lrs: dict[str, float] = field(default_factory=dict)
    it_per_s: float | None = None
    eta_s: float | None = None
    paths: tuple[str, ...] = ()
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown event kind {self.kind!r}")


Listener = Callable[[ProgressEvent], None]


class Broadcaster:
    """Fans events out to listeners; a listener that raises is reported once and dropped, never kills a run."""

    def __init__(self, listeners: list[Listener] | None = None):
        self.listeners = list(listeners or [])
        self.failed: list[str] = []

    def __call__(self, event: ProgressEvent) -> None:
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception as exc:  # noqa: BLE001 - a broken UI callback must not stop a long training run
                self.listeners.remove(listener)
                self.failed.append(f"{getattr(listener, '__name__', listener)!s}: {exc}")
