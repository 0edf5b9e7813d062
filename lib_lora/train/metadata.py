"""Metadata of the files we train: sd-scripts' `ss_*` keys, `modelspec.*` and the precomputed hashes, so A1111,
ComfyUI, additional-networks and our own `info` read them as they read sd-scripts' files."""
from __future__ import annotations

import datetime
import json
import time
from dataclasses import dataclass
from typing import Any

import torch

from lib_lora import __version__
from lib_lora.io import precalculate_hashes
from lib_lora.train.config import ModelConfig, TrainConfig
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


# ------------------------------------------------------------------------- training parameters (ss_*)


def _base_model_version(model: ModelConfig) -> str:
    if model.sdxl:
        return "sdxl_base_v1-0"
    return ("sd_v2" if model.v2 else "sd_v1") + ("_v" if model.v_parameterization else "")


def training_metadata(cfg: TrainConfig) -> dict[str, str]:
    """sd-scripts' training-parameter `ss_*` values (strings, `str()` of the value as sd-scripts writes them).

    Run-time values (session id, times, steps, epochs, ss_optimizer, hashes, dataset values) are added by the
    writer; `ss_network_alpha` is the effective alpha (0 written as dim)."""
    net, opt, run, loss, data = cfg.network, cfg.optimizer, cfg.run, cfg.loss, cfg.data
    sub = data.subsets[0]
    meta: dict[str, Any] = {
        "ss_output_name": cfg.output.output_name, "ss_learning_rate": opt.learning_rate,
        "ss_text_encoder_lr": opt.text_encoder_lr, "ss_unet_lr": opt.unet_lr,
        "ss_gradient_checkpointing": run.gradient_checkpointing,
        "ss_gradient_accumulation_steps": run.gradient_accumulation_steps, "ss_max_train_steps": run.max_train_steps,
        "ss_lr_warmup_steps": opt.lr_warmup_steps, "ss_lr_scheduler": opt.lr_scheduler,
        "ss_network_module": net.network_module, "ss_network_dim": net.network_dim, "ss_network_alpha": net.alpha,
        "ss_network_dropout": net.network_dropout, "ss_mixed_precision": run.mixed_precision, "ss_full_fp16": False,
        "ss_v2": cfg.model.v2, "ss_base_model_version": _base_model_version(cfg.model),
        "ss_clip_skip": cfg.model.clip_skip, "ss_max_token_length": cfg.model.max_token_length,
        "ss_cache_latents": data.caches_latents, "ss_seed": run.seed, "ss_lowram": False,
        "ss_noise_offset": loss.noise_offset, "ss_multires_noise_iterations": loss.multires_noise_iterations,
        "ss_multires_noise_discount": loss.multires_noise_discount,
        "ss_adaptive_noise_scale": loss.adaptive_noise_scale,
        "ss_zero_terminal_snr": False, "ss_training_comment": cfg.output.training_comment,
        "ss_max_grad_norm": opt.max_grad_norm, "ss_caption_dropout_rate": sub.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": sub.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": sub.caption_tag_dropout_rate, "ss_face_crop_aug_range": None,
        "ss_prior_loss_weight": loss.prior_loss_weight, "ss_min_snr_gamma": loss.min_snr_gamma,
        "ss_scale_weight_norms": net.scale_weight_norms, "ss_ip_noise_gamma": None,
        "ss_debiased_estimation": loss.debiased_estimation_loss,
        "ss_noise_offset_random_strength": loss.noise_offset_random_strength,
        "ss_ip_noise_gamma_random_strength": False, "ss_loss_type": "l2", "ss_fp8_base": False,
        "ss_fp8_base_unet": False, "ss_validation_seed": data.datasets[0].validation_seed,
        "ss_validation_split": data.datasets[0].validation_split,
        "ss_max_validation_steps": cfg.validation.max_validation_steps,
        "ss_validate_every_n_epochs": cfg.validation.validate_every_n_epochs,
        "ss_validate_every_n_steps": cfg.validation.validate_every_n_steps,
        "ss_resize_interpolation": sub.resize_interpolation,
    }
    if net.network_args_raw:
        args = dict(net.network_args_raw)
        args.setdefault("dropout", net.network_dropout)  # sd-scripts adds it (a LyCORIS workaround)
        meta["ss_network_args"] = json.dumps(args)
    return {k: str(v) for k, v in meta.items()}
