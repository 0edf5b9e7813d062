"""The LoRA tools' panels (merge into a model, merge LoRAs, resize, extract, convert): each turns its inputs into a
`lib_lora.ops` request and hands it to the host (`run_operation`), with progress and cancel, and shows the result's
`info`. LoRA inputs are chosen from the host's LoRA folder, models from its checkpoint list; LoRA outputs go to the
LoRA folder (a bare file name) or any path.
"""
from __future__ import annotations

import html
import threading
from pathlib import Path

import gradio as gr

from lib_lora import ops
from lib_lora.errors import ConfigError, LibLoraError
from lib_lora.ops.common import DTYPES
from lib_lora.ops.convert import TARGETS
from lib_lora.ops.linalg import METHODS
from lib_lora.ui.compat import message
from lib_lora.ui.tools_tab import info_markdown

SAME = "(same as input)"


def tool_id(key: str, name: str) -> str:
    return f"lora_studio_tool_{key}_{name}"


class ToolPanel:
    """Shared parts: Run / Cancel, status, result; subclasses build their inputs and make the request."""

    key = ""
    operation = None  # the ops function

    def __init__(self, host):
        self.host = host
        self._cancel = threading.Event()
        self.run_button = self.cancel_button = self.status = self.result = None

    # ------------------------------------------------------------------------------------ helpers for inputs

    def lora_names(self) -> list[str]:
        return self.host.lora_library().names()

    def lora_path(self, name: str, field: str) -> str:
        """A library name (or a path) -> the file."""
        if not name:
            raise ConfigError(field, name, "choose a LoRA")
        if Path(name).suffix.lower() in (".safetensors", ".pt", ".ckpt") and Path(name).is_file():
            return name
        return self.host.lora_library().find(name).path

    def lora_inputs(self, text: str) -> tuple[ops.LoraInput, ...]:
        """One LoRA per line, as after `<lora:` in a prompt: `name[:te[:unet]][:lbw=...]`."""
        out = []
        for line in (text or "").splitlines():
            line = line.strip()
            if not line:
                continue
            name, sep, rest = line.partition(":")
            out.append(ops.LoraInput.parse(self.lora_path(name.strip(), "loras") + sep + rest))
        if not out:
            raise ConfigError("loras", text, "give at least one LoRA (one per line: name:strength)")
        return tuple(out)

    def lora_output(self, name: str) -> str:
        """A bare file name lands in the LoRA folder."""
        name = (name or "").strip()
        if not name:
            raise ConfigError("output", name, "give an output file name")
        path = Path(name if name.lower().endswith(".safetensors") else f"{name}.safetensors").expanduser()
        return str(path if path.is_absolute() or path.parent != Path(".") else self.host.lora_library().folder / path)

    @staticmethod
    def dtype(value: str) -> str | None:
        return None if value in (None, "", SAME) else value

    def dtype_dropdown(self, label: str = "Precision"):
        return gr.Dropdown(choices=[SAME, *DTYPES], value=SAME, label=label, elem_id=tool_id(self.key, "dtype"))

    # ------------------------------------------------------------------------------------ shared layout

    def build(self) -> None:
        self.build_inputs()
        with gr.Row():
            self.run_button = gr.Button("Run", variant="primary", elem_id=tool_id(self.key, "run"))
            self.cancel_button = gr.Button("Cancel", elem_id=tool_id(self.key, "cancel"))
        self.status = gr.Markdown("", elem_id=tool_id(self.key, "status"))
        self.result = gr.Markdown("", elem_id=tool_id(self.key, "result"))
        self.run_button.click(self.on_run, inputs=self.inputs(), outputs=[self.status, self.result])
        self.cancel_button.click(self._cancel.set, inputs=None, outputs=None, queue=False)

    def build_inputs(self) -> None:
        raise NotImplementedError

    def inputs(self) -> set:
        raise NotImplementedError

    def request(self, data: dict):
        raise NotImplementedError

    def describe(self, result) -> str:
        return info_markdown(result.info)

    def on_run(self, data: dict, progress=gr.Progress()) -> dict:  # noqa: B008 - gradio's progress idiom
        """Inputs -> request -> host.run_operation -> the result's info."""
        self._cancel.clear()
        try:
            request = self.request(data)
            result = self.host.run_operation(type(self).operation, request,
                                             progress=lambda d, t, m: progress(d / max(t, 1), desc=m),
                                             should_stop=self._cancel.is_set)
        except LibLoraError as exc:
            return {self.status: message(str(exc), "error"), self.result: ""}
        notes = "".join(f"\n\n- {html.escape(n)}" for n in getattr(result, "notes", []) or [])
        status = message(f"wrote {result.output} in {result.seconds:.1f} s") + notes
        return {self.status: status, self.result: self.describe(result)}


