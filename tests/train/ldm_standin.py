"""A stand-in for the web UI's loaded model (`shared.sd_model`), built on the web UI's own `ldm` code.

Exactly the attributes the LDM family reads (host-api.md section 6): `model.diffusion_model` (the real ldm
`UNetModel`), `cond_stage_model` wrapped as the web UI's hijack wraps it (`.wrapped` = the ldm embedder with
`.transformer`/`.tokenizer`, or `.model` for OpenCLIP), SDXL's `conditioner.embedders`, `encode_first_stage`
(an ldm `DiagonalGaussianDistribution`) + `get_first_stage_encoding`, `alphas_cumprod`, `parameterization`,
`is_sd1/is_sd2/is_sdxl`, and Forge's inference-mode `get_learned_conditioning` (which training must not use).

The `*_pair` builders return a diffusers `SDModel` and a stand-in holding the SAME weights (converted to the
LDM layouts), so the two families can be compared number for number.
"""
from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn

from lib_lora.sd import ldm_keys
from lib_lora.sd.checkpoint import load_tokenizers
from lib_lora.sd.model import SDModel
from lib_lora.sd.tiny import LDM_SD1_UNET, tiny_components
from lib_lora.train.losses import alphas_cumprod_for
from lib_lora.types import Arch
from lib_lora.unet_layout import SD_LAYOUT, convert_state_dict

SCALE = {Arch.SD1: 0.18215, Arch.SD2: 0.18215, Arch.SDXL: 0.13025}


class CLIPEmbedder(nn.Module):
    """ldm `FrozenCLIPEmbedder` (and sgm's, for SDXL's CLIP-L) without its hub download."""

    def __init__(self, transformer: nn.Module, tokenizer, layer: str = "last", layer_idx: int | None = None):
        super().__init__()
        self.transformer, self.tokenizer = transformer, tokenizer
        self.layer, self.layer_idx, self.max_length = layer, layer_idx, 77


class OpenClipBlock(nn.Module):
    """open_clip `ResidualAttentionBlock` (sequence first, as open_clip 2.20 in the web UI)."""

    def __init__(self, width: int, heads: int, mlp: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ls_1, self.ls_2 = nn.Identity(), nn.Identity()
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, mlp), gelu=nn.GELU(),
                                             c_proj=nn.Linear(mlp, width)))

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        h = self.ln_1(q_x)
        x = q_x + self.ls_1(self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0])
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class OpenClipText(nn.Module):
    """The text half of an open_clip `CLIP` (the web UI deletes `.visual`)."""

    def __init__(self, width: int, layers: int, heads: int, mlp: int, projection: int | None = None):
        super().__init__()
        self.token_embedding = nn.Embedding(49408, width)
        self.positional_embedding = nn.Parameter(torch.zeros(77, width))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(OpenClipBlock(width, heads, mlp) for _ in range(layers))
        self.transformer.grad_checkpointing = False
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.zeros(width, projection or width))
        self.register_buffer("attn_mask", torch.full((77, 77), float("-inf")).triu(1), persistent=False)


class OpenCLIPEmbedder(nn.Module):
    """ldm `FrozenOpenCLIPEmbedder` (SD2: layer 'penultimate', layer_idx 1) / sgm's `FrozenOpenCLIPEmbedder2`."""

    def __init__(self, model: OpenClipText, layer_idx: int = 1):
        super().__init__()
        self.model, self.layer, self.layer_idx = model, "penultimate", layer_idx


class CustomWords(nn.Module):
    """The web UI's hijack wrapper (`FrozenCLIPEmbedderWithCustomWords` & co.): keeps the embedder as `.wrapped`."""

    def __init__(self, wrapped: nn.Module):
        super().__init__()
        self.wrapped = wrapped

    def forward(self, texts: list[str]) -> torch.Tensor:
        inner = self.wrapped
        ids = inner.tokenizer(texts, padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids
        return inner.transformer(ids).last_hidden_state


class StandinSDModel(nn.Module):
    """`shared.sd_model` as far as training reads it."""

    def __init__(self, arch: Arch, unet: nn.Module, text: nn.Module, vae: nn.Module, parameterization: str):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = unet
        if arch is Arch.SDXL:
            self.conditioner = text
            self.cond_stage_model = text
        else:
            self.cond_stage_model = text
        self.first_stage_model = vae
        self.register_buffer("alphas_cumprod", alphas_cumprod_for())
        self.parameterization, self.scale_factor = parameterization, SCALE[arch]
        self.is_sdxl, self.is_sd2, self.is_sd1 = arch is Arch.SDXL, arch is Arch.SD2, arch is Arch.SD1
        self.sd_model_hash = "standin"

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor):
        from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

        vae = self.first_stage_model
        return DiagonalGaussianDistribution(vae.quant_conv(vae.encoder(x)))

    def get_first_stage_encoding(self, encoder_posterior):
        z = encoder_posterior.sample() if hasattr(encoder_posterior, "sample") else encoder_posterior
        return self.scale_factor * z

    @torch.inference_mode()  # as Forge decorates it: outputs cannot take part in backward
    def get_learned_conditioning(self, texts: list[str]) -> torch.Tensor:
        return self.cond_stage_model(texts)


