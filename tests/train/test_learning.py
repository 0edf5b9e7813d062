"""Training on the embedded tiny model does what users train for, and the guard catches what they fear.

Learning: a handful of images of a colour the model has never seen (pink), bound to the trigger word `sks`,
trained for about a minute of CPU. Generations of the trigger prompt turn pink; a prompt without the trigger
keeps its colours and changes far less. The metric is the share of pixels near the concept's colour.

Divergence: the same run at lr 1e-1 trips the divergence guard, which rolls back and lowers the lr, and the
run ends with a finite, loadable file and a report that says what happened.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lib_lora.lora_library import LoraLibrary
from lib_lora.networks import load_network
from lib_lora.sd.embedded import load_embedded
from lib_lora.sd.lora_generate import generate_with_loras
from lib_lora.sd.pipeline import GenerationParams
from lib_lora.sd.shapes import COLOURS, Combo, Placement, analyse, render
from lib_lora.train.run import train
from lib_lora.train.toml_config import load_config
from lib_lora.types import Arch
from tests.train.fixtures import write_run

PINK = (255, 150, 195)  # > 100 from every colour the model knows
TRIGGER = "a sks circle on a blue background"
OTHER = "a green square on a yellow background"
N_IMAGES = 6  # seeds 0..5


def pink_share(image) -> float:
    """Share of pixels within 60 (RGB distance) of PINK."""
    a = np.asarray(image, np.float32)[..., :3]
    return float((np.sqrt(((a - PINK) ** 2).sum(-1)) < 60).mean())


def write_concept(folder: Path) -> Path:
    """8 pink circles on four backgrounds, captioned with the trigger word in place of the colour."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    COLOURS["_pink"] = PINK  # render() draws named colours; registered only while drawing
    try:
        for i, bg in enumerate(["blue", "black", "green", "yellow"] * 2):
            place = Placement(float(rng.uniform(24, 40)), float(rng.uniform(24, 40)), float(rng.uniform(28, 40)))
            Image.fromarray(render(Combo("circle", "_pink", bg), place)).save(folder / f"{i}.png")
            (folder / f"{i}.txt").write_text(f"a sks circle on a {bg} background", encoding="utf-8")
    finally:
        del COLOURS["_pink"]
    return folder


def images(model, prompt: str, library: LoraLibrary) -> list:
    params = GenerationParams(prompt, sampler="Euler a", steps=20, cfg_scale=7.0, seed=0, batch_size=N_IMAGES)
    return generate_with_loras(model, params, library).images


def mean_abs_change(a: list, b: list) -> float:
    return float(np.mean([np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)).mean() for x, y in zip(a, b)]))


def checksum(model) -> float:
    return sum(float(p.double().sum()) for m in (model.unet, *model.text_encoders) for p in m.state_dict().values())


@pytest.fixture(scope="module")
def model():
    return load_embedded()


def _concept_run(tmp_path: Path, **options):
    write_concept(tmp_path / "train" / "10_sks")
    base = dict(pretrained_model_name_or_path="embedded", resolution=64, network_dim=8, network_alpha=8,
                learning_rate=1e-3, max_train_steps=150, train_batch_size=4, output_name="pink",
                lr_scheduler="constant", seed=3)
    base.update(options)
    return load_config(write_run(tmp_path, **base))


def test_a_trigger_word_learns_a_new_colour(tmp_path, model):
    empty = LoraLibrary(tmp_path / "none")
    before_trigger, before_other = images(model, TRIGGER, empty), images(model, OTHER, empty)
    weights = checksum(model)

    result = train(_concept_run(tmp_path), model=model)
    assert result.status == "finished" and result.final_file.is_file()
    assert checksum(model) == weights, "training must leave the base model's weights as they were"

    lora = LoraLibrary(tmp_path / "out")
    after_trigger = images(model, f"{TRIGGER} <lora:pink:1>", lora)
    after_other = images(model, f"{OTHER} <lora:pink:1>", lora)
    assert checksum(model) == weights

    pink_before = np.mean([pink_share(im) for im in before_trigger])
    pink_after = np.mean([pink_share(im) for im in after_trigger])
    assert pink_before < 0.02 and pink_after > 0.08, (pink_before, pink_after)
    # without the trigger: no pink, colours still read right, and a much smaller change
    assert max(pink_share(im) for im in after_other) < 0.02
    reads = [analyse(im) for im in after_other]
    right = sum(r.background == "yellow" and r.shape_colour == "green" for r in reads)
    assert right >= N_IMAGES - 1, [(r.shape_colour, r.background) for r in reads]
    trigger_change = mean_abs_change(before_trigger, after_trigger)
    other_change = mean_abs_change(before_other, after_other)
    # measured: 5.2 vs 21.0 mean abs pixel change (at lr 2e-3 the same run also muddied the green squares: 21.1
    # vs 22.4; this check is what caught it)
    assert other_change < 0.4 * trigger_change, (other_change, trigger_change)


def test_lr_1e_1_trips_the_guard_and_ends_with_a_usable_file(tmp_path, model):
    weights = checksum(model)
    seen = []
    cfg = _concept_run(tmp_path, learning_rate=1e-1, max_train_steps=40, guard_patience=5, guard_max_rollbacks=2,
                       guard_snapshot_every_n_steps=5)
    result = train(cfg, model=model, listeners=[lambda e: seen.append(e) if e.kind == "rollback" else None])
    assert seen, f"lr 1e-1 must trip the divergence guard; report:\n{result.report}"
    assert "lowered the lr" in seen[0].message
    assert result.status in ("finished", "diverged") and "divergence guard" in result.report
    assert result.final_file is not None and result.final_file.is_file()
    net = load_network(result.final_file, arch=Arch.SD1)
    assert all(torch.isfinite(t.float()).all() for m in net.modules.values() for t in m.file_tensors().values())
    assert checksum(model) == weights


def test_lr_10_stops_with_the_last_good_file_instead_of_finishing(tmp_path, model):
    # The blow-up here is immediate (0.19, then ~1.2-2, then NaN); after each rollback the lower lr still settles at
    # a broken ~1.3-1.8. That level must never become the baseline: the run stops, keeping the last good state.
    weights = checksum(model)
    result = train(_concept_run(tmp_path, learning_rate=10.0, max_train_steps=40), model=model)
    assert result.status == "diverged", result.report
    assert "rollbacks did not help" in result.report and "guard_max_rollbacks" in result.report
    net = load_network(result.final_file, arch=Arch.SD1)
    tensors = [t.float() for m in net.modules.values() for t in m.file_tensors().values()]
    assert all(torch.isfinite(t).all() and t.abs().max() < 10 for t in tensors)
    assert checksum(model) == weights
