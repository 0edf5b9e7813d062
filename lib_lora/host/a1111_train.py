"""Training inside AUTOMATIC1111 1.10: the `TrainingAdapter` half of `A1111Adapter` (a1111.py), which mixes this in.

The run takes the web UI's model for itself (`exclusive_model`: its queue lock, the built-in LoRA's merged weights
put back), trains `shared.sd_model` in place through `webui_train`, follows in the web UI's progress report
(`host_progress`) and samples through the web UI's txt2img. Like a1111.py and forge.py, this module imports the web
UI (`modules.*`), so it is imported only inside it.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

from modules import shared

from lib_lora.errors import LibLoraError

TRAIN_JOB = "LoRA Studio training"


def builtin_networks() -> Any:
    """The built-in LoRA extension's `networks` module (importable once its script has loaded)."""
    module = sys.modules.get("networks")
    if module is None:
        import networks as module  # noqa: PLC0415 - on sys.path only inside the web UI
    return module


def forget_conditioning() -> None:
    """Empty the web UI's prompt-conditioning caches: their key (prompt, steps, checkpoint, LoRA tags) does not
    see a text encoder that a run trains, so a cond from before or during a run would be reused after it."""
    from modules import processing

    for cache in (processing.StableDiffusionProcessing.cached_c, processing.StableDiffusionProcessing.cached_uc,
                  processing.StableDiffusionProcessingTxt2Img.cached_hr_c,
                  processing.StableDiffusionProcessingTxt2Img.cached_hr_uc):
        cache[0] = cache[1] = None


class A1111Training:
    """Training on the web UI's loaded model; the adapter supplies `model_info`, `sd_model`, `output_dir`, `txt2img`
    and `_hook`."""

    _training = None

    def training(self):
        """The training queue of this web-UI process (`webui_train.WebUITraining`)."""
        if self._training is None:
            from lib_lora.host.webui_train import WebUITraining

            self._training = WebUITraining(self)
        return self._training

    def train_defaults(self) -> dict[str, Any]:
        info = self.model_info()
        return {"pretrained_model_name_or_path": info.source if info else "", "output_dir": str(self.output_dir()),
                "resolution": str(info.resolution if info else 512)}

    @contextlib.contextmanager
    def exclusive_model(self):
        """Wait for the generation in progress (the web UI's queue lock; later ones are refused by
        `before_process`), then take the built-in LoRA's merged weights off the model."""
        from modules import call_queue

        with call_queue.queue_lock:
            removed = self.remove_lora_patches()
            forget_conditioning()
            shared.state.interrupted = False  # from here on, the Interrupt button stops the run
        try:
            yield removed
        finally:
            forget_conditioning()

    def remove_lora_patches(self) -> str:
        """Put back the weights the built-in LoRA merged (from its own backups) and forget them, so the next
        generation with a LoRA merges afresh. Returns what was done, for the run's log ("" when nothing was)."""
        import torch

        networks = builtin_networks()
        names = [net.name for net in networks.loaded_networks]
        restored = 0
        with torch.no_grad():
            for module in self.sd_model().modules():
                if getattr(module, "network_weights_backup", None) is not None:
                    networks.network_restore_weights_from_backup(module)
                    restored += 1
                if hasattr(module, "network_current_names"):
                    networks.network_reset_cached_weight(module)
        networks.loaded_networks.clear()
        self._hook = None
        if not restored:
            return ""
        return (f"the web UI's LoRA weights ({', '.join(names) or 'last used'}) were taken off {restored} layers of "
                "the model before training")

    @contextlib.contextmanager
    def host_progress(self):
        """The run in the web UI's progress report (`shared.state`, /sdapi/v1/progress): job, step of steps, the
        ETA from the run's start and a line with the loss. A sample image's txt2img starts and ends its own job in
        between; the next step puts the run's figures back."""
        from lib_lora.host.webui_train import progress_text

        state = shared.state
        state.begin(job=TRAIN_JOB)
        started = state.time_start

        def listen(event) -> None:
            text = progress_text(event)
            if text is None:
                return
            state.job, state.job_count, state.job_no, state.time_start = TRAIN_JOB, 1, 0, started
            state.sampling_steps, state.sampling_step = max(event.total_steps, 1), event.step
            state.textinfo = text

        try:
            yield listen
        finally:
            state.textinfo = None
            state.end()

    def interrupt_requested(self) -> bool:
        """The web UI's Interrupt button (or /sdapi/v1/interrupt) was pressed."""
        return bool(shared.state.interrupted)

    def train_loaded(self, cfg, listeners, should_stop):
        """Train `cfg` on `shared.sd_model` in place, through the web UI's own modules and attention."""
        from lib_lora.host.webui_train import train_ldm

        if self.model_info() is None:
            raise LibLoraError("the web UI has no model loaded yet: generate once or pick a checkpoint")
        folder = Path(cfg.output.output_dir or self.output_dir()) / "sample"
        return train_ldm(self.sd_model(), cfg, self.model_facts(), listeners, should_stop,
                         self.sample_fn(folder, cfg.output.output_name, cfg.sampling.sample_sampler))

    def model_facts(self):
        from lib_lora.host.webui_train import checkpoint_facts

        return checkpoint_facts(self.sd_model(), self.model_info())

    def sample_fn(self, folder: Path, output_name: str, default_sampler: str):
        """Sample images through the web UI's txt2img while the network is attached (hooked) to its model; the
        cond caches are emptied first, since the text encoder changes from step to step."""
        from lib_lora.host.webui_train import webui_sampler

        def generate(params):
            forget_conditioning()
            return self.txt2img(params, save=False)

        return webui_sampler(generate, folder, output_name, default_sampler)