class MergeModelPanel(ToolPanel):
    key, operation = "merge_model", staticmethod(ops.merge_into_model)

    def build_inputs(self) -> None:
        models = self.host.checkpoints()
        self.model = gr.Dropdown(choices=models, value=None, allow_custom_value=True,
                                 elem_id=tool_id(self.key, "model"), label="Model checkpoint (.safetensors)")
        self.loras = gr.Textbox(lines=3, label="LoRAs, one per line: name:strength (or name:te:unet, :lbw=...)",
                                elem_id=tool_id(self.key, "loras"))
        with gr.Row():
            self.output = gr.Textbox(label="Output checkpoint (.safetensors path)",
                                     elem_id=tool_id(self.key, "output"))
            self.precision = self.dtype_dropdown()
            self.force = gr.Checkbox(value=False, label="Overwrite an existing file")

    def inputs(self) -> set:
        return {self.model, self.loras, self.output, self.precision, self.force}

    def request(self, data: dict):
        return ops.MergeModelRequest(data[self.model] or "", self.lora_inputs(data[self.loras]),
                                     (data[self.output] or "").strip(), dtype=self.dtype(data[self.precision]),
                                     force=bool(data[self.force]))

    def describe(self, result) -> str:
        applied = ", ".join(f"{html.escape(k)}: {v} modules" for k, v in result.applied.items())
        missing = "".join(f"\n- {html.escape(k)}: {len(v)} modules the model lacks" for k, v in
                          result.unmatched.items() if v)
        return f"**{html.escape(result.output)}** ({result.arch.label}, {result.tensors} tensors); merged {applied}" \
            + missing


class MergeLorasPanel(ToolPanel):
    key, operation = "merge_loras", staticmethod(ops.merge_loras)

    def build_inputs(self) -> None:
        self.loras = gr.Textbox(lines=3, label="LoRAs, one per line: name:strength (or name:te:unet, :lbw=...)",
                                elem_id=tool_id(self.key, "loras"))
        with gr.Row():
            self.mode = gr.Radio(choices=["exact", "svd"], value="exact", label="Mode (exact: stacked factors; "
                                 "svd: re-factored to one rank)", elem_id=tool_id(self.key, "mode"))
            self.rank = gr.Number(value=32, precision=0, label="Rank (svd)", elem_id=tool_id(self.key, "rank"))
        with gr.Row():
            self.output = gr.Textbox(label="Output (a name: in the LoRA folder)", elem_id=tool_id(self.key, "output"))
            self.precision = self.dtype_dropdown()
            self.force = gr.Checkbox(value=False, label="Overwrite an existing file")

    def inputs(self) -> set:
        return {self.loras, self.mode, self.rank, self.output, self.precision, self.force}

    def request(self, data: dict):
        svd = data[self.mode] == "svd"
        rule = ops.RankRule(int(data[self.rank] or 0)) if svd else None
        return ops.MergeLorasRequest(self.lora_inputs(data[self.loras]), self.lora_output(data[self.output]),
                                     mode=data[self.mode], rule=rule, dtype=self.dtype(data[self.precision]),
                                     force=bool(data[self.force]))


