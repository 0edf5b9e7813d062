"""Builders for training tests: a tiny SD model with the tokenizer, small image folders, run TOMLs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from lib_lora.sd.model import SDModel
from lib_lora.sd.tiny import tiny_components
from tests.helpers import make_sd_model


def tiny_model(arch: str = "sd1", seed: int = 0) -> SDModel:
    """A tiny random model at 128 px (16x16 latents: at 64 px the deepest level is 1x1 and normalisation there
    makes gradients numerically fragile)."""
    model = make_sd_model(tiny_components(arch, seed=seed), arch, resolution=128)
    model.name = f"tiny-{arch}"
    return model


def write_images(folder: Path, n: int = 4, size: int = 128, caption: str = "sks red square",
                 colour=(220, 30, 30), background=(30, 60, 200), ext: str = ".txt") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    for i in range(n):
        a = np.zeros((size, size, 3), np.uint8)
        a[:] = background
        x, y = rng.integers(0, size // 2, 2)
        a[y : y + size // 2, x : x + size // 2] = colour
        Image.fromarray(a).save(folder / f"img{i}.png")
        (folder / f"img{i}{ext}").write_text(caption, encoding="utf-8")
    return folder


def write_run(folder: Path, **options) -> Path:
    """A run TOML in `folder` with small defaults; `options` override them (sd-scripts names)."""
    base = dict(train_data_dir="train", output_dir="out", output_name="tiny", resolution=128, network_dim=4,
                network_alpha=4, learning_rate=1e-3, max_train_steps=4, train_batch_size=2, seed=1,
                caption_extension=".txt")
    base.update(options)
    lines = []
    for key, value in base.items():
        if value is None:
            continue
        lines.append(f"{key} = {_toml(value)}")
    path = folder / "run.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
