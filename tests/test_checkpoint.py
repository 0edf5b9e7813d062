"""Single-file checkpoints: save/load round trips, files written independently in the LDM layout, errors.

Independent files are built by hand from the web UI's own `ldm` modules (U-Net, VAE encoder/decoder),
a transformers CLIP-L and a hand-written OpenCLIP-structured text tower (open_clip is not installable
here), so the loader is checked against layouts it did not write itself.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from lib_lora.errors import ConfigError, FileFormatError, KeyMapError, ShapeMismatchError
from lib_lora.io import load_file, save_file
from lib_lora.sd.checkpoint import detect_arch, load_checkpoint, load_tokenizers, read_checkpoint, save_checkpoint
from lib_lora.sd.configs import shipped_config
from lib_lora.sd.model import SDModel
from lib_lora.sd.tiny import CLIP_TE, SDXL_UNET, VAE, tiny_components, tiny_ldm_unet
from lib_lora.types import Arch
from lib_lora.unet_layout import SDXL_LAYOUT, convert_state_dict

IDS = torch.tensor([[49406, 320, 1125, 539, 48136, 1929, 267, 12066, 49407, 0, 0]])


def jitter(module: nn.Module, seed: int) -> nn.Module:
    """Perturb every parameter: ldm zero-initialises output layers and norms start at 1/0, which would hide
    swapped or dropped tensors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module.eval().requires_grad_(False)


def sd_model(arch: Arch, comps, vae=None, resolution: int = 128) -> SDModel:
    return SDModel(arch, comps.unet, comps.text_encoders, load_tokenizers(arch), vae or comps.vae,
                   prediction_type=comps.prediction_type, resolution=resolution)


def unet_inputs(cross_dim: int, sdxl_pooled: int | None = None):
    g = torch.Generator().manual_seed(7)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, cross_dim, generator=g)
    extra = {}
    if sdxl_pooled:
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(2, sdxl_pooled, generator=g),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}}
    return x, torch.tensor([10, 600]), ctx, extra


def assert_same_weights(a: SDModel, b: SDModel) -> None:
    """Every weight of `a` is in `b` with the same bits: what a lossless round trip guarantees."""
    for name, ma, mb in [("unet", a.unet, b.unet), ("vae", a.vae, b.vae),
                         *[(f"te{i}", ta, tb) for i, (ta, tb) in enumerate(zip(a.text_encoders, b.text_encoders))]]:
        sa, sb = ma.state_dict(), mb.state_dict()
        missing = [k for k in sa if k not in sb]
        assert not missing, f"{name}: {missing[:3]}"
        for key, value in sa.items():
            assert torch.equal(sb[key], value), f"{name}.{key}"


@torch.no_grad()
def assert_same_model(a: SDModel, b: SDModel, atol: float = 1e-5) -> None:
    """U-Net, VAE encode/decode and text-encoder hidden states agree. Two module instances with the same weights
    need not agree in the last bits (kernels pick paths by memory layout, thread count and CPU), hence `atol`
    (outputs here are of magnitude ~1); bit-equality of weights is `assert_same_weights`."""
    pooled = a.text_encoders[-1].config.projection_dim if a.arch is Arch.SDXL else None
    x, t, ctx, extra = unet_inputs(a.unet.config.cross_attention_dim, pooled)
    torch.testing.assert_close(b.unet(x, t, ctx, **extra).sample, a.unet(x, t, ctx, **extra).sample, atol=atol, rtol=0)
    img = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.testing.assert_close(b.vae.encode(img).latent_dist.mean, a.vae.encode(img).latent_dist.mean,
                               atol=atol, rtol=0)
    torch.testing.assert_close(b.vae.decode(x[:1, :, :4, :4]).sample, a.vae.decode(x[:1, :, :4, :4]).sample,
                               atol=atol, rtol=0)
    for ta, tb in zip(a.text_encoders, b.text_encoders):
        oa, ob = ta(IDS, output_hidden_states=True), tb(IDS, output_hidden_states=True)
        for ha, hb in zip(oa.hidden_states, ob.hidden_states):
            torch.testing.assert_close(hb, ha, atol=atol, rtol=0)
        torch.testing.assert_close(ob[0], oa[0], atol=atol, rtol=0)