class ResizePanel(ToolPanel):
    key, operation = "resize", staticmethod(ops.resize)

    def build_inputs(self) -> None:
        with gr.Row():
            self.input = gr.Dropdown(choices=self.lora_names(), value=None, label="LoRA",
                                     elem_id=tool_id(self.key, "input"))
            self.rank = gr.Number(value=8, precision=0, label="New rank (the cap of a dynamic method)",
                                  elem_id=tool_id(self.key, "rank"))
            self.method = gr.Dropdown(choices=list(METHODS), value="fixed", label="Method",
                                      elem_id=tool_id(self.key, "method"))
            self.param = gr.Number(value=None, label="Method parameter (sv_ratio / sv_fro / sv_cumulative)",
                                   elem_id=tool_id(self.key, "param"))
        with gr.Row():
            self.output = gr.Textbox(label="Output (a name: in the LoRA folder)", elem_id=tool_id(self.key, "output"))
            self.precision = self.dtype_dropdown()
            self.force = gr.Checkbox(value=False, label="Overwrite an existing file")

    def inputs(self) -> set:
        return {self.input, self.rank, self.method, self.param, self.output, self.precision, self.force}

    def request(self, data: dict):
        param = data[self.param]
        rule = ops.RankRule(int(data[self.rank]) if data[self.rank] else None, method=data[self.method],
                            param=float(param) if param not in (None, "") else None)
        return ops.ResizeRequest(self.lora_path(data[self.input], "input"), self.lora_output(data[self.output]), rule,
                                 dtype=self.dtype(data[self.precision]), force=bool(data[self.force]))

    def describe(self, result) -> str:
        return f"mean Frobenius norm kept: {result.mean_fro_kept:.4f}\n\n" + info_markdown(result.info)


class ExtractPanel(ToolPanel):
    key, operation = "extract", staticmethod(ops.extract)

    def build_inputs(self) -> None:
        models = self.host.checkpoints()
        with gr.Row():
            self.base = gr.Dropdown(choices=models, value=None, allow_custom_value=True, label="Base model",
                                    elem_id=tool_id(self.key, "base"))
            self.tuned = gr.Dropdown(choices=models, value=None, allow_custom_value=True, label="Fine-tuned model",
                                     elem_id=tool_id(self.key, "tuned"))
        with gr.Row():
            self.dim = gr.Number(value=16, precision=0, label="Rank", elem_id=tool_id(self.key, "dim"))
            self.conv_dim = gr.Number(value=None, precision=0, label="Conv rank (empty: no conv modules)",
                                      elem_id=tool_id(self.key, "conv_dim"))
            self.output = gr.Textbox(label="Output (a name: in the LoRA folder)", elem_id=tool_id(self.key, "output"))
            self.force = gr.Checkbox(value=False, label="Overwrite an existing file")

    def inputs(self) -> set:
        return {self.base, self.tuned, self.dim, self.conv_dim, self.output, self.force}

    def request(self, data: dict):
        conv = data[self.conv_dim]
        return ops.ExtractRequest(data[self.base] or "", data[self.tuned] or "", self.lora_output(data[self.output]),
                                  dim=int(data[self.dim] or 0), conv_dim=int(conv) if conv else None,
                                  force=bool(data[self.force]))


class ConvertPanel(ToolPanel):
    key, operation = "convert", staticmethod(ops.convert)

    def build_inputs(self) -> None:
        with gr.Row():
            self.input = gr.Dropdown(choices=self.lora_names(), value=None, label="LoRA",
                                     elem_id=tool_id(self.key, "input"))
            self.to = gr.Dropdown(choices=list(TARGETS), value="kohya", label="To (key spelling / plain LoRA)",
                                  elem_id=tool_id(self.key, "to"))
            self.precision = self.dtype_dropdown()
        with gr.Row():
            self.output = gr.Textbox(label="Output (a name: in the LoRA folder)", elem_id=tool_id(self.key, "output"))
            self.force = gr.Checkbox(value=False, label="Overwrite an existing file")

    def inputs(self) -> set:
        return {self.input, self.to, self.precision, self.output, self.force}

    def request(self, data: dict):
        return ops.ConvertRequest(self.lora_path(data[self.input], "input"), self.lora_output(data[self.output]),
                                  to=data[self.to], dtype=self.dtype(data[self.precision]),
                                  force=bool(data[self.force]))
