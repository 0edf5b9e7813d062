"""SD1 / SD2 / SDXL models saved as diffusers folders (`save_pretrained` / the hub's layout), read offline.

    model_index.json            (optional: the class names; our embedded model has model.json instead)
    unet/        config.json + diffusion_pytorch_model[.fp16].safetensors (or sharded, or .bin)
    vae/         config.json + diffusion_pytorch_model[.fp16].safetensors
    text_encoder/, text_encoder_2/ (SDXL)   config.json + model[.fp16].safetensors
    tokenizer/, tokenizer_2/    vocab.json + merges.txt (optional: the shipped CLIP tokenizer is used otherwise)
    scheduler/scheduler_config.json  prediction_type and the training betas (optional: SD's defaults)

Modules are built from their configs and filled from the weight files through `lib_lora.io` (safetensors with a
checked header; `.bin` only with `torch.load(weights_only=True)`); nothing is fetched from a hub. The
architecture comes from the parts: a second text encoder is SDXL; a text encoder with OpenCLIP's `gelu` is SD2.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from lib_lora.errors import FileFormatError
from lib_lora.io import load_state_dict
from lib_lora.sd.model import NoiseSchedule, SDModel
from lib_lora.types import Arch

WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                "text_encoder_2": "model"}
PREDICTION_TYPES = ("epsilon", "v_prediction")


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "unet" / "config.json").is_file()


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileFormatError(str(path), "missing: a diffusers model folder needs unet/, vae/ and text_encoder/ "
                                         "with their config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FileFormatError(str(path), f"not valid JSON: {exc}") from None


def weight_files(part: Path, stem: str) -> list[Path]:
    """The weight file(s) of one part: safetensors before .bin, the full-precision file before the fp16 variant,
    every shard of a sharded save."""
    for suffix in (".safetensors", ".fp16.safetensors", ".bin", ".fp16.bin"):
        single = part / f"{stem}{suffix}"
        if single.is_file():
            return [single]
        index = part / f"{stem}{suffix}.index.json"
        if index.is_file():
            shards = sorted(set(_json(index).get("weight_map", {}).values()))
            return [part / s for s in shards]
    raise FileFormatError(str(part), f"no weights: expected {stem}.safetensors (or .bin, or an fp16 variant)")


def folder_hash(folder: Path) -> str:
    """Short hash (10 hex, as the web UI shows) over the weight files of every part, in a fixed order."""
    h = hashlib.sha256()
    for name, stem in sorted(WEIGHT_STEMS.items()):
        if (folder / name).is_dir():
            for file in weight_files(folder / name, stem):
                with open(file, "rb") as f:
                    h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()[:10]


def _fill(module: torch.nn.Module, part: Path, stem: str, *, text_encoder: bool = False) -> None:
    from lib_lora.sd.embedded import match_text_encoder_keys

    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(part, stem):
        tensors.update(load_state_dict(file).tensors)
    expected = module.state_dict()
    if text_encoder:  # transformers 4 and 5 spell CLIP's keys differently; position_ids is a buffer in 4 only
        tensors = {k: v for k, v in match_text_encoder_keys(tensors, set(expected)).items()
                   if k in expected or not k.endswith("position_ids")}
    missing = sorted(k for k in expected if k not in tensors and not k.endswith("position_ids"))
    unexpected = sorted(k for k in tensors if k not in expected)
    if missing or unexpected:
        raise FileFormatError(str(part), f"weights do not fit config.json: missing {missing[:3]} ({len(missing)}), "
                                         f"unexpected {unexpected[:3]} ({len(unexpected)})")
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise FileFormatError(str(part), f"{key}: config.json gives shape {tuple(expected[key].shape)}, the "
                                             f"weights {tuple(value.shape)}")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=False)


def _arch(folder: Path, te_config: dict) -> Arch:
    if (folder / "text_encoder_2" / "config.json").is_file():
        return Arch.SDXL
    return Arch.SD2 if te_config.get("hidden_act") == "gelu" else Arch.SD1


def _tokenizers(folder: Path, arch: Arch) -> list:
    from transformers import CLIPTokenizer

    from lib_lora.sd.checkpoint import load_tokenizers

    shipped = load_tokenizers(arch)
    out = []
    for i, name in enumerate(("tokenizer", "tokenizer_2")[:len(shipped)]):
        sub = folder / name
        if (sub / "vocab.json").is_file() and (sub / "merges.txt").is_file():
            out.append(CLIPTokenizer.from_pretrained(str(sub), pad_token=shipped[i].pad_token,
                                                     model_max_length=77))
        else:
            out.append(shipped[i])
    return out


def load_diffusers_folder(folder: str | Path, *, device: str | torch.device = "cpu",
                          dtype: torch.dtype | None = None, arch: Arch | None = None,
                          prediction_type: str | None = None) -> SDModel:
    """An `SDModel` from a diffusers folder. `arch` / `prediction_type`, when given, must agree with / override
    what the folder says (as `v2` / `v_parameterization` do for single files).

    Raises:
        FileFormatError: a missing part, config or weight file, or weights that do not fit a config (named).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    unet_cfg, vae_cfg = _json(folder / "unet" / "config.json"), _json(folder / "vae" / "config.json")
    te_cfg = _json(folder / "text_encoder" / "config.json")
    found = _arch(folder, te_cfg)
    if arch is not None and arch is not found:
        raise FileFormatError(str(folder), f"expected an {arch.label} model, but its parts are {found.label}'s")
    unet = UNet2DConditionModel.from_config(unet_cfg)
    vae = AutoencoderKL.from_config(vae_cfg)
    encoders = [CLIPTextModel(CLIPTextConfig.from_dict(te_cfg))]
    if found is Arch.SDXL:
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig.from_dict(
            _json(folder / "text_encoder_2" / "config.json"))))
    _fill(unet, folder / "unet", WEIGHT_STEMS["unet"])
    _fill(vae, folder / "vae", WEIGHT_STEMS["vae"])
    for te, name in zip(encoders, ("text_encoder", "text_encoder_2")):
        _fill(te, folder / name, WEIGHT_STEMS[name], text_encoder=True)
    sched = _json(folder / "scheduler" / "scheduler_config.json") \
        if (folder / "scheduler" / "scheduler_config.json").is_file() else {}
    prediction = prediction_type or sched.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise FileFormatError(str(folder / "scheduler"), f"prediction_type {prediction!r} is not one of "
                                                         f"{PREDICTION_TYPES}")
    schedule = NoiseSchedule(**{k: sched[k] for k in ("num_train_timesteps", "beta_start", "beta_end",
                                                      "beta_schedule") if k in sched})
    downscale = 2 ** (len(vae_cfg.get("block_out_channels", (0, 0, 0, 0))) - 1)
    model = SDModel(arch=found, unet=unet, text_encoders=encoders, tokenizers=_tokenizers(folder, found), vae=vae,
                    prediction_type=prediction, resolution=int(unet_cfg.get("sample_size", 64)) * downscale,
                    schedule=schedule, name=folder.name, path=str(folder), short_hash=folder_hash(folder),
                    vae_scale_factor=float(vae_cfg.get("scaling_factor", 0.18215)))
    for m in model.modules():
        m.eval().requires_grad_(False)
    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "cpu" else torch.float16
    return model.to(device, dtype)