def strip_metadata(path, out):
    save_file(load_file(path).tensors, out)
    return out


# --- round trips of our own files ------------------------------------------------------------------------------
@pytest.mark.parametrize("name,arch,seed", [("sd1", Arch.SD1, 0), ("sd2", Arch.SD2, 1), ("sdxl", Arch.SDXL, 2)])
def test_round_trip_tiny(tmp_path, name, arch, seed):
    model = sd_model(arch, tiny_components(name, seed=seed))
    path = tmp_path / f"{name}.safetensors"
    saved = save_checkpoint(model, path, dtype=torch.float32, write_yaml=False)
    assert saved.yaml_path is None and not (tmp_path / f"{name}.yaml").exists()
    loaded = read_checkpoint(path)
    assert loaded.report.arch is arch and loaded.model.arch is arch
    assert loaded.model.prediction_type == ("v_prediction" if name == "sd2" else "epsilon")
    assert loaded.report.unused == () and "metadata" in loaded.report.config_source
    assert loaded.model.resolution == 128 and loaded.model.vae_scale_factor == model.vae_scale_factor
    assert len(loaded.model.tokenizers) == len(model.text_encoders)
    assert_same_weights(model, loaded.model)
    assert_same_model(model, loaded.model)
    keys = load_file(path).tensors.keys()
    assert detect_arch(keys) is arch
    if arch is Arch.SD2:  # the 24-block OpenCLIP layout is kept: an identity block stands in for the unused last one
        assert "cond_stage_model.model.transformer.resblocks.12.attn.in_proj_weight" in keys
        reasons = [i.reason for i in loaded.report.ignored]
        assert any("penultimate" in r for r in reasons)
    if arch is Arch.SDXL:  # SDXL v-prediction files carry the marker key ComfyUI and Forge look for
        model.prediction_type = "v_prediction"
        save_checkpoint(model, tmp_path / "v.safetensors", write_yaml=False)
        assert "v_pred" in load_file(tmp_path / "v.safetensors").tensors
        reloaded = read_checkpoint(tmp_path / "v.safetensors", compute_hash=False)
        assert reloaded.model.prediction_type == "v_prediction" and reloaded.report.unused == ()


def test_fp16_save_and_load_dtype(tmp_path):
    model = sd_model(Arch.SD1, tiny_components("sd1"))
    path = tmp_path / "half.safetensors"
    save_checkpoint(model, path, write_yaml=False)
    assert {t.dtype for t in load_file(path).tensors.values()} == {torch.float16}
    loaded = load_checkpoint(path, dtype=torch.float16)
    assert loaded.unet.dtype == torch.float16 and loaded.short_hash and len(loaded.short_hash) == 10
    as_fp32 = load_checkpoint(path)
    assert next(as_fp32.text_encoders[0].parameters()).dtype == torch.float32
    assert_same_model(model, as_fp32, atol=2e-2)


