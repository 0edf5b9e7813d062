"""Write diffusers modules as a single-file checkpoint in the LDM/SGM layout, plus the web UI's yaml.

The file also carries `lora_studio.sd_config` (the exact diffusers/transformers configs, so our loader
rebuilds the model bit for bit even where LDM cannot describe it) and a few `modelspec.*` fields.
The yaml (`<stem>.yaml`, which the web UI reads beside a checkpoint) is written only for models the
web UI's ldm/sgm code can build; a CLIP-L text encoder of another size is described by a config
folder (`<stem>.text_encoder/`: config.json + tokenizer files) that the yaml's `version` names, which is
how the web UI's `FrozenCLIPEmbedder` finds a text encoder's shape.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lib_lora.errors import ConfigError, KeyMapError
from lib_lora.io import save_file
from lib_lora.io.safetensors_io import default_file_mode
from lib_lora.sd import ldm_keys
from lib_lora.sd.components import (
    DEFAULT_TOKENIZER_DIR,
    METADATA_KEY,
    TEXT_ENCODERS,
    UNET_PREFIX,
    V_PREDICTION_MARKER,
    VAE_PREFIX,
)
from lib_lora.sd.configs import TE_CONFIG_FIELDS, SDConfig, unet_from_diffusers
from lib_lora.sd.ldm_yaml import needs_text_encoder_dir, render_ldm_yaml
from lib_lora.sd.model import SDModel
from lib_lora.types import Arch
from lib_lora.unet_layout import convert_state_dict

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
TEXT_ENCODER_REFS = ("webui", "absolute")
WEBUI_CHECKPOINT_DIR = "models/Stable-diffusion"  # relative to the web UI's folder, its working directory
MODELSPEC_ARCH = {Arch.SD1: "stable-diffusion-v1", Arch.SD2: "stable-diffusion-v2-512",
                  Arch.SDXL: "stable-diffusion-xl-v1-base"}


@dataclass(frozen=True)
class SavedCheckpoint:
    """What `save_checkpoint` wrote (None for what it did not)."""

    path: str
    yaml_path: str | None
    text_encoder_dir: str | None


def save_checkpoint(model: SDModel, path: str | os.PathLike, *, dtype: torch.dtype = torch.float16,
                    write_yaml: bool = True, tokenizer_dir: str | os.PathLike | None = None,
                    text_encoder_ref: str = "webui") -> SavedCheckpoint:
    """Save `model` as `<path>` (LDM/SGM single file, atomic) and, with write_yaml, `<stem>.yaml` beside it.

    The file is byte-reproducible (metadata in a fixed order), so the web UI's checkpoint hash of the same
    weights never changes. `text_encoder_ref` says how the yaml names the text-encoder folder (where one is
    needed): "webui" as `models/Stable-diffusion/<stem>.text_encoder`, relative to the web UI's folder (its
    working directory), so the three files load once copied there, wherever they were written; "absolute" as
    the absolute path of the folder written here (for a web UI started with --ckpt-dir or --data-dir).

    Raises:
        ConfigError: path not `.safetensors`; modules that are not diffusers/transformers ones; with
            write_yaml, a model the web UI's code cannot build (the reasons are listed; nothing is written).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError("path", str(path), "a checkpoint is saved as .safetensors")
    if text_encoder_ref not in TEXT_ENCODER_REFS:
        raise ConfigError("text_encoder_ref", text_encoder_ref, f"must be one of {TEXT_ENCODER_REFS}")
    config = config_of(model)
    yaml_path, te_dir, yaml_text = path.with_suffix(".yaml"), None, None
    if write_yaml:
        if needs_text_encoder_dir(config):
            te_dir = path.with_name(path.stem + ".text_encoder").resolve()
        yaml_text = render_ldm_yaml(config, _text_encoder_ref(te_dir, text_encoder_ref) if te_dir else None)
    elif yaml_path.exists():
        warnings.warn(f"{yaml_path} was not written by this save but will be read with {path.name} "
                      "(by the web UI and by load_checkpoint); remove it if it describes another model", stacklevel=2)
    save_file(ldm_state_dict(model, config, dtype), path, _metadata(config, path.stem))
    if yaml_text is None:
        return SavedCheckpoint(str(path), None, None)
    if te_dir:
        _write_text_encoder_dir(te_dir, config.text_encoders[0], Path(tokenizer_dir or DEFAULT_TOKENIZER_DIR))
    _write_text_atomic(yaml_path, yaml_text)
    return SavedCheckpoint(str(path), str(yaml_path), str(te_dir) if te_dir else None)


def _text_encoder_ref(folder: Path, how: str) -> str:
    # transformers resolves a relative `version` against the working directory, which is the web UI's own
    # folder: the model card's "copy the three files into models/Stable-diffusion" then works wherever they
    # were exported, and moving the export folder breaks nothing.
    return str(folder) if how == "absolute" else f"{WEBUI_CHECKPOINT_DIR}/{folder.name}"


