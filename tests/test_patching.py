"""WeightPatcher on tiny SD1/SDXL/LDM models: bit-exact restore, bypass == merge, block weights,
re-patching only what changed, and the model unchanged after every failure."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lib_lora import blocks, keys
from lib_lora.errors import ArchMismatchError, KeyMapError, NonFiniteError, ShapeMismatchError
from lib_lora.io import save_file
from lib_lora.keys import ModelTargets
from lib_lora.networks import load_network
from lib_lora.patching import Application, WeightPatcher
from lib_lora.sd.tiny import tiny_components, tiny_ldm_unet
from lib_lora.types import Arch, Component
from lib_lora.unet_layout import SD_LAYOUT, convert_state_dict
from tests.helpers import checksum, make_network_file, targets_of

ALL_ROLES = ["attn", "resnet", "sampler", "te_attn", "te_mlp"]


@pytest.fixture()
def sd1():
    comps = tiny_components("sd1", seed=3, with_vae=False)
    return comps, targets_of(comps, Arch.SD1)


def _net(targets, roles=ALL_ROLES, algo="lora", seed=0, components=None, arch=Arch.SD1, name=None):
    selected = targets.select(roles, components)
    return load_network(make_network_file(selected, algo, rank=4, seed=seed), arch=arch, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merge_and_restore_whole_model_bit_exact(sd1, dtype):
    comps, targets = sd1
    for m in [comps.unet, *comps.text_encoders]:
        m.to(dtype)
    before = checksum(comps.unet, *comps.text_encoders)
    patcher = WeightPatcher(targets)
    report = patcher.apply([Application(_net(targets, algo="lora")), Application(_net(targets, algo="loha", seed=2),
                                                                                 te=0.5, unet=-0.3)])
    assert report.rewritten == len(targets.select(ALL_ROLES))
    assert checksum(comps.unet, *comps.text_encoders) != before
    patcher.restore()
    assert checksum(comps.unet, *comps.text_encoders) == before
    assert not patcher.active


def test_hooked_equals_merged_on_the_unet(sd1):
    comps, targets = sd1
    net = _net(targets, algo="lora")
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.randn(2, 7, 64)
    before = checksum(comps.unet)
    with torch.no_grad():
        plain = comps.unet(x, t, ctx).sample
        with WeightPatcher(targets, "hooked").applied([Application(net, unet=0.8)]):
            hooked = comps.unet(x, t, ctx).sample
            assert checksum(comps.unet) == before
        with WeightPatcher(targets, "merge").applied([Application(net, unet=0.8)]):
            merged = comps.unet(x, t, ctx).sample
    assert not torch.allclose(plain, merged)
    torch.testing.assert_close(hooked, merged, atol=1e-4, rtol=1e-4)
    assert checksum(comps.unet) == before


def test_hooked_equals_merged_for_an_fp16_file_on_a_float32_model(sd1):
    """Files are mostly saved in fp16: the hooked path must not round the model's float32 weights to the file's
    dtype where it rebuilds a layer's weight (small layers, conv_in among them)."""
    comps, targets = sd1
    sd = make_network_file(targets.select(["attn", "resnet", "top"]), "lora", rank=4, seed=5, dtype=torch.float16)
    net = load_network(sd, arch=Arch.SD1)
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([300]), torch.randn(1, 7, 64)
    outputs = {}
    with torch.no_grad():
        for mode in ("hooked", "merge"):
            with WeightPatcher(targets, mode).applied([Application(net, unet=0.7)]):
                outputs[mode] = comps.unet(x, t, ctx).sample
    torch.testing.assert_close(outputs["hooked"], outputs["merge"], atol=1e-5, rtol=1e-4)


def test_lbw_zeros_equals_no_lora_bit_exact(sd1):
    comps, targets = sd1
    before = checksum(comps.unet, *comps.text_encoders)
    zeros = blocks.resolve("0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0", Arch.SD1)
    patcher = WeightPatcher(targets)
    report = patcher.apply([Application(_net(targets, algo="lora"), blocks=zeros)])
    assert checksum(comps.unet, *comps.text_encoders) == before
    assert report.rewritten == 0
    patcher.apply([Application(_net(targets, algo="lora"), blocks=blocks.resolve("NONE", Arch.SD1))])
    assert checksum(comps.unet, *comps.text_encoders) == before


