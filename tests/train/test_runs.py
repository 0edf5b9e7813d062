"""The run manager: runs queue and never overlap, stop saves a resumable state and resume continues with the same
seed, a failing run is reported and the queue goes on, events become the live state the UI shows, speed figures
are remembered. A scripted trainer stands in for the engine here (the real engine runs in tests/test_ui_train.py).
"""
from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import pytest

from lib_lora.errors import ConfigError
from lib_lora.train.checkpoint import STATE_FILE
from lib_lora.train.events import ProgressEvent
from lib_lora.train.loop import TrainResult
from lib_lora.train.runs import RunManager, format_duration, speed_key
from lib_lora.train.toml_config import load_config
from tests.train.fixtures import write_images, write_run


class ScriptedTrainer:
    """Emits step events like the loop, honours should_stop, writes a state folder when stopped."""

    def __init__(self, step_seconds: float = 0.01, fail_on: str | None = None):
        self.step_seconds, self.fail_on = step_seconds, fail_on
        self.running = 0
        self.overlapped = False
        self.calls: list = []
        self.gate = threading.Event()
        self.gate.set()
        self.lock = threading.Lock()

    def __call__(self, cfg, listeners, should_stop):
        with self.lock:
            self.running += 1
            self.overlapped |= self.running > 1
        self.calls.append(cfg)
        try:
            self.gate.wait(10)
            if cfg.output.output_name == self.fail_on:
                raise ConfigError("learning_rate", -1, "must be >= 0")
            return self._run(cfg, listeners, should_stop)
        finally:
            with self.lock:
                self.running -= 1

    def _run(self, cfg, listeners, should_stop):
        def emit(e):
            for listener in listeners:
                listener(e)

        total = cfg.run.max_train_steps
        start = 0 if cfg.run.resume is None else json.loads((cfg.run.resume / STATE_FILE).read_text())["step"]
        emit(ProgressEvent("start", step=start, total_steps=total, message=f"seed {cfg.run.seed}"))
        status, step = "finished", start
        for step in range(start + 1, total + 1):
            self.gate.wait(10)
            time.sleep(self.step_seconds)
            emit(ProgressEvent("step", step=step, total_steps=total, epoch=1, loss=1.0 / step, smoothed=1.0,
                               lrs={"unet": 1e-4}, it_per_s=100.0, eta_s=0.1))
            if step == 2:
                emit(ProgressEvent("rollback", step=2, total_steps=total, message="divergence: spike; rolled back"))
                emit(ProgressEvent("sample", step=2, total_steps=total, paths=("s.png",)))
            if should_stop():
                status = "stopped"
                break
        out = Path(cfg.output.output_dir)
        final = out / f"{cfg.output.output_name}.safetensors"
        out.mkdir(parents=True, exist_ok=True)
        final.write_bytes(b"x")
        if status == "stopped":
            state = out / f"{cfg.output.output_name}-state"
            state.mkdir(exist_ok=True)
            (state / STATE_FILE).write_text(json.dumps({"step": step, "seed": cfg.run.seed}))
        emit(ProgressEvent("stopped" if status == "stopped" else "done", step=step, total_steps=total,
                           paths=(str(final),), message=f"{status} at {step}"))
        return TrainResult(status, step, final, [final], f"{status} at {step}")


@pytest.fixture
def cfg(tmp_path):
    write_images(tmp_path / "train" / "2_sks", n=2, size=64)
    return load_config(write_run(tmp_path, resolution=64, max_train_steps=20, seed=None))


def test_two_runs_started_at_once_are_queued_not_run_together(cfg, tmp_path):
    trainer = ScriptedTrainer()
    ended = []
    manager = RunManager(trainer, history=tmp_path / "speed.json", on_end=ended.append)
    first = manager.submit(cfg, "first")
    second = manager.submit(dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, output_name="b")))
    assert second.status == "queued" and "1 run(s) ahead" in second.log[-1]
    done = manager.wait(second.id, timeout=30)
    assert manager.get(first.id).status == "finished" and done.status == "finished"
    assert not trainer.overlapped
    assert manager.get(first.id).started_at <= manager.get(first.id).ended_at <= done.started_at
    assert [v.id for v in ended] == [first.id, second.id]
    view = manager.get(first.id)
    assert view.step == view.total_steps == 20 and len(view.losses) == 20 and view.lrs[0] == (1, 1e-4)
    assert view.guard[0].kind == "rollback" and view.samples == ("s.png",) and view.seed is not None
    assert view.result_file.endswith("tiny.safetensors")
    estimate = manager.estimate(cfg)
    assert estimate is not None and estimate.seconds_per_step > 0 and "run 'b'" in estimate.source
    assert RunManager(trainer, history=tmp_path / "speed.json").estimate(cfg) == estimate  # kept on disk
    manager.close()


def test_stop_saves_a_state_and_resume_continues_with_the_same_seed(cfg):
    trainer = ScriptedTrainer(step_seconds=0.02)
    manager = RunManager(trainer)
    run = manager.submit(cfg)
    deadline = time.monotonic() + 30
    while manager.get(run.id).step < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert manager.stop().status == "stopping"
    stopped = manager.wait(run.id, timeout=30)
    assert stopped.status == "stopped" and stopped.resumable and stopped.step < 20
    resumed = manager.wait(manager.resume(run.id).id, timeout=30)
    assert resumed.status == "finished" and resumed.step == 20
    assert trainer.calls[1].run.resume == Path(stopped.state_dir)
    assert trainer.calls[1].run.seed == trainer.calls[0].run.seed == stopped.seed
    with pytest.raises(ConfigError, match="no resumable state"):
        manager.resume(resumed.id)
    manager.close()


def test_a_queued_run_can_be_cancelled_and_a_failing_run_does_not_stop_the_queue(cfg):
    trainer = ScriptedTrainer(fail_on="bad")
    trainer.gate.clear()  # hold the first run at its first step
    manager = RunManager(trainer)
    first = manager.submit(dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, output_name="bad")))
    queued = manager.submit(cfg, "to cancel")
    last = manager.submit(cfg, "last")
    assert manager.stop(queued.id).status == "cancelled"
    trainer.gate.set()
    failed = manager.wait(first.id, timeout=30)
    assert failed.status == "failed" and "learning_rate=-1" in failed.error
    assert manager.wait(last.id, timeout=30).status == "finished"
    assert len(trainer.calls) == 2  # the cancelled run never started
    assert [v.label for v in manager.runs()] == ["bad", "to cancel", "last"]
    manager.close()


def test_speed_key_and_durations(cfg):
    assert speed_key(cfg).startswith("embedded|64x64|bs2x1|lora4|gc0|no")
    assert [format_duration(s) for s in (None, 12.4, 185, 3725)] == ["?", "12 s", "3 min 05 s", "1 h 02 min"]
