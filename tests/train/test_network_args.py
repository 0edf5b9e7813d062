"""network_args as LyCORIS and the kohya_ss GUI write them: each builds what it says, defaults are accepted for every
algorithm and other values refused by name where the algorithm does not use them; Diag-OFT end to end (file
spelling, info, A1111's formula on the trained file, patch and exact restore); bypass_mode changes how, not what."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lib_lora.errors import ConfigError
from lib_lora.info import describe
from lib_lora.io import load_file, read_metadata
from lib_lora.keys import Target
from lib_lora.networks import load_network
from lib_lora.networks.lokr import factorization
from lib_lora.patching import Application, WeightPatcher
from lib_lora.train.blockwise import BlockwiseConfig
from lib_lora.train.config import NetworkArgs, NetworkConfig
from lib_lora.train.network import TrainableNetwork, _check_bypass_possible
from lib_lora.train.run import train
from lib_lora.train.toml_config import load_config, parse_network_args
from lib_lora.types import Arch, Component
from tests.helpers import checksum, targets_of
from tests.test_oft import a1111_updown
from tests.train.fixtures import tiny_model, write_images, write_run

# network_args exactly as kohya_ss' lora_gui.py writes them for each LyCORIS algorithm, at the GUI's defaults
GUI_ARGS = {
    "locon": "preset=full conv_dim=8 conv_alpha=4 use_tucker=False rank_dropout=0 bypass_mode=False dora_wd=False "
             "module_dropout=0 use_tucker=False use_scalar=False rank_dropout_scale=False algo=locon train_norm=False",
    "loha": "preset=full conv_dim=8 conv_alpha=4 use_tucker=False rank_dropout=0 bypass_mode=False dora_wd=False "
            "module_dropout=0 use_tucker=False use_scalar=False rank_dropout_scale=False algo=loha train_norm=False",
    "lokr": "preset=full conv_dim=8 conv_alpha=4 use_tucker=False rank_dropout=0 bypass_mode=False dora_wd=False "
            "module_dropout=0 factor=-1 use_cp=False use_scalar=False decompose_both=False rank_dropout_scale=False "
            "algo=lokr train_norm=False",
    "diag-oft": "preset=full conv_dim=8 conv_alpha=4 module_dropout=0 use_tucker=False rank_dropout=0 "
                "rank_dropout_scale=False constraint=0.0 rescaled=False algo=diag-oft train_norm=False",
    "dylora": "preset=full conv_dim=8 conv_alpha=4 use_tucker=False block_size=1 rank_dropout=0 module_dropout=0 "
              "algo=dylora train_norm=False",
    "ia3": "preset=full conv_dim=8 conv_alpha=4 train_on_input=False algo=ia3",
    "full": "preset=full rank_dropout=0 module_dropout=0 rank_dropout_scale=False algo=full train_norm=False",
}


def _network(args: str | list[str], **options) -> NetworkConfig:
    items = args.split() if isinstance(args, str) else args
    parsed = parse_network_args(items)
    return NetworkConfig(network_module=options.pop("network_module", "lycoris.kohya"),
                         network_args=NetworkArgs(**parsed["args"]), blockwise=BlockwiseConfig(**parsed["blockwise"]),
                         **options)


@pytest.mark.parametrize("algo", GUI_ARGS)
def test_the_guis_defaults_are_accepted_for_every_algorithm(algo):
    assert _network(GUI_ARGS[algo]).algo == algo


@pytest.mark.parametrize("args,field,says", [
    (["algo=lora", "constraint=0.1"], "network_args.constraint", "diag-oft"),
    (["algo=loha", "rescaled=True"], "network_args.rescaled", "diag-oft"),
    (["algo=loha", "train_on_input=True"], "network_args.train_on_input", "ia3"),
    (["algo=diag-oft", "use_tucker=True"], "network_args.use_tucker", "locon, loha, lokr"),
    (["algo=ia3", "dora_wd=True"], "network_args.dora_wd", "lora, locon, loha, lokr"),
    (["algo=loha", "factor=4"], "network_args.factor", "lokr"),
    (["algo=lokr", "block_size=2"], "network_args.block_size", "dylora"),
    (["algo=lora", "use_scalar=True"], "network_args.use_scalar", "not implemented"),
    (["algo=lora", "train_norm=True", "preset=attn-only"], "network_args.train_norm", "no normalization layer"),
    (["algo=diag-oft", "constraint=-1"], "constraint", ">= 0"),
    (["algo=loha", "dropout=0.1"], "network_args.dropout", "LoRA-type"),
    (["algo=diag-oft", "rank_dropout=0.1"], "network_args.rank_dropout", "LoRA-type"),
])
def test_a_value_the_algorithm_would_not_use_is_refused_by_name(args, field, says):
    with pytest.raises(ConfigError) as info:
        _network(args)
    assert info.value.field == field and says in str(info.value)


def test_lycoris_aliases_and_sd_scripts_rank_dropout():
    # the GUI writes use_tucker and use_cp for LoKr: LyCORIS ORs them
    assert _network(["algo=lokr", "use_tucker=False", "use_cp=True"]).network_args.use_tucker is True
    assert _network(["algo=lokr", "use_cp=True", "use_tucker=False"]).network_args.use_tucker is True
    assert _network(["algo=diag-oft", "constrain=0.01"]).network_args.constraint == 0.01
    with pytest.raises(ConfigError, match="lycoris.kohya option"):
        _network(["rank_dropout=0.1", "rank_dropout_scale=True"], network_module="networks.lora")


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


def _built(tiny, args: list[str], **options) -> TrainableNetwork:
    return TrainableNetwork(_network(args, **options), targets_of(tiny, Arch.SD1), seed=3)


def _kxk(net: TrainableNetwork):
    return [m for name, m in net.nets.items() if any(k > 1 for k in net.plans[name].target.kernel_size)]


def test_each_lycoris_option_builds_what_it_says(tiny):
    oft = _built(tiny, ["algo=diag-oft", "conv_dim=4", "constraint=0.002", "rescaled=True"], network_dim=8)
    for name, m in oft.nets.items():
        t = oft.plans[name].target
        assert (m.block_size, m.rank) == factorization(t.shape[0], 4 if any(k > 1 for k in t.kernel_size) else 8)
        assert m.constraint == pytest.approx(0.002) and m.rescale.shape == (t.shape[0], *([1] * (len(t.shape) - 1)))
    ia3 = _built(tiny, ["algo=ia3", "train_on_input=True"])
    assert all(m.on_input and m.weight.numel() == ia3.plans[n].target.shape[1] for n, m in ia3.nets.items())
    locon = _built(tiny, ["algo=locon", "conv_dim=4", "use_cp=True"])
    assert _kxk(locon) and all(m.lora_mid is not None and m.lora_down.weight.shape[2:] == (1, 1)
                               for m in _kxk(locon))
    loha = _built(tiny, ["algo=loha", "conv_dim=4", "use_tucker=True"])
    assert all(m.hada_t1 is not None for m in _kxk(loha))
    lokr = _built(tiny, ["algo=lokr", "conv_dim=2", "use_tucker=True", "decompose_both=True", "factor=8"],
                  network_dim=2)
    assert any(m.lokr_w1_a is not None for m in lokr.nets.values())
    assert all(m.lokr_t2 is not None for m in _kxk(lokr))
    # LyCORIS' rule for a dim at or above the layer's size: full factors, scale 1, no huge low-rank factors
    full = _built(tiny, ["algo=lokr", "conv_dim=100000"], network_dim=100000)
    assert all(m.lokr_w2 is not None and m.lokr_w2_a is None and m.rank is None for m in full.nets.values())
    dora = _built(tiny, ["algo=loha", "dora_wd=True", "wd_on_output=False"])
    assert all(m.dora_scale.shape[:2] == (1, dora.plans[n].target.shape[1]) for n, m in dora.nets.items())
    assert {m.dylora_unit for m in _built(tiny, ["algo=dylora", "block_size=2"]).nets.values()} == {2}
    assert {m.dylora_unit for m in _built(tiny, ["algo=dylora"]).nets.values()} == {4}  # LyCORIS' default
    assert {m.dylora_unit for m in _built(tiny, [], network_module="networks.dylora").nets.values()} == {1}


@pytest.mark.parametrize("args", [GUI_ARGS["locon"].split(), ["algo=loha", "rank_dropout=0"]])
def test_every_new_option_starts_at_the_base_model(tiny, args):
    net = _built(tiny, [*args, "use_tucker=True", "bypass_mode=True"] if "algo=locon" in args else args)
    for name, m in net.nets.items():
        w0 = net.plans[name].target.param.detach()
        assert torch.equal(m.merged(w0, 1.0), w0.to(torch.float32)), name


def test_bypass_mode_computes_the_same_outputs_and_gradients(tiny):
    """LoRA layers are rebuilt (W + ΔW in one op, shared ΔW for small ones) or bypassed by cost; bypass_mode=True
    always adds the low-rank path to the layer's output: same outputs and gradients up to rounding."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 77, 64, generator=g)
    results = []
    for bypass in (False, True):
        net = _built(tiny, [f"bypass_mode={bypass}", "conv_dim=4"], network_module="networks.lora", network_dim=8)
        with torch.no_grad():
            for m in net.nets.values():
                m.lora_up.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(m.lora_name)))
        net.train()
        net.attach()
        try:
            with net.share_deltas():
                out = tiny.unet(x, torch.tensor([500, 20]), encoder_hidden_states=context).sample
                out.pow(2).mean().backward()
        finally:
            net.detach()
        grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        results.append((out.detach(), grads, net))
    (out_a, grads_a, rebuilt), (out_b, grads_b, bypassed) = results
    assert all(m.bypass_only for m in bypassed.nets.values())
    assert bypassed._delta_groups == [] and rebuilt._delta_groups  # shared ΔW only without bypass_mode
    torch.testing.assert_close(out_b, out_a, rtol=1e-4, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    # float32 rounding in the forward leaves gradient noise relative to the largest gradient, not to each tensor's
    scale = max(float(g.abs().max()) for g in grads_a.values())
    for key in grads_a:
        torch.testing.assert_close(grads_b[key], grads_a[key], rtol=1e-3, atol=1e-5 * scale,
                                   msg=lambda m, key=key: f"{key}: {m}")


def test_bypass_mode_is_refused_where_the_model_reads_a_fused_weight():
    mha = nn.MultiheadAttention(8, 2)
    fused = Target("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", Component.TE1, "q", mha, "te_attn",
                   rows=(0, 8), hook="param")
    plain = Target("lora_unet_x", Component.UNET, "x", nn.Linear(8, 8), "attn")
    _check_bypass_possible([SimpleNamespace(target=plain)])
    with pytest.raises(ConfigError, match="fused attention projections") as info:
        _check_bypass_possible([SimpleNamespace(target=plain), SimpleNamespace(target=fused)])
    assert info.value.field == "network_args.bypass_mode"


def test_scale_weight_norms_bounds_loha_lokr_and_oft(tiny):
    for args in (["algo=loha"], ["algo=lokr", "factor=4"], ["algo=diag-oft"]):
        net = _built(tiny, args, scale_weight_norms=0.5)
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0, 1.0, generator=torch.Generator().manual_seed(p.numel()))
        before = [float(m.max_norm_value()) for m in net.nets.values()]
        report = net.apply_max_norm(0.5)
        after = [float(m.max_norm_value()) for m in net.nets.values()]
        assert report.keys_scaled == sum(b > 0.5 for b in before) > 0, args
        assert max(after) == pytest.approx(0.5, rel=1e-4), args


