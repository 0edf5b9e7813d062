"""Every algorithm x layer kind: bypass == merged, merge then restore is bit-exact, state-dict round trips."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lib_lora.io import load_file, save_file
from lib_lora.keys import ModelTargets, Target
from lib_lora.networks import ALGORITHMS, LayerOp, load_network
from lib_lora.patching import Application, WeightPatcher
from lib_lora.types import Arch, Component
from tests.helpers import checksum, lora_tensors

LAYERS = {
    "linear": lambda: nn.Linear(16, 24),
    "conv1x1": lambda: nn.Conv2d(16, 24, 1),
    "conv3x3": lambda: nn.Conv2d(16, 24, 3, stride=2, padding=1),
}
ALGOS = ["lora", "dora", "lora_tucker", "loha", "loha_tucker", "lokr", "lokr_full", "lokr_tucker", "ia3", "full",
         "oft", "oft_rescaled", "oft_constrained", "oft_diag"]
CASES = [(a, k) for a in ALGOS for k in LAYERS if not (a.endswith("_tucker") and k != "conv3x3")]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def _input(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 16, generator=g) if kind == "linear" else torch.randn(2, 16, 9, 9, generator=g)


def _module(algo: str, layer: nn.Module, seed: int = 0):
    target = Target("lora_unet_toy", Component.UNET, "toy", layer, "attn")
    tensors = lora_tensors(target, algo, 4, torch.Generator().manual_seed(seed))
    net = load_network({f"lora_unet_toy.{k}": v for k, v in tensors.items()}, arch=Arch.SD1)
    return target, tensors, net


def test_registry_has_every_algorithm():
    assert {"lora", "loha", "lokr", "ia3", "full", "diag-oft"} <= set(ALGORITHMS)


@pytest.mark.parametrize("algo,kind", CASES)
@pytest.mark.parametrize("multiplier", [1.0, 0.6])
def test_bypass_equals_merged(algo, kind, multiplier):
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    _, _, net = _module(algo, layer)
    module = net.modules["lora_unet_toy"]
    module.check_shape(layer.weight.shape)
    x = _input(kind)
    op = LayerOp.of(layer)
    with torch.no_grad():
        bypass = module.bypass(x, layer(x), op, layer.weight, multiplier, layer.bias)
        merged_w = module.merged(layer.weight, multiplier)
        merged_b = module.merged_bias(layer.bias, multiplier)
        merged = op(x, merged_w, merged_b)
    assert not torch.equal(merged, layer(x)), "the module must change the output"
    torch.testing.assert_close(bypass, merged, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("algo,kind", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merge_then_restore_is_bit_exact(algo, kind, dtype):
    torch.manual_seed(0)
    layer = LAYERS[kind]().to(dtype)
    target, _, net = _module(algo, layer)
    before = checksum(layer)
    patcher = WeightPatcher(ModelTargets(Arch.SD1, {target.name: target}), mode="merge")
    report = patcher.apply([Application(net, unet=0.8)])
    assert report.applied == {net.name: 1}
    assert checksum(layer) != before
    patcher.restore()
    assert checksum(layer) == before


@pytest.mark.parametrize("algo,kind", CASES)
def test_hooked_equals_merged_and_changes_no_weight(algo, kind):
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    target, _, net = _module(algo, layer)
    targets = ModelTargets(Arch.SD1, {target.name: target})
    x = _input(kind)
    before = checksum(layer)
    hooked = WeightPatcher(targets, mode="hooked")
    with hooked.applied([Application(net, unet=0.7)]), torch.no_grad():
        y_hooked = layer(x)
        assert checksum(layer) == before
    merged = WeightPatcher(targets, mode="merge")
    with merged.applied([Application(net, unet=0.7)]), torch.no_grad():
        y_merged = layer(x)
    torch.testing.assert_close(y_hooked, y_merged, atol=1e-5, rtol=1e-4)
    assert checksum(layer) == before
    assert "forward" not in layer.__dict__


@pytest.mark.parametrize("algo,kind", CASES)
def test_state_dict_round_trip_is_identity(algo, kind, tmp_path):
    layer = LAYERS[kind]()
    _, tensors, net = _module(algo, layer)
    out = net.modules["lora_unet_toy"].file_tensors()
    assert set(out) == set(tensors)
    for k in tensors:
        assert torch.equal(out[k], tensors[k]), k
    path = tmp_path / "net.safetensors"
    save_file({f"lora_unet_toy.{k}": v for k, v in out.items()}, path)
    again = load_network(path, arch=Arch.SD1).modules["lora_unet_toy"].file_tensors()
    for k in tensors:
        assert torch.equal(again[k], tensors[k]), k
    assert load_file(path).tensors.keys() == {f"lora_unet_toy.{k}" for k in tensors}


def test_alpha_missing_means_scale_one_and_alpha_scales():
    layer = nn.Linear(8, 8)
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)
    no_alpha = load_network({"lora_unet_x.lora_down.weight": down, "lora_unet_x.lora_up.weight": up}, arch=Arch.SD1)
    half = load_network({"lora_unet_x.lora_down.weight": down, "lora_unet_x.lora_up.weight": up,
                         "lora_unet_x.alpha": torch.tensor(1.0)}, arch=Arch.SD1)
    d1 = no_alpha.modules["lora_unet_x"].delta(layer.weight)
    d2 = half.modules["lora_unet_x"].delta(layer.weight)
    torch.testing.assert_close(d1, up @ down)
    torch.testing.assert_close(d2, up @ down * 0.5)


@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_conv_as_matrix_product_equals_the_convolution(bias):
    from lib_lora.networks.lora import pointwise_conv

    layer = nn.Conv2d(16, 24, 1, bias=bias)
    assert LayerOp.of(layer).pointwise and not LayerOp.of(nn.Linear(16, 24)).pointwise
    assert not LayerOp.of(nn.Conv2d(16, 24, 1, stride=2)).pointwise
    assert not LayerOp.of(nn.Conv2d(16, 24, 3, padding=1)).pointwise
    x = torch.randn(2, 16, 5, 7, requires_grad=True)
    w = layer.weight.detach().reshape(24, 16).clone().requires_grad_(True)
    got = pointwise_conv(x, w, layer.bias)
    expected = nn.functional.conv2d(x, w.reshape(24, 16, 1, 1), layer.bias)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, (x, w), g)
    torch.testing.assert_close(grads, torch.autograd.grad(expected, (x, w), g), atol=1e-5, rtol=1e-5)


def test_delta_groups_take_small_plain_lora_modules_of_one_shape():
    from lib_lora.networks.lora import LoRAModule, delta_groups, shared_deltas

    g = torch.Generator().manual_seed(0)

    def make(name, shape, rank, alpha=None):
        m = LoRAModule.create(name, torch.Size(shape), rank, alpha, generator=g)
        torch.nn.init.normal_(m.lora_up.weight, generator=g)
        return m

    a, b, c = make("a", (32, 32), 16), make("b", (32, 32), 16, alpha=4), make("c", (32, 32), 16)
    wide = [make(f"w{i}", (512, 512), 16) for i in range(2)]  # rebuilding costs more than the bypass there
    lone = make("lone", (32, 48), 16)  # a group of one gains nothing
    c.dropout = 0.1  # dropout is drawn per call: not shareable
    groups = delta_groups([a, b, c, lone, *wide], 1 << 16)
    assert [[m.lora_name for m in group.members] for group in groups] == [["a", "b"]]
    assert delta_groups([a, b], 32 * 32 - 1) == []  # over the size limit
    with shared_deltas(groups):
        for m in (a, b):  # scales differ (alpha 16 vs 4): each module's ΔW carries its own
            torch.testing.assert_close(m.shared_delta, m.delta(torch.zeros(32, 32)), rtol=1e-5, atol=1e-6)
    assert a.shared_delta is None and b.shared_delta is None