def ldm_ready_sd1() -> SDModel:
    """Tiny SD1 with a VAE the web UI's ldm code can build (32 norm groups)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(3)
    vae = AutoencoderKL(**dict(VAE, block_out_channels=(32, 32, 64, 64), norm_num_groups=32)).eval()
    return sd_model(Arch.SD1, tiny_components("sd1"), vae=jitter(vae, 3))


@torch.no_grad()
def test_sd1_yaml_for_the_web_ui_and_ldm_unet(tmp_path):
    from ldm.modules.diffusionmodules.model import Decoder
    from ldm.util import instantiate_from_config

    model = ldm_ready_sd1()
    saved = save_checkpoint(model, tmp_path / "tiny.safetensors", dtype=torch.float32, text_encoder_ref="absolute")
    yaml_text = Path(saved.yaml_path).read_text()
    config = yaml.safe_load(yaml_text)
    params = config["model"]["params"]
    assert config["model"]["target"] == "ldm.models.diffusion.ddpm.LatentDiffusion"
    assert params["cond_stage_config"]["target"] == "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
    te_dir = params["cond_stage_config"]["params"]["version"]
    from transformers import CLIPTextConfig, CLIPTokenizer

    assert CLIPTextConfig.from_pretrained(te_dir).num_attention_heads == 4
    assert CLIPTokenizer.from_pretrained(te_dir)("a photo").input_ids == [49406, 320, 1125, 49407]
    tensors = load_file(saved.path).tensors
    unet_sd = {k.removeprefix("model.diffusion_model."): v for k, v in tensors.items()
               if k.startswith("model.diffusion_model.")}
    x, t, ctx, _ = unet_inputs(64)
    for ldm_unet in (tiny_ldm_unet(), instantiate_from_config(params["unet_config"]).eval()):
        ldm_unet.load_state_dict(unet_sd, strict=True)
        torch.testing.assert_close(ldm_unet(x, t, context=ctx), model.unet(x, t, ctx).sample, atol=2e-5, rtol=0)
    decoder = Decoder(**params["first_stage_config"]["params"]["ddconfig"]).eval()
    decoder.load_state_dict({k.removeprefix("first_stage_model.decoder."): v for k, v in tensors.items()
                             if k.startswith("first_stage_model.decoder.")}, strict=True)
    z = model.vae.post_quant_conv(x[:1])
    torch.testing.assert_close(decoder(z), model.vae.decoder(z), atol=2e-5, rtol=0)
    # the same file without our metadata is read through the yaml (and its text encoder folder)
    bare = strip_metadata(saved.path, tmp_path / "bare.safetensors")
    (tmp_path / "bare.yaml").write_text(yaml_text)
    loaded = read_checkpoint(bare)
    assert loaded.report.config_source.startswith("yaml") and loaded.model.resolution == 128
    assert_same_weights(model, loaded.model)
    assert_same_model(model, loaded.model)


def test_yaml_refused_for_models_the_web_ui_cannot_build(tmp_path):
    model = sd_model(Arch.SD2, tiny_components("sd2", seed=1))
    with pytest.raises(ConfigError, match="attention heads .* neither a constant count") as err:
        save_checkpoint(model, tmp_path / "sd2.safetensors")
    assert "norm groups" in str(err.value) and "OpenCLIP" in str(err.value)
    assert list(tmp_path.iterdir()) == []


# --- files written independently in the LDM/SGM layout ---------------------------------------------------------
class OpenClipBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(),
                                             c_proj=nn.Linear(4 * width, width)))

    def forward(self, x, mask):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class OpenClipTower(nn.Module):
    """The text half of an open_clip CLIP: the module names SD2/SDXL files use (`cond_stage_model.model.*`)."""

    def __init__(self, width: int, layers: int, heads: int, projection: int | None = None, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.token_embedding = nn.Embedding(49408, width)
        self.positional_embedding = nn.Parameter(torch.randn(77, width) * 0.02)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(OpenClipBlock(width, heads) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        if projection:
            self.text_projection = nn.Parameter(torch.randn(width, projection) * width**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(4.6))
        jitter(self, seed)

    def forward(self, ids):
        """(hidden states after each block, pooled projection at the end-of-text token)."""
        n = ids.shape[1]
        x = (self.token_embedding(ids) + self.positional_embedding[:n]).permute(1, 0, 2)
        mask = torch.full((n, n), float("-inf")).triu(1)
        states = []
        for block in self.transformer.resblocks:
            x = block(x, mask)
            states.append(x.permute(1, 0, 2))
        pooled = None
        if hasattr(self, "text_projection"):
            pooled = self.ln_final(states[-1])[torch.arange(ids.shape[0]), ids.argmax(-1)] @ self.text_projection
        return states, pooled


def ldm_vae(seed: int, ch_mult=(1, 2)):
    """LDM first stage: the web UI's Encoder/Decoder + quant convs (what `first_stage_model.*` holds)."""
    from ldm.modules.diffusionmodules.model import Decoder, Encoder

    torch.manual_seed(seed)
    dd = dict(double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=list(ch_mult),
              num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    vae = nn.Module()
    vae.encoder, vae.decoder = Encoder(**dd), Decoder(**dd)
    vae.quant_conv, vae.post_quant_conv = nn.Conv2d(8, 8, 1), nn.Conv2d(4, 4, 1)
    return jitter(vae, seed), dd


def prefixed(prefix: str, module: nn.Module, add_text_model: bool = False) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in module.state_dict().items():
        if add_text_model and not k.startswith("text_model."):
            k = "text_model." + k  # the transformers-4 spelling files use
        out[prefix + k] = v.clone()
    return out


@torch.no_grad()
def check_vae(loaded_vae, vae) -> None:
    img = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    mean = vae.quant_conv(vae.encoder(img))[:, :4]
    torch.testing.assert_close(loaded_vae.encode(img).latent_dist.mean, mean, atol=2e-5, rtol=0)
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(loaded_vae.decode(z).sample, vae.decoder(vae.post_quant_conv(z)), atol=2e-5, rtol=0)


@torch.no_grad()
def test_independent_sd1_file_with_yaml_and_text_encoder_folder(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    unet, (vae, dd) = jitter(tiny_ldm_unet(seed=5), 5), ldm_vae(6)
    torch.manual_seed(7)
    te = jitter(CLIPTextModel(CLIPTextConfig(**CLIP_TE)), 7)
    tensors = {**prefixed("model.diffusion_model.", unet), **prefixed("first_stage_model.", vae),
               **prefixed("cond_stage_model.transformer.", te, add_text_model=True),
               "alphas_cumprod": torch.linspace(1, 0, 1000),
               "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    save_file(tensors, tmp_path / "indep.safetensors")
    te.config.save_pretrained(tmp_path / "clip")
    yaml_cfg = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "image_size": 8, "scale_factor": 0.2,
        "unet_config": {"params": {"in_channels": 4, "out_channels": 4, "model_channels": 32,
                                   "attention_resolutions": [4, 2, 1], "num_res_blocks": 2,
                                   "channel_mult": [1, 1, 2, 2], "num_heads": 8, "transformer_depth": 1,
                                   "context_dim": 64}},
        "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": dd}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                              "params": {"version": str(tmp_path / "clip")}}}}}
    (tmp_path / "indep.yaml").write_text(yaml.safe_dump(yaml_cfg))
    loaded = read_checkpoint(tmp_path / "indep.safetensors")
    model = loaded.model
    assert loaded.report.unused == ()
    assert {k for i in loaded.report.ignored for k in i.keys} == {
        "alphas_cumprod", "cond_stage_model.transformer.text_model.embeddings.position_ids"}
    assert model.vae_scale_factor == 0.2 and model.resolution == 16 and model.prediction_type == "epsilon"
    x, t, ctx, _ = unet_inputs(64)
    torch.testing.assert_close(model.unet(x, t, ctx).sample, unet(x, t, context=ctx), atol=2e-5, rtol=0)
    check_vae(model.vae, vae)
    torch.testing.assert_close(model.text_encoders[0](IDS).last_hidden_state, te(IDS).last_hidden_state)


