"""The Training, X/Y plot and LoRA tools tabs build (no server) and their handlers map inputs to engine requests:
through a recording host with a scripted trainer, and through the standalone host on the embedded model for the
runs that must be real (the UI's run equals the CLI's run of the saved TOML; an X/Y plot on a real model)."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch

from lib_lora.io import load_file
from lib_lora.train import toml_config
from lib_lora.train.schema import option_specs
from lib_lora.types import Arch
from tests.fake_host import FakeHost, write_small_lora
from tests.train.fixtures import write_images

gr = pytest.importorskip("gradio")

from lib_lora.app import build_app  # noqa: E402  (after the gradio check)
from lib_lora.ui import TABS  # noqa: E402
from lib_lora.ui.train_form import PROMPTS_FIELD, field_id  # noqa: E402
from lib_lora.ui.train_tab import TrainTab  # noqa: E402


def form_data(tab, **values) -> dict:
    """The training tab's inputs as the browser would send them: the form's initial values, changed by `values`."""
    initial = {**tab.form.initial_values(), **values}
    data = {c: initial.get(name) for name, c in tab.form.fields.items()}
    data[tab.form.prompts] = initial.get(PROMPTS_FIELD, "")
    return data


def wait_ended(manager, run_id, timeout=120):
    return manager.wait(run_id, timeout=timeout)


@pytest.fixture
def fake(tmp_path):
    lora_dir = tmp_path / "loras"
    write_small_lora(lora_dir / "style.safetensors")
    return FakeHost(Arch.SD1, lora_dir, tmp_path / "out")


@pytest.fixture
def app(fake):
    built = build_app(fake)
    yield built
    fake.training().close()


def test_tabs_registered_and_the_form_holds_every_option(app):
    assert list(TABS) == ["generate", "train", "xy", "tools"] and set(app.tabs) == set(TABS)
    train = app.tabs["train"]
    assert set(train.form.fields) == {s.name for s in option_specs()}
    assert train.form.fields["network_dim"].elem_id == field_id("network_dim")


def test_a_new_engine_option_is_a_field_without_ui_code(fake, monkeypatch):
    table = dict(toml_config.OPTIONS)
    table["brand_new_option"] = toml_config.Option("brand_new_option", "loss", float | None)
    monkeypatch.setattr(toml_config, "OPTIONS", table)
    with gr.Blocks():
        tab = TrainTab(fake)
        tab.build()
    assert isinstance(tab.form.fields["brand_new_option"], gr.Textbox)


def _kohya_folder(tmp_path: Path) -> Path:
    write_images(tmp_path / "data" / "5_sks", n=3, size=64, caption="sks, red square")
    return tmp_path / "data"


def test_bad_input_shows_the_engines_message_and_starts_nothing(app, fake, tmp_path):
    tab = app.tabs["train"]
    out = tab.on_start(form_data(tab, train_data_dir=str(tmp_path / "missing")))
    assert "folder not found" in out[tab.status] and "nothing was started" in out[tab.status]
    assert "⚠" in out[tab.form.fields["train_data_dir"]]["label"]
    out = tab.on_start(form_data(tab, train_data_dir=str(_kohya_folder(tmp_path)), min_snr_gamma="five",
                                 resolution="64px"))
    assert "2 field(s)" in out[tab.status]
    assert "expected a number" in out[tab.form.fields["min_snr_gamma"]]["label"]
    assert out[tab.form.fields["network_dim"]]["label"] == "network_dim"
    assert fake.training().runs() == [] and fake.trainer.calls == []


def test_two_runs_started_at_once_are_queued_and_the_live_state_shows(app, fake, tmp_path):
    tab = app.tabs["train"]
    data = form_data(tab, train_data_dir=str(_kohya_folder(tmp_path)), caption_extension=".txt", max_train_steps=5,
                     output_name="first", seed="3")
    fake.trainer.gate.clear()
    first = tab.on_start(data)[tab.status]
    second = tab.on_start({**data, tab.form.fields["output_name"]: "second"})[tab.status]
    assert "Run #1 (first) queued" in first and "1 run(s) ahead" in second
    fake.trainer.gate.set()
    manager = fake.training()
    assert wait_ended(manager, 2).status == "finished" and not fake.trainer.overlapped
    shown = tab.on_poll("")
    assert "run #2" in shown[tab.progress] and "step 5/5" in shown[tab.progress]
    assert "<polyline" in shown[tab.chart] and "guard rollback" in shown[tab.chart]
    assert len(shown[tab.samples]) == 1 and "second.safetensors" in shown[tab.result]
    assert "in the Generate tab's LoRA browser (Refresh)" in shown[tab.result]
    assert tab.on_poll(shown[tab.seen])[tab.samples] == gr.update()  # images are sent only when new
    assert "second" in fake.library.names()  # the library was rescanned when the run ended
    assert tab.form.last_used()["output_name"] == "second"
    with gr.Blocks():  # the app restarted: the form comes back with the values last used
        again = TrainTab(fake)
        again.build()
    assert again.form.fields["output_name"].value == "second" and again.form.fields["max_train_steps"].value == 5


def test_stop_and_resume_from_the_tab(app, fake, tmp_path):
    tab = app.tabs["train"]
    fake.trainer.step_seconds = 0.05
    data = form_data(tab, train_data_dir=str(_kohya_folder(tmp_path)), caption_extension=".txt",
                     max_train_steps=40, output_name="long")
    tab.on_start(data)
    manager = fake.training()
    deadline = time.monotonic() + 30
    while manager.get(1).step < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "stopping" in tab.on_stop()[tab.status]
    stopped = wait_ended(manager, 1)
    assert stopped.status == "stopped" and stopped.resumable
    assert "press Resume" in tab.on_poll("")[tab.result]
    fake.trainer.step_seconds = 0.0
    out = tab.on_resume({**data, tab.resume_from: ""})
    assert "Run #2" in out[tab.status]
    resumed = wait_ended(manager, 2)
    assert resumed.status == "finished" and fake.trainer.calls[1].run.seed == stopped.seed


def test_load_and_save_toml(app, fake, tmp_path):
    tab = app.tabs["train"]
    folder = _kohya_folder(tmp_path)
    path = tmp_path / "saved.toml"
    out = tab.on_save({**form_data(tab, train_data_dir=str(folder), network_dim=8, caption_extension=".txt"),
                       tab.save_path: str(path)})
    assert "saved" in out[tab.status] and path.is_file()
    assert toml_config.load_config(path).network.network_dim == 8
    broken = tmp_path / "broken.toml"
    broken.write_text("network_dim = = 4\n", encoding="utf-8")
    out = tab.on_load({tab.load_path: str(broken), tab.dataset_path: "", tab.upload: None})
    assert set(out) == {tab.status} and "not valid TOML" in out[tab.status] and "not changed" in out[tab.status]
    out = tab.on_load({tab.load_path: str(path), tab.dataset_path: "", tab.upload: None})
    assert out[tab.form.fields["network_dim"]]["value"] == 8
    assert out[tab.form.fields["train_data_dir"]]["value"] == str(folder)


def test_dataset_preview_and_estimate(app, fake, tmp_path):
    tab = app.tabs["train"]
    folder = _kohya_folder(tmp_path)
    (folder / "5_sks" / "broken.png").write_bytes(b"no image")
    (folder / "5_sks" / "img0.txt").write_bytes(b"\xff\xfe bad")
    out = tab.on_preview(form_data(tab, train_data_dir=str(folder), caption_extension=".txt"))
    assert "2 problem(s)" in out[tab.preview] and "broken.png" in out[tab.preview] and "img0.txt" in out[tab.preview]
    (folder / "5_sks" / "broken.png").unlink()
    (folder / "5_sks" / "img0.txt").write_text("sks", encoding="utf-8")
    data = form_data(tab, train_data_dir=str(folder), caption_extension=".txt", max_train_steps=30)
    out = tab.on_preview(data)
    assert "64x64: 15" in out[tab.preview] and "Measure speed" in out[tab.preview]
    out = tab.on_measure(data)
    assert "s/step" in out[tab.preview] and "warm-up" in out[tab.preview]


def test_xy_tab_with_the_fake_host(app, fake):
    tab = app.tabs["xy"]
    data = {tab.lora: "style", tab.te: 1.0, tab.unet: 1.0, tab.lbw: "", tab.prompt: "a red circle",
            tab.negative: "", tab.sampler: "Euler", tab.steps: 4, tab.cfg: 7.0, tab.seed: 3, tab.width: 64,
            tab.height: 64}
    for axis, (label, values) in zip(tab.axes, [("LoRA TE strength", "0, 1"), ("LoRA U-Net strength", "0-1 [3]"),
                                                ("(none)", "")]):
        data[axis.kind], data[axis.values] = label, values
    assert "6 images (2 x 3)" in tab.on_estimate(data)[tab.status]
    out = tab.on_run(data, progress=lambda *a, **k: None)
    assert out[tab.grid].endswith(".png") and len(fake.requests) == 6
    assert fake.requests[1].prompt == "a red circle <lora:style:te=1:unet=0>"
    assert 'X/Y plot: "X: LoRA TE strength: 0, 1; Y: LoRA U-Net strength: 0, 0.5, 1"' in out[tab.infotext]
    out = tab.on_run({**data, tab.axes[0].values: "0, nope"}, progress=lambda *a, **k: None)
    assert "x_values" in out[tab.status] and len(fake.requests) == 6


def test_metadata_viewer_and_editor(app, fake):
    editor = app.tabs["tools"].metadata
    shown = editor.on_choose({editor.choice: "style"})
    assert "blocks touched" in shown[editor.details] and "sks" in shown[editor.details]
    assert "ss_network_dim" in shown[editor.details]
    saved = editor.on_save({editor.choice: "style", editor.title: "Style", editor.trigger: "pastel",
                            editor.description: "made in a test"})
    assert "saved" in saved[editor.status] and saved[editor.trigger] == "pastel"
    meta = load_file(fake.library.find("style").path).metadata
    assert meta["modelspec.title"] == "Style" and meta["modelspec.trigger_phrase"] == "pastel"
    assert fake.library.find("style").trigger_words == ("pastel",)
    assert "not found" in editor.on_choose({editor.choice: "gone"})[editor.status]


# ---------------------------------------------------------------------------------------------- the real engine


@pytest.fixture
def real_host(tmp_path):
    from lib_lora.host.standalone import StandaloneHost

    host = StandaloneHost(lora_dir=tmp_path / "loras", outputs_dir=tmp_path / "out")
    host.load_model("embedded")
    yield host
    host.close()


def test_the_uis_run_equals_the_clis_run_of_the_saved_toml(real_host, tmp_path):
    from lib_lora.cli import main as cli

    with gr.Blocks():
        tab = TrainTab(real_host)
        tab.build()
    data = form_data(tab, train_data_dir=str(_kohya_folder(tmp_path)), caption_extension=".txt", max_train_steps=4,
                     seed="11", output_name="ui", network_dim=2, network_alpha=2, learning_rate=1e-3)
    tab.on_start(data)
    view = wait_ended(real_host.training(), 1, timeout=300)
    assert view.status == "finished", view.error or view.log
    saved = tmp_path / "cli" / "run.toml"
    tab.on_save({**data, tab.save_path: str(saved)})
    assert cli(["train", "--config", str(saved), "--output_dir", str(tmp_path / "cli"), "--no-progress"]) == 0
    ui, cli_file = load_file(view.result_file), load_file(tmp_path / "cli" / "ui.safetensors")
    assert ui.tensors.keys() == cli_file.tensors.keys()
    assert all(torch.equal(ui.tensors[k], cli_file.tensors[k]) for k in ui.tensors), "same config, same seed"
    varying = {"ss_training_started_at", "ss_training_finished_at", "ss_session_id", "modelspec.date"}
    assert {k: v for k, v in ui.metadata.items() if k not in varying} == \
        {k: v for k, v in cli_file.metadata.items() if k not in varying}
    assert dataclasses.is_dataclass(view) and "ui" in real_host.lora_library().names()


def test_sample_dataset_button_fills_the_form_for_a_first_run(app, fake):
    from lib_lora.train.preview import preview_dataset
    from lib_lora.train.schema import config_from_form

    tab = app.tabs["train"]
    out = tab.on_sample_dataset()
    assert "wrote 12 images" in out[tab.status] and "trigger word 'sks'" in out[tab.status]
    folder = Path(out[tab.form.fields["train_data_dir"]]["value"])
    assert sorted(p.name for p in folder.iterdir()) == ["10_sks"] and len(list(folder.rglob("*.png"))) == 12
    values = {**tab.form.initial_values(), **{name: out[c]["value"] for name, c in tab.form.fields.items()
                                              if c in out}, PROMPTS_FIELD: out[tab.form.prompts]}
    preview = preview_dataset(config_from_form(tab.form.engine_values(values)))
    assert preview.ok and preview.samples_per_epoch == 120 and preview.total_steps == 150
    assert "sks" in (folder / "10_sks" / "000.txt").read_text()
    second = tab.on_sample_dataset()
    assert Path(second[tab.form.fields["train_data_dir"]]["value"]) != folder  # never overwrites


def test_tool_panels_run_the_ops_through_the_host(app, fake):
    from lib_lora.io import read_metadata
    from lib_lora.ui.tools_tab import TOOLS

    tools = app.tabs["tools"]
    assert set(tools.panels) == set(TOOLS)  # every tool's core is installed
    write_small_lora(fake.library.folder / "other.safetensors", seed=5)
    fake.library.refresh()
    resize = tools.panels["resize"]
    out = resize.on_run({resize.input: "style", resize.rank: 1, resize.method: "fixed", resize.param: None,
                         resize.output: "style-r1", resize.precision: "(same as input)", resize.force: False},
                        progress=lambda *a, **k: None)
    assert "wrote" in out[resize.status] and "rank 1" in out[resize.result], out
    assert fake.library.find("style-r1").rank == "1"  # in the LoRA folder, listed at once
    again = resize.on_run({resize.input: "style", resize.rank: 1, resize.method: "fixed", resize.param: None,
                           resize.output: "style-r1", resize.precision: "(same as input)", resize.force: False},
                          progress=lambda *a, **k: None)
    assert "**Error:**" in again[resize.status] and "exists" in again[resize.status]

    merge = tools.panels["merge_loras"]
    out = merge.on_run({merge.loras: "style:0.5\nother:1:0.5", merge.mode: "exact", merge.rank: 4,
                        merge.output: "both", merge.precision: "fp16", merge.force: False},
                       progress=lambda *a, **k: None)
    assert "wrote" in out[merge.status] and "lora_studio.operation" in read_metadata(fake.library.find("both").path)

    convert = tools.panels["convert"]
    out = convert.on_run({convert.input: "other", convert.to: "diffusers", convert.precision: "(same as input)",
                          convert.output: "other-diffusers", convert.force: False}, progress=lambda *a, **k: None)
    assert "wrote" in out[convert.status], out

    cancelled = []

    def stop_at_once(fraction, desc=None):
        merge._cancel.set()  # the Cancel button, pressed while the merge runs
        cancelled.append(desc)

    out = merge.on_run({merge.loras: "style\nother", merge.mode: "svd", merge.rank: 2, merge.output: "never",
                        merge.precision: "(same as input)", merge.force: False}, progress=stop_at_once)
    assert cancelled and "cancel" in out[merge.status].lower(), out
    assert not (fake.library.folder / "never.safetensors").exists()

    model = tools.panels["merge_model"]
    out = model.on_run({model.model: str(fake.library.folder / "nope.safetensors"), model.loras: "style",
                        model.output: str(fake.library.folder.parent / "m.safetensors"),
                        model.precision: "(same as input)", model.force: False}, progress=lambda *a, **k: None)
    assert "**Error:**" in out[model.status] and "nope.safetensors" in out[model.status]
    extract = tools.panels["extract"]
    out = extract.on_run({extract.base: "", extract.tuned: "", extract.dim: 4, extract.conv_dim: None,
                          extract.output: "x", extract.force: False}, progress=lambda *a, **k: None)
    assert "**Error:**" in out[extract.status]
