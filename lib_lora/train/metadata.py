"""Metadata of the files we train: sd-scripts' `ss_*` keys, `modelspec.*` and the precomputed hashes, so A1111,
ComfyUI, additional-networks and our own `info` read them as they read sd-scripts' files."""
from __future__ import annotations

import datetime
import time
from dataclasses import dataclass

import torch

from lib_lora import __version__
from lib_lora.io import precalculate_hashes
from lib_lora.train.config import TrainConfig
from lib_lora.types import Arch

MODELSPEC_ARCH = {Arch.SD1: "stable-diffusion-v1", Arch.SD2: "stable-diffusion-v2-512",
                  Arch.SDXL: "stable-diffusion-xl-v1-base"}


@dataclass(frozen=True)
class ModelFacts:
    """What we know of the base model for metadata."""

    arch: Arch
    v_prediction: bool
    name: str  # file basename (ss_sd_model_name)
    legacy_hash: str = ""  # old A1111 8-hex model hash (ss_sd_model_hash)
    sha256: str = ""  # full-file sha256 (ss_new_sd_model_hash), when computed
    resolution: int = 512


def base_model_version(model: ModelFacts) -> str:
    if model.arch is Arch.SDXL:
        return "sdxl_base_v1-0"
    return ("sd_v2" if model.arch is Arch.SD2 else "sd_v1") + ("_v" if model.v_prediction else "")


def modelspec(cfg: TrainConfig, model: ModelFacts, resolution: tuple[int, int], started_at: float) -> dict[str, str]:
    arch = MODELSPEC_ARCH[model.arch]
    if model.arch is Arch.SD2 and model.v_prediction:
        arch = "stable-diffusion-v2-768-v"
    out = cfg.output
    spec = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if model.arch is Arch.SDXL
        else "diffusers",
        "modelspec.title": out.metadata_title or out.output_name,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(started_at)).isoformat(),
        "modelspec.prediction_type": "v" if model.v_prediction else "epsilon",
        "modelspec.implementation_version": f"lora-studio/{__version__}",
        "modelspec.encoder_layer": str(cfg.model.clip_skip) if cfg.model.clip_skip else None,
        "modelspec.author": out.metadata_author, "modelspec.description": out.metadata_description,
        "modelspec.license": out.metadata_license, "modelspec.tags": out.metadata_tags,
        "modelspec.trigger_phrase": out.metadata_trigger_phrase, "modelspec.usage_hint": out.metadata_usage_hint,
    }
    return {k: v for k, v in spec.items() if v is not None}


def build_metadata(cfg: TrainConfig, *, model: ModelFacts, dataset_meta: dict[str, str], runtime: dict[str, object],
                   resolution: tuple[int, int], started_at: float, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Every metadata key of one save: training parameters, dataset facts, run facts, modelspec and hashes.

    `runtime` carries what only the running trainer knows (ss_steps, ss_epoch, ss_num_epochs, ss_optimizer,
    ss_session_id, ss_seed, ...). With `no_metadata` only sd-scripts' minimum keys are written.
    """
    meta = dict(cfg.ss_metadata())
    meta.update(dataset_meta)
    meta.update({k: str(v) for k, v in runtime.items()})
    meta.update({
        "ss_v2": str(model.arch is Arch.SD2), "ss_base_model_version": base_model_version(model),
        "ss_sd_model_name": model.name, "ss_sd_model_hash": model.legacy_hash,
        "ss_new_sd_model_hash": model.sha256, "ss_training_started_at": str(started_at),
        "ss_training_finished_at": str(time.time()),
    })
    if cfg.output.no_metadata:
        minimum = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                   "ss_network_args")
        meta = {k: v for k, v in meta.items() if k in minimum}
    meta.update(modelspec(cfg, model, resolution, started_at))
    model_hash, legacy = precalculate_hashes(tensors, meta)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = model_hash, legacy
    return meta
