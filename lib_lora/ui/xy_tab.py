"""The X/Y plot tab: a LoRA with its base strengths, generation settings, up to three axes from the `AXES` registry
(values typed as lists or ranges), an estimate before running, Run / Cancel (after the current image), and the
grid with its labels, the single images and the grid file to download."""
from __future__ import annotations

import threading

import gradio as gr

from lib_lora.errors import LibLoraError
from lib_lora.sd.pipeline import GenerationParams
from lib_lora.train.runs import format_duration
from lib_lora.types import Arch
from lib_lora.ui.compat import message, update
from lib_lora.ui.generate_tab import as_int
from lib_lora.xy import AXES, AxisContext, AxisRequest, Cell, make_plan, run_plan
from lib_lora.xy.run import plot_infotext

NO_AXIS = "(none)"
DEFAULT_AXES = (("te", "0, 0.5, 1"), ("unet", "0, 0.5, 1"), ("", ""))


def xy_id(name: str) -> str:
    return f"lora_studio_xy_{name}"


class AxisRow:
    """One axis: kind (by label) and values."""

    def __init__(self, name: str, kind: str, values: str):
        self.name, self.kind_key, self.initial = name, kind, values
        self.kind = self.values = None

    def build(self) -> None:
        labels = [NO_AXIS] + [k.label for k in AXES.values()]
        value = AXES[self.kind_key].label if self.kind_key else NO_AXIS
        with gr.Row():
            self.kind = gr.Dropdown(choices=labels, value=value, label=f"{self.name.upper()} axis",
                                    elem_id=xy_id(f"{self.name}_type"), scale=1)
            self.values = gr.Textbox(value=self.initial, label=f"{self.name.upper()} values",
                                     placeholder=AXES[self.kind_key].example if self.kind_key else "",
                                     elem_id=xy_id(f"{self.name}_values"), scale=3)

    def request(self, data: dict) -> AxisRequest:
        label = data[self.kind]
        key = next((k for k, kind in AXES.items() if kind.label == label), "")
        return AxisRequest(key, data[self.values] or "")

    def on_kind(self, data: dict) -> dict:
        """Show the chosen kind's example as the placeholder."""
        key = self.request(data).kind
        return {self.values: update(placeholder=AXES[key].example if key else "")}


