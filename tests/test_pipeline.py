"""Text-to-image pipeline on tiny random SD1 / SD2 / SDXL models: seeds, samplers, params, infotext, PNGs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lib_lora.errors import ConfigError, LibLoraError
from lib_lora.sd.model import SDModel
from lib_lora.sd.pipeline import (
    SAMPLERS,
    GenerationCancelled,
    GenerationParams,
    encode_prompts,
    format_infotext,
    generate,
    save_png,
)
from lib_lora.types import Arch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(ROOT / "models" / "tokenizer"))


def _model(comps, arch: str, tokenizer) -> SDModel:
    return SDModel(arch=Arch(arch), unet=comps.unet, text_encoders=list(comps.text_encoders),
                   tokenizers=[tokenizer] * len(comps.text_encoders), vae=comps.vae,
                   prediction_type=comps.prediction_type, resolution=64, name="tiny-test", short_hash="0123abcdef")


@pytest.fixture(scope="module")
def sd1(tiny_sd1, tokenizer):
    return _model(tiny_sd1, "sd1", tokenizer)


def _arr(img) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def test_same_seed_same_image_and_other_seeds_differ(sd1):
    p = GenerationParams("a red circle", steps=4, seed=42)
    a, b = generate(sd1, p), generate(sd1, p)
    assert a.seeds == [42]
    assert np.array_equal(_arr(a.images[0]), _arr(b.images[0]))
    c = generate(sd1, GenerationParams("a red circle", steps=4, seed=43))
    assert not np.array_equal(_arr(a.images[0]), _arr(c.images[0]))


def test_batch_uses_seed_plus_index_like_the_web_ui(sd1):
    res = generate(sd1, GenerationParams("a cat", steps=3, seed=7, batch_size=2))
    assert res.seeds == [7, 8]
    assert ["Seed: 7," in t for t in res.infotexts] == [True, False]
    assert "Seed: 8," in res.infotexts[1]
    alone = generate(sd1, GenerationParams("a cat", steps=3, seed=8))
    # Image 1 of the batch re-made alone from its reported seed (batched kernels may round differently).
    assert np.abs(_arr(res.images[1]) - _arr(alone.images[0])).max() <= 2


def test_random_seed_is_reported(sd1):
    res = generate(sd1, GenerationParams("x", steps=1, seed=-1))
    assert 0 <= res.seeds[0] < 2**32
    assert f"Seed: {res.seeds[0]}," in res.infotexts[0]


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_registered_sampler_runs(sd1, sampler):
    res = generate(sd1, GenerationParams("a blue square", sampler=sampler, steps=3, seed=1))
    assert res.images[0].size == (64, 64)
    assert f"Sampler: {sampler}," in res.infotexts[0]
    assert np.isfinite(_arr(res.images[0])).all()


def test_web_ui_sampler_names_are_registered():
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM"} <= set(SAMPLERS)


def test_non_square_size_and_cfg_off(sd1):
    res = generate(sd1, GenerationParams("x", steps=2, seed=3, width=64, height=48, cfg_scale=1.0))
    assert res.images[0].size == (64, 48)
    assert "Size: 64x48," in res.infotexts[0]


def test_sd2_v_prediction_generates(tiny_sd2, tokenizer):
    model = _model(tiny_sd2, "sd2", tokenizer)
    assert model.prediction_type == "v_prediction"
    res = generate(model, GenerationParams("a dog", steps=3, seed=5, width=64, height=96, sampler="DPM++ 2M"))
    assert res.images[0].size == (64, 96)


def test_sdxl_two_encoders_pooled_and_time_ids(tiny_sdxl, tokenizer):
    model = _model(tiny_sdxl, "sdxl", tokenizer)
    emb = encode_prompts(model, ["a dog", "a cat"])
    assert emb.hidden.shape == (2, 77, 64 + 32)
    assert emb.pooled.shape == (2, 32)
    res = generate(model, GenerationParams("a dog", negative_prompt="blurry", steps=3, seed=5, width=96, height=64,
                                           batch_size=2))
    assert [im.size for im in res.images] == [(96, 64), (96, 64)]


def test_clip_skip_changes_the_conditioning(sd1):
    one = encode_prompts(sd1, ["a red circle"], clip_skip=1).hidden
    two = encode_prompts(sd1, ["a red circle"], clip_skip=2).hidden
    assert one.shape == two.shape == (1, 77, 64)
    assert not torch.allclose(one, two)


@pytest.mark.parametrize(
    ("field", "changes"),
    [
        ("sampler", {"sampler": "Euler b"}),
        ("steps", {"steps": 0}),
        ("width", {"width": 65}),
        ("height", {"height": -8}),
        ("batch_size", {"batch_size": 0}),
        ("cfg_scale", {"cfg_scale": float("nan")}),
        ("seed", {"seed": -2}),
        ("clip_skip", {"clip_skip": 0}),
        ("steps", {"steps": 2.5}),
    ],
)
def test_bad_params_name_the_field(sd1, field, changes):
    with pytest.raises(ConfigError) as err:
        generate(sd1, GenerationParams("x", **changes))
    assert err.value.field == field


def test_unknown_sampler_lists_known_names():
    with pytest.raises(ConfigError, match="Euler a") as err:
        GenerationParams("x", sampler="k_euler").validate()
    assert "DPM++ 2M" in err.value.reason


def test_infotext_is_web_ui_format(sd1):
    p = GenerationParams("a red circle, masterpiece", negative_prompt="blurry", steps=20, cfg_scale=7.0, seed=123)
    text = format_infotext(p, 123, sd1, {"Lora hashes": "shapes: abcdef012345", "Note": "plain"})
    assert text == (
        "a red circle, masterpiece\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 123, Size: 64x64, Model hash: 0123abcdef, "
        'Model: tiny-test, Lora hashes: "shapes: abcdef012345", Note: plain'
    )
    no_neg = format_infotext(GenerationParams("p", cfg_scale=7.5, clip_skip=2, width=128, height=64), 9, sd1)
    assert no_neg == ("p\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 9, Size: 128x64, Model hash: 0123abcdef, "
                      "Model: tiny-test, Clip skip: 2")


def test_png_parameters_chunk_round_trips(sd1, tmp_path):
    res = generate(sd1, GenerationParams("a red circle", negative_prompt="ugly, blurry", steps=2, seed=11),
                   extra_infotext={"Lora hashes": "a: 0123456789ab, b: ba9876543210"})
    path = tmp_path / "out" / "00001-11.png"
    save_png(res.images[0], path, res.infotexts[0])
    with Image.open(path) as im:
        assert im.info["parameters"] == res.infotexts[0]
        assert np.array_equal(_arr(im.convert("RGB")), _arr(res.images[0]))
    assert 'Lora hashes: "a: 0123456789ab, b: ba9876543210"' in res.infotexts[0]
    assert [p.name for p in path.parent.iterdir()] == ["00001-11.png"]


def test_should_stop_cancels_and_progress_reports(sd1):
    polls, progress = [], []

    def stop() -> bool:
        polls.append(1)
        return len(polls) == 3

    with pytest.raises(GenerationCancelled) as err:
        generate(sd1, GenerationParams("x", steps=10, seed=1), should_stop=stop,
                 progress=lambda i, n: progress.append((i, n)))
    assert isinstance(err.value, LibLoraError)
    assert progress == [(1, 10), (2, 10)]


def test_on_step_runs_before_each_unet_call(sd1):
    events = []
    orig = sd1.unet.forward

    def spy(*args, **kwargs):
        events.append("unet")
        return orig(*args, **kwargs)

    sd1.unet.forward = spy
    try:
        generate(sd1, GenerationParams("x", steps=5, seed=1), on_step=lambda i, n: events.append((i, n)))
    finally:
        del sd1.unet.forward
    assert events == [x for i in range(5) for x in ((i, 5), "unet")]
