"""The app builds (no server) and its handlers map dicts of inputs to requests: through the standalone host on
the tiny model, and through a fake host that records what it is asked."""
from __future__ import annotations

import pytest
from PIL import Image

from lib_lora import blocks
from lib_lora.errors import ConfigError
from lib_lora.host import Host
from lib_lora.host.standalone import StandaloneHost
from lib_lora.sd.pipeline import SAMPLERS
from lib_lora.types import Arch
from tests.fake_host import FakeHost
from tests.helpers import checksum, make_sd_model, write_lora_folder

gr = pytest.importorskip("gradio")

from lib_lora.app import build_app  # noqa: E402  (after the gradio check)
from lib_lora.ui import TABS, compat  # noqa: E402


def no_progress(fraction, desc=None):
    return None


@pytest.fixture(scope="module")
def model(tiny_sd1):
    return make_sd_model(tiny_sd1)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_sd1, tiny_sdxl):
    return write_lora_folder(tmp_path_factory.mktemp("ui-loras"), tiny_sd1, tiny_sdxl)


@pytest.fixture(scope="module")
def host(model, lora_dir, tmp_path_factory):
    return StandaloneHost(model=model, lora_dir=lora_dir, outputs_dir=tmp_path_factory.mktemp("ui-out"))


@pytest.fixture(scope="module")
def tab(host):
    app = build_app(host)
    assert isinstance(app.blocks, gr.Blocks)
    return app.tabs["generate"]


def inputs(tab, prompt: str, **settings) -> dict:
    s = tab.settings
    values = {s.sampler: "Euler a", s.steps: 4, s.cfg: 7.0, s.seed: 11, s.width: 64, s.height: 64, s.batch: 1}
    values.update({getattr(s, k): v for k, v in settings.items()})
    return {tab.prompt.prompt: prompt, tab.prompt.negative: "", **values}


def test_registry_and_protocol(host, tmp_path):
    assert "generate" in TABS and TABS["generate"].standalone_only
    assert isinstance(host, Host) and isinstance(FakeHost(Arch.SD1, tmp_path, tmp_path), Host)
    assert compat.js_kwargs("() => 1") == ({"_js": "() => 1"} if compat.major_version() < 4 else {"js": "() => 1"})
    assert compat.message("<lora:x:1>", "error") == "**Error:** &lt;lora:x:1&gt;"


def test_generate_handler_through_the_standalone_host(tab, model):
    before = checksum(model.unet, *model.text_encoders)
    out = tab.on_generate(inputs(tab, "a red circle <lora:style:1:lbw=OUTS>"), progress=no_progress)
    paths = out[tab.output.gallery]
    assert len(paths) == 1
    with Image.open(paths[0]) as im:
        assert im.size == (64, 64) and im.info["parameters"] == out[tab.output.infotext]
    assert out[tab.output.infotext].startswith("a red circle <lora:style:1:lbw=OUTS>\nSteps: 4,")
    assert "Lora hashes:" in out[tab.output.infotext] and "seeds 11" in out[tab.output.status]
    assert checksum(model.unet, *model.text_encoders) == before


@pytest.mark.parametrize(("prompt", "settings", "words"), [
    ("<lora:stlye:1>", {}, ["**Error:**", "did you mean: style"]),
    ("<lora:style:1:lbw=NOPE>", {}, ["unknown block-weight preset"]),
    ("<lora:xl:1>", {}, ["SDXL", "SD1.x"]),
    ("x", {"seed": 1.5}, ["seed=1.5", "whole number"]),
    ("x", {"width": 60}, ["width=60", "multiple of 8"]),
])
def test_bad_input_shows_a_message_and_changes_nothing(tab, model, prompt, settings, words):
    before = checksum(model.unet, *model.text_encoders)
    out = tab.on_generate(inputs(tab, prompt, **settings), progress=no_progress)
    assert set(out) == {tab.output.status}
    for word in words:
        assert word in out[tab.output.status]
    assert checksum(model.unet, *model.text_encoders) == before


def test_interrupt_cancels_and_restores(tab, host, model):
    before = checksum(model.unet, *model.text_encoders)
    tab.on_interrupt()
    assert host.interrupted()  # cleared when the next generation starts

    def press_interrupt(fraction, desc=None):
        host.interrupt()

    out = tab.on_generate(inputs(tab, "x <lora:style:1>"), progress=press_interrupt)
    assert "cancelled (at step 1 of 4)" in out[tab.output.status]
    assert checksum(model.unet, *model.text_encoders) == before


