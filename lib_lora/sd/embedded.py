"""The embedded tiny SD1 model shipped in `models/tiny-sd1` (made by tools/build_tiny_model.py).

Trained on procedural "coloured shapes" scenes (lib_lora/sd/shapes.py): it draws prompts such as "a red
circle on a blue background" at 64x64. For teaching and tests, with the module tree of real SD1.5.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from lib_lora.errors import FileFormatError
from lib_lora.io import load_file
from lib_lora.sd.model import NoiseSchedule, SDModel
from lib_lora.types import Arch

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
EMBEDDED_DIR = MODELS_DIR / "tiny-sd1"
TOKENIZER_DIR = MODELS_DIR / "tokenizer"
NAME = "tiny-sd1"
WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
           "text_encoder": "model.safetensors"}
TE_PREFIX = "text_model."


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileFormatError(path, "missing (rebuild with tools/build_tiny_model.py)") from None
    except json.JSONDecodeError as exc:
        raise FileFormatError(path, f"not valid JSON: {exc}") from None


def match_text_encoder_keys(tensors: dict[str, torch.Tensor], module_keys: set[str]) -> dict[str, torch.Tensor]:
    """Re-spell CLIP text-encoder keys for the module at hand.

    Files use `text_model.encoder...` (transformers 4, the web UI, sd-scripts); transformers 5's flattened
    CLIPTextModel calls the same tensors `encoder...`. Either spelling loads into either module tree.
    """
    out = {}
    for key, value in tensors.items():
        bare = key[len(TE_PREFIX):] if key.startswith(TE_PREFIX) else key
        # `text_projection` (SDXL's second encoder) sits beside `text_model` in both trees
        out[TE_PREFIX + bare if TE_PREFIX + bare in module_keys else bare if bare in module_keys else key] = value
    return out


def _load_weights(module: torch.nn.Module, path: Path, text_encoder: bool = False) -> None:
    tensors = load_file(path).tensors
    expected = module.state_dict()
    if text_encoder:
        tensors = match_text_encoder_keys(tensors, set(expected))
        # position_ids: a saved buffer in transformers 4 (so the file has it), not a state-dict entry in 5.
        tensors = {k: v for k, v in tensors.items() if k in expected or not k.endswith("position_ids")}
    # position_ids is a buffer some transformers versions save and others do not.
    missing = sorted(k for k in expected if k not in tensors and not k.endswith("position_ids"))
    unexpected = sorted(k for k in tensors if k not in expected)
    if missing or unexpected:
        raise FileFormatError(path, f"keys do not fit the config: missing {missing[:5]} ({len(missing)}), "
                                    f"unexpected {unexpected[:5]} ({len(unexpected)})")
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise FileFormatError(path, f"{key}: expected shape {tuple(expected[key].shape)}, "
                                        f"got {tuple(value.shape)}")
    module.load_state_dict(tensors, strict=False)


def embedded_hash(folder: Path = EMBEDDED_DIR) -> str:
    """Short hash (10 hex, like the web UI's) over the three weight files, in a fixed order."""
    h = hashlib.sha256()
    for sub in ("unet", "text_encoder", "vae"):
        h.update(hashlib.sha256((folder / sub / WEIGHTS[sub]).read_bytes()).digest())
    return h.hexdigest()[:10]


def load_embedded(device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  folder: str | Path = EMBEDDED_DIR) -> SDModel:
    """Load the embedded model. dtype None: float32 on CPU, float16 on a GPU (weights are stored in fp16)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    info = _read_json(folder / "model.json")
    unet = UNet2DConditionModel.from_config(_read_json(folder / "unet" / "config.json"))
    vae = AutoencoderKL.from_config(_read_json(folder / "vae" / "config.json"))
    te = CLIPTextModel(CLIPTextConfig.from_dict(_read_json(folder / "text_encoder" / "config.json")))
    _load_weights(unet, folder / "unet" / WEIGHTS["unet"])
    _load_weights(vae, folder / "vae" / WEIGHTS["vae"])
    _load_weights(te, folder / "text_encoder" / WEIGHTS["text_encoder"], text_encoder=True)
    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "cpu" else torch.float16
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    model = SDModel(
        arch=Arch(info.get("arch", "sd1")), unet=unet, text_encoders=[te], tokenizers=[tokenizer], vae=vae,
        prediction_type=info.get("prediction_type", "epsilon"), resolution=int(info.get("resolution", 64)),
        schedule=NoiseSchedule(**info.get("schedule", {})), name=info.get("name", NAME), path=str(folder),
        short_hash=embedded_hash(folder), vae_scale_factor=float(info["vae_scale_factor"]),
    )
    for m in model.modules():
        m.eval().requires_grad_(False)
    return model.to(device, dtype)


def evaluate_held_out(model: SDModel, *, steps: int = 20, sampler: str = "Euler a", cfg_scale: float = 7.0,
                      base_seed: int = 1000):
    """Generate the 40 held-out prompts of the shapes world (seed base_seed + i) and score them.

    Returns (EvalReport, images). Used by the model builder and by the test of the shipped weights.
    """
    from lib_lora.sd.pipeline import GenerationParams, generate
    from lib_lora.sd.shapes import HELD_OUT, evaluate

    images = []
    for i, combo in enumerate(HELD_OUT):
        params = GenerationParams(combo.caption, sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=base_seed + i)
        images.extend(generate(model, params).images)
    return evaluate(images, HELD_OUT), images
