"""Run inside a web UI's venv (gradio 3.41 / 4.40): build every tab on a recording host and drive one handler of
each, with the real core behind them (training form -> engine config -> run queue, X/Y plan -> grid PNG, metadata
editor -> file). Prints one JSON object with what came back; `tests/test_host_gradio.py` checks it.

    PYTHONPATH=. .host-venvs/a1111/bin/python tests/host_ui_check.py WORKDIR
"""
from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def _images(folder: Path, n: int = 3) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (64, 64), (40 * i, 100, 200)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text("sks, red square", encoding="utf-8")
    return folder.parent


def main(work: Path) -> dict:
    import gradio as gr

    from lib_lora.app import build_app
    from lib_lora.sd.pipeline import GenerationParams  # noqa: F401  (the host path imports it)
    from lib_lora.types import Arch
    from lib_lora.ui.train_form import PROMPTS_FIELD
    from tests.fake_host import FakeHost, write_small_lora

    write_small_lora(work / "loras" / "style.safetensors")
    host = FakeHost(Arch.SD1, work / "loras", work / "out")
    app = build_app(host)
    app.blocks.get_config_file()  # every component serialises in this gradio
    out: dict = {"gradio": gr.__version__, "tabs": sorted(app.tabs)}

    generate = app.tabs["generate"]
    s = generate.settings
    result = generate.on_generate({generate.prompt.prompt: "a cat <lora:style:0.5>", generate.prompt.negative: "",
                                   s.sampler: "Euler a", s.steps: 4, s.cfg: 7.0, s.seed: 3, s.width: 64, s.height: 64,
                                   s.batch: 1}, progress=lambda *a, **k: None)
    out["generate"] = result[generate.output.infotext]

    train = app.tabs["train"]
    initial = {**train.form.initial_values(), "train_data_dir": str(_images(work / "data" / "5_sks")),
               "caption_extension": ".txt", "max_train_steps": 4, "output_name": "hosted"}
    data = {c: initial.get(name) for name, c in train.form.fields.items()}
    data[train.form.prompts] = initial.get(PROMPTS_FIELD, "")
    bad = train.on_start({**data, train.form.fields["min_snr_gamma"]: "five"})
    out["train_bad_label"] = bad[train.form.fields["min_snr_gamma"]]["label"]
    out["train_start"] = train.on_start(data)[train.status]
    host.training().wait(1, timeout=120)
    polled = train.on_poll("")
    out["train_progress"] = polled[train.progress]
    out["train_chart_has_line"] = "<polyline" in polled[train.chart]
    out["train_result"] = polled[train.result]

    xy = app.tabs["xy"]
    inputs = {xy.lora: "style", xy.te: 1.0, xy.unet: 1.0, xy.lbw: "", xy.prompt: "a red circle", xy.negative: "",
              xy.sampler: "Euler", xy.steps: 4, xy.cfg: 7.0, xy.seed: 3, xy.width: 64, xy.height: 64}
    for axis, (label, values) in zip(xy.axes, [("LoRA TE strength", "0, 1"), ("LoRA U-Net strength", "0, 1"),
                                               ("(none)", "")]):
        inputs[axis.kind], inputs[axis.values] = label, values
    plotted = xy.on_run(inputs, progress=lambda *a, **k: None)
    out["xy_grid"] = plotted[xy.grid]
    out["xy_status"] = plotted[xy.status]

    tools = app.tabs["tools"].metadata
    tools.on_choose({tools.choice: "style"})
    saved = tools.on_save({tools.choice: "style", tools.title: "Hosted", tools.trigger: "pastel",
                           tools.description: ""})
    out["tools_status"] = saved[tools.status]
    out["tools_details"] = saved[tools.details]
    resize = app.tabs["tools"].panels["resize"]
    resized = resize.on_run({resize.input: "style", resize.rank: 1, resize.method: "fixed", resize.param: None,
                             resize.output: "style-r1", resize.precision: "fp16", resize.force: False},
                            progress=lambda *a, **k: None)
    out["tools_resize"] = resized[resize.status]
    host.training().close()
    return out


if __name__ == "__main__":
    started = time.time()
    report = main(Path(sys.argv[1]))
    report["seconds"] = round(time.time() - started, 1)
    print("HOST_UI_CHECK " + json.dumps(report))
