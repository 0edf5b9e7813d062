"""Training runs that live in the host process: a queue, one run at a time, each run's live state and log.

The UI only submits, stops and reads snapshots, so closing the browser tab and coming back shows the live run
again, and two runs started at once are queued, never run together. A stopped run saved a resumable state
(the loop does that on stop); `resume(run_id)` queues its continuation with the same seed.

The manager also remembers how fast each kind of run went (seconds per step, peak memory) per model, resolution,
batch size and network, so the dataset preview can estimate a run's time from the last run on this model, or
from a short measured warm-up (`measure`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lib_lora.errors import ConfigError, LibLoraError
from lib_lora.train.checkpoint import STATE_FILE
from lib_lora.train.config import LoggingConfig, OutputConfig, SamplingConfig, TrainConfig, ValidationConfig
from lib_lora.train.events import Listener, ProgressEvent
from lib_lora.train.loop import TrainResult

# (config, listeners, should_stop) -> result: the host's way of training (standalone: `train.run.train`)
Trainer = Callable[[TrainConfig, Sequence[Listener], Callable[[], bool]], TrainResult]
ENDED = ("finished", "stopped", "diverged", "failed", "cancelled")
STATES = ("queued", "running", "stopping", *ENDED)
LOG_LINES = 400
MAX_SEED = 2**31 - 1


@dataclass(frozen=True)
class GuardMark:
    """A divergence-guard event at a step: a rollback (lr lowered) or the final stop."""

    step: int
    kind: str  # "rollback" | "stop"
    message: str


@dataclass(frozen=True)
class RunView:
    """A consistent copy of one run's state, for the UI (safe to read while the run goes on)."""

    id: int
    label: str
    status: str
    output_name: str
    output_dir: str
    step: int
    total_steps: int
    epoch: int
    it_per_s: float | None
    eta_s: float | None
    losses: tuple[tuple[int, float, float | None], ...]  # (step, loss, smoothed)
    val_losses: tuple[tuple[int, float], ...]
    lrs: tuple[tuple[int, float], ...]  # the first parameter group's lr
    guard: tuple[GuardMark, ...]
    samples: tuple[str, ...]
    saves: tuple[str, ...]
    log: tuple[str, ...]
    result_file: str | None
    state_dir: str | None
    report: str
    error: str
    seed: int | None
    queued_at: float
    started_at: float | None
    ended_at: float | None
    peak_memory_mb: float | None

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    @property
    def resumable(self) -> bool:
        return self.state_dir is not None and Path(self.state_dir, STATE_FILE).is_file()


@dataclass
class _Run:
    id: int
    label: str
    cfg: TrainConfig
    probe: bool = False
    status: str = "queued"
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    it_per_s: float | None = None
    eta_s: float | None = None
    losses: list = field(default_factory=list)
    val_losses: list = field(default_factory=list)
    lrs: list = field(default_factory=list)
    guard: list = field(default_factory=list)
    samples: list = field(default_factory=list)
    saves: list = field(default_factory=list)
    log: deque = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    result_file: str | None = None
    state_dir: str | None = None
    report: str = ""
    error: str = ""
    queued_at: float = field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None
    step_times: list = field(default_factory=list)
    peak_memory_mb: float | None = None
    base_memory_mb: float | None = None
    stop_event: threading.Event = field(default_factory=threading.Event)

    def view(self) -> RunView:
        out = self.cfg.output
        return RunView(self.id, self.label, self.status, out.output_name, str(out.output_dir or ""), self.step,
                       self.total_steps, self.epoch, self.it_per_s, self.eta_s, tuple(self.losses),
                       tuple(self.val_losses), tuple(self.lrs), tuple(self.guard), tuple(self.samples),
                       tuple(self.saves), tuple(self.log), self.result_file, self.state_dir, self.report, self.error,
                       self.cfg.run.seed, self.queued_at, self.started_at, self.ended_at, self.peak_memory_mb)


