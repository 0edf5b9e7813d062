"""Where each component lives in a single-file checkpoint, per architecture, and what files carry besides.

SD1 (LDM): `model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.*` (CLIP-L in
transformers layout). SD2 (LDM): the same with `cond_stage_model.model.*` (OpenCLIP ViT-H). SDXL (SGM):
`conditioner.embedders.0.transformer.*` (CLIP-L) and `conditioner.embedders.1.model.*` (OpenCLIP bigG).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lib_lora.errors import KeyMapError
from lib_lora.types import Arch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
METADATA_KEY = "lora_studio.sd_config"
DEFAULT_TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "models" / "tokenizer"


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder of an architecture: its key prefix in the file and its tower type."""

    prefix: str
    kind: str  # 'clip' (transformers layout) | 'openclip'
    with_projection: bool = False
    drop_last: bool = False  # SD2 conditions on the penultimate block: the last one is unused


TEXT_ENCODERS = {
    Arch.SD1: (TextEncoderSlot("cond_stage_model.transformer.", "clip"),),
    Arch.SD2: (TextEncoderSlot("cond_stage_model.model.", "openclip", drop_last=True),),
    Arch.SDXL: (TextEncoderSlot("conditioner.embedders.0.transformer.", "clip"),
                TextEncoderSlot("conditioner.embedders.1.model.", "openclip", with_projection=True)),
}

# Tensors full checkpoints carry that no diffusers module holds, with the reason they are not needed.
IGNORED_TOP = {
    "betas": "noise schedule (rebuilt from the config)", "alphas_cumprod": "noise schedule",
    "alphas_cumprod_prev": "noise schedule", "sqrt_alphas_cumprod": "noise schedule",
    "sqrt_one_minus_alphas_cumprod": "noise schedule", "log_one_minus_alphas_cumprod": "noise schedule",
    "sqrt_recip_alphas_cumprod": "noise schedule", "sqrt_recipm1_alphas_cumprod": "noise schedule",
    "posterior_variance": "noise schedule", "posterior_log_variance_clipped": "noise schedule",
    "posterior_mean_coef1": "noise schedule", "posterior_mean_coef2": "noise schedule",
    "logvar": "training loss weights", "lvlb_weights": "training loss weights",
    "denoiser.sigmas": "noise schedule", "denoiser.log_sigmas": "noise schedule",
}
IGNORED_PREFIXES = {
    "model_ema.": "EMA copy of the U-Net (the file's live weights are used)",
    "first_stage_model.loss.": "VAE training loss (discriminator, LPIPS)",
}
IGNORED_SUFFIXES = {"embeddings.position_ids": "position id buffer, rebuilt by the model"}
# Empty marker tensors some SDXL fine-tunes carry (the ComfyUI/Forge convention) and what they mean.
V_PREDICTION_MARKER = "v_pred"
MARKERS = {
    V_PREDICTION_MARKER: "marker: the model predicts v (read as its prediction type)",
    "ztsnr": "marker: trained with zero-terminal SNR (the noise schedule is not rescaled here)",
}
UNSUPPORTED_MARKERS = {"edm_mean": "an EDM model (Playground v2.5)",
                       "edm_vpred.sigma_max": "an EDM v-prediction model"}
LORA_HINTS = ("lora_", "lycoris_", "hada_", "oft_", "lokr_")


def classify_ignored(key: str) -> str | None:
    """The reason a checkpoint key is not needed, or None if it should have a place in the model."""
    if key in IGNORED_TOP:
        return IGNORED_TOP[key]
    for prefix, reason in IGNORED_PREFIXES.items():
        if key.startswith(prefix):
            return reason
    for suffix, reason in IGNORED_SUFFIXES.items():
        if key.endswith(suffix):
            return reason
    return None


def summarize_keys(keys: Iterable[str], limit: int = 8) -> str:
    """'model (686), first_stage_model (248), ...': what a file holds, for error messages."""
    counts: Counter[str] = Counter()
    for key in keys:
        head = key.split(".", 1)[0]
        if head.startswith(LORA_HINTS):
            head = "_".join(head.split("_")[:2]) + "_*"
        counts[head] += 1
    if not counts:
        return "no tensors"
    shown = ", ".join(f"{head} ({n})" for head, n in counts.most_common(limit))
    more = len(counts) - limit
    return shown + (f", and {more} more groups" if more > 0 else "")


def detect_arch(state_dict_keys: Iterable[str]) -> Arch:
    """SD1, SD2 or SDXL from the key names of a single-file checkpoint (no tensors needed).

    Raises:
        KeyMapError: not a full SD1/SD2/SDXL checkpoint (the message lists what the keys hold).
    """
    keys = list(state_dict_keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has(UNET_PREFIX):
        if has("conditioner.embedders.1.model.transformer.resblocks.") and has("conditioner.embedders.0.transformer."):
            return Arch.SDXL
        if has("conditioner.embedders.0.model.transformer.resblocks."):
            raise KeyMapError("an SDXL refiner checkpoint (OpenCLIP bigG as the only text encoder): not supported")
        if has("cond_stage_model.model.transformer.resblocks."):
            return Arch.SD2
        if has("cond_stage_model.transformer."):
            return Arch.SD1
    hint = ""
    if any(k.split(".", 1)[0].startswith(LORA_HINTS) for k in keys):
        hint = " It looks like a LoRA/LyCORIS network file, not a model checkpoint."
    elif has("down_blocks.") or has("unet.") or has("text_model."):
        hint = " It looks like diffusers-format weights, not a single-file checkpoint."
    raise KeyMapError("not an SD1.x/SD2.x/SDXL single-file checkpoint: expected model.diffusion_model.* with "
                      "cond_stage_model.transformer.* (SD1), cond_stage_model.model.* (SD2) or "
                      f"conditioner.embedders.* (SDXL); found {summarize_keys(keys)}.{hint}")
