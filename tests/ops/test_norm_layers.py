"""Normalization-layer changes (train_norm: `w_norm`/`b_norm`) in the LoRA tools: vectors, not low-rank products.
Resize keeps them, LoRA merges add them up at their strengths (both modes), convert keeps them in kohya spelling and
leaves them out (saying so) where the format has no form for them; merge into a checkpoint is in
test_merge_model.py (bit for bit with WeightPatcher)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lib_lora.errors import ConfigError, ShapeMismatchError
from lib_lora.io import save_file
from lib_lora.keys import NORM_ROLES
from lib_lora.ops.convert import ConvertRequest, convert
from lib_lora.ops.inputs import LoraInput
from lib_lora.ops.linalg import RankRule
from lib_lora.ops.merge_loras import MergeLorasRequest, merge_loras
from lib_lora.ops.output import OPERATION_KEY
from lib_lora.ops.resize import ResizeRequest, resize
from lib_lora.sd.checkpoint import load_checkpoint
from lib_lora.types import Arch
from tests.helpers import make_network_file
from tests.ops.test_merge_model import _model_targets


@pytest.fixture(scope="module")
def sd1_targets(tiny_checkpoints):
    model = load_checkpoint(tiny_checkpoints["sd1"], compute_hash=False)
    targets = list(_model_targets(model, Arch.SD1).targets.values())
    return ([t for t in targets if t.role in ("attn", "te_attn")],
            [t for t in targets if t.role in NORM_ROLES and t.role != "te_norm"][:6] +
            [t for t in targets if t.role == "te_norm"][:2])


def _norms(targets, seed: int, bias: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    parts = ("w_norm", "b_norm") if bias else ("w_norm",)
    return {f"{t.name}.{p}": torch.randn(t.shape[0], generator=g) * 0.1 for t in targets for p in parts}


def _norm_keys(sd) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if k.endswith((".w_norm", ".b_norm"))}


def test_resize_keeps_norm_changes_as_they_are(sd1_targets, tmp_path):
    linear, norms = sd1_targets
    src = tmp_path / "in.safetensors"
    save_file({**make_network_file(linear, "lora", 8, 1), **_norms(norms, 2)}, src)
    result = resize(ResizeRequest(str(src), str(tmp_path / "out.safetensors"), RankRule(4)))
    out, before = load_file(result.output), load_file(src)
    assert _norm_keys(out).keys() == _norm_keys(before).keys() and len(_norm_keys(out)) == 2 * len(norms)
    assert all(torch.equal(out[k], before[k]) for k in _norm_keys(before))
    assert not any(k.startswith(tuple(t.name + ".lora" for t in norms)) for k in out)  # not turned into LoRA
    assert set(result.modules) == {t.name for t in linear}
    assert result.notes == [f"{len(norms)} normalization-layer changes (train_norm: w_norm/b_norm) kept as they are"]

    only = tmp_path / "only-norms.safetensors"
    save_file(_norms(norms, 3), only)
    with pytest.raises(ConfigError, match="only normalization-layer changes"):
        resize(ResizeRequest(str(only), str(tmp_path / "x.safetensors"), RankRule(4)))
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("mode", ["exact", "svd"])
def test_lora_merges_add_norm_changes_at_their_strengths(mode, sd1_targets, tmp_path):
    """a has norms on every chosen layer (with b_norm), b on half of them (one without b_norm); the merged file
    holds 0.7·a + (-0.5)·b per layer, a b_norm missing counting as zero."""
    linear, norms = sd1_targets
    a_norms, b_norms = _norms(norms, 4), _norms(norms[: len(norms) // 2], 5)
    b_norms.pop(f"{norms[0].name}.b_norm")
    save_file({**make_network_file(linear, "lora", 4, 1), **a_norms}, tmp_path / "a.safetensors")
    save_file({**make_network_file(linear, "lora", 2, 2), **b_norms}, tmp_path / "b.safetensors")
    inputs = (LoraInput(str(tmp_path / "a.safetensors"), 0.7), LoraInput(str(tmp_path / "b.safetensors"), -0.5))
    result = merge_loras(MergeLorasRequest(inputs, str(tmp_path / "ab.safetensors"), mode,
                                           RankRule(4) if mode == "svd" else None))
    out = load_file(result.output)
    for key, value in a_norms.items():
        expected = 0.7 * value - 0.5 * b_norms.get(key, torch.zeros_like(value))
        torch.testing.assert_close(out[key], expected, rtol=1e-6, atol=1e-7)
    assert len(_norm_keys(out)) == len(a_norms)
    assert set(result.modules) == {t.name for t in linear}
    assert result.notes == [f"{len(norms)} normalization-layer changes (train_norm: w_norm/b_norm) added up at "
                            "their strengths"]


def test_a_norm_change_and_a_matrix_change_of_one_name_are_refused(sd1_targets, tmp_path):
    linear, norms = sd1_targets
    save_file(_norms(norms[:1], 6), tmp_path / "a.safetensors")
    t = norms[0]
    save_file({f"{t.name}.lora_up.weight": torch.zeros(t.shape[0], 2), f"{t.name}.lora_down.weight": torch.zeros(2, 1),
               f"{t.name}.alpha": torch.tensor(2.0)}, tmp_path / "b.safetensors")
    inputs = (LoraInput(str(tmp_path / "a.safetensors")), LoraInput(str(tmp_path / "b.safetensors")))
    with pytest.raises(ShapeMismatchError, match="normalization layer"):
        merge_loras(MergeLorasRequest(inputs, str(tmp_path / "ab.safetensors")))
    assert not (tmp_path / "ab.safetensors").exists()


@pytest.mark.parametrize("to", ["kohya", "lora", "diffusers"])
def test_convert_keeps_norm_changes_in_kohya_and_says_where_it_leaves_them_out(to, sd1_targets, tmp_path):
    linear, norms = sd1_targets
    src = tmp_path / "in.safetensors"
    save_file({**make_network_file(linear, "lora", 4, 1), **_norms(norms, 7)}, src)
    result = convert(ConvertRequest(str(src), str(tmp_path / "out.safetensors"), to))
    out = load_file(result.output)
    if to == "kohya":
        before = load_file(src)
        assert all(torch.equal(out[k], before[k]) for k in _norm_keys(before)) and not result.notes
        return
    assert not _norm_keys(out) and not any("norm" in k and t.name in k for k in out for t in norms)
    assert result.notes == [f"{len(norms)} normalization-layer changes (train_norm: w_norm/b_norm) left out: the "
                            f"{to} format has no form for them, so the file no longer changes those layers"]
    with safe_open(result.output, "pt") as f:
        params = json.loads(f.metadata()[OPERATION_KEY])["params"]
    assert params["norm_layers_left_out"] == len(norms)

    only = tmp_path / "only-norms.safetensors"
    save_file(_norms(norms, 8), only)
    with pytest.raises(ConfigError, match="only normalization-layer changes"):
        convert(ConvertRequest(str(only), str(tmp_path / "x.safetensors"), to))
    assert not (tmp_path / "x.safetensors").exists()