def _train(tmp_path: Path, **options) -> Path:
    write_images(tmp_path / "train" / "5_sks", 2)
    cfg = load_config(write_run(tmp_path, train_batch_size=1, **options))
    result = train(cfg, model=tiny_model())
    assert result.status == "finished", result.report
    return result.final_file


@pytest.mark.parametrize("args", [["algo=locon", "conv_dim=4", "use_tucker=True", "bypass_mode=True"],
                                  ["algo=ia3", "train_on_input=True"],
                                  ["algo=lokr", "decompose_both=True", "factor=8", "dora_wd=True"]])
def test_options_train_and_load(tmp_path, args):
    path = _train(tmp_path, max_train_steps=2, network_module="lycoris.kohya", network_args=args,
                  learning_rate=1e-2)
    net = load_network(path)
    assert net.unmatched_keys == []
    moved = [m for m in net.modules.values() if m.delta(torch.zeros(m.delta_shape() or (1,))).abs().sum() > 0] \
        if "algo=ia3" not in args else [m for m in net.modules.values() if m.weight.abs().sum() > 0]
    assert moved, "two steps must move the network away from its start"


def test_diag_oft_trains_and_every_reader_agrees(tmp_path):
    """The k17 preset (kohya_ss GUI, LyCORIS diag-oft), rescaled and constrained: the file has LyCORIS' key spelling,
    `info` reads it, its weight change is A1111's on every module, and patching the model restores it exactly."""
    path = _train(tmp_path, max_train_steps=3, network_module="lycoris.kohya", network_dim=32, network_alpha=16,
                  learning_rate=5e-3, save_precision="fp16",
                  network_args=["preset=full", "conv_dim=8", "conv_alpha=4", "algo=diag-oft", "rescaled=True",
                                "constraint=0.0005"])
    tensors = load_file(path).tensors
    suffixes = {k.partition(".")[2] for k in tensors}
    assert suffixes == {"oft_blocks", "rescale", "alpha"}
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
    assert all(t.dtype == torch.float16 for t in tensors.values())
    meta = read_metadata(path)
    assert meta["ss_network_dim"] == "32" and meta["ss_network_alpha"] == "16.0"
    assert json.loads(meta["ss_network_args"])["algo"] == "diag-oft"

    info = describe(path)
    assert info.algorithm == "diag-oft" and info.alpha is None and info.unmatched_keys == []
    assert info.constraint == pytest.approx(0.0005, rel=1e-3)  # stored in fp16
    assert info.rank == {"min": 2, "max": 32} and info.block_size == {"min": 1, "max": 16}

    model = tiny_model()
    targets = targets_of(model, Arch.SD1)
    net = load_network(path)
    moved = 0
    for name, module in net.modules.items():
        w0 = targets[name].param.detach()
        ours = module.merged(w0, 0.7) - w0
        file = {k.partition(".")[2]: v for k, v in tensors.items() if k.partition(".")[0] == name}
        theirs = a1111_updown(w0, file, 0.7)
        torch.testing.assert_close(ours.to(torch.float64), theirs, rtol=1e-4, atol=1e-6 * float(w0.abs().max()),
                                   msg=name)
        moved += bool(theirs.abs().max() > 0)
    assert moved > len(net.modules) // 2

    before = checksum(model.unet, *model.text_encoders)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(1))
    outputs = {}
    for mode in ("merge", "hooked"):
        with WeightPatcher(targets, mode).applied([Application(net, te=0.7, unet=0.7)]), torch.no_grad():
            outputs[mode] = model.unet(x, torch.tensor([300]), encoder_hidden_states=context).sample
        assert checksum(model.unet, *model.text_encoders) == before
    torch.testing.assert_close(outputs["hooked"], outputs["merge"], rtol=1e-4, atol=1e-5)


