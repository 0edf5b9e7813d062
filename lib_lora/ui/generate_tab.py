"""The Generate tab (standalone): prompt in the web UI's LoRA syntax, sampler settings, LoRA browser,
block-weight editor, output gallery with infotext. Handlers: dict of inputs -> request -> host -> outputs."""
from __future__ import annotations

import math

import gradio as gr

from lib_lora.errors import ConfigError, LibLoraError
from lib_lora.sd.pipeline import SAMPLERS, GenerationParams
from lib_lora.ui.block_weights import BlockWeightEditor
from lib_lora.ui.compat import message
from lib_lora.ui.lora_browser import LoraBrowser

DEFAULT_SAMPLER = "Euler a"


def as_int(value, field: str) -> int:
    """A whole number from a Number/Slider value (they may arrive as floats)."""
    if value is None or isinstance(value, bool):
        raise ConfigError(field, value, "a whole number is required")
    number = float(value)
    if not math.isfinite(number) or number != int(number):
        raise ConfigError(field, value, "must be a whole number")
    return int(number)


class ModelSection:
    """Which model is loaded; switch to another checkpoint (or the embedded model)."""

    def __init__(self, host):
        self.host = host
        self.source = self.load_button = self.status = None

    def describe(self) -> str:
        info = self.host.model_info()
        return f"Model: {info.label}" if info else message(self.host.model_error() or "no model loaded", "error")

    def build(self) -> None:
        info = self.host.model_info()
        with gr.Row():
            self.source = gr.Textbox(value=info.source if info else "embedded", label="Model: checkpoint path "
                                     "(.safetensors) or 'embedded'", elem_id="lora_studio_model_source", scale=4)
            self.load_button = gr.Button("Load model", elem_id="lora_studio_model_load", scale=1)
        self.status = gr.Markdown(self.describe(), elem_id="lora_studio_model_status")

    def on_load(self, data: dict) -> dict:
        try:
            self.host.load_model(data[self.source])
        except LibLoraError as exc:
            kept = self.host.model_info()
            note = f" (still using {kept.label})" if kept else ""
            return {self.status: message(f"{exc}{note}", "error")}
        return {self.status: self.describe()}


class PromptSection:
    def __init__(self):
        self.prompt = self.negative = None

    def build(self) -> None:
        self.prompt = gr.Textbox(label="Prompt (<lora:name:1>, <lora:name:te:unet>, lbw=, start=, stop=)", lines=3,
                                 elem_id="lora_studio_prompt")
        self.negative = gr.Textbox(label="Negative prompt", lines=2, elem_id="lora_studio_negative")


class SettingsSection:
    """Sampler (from the pipeline's registry), steps, CFG, seed, size, batch."""

    def __init__(self, resolution: int):
        self.resolution = resolution
        self.sampler = self.steps = self.cfg = self.seed = self.width = self.height = self.batch = None

    def build(self) -> None:
        with gr.Row():
            self.sampler = gr.Dropdown(choices=list(SAMPLERS), value=DEFAULT_SAMPLER, label="Sampler",
                                       elem_id="lora_studio_sampler")
            self.steps = gr.Slider(1, 150, value=20, step=1, label="Steps", elem_id="lora_studio_steps")
            self.cfg = gr.Slider(1.0, 30.0, value=7.0, step=0.5, label="CFG scale")
        with gr.Row():
            self.width = gr.Slider(64, 2048, value=self.resolution, step=8, label="Width")
            self.height = gr.Slider(64, 2048, value=self.resolution, step=8, label="Height")
            self.batch = gr.Slider(1, 8, value=1, step=1, label="Batch size")
            self.seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)", elem_id="lora_studio_seed")

    def inputs(self) -> set:
        return {self.sampler, self.steps, self.cfg, self.seed, self.width, self.height, self.batch}

    def params(self, data: dict, prompt: str, negative: str) -> GenerationParams:
        """The request for these settings. Raises ConfigError naming the field."""
        params = GenerationParams(
            prompt=prompt or "", negative_prompt=negative or "", sampler=data[self.sampler],
            steps=as_int(data[self.steps], "steps"), cfg_scale=float(data[self.cfg]),
            seed=as_int(data[self.seed], "seed"), width=as_int(data[self.width], "width"),
            height=as_int(data[self.height], "height"), batch_size=as_int(data[self.batch], "batch_size"),
        )
        params.validate()
        return params

    def on_model_changed(self, data: dict | None = None, resolution: int | None = None) -> dict:
        return {self.width: resolution, self.height: resolution} if resolution else {}


