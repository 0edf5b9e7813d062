"""LyCORIS train_norm: which normalization layers each preset trains, what is refused, and a short real training run
whose file every reader agrees on (LyCORIS' key spelling, `info`, A1111's formula re-implemented from
`extensions-builtin/Lora/network_norm.py`, patching merged and hooked with exact restore)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lib_lora.errors import ConfigError
from lib_lora.info import describe
from lib_lora.io import load_file, read_metadata
from lib_lora.networks import LoadedNetwork, load_network
from lib_lora.networks.norm import NormModule
from lib_lora.patching import Application, WeightPatcher
from lib_lora.train.algo_args import network_notes
from lib_lora.train.blockwise import BlockwiseConfig
from lib_lora.train.config import NetworkArgs, NetworkConfig
from lib_lora.train.families.diffusers_family import DiffusersFamily
from lib_lora.train.families.ldm_family import LdmFamily
from lib_lora.train.network import TrainableNetwork, summarize
from lib_lora.train.run import train
from lib_lora.train.toml_config import load_config, parse_network_args
from lib_lora.types import Arch
from tests.helpers import checksum, targets_of
from tests.train import ldm_standin
from tests.train.fixtures import tiny_model, write_images, write_run


def a1111_norm_update(weight: torch.Tensor, w: dict[str, torch.Tensor], multiplier: float):
    """(weight change, bias change) A1111 1.10 applies for one module with file tensors `w` (suffix -> tensor), or None
    where it creates no norm module, written from the definitions in its network_norm.py / network.py:

    - a norm module exists only when the file has both `w_norm` and `b_norm` (`ModuleTypeNorm.create_module`);
    - `calc_updown`: updown = w_norm, ex_bias = b_norm; `finalize_updown` reshapes updown to the weight's shape,
      multiplies it by `calc_scale()` (the file's `scale` if any, else alpha / dim, where a norm module has no dim,
      else 1) and by the multiplier, and multiplies ex_bias by the multiplier;
    - the layer then holds weight + updown and bias + ex_bias."""
    if "w_norm" not in w or "b_norm" not in w:
        return None
    scale = float(w["scale"]) if "scale" in w else 1.0
    updown = w["w_norm"].to(torch.float64).reshape(weight.shape) * scale * multiplier
    return updown, w["b_norm"].to(torch.float64) * multiplier


def _network(args: list[str], **options) -> NetworkConfig:
    parsed = parse_network_args(args)
    return NetworkConfig(network_module=options.pop("network_module", "lycoris.kohya"),
                         network_args=NetworkArgs(**parsed["args"]), blockwise=BlockwiseConfig(**parsed["blockwise"]),
                         **options)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


def _norm_roles(net: TrainableNetwork) -> set[str]:
    return {p.target.role for p in net.plans.values() if p.target.is_norm}


def test_each_preset_trains_the_norms_of_its_blocks(tiny):
    """As LyCORIS selects them: the GroupNorm/LayerNorm layers inside the modules a preset targets (transformers,
    ResNets), also in linear-only presets and whatever the algorithm; never conv_norm_out or the text encoder's."""
    targets = targets_of(tiny, Arch.SD1)
    expected = {"full": {"attn_norm", "resnet_norm"}, "full-lin": {"attn_norm", "resnet_norm"},
                "attn-mlp": {"attn_norm"}, "unet-transformer-only": {"attn_norm"},
                "unet-convblock-only": {"resnet_norm"}}
    for preset, roles in expected.items():
        for algo in ("lora", "loha", "ia3"):
            net = TrainableNetwork(_network([f"preset={preset}", f"algo={algo}", "train_norm=True"]), targets)
            assert _norm_roles(net) == roles, (preset, algo)
    net = TrainableNetwork(_network(["algo=dylora", "train_norm=True", "module_dropout=0.1", "bypass_mode=True"]),
                           targets)
    norms = {n: m for n, m in net.nets.items() if isinstance(m, NormModule)}
    assert len(norms) == len(targets.select(["attn_norm", "resnet_norm"])) == summarize(net)["norm"]
    assert all(m.module_dropout == 0.1 and m.bypass_only for m in norms.values())
    assert all(not m.w_norm.detach().any() and not m.b_norm.detach().any() for m in norms.values())
    assert all(p.requires_grad for m in norms.values() for p in m.parameters())
    without = TrainableNetwork(_network(["algo=dylora"]), targets)
    assert set(net.nets) - set(without.nets) == set(norms)


@pytest.mark.parametrize("args,options,says", [
    (["train_norm=True"], {"network_module": "networks.lora"}, "lycoris.kohya option"),
    (["algo=locon", "preset=attn-only", "train_norm=True"], {}, "preset attn-only hold no normalization layer"),
    (["algo=locon", "train_norm=True"], {"network_train_text_encoder_only": True}, "text encoder"),
])
def test_train_norm_that_would_train_nothing_is_refused_with_the_config(args, options, says):
    with pytest.raises(ConfigError) as info:
        _network(args, **options)
    assert info.value.field == "network_args.train_norm" and says in str(info.value)


