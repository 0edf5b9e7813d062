"""blocks.py: the block map, presets of every length, user presets, lbw parsing errors."""
from __future__ import annotations

import random

import pytest

from lib_lora import blocks
from lib_lora.errors import BlockWeightError
from lib_lora.types import Arch
from tests.fullsize import meta_model
from tests.helpers import targets_of

SD1_CASES = {
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": "BASE",
    "lora_unet_conv_in": "IN00",
    "lora_unet_down_blocks_0_attentions_0_proj_in": "IN01",
    "lora_unet_down_blocks_0_resnets_1_conv1": "IN02",
    "lora_unet_down_blocks_0_downsamplers_0_conv": "IN03",
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": "IN04",
    "lora_unet_down_blocks_2_downsamplers_0_conv": "IN09",
    "lora_unet_down_blocks_3_resnets_1_conv2": "IN11",
    "lora_unet_mid_block_resnets_0_conv1": "M00",
    "lora_unet_mid_block_attentions_0_proj_out": "M00",
    "lora_unet_up_blocks_0_resnets_2_conv1": "OUT02",
    "lora_unet_up_blocks_0_upsamplers_0_conv": "OUT02",
    "lora_unet_up_blocks_1_attentions_0_proj_in": "OUT03",
    "lora_unet_up_blocks_1_upsamplers_0_conv": "OUT05",
    "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2": "OUT11",
    "lora_unet_time_embedding_linear_1": "BASE",
    "lora_unet_conv_out": "OUT11",
}
SDXL_CASES = {
    "lora_te1_text_model_encoder_layers_0_mlp_fc1": "BASE",
    "lora_te2_text_model_encoder_layers_31_self_attn_out_proj": "BASE",
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k": "IN04",
    "lora_unet_input_blocks_8_1_proj_out": "IN08",
    "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_v": "M00",
    "lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_0_proj": "OUT00",
    "lora_unet_output_blocks_8_0_skip_connection": "OUT08",
    "lora_unet_label_emb_0_0": "BASE",
    "lora_unet_out_2": "OUT08",
}


def test_block_of_sd1_table():
    for name, block in SD1_CASES.items():
        assert blocks.block_of(name, Arch.SD1) == block, name


def test_block_of_sdxl_table():
    for name, block in SDXL_CASES.items():
        assert blocks.block_of(name, Arch.SDXL) == block, name


@pytest.mark.parametrize("arch", [Arch.SD1, Arch.SDXL])
def test_every_module_has_exactly_one_block_and_every_list_gives_one_weight(arch):
    targets = targets_of(meta_model(arch.value), arch)
    valid = set(blocks.arch_block_ids(arch))
    names = list(targets.targets)
    assigned = {n: blocks.block_of(n, arch) for n in names}
    assert set(assigned.values()) <= valid
    for length, ids in blocks.BLOCK_LISTS.items():
        values = [float(i + 1) for i in range(length)]
        weights = blocks.expand(values)
        per_module = blocks.weights_by_module(names, arch, weights)
        assert set(per_module) == set(names)
        for name, w in per_module.items():
            block = assigned[name]
            assert w == (values[ids.index(block)] if block in ids else 0.0), (length, name)


@pytest.mark.parametrize("arch", [Arch.SD1, Arch.SDXL])
def test_named_presets(arch):
    presets = blocks.builtin_presets(arch)
    assert {"NONE", "ALL", "INS", "IND", "INALL", "MIDD", "OUTD", "OUTS", "OUTALL", "ALL0.5"} <= set(presets)
    assert blocks.resolve("ALL", arch).as_dict(arch)["M00"] == 1.0
    assert set(blocks.resolve("NONE", arch).weights) == {0.0}
    outs = blocks.resolve("OUTS", arch)
    assert outs["BASE"] == 1.0 and outs["IN04"] == 0.0
    assert outs["OUT05" if arch is Arch.SDXL else "OUT11"] == 1.0


def test_lbw_parsing_and_errors():
    w = blocks.resolve("1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1", Arch.SD1)
    assert w["BASE"] == 1 and w["IN01"] == 0 and w["OUT03"] == 1 and w["IN00"] == 0 and w["OUT00"] == 0
    with pytest.raises(BlockWeightError, match="5 values"):
        blocks.resolve("1,0,0,1,1", Arch.SD1)
    with pytest.raises(BlockWeightError, match="value 3.*'abc'"):
        blocks.resolve("1,1,abc,1,1,1,1,1,1,1,1,1", Arch.SDXL)
    with pytest.raises(BlockWeightError, match="unknown block-weight preset 'NOPE'.*known presets: .*ALL"):
        blocks.resolve("NOPE", Arch.SD1)
    rng = random.Random(3)
    special = blocks.resolve("R,U,X,X+0.5,X-1,0,0,0,0,0,0,0", Arch.SDXL, x=2.0, rng=rng)
    assert 0 <= special["BASE"] < 1 and -0.5 <= special["IN04"] < 1.5
    assert (special["IN05"], special["IN07"], special["IN08"]) == (2.0, 2.5, 1.0)


def test_user_presets_file(tmp_path):
    path = tmp_path / "presets.txt"
    path.write_text("# my presets\nUNETONLY:0,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1\n\nHALFXL:0.5,0.5,0.5,0.5,0.5,0.5,"
                    "0.5,0.5,0.5,0.5,0.5,0.5\n", encoding="utf-8")
    presets = blocks.load_presets_file(path)
    assert set(presets) == {"UNETONLY", "HALFXL"}
    assert blocks.resolve("UNETONLY", Arch.SD1, presets)["BASE"] == 0.0
    bad = tmp_path / "bad.txt"
    bad.write_text("GOOD:1,1,1,1,1,1,1,1,1,1,1,1\nBROKEN 1,2\n", encoding="utf-8")
    with pytest.raises(BlockWeightError, match="bad.txt, line 2"):
        blocks.load_presets_file(bad)


def test_format_round_trip():
    w = blocks.resolve("IND", Arch.SD1)
    assert blocks.resolve(blocks.format_weights(w, Arch.SD1, 17), Arch.SD1) == blocks.expand(
        [float(v) for v in blocks.builtin_presets(Arch.SD1)["IND"].split(",")], blocks.format_weights(w, Arch.SD1, 17))
