"""Training inside the web UI, on the model it has loaded (A1111's `shared.sd_model`; Forge brings its own forward).

One `WebUITraining` per web-UI process owns the run queue (`RunManager`), so the tab, the API routes and a reloaded
page all see the same runs. A run holds the model exclusively: the adapter's `exclusive_model()` waits for the
generation in progress, removes the web UI's LoRA patches and marks the model busy (its generate is refused with a
message while the run lasts); everything the run changed on the model (frozen flags, hooked layers, LDM checkpoint
routing) is given back when it ends, however it ends, so a txt2img with the same seed is bit-identical afterwards.

Nothing here imports the web UI: the adapter hands over the model and the host's pieces.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from lib_lora.errors import ConfigError
from lib_lora.host.base import HostResult, ModelInfo
from lib_lora.sd.pipeline import GenerationParams
from lib_lora.train.config import TrainConfig
from lib_lora.train.events import Listener, ProgressEvent
from lib_lora.train.loop import TrainResult
from lib_lora.train.metadata import ModelFacts
from lib_lora.train.runs import RunManager, RunView
from lib_lora.train.session import SampleFn


class TrainingAdapter(Protocol):
    """What `WebUITraining` needs from a web-UI adapter."""

    def exclusive_model(self) -> contextlib.AbstractContextManager[str]:
        """Hold the model for a run; yields a note for the run's log about what was taken off the model."""

    def train_loaded(self, cfg: TrainConfig, listeners: Sequence[Listener],
                     should_stop: Callable[[], bool]) -> TrainResult: ...

    def interrupt_requested(self) -> bool: ...

    def host_progress(self) -> contextlib.AbstractContextManager[Listener]:
        """The host's own progress report (A1111's `shared.state`) for the run's length; yields its listener."""

    def train_defaults(self) -> dict[str, Any]: ...

    def refresh_loras(self) -> None: ...

    def settings_dir(self) -> Path: ...


def train_ldm(model: Any, cfg: TrainConfig, facts: ModelFacts, listeners: Sequence[Listener],
              should_stop: Callable[[], bool], sample_fn: SampleFn | None = None) -> TrainResult:
    """Train `cfg` on an LDM-shaped model in place (hooked network, frozen base weights), through the model's own
    modules, device, dtype and attention; the model is given back unchanged however the run ends."""
    from lib_lora.train import loop, session
    from lib_lora.train.distributed import DistContext
    from lib_lora.train.families.ldm_family import LdmFamily

    family = LdmFamily(model)
    try:
        s = session.prepare(cfg, family, facts, listeners=listeners, should_stop=should_stop, sample_fn=sample_fn,
                            dist=DistContext.detect(family.device))
        return loop.run(s)
    finally:
        family.close()


def checkpoint_facts(model: Any, info: ModelInfo) -> ModelFacts:
    """What the run's metadata says of the web UI's loaded checkpoint (`sd_checkpoint_info`: file name, the web UI's
    legacy hash, its sha256 when the web UI has computed it)."""
    checkpoint = model.sd_checkpoint_info
    return ModelFacts(info.arch, getattr(model, "parameterization", "eps") == "v", Path(checkpoint.filename).name,
                      legacy_hash=getattr(checkpoint, "hash", "") or "",
                      sha256=getattr(checkpoint, "sha256", "") or "", resolution=info.resolution)


def webui_sampler(generate: Callable[[GenerationParams], HostResult], folder: Path, output_name: str,
                  default_sampler: str) -> SampleFn:
    """A run's sample images drawn by the web UI's own txt2img (`generate`), saved as the standalone run saves them."""
    from lib_lora.sd.pipeline import save_png
    from lib_lora.train.sample_prompts import map_sampler

    def sample(prompts, step: int, epoch: int) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, sp in enumerate(prompts):
            params = GenerationParams(prompt=sp.prompt, negative_prompt=sp.negative_prompt,
                                      sampler=sp.sampler or map_sampler(default_sampler), steps=sp.steps,
                                      cfg_scale=sp.cfg_scale, seed=sp.seed if sp.seed is not None else 1000 + i,
                                      width=sp.width or 0, height=sp.height or 0)
            result = generate(params)
            if not result.images:  # the web UI's Interrupt: the run stops after this step
                break
            path = folder / f"{output_name}_{step:06d}_{i:02d}_{result.seeds[0]}.png"
            save_png(result.images[0], path, result.infotexts[0])
            paths.append(path)
        return paths

    return sample


def progress_text(event: ProgressEvent) -> str | None:
    """One line for a host's progress report ("LoRA Studio training: step 12/400, loss 0.1234"); None for events
    that do not move the progress."""
    if event.kind == "cache":
        return f"LoRA Studio training: caching, {event.message}"
    if event.kind in ("start", "step", "epoch", "sample", "validation"):
        loss = f", loss {event.smoothed:.4f}" if event.smoothed is not None else ""
        return f"LoRA Studio training: step {event.step}/{event.total_steps}, epoch {event.epoch}{loss}"
    return None