class OutputSection:
    def __init__(self):
        self.gallery = self.infotext = self.status = None

    def build(self) -> None:
        self.gallery = gr.Gallery(label="Images", columns=2, height=480, elem_id="lora_studio_gallery")
        self.infotext = gr.Textbox(label="Generation parameters (last image)", lines=4, interactive=False,
                                   elem_id="lora_studio_infotext")
        self.status = gr.Markdown("", elem_id="lora_studio_status")

    def show(self, result) -> dict:
        saved = f"saved {len(result.paths)} image(s) to {result.paths[0].rsplit('/', 2)[0]}" if result.paths else ""
        return {self.gallery: result.paths or result.images, self.infotext: result.infotexts[-1],
                self.status: message(f"seeds {', '.join(map(str, result.seeds))}; {saved}")}

    def failed(self, exc: Exception) -> dict:
        return {self.status: message(str(exc), "error")}


class GenerateTab:
    """The tab; `build()` inside a Blocks context."""

    def __init__(self, host):
        self.host = host
        info = host.model_info()
        self.model = ModelSection(host)
        self.prompt = PromptSection()
        self.settings = SettingsSection(info.resolution if info else 512)
        self.output = OutputSection()
        self.block_weights = BlockWeightEditor(host)
        self.browser: LoraBrowser | None = None
        self.generate_button = self.interrupt_button = None

    def build(self) -> None:
        with gr.Row():
            with gr.Column(scale=3):
                self.model.build()
                self.prompt.build()
                self.settings.build()
                with gr.Row():
                    self.generate_button = gr.Button("Generate", variant="primary", elem_id="lora_studio_generate")
                    self.interrupt_button = gr.Button("Interrupt", elem_id="lora_studio_interrupt")
                self.browser = LoraBrowser(self.host, self.prompt.prompt)
                self.browser.build()
                self.block_weights.build()
            with gr.Column(scale=2):
                self.output.build()
        self.wire()

    def wire(self) -> None:
        outputs = [self.output.gallery, self.output.infotext, self.output.status]
        inputs = {self.prompt.prompt, self.prompt.negative, *self.settings.inputs()}
        self.generate_button.click(self.on_generate, inputs=inputs, outputs=outputs)
        # No outputs: the running generation reports the cancellation itself; a second writer of the status
        # box would race with it. Unqueued, so it runs while the generation holds the queue (gradio 3).
        self.interrupt_button.click(self.on_interrupt, inputs=None, outputs=None, queue=False)
        editor = [self.block_weights.preset, *self.block_weights.sliders.values()]
        self.model.load_button.click(self.model.on_load, inputs={self.model.source}, outputs=[self.model.status]) \
            .then(self.block_weights.on_model_changed, inputs=None, outputs=editor) \
            .then(self.on_model_changed, inputs=None, outputs=[self.settings.width, self.settings.height,
                                                               self.browser.choice, self.browser.table])
        self.block_weights.wire()
        self.browser.wire(lbw=self.block_weights.lbw)

    # ------------------------------------------------------------------------------------ handlers

    def on_generate(self, data: dict, progress=gr.Progress()) -> dict:  # noqa: B008 - gradio's progress idiom
        """Inputs -> GenerationParams -> host.generate -> gallery, infotext, status."""
        try:
            params = self.settings.params(data, data[self.prompt.prompt], data[self.prompt.negative])
            result = self.host.generate(params, progress=lambda s, t: progress(s / t, desc=f"step {s}/{t}"))
        except LibLoraError as exc:
            return self.output.failed(exc)
        return self.output.show(result)

    def on_interrupt(self) -> None:
        """Ask the host to stop after the current step."""
        self.host.interrupt()

    def on_model_changed(self) -> dict:
        info = self.host.model_info()
        return {**self.settings.on_model_changed(resolution=info.resolution if info else None),
                **self.browser.on_refresh()}
