"""The pieces under the LoRA tools: SVD through factors, rank rules, streaming files, checkpoint target names."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from lib_lora.io import addnet_hash, read_metadata
from lib_lora.keys import NORM_ROLES
from lib_lora.ops import LoraInput, RankRule, linalg
from lib_lora.ops.checkpoint_keys import checkpoint_targets
from lib_lora.ops.stream import Entry, StreamWriter, TensorReader
from lib_lora.types import Arch
from tests.helpers import targets_of
from tests.ops.synthetic import SMALL_A as A_NAMES
from tests.ops.synthetic import SMALL_B as B_NAMES
from tests.ops.synthetic import SMALL_METADATA, small_lora
from tests.ops.util import SMALL_A, SMALL_B


@pytest.mark.parametrize("m, n, r", [(320, 2880, 8), (640, 5760, 16), (64, 64, 64), (768, 3072, 128)])
def test_factor_svd_gives_the_full_matrix_singular_values(m, n, r):
    g = torch.Generator().manual_seed(m + r)
    up = torch.randn(m, r, generator=g, dtype=torch.float64) * torch.logspace(0, -3, r, dtype=torch.float64)
    down = torch.randn(r, n, generator=g, dtype=torch.float64)
    s_full = torch.linalg.svdvals(up @ down)[:r]
    svd = linalg.factor_svd(up.float(), down.float())
    assert torch.allclose(svd.s, s_full, rtol=1e-4, atol=0)
    product = (svd.u * svd.s) @ svd.vh
    assert float((product - up.float().double() @ down.float().double()).norm() / s_full.norm()) < 1e-10


def test_rank_rules_are_sd_scripts_index_rules():
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25])
    # sv_ratio 5: 3 values above 8/5, plus sd-scripts' one more
    assert linalg.choose_rank(s, RankRule(8, method="sv_ratio", param=5), 8, 6) == 4
    # sv_fro 0.9: 0.81 of sum(S²) within the first 2 values, index 2, plus one
    assert linalg.choose_rank(s, RankRule(8, method="sv_fro", param=0.9), 8, 6) == 3
    assert linalg.choose_rank(s, RankRule(2, method="sv_fro", param=0.9), 2, 6) == 2  # capped
    # sv_cumulative 0.5: the first value holds 8/15.75 of the sum: index 1, plus one
    assert linalg.choose_rank(s, RankRule(8, method="sv_cumulative", param=0.5), 8, 6) == 2
    assert linalg.choose_rank(s * 1e-8, RankRule(8, method="sv_fro", param=0.9), 8, 6) == 1  # a zero matrix
    assert linalg.choose_rank(s, RankRule(3), 3, 6) == 3


@pytest.mark.parametrize("rule", [RankRule(16), RankRule(16, method="sv_ratio", param=20),
                                  RankRule(16, method="sv_fro", param=0.8)])
def test_randomized_svd_decides_the_same_rank(rule):
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(600, 60, generator=g))[0]
    v = torch.linalg.qr(torch.randn(400, 60, generator=g))[0]
    a = (u * torch.exp(-torch.arange(60.0) / 8)) @ v.T
    full = linalg.decompose(a, rule, False, mode="full")
    low = linalg.decompose(a, rule, False, mode="lowrank")
    assert low[3] == "lowrank" and full[2].rank == low[2].rank
    assert low[2].fro_kept == pytest.approx(full[2].fro_kept, rel=1e-4)
    assert math.isnan(low[2].sum_kept)  # the sum of all singular values is not known from the leading ones


def test_quantile_beyond_torch_limit(monkeypatch):
    values = torch.randn(10_001, generator=torch.Generator().manual_seed(1))
    expected = torch.quantile(values, 0.99)
    monkeypatch.setattr(linalg, "QUANTILE_LIMIT", 100)
    assert torch.allclose(linalg.quantile(values, 0.99), expected)


@pytest.mark.parametrize("background", [False, True])
def test_stream_writer_output_is_safetensors_with_its_hash(tmp_path, background):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.tensor(True),
               "d": torch.zeros(0, 4, dtype=torch.float16), "e": torch.arange(6, dtype=torch.int64).reshape(2, 3),
               "f": torch.randn(300, 700)}
    path = tmp_path / "x.safetensors"
    with StreamWriter(path, [Entry(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], {"k": "v"},
                      background=background) as w:
        for k, v in tensors.items():
            w.write(k, v.clone())  # the caller's tensor goes out of scope while the worker may still write it
    loaded = load_file(path)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    meta = read_metadata(path)
    assert meta["k"] == "v" and meta["sshs_model_hash"] == addnet_hash(path)
    with TensorReader(path) as reader:
        assert all(torch.equal(reader.read(k), v) for k, v in tensors.items())
        assert reader.names() == list(tensors)
        streamed = list(reader.stream(reader.names()))
        assert [k for k, _ in streamed] == list(tensors)
        assert all(torch.equal(v, tensors[k]) for k, v in streamed)
        assert list(reader.stream([])) == []


def test_all_finite_finds_one_bad_element_in_every_float_dtype():
    from lib_lora.networks.base import all_finite

    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for n in (1, 33, 4097):
            assert all_finite(torch.randn(n).to(dtype))
            for where in (0, n // 2, n - 1):
                for bad in (math.nan, math.inf, -math.inf):
                    t = torch.randn(n).to(dtype)
                    t[where] = bad
                    assert not all_finite(t) and not all_finite(t.reshape(1, -1)[:, ::1])
    assert all_finite(torch.zeros(0)) and all_finite(torch.arange(5))
    huge = torch.full((10,), 60000.0, dtype=torch.float16)  # finite, though its float16 sum overflows
    assert all_finite(huge)


def test_stream_writer_refuses_what_it_did_not_declare(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(RuntimeError, match="declared"), StreamWriter(path, [Entry("a", torch.float32, (2,))]) as w:
        w.write("a", torch.zeros(3))
    with pytest.raises(RuntimeError, match="not written"), StreamWriter(path, [Entry("a", torch.float32, (2,))]):
        pass
    assert not path.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_checkpoint_targets_are_the_loaded_models_targets(arch, tiny_checkpoints):
    """Names, shapes and roles from the file's keys alone equal those keys.py gives the loaded model's modules,
    norm layers only when asked (SDXL's text_projection aside: no LoRA trainer targets it)."""
    from lib_lora.sd.checkpoint import load_checkpoint

    with TensorReader(tiny_checkpoints[arch]) as reader:
        found = checkpoint_targets(reader.shapes(), Arch(arch))
        with_norms = checkpoint_targets(reader.shapes(), Arch(arch), norms=True)
    model = load_checkpoint(tiny_checkpoints[arch], compute_hash=False)
    loaded = [t for t in targets_of(model, Arch(arch)).targets.values() if t.role != "te_other"]
    assert {n: t.shape for n, t in found.items()} == {t.name: tuple(t.shape) for t in loaded
                                                      if t.role not in NORM_ROLES}
    assert {n: (t.shape, t.role) for n, t in with_norms.items()} == {t.name: (tuple(t.shape), t.role) for t in loaded}
    assert any(t.role in NORM_ROLES for t in with_norms.values())


def test_lora_input_reads_the_prompt_syntax():
    assert LoraInput.parse("a.safetensors:0.8") == LoraInput("a.safetensors", 0.8, 0.8)
    assert LoraInput.parse("a.safetensors:1:0.5:lbw=OUTALL") == LoraInput("a.safetensors", 1.0, 0.5, "OUTALL")
    assert LoraInput.parse(r"C:\loras\b.safetensors:0.7") == LoraInput(r"C:\loras\b.safetensors", 0.7, 0.7)
    assert LoraInput.parse("c.safetensors").unet_strength == 1.0


def test_committed_small_loras_are_what_the_generator_makes():
    """tests/data/ops/small_*.safetensors (sd-scripts' inputs) come from tests/ops/synthetic.py."""
    made_a, made_b = small_lora(A_NAMES, 8, 4.0, 0, True), small_lora(B_NAMES, 4, 2.0, 1, False)
    for path, made in ((SMALL_A, made_a), (SMALL_B, made_b)):
        stored = load_file(path)
        assert stored.keys() == made.keys() and all(torch.equal(stored[k], made[k]) for k in made)
        assert read_metadata(path) == SMALL_METADATA