def sd2_ldm_file(tmp_path, out_bias: float | None = None, name: str = "sd2.safetensors"):
    """A small SD2-structured file whose every dimension can be inferred from shapes (64-wide heads)."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(11)
    unet = jitter(UNetModel(image_size=16, in_channels=4, out_channels=4, model_channels=64,
                            attention_resolutions=[1, 2], num_res_blocks=1, channel_mult=[1, 2], num_head_channels=64,
                            use_spatial_transformer=True, use_linear_in_transformer=True, transformer_depth=1,
                            context_dim=64, legacy=False), 11)
    if out_bias is not None:
        unet.out[2].bias.fill_(out_bias)
    tower, (vae, _) = OpenClipTower(64, 3, 1, projection=64, seed=12), ldm_vae(13)
    tensors = {**prefixed("model.diffusion_model.", unet), **prefixed("first_stage_model.", vae),
               **prefixed("cond_stage_model.model.", tower)}
    save_file(tensors, tmp_path / name)
    return tmp_path / name, unet, tower, vae


@torch.no_grad()
def test_independent_sd2_file_inferred_from_shapes(tmp_path):
    path, unet, tower, vae = sd2_ldm_file(tmp_path)
    loaded = read_checkpoint(path, prediction_type="v_prediction")
    model = loaded.model
    assert model.arch is Arch.SD2 and model.prediction_type == "v_prediction"
    assert loaded.report.prediction_source == "prediction_type argument"
    assert loaded.report.config_source.startswith("tensor shapes") and loaded.report.unused == ()
    ignored = {k for i in loaded.report.ignored for k in i.keys}
    assert "cond_stage_model.model.transformer.resblocks.2.mlp.c_fc.weight" in ignored  # the unused last block
    assert {"cond_stage_model.model.logit_scale", "cond_stage_model.model.text_projection"} <= ignored
    assert model.text_encoders[0].config.num_hidden_layers == 2
    assert model.tokenizers[0].pad_token_id == 0
    x, t, ctx, _ = unet_inputs(64)
    torch.testing.assert_close(model.unet(x, t, ctx).sample, unet(x, t, context=ctx), atol=2e-5, rtol=0)
    check_vae(model.vae, vae)
    states, _ = tower(IDS)
    # SD2 conditions on the penultimate block followed by the final norm: diffusers' last_hidden_state
    torch.testing.assert_close(model.text_encoders[0](IDS).last_hidden_state, tower.ln_final(states[-2]),
                               atol=2e-5, rtol=0)


@pytest.mark.parametrize("bias,expected", [(-3.0, "v_prediction"), (3.0, "epsilon")])
def test_sd2_prediction_type_guessed_like_the_web_ui(tmp_path, bias, expected):
    path, *_ = sd2_ldm_file(tmp_path, out_bias=bias)
    loaded = read_checkpoint(path, compute_hash=False)
    assert loaded.model.prediction_type == expected
    assert loaded.report.prediction_source.startswith("U-Net output test")
    # a v model gets the shipped 768-v defaults (resolution, fp32 attention)
    assert loaded.model.resolution == (768 if expected == "v_prediction" else 512)
    assert loaded.model.unet.config.upcast_attention == (expected == "v_prediction")


@torch.no_grad()
def test_independent_sdxl_file_with_sgm_yaml(tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(21)
    unet_cfg = dict(SDXL_UNET, attention_head_dim=(2, 4, 4), norm_num_groups=32, cross_attention_dim=128,
                    projection_class_embeddings_input_dim=32 + 6 * 8)
    unet = jitter(UNet2DConditionModel(**unet_cfg), 21)
    te1 = jitter(CLIPTextModel(CLIPTextConfig(**dict(CLIP_TE, num_attention_heads=1, num_hidden_layers=3))), 22)
    tower, (vae, dd) = OpenClipTower(64, 2, 1, projection=32, seed=23), ldm_vae(24)
    tensors = {**{"model.diffusion_model." + k: v.clone()
                  for k, v in convert_state_dict(unet.state_dict(), SDXL_LAYOUT, to="compvis").items()},
               **prefixed("first_stage_model.", vae),
               **prefixed("conditioner.embedders.0.transformer.", te1, add_text_model=True),
               **prefixed("conditioner.embedders.1.model.", tower),
               "v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)}  # ComfyUI/Forge marker keys
    save_file(tensors, tmp_path / "xl.safetensors")
    size_embedder = {"target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND", "params": {"outdim": 8}}
    sgm = {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
        "scale_factor": 0.13025,
        "network_config": {"params": {
            "adm_in_channels": 80, "num_classes": "sequential", "in_channels": 4, "out_channels": 4,
            "model_channels": 32, "attention_resolutions": [4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 2],
            "num_head_channels": 16, "use_linear_in_transformer": True, "transformer_depth": [1, 2, 2],
            "context_dim": 128}},
        "conditioner_config": {"params": {"emb_models": [
            {"target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder"},
            {"target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2"}] + [size_embedder] * 3}},
        "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": dd}}}}}
    (tmp_path / "xl.yaml").write_text(yaml.safe_dump(sgm))
    loaded = read_checkpoint(tmp_path / "xl.safetensors")
    model = loaded.model
    assert model.arch is Arch.SDXL and model.vae_scale_factor == 0.13025 and loaded.report.unused == ()
    assert model.prediction_type == "v_prediction" and "marker" in loaded.report.prediction_source
    ignored = {k for i in loaded.report.ignored for k in i.keys}
    assert ignored == {"v_pred", "ztsnr", "conditioner.embedders.1.model.logit_scale"}
    assert model.unet.config.addition_time_embed_dim == 8
    assert [type(t).__name__ for t in model.text_encoders] == ["CLIPTextModel", "CLIPTextModelWithProjection"]
    assert [t.pad_token_id for t in model.tokenizers] == [49407, 0]
    x, t, ctx, extra = unet_inputs(128, sdxl_pooled=32)
    torch.testing.assert_close(model.unet(x, t, ctx, **extra).sample, unet(x, t, ctx, **extra).sample,
                               atol=2e-5, rtol=0)
    check_vae(model.vae, vae)
    out1 = model.text_encoders[0](IDS, output_hidden_states=True)
    torch.testing.assert_close(out1.hidden_states[-2], te1(IDS, output_hidden_states=True).hidden_states[-2])
    out2 = model.text_encoders[1](IDS, output_hidden_states=True)
    states, pooled = tower(IDS)
    # SDXL conditions on the penultimate states of both towers and the pooled, projected output of bigG
    torch.testing.assert_close(out2.hidden_states[-2], states[-2], atol=2e-5, rtol=0)
    torch.testing.assert_close(out2.text_embeds, pooled, atol=2e-5, rtol=0)


@pytest.mark.parametrize("arch", list(Arch))
def test_shipped_full_size_configs_fit_the_ldm_layout(arch):
    """Full-size models (built on the meta device, no memory) survive to-LDM key conversion and shape inference."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lib_lora.sd.checkpoint import ldm_state_dict, split_components
    from lib_lora.sd.config_resolve import resolve_config

    config = shipped_config(arch)
    with init_empty_weights():
        unet, vae = UNet2DConditionModel.from_config(config.unet), AutoencoderKL.from_config(config.vae)
        classes = [CLIPTextModel, CLIPTextModelWithProjection][: len(config.text_encoders)]
        tes = [cls(CLIPTextConfig(**c)) for cls, c in zip(classes, config.text_encoders)]
    model = SDModel(arch, unet, tes, [], vae, resolution=config.resolution, vae_scale_factor=config.vae_scale_factor)
    tensors = ldm_state_dict(model, dtype=None)
    assert detect_arch(tensors) is arch
    parts = split_components(dict(tensors), arch, "meta")
    resolved = resolve_config(arch, parts, {}, None, "epsilon")
    for key in ("block_out_channels", "attention_head_dim", "transformer_layers_per_block", "cross_attention_dim",
                "use_linear_projection", "addition_time_embed_dim"):
        got, want = resolved.config.unet.get(key), config.unet.get(key)
        assert got == want or [got] * len(config.unet["block_out_channels"]) == want, key
    assert resolved.config.vae["block_out_channels"] == config.vae["block_out_channels"]
    for got, want in zip(resolved.config.text_encoders, config.text_encoders):
        assert {k: got[k] for k in want} == want
    if arch is not Arch.SDXL:  # the web UI's ldm U-Net with the real SD1.5 / SD2 params has the same keys and shapes
        from ldm.modules.diffusionmodules.openaimodel import UNetModel

        params = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320,
                      attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4],
                      use_spatial_transformer=True, transformer_depth=1, legacy=False)
        params.update(num_heads=8, context_dim=768) if arch is Arch.SD1 else params.update(
            num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)
        with torch.device("meta"):
            ldm_unet = UNetModel(**params)
        want = {k: tuple(v.shape) for k, v in ldm_unet.state_dict().items()}
        got = {k.removeprefix("model.diffusion_model."): tuple(v.shape) for k, v in tensors.items()
               if k.startswith("model.diffusion_model.")}
        assert got == want


