"""The merge/resize/extract/convert commands: --help, a run of each, errors as one line."""
from __future__ import annotations

import pytest

from lib_lora.cli import main
from lib_lora.io import read_metadata
from lib_lora.networks import load_network
from tests.ops.util import SMALL_A, SMALL_B


@pytest.mark.parametrize("command", ["merge", "resize", "extract", "convert"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0 and "--out" in capsys.readouterr().out


def test_resize_and_convert(tmp_path, capsys):
    out = tmp_path / "r.safetensors"
    assert main(["resize", str(SMALL_A), "--dynamic", "sv_fro", "--param", "0.9", "--out", str(out), "--verbose",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "fro retained" in printed and "Average Frobenius norm retention" in printed and out.exists()
    converted = tmp_path / "d.safetensors"
    assert main(["convert", str(out), "--to", "diffusers", "--dtype", "fp16", "--set-metadata", "modelspec.title=x",
                 "--out", str(converted), "--no-progress"]) == 0
    assert load_network(converted).spelling == "peft" and read_metadata(converted)["modelspec.title"] == "x"


def test_merge_loras_and_into_a_model(tiny_sd1_checkpoint, tmp_path, capsys):
    exact, svd, model = (tmp_path / f"{n}.safetensors" for n in ("exact", "svd", "model"))
    assert main(["merge", "--lora", f"{SMALL_A}:0.7", "--lora", f"{SMALL_B}:1:lbw=OUTALL", "--out", str(exact),
                 "--no-progress"]) == 0
    merged = load_network(exact).modules  # OUTALL keeps B's text-encoder modules (BASE), not its IN/M00 ones
    assert merged["lora_te_text_model_encoder_layers_0_self_attn_q_proj"].rank == 12
    assert merged["lora_unet_mid_block_resnets_0_conv1"].rank == 8
    assert main(["merge", "--lora", f"{SMALL_A}:0.7", "--lora", f"{SMALL_B}:-0.5", "--rank", "4", "--out", str(svd),
                 "--no-progress"]) == 0
    assert max(m.rank for m in load_network(svd).modules.values()) == 4
    assert main(["merge", "--model", str(tiny_sd1_checkpoint), "--lora", f"{SMALL_A}:0.8", "--dtype", "fp16",
                 "--out", str(model), "--no-progress"]) == 0
    assert "small_a: 12 modules merged" in capsys.readouterr().out


def test_extract(tiny_sd1_checkpoint, tmp_path, capsys):
    tuned, out = tmp_path / "tuned.safetensors", tmp_path / "lora.safetensors"
    assert main(["merge", "--model", str(tiny_sd1_checkpoint), "--lora", str(SMALL_A), "--out", str(tuned),
                 "--no-progress"]) == 0
    assert main(["extract", "--base", str(tiny_sd1_checkpoint), "--tuned", str(tuned), "--dim", "8", "--conv-dim",
                 "4", "--out", str(out), "--no-progress"]) == 0
    assert "text encoder changed" in capsys.readouterr().out
    assert load_network(out).modules["lora_unet_down_blocks_0_resnets_0_conv1"].rank == 4


def test_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    assert main(["resize", str(SMALL_A), "--out", str(out)]) == 1
    assert "give --rank N" in capsys.readouterr().err
    assert main(["resize", str(SMALL_A), "--rank", "2", "--out", str(SMALL_A)]) == 1
    assert "is the input" in capsys.readouterr().err and not out.exists()
