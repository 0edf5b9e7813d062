"""Recipes for tiny, structurally faithful SD1 / SD2 / SDXL models (random weights, seeded).

Same module trees as the real models, so kohya finds the same targets (SD1: U-Net 192, TE 72), at a
size that runs on a CPU in milliseconds. Used by tests, benchmarks and the embedded-model builder.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SD1_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
)
SD2_UNET = dict(SD1_UNET, use_linear_projection=True, attention_head_dim=(2, 4, 8, 8))
SDXL_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 2), cross_attention_dim=96, attention_head_dim=(2, 4, 8),
    use_linear_projection=True, norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,
)
CLIP_TE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=12, vocab_size=49408,
               max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
               hidden_act="quick_gelu")
SD2_TE = dict(CLIP_TE, hidden_act="gelu")
SDXL_TE2 = dict(CLIP_TE, hidden_size=32, intermediate_size=64, num_attention_heads=4, projection_dim=32,
                hidden_act="gelu")
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 32, 32), layers_per_block=1,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8,
           sample_size=128)
# The compvis-layout twin of SD1_UNET in the `ldm` package the web UI runs (test-only dependency); with
# 32 norm groups (ldm's fixed GroupNorm32) and 8 heads (diffusers reads attention_head_dim as a head count)
# the two compute the same function once weights are converted.
LDM_SD1_UNET = dict(image_size=16, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
                    num_res_blocks=2, channel_mult=[1, 1, 2, 2], num_heads=8, use_spatial_transformer=True,
                    transformer_depth=1, context_dim=64, legacy=False)


@dataclass
class TinyComponents:
    unet: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    vae: torch.nn.Module | None
    prediction_type: str


def tiny_components(arch: str, seed: int = 0, with_vae: bool = True) -> TinyComponents:
    """Build the tiny model of `arch` ('sd1', 'sd2', 'sdxl') with seeded random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    if arch == "sdxl":
        unet = UNet2DConditionModel(**SDXL_UNET)
        tes = [CLIPTextModel(CLIPTextConfig(**CLIP_TE)), CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TE2))]
    elif arch == "sd2":
        unet = UNet2DConditionModel(**SD2_UNET)
        tes = [CLIPTextModel(CLIPTextConfig(**SD2_TE))]
    elif arch == "sd1":
        unet = UNet2DConditionModel(**SD1_UNET)
        tes = [CLIPTextModel(CLIPTextConfig(**CLIP_TE))]
    else:
        raise ValueError(f"unknown tiny architecture {arch!r} (sd1, sd2, sdxl)")
    vae = AutoencoderKL(**VAE) if with_vae else None
    for m in [unet, *tes, *([vae] if vae else [])]:
        m.eval().requires_grad_(False)
    return TinyComponents(unet, tes, vae, "v_prediction" if arch == "sd2" else "epsilon")


def tiny_ldm_unet(seed: int = 0) -> torch.nn.Module:
    """The tiny SD1 U-Net in compvis layout, built with the web UI's own `ldm` code (test-only package)."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    return UNetModel(**LDM_SD1_UNET).eval().requires_grad_(False)
