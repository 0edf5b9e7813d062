"""Normalization layers (LyCORIS train_norm): their kohya names in every module tree (and the names A1111 finds them
by), the `w_norm`/`b_norm` module merged and hooked by WeightPatcher with exact restore, and its gradients."""
from __future__ import annotations

import re
from collections import Counter

import pytest
import torch
from torch import nn

from lib_lora import blocks, keys
from lib_lora.errors import ShapeMismatchError
from lib_lora.keys import ModelTargets
from lib_lora.networks import LayerOp, load_network
from lib_lora.networks.norm import NormModule
from lib_lora.patching import Application, WeightPatcher
from lib_lora.sd.tiny import tiny_components, tiny_ldm_unet
from lib_lora.types import Arch
from lib_lora.unet_layout import SD_LAYOUT, convert_state_dict
from tests.fullsize import meta_model
from tests.helpers import checksum, make_network_file, targets_of

NORMS = sorted(keys.NORM_ROLES)
LYCORIS_NORMS = ["attn_norm", "resnet_norm"]  # what train_norm trains with LyCORIS' presets


@pytest.fixture()
def sd1():
    comps = tiny_components("sd1", seed=3, with_vae=False)
    return comps, targets_of(comps, Arch.SD1)


def _net(targets, roles, algo, seed=0):
    return load_network(make_network_file(targets.select(roles), algo, rank=4, seed=seed), arch=Arch.SD1)


def _norm_roles(targets: ModelTargets) -> Counter:
    return Counter(t.role for t in targets.targets.values() if t.is_norm)


def test_full_size_norm_counts_and_kinds():
    """SD1.5: 16 transformers x (GroupNorm + 3 LayerNorms), 22 ResNets x 2 GroupNorms, conv_norm_out, and the
    text encoder's 12 x 2 LayerNorms + final; SDXL: 70 transformer blocks x 3 + 11 GroupNorms, 17 ResNets x 2."""
    sd1 = targets_of(meta_model("sd1"), Arch.SD1)
    assert _norm_roles(sd1) == {"attn_norm": 64, "resnet_norm": 44, "top_norm": 1, "te_norm": 25}
    sdxl = targets_of(meta_model("sdxl"), Arch.SDXL)
    assert _norm_roles(sdxl) == {"attn_norm": 221, "resnet_norm": 34, "top_norm": 1, "te_norm": 90}
    for targets in (sd1, sdxl):
        for t in targets.targets.values():
            assert t.is_norm == isinstance(t.module, (nn.GroupNorm, nn.LayerNorm)), t.name
    assert sdxl["lora_unet_input_blocks_4_1_transformer_blocks_1_norm3"].role == "attn_norm"
    assert sdxl["lora_te2_text_model_encoder_layers_31_layer_norm2"].role == "te_norm"
    assert sd1["lora_te_text_model_final_layer_norm"].path.endswith("final_layer_norm")
    # the roles LoRA/LoCon select stay what they were: norms are never picked up by them
    assert not any(t.is_norm for t in sd1.select(["attn", "resnet", "sampler", "top", "te_attn", "te_mlp"]))


def _a1111_compvis_key(name: str) -> str:
    """The web UI's module key for a kohya U-Net name, re-implemented from the rules of A1111 1.10's
    `convert_diffusers_name_to_compvis` (extensions-builtin/Lora/networks.py) for the blocks that hold norms:
    input block 1 + 3i + j, output block 3i + j, middle block 1 (attention) or 2j (ResNet); ResNet children renamed
    norm1 -> in_layers_0, norm2 -> out_layers_0; attention children kept."""
    resnet = {"norm1": "in_layers_0", "norm2": "out_layers_0"}
    m = re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = resnet.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_input_blocks_{1 + 3 * i + j}_{1 if kind == 'attentions' else 0}_{rest}"
    m = re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", name)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        rest = resnet.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_middle_block_{1 if kind == 'attentions' else 2 * j}_{rest}"
    m = re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = resnet.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_output_blocks_{3 * i + j}_{1 if kind == 'attentions' else 0}_{rest}"
    return name


