"""The `Host` protocol inside the web UI (A1111 and Forge), for the tabs of `lib_lora.ui`.

Host-specific work is the adapter's (`a1111.A1111Adapter`, `forge.ForgeAdapter`): this class only turns the
protocol's calls into the adapter's and keeps what the tabs need between calls (the LoRA library). The model is
the one the web UI has loaded; switching checkpoints is the web UI's own business (its checkpoint list).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lib_lora import blocks
from lib_lora.errors import ConfigError, FileFormatError, LibLoraError
from lib_lora.host.base import HostResult, ModelInfo, ProgressFn, StopFn
from lib_lora.lora_library import LoraLibrary
from lib_lora.sd.pipeline import GenerationParams

if TYPE_CHECKING:
    from lib_lora.train.runs import RunManager


class WebUIHost:
    """`Host` over the web UI's loaded model, LoRA folder, generation and outputs."""

    lora_list_hint = "the web UI's Lora tab (it is listed already)"

    def __init__(self, adapter: Any):
        self.adapter = adapter
        self._library: LoraLibrary | None = None
        self._step_time: tuple[float, int] | None = None  # (seconds per step, pixels) of the last generation

    def model_info(self) -> ModelInfo | None:
        return self.adapter.model_info()

    def model_error(self) -> str:
        return "" if self.model_info() is not None else "the web UI has no model loaded yet"

    def load_model(self, source: str) -> ModelInfo:
        raise ConfigError("model", source, "inside the web UI, pick the checkpoint in the web UI's own "
                                           "Stable Diffusion checkpoint list")

    def lora_library(self) -> LoraLibrary:
        folder = self.adapter.lora_dir()
        if self._library is None or self._library.folder != Path(folder):
            self._library = LoraLibrary(folder)
        return self._library

    def block_presets(self) -> Mapping[str, str]:
        info = self.model_info()
        builtin = blocks.builtin_presets(info.arch) if info else {}
        return {**builtin, **self.adapter.user_presets()}

    def generate(self, params: GenerationParams, progress: ProgressFn | None = None,
                 should_stop: StopFn | None = None) -> HostResult:
        """txt2img through the web UI's own processing (its samplers, its LoRA, our block hook), saved where
        the web UI saves txt2img images."""
        params.validate()
        refused = self.adapter.generation_refused()
        if refused:
            raise LibLoraError(refused)
        if self.model_info() is None:
            raise FileFormatError("model", self.model_error())
        return self.adapter.txt2img(params)

    def interrupt(self) -> None:
        self.adapter.interrupt()

    def interrupted(self) -> bool:
        return self.adapter.interrupted()

    def outputs_dir(self) -> Path:
        return self.adapter.outputs_dir()

    def samplers(self) -> list[str]:
        return self.adapter.samplers()

    # ------------------------------------------------------------------------------------ X/Y plots

    def generate_series(self, requests: Sequence[GenerationParams], progress: ProgressFn | None = None,
                        should_stop: StopFn | None = None) -> Iterator[HostResult]:
        """One txt2img per request: the web UI's LoRA keeps its merged weights while the set of networks stays the
        same, so only what changes is re-applied; it restores them itself when the next prompt differs."""
        for params in requests:
            if should_stop is not None and should_stop():
                return
            started = time.perf_counter()
            result = self.generate(params)
            self._step_time = ((time.perf_counter() - started) / max(1, params.steps * params.batch_size),
                               (params.width or 512) * (params.height or 512))
            yield result

    def seconds_per_step(self, params: GenerationParams) -> float:
        if self._step_time is None:
            probe = replace(params, prompt="", negative_prompt="", steps=3, batch_size=1, seed=0)
            started = time.perf_counter()
            self.generate(probe)
            self._step_time = ((time.perf_counter() - started) / 3, (probe.width or 512) * (probe.height or 512))
        seconds, pixels = self._step_time
        return seconds * (params.width or 512) * (params.height or 512) / max(1, pixels)

    # ------------------------------------------------------------------------------------ training

    def training(self) -> RunManager:
        return self.adapter.training().runs()

    def train_defaults(self) -> dict[str, Any]:
        return self.adapter.train_defaults()

    def settings_dir(self) -> Path:
        return self.adapter.settings_dir()

    # ------------------------------------------------------------------------------------ LoRA tools

    def lora_info(self, name: str):
        from lib_lora.info import describe

        return describe(self.lora_library().find(name).path)

    def edit_lora_metadata(self, name: str, changes: Mapping[str, str | None]):
        from lib_lora.io.metadata_edit import edit_metadata

        edit_metadata(self.lora_library().find(name).path, changes)
        self.refresh()
        return self.lora_info(name)

    def checkpoints(self) -> list[str]:
        return self.adapter.checkpoints()

    def run_operation(self, operation: Callable[..., Any], request: Any, progress: Callable[[int, int, str], None]
                      | None = None, should_stop: StopFn | None = None) -> Any:
        # File to file: the loaded model is not touched, so the web UI goes on generating meanwhile.
        try:
            return operation(request, progress=progress, should_stop=should_stop)
        finally:
            self.refresh()

    def refresh(self) -> None:
        """Rescan the LoRA folder: ours, and the web UI's list (its LoRA tab, /sdapi/v1/loras)."""
        self.adapter.refresh_loras()
