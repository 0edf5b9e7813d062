"""Per-block weights on A1111's own built-in LoRA, through its API (/sdapi/v1/txt2img, seed 1234, 64 px):
`lbw` all ones is the plain LoRA and all zeros no LoRA, bit for bit, for every LoRA type the host loads;
te=0 / unet=0 leave exactly the other half; a preset's image is what `python -m lib_lora generate` makes from
the same file on the same model; the infotext records the weights applied."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import hostenv
from tests.host.a1111.conftest import ALGOS, PROMPT
from tests.host.conftest import diff, extension_errors

ONES = ",".join(["1"] * 26)
ZEROS = ",".join(["0"] * 17)


def test_extension_loads_without_errors(a1111):
    status = a1111.get("/lora-studio/v1/status")
    assert status["host"] == "a1111" and status["arch"] == "sd1"
    assert status["checkpoint"].startswith("tiny-sd1")
    assert extension_errors(a1111.log_text()) == []
    names = {item["name"] for item in a1111.get("/sdapi/v1/loras")}
    assert {f"t_{a}" for a in ALGOS} <= names


@pytest.mark.parametrize("algo", [*ALGOS, "oft"])
def test_block_weights_ones_and_zeros(txt2img, algo):
    none, _ = txt2img()
    plain, info = txt2img(f"<lora:t_{algo}:1>")
    assert diff(plain, none) > 1.0, f"the {algo} fixture must change the image"
    ones, ones_info = txt2img(f"<lora:t_{algo}:1:lbw={ONES}>")
    zeros, _ = txt2img(f"<lora:t_{algo}:1:lbw={ZEROS}>")
    assert np.array_equal(ones, plain)
    assert np.array_equal(zeros, none)
    assert "Lora block weights" not in info["infotexts"][0]
    assert f"t_{algo}: lbw=" in ones_info["infotexts"][0]


def test_te_and_unet_zero_change_only_their_half(txt2img):
    none, _ = txt2img()
    # te= also sets the U-Net default (the host's rule, and ours): unet=1 keeps the U-Net half on
    no_te, _ = txt2img("<lora:t_lora:1:te=0:unet=1>")
    no_unet, _ = txt2img("<lora:t_lora:1:unet=0>")
    assert np.array_equal(no_te, txt2img("<lora:t_lora_unet:1>")[0])
    assert np.array_equal(no_unet, txt2img("<lora:t_lora_te:1>")[0])
    assert diff(no_te, none) > 1.0 and diff(no_unet, none) > 1.0
    # with block weights too: the TE half follows BASE, the U-Net half its blocks
    with_blocks = txt2img("<lora:t_lora:1:te=0:unet=1:lbw=OUTS>")[0]
    assert np.array_equal(with_blocks, txt2img("<lora:t_lora_unet:1:lbw=OUTS>")[0])


def test_preset_equals_the_cli_generate(txt2img, a1111, tmp_path):
    """The image of `<lora:t_lora:1:lbw=OUTS>` from the host equals the CLI's from the same file and model (the
    host's ldm U-Net and k-diffusion sampler vs our diffusers modules: a few 1/255 steps of rounding apart)."""
    tag = "<lora:t_lora:1:lbw=OUTS>"
    host, info = txt2img(tag)
    out = tmp_path / "cli.png"
    command = [sys.executable, "-m", "lib_lora", "generate", "--model", str(hostenv.tiny_checkpoint()),
               "--lora-dir", str(a1111.lora_dir), "--prompt", f"{PROMPT} {tag}", "--seed", "1234", "--steps", "20",
               "--cfg", "7", "--sampler", "Euler a", "--width", "64", "--height", "64",
               "--outputs", str(tmp_path / "outputs"), "--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=hostenv.ROOT, env=env, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    from PIL import Image

    ours = np.asarray(Image.open(out).convert("RGB"))
    none, _ = txt2img()
    assert diff(host, none) > 2.0  # the preset applies a visible part of the LoRA
    assert diff(host, ours) < 1.0 and np.abs(host.astype(int) - ours.astype(int)).max() <= 8
    assert 'Lora block weights: "t_lora: OUTS (lbw=1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1)"' \
        in info["infotexts"][0]


@pytest.mark.parametrize("algo", ["loha", "lokr", "ia3", "full", "dora"])
def test_preset_equals_our_engine_for_lycoris_types(txt2img, a1111, algo):
    """The same comparison for every LyCORIS type both engines read, with a step window, in-process (the engine
    the CLI runs)."""
    from lib_lora.lora_library import LoraLibrary
    from lib_lora.sd.checkpoint import load_checkpoint
    from lib_lora.sd.lora_generate import generate_with_loras
    from lib_lora.sd.pipeline import GenerationParams

    tag = f"<lora:t_{algo}:1:lbw=INALL:stop=10>"  # a U-Net step window too
    host, _ = txt2img(tag)
    model = load_checkpoint(hostenv.tiny_checkpoint(), compute_hash=False)
    params = GenerationParams(prompt=f"{PROMPT} {tag}", seed=1234, steps=20, width=64, height=64)
    ours = np.asarray(generate_with_loras(model, params, LoraLibrary(a1111.lora_dir)).images[0].convert("RGB"))
    none, _ = txt2img()
    worst = np.abs(host.astype(int) - ours.astype(int)).max()
    assert diff(host, ours) < 1.0 and worst <= 8, (diff(host, ours), worst, diff(host, none))


def test_positional_preset_and_errors(txt2img):
    """`<lora:name:1:OUTS>` (lora-block-weight's positional form) means lbw=OUTS; an unknown preset stops the
    job with the reason instead of drawing the LoRA without its weights."""
    assert np.array_equal(txt2img("<lora:t_lora:1:OUTS>")[0], txt2img("<lora:t_lora:1:lbw=OUTS>")[0])
    answer = txt2img.raw("<lora:t_lora:1:lbw=NOSUCH>")
    assert answer["images"] == []
    error = json.loads(answer["info"])["extra_generation_params"]["LoRA Studio error"]
    assert "unknown block-weight preset 'NOSUCH'" in error and "OUTS" in error  # names the known ones
    assert len(txt2img.raw("")["images"]) == 1  # the next job runs as usual