def test_model_section_reports_a_bad_file_and_keeps_the_model(tab, host, model, tmp_path):
    assert "tiny-test" in tab.model.describe()
    out = tab.model.on_load({tab.model.source: str(tmp_path / "nope.safetensors")})
    assert "model file not found" in out[tab.model.status] and "still using tiny-test" in out[tab.model.status]
    assert host.model is model


def test_block_weight_editor_presets_sliders_and_lbw_value(tab):
    editor = tab.block_weights
    ids = blocks.BLOCK_IDS_26
    assert list(editor.sliders) == ["BASE", "M00"] + [b for b in ids if b.startswith("IN")] + \
        [b for b in ids if b.startswith("OUT")]
    out = editor.on_preset({editor.preset: "OUTS"})
    outs = blocks.resolve("OUTS", Arch.SD1)
    assert all(out[s] == outs[b] for b, s in editor.sliders.items()) and out[editor.lbw] == "OUTS"
    values = {editor.preset: "OUTS", **{s: outs[b] for b, s in editor.sliders.items()}}
    assert editor.on_slider(values) == {editor.lbw: "OUTS"}
    values[editor.sliders["IN04"]] = 0.5
    lbw = editor.on_slider(values)[editor.lbw]
    assert len(lbw.split(",")) == 26 and blocks.resolve(lbw, Arch.SD1)["IN04"] == 0.5
    assert "unknown block-weight preset" in editor.on_preset({editor.preset: "NOPE"})[editor.lbw]


def test_lora_browser_lists_and_inserts_the_syntax(tab, lora_dir, tiny_sd1):
    browser = tab.browser
    assert "mystyle" in browser.table.value and "sks" in browser.table.value
    assert "rank 4, lora" in browser.on_choose({browser.choice: "style"})[browser.details]
    data = {browser.choice: "style", browser.strength: 0.8, browser.with_lbw: True, browser.prompt: "a red circle",
            browser.lbw_source: "OUTS"}
    assert browser.on_insert(data) == {browser.prompt: "a red circle <lora:style:0.8:lbw=OUTS>"}
    data[browser.with_lbw] = False
    assert browser.on_insert(data) == {browser.prompt: "a red circle <lora:style:0.8>"}
    assert "choose a LoRA" in browser.on_insert({**data, browser.choice: None})[browser.details]
    (lora_dir / "sub" / "other.pt").rename(lora_dir / "sub" / "renamed.pt")
    out = browser.on_refresh({browser.choice: "style"})
    assert "renamed" in out[browser.choice]["choices"] or ("renamed", "renamed") in out[browser.choice]["choices"]
    assert "renamed" in out[browser.table]


def test_handlers_map_inputs_to_requests_on_an_sdxl_host(tmp_path, lora_dir):
    fake = FakeHost(Arch.SDXL, lora_dir, tmp_path)
    app = build_app(fake)
    tab = app.tabs["generate"]
    editor = tab.block_weights
    visible = {b for b, s in editor.sliders.items() if s.visible}
    assert visible == set(blocks.arch_block_ids(Arch.SDXL)) and len(visible) == 20
    assert editor.preset.value == "ALL" and "MINE" in [c[0] if isinstance(c, tuple) else c
                                                        for c in editor.preset.choices]
    assert tab.settings.width.value == 1024
    out = tab.on_generate(inputs(tab, "a dog <lora:x:1>", sampler="DDIM", steps=30.0, cfg=5.5, seed=7.0, width=1024,
                                 height=768, batch=2), progress=no_progress)
    (params,) = fake.requests
    assert (params.prompt, params.sampler, params.steps, params.cfg_scale, params.seed) == \
        ("a dog <lora:x:1>", "DDIM", 30, 5.5, 7)
    assert (params.width, params.height, params.batch_size) == (1024, 768, 2)
    assert isinstance(params.steps, int) and out[tab.output.infotext] == "a dog <lora:x:1>\nSteps: 30, Seed: 7"
    mine = editor.on_preset({editor.preset: "MINE"})
    assert mine[editor.sliders["BASE"]] == 1 and mine[editor.sliders["OUT05"]] == 1 and mine[editor.lbw] == "MINE"
    changed = editor.on_model_changed()
    assert changed[editor.sliders["IN11"]]["visible"] is False


def test_every_sampler_of_the_registry_is_offered(tab):
    choices = [c[0] if isinstance(c, tuple) else c for c in tab.settings.sampler.choices]
    assert choices == list(SAMPLERS)


def test_settings_reject_non_integers():
    with pytest.raises(ConfigError, match="steps"):
        from lib_lora.ui.generate_tab import as_int

        as_int(2.5, "steps")
