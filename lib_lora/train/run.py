"""Standalone/CLI training: load the base model, wire family, sampling, logging and listeners, run the loop.

The web UI's training tab uses `session.prepare` + `loop.run` directly with its own model family, sample
function and listeners; this module is the diffusers path.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from lib_lora.io import model_hash
from lib_lora.sd.model import SDModel
from lib_lora.train import loop, session
from lib_lora.train.config import TrainConfig
from lib_lora.train.distributed import DistContext
from lib_lora.train.events import Listener
from lib_lora.train.families import family_for
from lib_lora.train.loop import TrainResult
from lib_lora.train.metadata import ModelFacts
from lib_lora.train.sample_prompts import SamplePrompt, map_sampler
from lib_lora.types import Arch


def load_base_model(cfg: TrainConfig, device: torch.device) -> SDModel:
    """The model named by `pretrained_model_name_or_path`: 'embedded' or unset (the shipped tiny model), a
    diffusers folder, or a single-file checkpoint."""
    from lib_lora.sd.loading import load_model

    dtype = torch.float16 if device.type == "cuda" and cfg.run.mixed_precision in ("fp16", "bf16") else torch.float32
    arch = Arch.SDXL if cfg.model.sdxl else (Arch.SD2 if cfg.model.v2 else None)
    prediction = "v_prediction" if cfg.model.v_parameterization else None
    return load_model(cfg.model.pretrained_model_name_or_path, device=device, dtype=dtype, arch=arch,
                      prediction_type=prediction)


@contextlib.contextmanager
def vae_options(cfg: TrainConfig, model: SDModel) -> Iterator[None]:
    """`vae` (another VAE file) and `no_half_vae` for the run, on any model, given back as it was afterwards."""
    original = model.vae
    dtype = next(original.parameters()).dtype
    try:
        if cfg.model.vae is not None:
            from lib_lora.sd.vae_file import load_vae_file

            model.vae = load_vae_file(cfg.model.vae, original)
        if cfg.model.no_half_vae and dtype != torch.float32:
            # SDXL's VAE overflows in fp16 (NaN latents), which is what sd-scripts' option is for
            model.vae = copy.deepcopy(model.vae).to(torch.float32) if model.vae is original else \
                model.vae.to(torch.float32)
        yield
    finally:
        model.vae = original


def model_facts(model: SDModel) -> ModelFacts:
    path = Path(model.path) if model.path else None
    legacy = model_hash(path) if path is not None and path.is_file() else ""
    return ModelFacts(model.arch, model.prediction_type == "v_prediction", model.name or (path.name if path else ""),
                      legacy_hash=legacy, resolution=model.resolution)


def pipeline_sampler(model: SDModel, folder: Path, default_sampler: str, output_name: str):
    """Sample images with the standalone pipeline (the LoRA is attached in hooked mode while training)."""
    from lib_lora.sd.pipeline import GenerationParams, generate, save_png

    sampler_name = map_sampler(default_sampler)

    def sample(prompts: list[SamplePrompt], step: int, epoch: int) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, p in enumerate(prompts):
            params = GenerationParams(prompt=p.prompt, negative_prompt=p.negative_prompt,
                                      sampler=p.sampler or sampler_name, steps=p.steps, cfg_scale=p.cfg_scale,
                                      seed=p.seed if p.seed is not None else 1000 + i, width=p.width or 0,
                                      height=p.height or 0)
            result = generate(model, params, extra_infotext={"Training step": str(step)})
            path = folder / f"{output_name}_{step:06d}_{i:02d}_{result.seeds[0]}.png"
            save_png(result.images[0], path, result.infotexts[0])
            paths.append(path)
        return paths

    return sample


def train(cfg: TrainConfig, *, listeners: Sequence[Listener] = (), should_stop: Callable[[], bool] | None = None,
          model: SDModel | None = None) -> TrainResult:
    """Load (or take) the base model and train `cfg`; returns the result once the run ends."""
    dist = DistContext.detect(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    model = model or load_base_model(cfg, dist.device)
    with vae_options(cfg, model):
        family = family_for(model)
        try:
            all_listeners = list(listeners)
            if cfg.logging.logging_dir is not None and cfg.logging.log_with == "tensorboard" and dist.is_main:
                from lib_lora.train.tensorboard import TensorBoardLogger

                all_listeners.append(TensorBoardLogger(cfg.logging.logging_dir, cfg.logging.log_prefix))
            out_dir = Path(cfg.output.output_dir) if cfg.output.output_dir else Path("output")
            sample_fn = pipeline_sampler(model, out_dir / "sample", cfg.sampling.sample_sampler,
                                         cfg.output.output_name)
            s = session.prepare(cfg, family, model_facts(model), listeners=all_listeners, should_stop=should_stop,
                                sample_fn=sample_fn, dist=dist)
            return loop.run(s)
        finally:
            family.close()