def test_notes_say_which_options_do_nothing(tmp_path):
    write_images(tmp_path / "train" / "5_sks", 1)
    ia3 = load_config(write_run(tmp_path, network_module="lycoris.kohya", network_args=["algo=ia3"],
                                scale_weight_norms=1.0))
    assert any(n.startswith("scale_weight_norms: no effect for ia3") for n in ia3.notes)
    # sd-scripts hands network_dropout to LyCORIS, whose IA3 applies none (the kohya_ss GUI's IA3 preset sets it)
    ia3 = load_config(write_run(tmp_path, network_module="lycoris.kohya", network_args=["algo=ia3"],
                                network_dropout=0.3))
    assert any(n.startswith("network_dropout: no effect for ia3") for n in ia3.notes)
    with pytest.raises(ConfigError) as info:
        load_config(write_run(tmp_path, network_module="lycoris.kohya", network_args=["algo=lokr"],
                              network_dropout=0.3))
    assert info.value.field == "network_dropout"
    oft = load_config(write_run(tmp_path, network_module="lycoris.kohya", network_args=["algo=diag-oft"],
                                network_alpha=16))
    assert any("network_alpha = 16: no effect for diag-oft" in n for n in oft.notes)


def test_conv_block_dims_alone_train_the_convolutions_as_sd_scripts_does(tiny):
    """sd-scripts' block-wise example: block_dims, block_alphas and conv_block_dims, no conv_dim; the 3x3 convs get
    conv_block_dims ranks and alpha 1.0 (conv_block_alphas unset), the rest block_dims / block_alphas."""
    dims = ",".join(str(2 + (i % 3) * 2) for i in range(25))
    net = _built(tiny, [f"block_dims={dims}", f"block_alphas={dims}", f"conv_block_dims={dims}"],
                 network_module="networks.lora", network_dim=16, network_alpha=8)
    convs = _kxk(net)
    assert convs and {float(m.alpha) for m in convs} == {1.0}
    assert {m.rank for m in convs} == {2, 4, 6}
    unet_linear = [m for n, m in net.nets.items() if n.startswith("lora_unet_") and m not in convs]
    assert all(float(m.alpha) == m.rank for m in unet_linear)