@pytest.mark.parametrize("arch,prediction,expected", [
    (Arch.SD1, "epsilon", {"num_heads": 8, "context_dim": 768, "channel_mult": [1, 2, 4, 4], "image_size": 64}),
    (Arch.SD2, "v_prediction", {"num_head_channels": 64, "context_dim": 1024, "use_linear_in_transformer": True,
                                "parameterization": "v", "image_size": 96}),
    (Arch.SDXL, "epsilon", {"num_head_channels": 64, "context_dim": 2048, "transformer_depth": [1, 2, 10],
                            "adm_in_channels": 2816, "attention_resolutions": [4, 2], "outdim": 256, "layer_idx": 11}),
])
def test_yaml_for_full_size_models_says_what_the_web_ui_configs_say(arch, prediction, expected):
    from lib_lora.sd.ldm_yaml import ldm_problems, needs_text_encoder_dir, render_ldm_yaml

    config = shipped_config(arch, prediction)
    assert ldm_problems(config) == [] and not needs_text_encoder_dir(config)
    text = render_ldm_yaml(config)
    data = yaml.safe_load(text)

    def find(node, key):
        if isinstance(node, dict):
            if key in node:
                return node[key]
            node = list(node.values())
        if isinstance(node, list):
            return next((v for v in (find(n, key) for n in node) if v is not None), None)
        return None

    assert {k: find(data, k) for k in expected} == expected
    assert ".text_encoder" not in text  # standard CLIP-L: the web UI's default text encoder, no config folder