class XYTab:
    """The tab; `build()` inside a Blocks context."""

    def __init__(self, host):
        self.host = host
        self.axes = [AxisRow(n, k, v) for n, (k, v) in zip("xyz", DEFAULT_AXES)]
        self._cancel = threading.Event()
        self.lora = self.refresh = self.te = self.unet = self.lbw = self.prompt = self.negative = None
        self.sampler = self.steps = self.cfg = self.seed = self.width = self.height = None
        self.estimate_button = self.run_button = self.cancel_button = None
        self.status = self.grid = self.cells = self.file = self.infotext = None

    def build(self) -> None:
        info = self.host.model_info()
        size = info.resolution if info else 512
        samplers = self.host.samplers()
        names = self.host.lora_library().names()
        with gr.Row():
            self.lora = gr.Dropdown(choices=[""] + names, value=names[0] if names else "", elem_id=xy_id("lora"),
                                    label="LoRA plotted (its TE / U-Net strengths and block weights are the axes' "
                                          "defaults)", scale=3)
            self.refresh = gr.Button("Refresh", elem_id=xy_id("refresh"), scale=1)
            self.te = gr.Number(value=1.0, label="TE strength", elem_id=xy_id("te"), scale=1)
            self.unet = gr.Number(value=1.0, label="U-Net strength", elem_id=xy_id("unet"), scale=1)
            self.lbw = gr.Textbox(value="", label="lbw= (preset or list; empty: none)", scale=2)
        self.prompt = gr.Textbox(label="Prompt (may hold other <lora:...> tags)", lines=2, elem_id=xy_id("prompt"))
        self.negative = gr.Textbox(label="Negative prompt", lines=1, elem_id=xy_id("negative"))
        with gr.Row():
            self.sampler = gr.Dropdown(choices=samplers, value=samplers[0] if samplers else None, label="Sampler")
            self.steps = gr.Slider(1, 150, value=20, step=1, label="Steps", elem_id=xy_id("steps"))
            self.cfg = gr.Slider(1.0, 30.0, value=7.0, step=0.5, label="CFG scale")
            self.seed = gr.Number(value=-1, precision=0, label="Seed (-1: one random seed for the plot)",
                                  elem_id=xy_id("seed"))
            self.width = gr.Slider(64, 2048, value=size, step=8, label="Width")
            self.height = gr.Slider(64, 2048, value=size, step=8, label="Height")
        for axis in self.axes:
            axis.build()
        with gr.Row():
            self.estimate_button = gr.Button("Estimate", elem_id=xy_id("estimate"))
            self.run_button = gr.Button("Run plot", variant="primary", elem_id=xy_id("run"))
            self.cancel_button = gr.Button("Cancel (after the current image)", elem_id=xy_id("cancel"))
        self.status = gr.Markdown("", elem_id=xy_id("status"))
        self.grid = gr.Image(label="Grid", type="filepath", interactive=False, elem_id=xy_id("grid"))
        with gr.Row():
            self.cells = gr.Gallery(label="Single images", columns=6, height=300, elem_id=xy_id("cells"))
            self.file = gr.File(label="Grid PNG (with the plot's infotext)", file_count="multiple", interactive=False,
                                elem_id=xy_id("file"))
        self.infotext = gr.Textbox(label="Infotext of the grid", lines=3, interactive=False,
                                   elem_id=xy_id("infotext"))
        self.wire()

    def inputs(self) -> set:
        axes = {c for a in self.axes for c in (a.kind, a.values)}
        return {self.lora, self.te, self.unet, self.lbw, self.prompt, self.negative, self.sampler, self.steps,
                self.cfg, self.seed, self.width, self.height, *axes}

    def wire(self) -> None:
        self.refresh.click(self.on_refresh, inputs={self.lora}, outputs=[self.lora])
        for axis in self.axes:
            axis.kind.change(axis.on_kind, inputs={axis.kind}, outputs=[axis.values])
        self.estimate_button.click(self.on_estimate, inputs=self.inputs(), outputs=[self.status])
        self.run_button.click(self.on_run, inputs=self.inputs(),
                              outputs=[self.status, self.grid, self.cells, self.file, self.infotext])
        self.cancel_button.click(self.on_cancel, inputs=None, outputs=None, queue=False)

    # ------------------------------------------------------------------------------------ handlers

    def plan(self, data: dict):
        """The plot of the inputs (checked against the host's LoRAs, presets and samplers)."""
        params = GenerationParams(
            prompt=data[self.prompt] or "", negative_prompt=data[self.negative] or "", sampler=data[self.sampler],
            steps=as_int(data[self.steps], "steps"), cfg_scale=float(data[self.cfg]), seed=as_int(data[self.seed],
                                                                                                  "seed"),
            width=as_int(data[self.width], "width"), height=as_int(data[self.height], "height"))
        params.validate()
        base = Cell(params, data[self.lora] or None, float(data[self.te] or 0), float(data[self.unet] or 0),
                    (data[self.lbw] or "").strip() or None)
        info = self.host.model_info()
        ctx = AxisContext(self.host.lora_library(), info.arch if info else Arch.SD1, self.host.block_presets(),
                          self.host.samplers(), params.prompt, params.negative_prompt)
        return make_plan(base, [a.request(data) for a in self.axes], ctx)

    def on_refresh(self, data: dict) -> dict:
        names = [e.name for e in self.host.lora_library().refresh()]
        keep = data[self.lora] if data[self.lora] in names else ""
        return {self.lora: update(choices=[""] + names, value=keep)}

    def on_estimate(self, data: dict) -> dict:
        try:
            plan = self.plan(data)
            seconds = plan.estimate_seconds(self.host.seconds_per_step(plan.base.params))
        except LibLoraError as exc:
            return {self.status: message(str(exc), "error")}
        nx, ny, nz = plan.shape
        grids = f" in {nz} grids" if nz > 1 else ""
        return {self.status: message(f"{plan.count} images ({nx} x {ny}{grids}), about {format_duration(seconds)}")}

    def on_run(self, data: dict, progress=gr.Progress()) -> dict:  # noqa: B008 - gradio's progress idiom
        """Plan, generate every cell through the host, draw and save the grid(s)."""
        self._cancel.clear()
        try:
            plan = self.plan(data)
        except LibLoraError as exc:
            return {self.status: message(str(exc), "error")}
        result = run_plan(plan, self.host.generate_series, out_dir=self.host.outputs_dir() / "xy-grids",
                          progress=lambda f, d: progress(f, desc=d), should_stop=self._cancel.is_set)
        cells = [(path, f"{plan.x.labels[j.x]}" + (f" / {plan.y.labels[j.y]}" if plan.y else ""))
                 for j, path in zip(plan.jobs(), result.paths) if path]
        grid = str(result.grid_paths[0]) if result.grid_paths else None
        kind = "error" if result.error else "warning" if result.cancelled else "info"
        first = next((t for t in result.infotexts if t), "")
        return {self.status: message(result.summary(), kind), self.grid: grid, self.cells: cells,
                self.file: [str(p) for p in result.grid_paths] or None, self.infotext: plot_infotext(first, plan)}

    def on_cancel(self) -> None:
        self._cancel.set()
