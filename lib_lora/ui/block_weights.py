"""Block-weight editor: a preset dropdown and one slider per block id of the model's architecture, writing the
`lbw=` value users type in `<lora:name:1:lbw=...>`. Ids and presets come from `lib_lora.blocks`."""
from __future__ import annotations

import gradio as gr

from lib_lora import blocks
from lib_lora.blocks import BLOCK_IDS_26, BlockWeights
from lib_lora.errors import LibLoraError
from lib_lora.types import Arch
from lib_lora.ui.compat import update

DEFAULT_PRESET = "ALL"
SLIDER_RANGE = (-1.0, 2.0, 0.05)


def _column_of(block: str) -> str:
    return "IN" if block.startswith("IN") else "OUT" if block.startswith("OUT") else "BASE / MID"


class BlockWeightEditor:
    """Sliders exist for every id of the 26-id table (SDXL's 20 ids are a subset); those the loaded model's
    architecture lacks are hidden, so switching models only changes visibility."""

    def __init__(self, host):
        self.host = host
        self.preset: gr.Dropdown | None = None
        self.lbw: gr.Textbox | None = None
        self.sliders: dict[str, gr.Slider] = {}

    def arch(self) -> Arch:
        info = self.host.model_info()
        return info.arch if info else Arch.SD1

    def build(self) -> None:
        arch, presets = self.arch(), self.host.block_presets()
        ids = set(blocks.arch_block_ids(arch))
        start = self._resolve(DEFAULT_PRESET, arch, presets) if DEFAULT_PRESET in presets else BlockWeights.uniform()
        lo, hi, step = SLIDER_RANGE
        with gr.Accordion("Block weights (lbw)", open=False):
            with gr.Row():
                self.preset = gr.Dropdown(choices=list(presets), value=DEFAULT_PRESET if DEFAULT_PRESET in presets
                                          else None, label="Preset", elem_id="lora_studio_lbw_preset")
                self.lbw = gr.Textbox(value=DEFAULT_PRESET, label="lbw= value (inserted with a LoRA)",
                                      elem_id="lora_studio_lbw")
            with gr.Row():
                for column in ("BASE / MID", "IN", "OUT"):
                    with gr.Column(min_width=120):
                        for b in (b for b in BLOCK_IDS_26 if _column_of(b) == column):
                            self.sliders[b] = gr.Slider(lo, hi, value=start[b], step=step, label=b, visible=b in ids,
                                                        min_width=100)

    def wire(self) -> None:
        sliders = list(self.sliders.values())
        self.preset.change(self.on_preset, inputs={self.preset}, outputs=[*sliders, self.lbw])
        for slider in sliders:
            slider.change(self.on_slider, inputs={self.preset, *sliders}, outputs=[self.lbw])

    # ------------------------------------------------------------------------------------ handlers

    def _resolve(self, name: str, arch: Arch, presets) -> BlockWeights:
        return blocks.resolve(name, arch, presets)

    def on_preset(self, data: dict) -> dict:
        """Preset chosen: move the sliders to its values; the lbw value is the preset's name."""
        name = data[self.preset]
        if not name:
            return {}
        try:
            weights = self._resolve(name, self.arch(), self.host.block_presets())
        except LibLoraError as exc:
            return {self.lbw: f"# {exc}"}
        return {**{s: weights[b] for b, s in self.sliders.items()}, self.lbw: name}

    def on_slider(self, data: dict) -> dict:
        """A slider moved: the lbw value is the preset's name while the sliders still match it, else the list."""
        arch = self.arch()
        ids = blocks.arch_block_ids(arch)
        weights = BlockWeights.from_mapping({b: float(data[self.sliders[b]]) for b in ids}, "sliders")
        name = data[self.preset]
        presets = self.host.block_presets()
        if name in presets:
            try:
                preset = self._resolve(name, arch, presets)
            except LibLoraError:
                preset = None
            if preset is not None and all(abs(preset[b] - weights[b]) < 1e-6 for b in ids):
                return {self.lbw: name}
        return {self.lbw: blocks.format_weights(weights, arch)}

    def on_model_changed(self, data: dict | None = None) -> dict:
        """After a model switch: the new architecture's sliders and presets."""
        ids = set(blocks.arch_block_ids(self.arch()))
        presets = list(self.host.block_presets())
        value = DEFAULT_PRESET if DEFAULT_PRESET in presets else None
        out = {s: update(visible=b in ids) for b, s in self.sliders.items()}
        out[self.preset] = update(choices=presets, value=value)
        return out