def view_json(view: RunView | None) -> dict | None:
    """A run as the API answers it."""
    if view is None:
        return None
    return {"id": view.id, "label": view.label, "status": view.status, "step": view.step,
            "total_steps": view.total_steps, "epoch": view.epoch, "loss": view.losses[-1][1] if view.losses else None,
            "output_name": view.output_name, "output_dir": view.output_dir, "result_file": view.result_file,
            "state_dir": view.state_dir, "resumable": view.resumable, "report": view.report, "error": view.error,
            "seed": view.seed, "saves": list(view.saves), "samples": list(view.samples), "log": list(view.log[-40:]),
            "peak_memory_mb": view.peak_memory_mb}


class WebUITraining:
    """The web UI's training queue and its API operations (`/lora-studio/v1/train`)."""

    def __init__(self, adapter: TrainingAdapter):
        self.adapter = adapter
        self._runs: RunManager | None = None
        self._lock = threading.Lock()
        self._busy = threading.Event()
        self._owner: int | None = None  # the thread of the run holding the model
        self._interrupt_noted = False

    def runs(self) -> RunManager:
        with self._lock:
            if self._runs is None:
                self._runs = RunManager(self._train, history=Path(self.adapter.settings_dir()) / "speed.json",
                                        on_end=lambda view: self.adapter.refresh_loras())
            return self._runs

    def _train(self, cfg: TrainConfig, listeners: Sequence[Listener], should_stop: Callable[[], bool]) -> TrainResult:
        # Busy first, then wait for the model: a generation that starts meanwhile is refused, the one in
        # progress finishes before the run touches the model.
        self._owner = threading.get_ident()
        self._interrupt_noted = False
        self._busy.set()
        try:
            with self.adapter.exclusive_model() as note, self.adapter.host_progress() as host_listener:
                listeners = [*listeners, host_listener]
                if note:
                    for listen in listeners:
                        listen(ProgressEvent("warning", message=note))
                return self.adapter.train_loaded(cfg, listeners, lambda: should_stop() or self._interrupted(listeners))
        finally:
            self._busy.clear()
            self._owner = None

    def _interrupted(self, listeners: Sequence[Listener]) -> bool:
        """The web UI's own Interrupt button stops the run too (said once in the run's log)."""
        if not self.adapter.interrupt_requested():
            return False
        if not self._interrupt_noted:
            self._interrupt_noted = True
            note = ProgressEvent("warning", message="the web UI's Interrupt was pressed: stopping after this step")
            for listen in listeners:
                listen(note)
        return True

    def blocks_generation(self) -> str:
        """Why a generation must not run now ("" when it may): a run holds the model. The run's own sample images
        (its thread) are allowed."""
        if not self._busy.is_set() or self._owner == threading.get_ident():
            return ""
        view = self.runs().active()
        where = f"run #{view.id} '{view.label}', step {view.step}/{view.total_steps}" if view else "a run"
        return (f"LoRA Studio is training on the loaded model ({where}); generation is refused until the run ends. "
                "Stop it in the LoRA Studio tab (Training, Stop) to generate now.")

    # ------------------------------------------------------------------------------------ API operations

    def config(self, options: Any) -> TrainConfig:
        """The run's config: the host's defaults (its model, its LoRA folder), then the given sd-scripts options."""
        from lib_lora.train.schema import config_from_form, default_values

        if not isinstance(options, dict):
            raise ConfigError("options", type(options).__name__, "must be a JSON object of sd-scripts options")
        return config_from_form({**default_values(), **self.adapter.train_defaults(), **options})

    def start(self, body: Any) -> dict:
        """Queue a run from {"options": {...}}, or continue a stopped one from {"resume_run": ID}."""
        if not isinstance(body, dict):
            raise ConfigError("body", type(body).__name__, "must be a JSON object")
        if body.get("resume_run") is not None:
            run_id = body["resume_run"]
            if not isinstance(run_id, int) or isinstance(run_id, bool):
                raise ConfigError("resume_run", run_id, "must be the id of a stopped run (an integer)")
            return {"run": view_json(self.runs().resume(run_id))}
        return {"run": view_json(self.runs().submit(self.config(body.get("options"))))}

    def status(self, run_id: int | None = None) -> dict:
        manager = self.runs()
        view = manager.get(run_id) if run_id is not None else manager.latest()
        return {"run": view_json(view), "busy": self._busy.is_set(),
                "runs": [{"id": v.id, "label": v.label, "status": v.status} for v in manager.runs()]}

    def stop(self) -> dict:
        return {"run": view_json(self.runs().stop())}
