"""Files written by sd-scripts and LyCORIS: read, detected, reported, and ΔW equal to the ground truth."""
from __future__ import annotations

import json

import pytest
import torch

from lib_lora import blocks
from lib_lora.cli import main as cli_main
from lib_lora.info import describe
from lib_lora.io import addnet_hash, load_file, precalculate_hashes, read_metadata
from lib_lora.networks import load_network
from lib_lora.types import Arch

FILES = {
    "lora": ("lora", {"te": 72, "unet": 192}),
    "locon": ("locon", {"te": 72, "unet": 278}),
    "loha": ("loha", {"te": 72, "unet": 194}),
    "lokr": ("lokr", {"te": 72, "unet": 194}),
    "dora": ("dora", {"te": 72, "unet": 194}),
}


@pytest.fixture(scope="module")
def expected(real_lora_dir):
    return load_file(real_lora_dir / "expected_delta.safetensors").tensors


@pytest.mark.parametrize("kind", FILES)
def test_detection_and_counts(real_lora_dir, kind):
    net = load_network(real_lora_dir / f"sd15_{kind}.safetensors")
    algo, counts = FILES[kind]
    assert net.algorithms() == [algo]
    assert net.arch is Arch.SD1
    assert {c.value: n for c, n in net.components().items()} == counts
    assert net.unmatched_keys == []
    ranks = {m.rank for m in net.modules.values()}
    assert ranks == {2}
    assert {float(m.alpha) for m in net.modules.values()} == {1.0}


@pytest.mark.parametrize("kind", FILES)
def test_delta_equals_ground_truth(real_lora_dir, expected, kind):
    net = load_network(real_lora_dir / f"sd15_{kind}.safetensors")
    checked = 0
    for key, delta in expected.items():
        prefix, _, module = key.partition("/")
        if prefix != kind:
            continue
        w0 = expected[f"base/{module}"]
        m = net.modules[module]
        m.check_shape(w0.shape)
        ours = m.merged(w0, 1.0) - w0
        torch.testing.assert_close(ours, delta, atol=1e-7 + 1e-4 * delta.abs().max().item(), rtol=1e-4)
        checked += 1
    assert checked >= 2


@pytest.mark.parametrize("kind", FILES)
def test_info_report(real_lora_dir, kind, capsys):
    path = real_lora_dir / f"sd15_{kind}.safetensors"
    assert cli_main(["info", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for field in ("algorithm", "rank", "alpha", "arch", "modules", "blocks", "metadata", "sshs_model_hash",
                  "unmatched_keys"):
        assert field in data
    assert data["algorithm"] == FILES[kind][0]
    assert data["rank"] == 2 and data["alpha"] == 1.0 and data["arch"] == "sd1"
    assert data["modules"] == FILES[kind][1]
    # kohya LoCon covers every block but IN00 (conv_in is no target); the others only blocks with attention
    all_but_in00 = [b for b in blocks.BLOCK_IDS_26 if b != "IN00"]
    expected_blocks = list(blocks.BLOCK_LISTS[17]) if kind != "locon" else all_but_in00
    assert data["blocks"] == expected_blocks
    assert data["metadata"]["ss_network_dim"] == "2"
    assert data["unmatched_keys"] == []
    assert cli_main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "rank:        2" in text and "sd1" in text


def test_sd_scripts_hashes_match_ours(real_lora_dir):
    for kind in ("lora", "locon"):  # sd-scripts writes the 64-hex addnet hash; LyCORIS writes a 0x string
        path = real_lora_dir / f"sd15_{kind}.safetensors"
        meta = read_metadata(path)
        assert addnet_hash(path) == meta["sshs_model_hash"]
        tensors = load_file(path).tensors
        model_hash, legacy = precalculate_hashes(tensors, meta)
        assert (model_hash, legacy) == (meta["sshs_model_hash"], meta["sshs_legacy_hash"])
        assert describe(path).short_hash == meta["sshs_model_hash"][:12]
