"""Merging LoRAs: exact (ranks stacked) and by SVD, against sd-scripts' merge_lora.py and svd_merge_lora.py."""
from __future__ import annotations

import pytest
import torch

from lib_lora.io import read_metadata
from lib_lora.networks import load_network
from lib_lora.ops import LoraInput, MergeLorasRequest, RankRule, merge_loras
from tests.ops.util import SD_SCRIPTS, SMALL_A, SMALL_B, delta, rel, rel_terms, terms

FP16_REL = 2e-3
ALL17 = ",".join(["1"] * 17)
B_LBW = "0.3,0.5,1,1,1,1,1,1,1,1,1,1,1,1,1,1,0"


def _intended(nets, strengths, name):
    return sum(s * delta(n, name) for n, s in zip(nets, strengths) if name in n.modules)


def _sum_terms(nets, strengths, name):
    return [t for n, s in zip(nets, strengths) if name in n.modules for t in terms(n, name, s)]


def test_exact_merge_is_the_sum_of_the_deltas_and_sd_scripts_concat_is_not(tools_dir, real_lora_dir, tmp_path):
    """sd-scripts' --concat scales both factors of an input by its ratio: each acts with ratio² · rank/total rank.
    Ours gives 0.8 ΔW_a + 0.5 ΔW_b; with those effective strengths it gives sd-scripts' file."""
    a_path, b_path = real_lora_dir / "sd15_lora.safetensors", real_lora_dir / "sd15_locon.safetensors"
    out = tmp_path / "ab.safetensors"
    merge_loras(MergeLorasRequest((LoraInput(str(a_path), 0.8), LoraInput(str(b_path), 0.5)), str(out)))
    ours, a, b = load_network(out), load_network(a_path), load_network(b_path)
    concat = load_network(tools_dir / "mergeloras_fxlora0.8_fxlocon0.5_concat.safetensors")
    assert set(ours.modules) == set(concat.modules) and len(ours.modules) == 350
    for name in ours.modules:
        assert ours.modules[name].rank == concat.modules[name].rank  # ranks stacked, as --concat
        assert rel_terms(terms(ours, name), _sum_terms([a, b], [0.8, 0.5], name)) < FP16_REL, name
        total = 2 + (2 if name in a.modules else 0)
        theirs = _sum_terms([a, b], [0.8 ** 2 * 2 / total, 0.5 ** 2 * 2 / total], name)
        assert rel_terms(terms(concat, name), theirs) < FP16_REL, name
        assert rel_terms(terms(concat, name), _sum_terms([a, b], [0.8, 0.5], name)) > 0.45, name

    # the same delta as sd-scripts' file, from our merge at the strengths its formula amounts to (shared modules)
    shared = tmp_path / "shared.safetensors"
    merge_loras(MergeLorasRequest((LoraInput(str(a_path), 0.32), LoraInput(str(b_path), 0.125)), str(shared)))
    same = load_network(shared)
    for name in a.modules:
        assert rel_terms(terms(same, name), terms(concat, name)) < FP16_REL, name


def test_sd_scripts_merge_without_concat_adds_factors_not_deltas(tools_dir, real_lora_dir, tmp_path):
    a = load_network(real_lora_dir / "sd15_lora.safetensors")
    b = load_network(real_lora_dir / "sd15_locon.safetensors")
    summed = load_network(tools_dir / "mergeloras_fxlora0.8_fxlocon0.5_sum.safetensors")
    errors = [rel_terms(terms(summed, n), _sum_terms([a, b], [0.8, 0.5], n)) for n in a.modules]
    assert min(errors) > 0.29 and max(errors) < 0.9  # 30-89 % off, as the fixtures' README measured
    out = tmp_path / "ab.safetensors"
    merge_loras(MergeLorasRequest((LoraInput(str(real_lora_dir / "sd15_lora.safetensors"), 0.8),
                                   LoraInput(str(real_lora_dir / "sd15_locon.safetensors"), 0.5)), str(out)))
    ours = load_network(out)
    assert max(rel_terms(terms(ours, n), _sum_terms([a, b], [0.8, 0.5], n)) for n in a.modules) < FP16_REL


def _local_signs_match(intended: torch.Tensor, theirs: torch.Tensor, rank: int) -> bool:
    """Whether this machine's LAPACK gives the singular vectors the signs sd-scripts' run got (its clamp depends
    on them): compare the leading left singular vectors of the sum with the file's up columns."""
    u = torch.linalg.svd(intended, full_matrices=False)[0][:, :rank]
    return bool((torch.sum(u * theirs[:, :rank], 0) > 0).all())