def test_ldm_and_diffusers_unets_name_their_norms_alike_and_the_web_ui_finds_them(tiny_sd1):
    ldm = {t.name: t for t in keys.unet_targets(tiny_ldm_unet(), Arch.SD1, "compvis") if t.is_norm}
    dif = {t.name: t for t in keys.unet_targets(tiny_sd1.unet, Arch.SD1, "diffusers") if t.is_norm}
    assert set(ldm) == set(dif) and len(ldm) == 64 + 44 + 1
    assert ldm["lora_unet_down_blocks_0_resnets_0_norm1"].path == "input_blocks.1.0.in_layers.0"
    assert ldm["lora_unet_mid_block_resnets_1_norm2"].path == "middle_block.2.out_layers.0"
    assert ldm["lora_unet_up_blocks_3_attentions_2_norm"].path == "output_blocks.11.1.norm"
    assert ldm["lora_unet_conv_norm_out"].path == "out.0"
    block_ids = {"lora_unet_down_blocks_0_resnets_0_norm1": "IN01", "lora_unet_down_blocks_2_attentions_1_norm":
                 "IN08", "lora_unet_mid_block_resnets_1_norm2": "M00", "lora_unet_up_blocks_3_attentions_2_norm":
                 "OUT11", "lora_unet_conv_norm_out": "OUT11"}
    assert {n: blocks.block_of(n, Arch.SD1) for n in block_ids} == block_ids
    for name, t in ldm.items():
        assert t.role == dif[name].role and t.shape == dif[name].shape, name
        assert keys.compvis_path(name, Arch.SD1)[1] == t.path
        assert keys.diffusers_path(name, Arch.SD1)[1] == dif[name].path
        if t.role in LYCORIS_NORMS:  # what train_norm writes: the web UI's built-in Lora must find each module
            assert _a1111_compvis_key(name) == "diffusion_model_" + t.path.replace(".", "_"), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_norms_with_a_lora_merge_and_restore_bit_exact(sd1, dtype):
    comps, targets = sd1
    for m in [comps.unet, *comps.text_encoders]:
        m.to(dtype)
    before = checksum(comps.unet, *comps.text_encoders)
    norms = _net(targets, NORMS, "norm")
    assert set(norms.modules) == {t.name for t in targets.select(NORMS)} and norms.algorithms() == ["norm"]
    patcher = WeightPatcher(targets)
    report = patcher.apply([Application(norms, te=0.5, unet=-0.7), Application(_net(targets, ["attn"], "lora"))])
    assert report.rewritten == len(targets.select([*NORMS, "attn"]))
    ln = targets["lora_te_text_model_encoder_layers_3_layer_norm2"].module
    module = norms.modules["lora_te_text_model_encoder_layers_3_layer_norm2"]
    assert checksum(comps.unet, *comps.text_encoders) != before
    patcher.apply([Application(norms, te=0.5)])  # only the norms now: the LoRA's weights come back
    patched = ln.weight.detach().clone()
    patcher.restore()
    assert checksum(comps.unet, *comps.text_encoders) == before
    expected = (ln.weight.to(torch.float32) + 0.5 * module.w_norm.to(torch.float32)).to(dtype)
    assert torch.equal(patched, expected)


def test_hooked_equals_merged_on_unet_and_text_encoder(sd1):
    comps, targets = sd1
    net = _net(targets, NORMS, "norm")
    lora = _net(targets, ["attn", "te_attn"], "lora", seed=1)
    second = _net(targets, ["attn_norm", "te_norm"], "norm", seed=2)  # two modules on a layer: the bypass path
    te = comps.text_encoders[0]
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.randn(2, 7, 64)
    ids = torch.tensor([[49406, 320, 1125, 539, 49407]])
    before = checksum(comps.unet, te)
    outputs = {}
    with torch.no_grad():
        plain = comps.unet(x, t, ctx).sample
        for stack in ("norm", "stacked"):
            apps = [Application(net, te=0.6, unet=0.8)]
            if stack == "stacked":
                apps += [Application(lora, te=0.4), Application(second, te=-0.5, unet=0.3)]
            for mode in ("hooked", "merge"):
                with WeightPatcher(targets, mode).applied(apps):
                    outputs[stack, mode] = (comps.unet(x, t, ctx).sample, te(ids).last_hidden_state)
                assert checksum(comps.unet, te) == before
    assert (plain - outputs["norm", "merge"][0]).abs().max() > 1e-2
    for stack in ("norm", "stacked"):
        for hooked, merged in zip(outputs[stack, "hooked"], outputs[stack, "merge"]):
            torch.testing.assert_close(hooked, merged, atol=1e-4, rtol=1e-4)


