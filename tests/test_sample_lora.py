"""The sample LoRA shipped in models/Lora: found by the app's default LoRA folder, well under 1 MB, its metadata filled
in, and a visible style on the embedded model (measured: 4 images at seed 1000, 20 steps; mean brightness 104 -> 137,
mean absolute pixel change 37)."""
from __future__ import annotations

import numpy as np
import pytest

from lib_lora.host.standalone import DEFAULT_LORA_DIR
from lib_lora.io import read_metadata
from lib_lora.lora_library import LoraLibrary
from lib_lora.types import Arch

SAMPLE = DEFAULT_LORA_DIR / "sample-pastel.safetensors"
PROMPT = "a red circle on a blue background, pastel"


def test_found_by_default_small_and_described():
    assert SAMPLE.is_file() and SAMPLE.stat().st_size < 1_000_000
    entry = LoraLibrary(DEFAULT_LORA_DIR).find("sample-pastel")
    assert (entry.trigger_words, entry.arch, entry.algorithm, entry.rank) == (("pastel",), Arch.SD1, "lora", "4")
    meta = read_metadata(SAMPLE)
    assert meta["modelspec.title"].startswith("Pastel") and meta["ss_training_comment"].startswith("made by tools/")
    assert meta["ss_sd_model_name"] and meta["sshs_model_hash"]


def test_a_visible_style_on_the_embedded_model():
    from lib_lora.sd.embedded import load_embedded
    from lib_lora.sd.lora_generate import generate_with_loras
    from lib_lora.sd.pipeline import GenerationParams

    try:
        model = load_embedded()
    except Exception as exc:  # noqa: BLE001 - the embedded weights are part of the checkout
        pytest.fail(f"embedded model: {exc}")
    library = LoraLibrary(DEFAULT_LORA_DIR)

    def images(prompt: str) -> np.ndarray:
        made = generate_with_loras(model, GenerationParams(prompt, steps=20, seed=1000, batch_size=4), library)
        return np.stack([np.asarray(im, np.float32) for im in made.images])

    plain, styled = images(PROMPT), images(f"{PROMPT} <lora:sample-pastel:1>")
    assert styled.mean() - plain.mean() > 15, (plain.mean(), styled.mean())  # lighter: the colours go pastel
    assert np.abs(styled - plain).mean() > 15