def test_unet_only_preset_leaves_text_encoder_untouched(sd1):
    comps, targets = sd1
    te_before, unet_before = checksum(*comps.text_encoders), checksum(comps.unet)
    presets = blocks.parse_presets_file("UNETONLY:0,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1")
    w = blocks.resolve("UNETONLY", Arch.SD1, presets)
    with WeightPatcher(targets).applied([Application(_net(targets), blocks=w)]):
        assert checksum(*comps.text_encoders) == te_before
        assert checksum(comps.unet) != unet_before


def test_block_weight_scales_each_module(sd1):
    comps, targets = sd1
    net = _net(targets, roles=["attn"])
    w = blocks.resolve("OUTD", Arch.SD1)
    name_in = "lora_unet_down_blocks_1_attentions_0_proj_in"  # IN04: weight 0 in OUTD
    name_out = "lora_unet_up_blocks_1_attentions_0_proj_in"  # OUT03: weight 1
    w_in, w_out = targets[name_in].param.clone(), targets[name_out].param.clone()
    with WeightPatcher(targets).applied([Application(net, unet=0.5, blocks=w)]):
        assert torch.equal(targets[name_in].param, w_in)
        expected = net.modules[name_out].merged(w_out, 0.5)
        torch.testing.assert_close(targets[name_out].param, expected)


def test_changing_one_strength_repatches_only_its_modules(sd1):
    comps, targets = sd1
    te_net = _net(targets, roles=["te_attn", "te_mlp"], name="te")
    unet_net = _net(targets, roles=["attn"], seed=1, name="unet")
    patcher = WeightPatcher(targets)
    first = patcher.apply([Application(te_net), Application(unet_net)])
    assert first.rewritten == 72 + 192
    again = patcher.apply([Application(te_net), Application(unet_net)])
    assert again.rewritten == 0
    changed = patcher.apply([Application(te_net), Application(unet_net, unet=0.5)])
    assert changed.rewritten == 192
    patcher.restore()


def test_failure_while_writing_leaves_model_unchanged(sd1):
    comps, targets = sd1
    patcher = WeightPatcher(targets)
    good = _net(targets, roles=["attn"])
    patcher.apply([Application(good)])
    state = checksum(comps.unet, *comps.text_encoders)
    huge = make_network_file(targets.select(["te_attn"]), "lora", rank=4)
    name = "lora_te_text_model_encoder_layers_5_self_attn_v_proj"
    for suffix in ("lora_up.weight", "lora_down.weight"):  # finite factors whose product overflows float32
        huge[f"{name}.{suffix}"] = torch.full_like(huge[f"{name}.{suffix}"], 1e20)
    bad = load_network(huge, arch=Arch.SD1)
    with pytest.raises(NonFiniteError, match="self_attn_v_proj"):
        patcher.apply([Application(good), Application(bad)])
    assert checksum(comps.unet, *comps.text_encoders) == state
    patcher.restore()


def test_bad_networks_are_refused_before_any_change(sd1, tiny_sdxl, tmp_path):
    comps, targets = sd1
    before = checksum(comps.unet, *comps.text_encoders)
    xl = load_network(make_network_file(targets_of(tiny_sdxl, Arch.SDXL).select(["attn"]), "lora"))
    with pytest.raises(ArchMismatchError, match="SDXL"):
        WeightPatcher(targets).apply([Application(xl)])
    sd = make_network_file(targets.select(["attn"]), "lora")
    key = "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"
    sd[key] = torch.zeros(4, 17, 1, 1)
    path = tmp_path / "wrong_shape.safetensors"
    save_file(sd, path)
    with pytest.raises(ShapeMismatchError, match=r"wrong_shape.safetensors.*mid_block_attentions_0_proj_in"):
        WeightPatcher(targets).apply([Application(load_network(path, arch=Arch.SD1))])
    sd[key] = torch.full((4, 64, 1, 1), float("nan"))
    save_file(sd, path)
    with pytest.raises(NonFiniteError, match="mid_block_attentions_0_proj_in.lora_down.weight"):
        load_network(path, arch=Arch.SD1)
    unrelated = load_network({"lora_unet_nothing_here.lora_down.weight": torch.ones(1, 2),
                              "lora_unet_nothing_here.lora_up.weight": torch.ones(2, 1)}, arch=Arch.SD1)
    with pytest.raises(KeyMapError, match="none of its 1 modules"):
        WeightPatcher(targets).apply([Application(unrelated)])
    assert checksum(comps.unet, *comps.text_encoders) == before


