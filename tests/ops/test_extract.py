"""Extracting a LoRA from two checkpoints: sd-scripts' extract_lora_from_models.py module for module, and
extract(W + ΔW, W) recovering ΔW."""
from __future__ import annotations

import json

import pytest
import torch

from lib_lora.io import read_metadata
from lib_lora.networks import load_network
from lib_lora.ops import ExtractRequest, LoraInput, MergeModelRequest, extract, merge_into_model
from lib_lora.ops.checkpoint_keys import checkpoint_targets, sd_scripts_selection
from lib_lora.ops.stream import Entry, StreamWriter
from lib_lora.types import Arch
from tests.ops.synthetic import base_weight, sd15_shapes, tuned_weight
from tests.ops.util import SD_SCRIPTS, delta, rel

PINNED = ["lora_unet_down_blocks_0_attentions_0_proj_in",
          "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
          "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
          "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2"]
TE_KEY = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def sd15():
    shapes = sd15_shapes()
    return shapes, checkpoint_targets(shapes, Arch.SD1)


def test_modules_are_sd_scripts_networks_lora_ones(sd15, real_lora_dir):
    """Without a conv dim: the 264 modules of a networks.lora file; with one: the 350 of a LoCon file; and the
    192 U-Net modules sd-scripts' extract wrote (its text encoder was unchanged)."""
    _, targets = sd15
    plain = {n for n, t in targets.items() if sd_scripts_selection(t, conv=False)}
    locon = {n for n, t in targets.items() if sd_scripts_selection(t, conv=True)}
    assert plain == set(load_network(real_lora_dir / "sd15_lora.safetensors").modules)
    assert locon == set(load_network(real_lora_dir / "sd15_locon.safetensors").modules)
    written = json.loads((SD_SCRIPTS / "extract_modules.json").read_text())["unet_modules"]
    assert {n for n in plain if n.startswith("lora_unet_")} == set(written)


def _pair(folder, shapes, targets):
    """Base and tuned files with the pinned modules (rebuilt from their names) and an unchanged TE layer."""
    keys = [targets[n].key for n in PINNED] + [TE_KEY]
    paths = folder / "base.safetensors", folder / "tuned.safetensors"
    for path, tuned in zip(paths, (False, True)):
        entries = [Entry(k, torch.float16, shapes[k]) for k in keys]
        with StreamWriter(path, entries) as w:
            for e in entries:
                changed = tuned and e.name != TE_KEY
                w.write(e.name, tuned_weight(e.name, e.shape) if changed else base_weight(e.name, e.shape))
    return paths


def test_same_lora_as_sd_scripts_extract(sd15, tmp_path):
    """sd-scripts' extract --dim 8 on the full-size synthetic pair (README in tests/data/ops), here on four of its
    modules rebuilt from their names: the same factors' product, the text encoder left out the same way."""
    shapes, targets = sd15
    base, tuned = _pair(tmp_path, shapes, targets)
    out = tmp_path / "lora.safetensors"
    result = extract(ExtractRequest(str(base), str(tuned), str(out), dim=8, svd="full", dtype="fp32"))
    assert result.text_encoder_skipped and result.svd_used == {"full": 4, "lowrank": 0}
    ours, theirs = load_network(out), load_network(SD_SCRIPTS / "extract_d8_subset.safetensors")
    assert set(ours.modules) == set(PINNED)
    for name in PINNED:
        assert ours.modules[name].rank == 8 and float(ours.modules[name].alpha) == 8.0
        assert rel(delta(ours, name), delta(theirs, name)) < 2e-3, name  # theirs stored here as fp16
    meta = read_metadata(out)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_base_model_version"]) == ("8", "8", "sd_v1")
    assert json.loads(meta["lora_studio.operation"])["sources"][1]["name"] == "tuned.safetensors"


def test_randomized_svd_gives_the_same_error(sd15, tmp_path):
    shapes, targets = sd15
    base, tuned = _pair(tmp_path, shapes, targets)
    errors = {}
    for how in ("full", "lowrank"):
        out = tmp_path / f"{how}.safetensors"
        extract(ExtractRequest(str(base), str(tuned), str(out), dim=8, svd=how, dtype="fp32", clamp_quantile=None))
        net = load_network(out)
        errors[how] = [rel(delta(net, n), (tuned_weight(targets[n].key, targets[n].shape).float() -
                                           base_weight(targets[n].key, targets[n].shape).float()).flatten(1))
                       for n in PINNED]
    for full, low in zip(errors["full"], errors["lowrank"]):
        assert low <= full * 1.01 + 1e-4


def test_extract_of_a_merged_lora_recovers_it(tiny_sd1_checkpoint, tmp_path):
    """extract(W + ΔW, W) at the LoRA's rank gives ΔW back (every module kind: linear, 1x1 and 3x3 convs, TE)."""
    src = str(tiny_sd1_checkpoint)
    tuned = tmp_path / "tuned.safetensors"
    small_a = str(SD_SCRIPTS.parent / "small_a.safetensors")
    merge_into_model(MergeModelRequest(src, (LoraInput(small_a, 1.0),), str(tuned)))
    lora = load_network(small_a)
    for how in ("full", "lowrank"):
        out = tmp_path / f"{how}.safetensors"
        result = extract(ExtractRequest(src, str(tuned), str(out), dim=8, conv_dim=8, clamp_quantile=None,
                                        min_diff=0.0, svd=how, dtype="fp32"))
        assert not result.text_encoder_skipped
        got = load_network(out)
        for name in lora.modules:
            wanted = delta(lora, name)
            if wanted.norm() > 0:
                assert rel(delta(got, name), wanted) < 1e-4, (how, name)
        others = [n for n in got.modules if n not in lora.modules]
        assert all(delta(got, n).norm() < 1e-5 for n in others)


def test_text_encoder_left_out_when_unchanged(tiny_sd1_checkpoint, tmp_path):
    src = str(tiny_sd1_checkpoint)
    tuned = tmp_path / "tuned.safetensors"
    unet_only = LoraInput(str(SD_SCRIPTS.parent / "small_a.safetensors"), 0.0, 1.0)
    merge_into_model(MergeModelRequest(src, (unet_only,), str(tuned)))
    out = tmp_path / "lora.safetensors"
    result = extract(ExtractRequest(src, str(tuned), str(out), dim=4, min_diff=0.01))
    assert result.text_encoder_skipped and result.text_encoder_max_diff == 0.0
    assert all(n.startswith("lora_unet_") for n in load_network(out).modules)


def test_dynamic_extract_ranks(tiny_sd1_checkpoint, tmp_path):
    src = str(tiny_sd1_checkpoint)
    tuned = tmp_path / "tuned.safetensors"
    lora = LoraInput(str(SD_SCRIPTS.parent / "small_a.safetensors"))
    merge_into_model(MergeModelRequest(src, (lora,), str(tuned)))
    out = tmp_path / "lora.safetensors"
    result = extract(ExtractRequest(src, str(tuned), str(out), dim=None, method="sv_fro", param=0.99,
                                    clamp_quantile=None, min_diff=0.0))
    ranks = {n: r.rank for n, r in result.modules.items()}
    assert ranks["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"] == 1  # unchanged: rank 1
    assert 1 < max(ranks.values()) <= 9 and read_metadata(out)["ss_network_dim"] == "Dynamic"
    assert all(r.fro_kept >= 0.99 for r in result.modules.values() if r.fro_kept == r.fro_kept)