def test_ldm_unet_gets_the_same_norm_change_as_diffusers(sd1):
    """The web UI's LDM U-Net (GroupNorm32, which normalises in float32) and the diffusers U-Net: the same file changes
    the same weights by the same amounts, and both apply it hooked as merged."""
    comps, targets = sd1
    ldm = tiny_ldm_unet()
    ldm.load_state_dict(convert_state_dict(comps.unet.state_dict(), SD_LAYOUT, "compvis"))
    ldm_targets = ModelTargets.merge(Arch.SD1, [keys.unet_targets(ldm, Arch.SD1, "compvis")])
    net = _net(targets, ["attn_norm", "resnet_norm", "top_norm"], "norm")
    before = checksum(ldm)
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 7, 64)
    with torch.no_grad():
        with WeightPatcher(targets).applied([Application(net, unet=0.9)]), \
                WeightPatcher(ldm_targets).applied([Application(net, unet=0.9)]):
            for name in net.modules:
                assert torch.equal(targets[name].param, ldm_targets[name].param), name
                assert torch.equal(targets[name].module.bias, ldm_targets[name].module.bias), name
            merged = ldm(x, t, context=ctx)
            torch.testing.assert_close(comps.unet(x, t, ctx).sample, merged, atol=1e-5, rtol=1e-4)
        with WeightPatcher(ldm_targets, "hooked").applied([Application(net, unet=0.9)]):
            hooked = ldm(x, t, context=ctx)
    torch.testing.assert_close(hooked, merged, atol=1e-5, rtol=1e-4)
    assert checksum(ldm) == before


def test_bad_norm_tensors_are_refused_by_name(sd1):
    comps, targets = sd1
    before = checksum(comps.unet)
    name = "lora_unet_mid_block_resnets_0_norm1"
    with pytest.raises(ShapeMismatchError, match=f"{name}.b_norm"):
        load_network({f"{name}.w_norm": torch.zeros(64), f"{name}.b_norm": torch.zeros(32)}, arch=Arch.SD1)
    with pytest.raises(ShapeMismatchError, match=f"{name}.w_norm"):
        load_network({f"{name}.w_norm": torch.zeros(8, 8)}, arch=Arch.SD1)
    wrong = load_network({f"{name}.w_norm": torch.ones(32), f"{name}.b_norm": torch.ones(32)}, arch=Arch.SD1)
    with pytest.raises(ShapeMismatchError, match=name):
        WeightPatcher(targets).apply([Application(wrong)])
    assert checksum(comps.unet) == before
    # an alpha means nothing to a norm module (A1111 scales it by 1 too): reported as unused, not applied
    extra = load_network({f"{name}.w_norm": torch.ones(64), f"{name}.alpha": torch.tensor(2.0)}, arch=Arch.SD1)
    assert extra.unmatched_keys == [f"{name}.alpha"] and extra.modules[name].bias_delta() is None


@pytest.mark.parametrize("layer", [nn.GroupNorm(4, 16), nn.LayerNorm(16)])
def test_trained_norm_module_gets_the_gradients_of_the_merged_layer(layer):
    """Hooked training (one module: one normalisation with the changed affine; two stacked: the bypass sum) gives
    w_norm and b_norm the gradients the merged layer's weight and bias would get."""
    torch.manual_seed(0)
    layer.weight.data.uniform_(0.5, 1.5)
    layer.bias.data.normal_()
    x = torch.randn(3, 16, 5, 5) if isinstance(layer, nn.GroupNorm) else torch.randn(3, 7, 16)
    grad_out = torch.randn_like(x)
    module = NormModule.create("lora_unet_x", layer.weight.shape)
    with torch.no_grad():
        module.w_norm.normal_(0, 0.1)
        module.b_norm.normal_(0, 0.1)
    op = LayerOp.of(layer)
    w = (layer.weight + 0.7 * module.w_norm).detach().requires_grad_()
    b = (layer.bias + 0.7 * module.b_norm).detach().requires_grad_()
    reference = op(x, w, b)
    (reference * grad_out).sum().backward()
    for path in ("rebuilt", "bypass"):
        module.zero_grad()
        if path == "rebuilt":
            out = module.rebuilt_forward(x, layer, op, 0.7)
        else:
            out = module.bypass(x, layer(x), op, layer.weight, 0.7, layer.bias)
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
        (out * grad_out).sum().backward()
        torch.testing.assert_close(module.w_norm.grad, 0.7 * w.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(module.b_norm.grad, 0.7 * b.grad, atol=1e-5, rtol=1e-5)
    module.bypass_only = True
    assert module.rebuilt_forward(x, layer, op, 0.7) is None