# --- errors and detection ------------------------------------------------------------------------------------
def test_detect_arch_from_keys_alone():
    unet = ["model.diffusion_model.input_blocks.0.0.weight"]
    assert detect_arch(unet + ["cond_stage_model.transformer.text_model.final_layer_norm.weight"]) is Arch.SD1
    assert detect_arch(unet + ["cond_stage_model.model.transformer.resblocks.0.ln_1.weight"]) is Arch.SD2
    assert detect_arch(unet + ["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                               "conditioner.embedders.1.model.transformer.resblocks.0.ln_1.weight"]) is Arch.SDXL
    with pytest.raises(KeyMapError, match="refiner"):
        detect_arch(unet + ["conditioner.embedders.0.model.transformer.resblocks.0.ln_1.weight"])
    with pytest.raises(KeyMapError, match="LoRA"):
        detect_arch(["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"])
    with pytest.raises(KeyMapError, match="diffusers-format"):
        detect_arch(["down_blocks.0.resnets.0.conv1.weight"])


def test_unknown_files_are_refused_with_what_they_hold(tmp_path):
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}
    save_file(lora, tmp_path / "lora.safetensors")
    with pytest.raises(FileFormatError, match=r"lora\.safetensors.*lora_unet_\* \(2\).*LoRA"):
        load_checkpoint(tmp_path / "lora.safetensors")
    save_file({"foo.weight": torch.randn(3, 3), "bar": torch.randn(2)}, tmp_path / "random.safetensors")
    with pytest.raises(FileFormatError, match=r"found (foo \(1\), bar|bar \(1\), foo) \(1\)"):
        load_checkpoint(tmp_path / "random.safetensors")


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_checkpoint(sd_model(Arch.SD1, tiny_components("sd1")), tmp_path / "full.safetensors", write_yaml=False)
    data = (tmp_path / "full.safetensors").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FileFormatError, match=r"cut\.safetensors.*truncated"):
        load_checkpoint(path)


