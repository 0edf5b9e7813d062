"""The `Host` protocol inside the web UI (A1111 and Forge), for the tabs of `lib_lora.ui`.

Host-specific work is the adapter's (`a1111.A1111Adapter`, `forge.ForgeAdapter`): this class only turns the
protocol's calls into the adapter's and keeps what the tabs need between calls (the LoRA library). The model is
the one the web UI has loaded; switching checkpoints is the web UI's own business (its checkpoint list).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lib_lora import blocks
from lib_lora.errors import ConfigError, FileFormatError
from lib_lora.host.base import HostResult, ModelInfo, ProgressFn, StopFn
from lib_lora.lora_library import LoraLibrary
from lib_lora.sd.pipeline import GenerationParams


class WebUIHost:
    """`Host` over the web UI's loaded model, LoRA folder, generation and outputs."""

    def __init__(self, adapter: Any):
        self.adapter = adapter
        self._library: LoraLibrary | None = None

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
        if self.model_info() is None:
            raise FileFormatError("model", self.model_error())
        return self.adapter.txt2img(params)

    def interrupt(self) -> None:
        self.adapter.interrupt()

    def interrupted(self) -> bool:
        return self.adapter.interrupted()

    def outputs_dir(self) -> Path:
        return self.adapter.outputs_dir()
