"""The LoRA tools tab: the metadata viewer/editor of a LoRA file, and one panel per tool of the `TOOLS` registry
(merge into a model, merge LoRAs, resize, extract, convert; panels in `tool_panels`). A tool's panel appears when
its engine part (`lib_lora.ops.*`) is installed; each panel only turns its inputs into a request for the host."""
from __future__ import annotations

import html
import importlib
import importlib.util
import json
from dataclasses import dataclass

import gradio as gr

from lib_lora.errors import LibLoraError
from lib_lora.info import NetworkInfo, format_span
from lib_lora.ui.compat import message, update


@dataclass(frozen=True)
class ToolSpec:
    """A tool panel: its label, the engine module it needs, and where its panel class lives."""

    key: str
    label: str
    engine: str  # importable when the tool's core is installed
    module: str = ""
    factory: str = ""

    def available(self) -> bool:
        try:
            return importlib.util.find_spec(self.engine) is not None and bool(self.module)
        except ModuleNotFoundError:
            return False

    def create(self, host):
        return getattr(importlib.import_module(self.module), self.factory)(host)


TOOLS: dict[str, ToolSpec] = {}


def register_tool(spec: ToolSpec) -> ToolSpec:
    if spec.key in TOOLS:
        raise ValueError(f"tool {spec.key!r} registered twice")
    TOOLS[spec.key] = spec
    return spec


_PANELS = "lib_lora.ui.tool_panels"
for _spec in (ToolSpec("merge_model", "Merge LoRAs into a model", "lib_lora.ops.merge_model", _PANELS,
                       "MergeModelPanel"),
              ToolSpec("merge_loras", "Merge LoRAs", "lib_lora.ops.merge_loras", _PANELS, "MergeLorasPanel"),
              ToolSpec("resize", "Resize (change rank)", "lib_lora.ops.resize", _PANELS, "ResizePanel"),
              ToolSpec("extract", "Extract a LoRA from two models", "lib_lora.ops.extract", _PANELS, "ExtractPanel"),
              ToolSpec("convert", "Convert (key spellings, plain LoRA, precision)", "lib_lora.ops.convert", _PANELS,
                       "ConvertPanel")):
    register_tool(_spec)

_TRAINING_KEYS = ("ss_output_name", "ss_base_model_version", "ss_sd_model_name", "ss_network_module", "ss_network_dim",
                  "ss_network_alpha", "ss_network_args", "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr",
                  "ss_lr_scheduler", "ss_optimizer", "ss_num_train_images", "ss_num_epochs", "ss_steps",
                  "ss_max_train_steps", "ss_resolution", "ss_batch_size_per_device", "ss_clip_skip", "ss_seed",
                  "ss_mixed_precision", "ss_training_comment", "ss_training_started_at", "ss_training_finished_at")


def info_markdown(info: NetworkInfo) -> str:
    """Everything `python -m lib_lora info` shows, as Markdown (values escaped: metadata is user data)."""
    esc = html.escape
    meta = info.metadata
    lines = [f"**{esc(info.name)}** — `{esc(info.path)}`",
             f"- algorithm: {esc(', '.join(info.algorithms))}; rank {format_span(info.rank)}, "
             f"alpha {format_span(info.alpha)}",
             f"- architecture: {esc(info.arch)} ({esc(info.arch_reason)})",
             "- modules: " + esc(", ".join(f"{k} {v}" for k, v in info.modules.items())),
             f"- blocks touched: {esc(' '.join(info.blocks))}",
             f"- hashes: short `{info.short_hash or '-'}` (what the web UI shows), "
             f"computed `{info.computed_hash or '-'}`"
             + (f", stored `{esc(info.sshs_model_hash)}`" if info.sshs_model_hash else ""),
             f"- trigger words / top tags: {esc(', '.join(info.trigger_words)) or '-'}"]
    for key in ("modelspec.title", "modelspec.trigger_phrase", "modelspec.description"):
        if key in meta:
            lines.append(f"- {key}: {esc(meta[key])}")
    training = [(k, meta[k]) for k in _TRAINING_KEYS if k in meta]
    if training:
        lines.append("\n**Training settings**\n\n| key | value |\n|---|---|")
        lines += [f"| {k} | {esc(v)[:200]} |" for k, v in training]
    if info.tag_frequency:
        lines.append("\n**Tag frequency** (top tags per folder)\n")
        lines += [f"- {esc(folder)}: " + esc(", ".join(f"{t} ({n})" for t, n in tags.items()))
                  for folder, tags in info.tag_frequency.items()]
    if info.unmatched_keys:
        lines.append(f"\n**Unused keys** ({len(info.unmatched_keys)}): " + esc(", ".join(info.unmatched_keys[:10])))
    return "\n".join(lines)