def config_of(model: SDModel) -> SDConfig:
    """The `SDConfig` of loaded diffusers/transformers modules."""
    for name, module in (("unet", model.unet), ("vae", model.vae)):
        if not isinstance(getattr(module, "config", None), dict):
            raise ConfigError(f"model.{name}", type(module).__name__, "expected a diffusers module with a config")
    for index, te in enumerate(model.text_encoders):
        if not hasattr(getattr(te, "config", None), "hidden_size"):
            raise ConfigError(f"model.text_encoders[{index}]", type(te).__name__, "expected a transformers CLIP model")
    # The VAE config's own scaling_factor is diffusers' default unless the loader set it; the model's factor is
    # the one its latents use (and the yaml's scale_factor), so the metadata records that one.
    vae = {**_plain(model.vae.config), "scaling_factor": float(model.vae_scale_factor)}
    return SDConfig(
        arch=model.arch, unet=_plain(model.unet.config), vae=vae,
        text_encoders=tuple({f: getattr(te.config, f) for f in TE_CONFIG_FIELDS if hasattr(te.config, f)}
                            for te in model.text_encoders),
        prediction_type=model.prediction_type, resolution=model.resolution, vae_scale_factor=model.vae_scale_factor,
    )


def _plain(config: Any) -> dict[str, Any]:
    def conv(v):
        return [conv(x) for x in v] if isinstance(v, (list, tuple)) else v

    return {k: conv(v) for k, v in config.items() if not k.startswith("_")}


def ldm_state_dict(model: SDModel, config: SDConfig | None = None,
                   dtype: torch.dtype | None = torch.float16) -> dict[str, torch.Tensor]:
    """All components' tensors under their LDM/SGM single-file names (floats cast to `dtype` if given)."""
    config = config or config_of(model)
    out: dict[str, torch.Tensor] = {}
    layout = unet_from_diffusers(config.unet)[0].layout
    try:
        unet = convert_state_dict(model.unet.state_dict(), layout, to="compvis")
    except KeyError as exc:
        raise KeyMapError(f"U-Net: {exc.args[0]}; it has no LDM name") from None
    out.update({UNET_PREFIX + k: v for k, v in unet.items()})
    flip = ldm_keys.vae_flip(len(config.vae["block_out_channels"]))
    vae = _checked(ldm_keys.to_ldm(model.vae.state_dict(), ldm_keys.VAE_RULES, flip), "VAE")
    out.update({VAE_PREFIX + k: v for k, v in vae.items()})
    for slot, te, te_cfg in zip(TEXT_ENCODERS[config.arch], model.text_encoders, config.text_encoders):
        sd = ldm_keys.with_text_model_prefix(te.state_dict())
        sd.pop("text_model.embeddings.position_ids", None)  # a buffer transformers 4 saved; rebuilt on load
        rules = ldm_keys.CLIP_RULES if slot.kind == "clip" else ldm_keys.OPENCLIP_RULES
        tensors = _checked(ldm_keys.to_ldm(sd, rules), f"text encoder ({slot.prefix})")
        if slot.drop_last:
            tensors.update(_identity_block(te_cfg, next(iter(tensors.values()))))
        out.update({slot.prefix + k: v for k, v in tensors.items()})
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    if config.arch is Arch.SDXL and config.prediction_type == "v_prediction":
        out[V_PREDICTION_MARKER] = torch.zeros(0)  # how ComfyUI and Forge recognise SDXL v-prediction files
    return out


def _checked(converted: ldm_keys.ConvertedKeys, what: str) -> dict[str, torch.Tensor]:
    if converted.unused:
        raise KeyMapError(f"{what}: {len(converted.unused)} tensors have no LDM name: {converted.unused[:5]}")
    return converted.tensors


def _identity_block(te_cfg: dict[str, Any], like: torch.Tensor) -> dict[str, torch.Tensor]:
    """A residual block that passes its input through: the unused last OpenCLIP block of SD2 files.

    Zero output projections make both residual branches add exactly 0, so the block is the identity
    whether a reader drops it (our loader, diffusers) or runs it.
    """
    d, i, n = int(te_cfg["hidden_size"]), int(te_cfg["intermediate_size"]), int(te_cfg["num_hidden_layers"])
    p = f"transformer.resblocks.{n}."
    z = {"dtype": like.dtype, "device": like.device}
    return {
        p + "ln_1.weight": torch.ones(d, **z), p + "ln_1.bias": torch.zeros(d, **z),
        p + "attn.in_proj_weight": torch.zeros(3 * d, d, **z), p + "attn.in_proj_bias": torch.zeros(3 * d, **z),
        p + "attn.out_proj.weight": torch.zeros(d, d, **z), p + "attn.out_proj.bias": torch.zeros(d, **z),
        p + "ln_2.weight": torch.ones(d, **z), p + "ln_2.bias": torch.zeros(d, **z),
        p + "mlp.c_fc.weight": torch.zeros(i, d, **z), p + "mlp.c_fc.bias": torch.zeros(i, **z),
        p + "mlp.c_proj.weight": torch.zeros(d, i, **z), p + "mlp.c_proj.bias": torch.zeros(d, **z),
    }


def _metadata(config: SDConfig, title: str) -> dict[str, str]:
    arch = MODELSPEC_ARCH[config.arch]
    if config.arch is Arch.SD2 and config.prediction_type == "v_prediction":
        arch = "stable-diffusion-v2-768-v"
    return {
        METADATA_KEY: config.to_json(),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": arch,
        "modelspec.title": title,
        "modelspec.resolution": f"{config.resolution}x{config.resolution}",
        "modelspec.prediction_type": "v" if config.prediction_type == "v_prediction" else "epsilon",
    }


def _write_text_encoder_dir(folder: Path, te_cfg: dict[str, Any], tokenizer_dir: Path) -> None:
    """config.json (transformers 4 and 5 read it) + the CLIP tokenizer files, for the yaml's `version`."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **te_cfg,
              "torch_dtype": "float32"}
    _write_text_atomic(folder / "config.json", json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, folder / name)


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, default_file_mode())  # mkstemp makes 0600 files; a web UI running as another user reads these
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
