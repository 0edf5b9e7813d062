"""The `Host` protocol: what the UI needs from wherever it runs (standalone app, A1111, Forge).

The UI never touches a model, a file or the web UI's modules itself: it turns inputs into a request, hands
it to the host and shows what comes back. Implementations: `standalone.py` here; the web-UI adapters live
beside it and are the only files that import `modules.*`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from lib_lora.lora_library import LoraLibrary
from lib_lora.sd.pipeline import GenerationParams
from lib_lora.types import Arch

if TYPE_CHECKING:
    from lib_lora.info import NetworkInfo
    from lib_lora.train.runs import RunManager

ProgressFn = Callable[[int, int], None]  # (step, total)
StopFn = Callable[[], bool]


@dataclass(frozen=True)
class ModelInfo:
    """The model a host has loaded, as the UI shows it."""

    arch: Arch
    name: str
    short_hash: str = ""
    source: str = ""  # a path, or "embedded"
    resolution: int = 512
    device: str = "cpu"
    dtype: str = "float32"

    @property
    def label(self) -> str:
        h = f" [{self.short_hash}]" if self.short_hash else ""
        return f"{self.name}{h} ({self.arch.label}, {self.resolution}px, {self.device} {self.dtype})"


@dataclass
class HostResult:
    """Images a generation produced, their infotexts and seeds, and where the host saved them."""

    images: list
    infotexts: list[str]
    seeds: list[int]
    paths: list[str] = field(default_factory=list)


@runtime_checkable
class Host(Protocol):
    """What the UI may ask of its host. Methods raise `LibLoraError` subclasses for bad input; the UI shows
    the message and the host stays usable, its model unchanged."""

    lora_list_hint: str  # where a user finds a new LoRA file in this host's UI ("the Generate tab's LoRA browser")

    def model_info(self) -> ModelInfo | None:
        """The loaded model, or None when none could be loaded (see `model_error`)."""

    def model_error(self) -> str:
        """Why no model is loaded ("" when one is)."""

    def load_model(self, source: str) -> ModelInfo:
        """Switch to another model (a checkpoint path, or "embedded"); on failure the old one stays."""

    def lora_library(self) -> LoraLibrary:
        """The LoRA folder."""

    def block_presets(self) -> Mapping[str, str]:
        """`lbw=` presets for the loaded model: built-in ones, then the user's presets file."""

    def generate(self, params: GenerationParams, progress: ProgressFn | None = None,
                 should_stop: StopFn | None = None) -> HostResult:
        """Generate (prompt in the web UI's LoRA syntax), save the images, and return them."""

    def interrupt(self) -> None:
        """Ask the running generation to stop after its current step."""

    def interrupted(self) -> bool:
        """True after `interrupt()` until the next generation starts."""

    def outputs_dir(self) -> Path:
        """Where generated images are saved."""

    def samplers(self) -> list[str]:
        """The sampler names this host's generation accepts (the UI's dropdowns and the X/Y sampler axis)."""

    # ------------------------------------------------------------------------------------ X/Y plots

    def generate_series(self, requests: Sequence[GenerationParams], progress: ProgressFn | None = None,
                        should_stop: StopFn | None = None) -> Iterator[HostResult]:
        """Generate several requests one after another, yielding one result per request. LoRA weights stay applied
        between requests, so requests that differ only in LoRA strengths or block weights re-patch only the weights
        that change; the model is restored when the series ends (exhausted or closed). `should_stop` is checked
        between requests (the current image is finished)."""

    def seconds_per_step(self, params: GenerationParams) -> float:
        """Measured (or freshly timed) seconds per sampling step at the size of `params`: plot estimates."""

    # ------------------------------------------------------------------------------------ training

    def training(self) -> RunManager:
        """The run manager living in the host process: queue, live runs, logs (they outlive a browser tab)."""

    def train_defaults(self) -> dict[str, Any]:
        """Form values this host proposes (sd-scripts names): base model, output folder (its LoRA folder),
        resolution of its model."""

    def settings_dir(self) -> Path:
        """Where the UI keeps its own files (last-used training values, typed sample prompts, inline datasets)."""

    # ------------------------------------------------------------------------------------ LoRA tools

    def lora_info(self, name: str) -> NetworkInfo:
        """What a LoRA file of the library holds (`python -m lib_lora info`)."""

    def edit_lora_metadata(self, name: str, changes: Mapping[str, str | None]) -> NetworkInfo:
        """Write metadata keys of a library file (None removes a key), atomically, hashes recomputed."""

    def checkpoints(self) -> list[str]:
        """Model files the LoRA tools may read or write (merge into a model, extract from a pair)."""

    def run_operation(self, operation: Callable[..., Any], request: Any, progress: Callable[[int, int, str], None]
                      | None = None, should_stop: StopFn | None = None) -> Any:
        """Run a LoRA tool (`lib_lora.ops` function and its request) the way this host runs long work (its device,
        its lock); the LoRA folder is rescanned afterwards. Raises what the operation raises."""
