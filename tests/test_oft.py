"""Diag-OFT: LyCORIS' block layout and identity start, the rotation's invariants, and the weight A1111's built-in
Lora computes from the same file (its formula re-implemented here from `extensions-builtin/Lora/network_oft.py`)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lib_lora.errors import ShapeMismatchError
from lib_lora.keys import ModelTargets, Target
from lib_lora.networks import LayerOp, load_network
from lib_lora.networks.oft import OFTModule
from lib_lora.patching import Application, WeightPatcher
from lib_lora.types import Arch, Component


def a1111_updown(weight: torch.Tensor, w: dict[str, torch.Tensor], multiplier: float) -> torch.Tensor:
    """The change A1111 1.10 adds to `weight` for one OFT module with file tensors `w` (suffix -> tensor), written
    from the definition in its network_oft.py / network.py, block by block with plain matrix products:

    - `oft_blocks` [n, s, s]: n = dim blocks of s = out // n rows; constraint = alpha · out when the file has an
      alpha; Q = B - Bᵀ, rescaled to (min(‖Q‖, c) + 1e-8) / (‖Q‖ + 1e-8) when c != 0; R = (I + Q)(I - Q)⁻¹;
    - `oft_diag` [n, s, s] (old LyCORIS): R itself, s = shape[1], n = out // s;
    - rows k·s..(k+1)·s of the merged weight are R_kᵀ times those rows of W; times `rescale` per row if present;
    - updown = merged - W, times `self.scale` (set to 1.0 for OFT) and the multiplier (finalize_updown)."""
    out = weight.shape[0]
    flat = weight.reshape(out, -1).to(torch.float64)
    if "oft_blocks" in w:
        blocks = w["oft_blocks"].to(torch.float64)
        n = blocks.shape[0]
        s = out // n
        c = float(w["alpha"]) * out if "alpha" in w else 0.0
        q = blocks - blocks.transpose(1, 2)
        if c != 0:
            norm = torch.sqrt((q ** 2).sum())
            q = q * ((torch.clamp(norm, max=c) + 1e-8) / (norm + 1e-8))
        eye = torch.eye(s, dtype=torch.float64)
        rotations = [(eye + q[k]) @ torch.inverse(eye - q[k]) for k in range(n)]
    else:
        r = w["oft_diag"].to(torch.float64)
        s = r.shape[1]
        n = out // s
        rotations = [r[k] for k in range(n)]
    merged = torch.cat([rotations[k].T @ flat[k * s:(k + 1) * s] for k in range(n)])
    if "rescale" in w:
        merged = w["rescale"].to(torch.float64).reshape(-1, 1) * merged
    return ((merged - flat) * multiplier).reshape(weight.shape)


def _random_oft(out: int, dim: int, *, constraint: float = 0.0, rescaled: bool = False, seed: int = 0,
                scale: float = 0.3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    module = OFTModule.create("lora_unet_x", torch.Size((out, 8)), dim, constraint=constraint, rescaled=rescaled)
    t = {k: v.detach().clone() for k, v in module.file_tensors().items()}
    t["oft_blocks"] = torch.randn(t["oft_blocks"].shape, generator=g) * scale
    if rescaled:
        t["rescale"] = 1 + 0.1 * torch.randn(t["rescale"].shape, generator=g)
    return t


@pytest.mark.parametrize("out,dim,expected", [
    (320, 32, (10, 32)),  # d divides and d² > out: d blocks
    (1280, 32, (32, 40)),  # d² <= out: blocks of d
    (640, 8, (8, 80)),
    (32, 32, (1, 32)),  # d = out: blocks of one row (LyCORIS' rule: such a module cannot learn)
    (320, 12, (10, 32)),  # d does not divide: the most balanced split with block size <= d
    (127, 8, (1, 127)),  # a prime size has no other split
])
def test_block_layout_follows_lycoris_factorization(out, dim, expected):
    module = OFTModule.create("m", torch.Size((out, 4)), dim)
    assert (module.block_size, module.rank) == expected
    assert module.block_size * module.rank == out


@pytest.mark.parametrize("rescaled", [False, True])
def test_training_starts_at_the_identity_and_can_move(rescaled):
    layer = nn.Linear(6, 32)
    module = OFTModule.create("m", layer.weight.shape, 4, constraint=1e-3, rescaled=rescaled)
    assert float(module.alpha) == pytest.approx(1e-3) and module.scale == 1.0
    x = torch.randn(5, 6)
    base = layer(x)
    out = module.bypass(x, base, LayerOp.of(layer), layer.weight, 1.0, layer.bias)
    assert torch.equal(out, base)
    assert torch.equal(module.merged(layer.weight, 1.0), layer.weight)
    out.pow(2).sum().backward()
    grad = module.oft_blocks.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_rotation_keeps_each_block_s_column_norms():
    # OFT preserves the hyperspherical energy: R is orthogonal, so every column of each s-row block keeps its norm
    w = torch.randn(24, 10)
    net = load_network({f"lora_unet_x.{k}": v for k, v in _random_oft(24, 4).items()}, arch=Arch.SD1)
    merged = net.modules["lora_unet_x"].merged(w, 1.0)
    assert not torch.allclose(merged, w)
    torch.testing.assert_close(merged.reshape(6, 4, 10).norm(dim=1), w.reshape(6, 4, 10).norm(dim=1),
                               rtol=1e-5, atol=1e-6)


def test_constraint_bounds_the_skew_part():
    t = _random_oft(24, 4, constraint=0.01, scale=1.0)
    module = load_network({f"lora_unet_x.{k}": v for k, v in t.items()}, arch=Arch.SD1).modules["lora_unet_x"]
    assert module.constraint == pytest.approx(0.01)
    q = t["oft_blocks"] - t["oft_blocks"].transpose(1, 2)
    assert q.norm() > 0.01 * 24
    # R - I = 2Q(I - Q)^-1: recover Q = (R - I)(R + I)^-1 and check its norm is the bound
    rmi = module.rotation_minus_identity()
    eye = torch.eye(4)
    q_used = rmi @ torch.linalg.inv(rmi + 2 * eye)
    torch.testing.assert_close(q_used.norm(), torch.tensor(0.01 * 24), rtol=1e-4, atol=0)


LAYERS = {"linear": lambda: nn.Linear(16, 48), "conv3x3": lambda: nn.Conv2d(16, 48, 3, padding=1)}


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("variant", ["plain", "constrained", "rescaled", "diag"])
@pytest.mark.parametrize("multiplier", [1.0, 0.6])
def test_merged_weight_equals_a1111s_formula(kind, variant, multiplier):
    layer = LAYERS[kind]()
    if variant == "diag":
        q = torch.randn(6, 8, 8) * 0.2
        q = q - q.transpose(1, 2)
        eye = torch.eye(8)
        tensors = {"oft_diag": (eye + q) @ torch.linalg.inv(eye - q)}
    else:
        tensors = _random_oft(48, 8, constraint=0.002 if variant == "constrained" else 0.0,
                              rescaled=variant == "rescaled", seed=3)
    net = load_network({f"lora_unet_x.{k}": v for k, v in tensors.items()}, arch=Arch.SD1)
    module = net.modules["lora_unet_x"]
    module.check_shape(layer.weight.shape)
    ours = module.merged(layer.weight, multiplier) - layer.weight
    theirs = a1111_updown(layer.weight.detach(), tensors, multiplier)
    assert theirs.abs().max() > 0.02 * layer.weight.abs().max()  # a change well above rounding
    torch.testing.assert_close(ours.to(torch.float64), theirs, rtol=1e-5, atol=1e-6)


def test_hooked_output_rotation_equals_the_merged_weight_with_a_bias():
    layer = nn.Conv2d(8, 24, 3, padding=1)
    with torch.no_grad():
        layer.bias.mul_(50)  # a large bias must not be rotated
    target = Target("lora_unet_x", Component.UNET, "x", layer, "resnet")
    net = load_network({f"lora_unet_x.{k}": v for k, v in _random_oft(24, 4, rescaled=True).items()}, arch=Arch.SD1)
    targets = ModelTargets(Arch.SD1, {target.name: target})
    x = torch.randn(2, 8, 5, 5)
    with WeightPatcher(targets, "hooked").applied([Application(net, unet=0.8)]), torch.no_grad():
        hooked = layer(x)
    with WeightPatcher(targets, "merge").applied([Application(net, unet=0.8)]), torch.no_grad():
        merged = layer(x)
    torch.testing.assert_close(hooked, merged, rtol=1e-4, atol=2e-4)


def test_butterfly_oft_and_bad_shapes_are_refused_by_name():
    with pytest.raises(ShapeMismatchError, match="BOFT"):
        load_network({"lora_unet_x.oft_blocks": torch.zeros(2, 3, 4, 4)}, arch=Arch.SD1)
    net = load_network({"lora_unet_x.oft_blocks": torch.zeros(4, 4, 4)}, arch=Arch.SD1)
    with pytest.raises(ShapeMismatchError, match="output rows"):
        net.modules["lora_unet_x"].check_shape(torch.Size((24, 8)))


def test_sd_scripts_oft_file_names_load_as_the_same_modules():
    blocks = torch.randn(4, 6, 6) * 0.1
    net = load_network({"oft_unet_down_blocks_0_attentions_0_proj_in.oft_blocks": blocks,
                        "oft_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(1.0)})
    module = net.modules["lora_unet_down_blocks_0_attentions_0_proj_in"]
    assert isinstance(module, OFTModule) and module.constraint == 1.0 and net.unmatched_keys == []
    assert net.arch is Arch.SD1 and net.spelling == "kohya-oft"
