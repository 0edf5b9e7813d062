"""Decide the `SDConfig` of a checkpoint: file metadata, else yaml, else tensor shapes + shipped config.

Also decides the prediction type where something says it (argument, yaml, metadata, modelspec); an
empty `prediction_source` tells the loader to run the web UI's U-Net test (SD2 only).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib_lora.errors import ConfigError, KeyMapError
from lib_lora.sd.components import METADATA_KEY, TEXT_ENCODERS, V_PREDICTION_MARKER
from lib_lora.sd.config_infer import infer_clip, infer_openclip, infer_unet, infer_vae
from lib_lora.sd.configs import SHIPPED, TE_CONFIG_FIELDS, SDConfig, shipped_config, unet_from_diffusers
from lib_lora.sd.ldm_yaml import LdmYaml
from lib_lora.types import Arch


@dataclass(frozen=True)
class ResolvedConfig:
    config: SDConfig
    config_source: str
    prediction_source: str  # '' when nothing said it and the U-Net test must decide (SD2)


def resolve_config(arch: Arch, parts: Any, metadata: Mapping[str, str], ldm_yaml: LdmYaml | None,
                   prediction_arg: str | None) -> ResolvedConfig:
    """The config to build; `parts` holds the file's tensors by component (`unet`, `vae`, `text_encoders`)."""
    embedded = _embedded_config(metadata)
    prediction, prediction_source = _prediction(prediction_arg, ldm_yaml, embedded, metadata,
                                                V_PREDICTION_MARKER in parts.markers)
    if embedded is not None:
        if embedded.arch is not arch:
            raise KeyMapError(f"{METADATA_KEY} says {embedded.arch.label} but the keys are {arch.label}'s")
        config = embedded.with_(prediction_type=prediction or embedded.prediction_type)
        if ldm_yaml and ldm_yaml.scale_factor:
            config = config.with_(vae_scale_factor=ldm_yaml.scale_factor)
        return ResolvedConfig(config, f"the file's {METADATA_KEY} metadata", prediction_source)
    base = shipped_config(arch, prediction or "epsilon")
    shipped = f"shipped {SHIPPED[(arch, base.prediction_type)]}"
    if ldm_yaml and ldm_yaml.unet:
        unet, source = ldm_yaml.unet, f"yaml {ldm_yaml.path}"
    else:
        base_unet, _ = unet_from_diffusers(base.unet)
        unet = infer_unet(_shapes(parts.unet)).with_(num_heads=base_unet.num_heads,
                                                      num_head_channels=base_unet.num_head_channels)
        source = f"tensor shapes (heads and activations from the {shipped})"
    if (unet.adm_in_channels is not None) != (arch is Arch.SDXL):
        what = "has no size/pooled-text embedding" if arch is Arch.SDXL else "is class-conditioned (unCLIP?)"
        raise KeyMapError(f"the {arch.label} U-Net {what}: not supported")
    vae = ldm_yaml.vae if ldm_yaml and ldm_yaml.vae else infer_vae(_shapes(parts.vae))
    text_encoders = tuple(_text_encoder(arch, slot_index, base, parts, ldm_yaml) for slot_index in range(
        len(TEXT_ENCODERS[arch])))
    time_dim = None
    if unet.adm_in_channels is not None:
        time_dim = ldm_yaml.addition_time_embed_dim if ldm_yaml else None
        time_dim = time_dim or _size_embedding_width(unet.adm_in_channels, text_encoders[-1])
    resolution = ldm_yaml.latent_size * vae.downscale if ldm_yaml and ldm_yaml.latent_size else base.resolution
    scale = ldm_yaml.scale_factor if ldm_yaml and ldm_yaml.scale_factor else base.vae_scale_factor
    unet_cfg = unet.to_diffusers(base.unet, time_dim)
    unet_cfg["sample_size"] = resolution // vae.downscale
    vae_cfg = dict(vae.to_diffusers(base.vae), sample_size=resolution, scaling_factor=scale)
    config = SDConfig(arch, unet_cfg, vae_cfg, text_encoders, base.prediction_type, resolution, scale)
    return ResolvedConfig(config, source, prediction_source)


def v_prediction_variant(config: SDConfig) -> SDConfig:
    """An SD2 config built on the shipped 512-eps defaults, switched to the 768-v ones (resolution, upcast)."""
    v = shipped_config(config.arch, "v_prediction")
    if config.resolution != shipped_config(config.arch, "epsilon").resolution:
        return config.with_(prediction_type="v_prediction")
    unet = dict(config.unet, upcast_attention=v.unet.get("upcast_attention", False),
                sample_size=v.resolution // (config.resolution // config.unet["sample_size"]))
    return config.with_(prediction_type="v_prediction", resolution=v.resolution, unet=unet,
                        vae=dict(config.vae, sample_size=v.resolution))


def _embedded_config(metadata: Mapping[str, str]) -> SDConfig | None:
    if METADATA_KEY not in metadata:
        return None
    try:
        data = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ConfigError(METADATA_KEY, metadata[METADATA_KEY][:40], f"not valid JSON: {exc}") from None
    return SDConfig.from_dict(data, METADATA_KEY)


def _prediction(arg: str | None, ldm_yaml: LdmYaml | None, embedded: SDConfig | None,
                metadata: Mapping[str, str], v_marker: bool) -> tuple[str | None, str]:
    if arg:
        return arg, "prediction_type argument"
    if ldm_yaml and ldm_yaml.prediction_type:
        return ldm_yaml.prediction_type, f"yaml {ldm_yaml.path}"
    if embedded:
        return embedded.prediction_type, f"the file's {METADATA_KEY} metadata"
    if v_marker:
        return "v_prediction", f"the file's {V_PREDICTION_MARKER!r} marker key"
    spec = metadata.get("modelspec.prediction_type")
    if spec in ("v", "epsilon"):
        return ("v_prediction" if spec == "v" else "epsilon"), "modelspec.prediction_type metadata"
    return None, ""


def _text_encoder(arch: Arch, index: int, base: SDConfig, parts: Any, ldm_yaml: LdmYaml | None) -> dict[str, Any]:
    slot, base_te, sd = TEXT_ENCODERS[arch][index], dict(base.text_encoders[index]), parts.text_encoders[index]
    if slot.kind == "openclip":
        return infer_openclip(_shapes(sd), base_te, slot.drop_last)
    if ldm_yaml and ldm_yaml.text_encoder_dir:
        described = json.loads((Path(ldm_yaml.text_encoder_dir) / "config.json").read_text())
        base_te.update({k: described[k] for k in TE_CONFIG_FIELDS if k in described})
    shapes = _shapes(sd)
    if not any(k.startswith("text_model.") for k in shapes):
        shapes = {f"text_model.{k}": v for k, v in shapes.items()}
    return infer_clip(shapes, base_te)


def _size_embedding_width(adm_in_channels: int, pooled_encoder: Mapping[str, Any]) -> int:
    # SDXL's label embedding takes the pooled text embedding plus 6 sinusoidal size/crop embeddings
    rest = adm_in_channels - int(pooled_encoder["projection_dim"])
    if rest <= 0 or rest % 6:
        raise KeyMapError(f"U-Net label embedding input {adm_in_channels} is not the pooled width "
                          f"{pooled_encoder['projection_dim']} plus 6 equal size embeddings")
    return rest // 6


def _shapes(sd: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}
