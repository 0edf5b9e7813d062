"""The LDM/SGM `.yaml` config the web UI reads beside a checkpoint (`<name>.yaml`): read it, write it.

Reading takes what decides how to build the model: U-Net and VAE structure, `parameterization`
(v-prediction), `scale_factor`, latent `image_size`, the noise schedule, SDXL's size-embedding width,
and (SD1/SDXL CLIP-L) a `version` that names a local folder holding the text encoder's `config.json`.
Writing fills templates shaped like the web UI's own configs (shipped in `configs/`); a model its
ldm/sgm code cannot build is refused with the reasons, never described wrongly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib_lora.errors import ConfigError, FileFormatError
from lib_lora.sd.configs import (
    CONFIG_DIR,
    TE_FIELDS,
    LdmUNet,
    LdmVae,
    SDConfig,
    shipped_config,
    unet_from_diffusers,
    unet_from_yaml,
    vae_from_diffusers,
    vae_from_yaml,
)
from lib_lora.sd.model import NoiseSchedule
from lib_lora.types import Arch

TEMPLATES = {Arch.SD1: "ldm-sd1.yaml", Arch.SD2: "ldm-sd2.yaml", Arch.SDXL: "sgm-sdxl.yaml"}
HEADER = ("# Written by LoRA Studio for the web UI (keep it beside the checkpoint, same name, .yaml).\n"
          "# A `version` path below names the text encoder's config folder written beside it; a relative one is\n"
          "# relative to the web UI's folder (its working directory).\n")


@dataclass(frozen=True)
class LdmYaml:
    """What an LDM/SGM yaml says; None where it says nothing."""

    path: str
    unet: LdmUNet | None
    vae: LdmVae | None
    prediction_type: str | None
    scale_factor: float | None
    latent_size: int | None
    schedule: NoiseSchedule | None
    addition_time_embed_dim: int | None
    text_encoder_dir: str | None


def _yaml():
    import yaml  # PyYAML comes with huggingface_hub/accelerate; imported here so the core never needs it

    return yaml


def read_ldm_yaml(path: str | os.PathLike) -> LdmYaml:
    """Parse an LDM (`ldm.models.diffusion.ddpm.LatentDiffusion`) or SGM (`DiffusionEngine`) config.

    Raises:
        FileFormatError: not YAML, or no `model.params`.
        ConfigError: a section that cannot be read (names the yaml and the section).
    """
    path = str(path)
    yaml = _yaml()
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        raise FileFormatError(path, f"cannot read the yaml config: {exc}") from None
    params = (data or {}).get("model", {}).get("params") if isinstance(data, dict) else None
    if not isinstance(params, dict):
        raise FileFormatError(path, "not an LDM/SGM model config: no model.params section")
    unet_section = params.get("unet_config") or params.get("network_config") or {}
    vae_section = params.get("first_stage_config") or {}
    linear = ("linear_start", "linear_end", "timesteps")
    schedule = None
    if any(k in params for k in linear):
        schedule = NoiseSchedule(num_train_timesteps=int(params.get("timesteps", 1000)),
                                 beta_start=float(params.get("linear_start", 0.00085)),
                                 beta_end=float(params.get("linear_end", 0.012)))
    return LdmYaml(
        path=path,
        unet=unet_from_yaml(unet_section["params"], path) if unet_section.get("params") else None,
        vae=vae_from_yaml(vae_section["params"], path) if vae_section.get("params") else None,
        prediction_type=_prediction_type(params),
        scale_factor=float(params["scale_factor"]) if "scale_factor" in params else None,
        latent_size=int(params["image_size"]) if "image_size" in params else None,
        schedule=schedule,
        addition_time_embed_dim=_size_embedding_width(params),
        text_encoder_dir=_text_encoder_dir(params, Path(path).parent),
    )


def _prediction_type(params: dict) -> str | None:
    """LDM: `parameterization` (absent = eps, as ldm reads it). SGM: the denoiser's scaling class, if any."""
    if "parameterization" in params:
        return "v_prediction" if params["parameterization"] == "v" else "epsilon"
    scaling = (((params.get("denoiser_config") or {}).get("params") or {}).get("scaling_config") or {})
    target = str(scaling.get("target", ""))
    if target.endswith("VScaling"):
        return "v_prediction"
    if target.endswith("EpsScaling") or "unet_config" in params:
        return "epsilon"
    return None


def _embedders(params: dict) -> list[dict]:
    models = ((params.get("conditioner_config") or {}).get("params") or {}).get("emb_models") or []
    return [m for m in models if isinstance(m, dict)]