@pytest.mark.parametrize("file, lbws", [("svd_merge", (None, None)), ("svd_merge_lbw", (ALL17, B_LBW))])
def test_svd_merge_with_clamp_reproduces_sd_scripts(file, lbws, tmp_path):
    """sd-scripts' svd_merge_lora.py --ratios 0.7 -0.5 --new_rank 5 --new_conv_rank 3 (with --lbws) on
    tests/data/ops/small_{a,b} (README there)."""
    out = tmp_path / "svd.safetensors"
    inputs = (LoraInput(str(SMALL_A), 0.7, lbw=lbws[0]), LoraInput(str(SMALL_B), -0.5, lbw=lbws[1]))
    merge_loras(MergeLorasRequest(inputs, str(out), "svd", RankRule(5, 3), clamp_quantile=0.99, dtype="fp16"))
    ours, theirs = load_network(out), load_network(SD_SCRIPTS / f"{file}.safetensors")
    assert set(ours.modules) == set(theirs.modules)
    compared = 0
    for name, module in theirs.modules.items():
        wanted = delta(theirs, name)
        if wanted.norm() == 0:  # an untrained module: zero both sides
            assert delta(ours, name).norm() == 0
            continue
        up = module.lora_up.weight.float().flatten(1)
        a, b = load_network(SMALL_A), load_network(SMALL_B)
        weights = [i.application(n, n.arch).strength_of(name, n.arch) for i, n in zip(inputs, (a, b))]
        if not _local_signs_match(_intended([a, b], weights, name), up, module.rank):
            continue
        assert rel(delta(ours, name), wanted) < FP16_REL, name
        compared += 1
    assert compared >= 8  # every module where this machine's LAPACK reproduces sd-scripts' signs


def test_svd_merge_default_is_the_best_approximation_at_the_rank(tmp_path):
    out = tmp_path / "svd.safetensors"
    result = merge_loras(MergeLorasRequest((LoraInput(str(SMALL_A), 0.7), LoraInput(str(SMALL_B), -0.5)), str(out),
                                           "svd", RankRule(5, 3), dtype="fp32"))
    ours, a, b = load_network(out), load_network(SMALL_A), load_network(SMALL_B)
    for name in ours.modules:
        target = _intended([a, b], [0.7, -0.5], name)
        if target.norm() == 0:
            continue
        u, s, vh = torch.linalg.svd(target.double(), full_matrices=False)
        k = ours.modules[name].rank
        best = ((u[:, :k] * s[:k]) @ vh[:k]).float()
        assert rel(delta(ours, name), best) < 1e-5, name
        assert result.modules[name].fro_kept == pytest.approx(float(s[:k].norm() / s.norm()), rel=1e-6)
    meta = read_metadata(out)
    assert meta["modelspec.merged_from"] == "small_a, small_b" and "ss_tag_frequency" not in meta


def test_exact_merge_applied_equals_both_applied(tiny_sd1, tmp_path):
    from lib_lora.patching import Application, WeightPatcher
    from lib_lora.types import Arch
    from tests.helpers import checksum, targets_of

    targets = targets_of(tiny_sd1, Arch.SD1)
    out = tmp_path / "ab.safetensors"
    merge_loras(MergeLorasRequest((LoraInput(str(SMALL_A), 0.7, 0.9, "OUTALL"), LoraInput(str(SMALL_B), -0.5)),
                                  str(out), dtype="fp32"))
    a, b, ab = load_network(SMALL_A), load_network(SMALL_B), load_network(out)
    patcher = WeightPatcher(targets)
    original = checksum(tiny_sd1.unet, *tiny_sd1.text_encoders)
    weights = LoraInput(str(SMALL_A), 0.7, 0.9, "OUTALL").application(a, Arch.SD1).blocks
    with patcher.applied([Application(a, 0.7, 0.9, weights), Application(b, -0.5, -0.5)]):
        both = {n: targets[n].param.detach().clone() for n in ab.modules}
    with patcher.applied([Application(ab)]):
        for name in ab.modules:
            w = targets[name].param
            assert torch.allclose(w, both[name], atol=1e-6, rtol=0), name
    assert checksum(tiny_sd1.unet, *tiny_sd1.text_encoders) == original
