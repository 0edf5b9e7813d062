"""X/Y plots: value syntax, plans checked before anything runs, grids with labels and infotext, and a plot on a
tiny model through the standalone host (cells re-patch only what changes; the 0/0 cell is the image without the
LoRA; cancelling keeps what is done; the model is restored)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lib_lora.errors import ConfigError
from lib_lora.host.standalone import StandaloneHost
from lib_lora.sd.pipeline import GenerationParams
from lib_lora.types import Arch
from lib_lora.xy import AXES, AxisContext, AxisRequest, Cell, make_plan, parse_values, run_plan
from lib_lora.xy.grid import draw_grid
from tests.helpers import checksum, make_sd_model, write_lora_folder


@pytest.mark.parametrize(("text", "kind", "expected"), [
    ("0, 0.5, 1", "float", [0.0, 0.5, 1.0]),
    ("0-1 (+0.25)", "float", [0.0, 0.25, 0.5, 0.75, 1.0]),
    ("0-1 [5]", "float", [0.0, 0.25, 0.5, 0.75, 1.0]),
    ("1-0 (-0.5)", "float", [1.0, 0.5, 0.0]),
    ("-1-1 [3]", "float", [-1.0, 0.0, 1.0]),
    ("0.1-0.3 (+0.1)", "float", [0.1, 0.2, 0.3]),
    ("0, 0.2-0.4 (+0.1), 1", "float", [0.0, 0.2, 0.3, 0.4, 1.0]),
    ("1-4", "int", [1, 2, 3, 4]),
    ("1-10 (+3)", "int", [1, 4, 7, 10]),
    ("10-30 [3]", "int", [10, 20, 30]),
    ('Euler a, "1,0,1", ALL', "str", ["Euler a", "1,0,1", "ALL"]),
])
def test_values_read_as_the_web_ui_reads_them(text, kind, expected):
    assert parse_values(text, kind) == expected


@pytest.mark.parametrize(("text", "kind", "words"), [
    ("", "float", "no values"),
    ("0-1", "float", "needs a step"),
    ("0-1 (-0.5)", "float", "point from the start"),
    ("1.5", "int", "whole number"),
    ("abc", "float", "expected a number"),
    ("0-1 (+0.00001)", "float", "at most 1000"),
])
def test_bad_values_name_the_field(text, kind, words):
    with pytest.raises(ConfigError) as info:
        parse_values(text, kind, "x_values")
    assert info.value.field == "x_values" and words in str(info.value)


@pytest.fixture(scope="module")
def model(tiny_sd1):
    return make_sd_model(tiny_sd1)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_sd1, tiny_sdxl):
    folder = write_lora_folder(tmp_path_factory.mktemp("xy-loras"), tiny_sd1, tiny_sdxl)
    for name in ("run-000002", "run-000010", "run"):  # the epoch files of one run, by name
        (folder / f"{name}.safetensors").write_bytes((folder / "style.safetensors").read_bytes())
    return folder


@pytest.fixture(scope="module")
def host(model, lora_dir, tmp_path_factory):
    return StandaloneHost(model=model, lora_dir=lora_dir, outputs_dir=tmp_path_factory.mktemp("xy-out"))


def context(host, prompt="a red circle") -> AxisContext:
    return AxisContext(host.lora_library(), Arch.SD1, host.block_presets(), host.samplers(), prompt)


def base(prompt="a red circle", lora="style", seed=5) -> Cell:
    return Cell(GenerationParams(prompt, sampler="Euler", steps=3, seed=seed, width=64, height=64), lora)


def test_plan_checks_everything_before_running(host):
    ctx = context(host)
    cases = [
        ([AxisRequest("te", "0, 1")], base(lora=None), "lora", "needs a LoRA"),
        ([AxisRequest("lora", "stlye")], base(), "x_values", "did you mean"),
        ([AxisRequest("te", "0,1"), AxisRequest("lbw", "NOPE")], base(), "y_values", "unknown block-weight preset"),
        ([AxisRequest("sampler", "Euler a, Nope")], base(), "x_values", "unknown sampler"),
        ([AxisRequest("prompt_sr", "blue, green")], base(), "x_values", "does not contain"),
        ([AxisRequest("te", "0"), AxisRequest("te", "1")], base(), "y_type", "same kind"),
        ([AxisRequest("nope", "1")], base(), "x_type", "unknown axis"),
    ]
    for requests, cell, field, words in cases:
        with pytest.raises(ConfigError) as info:
            make_plan(cell, requests, ctx)
        assert info.value.field == field and words in str(info.value), (requests, str(info.value))


def test_plan_jobs_values_and_labels(host):
    plan = make_plan(base(seed=-1), [AxisRequest("lora", "run*"), AxisRequest("prompt_sr", "red, blue"),
                                     AxisRequest("cfg", "3, 7")], context(host))
    assert plan.x.values == ("run-000002", "run-000010", "run")  # epoch order, the final file last
    assert plan.x.labels[0].startswith("run-000002 (") and "sks" in plan.x.labels[0]  # trigger words
    assert plan.shape == (3, 2, 2) and plan.count == 12
    jobs = plan.jobs()
    assert [(j.x, j.y, j.z) for j in jobs[:4]] == [(0, 0, 0), (1, 0, 0), (2, 0, 0), (0, 1, 0)]
    seeds = {j.cell.params.seed for j in jobs}
    assert len(seeds) == 1 and -1 not in seeds  # one random seed, fixed for the whole plot
    assert jobs[3].cell.request().prompt == "a blue circle <lora:run-000002:te=1:unet=1>"
    assert jobs[6].cell.params.cfg_scale == 7.0
    assert "Y: Prompt S/R: red, blue" in plan.describe()
    assert set(AXES) >= {"te", "unet", "lbw", "lora", "seed", "prompt_sr", "cfg", "steps", "sampler"}


def test_grid_places_each_cell_exactly_and_draws_labels():
    cells = [Image.new("RGB", (64, 64), (10 * i, 200, 30)) for i in range(6)]
    grid, layout = draw_grid(cells, 3, 2, x_title="LoRA TE strength", x_labels=["0", "0.5", "1"],
                             y_title="LoRA U-Net strength", y_labels=["0", "1"])
    assert layout.scale == 2 and grid.size == (layout.width, layout.height)
    for i, cell in enumerate(cells):
        box = layout.cell_box(i % 3, i // 3)
        assert grid.crop(box).resize((64, 64), Image.NEAREST).tobytes() == cell.tobytes()
    a = np.asarray(grid)
    assert (a[: layout.top, layout.left:] < 100).any(), "column labels are drawn above the cells"
    assert (a[layout.top:, : layout.left] < 100).any(), "row labels are drawn left of the cells"
    with pytest.raises(ValueError):
        draw_grid(cells, 2, 2)


def _slot_counter(host):
    patcher = host._patcher  # noqa: SLF001 - counting the weights a plot rewrites
    written = []
    original = patcher._write_slot

    def counting(slot, stacks):
        written.append(slot.targets[0].name)
        return original(slot, stacks)

    patcher._write_slot = counting
    return written, lambda: setattr(patcher, "_write_slot", original)


def test_te_by_unet_plot_repatches_only_what_changes(host, model, tmp_path):
    before = checksum(model.unet, *model.text_encoders)
    plan = make_plan(base(), [AxisRequest("te", "0, 0.5, 1"), AxisRequest("unet", "0-1 [3]")], context(host))
    written, undo = _slot_counter(host)
    try:
        result = run_plan(plan, host.generate_series, out_dir=tmp_path)
    finally:
        undo()
    assert checksum(model.unet, *model.text_encoders) == before
    assert result.done == 9 and not result.cancelled and not result.error
    network = host.lora_library().load(host.lora_library().find("style"), Arch.SD1)
    n_te = sum(name.startswith("lora_te") for name in network.modules)
    n_unet = len(network.modules) - n_te
    # along X only the text encoder's weights change; a new row changes the U-Net's and resets the TE's;
    # then the series ends and restores what is merged (TE and U-Net at strength 1)
    assert len(written) == 8 * n_te + 2 * n_unet + (n_te + n_unet), (len(written), n_te, n_unet)

    plain = host.generate(GenerationParams("a red circle", sampler="Euler", steps=3, seed=5, width=64, height=64))
    assert result.images[0].tobytes() == plain.images[0].tobytes(), "TE 0 x U-Net 0 is the image without the LoRA"
    assert result.images[8].tobytes() != plain.images[0].tobytes()
    with Image.open(result.grid_paths[0]) as saved:
        info = saved.info["parameters"]
        layout = result.layouts[0]
        assert saved.size == (layout.width, layout.height)
        cell = saved.convert("RGB").crop(layout.cell_box(0, 0)).resize((64, 64), Image.NEAREST)
        assert cell.tobytes() == plain.images[0].tobytes()
    assert 'X/Y plot: "X: LoRA TE strength: 0, 0.5, 1; Y: LoRA U-Net strength: 0, 0.5, 1"' in info
    assert "Lora hashes" in info and all(p is not None for p in result.paths)


def test_cancel_keeps_what_is_done_and_restores(host, model, tmp_path):
    before = checksum(model.unet, *model.text_encoders)
    plan = make_plan(base(), [AxisRequest("strength", "0.5, 1, 1.5")], context(host))
    made = []

    def series(requests, progress=None, should_stop=None):
        for r in host.generate_series(requests, progress=progress, should_stop=should_stop):
            made.append(r)
            yield r

    result = run_plan(plan, series, out_dir=tmp_path, should_stop=lambda: len(made) >= 2)
    assert result.cancelled and result.done == 2 and result.images[2] is None
    assert len(result.grid_paths) == 1 and "2 of 3 images" in result.summary()
    assert checksum(model.unet, *model.text_encoders) == before


def test_a_z_axis_makes_one_grid_per_value(host, tmp_path):
    from lib_lora.host import HostResult
    from lib_lora.xy import series_of

    made = []

    def generate(params, progress=None):
        made.append(params)
        return HostResult([Image.new("RGB", (64, 64), (len(made) * 9, 0, 0))], [params.prompt], [params.seed])

    plan = make_plan(base(), [AxisRequest("seed", "1-3"), AxisRequest(""), AxisRequest("cfg", "5, 9")], context(host))
    result = run_plan(plan, series_of(generate), out_dir=tmp_path)
    assert plan.shape == (3, 1, 2) and len(made) == 6 and len(result.grid_paths) == 2
    assert [p.cfg_scale for p in made] == [5.0] * 3 + [9.0] * 3 and [p.seed for p in made[:3]] == [1, 2, 3]
    assert all(layout.cols == 3 and layout.rows == 1 for layout in result.layouts)
    assert result.grid_paths[0].name.endswith("-z0.png") and result.grid_paths[1].name.endswith("-z1.png")