def open_clip_from(te: nn.Module, extra_blocks: int = 0, seed: int = 0) -> OpenClipText:
    """An OpenCLIP tower holding the weights of a transformers CLIP text model (+ random unused blocks)."""
    cfg = te.config
    tower = OpenClipText(cfg.hidden_size, cfg.num_hidden_layers + extra_blocks, cfg.num_attention_heads,
                         cfg.intermediate_size,
                         getattr(cfg, "projection_dim", None) if hasattr(te, "text_projection") else None)
    converted = ldm_keys.to_ldm(ldm_keys.with_text_model_prefix(te.state_dict()), ldm_keys.OPENCLIP_RULES)
    torch.manual_seed(seed)
    missing, unexpected = tower.load_state_dict(converted.tensors, strict=False)
    layers = cfg.num_hidden_layers
    extra = [k for k in missing if k.startswith("transformer.resblocks.") and int(k.split(".")[2]) >= layers]
    assert not unexpected and set(missing) - set(extra) <= {"text_projection"}, (missing, unexpected)
    return tower.eval().requires_grad_(False)


def _diffusers_model(arch: Arch, seed: int) -> SDModel:
    c = tiny_components(arch.value, seed=seed)
    return SDModel(arch, c.unet, c.text_encoders, load_tokenizers(arch), c.vae, c.prediction_type,
                   resolution=64, vae_scale_factor=SCALE[arch])


def _ldm_unet(diffusers_unet: nn.Module, use_checkpoint: bool) -> nn.Module:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**dict(LDM_SD1_UNET, use_checkpoint=use_checkpoint)).eval()
    unet.load_state_dict(convert_state_dict(diffusers_unet.state_dict(), SD_LAYOUT, "compvis"))
    return unet.requires_grad_(True)  # the web UI's U-Net weights are not frozen: the family must do it


def sd1_pair(seed: int = 0, use_checkpoint: bool = False) -> tuple[SDModel, StandinSDModel]:
    """Tiny SD1 as diffusers modules and as a web UI model with the same weights.

    use_checkpoint: build the ldm U-Net as v1-inference.yaml does (ldm's own checkpointed blocks)."""
    model = _diffusers_model(Arch.SD1, seed)
    tokenizer = load_tokenizers(Arch.SD1)[0]
    text = CustomWords(CLIPEmbedder(copy.deepcopy(model.text_encoders[0]), tokenizer))
    standin = StandinSDModel(Arch.SD1, _ldm_unet(model.unet, use_checkpoint), text, copy.deepcopy(model.vae), "eps")
    return model, standin


def sd2_pair(seed: int = 1) -> tuple[SDModel, StandinSDModel]:
    """Tiny SD2 (v-prediction); the stand-in's text encoder is an OpenCLIP tower with one more (unused)
    block than the diffusers encoder, as SD2 files have 24 blocks and diffusers keeps 23. Its U-Net is the
    tiny ldm SD1 U-Net (same context width; the SD2 diffusers U-Net's per-level head counts have no ldm twin)."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    model = _diffusers_model(Arch.SD2, seed)
    tower = open_clip_from(model.text_encoders[0], extra_blocks=1, seed=seed)
    text = CustomWords(OpenCLIPEmbedder(tower, layer_idx=1))
    torch.manual_seed(seed)
    unet = UNetModel(**LDM_SD1_UNET).eval()
    return model, StandinSDModel(Arch.SD2, unet, text, copy.deepcopy(model.vae), "v")


def sgm_like_unet(seed: int = 0, context_dim: int = 96, adm_in_channels: int = 80) -> nn.Module:
    """An ldm U-Net in SDXL's compvis layout (3 levels, attention on levels 1-2, linear projections) with
    SGM's `label_emb` (Sequential(Sequential(Linear, SiLU, Linear))) taking the `y` vector."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    unet = UNetModel(image_size=16, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2, 4],
                     num_res_blocks=2, channel_mult=[1, 2, 2], num_head_channels=8, use_spatial_transformer=True,
                     transformer_depth=1, context_dim=context_dim, legacy=False, use_linear_in_transformer=True,
                     num_classes="continuous")
    ted = 32 * 4
    unet.label_emb = nn.Sequential(nn.Sequential(nn.Linear(adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted)))
    with torch.no_grad():  # ldm zero-initialises output convs, which would block every gradient
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return unet.eval()


def sdxl_pair(seed: int = 2) -> tuple[SDModel, StandinSDModel]:
    """Tiny SDXL; the stand-in's conditioner holds CLIP-L (transformers) and bigG as an OpenCLIP tower with
    the same weights. Its U-Net is an SGM-layout ldm U-Net (not numerically the diffusers one)."""
    model = _diffusers_model(Arch.SDXL, seed)
    te1, te2 = model.text_encoders
    toks = load_tokenizers(Arch.SDXL)
    conditioner = nn.Module()
    conditioner.embedders = nn.ModuleList([
        CustomWords(CLIPEmbedder(copy.deepcopy(te1), toks[0], layer="hidden", layer_idx=11)),
        CustomWords(OpenCLIPEmbedder(open_clip_from(te2, seed=seed), layer_idx=1)),
    ])
    unet = sgm_like_unet(seed, context_dim=te1.config.hidden_size + te2.config.hidden_size,
                         adm_in_channels=te2.config.projection_dim + 6 * model.unet.config.addition_time_embed_dim)
    return model, StandinSDModel(Arch.SDXL, unet, conditioner, copy.deepcopy(model.vae), "eps")
