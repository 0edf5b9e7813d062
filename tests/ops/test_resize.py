"""Resize: sd-scripts' resize_lora.py results (its own output files and logs), computed through the factors."""
from __future__ import annotations

import json
import math
import re

import pytest

from lib_lora.io import addnet_hash, read_metadata
from lib_lora.networks import load_network
from lib_lora.ops import RankRule, ResizeRequest, resize
from lib_lora.ops.output import RANKS_KEY
from tests.ops.util import SD_SCRIPTS, SMALL_A, delta, rel, rel_terms, terms

FP16_REL = 2e-3  # both sides stored fp16: ~1e-3 relative per factor
_LOG_LINE = re.compile(r"^(lora_\S+)\s+\| sum\(S\) retained: ([\d.]+)%, fro retained: ([\d.]+)%, "
                       r"max\(S\) ratio: ([\d.]+)", re.M)


def test_rank1_of_the_real_locon_matches_sd_scripts_file_and_log(tools_dir, real_lora_dir, tmp_path):
    out = tmp_path / "r1.safetensors"
    result = resize(ResizeRequest(str(real_lora_dir / "sd15_locon.safetensors"), str(out), RankRule(1), "fp16"))
    ours, theirs = load_network(out), load_network(tools_dir / "resize_fxlocon_r1.safetensors")
    assert set(ours.modules) == set(theirs.modules) and len(ours.modules) == 350
    worst = max(rel_terms(terms(ours, n), terms(theirs, n)) for n in theirs.modules)
    assert worst < FP16_REL, worst
    rows = _LOG_LINE.findall((tools_dir / "logs" / "resize_fxlocon_r1.log").read_text())
    assert len(rows) == 350
    for name, sum_pct, fro_pct, ratio in rows:
        mine = result.modules[name]
        # sd-scripts prints one decimal of a float32 full SVD: equal within that printed digit
        assert abs(mine.sum_kept * 100 - float(sum_pct)) <= 0.06 + 0.05, name
        assert abs(mine.fro_kept * 100 - float(fro_pct)) <= 0.06 + 0.05, name
        assert abs(mine.max_ratio - float(ratio)) <= 0.06, name
    assert result.report().splitlines()[-1].startswith("Average Frobenius norm retention: 86.37%")  # as its log


@pytest.mark.parametrize("name, rule", [
    ("resize_fixed", RankRule(3, 2)),
    ("resize_sv_ratio", RankRule(6, method="sv_ratio", param=10)),
    ("resize_sv_fro", RankRule(6, method="sv_fro", param=0.9)),
    ("resize_sv_cumulative", RankRule(6, method="sv_cumulative", param=0.7)),
])
def test_fixed_and_dynamic_resizes_match_sd_scripts(name, rule, tmp_path):
    """sd-scripts' resize_lora.py run on tests/data/ops/small_a.safetensors (README there): same rank and alpha
    per module, same ΔW, same kept figures as its --verbose log."""
    out = tmp_path / "out.safetensors"
    result = resize(ResizeRequest(str(SMALL_A), str(out), rule, "fp16"))
    ours, theirs = load_network(out), load_network(SD_SCRIPTS / f"{name}.safetensors")
    log = json.loads((SD_SCRIPTS / "resize_logs.json").read_text())[name]
    assert set(ours.modules) == set(theirs.modules)
    for module, figures in log["modules"].items():
        a, b = ours.modules[module], theirs.modules[module]
        assert a.rank == b.rank and float(a.alpha) == pytest.approx(float(b.alpha), rel=1e-3), module
        if figures.get("rank") is not None:
            assert result.modules[module].rank == figures["rank"], module
        if delta(theirs, module).norm() > 0:
            assert rel(delta(ours, module), delta(theirs, module)) < FP16_REL, module
        mine = result.modules[module]
        assert abs(mine.fro_kept * 100 - figures["fro_kept_pct"]) <= 0.11, module
        assert abs(mine.sum_kept * 100 - figures["sum_kept_pct"]) <= 0.11, module
    assert result.mean_fro_kept * 100 == pytest.approx(log["average_fro_pct"], abs=0.006)
    assert math.isnan(result.modules["lora_unet_down_blocks_0_resnets_0_time_emb_proj"].fro_kept)  # its "nan%"


def test_untrained_module_keeps_rank_one_as_sd_scripts(tmp_path):
    out = tmp_path / "out.safetensors"
    result = resize(ResizeRequest(str(SMALL_A), str(out), RankRule(6, method="sv_fro", param=0.5)))
    assert result.modules["lora_unet_down_blocks_0_resnets_0_time_emb_proj"].rank == 1


def test_output_metadata_says_what_was_done(tmp_path):
    out = tmp_path / "out.safetensors"
    result = resize(ResizeRequest(str(SMALL_A), str(out), RankRule(6, method="sv_fro", param=0.9)))
    meta = read_metadata(out)
    assert meta["sshs_model_hash"] == addnet_hash(out)
    assert meta["ss_network_dim"] == meta["ss_network_alpha"] == "Dynamic"
    assert meta["ss_training_comment"].startswith("Dynamic resize with sv_fro: 0.9 from 8")
    operation = json.loads(meta["lora_studio.operation"])
    assert operation["operation"] == "resize" and operation["sources"][0]["sshs_model_hash"] == addnet_hash(SMALL_A)
    ranks = json.loads(meta[RANKS_KEY])
    assert {n: r[0] for n, r in ranks.items()} == {n: m.rank for n, m in result.modules.items()}
    assert result.info.algorithm == "locon" and result.info.rank == {"min": 1, "max": 6}


def test_other_algorithms_come_out_as_plain_lora_with_their_real_delta(real_lora_dir, tmp_path):
    src = real_lora_dir / "sd15_loha.safetensors"
    out = tmp_path / "out.safetensors"
    resize(ResizeRequest(str(src), str(out), RankRule(4), "fp32"))  # LoHa rank 2: ΔW has rank <= 4
    ours, theirs = load_network(out), load_network(src)
    assert {m.algo for m in ours.modules.values()} == {"lora"}
    assert max(rel(delta(ours, n), delta(theirs, n)) for n in theirs.modules) < 1e-4
