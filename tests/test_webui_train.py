"""`lib_lora.host.webui_train` with a stand-in adapter (the real A1111 run is in tests/host/a1111/): a run holds the
model (generation from other threads is refused with the run's step, the run's own thread may sample), the
adapter's note lands in the run's log, the host's progress report follows the run, the web UI's Interrupt stops
it, and bad API bodies are refused before anything is queued."""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import pytest

from lib_lora.errors import ConfigError
from lib_lora.host.webui_train import WebUITraining, progress_text
from lib_lora.train.events import ProgressEvent
from lib_lora.train.loop import TrainResult


class StandIn:
    """Trains nothing: emits steps until stopped, recording what the training object let it see."""

    def __init__(self, tmp: Path):
        self.tmp, self.interrupt = tmp, False
        self.stepping, self.release = threading.Event(), threading.Event()
        self.seen_from_run: list[str] = []
        self.progress: list[str | None] = []  # what the host's progress report was told
        self.training: WebUITraining | None = None

    @contextlib.contextmanager
    def exclusive_model(self):
        yield "merged LoRA weights taken off"

    def interrupt_requested(self) -> bool:
        return self.interrupt

    @contextlib.contextmanager
    def host_progress(self):
        self.progress.append("begin")
        try:
            yield lambda event: self.progress.append(progress_text(event))
        finally:
            self.progress.append("end")

    def train_loaded(self, cfg, listeners, should_stop) -> TrainResult:
        self.seen_from_run.append(self.training.blocks_generation())
        step = 0
        while not should_stop():
            step += 1
            for listen in listeners:
                listen(ProgressEvent("step", step=step, total_steps=100, loss=0.1))
            self.stepping.set()
            self.release.wait(0.01)
        return TrainResult("stopped", step, None)

    def train_defaults(self) -> dict:
        return {"output_dir": str(self.tmp / "out")}

    def refresh_loras(self) -> None:
        pass

    def settings_dir(self) -> Path:
        return self.tmp / "settings"


@pytest.fixture
def training(tmp_path):
    adapter = StandIn(tmp_path)
    adapter.training = WebUITraining(adapter)
    (tmp_path / "data" / "1_sks").mkdir(parents=True)
    yield adapter.training
    adapter.training.runs().close()


def test_a_run_holds_the_model_and_the_interrupt_stops_it(training, tmp_path):
    assert training.blocks_generation() == ""
    started = training.start({"options": {"train_data_dir": str(tmp_path / "data"), "output_name": "x"}})["run"]
    adapter = training.adapter
    assert adapter.stepping.wait(30)
    message = training.blocks_generation()
    assert "LoRA Studio is training on the loaded model" in message and f"run #{started['id']}" in message
    assert adapter.seen_from_run == [""]  # the run's own thread may generate (its sample images)
    adapter.interrupt = True
    view = training.runs().wait(started["id"], timeout=30)
    assert view.status == "stopped" and training.blocks_generation() == ""
    log = "\n".join(view.log)
    assert "merged LoRA weights taken off" in log and "Interrupt was pressed" in log
    assert training.status(started["id"])["run"]["status"] == "stopped"
    # the host's progress report followed the run from its first step to its end
    assert adapter.progress[0] == "begin" and adapter.progress[-1] == "end"
    assert "LoRA Studio training: step 1/100, epoch 0" in adapter.progress


def test_bad_bodies_are_refused_before_anything_is_queued(training):
    with pytest.raises(ConfigError, match="options"):
        training.start({"options": "max_train_steps=5"})
    with pytest.raises(ConfigError, match="body"):
        training.start(["options"])
    with pytest.raises(ConfigError, match="resume_run"):
        training.start({"resume_run": "last"})
    with pytest.raises(ConfigError, match="learning_rate"):
        training.start({"options": {"learning_rate": "fast"}})
    assert training.runs().runs() == [] and training.stop() == {"run": None}
