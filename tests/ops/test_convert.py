"""Convert: key spellings (diffusers reads ours), LoHa/LoKr/DoRA to plain LoRA by their real change, metadata."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from lib_lora.errors import ConfigError
from lib_lora.io import addnet_hash, read_header, read_metadata, save_file
from lib_lora.networks import load_network
from lib_lora.ops import ConvertRequest, RankRule, convert
from lib_lora.patching import Application, WeightPatcher
from lib_lora.sd.checkpoint import load_checkpoint
from lib_lora.types import Arch
from tests.helpers import make_network_file, targets_of
from tests.ops.util import SMALL_A, delta, rel, rel_terms, terms


def test_diffusers_loads_our_diffusers_spelling(tmp_path):
    """diffusers' load_lora_weights + fuse_lora of the converted file == WeightPatcher with the kohya original."""
    from lib_lora.sd.tiny import tiny_components
    from tests.test_interop_diffusers import _pipeline, _weight

    out = tmp_path / "diffusers.safetensors"
    convert(ConvertRequest(str(SMALL_A), str(out), to="diffusers", dtype="fp32"))
    assert all(k.startswith(("unet.", "text_encoder.")) and ".lora_" in k for k in read_header(out).tensors)
    theirs_model = tiny_components("sd1", seed=5)
    pipe = _pipeline(Arch.SD1, theirs_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(str(out))
        pipe.fuse_lora(lora_scale=0.7)
    ours_model = tiny_components("sd1", seed=5)
    targets = targets_of(ours_model, Arch.SD1)
    WeightPatcher(targets).apply([Application(load_network(SMALL_A), 0.7, 0.7)])
    roots = {"unet": theirs_model.unet, "te": theirs_model.text_encoders[0]}
    for name in load_network(SMALL_A).modules:
        t = targets[name]
        fused = _weight(roots["unet" if name.startswith("lora_unet_") else "te"], t.path)
        assert torch.allclose(fused, t.param, atol=1e-6, rtol=0), name


def test_kohya_diffusers_kohya_round_trip(tmp_path):
    there, back = tmp_path / "d.safetensors", tmp_path / "k.safetensors"
    convert(ConvertRequest(str(SMALL_A), str(there), to="diffusers", dtype="fp32"))
    convert(ConvertRequest(str(there), str(back), to="kohya"))
    original, returned = load_network(SMALL_A), load_network(back)
    assert load_network(there).spelling == "peft" and returned.spelling == "kohya"
    assert set(returned.modules) == set(original.modules)
    for name in original.modules:
        if delta(original, name).norm() > 0:
            assert rel(delta(returned, name), delta(original, name)) < 1e-6, name
        assert returned.modules[name].lora_down.weight.shape == original.modules[name].lora_down.weight.shape


@pytest.mark.parametrize("file, rank", [("sd15_loha", 4), ("sd15_lokr", 64)])
def test_loha_and_lokr_to_plain_lora_keep_their_real_change(file, rank, real_lora_dir, tmp_path):
    out = tmp_path / "lora.safetensors"
    result = convert(ConvertRequest(str(real_lora_dir / f"{file}.safetensors"), str(out), to="lora",
                                    rule=RankRule(rank), dtype="fp32"))
    ours, theirs = load_network(out), load_network(real_lora_dir / f"{file}.safetensors")
    assert {m.algo for m in ours.modules.values()} == {"lora"} and len(result.modules) == len(theirs.modules)
    worst = max(rel_terms(terms(ours, n), terms(theirs, n)) for n in theirs.modules)
    assert worst < 1e-4  # LoHa rank 2 is a product of rank 4; these LoKr changes have rank <= 64


def test_dora_to_lora_needs_the_model_and_then_matches(tiny_sd1, tiny_sd1_checkpoint, tmp_path):
    model = load_checkpoint(tiny_sd1_checkpoint, compute_hash=False)
    targets = targets_of(model, Arch.SD1)
    chosen = targets.select(["attn"])[:6]
    src = tmp_path / "dora.safetensors"
    save_file(make_network_file(chosen, "dora", 4, 3), src)
    with pytest.raises(ConfigError, match="DoRA.*base checkpoint"):
        convert(ConvertRequest(str(src), str(tmp_path / "x.safetensors"), to="lora", rule=RankRule(64)))
    assert not (tmp_path / "x.safetensors").exists()
    out = tmp_path / "lora.safetensors"
    convert(ConvertRequest(str(src), str(out), to="lora", rule=RankRule(64), model=str(tiny_sd1_checkpoint),
                           dtype="fp32"))
    patcher = WeightPatcher(targets)
    with patcher.applied([Application(load_network(src), 0.8, 0.8)]):
        dora = {t.name: t.param.detach().clone() for t in chosen}
    with patcher.applied([Application(load_network(out), 0.8, 0.8)]):
        for t in chosen:
            assert torch.allclose(t.param, dora[t.name], atol=1e-6, rtol=0), t.name


def test_precision_and_metadata_edits(tmp_path):
    out = tmp_path / "out.safetensors"
    convert(ConvertRequest(str(SMALL_A), str(out), to="kohya", dtype="bf16", strip_metadata=True,
                           set_metadata=(("modelspec.title", "mine"),), drop_metadata=("ss_v2",)))
    meta = read_metadata(out)
    assert meta["modelspec.title"] == "mine" and "ss_v2" not in meta and "lora_studio.operation" not in meta
    assert meta["sshs_model_hash"] == addnet_hash(out) and meta["ss_base_model_version"] == "sd_v1"
    net = load_network(out)
    assert {p.dtype for m in net.modules.values() for p in m.parameters()} == {torch.bfloat16}
    kept = tmp_path / "kept.safetensors"
    convert(ConvertRequest(str(SMALL_A), str(kept), to="lora", dtype="fp16"))
    record = json.loads(read_metadata(kept)["lora_studio.operation"])
    assert record["operation"] == "convert to lora" and record["sources"][0]["name"] == "small_a.safetensors"
