"""A `Host` that records what the UI asks and makes no model calls: flat images for generations, a scripted trainer
that emits the loop's events and writes a small real LoRA file. The LoRA folder, metadata viewer/editor, run
manager, X/Y plans and grids are the real core ones.

Imports nothing beyond the core's own needs (torch, safetensors, numpy, PIL), so the same host drives the tabs in
the web UIs' venvs (gradio 3.41 / 4.40) from `tests/host_ui_check.py`.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from lib_lora import blocks
from lib_lora.host.base import HostResult, ModelInfo
from lib_lora.lora_library import LoraLibrary
from lib_lora.train.checkpoint import STATE_FILE
from lib_lora.train.events import ProgressEvent
from lib_lora.train.loop import TrainResult
from lib_lora.types import Arch


def write_small_lora(path: Path, seed: int = 0, metadata: dict | None = None) -> Path:
    """A real LoRA file (two U-Net attention modules, two text-encoder modules) with sd-scripts-like metadata."""
    import torch

    from lib_lora.io import save_file

    g = torch.Generator().manual_seed(seed)
    names = ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
             "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k",
             "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
             "lora_te_text_model_encoder_layers_0_self_attn_v_proj"]
    tensors = {}
    for name in names:
        tensors[f"{name}.lora_down.weight"] = torch.randn(2, 32, generator=g) * 0.01
        tensors[f"{name}.lora_up.weight"] = torch.randn(32, 2, generator=g) * 0.01
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
    meta = {"ss_output_name": path.stem, "ss_network_module": "networks.lora", "ss_network_dim": "2",
            "ss_base_model_version": "sd_v1", "ss_tag_frequency": json.dumps({"5_sks": {"sks": 5, "red": 2}})}
    meta.update(metadata or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, meta)
    return path


class ScriptedTrainer:
    """Emits step events like the loop (a rollback at step 2, a sample when asked), honours should_stop and
    writes a state folder when stopped; writes a small LoRA file at the end. Never two at a time (checked)."""

    def __init__(self, step_seconds: float = 0.01):
        self.step_seconds = step_seconds
        self.calls: list = []
        self.gate = threading.Event()
        self.gate.set()
        self.running = 0
        self.overlapped = False
        self._lock = threading.Lock()

    def __call__(self, cfg, listeners, should_stop):
        with self._lock:
            self.running += 1
            self.overlapped |= self.running > 1
        self.calls.append(cfg)
        try:
            return self._run(cfg, listeners, should_stop)
        finally:
            with self._lock:
                self.running -= 1

    def _run(self, cfg, listeners, should_stop):
        def emit(event):
            for listener in listeners:
                listener(event)

        total = cfg.run.max_train_steps
        start = 0
        if cfg.run.resume is not None:
            start = json.loads((Path(cfg.run.resume) / STATE_FILE).read_text())["step"]
        emit(ProgressEvent("start", step=start, total_steps=total, message=f"training, seed {cfg.run.seed}"))
        status, step = "finished", start
        out = Path(cfg.output.output_dir)
        for step in range(start + 1, total + 1):
            self.gate.wait(30)
            time.sleep(self.step_seconds)
            emit(ProgressEvent("step", step=step, total_steps=total, epoch=1, loss=0.5 / step, smoothed=0.4,
                               lrs={"unet": 1e-4}, it_per_s=50.0, eta_s=(total - step) / 50))
            if step == 2:
                emit(ProgressEvent("rollback", step=2, total_steps=total, message="divergence: spike; rolled back"))
                from PIL import Image

                sample = out / "sample" / f"{cfg.output.output_name}_{step:06d}.png"
                sample.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (64, 64), (200, 150, 190)).save(sample)
                emit(ProgressEvent("sample", step=2, total_steps=total, paths=(str(sample),)))
            if should_stop():
                status = "stopped"
                break
        final = write_small_lora(out / f"{cfg.output.output_name}.safetensors", seed=step)
        if status == "stopped":
            state = out / f"{cfg.output.output_name}-state"
            state.mkdir(exist_ok=True)
            (state / STATE_FILE).write_text(json.dumps({"step": step, "seed": cfg.run.seed}))
        emit(ProgressEvent("done" if status == "finished" else "stopped", step=step, total_steps=total,
                           paths=(str(final),), message=f"{status} at step {step}"))
        return TrainResult(status, step, final, [final], f"{status} at step {step}. Output: {final}")


class FakeHost:
    """Records requests; its model is whatever arch the test says."""

    lora_list_hint = "the Generate tab's LoRA browser (Refresh)"

    def __init__(self, arch: Arch, lora_dir: Path, outputs: Path, trainer: ScriptedTrainer | None = None):
        self.arch, self.requests, self.stopped = arch, [], False
        self.library, self.outputs = LoraLibrary(lora_dir), Path(outputs)
        self.trainer = trainer or ScriptedTrainer()
        self._runs = None

    def model_info(self):
        return ModelInfo(self.arch, "fake", "abc", "fake.safetensors", 1024 if self.arch is Arch.SDXL else 512)

    def model_error(self):
        return ""

    def load_model(self, source):
        return self.model_info()

    def lora_library(self):
        return self.library

    def block_presets(self):
        return {**blocks.builtin_presets(self.arch), "MINE": "1,0,0,0,0,0,0,0,0,0,0,1"}

    def generate(self, params, progress=None, should_stop=None):
        from PIL import Image

        self.requests.append(params)
        if progress:
            progress(1, params.steps)
        shade = len(self.requests) * 20 % 256
        image = Image.new("RGB", (64, 64), (shade, 100, 200))
        return HostResult([image], [f"{params.prompt}\nSteps: {params.steps}, Seed: {params.seed}"], [params.seed], [])

    def generate_series(self, requests, progress=None, should_stop=None):
        for params in requests:
            if should_stop is not None and should_stop():
                return
            yield self.generate(params, progress=progress)

    def seconds_per_step(self, params):
        return 0.01

    def interrupt(self):
        self.stopped = True

    def interrupted(self):
        return self.stopped

    def outputs_dir(self):
        return self.outputs

    def samplers(self):
        return ["Euler a", "Euler", "DDIM"]

    def training(self):
        from lib_lora.train.runs import RunManager

        if self._runs is None:
            self._runs = RunManager(self.trainer, history=self.settings_dir() / "speed.json",
                                    on_end=lambda view: self.library.refresh())
        return self._runs

    def train_defaults(self):
        return {"pretrained_model_name_or_path": "embedded", "output_dir": str(self.library.folder),
                "resolution": "64"}

    def settings_dir(self):
        return self.outputs / ".lora-studio"

    def lora_info(self, name):
        from lib_lora.info import describe

        return describe(self.library.find(name).path)

    def edit_lora_metadata(self, name, changes):
        from lib_lora.io.metadata_edit import edit_metadata

        edit_metadata(self.library.find(name).path, changes)
        self.library.refresh()
        return self.lora_info(name)

    def checkpoints(self):
        return ["embedded"]

    def run_operation(self, operation, request, progress=None, should_stop=None):
        try:
            return operation(request, progress=progress, should_stop=should_stop)
        finally:
            self.library.refresh()