def test_sdxl_apply_restore_with_12_block_list(tiny_sdxl):
    targets = targets_of(tiny_sdxl, Arch.SDXL)
    before = checksum(tiny_sdxl.unet, *tiny_sdxl.text_encoders)
    net = _net(targets, algo="lokr", arch=Arch.SDXL)
    w = blocks.resolve("1,0,1,0,1,0,1,0,1,0,1,0", Arch.SDXL)
    patcher = WeightPatcher(targets)
    report = patcher.apply([Application(net, blocks=w)])
    assert 0 < sum(report.applied.values()) < len(net.modules)
    patcher.restore()
    assert checksum(tiny_sdxl.unet, *tiny_sdxl.text_encoders) == before


def test_same_file_changes_ldm_and_diffusers_unets_by_the_same_delta(sd1):
    comps, targets = sd1
    ldm = tiny_ldm_unet()
    ldm.load_state_dict(convert_state_dict(comps.unet.state_dict(), SD_LAYOUT, "compvis"))
    ldm_targets = ModelTargets.merge(Arch.SD1, [keys.unet_targets(ldm, Arch.SD1, "compvis")])
    net = _net(targets, roles=["attn", "resnet", "sampler"], algo="lora")
    before_d = {n: t.param.detach().clone() for n, t in targets.targets.items() if t.component is Component.UNET}
    before_l = {n: t.param.detach().clone() for n, t in ldm_targets.targets.items()}
    with WeightPatcher(targets).applied([Application(net, unet=0.9)]), \
            WeightPatcher(ldm_targets).applied([Application(net, unet=0.9)]):
        for name in before_l:
            d_delta = targets[name].param - before_d[name]
            l_delta = ldm_targets[name].param - before_l[name]
            assert torch.equal(d_delta, l_delta), name
        x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 7, 64)
        with torch.no_grad():
            torch.testing.assert_close(comps.unet(x, t, ctx).sample, ldm(x, t, context=ctx), atol=1e-5, rtol=1e-4)


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(d, 2 * d))
        self.mlp.add_module("c_proj", nn.Linear(2 * d, d))

    def forward(self, x):
        return x + self.attn(x, x, x, need_weights=False)[0] + self.mlp(x)


def test_fused_qkv_targets_merge_hook_and_restore():
    torch.manual_seed(0)
    tower = nn.Module()
    tower.transformer = nn.Module()
    tower.transformer.resblocks = nn.Sequential(_Block(8), _Block(8))
    targets = ModelTargets.merge(Arch.SD2, [keys.open_clip_text_targets(tower, Component.TE)])
    net = load_network(make_network_file(list(targets.targets.values()), "lora", rank=2, seed=4), arch=Arch.SD2)
    x = torch.randn(2, 5, 8)
    before = checksum(tower)
    with torch.no_grad():
        with WeightPatcher(targets, "merge").applied([Application(net, te=0.9)]):
            merged = tower.transformer.resblocks(x)
        assert checksum(tower) == before
        with WeightPatcher(targets, "hooked").applied([Application(net, te=0.9)]):
            hooked = tower.transformer.resblocks(x)
    assert checksum(tower) == before
    assert not torch.allclose(merged, tower.transformer.resblocks(x))
    torch.testing.assert_close(hooked, merged, atol=1e-5, rtol=1e-4)
    assert "in_proj_weight" in dict(tower.transformer.resblocks[0].attn.named_parameters())
