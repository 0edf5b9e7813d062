"""The standalone host: one `SDModel` in this process (the embedded tiny model or a single-file checkpoint),
the LoRA folder, an outputs folder. Used by `lib_lora.app` (./launch.sh) and `python -m lib_lora generate`.

On a CUDA GPU the model runs in float16 with PyTorch's SDPA attention (xformers when installed); the VAE stays
in float32 (SDXL's VAE overflows in float16). On CPU everything is float32.
One lock serialises generation and model switching: two browser tabs never patch the same weights at once.
"""
from __future__ import annotations

import datetime
import importlib.util
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lib_lora import blocks
from lib_lora.errors import FileFormatError, LibLoraError
from lib_lora.host.base import HostResult, ModelInfo, ProgressFn, StopFn
from lib_lora.lora_library import LoraLibrary
from lib_lora.patching import WeightPatcher
from lib_lora.sd.lora_generate import generate_with_loras, model_targets
from lib_lora.sd.model import SDModel
from lib_lora.sd.pipeline import SAMPLERS, GenerationParams, generate, save_png

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LORA_DIR = ROOT / "models" / "Lora"
DEFAULT_OUTPUTS_DIR = ROOT / "outputs"
EMBEDDED = "embedded"


def pick_device() -> tuple[torch.device, torch.dtype]:
    """CUDA in float16 when there is a GPU, else CPU in float32."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.float16
    return torch.device("cpu"), torch.float32


def _use_fast_attention(model: SDModel) -> None:
    # diffusers already uses SDPA on torch 2; xformers is faster on some GPUs when the user has installed it.
    if model.device.type != "cuda" or importlib.util.find_spec("xformers") is None:
        return
    try:
        model.unet.enable_xformers_memory_efficient_attention()
    except (ImportError, RuntimeError, ValueError) as exc:  # a build for another torch/CUDA: SDPA stays
        warnings.warn(f"xformers is installed but unusable ({exc}); using PyTorch SDPA attention", stacklevel=2)


def load_model_source(source: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> SDModel:
    """Load "embedded" (models/tiny-sd1), a diffusers folder or a single-file checkpoint (SD1/SD2/SDXL).

    Raises:
        FileFormatError: missing, truncated or unrecognised file, naming it and what to do.
    """
    from lib_lora.sd import embedded
    from lib_lora.sd.loading import load_model

    source = (source or EMBEDDED).strip()
    if source == EMBEDDED:
        folder = embedded.EMBEDDED_DIR
        try:
            return embedded.load_embedded(device, dtype, folder=folder)
        except (FileFormatError, OSError, ValueError) as exc:
            raise FileFormatError(str(folder), f"the embedded model could not be loaded ({exc}); build it with "
                                               "`python tools/build_tiny_model.py`, or start with --model "
                                               "PATH.safetensors") from None
    try:
        return load_model(source, device=device, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise FileFormatError(source, f"cannot load this model: {exc}") from None


class StandaloneHost:
    """`Host` over a model in this process. Construct with `model=` (tests) or call `load_model`/`try_load`.

    Args:
        lora_dir: the LoRA folder (scanned recursively); outputs_dir: where images are saved.
        presets_file: optional user `lbw=` presets (`NAME:w1,w2,...` per line).
        settings_dir: the UI's own files (default: `outputs_dir/.lora-studio`).
        checkpoint_dir: a folder of model checkpoints offered to the LoRA tools (optional).
        device/dtype: default `pick_device()`.
    """

    lora_list_hint = "the Generate tab's LoRA browser (Refresh)"

    def __init__(self, *, model: SDModel | None = None, lora_dir: str | Path = DEFAULT_LORA_DIR,
                 outputs_dir: str | Path = DEFAULT_OUTPUTS_DIR, presets_file: str | Path | None = None,
                 settings_dir: str | Path | None = None, checkpoint_dir: str | Path | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        auto_device, auto_dtype = pick_device()
        self.device = torch.device(device) if device is not None else auto_device
        self.dtype = dtype or (auto_dtype if self.device.type == "cuda" else torch.float32)
        self._library = LoraLibrary(lora_dir)
        self._outputs = Path(outputs_dir)
        self._presets_file = Path(presets_file) if presets_file else None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._model: SDModel | None = None
        self._source = ""
        self._patcher: WeightPatcher | None = None
        self._error = "no model loaded"
        self._settings = Path(settings_dir) if settings_dir else self._outputs / ".lora-studio"
        self._checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self._runs = None
        self._step_time: tuple[float, int] | None = None  # (seconds per step, pixels) of the last generation
        if model is not None:
            self._install(model, model.path or model.name)

    # ------------------------------------------------------------------------------------ model

    def _install(self, model: SDModel, source: str) -> None:
        self._model, self._source, self._error = model, source, ""
        self._patcher = WeightPatcher(model_targets(model))

    def load_model(self, source: str) -> ModelInfo:
        with self._lock:
            model = load_model_source(source, self.device, self.dtype)
            if self.device.type == "cuda":
                model.vae.to(torch.float32)
                _use_fast_attention(model)
            self._install(model, source)
            return self.model_info()

    def try_load(self, source: str) -> ModelInfo | None:
        """`load_model`, keeping the error message (shown by the UI) instead of raising."""
        try:
            return self.load_model(source)
        except LibLoraError as exc:
            if self._model is None:
                self._error = str(exc)
            warnings.warn(str(exc), stacklevel=2)
            return None

    def model_info(self) -> ModelInfo | None:
        m = self._model
        if m is None:
            return None
        return ModelInfo(arch=m.arch, name=m.name or Path(self._source).stem, short_hash=m.short_hash,
                         source=self._source, resolution=m.resolution, device=str(m.device),
                         dtype=str(m.dtype).removeprefix("torch."))

    def model_error(self) -> str:
        return self._error

    @property
    def model(self) -> SDModel | None:
        return self._model

    # ------------------------------------------------------------------------------------ LoRAs

    def lora_library(self) -> LoraLibrary:
        return self._library

    def _user_presets(self) -> dict[str, str]:
        if self._presets_file is None or not self._presets_file.is_file():
            return {}
        return blocks.load_presets_file(self._presets_file)

    def block_presets(self) -> Mapping[str, str]:
        info = self.model_info()
        builtin = blocks.builtin_presets(info.arch) if info else {}
        return {**builtin, **self._user_presets()}

    # ------------------------------------------------------------------------------------ generation

    def generate(self, params: GenerationParams, progress: ProgressFn | None = None,
                 should_stop: StopFn | None = None) -> HostResult:
        with self._lock:
            if self._model is None:
                raise FileFormatError(self._source or "model", self._error or "no model loaded")
            self._stop.clear()

            def stop() -> bool:
                return self._stop.is_set() or bool(should_stop and should_stop())

            started = time.perf_counter()
            result = generate_with_loras(self._model, params, self._library, patcher=self._patcher,
                                         user_presets=self._user_presets(), progress=progress, should_stop=stop)
            self._record_time(params, time.perf_counter() - started)
            paths = [self._save(img, info, seed) for img, info, seed in
                     zip(result.images, result.infotexts, result.seeds)]
        return HostResult(result.images, result.infotexts, result.seeds, paths)

    def generate_series(self, requests: Sequence[GenerationParams], progress: ProgressFn | None = None,
                        should_stop: StopFn | None = None) -> Iterator[HostResult]:
        with self._lock:
            if self._model is None:
                raise FileFormatError(self._source or "model", self._error or "no model loaded")
            self._stop.clear()
            presets = self._user_presets()
            try:
                for params in requests:
                    if should_stop is not None and should_stop():
                        return
                    started = time.perf_counter()
                    result = generate_with_loras(self._model, params, self._library, patcher=self._patcher,
                                                 user_presets=presets, progress=progress,
                                                 should_stop=self._stop.is_set, keep_applied=True)
                    self._record_time(params, time.perf_counter() - started)
                    paths = [self._save(img, info, seed) for img, info, seed in
                             zip(result.images, result.infotexts, result.seeds)]
                    yield HostResult(result.images, result.infotexts, result.seeds, paths)
            finally:
                self._patcher.restore()

    def _pixels(self, params: GenerationParams) -> int:
        w, h = params.resolved_size(self._model)
        return w * h

    def _record_time(self, params: GenerationParams, seconds: float) -> None:
        self._step_time = (seconds / max(1, params.steps * params.batch_size), self._pixels(params))

    def seconds_per_step(self, params: GenerationParams) -> float:
        with self._lock:
            if self._model is None:
                raise FileFormatError(self._source or "model", self._error or "no model loaded")
            if self._step_time is None:  # time a short generation without LoRAs (nothing saved)
                probe = replace(params, prompt="", negative_prompt="", steps=3, batch_size=1, seed=0)
                started = time.perf_counter()
                generate(self._model, probe)
                self._record_time(probe, time.perf_counter() - started)
            seconds, pixels = self._step_time
            return seconds * self._pixels(params) / max(1, pixels)

    def _save(self, image, infotext: str, seed: int) -> str:
        # The web UI's layout: outputs/txt2img-images/<date>/<counter>-<seed>.png
        folder = self._outputs / "txt2img-images" / datetime.date.today().isoformat()
        folder.mkdir(parents=True, exist_ok=True)
        counter = sum(1 for p in folder.iterdir() if p.suffix == ".png")
        path = folder / f"{counter:05d}-{seed}.png"
        while path.exists():
            counter += 1
            path = folder / f"{counter:05d}-{seed}.png"
        save_png(image, path, infotext)
        return str(path)

    def interrupt(self) -> None:
        self._stop.set()

    def interrupted(self) -> bool:
        return self._stop.is_set()

    def outputs_dir(self) -> Path:
        return self._outputs

    def samplers(self) -> list[str]:
        return list(SAMPLERS)

    # ------------------------------------------------------------------------------------ training

    def training(self):
        from lib_lora.train.runs import RunManager

        with self._lock:
            if self._runs is None:
                self._runs = RunManager(self._train, history=self._settings / "speed.json",
                                        on_end=lambda view: self._library.refresh())
            return self._runs

    @staticmethod
    def _train(cfg, listeners, should_stop):
        # The run loads its own copy of the base model: generation on the loaded one goes on meanwhile.
        from lib_lora.train.run import train

        return train(cfg, listeners=listeners, should_stop=should_stop)

    def train_defaults(self) -> dict[str, Any]:
        info = self.model_info()
        return {"pretrained_model_name_or_path": self._source or EMBEDDED, "output_dir": str(self._library.folder),
                "resolution": str(info.resolution if info else 512)}

    def settings_dir(self) -> Path:
        return self._settings

    def close(self) -> None:
        """Stop the training queue (the running run saves its state)."""
        if self._runs is not None:
            self._runs.close()

    # ------------------------------------------------------------------------------------ LoRA tools

    def lora_info(self, name: str):
        from lib_lora.info import describe

        return describe(self._library.find(name).path)

    def edit_lora_metadata(self, name: str, changes: Mapping[str, str | None]):
        from lib_lora.io.metadata_edit import edit_metadata

        path = self._library.find(name).path
        edit_metadata(path, changes)
        self._library.refresh()
        return self.lora_info(name)

    def run_operation(self, operation, request, progress=None, should_stop=None):
        # File to file: the loaded model is not touched, so generation goes on meanwhile.
        try:
            return operation(request, progress=progress, should_stop=should_stop)
        finally:
            self._library.refresh()

    def checkpoints(self) -> list[str]:
        found = [EMBEDDED]
        if self._source and self._source != EMBEDDED:
            found.append(self._source)
        if self._checkpoint_dir is not None and self._checkpoint_dir.is_dir():
            found += [str(p) for p in sorted(self._checkpoint_dir.rglob("*.safetensors"))]
        return list(dict.fromkeys(found))