def _memory_mb() -> float | None:
    """Memory of this process now (CUDA: the peak allocated on the device), in MiB; None when unknown."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**20
    except ImportError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process(os.getpid()).memory_info().rss / 2**20


@dataclass(frozen=True)
class Estimate:
    """How long a run will take and how much memory it adds, and where the figures come from."""

    seconds_per_step: float
    memory_mb: float | None
    source: str  # "last run on this model (date)" | "warm-up of N steps"

    def seconds(self, steps: int) -> float:
        return self.seconds_per_step * steps


def speed_key(cfg: TrainConfig) -> str:
    """What a run's speed depends on: model, resolution, batch, network kind and size, memory savers."""
    ds = cfg.data.datasets[0]
    net = cfg.network
    return (f"{cfg.model.pretrained_model_name_or_path or 'embedded'}|{ds.resolution[0]}x{ds.resolution[1]}"
            f"|bs{cfg.run.train_batch_size}x{cfg.run.gradient_accumulation_steps}|{net.algo}{net.network_dim}"
            f"|gc{int(cfg.run.gradient_checkpointing)}|{cfg.run.mixed_precision}")


class SpeedHistory:
    """Seconds per step and peak memory of past runs, by `speed_key`, kept in a small JSON file."""

    def __init__(self, path: Path | None):
        self.path = path
        self._data: dict[str, dict] = {}
        if path is not None and path.is_file():
            try:
                self._data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                self._data = {}  # a damaged history only costs the estimate

    def record(self, key: str, seconds_per_step: float, memory_mb: float | None, source: str) -> None:
        self._data[key] = {"seconds_per_step": seconds_per_step, "memory_mb": memory_mb, "source": source}
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._data, indent=1), encoding="utf-8")
            os.replace(tmp, self.path)

    def get(self, key: str) -> Estimate | None:
        item = self._data.get(key)
        if not item:
            return None
        return Estimate(float(item["seconds_per_step"]), item.get("memory_mb"), str(item.get("source", "")))


def state_seed(folder: Path) -> int | None:
    """The seed a saved state was trained with (None when the folder holds no readable state)."""
    try:
        return int(json.loads((Path(folder) / STATE_FILE).read_text(encoding="utf-8"))["seed"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _with_seed(cfg: TrainConfig) -> TrainConfig:
    """A fixed seed, so that the run can be resumed and its seed is known: the state's when resuming."""
    if cfg.run.seed is not None:
        return cfg
    seed = state_seed(cfg.run.resume) if cfg.run.resume is not None else None
    seed = seed if seed is not None else random.randint(0, MAX_SEED)
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=seed))


def _apply_event(run: _Run, e: ProgressEvent) -> None:
    """Fold one training event into the run's state (called with the manager's lock held)."""
    if e.total_steps:
        run.total_steps = e.total_steps
    if e.kind == "step":
        run.step, run.epoch, run.it_per_s, run.eta_s = e.step, e.epoch, e.it_per_s, e.eta_s
        run.losses.append((e.step, e.loss, e.smoothed))
        if e.lrs:
            run.lrs.append((e.step, next(iter(e.lrs.values()))))
        run.step_times.append(time.perf_counter())
        memory = _memory_mb()
        if memory is not None:
            run.peak_memory_mb = max(run.peak_memory_mb or 0.0, memory)
        return
    if e.kind == "start":
        run.step, run.epoch = e.step, e.epoch
        notes = e.data.get("notes") or []
        run.log.extend([f"[start] {e.message}", *(f"  note: {n}" for n in notes)])
        return
    if e.kind == "validation" and e.val_loss is not None:
        run.val_losses.append((e.step, e.val_loss))
    elif e.kind == "sample":
        run.samples.extend(e.paths)
    elif e.kind == "save":
        run.saves.extend(e.paths)
    elif e.kind == "rollback":
        final = e.message.startswith("stopping")
        run.guard.append(GuardMark(e.step, "stop" if final else "rollback", e.message))
    elif e.kind == "cache" and e.data.get("done") not in (None, e.data.get("total")):
        return  # one line per cache, not one per image
    text = e.message or ", ".join(e.paths)
    run.log.append(f"[{e.kind}] step {e.step}: {text}" if text else f"[{e.kind}] step {e.step}")


