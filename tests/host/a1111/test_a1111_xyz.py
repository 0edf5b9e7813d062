"""LoRA axes in A1111's own X/Y/Z plot script, through its API: a TE x U-Net strength grid has the right
size, its (0, 0) cell is the image without the LoRA and its (1, 1) cell the plain LoRA; the block-weight and
LoRA-file axes make the cells their tags say."""
from __future__ import annotations

import json

import numpy as np

from tests.host.conftest import decode

TE, UNET, LBW, FILE = ("[LoRA Studio] LoRA text-encoder weight", "[LoRA Studio] LoRA U-Net weight",
                       "[LoRA Studio] LoRA block weights", "[LoRA Studio] LoRA file")


def xyz_args(labels, x, xs, y, ys, x_dropdown=(), y_dropdown=()):
    """The X/Y/Z plot script's arguments (its `ui()` order), with legends, and the cells returned."""
    return [labels.index(x), xs, list(x_dropdown), labels.index(y), ys, list(y_dropdown), 0, "", [],
            True, True, False, False, False, False, False, 0, False]


def test_our_axes_are_in_the_plot(a1111):
    labels = a1111.get("/lora-studio/v1/xyz-axes")["labels"]
    assert {TE, UNET, LBW, FILE} <= set(labels) and labels[:2] == ["Nothing", "Seed"]
    assert labels.count(TE) == 1


def test_te_by_unet_grid(a1111, txt2img):
    labels = a1111.get("/lora-studio/v1/xyz-axes")["labels"]
    answer = txt2img.raw("<lora:t_lora:1>", script_name="x/y/z plot",
                         script_args=xyz_args(labels, TE, "0, 0.5, 1", UNET, "0-1 [3]"))
    images = [decode(b) for b in answer["images"]]
    assert len(images) == 1 + 9  # the grid, then each cell
    grid, cells = images[0], images[1:]
    assert grid.shape[0] > 3 * 64 and grid.shape[1] > 3 * 64  # 3x3 cells of 64 px plus the legend margins
    assert all(c.shape == (64, 64, 3) for c in cells)
    info = json.loads(answer["info"])
    assert "X Type: [LoRA Studio] LoRA text-encoder weight" in info["infotexts"][0]
    assert info["all_prompts"][0].endswith("<lora:t_lora:te=0:unet=0>")
    none, _ = txt2img()
    full, _ = txt2img("<lora:t_lora:1>")
    assert np.array_equal(cells[0], none)  # te 0, unet 0
    assert np.array_equal(cells[8], full)  # te 1, unet 1
    assert np.array_equal(cells[2], txt2img("<lora:t_lora:te=1:unet=0>")[0])


def test_block_weight_and_file_axes(a1111, txt2img):
    labels = a1111.get("/lora-studio/v1/xyz-axes")["labels"]
    ones = ",".join(["1"] * 17)
    answer = txt2img.raw("", script_name="x/y/z plot",
                         script_args=xyz_args(labels, LBW, f"NONE; OUTS; {ones}", FILE, "", y_dropdown=["t_lora",
                                                                                                       "t_loha"]))
    cells = [decode(b) for b in answer["images"]][1:]
    assert len(cells) == 6
    none, _ = txt2img()
    assert np.array_equal(cells[0], none) and np.array_equal(cells[3], none)
    assert np.array_equal(cells[1], txt2img("<lora:t_lora:1:lbw=OUTS>")[0])
    assert np.array_equal(cells[5], txt2img("<lora:t_loha:1>")[0])