def test_shape_contradicting_the_yaml_names_key_and_shapes(tmp_path):
    saved = save_checkpoint(ldm_ready_sd1(), tmp_path / "a.safetensors")
    path = strip_metadata(saved.path, tmp_path / "b.safetensors")
    config = yaml.safe_load((tmp_path / "a.yaml").read_text())
    config["model"]["params"]["unet_config"]["params"]["context_dim"] = 128
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ShapeMismatchError) as err:
        load_checkpoint(path)
    assert err.value.key.startswith("model.diffusion_model.") and "attn2.to_k.weight" in err.value.key
    expected, actual = tuple(err.value.expected), tuple(err.value.actual)
    assert expected[1] == 128 and actual[1] == 64 and expected[0] == actual[0]
    assert "b.yaml" in str(err.value)


def test_missing_unused_and_mismatched_keys(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(sd_model(Arch.SD1, tiny_components("sd1")), path, write_yaml=False)
    tensors = load_file(path).tensors
    metadata = load_file(path).metadata
    gone = "first_stage_model.decoder.up.0.block.1.conv2.weight"
    del tensors[gone]
    save_file(tensors, tmp_path / "missing.safetensors", metadata)
    with pytest.raises(FileFormatError, match=rf"VAE: 1 tensors missing .*{gone.replace('.', '[.]')}"):
        load_checkpoint(tmp_path / "missing.safetensors")
    tensors = load_file(path).tensors
    tensors["model.diffusion_model.extra_head.weight"] = torch.zeros(2)
    tensors["embedder.model.visual.proj"] = torch.zeros(2)
    save_file(tensors, tmp_path / "extra.safetensors", metadata)
    with pytest.warns(UserWarning, match="2 tensors have no place"):
        load_checkpoint(tmp_path / "extra.safetensors")
    assert set(read_checkpoint(tmp_path / "extra.safetensors").report.unused) == {
        "model.diffusion_model.extra_head.weight", "embedder.model.visual.proj"}
    with pytest.raises(FileFormatError, match="expected an SDXL checkpoint"):
        load_checkpoint(path, arch="sdxl")
    tensors = load_file(path).tensors
    tensors["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 9, 3, 3)
    save_file(tensors, tmp_path / "inpaint.safetensors", metadata)
    with pytest.raises(FileFormatError, match="inpainting"):
        load_checkpoint(tmp_path / "inpaint.safetensors")
    tensors = load_file(path).tensors
    tensors["edm_mean"] = torch.zeros(4)
    save_file(tensors, tmp_path / "edm.safetensors", metadata)
    with pytest.raises(FileFormatError, match="EDM"):
        load_checkpoint(tmp_path / "edm.safetensors")
    broken = dict(metadata, **{"lora_studio.sd_config": json.dumps({"arch": "sd1"})})
    save_file(load_file(path).tensors, tmp_path / "badmeta.safetensors", broken)
    with pytest.raises(FileFormatError, match="not a valid model config"):
        load_checkpoint(tmp_path / "badmeta.safetensors")


def test_tokenizers_pad_as_each_text_encoder_expects():
    clip, openclip = load_tokenizers(Arch.SDXL)
    ids = clip("a photo of sks dog, masterpiece", padding="max_length", max_length=12).input_ids
    assert ids == [49406, 320, 1125, 539, 48136, 1929, 267, 12066, 49407, 49407, 49407, 49407]
    assert openclip("a photo of sks dog, masterpiece", padding="max_length", max_length=12).input_ids[-3:] == [0, 0, 0]
    assert load_tokenizers(Arch.SD2)[0].pad_token_id == 0 and load_tokenizers(Arch.SD1)[0].pad_token_id == 49407