def _size_embedding_width(params: dict) -> int | None:
    for m in _embedders(params):
        if str(m.get("target", "")).endswith("ConcatTimestepEmbedderND"):
            return int((m.get("params") or {}).get("outdim", 256))
    return None


def _text_encoder_dir(params: dict, base: Path) -> str | None:
    """A CLIP-L `version` that is a local folder with config.json (how a non-standard CLIP-L is described)."""
    sections = [params.get("cond_stage_config") or {}] + _embedders(params)
    for section in sections:
        if str(section.get("target", "")).endswith("FrozenCLIPEmbedder"):
            version = (section.get("params") or {}).get("version")
            for candidate in ([version, base / Path(str(version)).name] if version else []):
                if (Path(candidate) / "config.json").is_file():
                    return str(candidate)
    return None


def ldm_problems(config: SDConfig) -> list[str]:
    """Why the web UI's ldm/sgm code could not build this model from a yaml (empty when it can)."""
    _, problems = unet_from_diffusers(config.unet)
    problems += vae_from_diffusers(config.vae)[1]
    reference = shipped_config(config.arch).text_encoders
    for slot, (te, ref) in enumerate(zip(config.text_encoders, reference)):
        if config.arch is Arch.SD1 or (config.arch is Arch.SDXL and slot == 0):
            continue  # a CLIP-L of any size is described by a config folder (`version`)
        diff = {f: (te.get(f), ref.get(f)) for f in TE_FIELDS if te.get(f) != ref.get(f)}
        if diff:
            problems.append(f"text encoder {slot + 1} differs from the OpenCLIP model the web UI builds by name "
                            + ", ".join(f"{f}={a} (needs {b})" for f, (a, b) in diff.items()))
    return problems


def needs_text_encoder_dir(config: SDConfig) -> bool:
    """Whether the CLIP-L text encoder differs from openai/clip-vit-large-patch14 (then a folder describes it)."""
    te, ref = config.text_encoders[0], shipped_config(config.arch).text_encoders[0]
    return any(te.get(f) != ref.get(f) for f in TE_FIELDS)


def render_ldm_yaml(config: SDConfig, text_encoder_dir: str | None = None) -> str:
    """The yaml text for `config`. Raises ConfigError listing the reasons if the web UI could not build it."""
    problems = ldm_problems(config)
    if problems:
        raise ConfigError("write_yaml", True, "the web UI's ldm/sgm code cannot build this model: "
                          + "; ".join(problems) + " (save with write_yaml=False to write the checkpoint alone)")
    yaml = _yaml()
    data = yaml.safe_load((CONFIG_DIR / TEMPLATES[config.arch]).read_text())
    params = data["model"]["params"]
    unet, _ = unet_from_diffusers(config.unet)
    vae, _ = vae_from_diffusers(config.vae)
    unet_section = params["network_config" if config.arch is Arch.SDXL else "unet_config"]["params"]
    for key in ("num_heads", "num_head_channels", "transformer_depth_middle"):
        unet_section.pop(key, None)
    unet_section.update(unet.yaml_params())
    vae_section = params["first_stage_config"]["params"]
    vae_section["embed_dim"] = vae.embed_dim
    vae_section["ddconfig"].update(vae.yaml_params())
    params["scale_factor"] = config.vae_scale_factor
    if config.arch is Arch.SDXL:
        _fill_sgm(params, config, text_encoder_dir)
    else:
        params["image_size"] = config.resolution // vae.downscale
        if config.prediction_type == "v_prediction":
            params["parameterization"] = "v"
        if text_encoder_dir:
            params["cond_stage_config"]["params"] = {"version": str(text_encoder_dir)}
    return HEADER + yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


def _fill_sgm(params: dict[str, Any], config: SDConfig, text_encoder_dir: str | None) -> None:
    if config.prediction_type == "v_prediction":
        denoiser = params["denoiser_config"]["params"]
        denoiser["scaling_config"]["target"] = "sgm.modules.diffusionmodules.denoiser_scaling.VScaling"
        denoiser["weighting_config"]["target"] = "sgm.modules.diffusionmodules.denoiser_weighting.VWeighting"
    embedders = params["conditioner_config"]["params"]["emb_models"]
    clip = embedders[0]["params"]
    clip["layer_idx"] = int(config.text_encoders[0]["num_hidden_layers"]) - 1  # penultimate hidden state
    if text_encoder_dir:
        clip["version"] = str(text_encoder_dir)
    for m in embedders[2:]:
        m["params"]["outdim"] = int(config.unet["addition_time_embed_dim"])