def test_notes_say_what_does_not_act_on_norms():
    notes = network_notes(_network(["algo=locon", "train_norm=True", "rank_dropout=0.1"], scale_weight_norms=1.0))
    assert any(n.startswith("rank_dropout: no effect on the normalization") for n in notes)
    assert any(n.startswith("scale_weight_norms: the normalization layers") for n in notes)


def _train(tmp_path: Path, **options) -> Path:
    write_images(tmp_path / "train" / "5_sks", 2)
    cfg = load_config(write_run(tmp_path, train_batch_size=1, **options))
    result = train(cfg, model=tiny_model())
    assert result.status == "finished", result.report
    return result.final_file


def test_train_norm_trains_and_every_reader_agrees(tmp_path):
    """The k16 preset's network (kohya_ss GUI: LyCORIS dylora, preset full, train_norm) for a few steps: the file has
    LyCORIS' `w_norm`/`b_norm` for every norm of the trained blocks, `info` reads it, each module changes the layer as
    A1111 does, and patching the model (merged or hooked) gives the same outputs and restores it exactly."""
    path = _train(tmp_path, max_train_steps=3, network_module="lycoris.kohya", network_dim=8, network_alpha=8,
                  learning_rate=1e-2, save_precision="fp16",
                  network_args=["preset=full", "conv_dim=8", "conv_alpha=4", "use_tucker=False", "block_size=1",
                                "rank_dropout=0", "module_dropout=0", "algo=dylora", "train_norm=True"])
    model = tiny_model()
    targets = targets_of(model, Arch.SD1)
    norm_names = {t.name for t in targets.select(["attn_norm", "resnet_norm"])}
    tensors = load_file(path).tensors
    assert {k for k in tensors if k.endswith((".w_norm", ".b_norm"))} == \
        {f"{n}.{s}" for n in norm_names for s in ("w_norm", "b_norm")}
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert json.loads(read_metadata(path)["ss_network_args"])["train_norm"] == "True"

    info = describe(path)
    assert info.algorithm == "locon" and "norm" in info.algorithms and info.unmatched_keys == []
    assert info.norm_layers == len(norm_names) and info.rank == 8 and info.alpha == {"min": 4.0, "max": 8.0}

    net = load_network(path)
    moved = 0
    for name in norm_names:
        module, layer = net.modules[name], targets[name].module
        file = {k.partition(".")[2]: v for k, v in tensors.items() if k.partition(".")[0] == name}
        update, bias_update = a1111_norm_update(layer.weight, file, 0.7)
        ours = module.merged(layer.weight, 0.7) - layer.weight.to(torch.float32)
        ours_bias = module.merged_bias(layer.bias, 0.7) - layer.bias.to(torch.float32)
        torch.testing.assert_close(ours.to(torch.float64), update, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ours_bias.to(torch.float64), bias_update, rtol=1e-6, atol=1e-7)
        moved += bool(update.abs().max() > 0 and bias_update.abs().max() > 0)
    assert moved > len(norm_names) // 2, "three steps must move most norm layers away from their start"

    before = checksum(model.unet, *model.text_encoders)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(1))
    outputs = {}
    for mode in ("merge", "hooked"):
        with WeightPatcher(targets, mode).applied([Application(net, te=0.7, unet=0.7)]), torch.no_grad():
            outputs[mode] = model.unet(x, torch.tensor([300]), encoder_hidden_states=context).sample
        assert checksum(model.unet, *model.text_encoders) == before
    torch.testing.assert_close(outputs["hooked"], outputs["merge"], rtol=1e-4, atol=1e-5)


def _norm_grads(family, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """w_norm/b_norm gradients of one prediction loss, with norm modules that already change the model."""
    targets = family.targets()
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for t in sorted(targets.select(["attn_norm", "resnet_norm"]), key=lambda t: t.name):
        m = NormModule.create(t.name, t.shape)
        with torch.no_grad():
            m.w_norm.normal_(0, 0.05, generator=g)
            m.b_norm.normal_(0, 0.05, generator=g)
        modules[t.name] = m
    net = LoadedNetwork("train", None, family.arch, "training", modules)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    target = torch.randn(2, 4, 16, 16, generator=g)
    with WeightPatcher(targets, "hooked").applied([Application(net)]):
        cond = family.encode_prompts(["a photo of sks dog", "a red circle"])
        pred = family.predict(latents, torch.tensor([20, 850]), cond)
        ((pred - target) ** 2).mean().backward()
    return {name: (m.w_norm.grad, m.b_norm.grad) for name, m in modules.items()}


def test_web_ui_unet_trains_the_same_norms_as_diffusers():
    """Training in the web UI hooks the LDM U-Net's GroupNorm32 (normalising in float32) and LayerNorms: its norm
    modules get the gradients the diffusers U-Net gives them."""
    model, standin = ldm_standin.sd1_pair()
    diffusers, ldm = DiffusersFamily(model), LdmFamily(standin)
    try:
        expected, got = _norm_grads(diffusers), _norm_grads(ldm)
    finally:
        diffusers.close()
        ldm.close()
    assert got.keys() == expected.keys() and len(got) == 108
    scale = max(g.abs().max().item() for pair in expected.values() for g in pair)
    assert scale > 0
    for name, pair in expected.items():
        for g, e in zip(got[name], pair):
            torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-3 * scale, msg=name)
