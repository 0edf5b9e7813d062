"""Per-block weights on Forge's own LoRA patcher and LoRA axes in its X/Y/Z plot, through its API (random SD1.5,
64 px, 4 steps of Euler a, seed 1234): lbw all ones is the plain LoRA and all zeros no LoRA, bit for bit; te=0 /
unet=0 leave exactly the other half; a preset with a U-Net window equals `python -m lib_lora generate` on the
same file and checkpoint; a TE x U-Net grid has the right size and its corners are the images they stand for."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.host.a1111.test_a1111_xyz import TE, UNET, xyz_args
from tests.host.conftest import decode, diff
from tests.host.forge.conftest import PROMPT, cli_generate

ONES = ",".join(["1"] * 26)
ZEROS = ",".join(["0"] * 17)


# Forge's text encoder turns the LoHa fixture at full strength into NaN (a black image; our engine draws it, and at
# 0.5 both agree), so the LoHa checks run at 0.5: the ones/zeros comparisons must be between real images.
STRENGTH = {"lora": 1, "loha": 0.5, "lokr": 1}


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
def test_block_weights_ones_and_zeros(txt2img, algo):
    none, _ = txt2img()
    weight = STRENGTH[algo]
    plain, _ = txt2img(f"<lora:f_{algo}:{weight}>")
    assert diff(plain, none) > 1.0 and plain.std() > 10, "the fixture must change the image (and not to NaN)"
    assert np.array_equal(txt2img(f"<lora:f_{algo}:{weight}:lbw={ONES}>")[0], plain)
    assert np.array_equal(txt2img(f"<lora:f_{algo}:{weight}:lbw={ZEROS}>")[0], none)
    assert np.array_equal(txt2img()[0], none)  # the next plain generation is back to the model's own weights


def test_te_and_unet_zero_change_only_their_half(txt2img):
    assert np.array_equal(txt2img("<lora:f_lora:1:te=0:unet=1>")[0], txt2img("<lora:f_lora_unet:1>")[0])
    assert np.array_equal(txt2img("<lora:f_lora:1:unet=0>")[0], txt2img("<lora:f_lora_te:1>")[0])


def test_preset_with_window_equals_the_cli_generate(txt2img, forge, tmp_path):
    tag = "<lora:f_lora:1:lbw=OUTS:stop=1>"
    host, info = txt2img(tag)
    ours = cli_generate(forge.lora_dir, f"{PROMPT} {tag}", tmp_path)
    assert diff(host, txt2img()[0]) > 1.0 and diff(host, txt2img("<lora:f_lora:1:lbw=OUTS>")[0]) > 0.0
    assert diff(host, ours) < 1.0 and np.abs(host.astype(int) - ours.astype(int)).max() <= 8
    assert "OUTS (lbw=1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1:steps=0-1)" in info["infotexts"][0]


def test_te_by_unet_grid(forge, txt2img):
    labels = forge.get("/lora-studio/v1/xyz-axes")["labels"]
    answer = txt2img.raw("<lora:f_lora:1>", script_name="x/y/z plot",
                         script_args=xyz_args(labels, TE, "0, 1", UNET, "0, 1"))
    images = [decode(b) for b in answer["images"]]
    assert len(images) == 1 + 4 and images[0].shape[0] > 2 * 64 and images[0].shape[1] > 2 * 64
    assert json.loads(answer["info"])["all_prompts"][0].endswith("<lora:f_lora:te=0:unet=0>")
    assert np.array_equal(images[1], txt2img()[0])
    assert np.array_equal(images[4], txt2img("<lora:f_lora:1>")[0])
