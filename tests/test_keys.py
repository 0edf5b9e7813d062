"""keys.py: kohya names of every module layout, round trips, and file spellings."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from lib_lora import keys
from lib_lora.errors import KeyMapError
from lib_lora.io import load_file
from lib_lora.networks import load_network
from lib_lora.sd.tiny import tiny_ldm_unet
from lib_lora.types import Arch, Component
from tests.fullsize import meta_model
from tests.helpers import targets_of


@pytest.fixture(scope="module")
def sd15_meta():
    return targets_of(meta_model("sd1"), Arch.SD1)


@pytest.fixture(scope="module")
def sdxl_meta():
    return targets_of(meta_model("sdxl"), Arch.SDXL)


def _roles(targets):
    return Counter(t.role for t in targets.targets.values())


def test_sd1_counts_match_kohya(sd15_meta, tiny_sd1):
    for targets in (sd15_meta, targets_of(tiny_sd1, Arch.SD1)):
        roles = _roles(targets)
        assert roles["attn"] == 192
        assert roles["te_attn"] + roles["te_mlp"] == 72
    roles = _roles(sd15_meta)
    assert roles["resnet"] + roles["sampler"] == 86  # kohya LoCon adds 86: 192 -> 278


def test_sdxl_counts_match_kohya(sdxl_meta):
    roles = _roles(sdxl_meta)
    assert roles["attn"] == 722
    assert len(sdxl_meta.select(["te_attn", "te_mlp"])) == 264
    assert len(sdxl_meta.select(["te_attn", "te_mlp"], [Component.TE2])) == 192
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k" in sdxl_meta
    assert "lora_te2_text_model_encoder_layers_31_self_attn_out_proj" in sdxl_meta
    assert "lora_unet_input_blocks_1_0_in_layers_2" in sdxl_meta
    assert "lora_unet_output_blocks_2_2_conv" in sdxl_meta


def test_real_file_names_are_exactly_the_model_targets(real_lora_dir, sd15_meta):
    lora = set(load_file(real_lora_dir / "sd15_lora.safetensors").tensors)
    names = {k.partition(".")[0] for k in lora}
    assert names == {t.name for t in sd15_meta.select(["attn", "te_attn", "te_mlp"])}
    locon = {k.partition(".")[0] for k in load_file(real_lora_dir / "sd15_locon.safetensors").tensors}
    assert locon == {t.name for t in sd15_meta.select(["attn", "resnet", "sampler", "te_attn", "te_mlp"])}
    for kind in ("loha", "lokr", "dora"):
        net = load_network(real_lora_dir / f"sd15_{kind}.safetensors")
        assert set(net.modules) <= set(sd15_meta.targets), kind


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_every_name_round_trips_to_its_module_path(arch, request):
    targets = request.getfixturevalue("sd15_meta" if arch == "sd1" else "sdxl_meta")
    a = Arch(arch)
    for t in targets.targets.values():
        comp, path = keys.diffusers_path(t.name, a)
        assert comp is t.component
        keep = comp is Component.UNET or t.path.startswith("text_model.") or t.path == "text_projection"
        expected = t.path if keep else f"text_model.{t.path}"
        assert path == expected, t.name
        assert keys.kohya_name(comp, keys.kohya_to_path(t.name)[1]) == t.name


def test_ldm_unet_has_the_same_names_as_diffusers(tiny_sd1):
    ldm = keys.unet_targets(tiny_ldm_unet(), Arch.SD1, "compvis")
    dif = keys.unet_targets(tiny_sd1.unet, Arch.SD1, "diffusers")
    assert {t.name for t in ldm} == {t.name for t in dif}
    by_name = {t.name: t for t in ldm}
    assert by_name["lora_unet_down_blocks_1_attentions_0_proj_in"].path == "input_blocks.4.1.proj_in"
    assert by_name["lora_unet_up_blocks_1_upsamplers_0_conv"].path == "output_blocks.5.2.conv"
    assert by_name["lora_unet_mid_block_resnets_1_conv2"].path == "middle_block.2.out_layers.3"
    for t in ldm:
        assert keys.compvis_path(t.name, Arch.SD1)[1] == t.path
        assert by_name[t.name].shape == {d.name: d for d in dif}[t.name].shape


class _OpenClipBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(d, 2 * d))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(2 * d, d))


def test_open_clip_fused_qkv_become_three_targets():
    tower = nn.Module()
    tower.transformer = nn.Module()
    tower.transformer.resblocks = nn.ModuleList([_OpenClipBlock(8) for _ in range(3)])
    tower.ln_final = nn.LayerNorm(8)
    targets = {t.name: t for t in keys.open_clip_text_targets(tower, Component.TE2)}
    assert len(targets) == 3 * 6 + 3 * 2 + 1  # q, k, v, out, fc1, fc2 and two norms per block; the final norm
    q = targets["lora_te2_text_model_encoder_layers_1_self_attn_q_proj"]
    v = targets["lora_te2_text_model_encoder_layers_1_self_attn_v_proj"]
    assert q.rows == (0, 8) and v.rows == (16, 24) and q.shape == torch.Size((8, 8))
    assert targets["lora_te2_text_model_encoder_layers_2_mlp_fc1"].path == "transformer.resblocks.2.mlp.c_fc"
    assert targets["lora_te2_text_model_encoder_layers_0_self_attn_out_proj"].role == "te_attn"
    ln = targets["lora_te2_text_model_encoder_layers_2_layer_norm1"]
    assert ln.path == "transformer.resblocks.2.ln_1" and ln.role == "te_norm" and ln.is_norm
    assert targets["lora_te2_text_model_encoder_layers_0_layer_norm2"].path == "transformer.resblocks.0.ln_2"
    assert targets["lora_te2_text_model_final_layer_norm"].path == "ln_final"


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_peft_spelling_round_trips(arch, request):
    targets = request.getfixturevalue("sd15_meta" if arch == "sd1" else "sdxl_meta")
    a = Arch(arch)
    for t in targets.select(["attn", "resnet", "sampler", "te_attn", "te_mlp"]):
        for suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
            peft = keys.to_peft_key(t.name, suffix, a)
            parsed = keys.parse_file_key(peft, a)
            assert parsed is not None and (parsed.module, parsed.suffix) == (t.name, suffix), peft


def test_known_diffusers_spellings():
    sd1 = Arch.SD1
    cases = {
        "unet.down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0.lora_A.weight":
            ("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_out_0", "lora_down.weight"),
        "unet.mid_block.attentions.0.proj_in.lora.up.weight":
            ("lora_unet_mid_block_attentions_0_proj_in", "lora_up.weight"),
        "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight":
            ("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0", "lora_down.weight"),
        "text_encoder.text_model.encoder.layers.3.self_attn.k_proj.lora_linear_layer.up.weight":
            ("lora_te_text_model_encoder_layers_3_self_attn_k_proj", "lora_up.weight"),
        "base_model.model.down_blocks.1.attentions.0.proj_out.lora_B.weight":
            ("lora_unet_down_blocks_1_attentions_0_proj_out", "lora_up.weight"),
        "text_encoder.encoder.layers.0.mlp.fc1.lora_A.weight":
            ("lora_te_text_model_encoder_layers_0_mlp_fc1", "lora_down.weight"),
        "unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector":
            ("lora_unet_down_blocks_0_attentions_0_proj_in", "dora_scale"),
    }
    for key, (module, suffix) in cases.items():
        parsed = keys.parse_file_key(key, sd1)
        assert parsed is not None, key
        assert (parsed.module, parsed.suffix) == (module, suffix), key
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q.lora_A.weight"
    xl = keys.parse_file_key(key, Arch.SDXL)
    assert xl.module == "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q"
    assert keys.parse_file_key("text_encoder.text_model.encoder.layers.0.mlp.fc2.lora_A.weight",
                               Arch.SDXL).module.startswith("lora_te1_")
    assert keys.parse_file_key("text_encoder_2.text_model.encoder.layers.0.mlp.fc2.alpha",
                               Arch.SDXL).module.startswith("lora_te2_")
    for junk in ("model.diffusion_model.input_blocks.1.1.proj_in.weight", "lora_unet_x", "something.weight"):
        assert keys.parse_file_key(junk, sd1) is None


def test_unknown_keys_are_reported_not_dropped():
    sd = {"lora_unet_a.lora_down.weight": torch.ones(2, 4), "lora_unet_a.lora_up.weight": torch.ones(4, 2),
          "lora_unet_a.weird_extra": torch.ones(1), "not_a_lora_key.weight": torch.ones(1),
          "lora_unet_b.hada_zzz": torch.ones(1)}
    net = load_network(sd, arch=Arch.SD1)
    assert list(net.modules) == ["lora_unet_a"]
    assert net.unmatched_keys == ["lora_unet_a.weird_extra", "lora_unet_b.hada_zzz", "not_a_lora_key.weight"]


def test_guess_arch():
    assert keys.guess_arch(["lora_te1_text_model_encoder_layers_0_mlp_fc1"]).arch is Arch.SDXL
    assert keys.guess_arch(["lora_unet_input_blocks_4_1_proj_in"]).arch is Arch.SDXL
    sd2 = keys.guess_arch(["lora_unet_down_blocks_0_attentions_0_proj_in"], metadata={"ss_v2": "True"})
    assert sd2.arch is Arch.SD2
    shapes = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj": (4, 1024)}
    assert keys.guess_arch(shapes, shapes).arch is Arch.SD2


def test_kohya_split_errors_name_the_key():
    with pytest.raises(KeyMapError, match="not_a_name"):
        keys.split_kohya("not_a_name")