class RunManager:
    """A queue of training runs worked off by one thread in this process.

    Args:
        trainer: how the host trains one config (see `Trainer`).
        history: where speed figures are kept (None: in memory only).
        on_end: called (outside the lock) with the view of each run that ends, e.g. to rescan the LoRA folder.
    """

    def __init__(self, trainer: Trainer, *, history: Path | None = None,
                 on_end: Callable[[RunView], None] | None = None):
        self.trainer, self.on_end = trainer, on_end
        self.history = SpeedHistory(history)
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._runs: dict[int, _Run] = {}
        self._queue: deque[int] = deque()
        self._next_id = 1
        self._worker: threading.Thread | None = None
        self._closed = False

    # ------------------------------------------------------------------------------------------ submit

    def submit(self, cfg: TrainConfig, label: str = "", *, probe: bool = False) -> RunView:
        """Queue a run; it starts when the runs before it have ended. The seed is fixed here (drawn, or the
        resumed state's) so the run can be resumed exactly."""
        cfg = _with_seed(cfg)
        with self._lock:
            if self._closed:
                raise RuntimeError("the run manager is closed")
            run = _Run(self._next_id, label or cfg.output.output_name, cfg, probe=probe)
            self._next_id += 1
            self._runs[run.id] = run
            self._queue.append(run.id)
            ahead = len(self._queue) - 1 + (self.active() is not None)
            run.log.append(f"[queued] {ahead} run(s) ahead" if ahead else "[queued] starting")
            self._ensure_worker()
            self._wake.notify_all()
            return run.view()

    def resume(self, run_id: int) -> RunView:
        """Queue the continuation of a stopped run from the state it saved (same config and seed)."""
        with self._lock:
            run = self._get(run_id)
            view = run.view()
        if not view.resumable:
            raise ConfigError("resume", view.state_dir, f"run #{run_id} ({view.status}) left no resumable state")
        cfg = dataclasses.replace(run.cfg, run=dataclasses.replace(run.cfg.run, resume=Path(view.state_dir)))
        return self.submit(cfg, f"{run.label} (resumed)")

    def stop(self, run_id: int | None = None) -> RunView | None:
        """Stop a run: a queued one is cancelled; the running one stops after its current step and saves a
        resumable state. Without an id: the running run. Returns its view (None when there is nothing to stop)."""
        with self._lock:
            run = self._runs.get(run_id) if run_id is not None else self._active_run()
            if run is None or run.status in ENDED:
                return run.view() if run else None
            if run.status == "queued":
                self._queue.remove(run.id)
                run.status, run.ended_at = "cancelled", time.time()
                run.log.append("[cancelled] removed from the queue")
            else:
                run.status = "stopping"
                run.stop_event.set()
                run.log.append("[stop] stopping after the current step; a resumable state is saved")
            return run.view()

    # ------------------------------------------------------------------------------------------ read

    def runs(self, *, probes: bool = False) -> list[RunView]:
        """Every run, oldest first (warm-up measurements left out unless asked)."""
        with self._lock:
            return [r.view() for r in self._runs.values() if probes or not r.probe]

    def get(self, run_id: int) -> RunView:
        with self._lock:
            return self._get(run_id).view()

    def active(self) -> RunView | None:
        with self._lock:
            run = self._active_run()
            return run.view() if run else None

    def latest(self) -> RunView | None:
        """The run to show: the running one, else the newest that is not a warm-up."""
        with self._lock:
            run = self._active_run()
            if run is None:
                run = next((r for r in reversed(self._runs.values()) if not r.probe), None)
            return run.view() if run else None

    def wait(self, run_id: int, timeout: float | None = None) -> RunView:
        """Block until a run has ended (tests, the warm-up measurement)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._wake:
            while self._get(run_id).status not in ENDED:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"run #{run_id} still {self._get(run_id).status} after {timeout} s")
                self._wake.wait(left if left is not None else 1.0)
            return self._get(run_id).view()

    def close(self, timeout: float = 60.0) -> None:
        """Cancel the queue, stop the running run (it saves its state) and wait for the worker."""
        with self._lock:
            self._closed = True
            for run_id in list(self._queue):
                self.stop(run_id)
            self.stop()
            self._wake.notify_all()
            worker = self._worker
        if worker is not None:
            worker.join(timeout)

    def _get(self, run_id: int) -> _Run:
        if run_id not in self._runs:
            raise ConfigError("run", run_id, "no such run")
        return self._runs[run_id]

    def _active_run(self) -> _Run | None:
        return next((r for r in self._runs.values() if r.status in ("running", "stopping")), None)

    # ------------------------------------------------------------------------------------------ estimates

    def estimate(self, cfg: TrainConfig) -> Estimate | None:
        """Speed and memory from the last run (or warm-up) of this kind, if there was one."""
        return self.history.get(speed_key(cfg))

    def measure(self, cfg: TrainConfig, steps: int = 4, timeout: float = 600.0) -> Estimate:
        """Train `steps` steps of `cfg` into a temporary folder (queued like any run) and time the steps after the
        first. Raises ConfigError when the run is busy or the warm-up fails."""
        if self.active() is not None:
            raise ConfigError("measure", None,
                              "a run is training; the estimate would measure both (try again after it)")
        tmp = Path(tempfile.mkdtemp(prefix="lora-studio-warmup-"))
        try:
            probe = dataclasses.replace(
                cfg, sampling=SamplingConfig(), validation=ValidationConfig(), logging=LoggingConfig(log_with="none"),
                output=OutputConfig(output_dir=tmp, output_name="warmup"),
                run=dataclasses.replace(cfg.run, max_train_steps=steps + 1, max_train_epochs=None, resume=None,
                                        save_state=False, save_state_on_train_end=False))
            view = self.wait(self.submit(probe, "warm-up", probe=True).id, timeout)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if view.status != "finished":
            raise ConfigError("measure", None, f"the warm-up run {view.status}: {view.error or view.report}")
        estimate = self.history.get(speed_key(cfg))
        if estimate is None:
            raise ConfigError("measure", None, "the warm-up made too few steps to time")
        return estimate

    # ------------------------------------------------------------------------------------------ worker

    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="lora-studio-runs", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if not self._queue:
                    return
                run = self._runs[self._queue.popleft()]
                run.status, run.started_at = "running", time.time()
                run.base_memory_mb = _memory_mb()
            self._train(run)
            view = self._finish_record(run)
            if self.on_end is not None and not run.probe:
                try:
                    self.on_end(view)
                except Exception as exc:  # noqa: BLE001 - a UI refresh must not stop the queue
                    with self._lock:
                        run.log.append(f"[warning] after the run: {exc}")

    def _train(self, run: _Run) -> None:
        def listen(event: ProgressEvent) -> None:
            with self._lock:
                _apply_event(run, event)

        try:
            result = self.trainer(run.cfg, [listen], run.stop_event.is_set)
        except LibLoraError as exc:
            with self._lock:
                run.status, run.error = "failed", str(exc)
                run.log.append(f"[error] {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - report any failure in the run's log; the queue goes on
            with self._lock:
                run.status, run.error = "failed", f"{type(exc).__name__}: {exc}"
                run.log.extend(["[error] " + line for line in traceback.format_exc().splitlines()])
            return
        with self._lock:
            run.status = result.status
            run.report = result.report
            run.result_file = str(result.final_file) if result.final_file else None
            if result.status == "stopped" and result.final_file is not None:
                run.state_dir = str(result.final_file.with_name(f"{run.cfg.output.output_name}-state"))

    def _finish_record(self, run: _Run) -> RunView:
        with self._wake:
            run.ended_at = time.time()
            times = run.step_times[1:]  # the first step pays for warming up kernels and caches
            if len(times) >= 2 and run.status in ("finished", "stopped"):
                per_step = (times[-1] - times[0]) / (len(times) - 1)
                base = run.base_memory_mb
                memory = run.peak_memory_mb - base if run.peak_memory_mb is not None and base is not None else None
                when = time.strftime("%Y-%m-%d %H:%M")
                source = f"warm-up of {len(times) + 1} steps" if run.probe else f"run '{run.label}' ({when})"
                self.history.record(speed_key(run.cfg), per_step, memory if memory is None else max(memory, 0.0),
                                    source)
            self._wake.notify_all()
            return run.view()


def format_duration(seconds: float | None) -> str:
    """`1 h 02 min`, `3 min 05 s`, `12 s`; "?" when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"