class MetadataEditor:
    """Pick a LoRA of the library, read everything about it, edit title / trigger words / description."""

    def __init__(self, host):
        self.host = host
        self.choice = self.refresh = self.details = self.raw = None
        self.title = self.trigger = self.description = self.save = self.status = None

    def build(self) -> None:
        names = self.host.lora_library().names()
        with gr.Row():
            self.choice = gr.Dropdown(choices=names, value=None, label="LoRA file", elem_id="lora_studio_meta_choice",
                                      scale=4)
            self.refresh = gr.Button("Refresh", elem_id="lora_studio_meta_refresh", scale=1)
        with gr.Row():
            with gr.Column(scale=3):
                self.details = gr.Markdown("", elem_id="lora_studio_meta_details")
            with gr.Column(scale=2):
                self.title = gr.Textbox(label="Title (modelspec.title)", elem_id="lora_studio_meta_title")
                self.trigger = gr.Textbox(label="Trigger words (modelspec.trigger_phrase, comma-separated)",
                                          elem_id="lora_studio_meta_trigger")
                self.description = gr.Textbox(label="Description (modelspec.description)", lines=3,
                                              elem_id="lora_studio_meta_description")
                self.save = gr.Button("Save metadata (atomic; hashes recomputed)", elem_id="lora_studio_meta_save")
                self.status = gr.Markdown("", elem_id="lora_studio_meta_status")
        with gr.Accordion("All metadata (JSON)", open=False):
            self.raw = gr.JSON(value={}, elem_id="lora_studio_meta_json")

    def wire(self) -> None:
        shown = [self.details, self.raw, self.title, self.trigger, self.description, self.status]
        self.refresh.click(self.on_refresh, inputs={self.choice}, outputs=[self.choice])
        self.choice.change(self.on_choose, inputs={self.choice}, outputs=shown)
        self.save.click(self.on_save, inputs={self.choice, self.title, self.trigger, self.description}, outputs=shown)

    def on_refresh(self, data: dict) -> dict:
        names = [e.name for e in self.host.lora_library().refresh()]
        return {self.choice: update(choices=names, value=data[self.choice] if data[self.choice] in names else None)}

    def show(self, info: NetworkInfo, note: str = "") -> dict:
        meta = info.metadata
        return {self.details: info_markdown(info), self.raw: json.loads(info.to_json()),
                self.title: meta.get("modelspec.title", ""), self.trigger: meta.get("modelspec.trigger_phrase", ""),
                self.description: meta.get("modelspec.description", ""), self.status: note}

    def on_choose(self, data: dict) -> dict:
        name = data[self.choice]
        if not name:
            return {self.details: "", self.raw: {}, self.status: ""}
        try:
            return self.show(self.host.lora_info(name))
        except LibLoraError as exc:
            return {self.status: message(str(exc), "error")}

    def on_save(self, data: dict) -> dict:
        name = data[self.choice]
        if not name:
            return {self.status: message("choose a LoRA first", "warning")}
        changes = {"title": data[self.title], "trigger_words": data[self.trigger],
                   "description": data[self.description]}
        try:
            info = self.host.edit_lora_metadata(name, changes)
        except LibLoraError as exc:
            return {self.status: message(str(exc), "error")}
        return self.show(info, message(f"saved {info.path}; short hash {info.short_hash}"))


class ToolsTab:
    """The tab; `build()` inside a Blocks context."""

    def __init__(self, host):
        self.host = host
        self.metadata = MetadataEditor(host)
        self.panels: dict[str, object] = {}

    def build(self) -> None:
        with gr.Accordion("Metadata viewer / editor", open=True):
            self.metadata.build()
        for spec in TOOLS.values():
            if spec.available():
                with gr.Accordion(spec.label, open=False):
                    self.panels[spec.key] = spec.create(self.host)
                    self.panels[spec.key].build()
        missing = [s.label for s in TOOLS.values() if not s.available()]
        if missing:
            gr.Markdown("Not installed in this version: " + ", ".join(missing) + ".", elem_id="lora_studio_tools_note")
        self.metadata.wire()
