"""LoRA browser: the files of the host's LoRA folder (name, rank, algorithm, architecture, trigger words);
choosing one and pressing Insert adds `<lora:name:1>` (with the block-weight editor's `lbw=`, if asked) to
the prompt."""
from __future__ import annotations

import html

import gradio as gr

from lib_lora.errors import LibLoraError
from lib_lora.lora_library import LoraEntry
from lib_lora.ui.compat import message, update

COLUMNS = ("Name", "Rank", "Algorithm", "Arch", "Trigger words")


def _row(entry: LoraEntry) -> tuple[str, ...]:
    if entry.error:
        return (entry.display_name, "", "", "", f"unreadable: {entry.error}")
    arch = entry.arch.label if entry.arch else ""
    return (entry.display_name, entry.rank, entry.algorithm, arch, ", ".join(entry.trigger_words))


def entries_table(entries: list[LoraEntry], folder: str) -> str:
    """An HTML table of the library (escaped: names and tags are user data)."""
    if not entries:
        return f"<p>No LoRA files in <code>{html.escape(folder)}</code> (.safetensors, .pt, .ckpt).</p>"
    head = "".join(f"<th>{c}</th>" for c in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in _row(e)) + "</tr>" for e in entries)
    return f'<table class="lora-studio-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def entry_details(entry: LoraEntry) -> str:
    if entry.error:
        return message(f"{entry.path}: {entry.error}", "error")
    lines = [f"**{html.escape(entry.display_name)}** — `{html.escape(entry.path)}`",
             f"rank {entry.rank or '?'}, {entry.algorithm or '?'}, {entry.modules} modules, "
             f"{entry.arch.label if entry.arch else '?'} ({html.escape(entry.arch_reason)})"]
    if entry.trigger_words:
        lines.append("trigger words: " + html.escape(", ".join(entry.trigger_words)))
    return "\n\n".join(lines)


class LoraBrowser:
    """Inserts into the prompt box it is given; `wire(lbw=...)` names the block-weight editor's lbw box."""

    def __init__(self, host, prompt: gr.Textbox):
        self.host, self.prompt, self.lbw_source = host, prompt, None
        self.choice = self.refresh_button = self.details = self.strength = self.with_lbw = None
        self.insert_button = self.table = None

    def build(self) -> None:
        library = self.host.lora_library()
        entries = library.entries()
        with gr.Accordion("LoRA browser", open=True):
            with gr.Row():
                self.choice = gr.Dropdown(choices=[e.name for e in entries], value=None, label="LoRA",
                                          elem_id="lora_studio_lora_choice")
                self.refresh_button = gr.Button("Refresh", elem_id="lora_studio_lora_refresh")
            self.details = gr.Markdown("")
            with gr.Row():
                self.strength = gr.Slider(-1.0, 2.0, value=1.0, step=0.05, label="Strength")
                self.with_lbw = gr.Checkbox(value=False, label="with the block weights below")
                self.insert_button = gr.Button("Insert into prompt", elem_id="lora_studio_lora_insert")
            self.table = gr.HTML(entries_table(entries, str(library.folder)))

    def wire(self, lbw: gr.Textbox) -> None:
        self.lbw_source = lbw
        self.refresh_button.click(self.on_refresh, inputs={self.choice}, outputs=[self.choice, self.table])
        self.choice.change(self.on_choose, inputs={self.choice}, outputs=[self.details])
        self.insert_button.click(self.on_insert, inputs={self.choice, self.strength, self.with_lbw, self.prompt,
                                                         self.lbw_source}, outputs=[self.prompt, self.details])

    # ------------------------------------------------------------------------------------ handlers

    def on_refresh(self, data: dict | None = None) -> dict:
        library = self.host.lora_library()
        entries = library.refresh()
        names = [e.name for e in entries]
        keep = data.get(self.choice) if data else None
        return {self.choice: update(choices=names, value=keep if keep in names else None),
                self.table: entries_table(entries, str(library.folder))}

    def on_choose(self, data: dict) -> dict:
        name = data[self.choice]
        if not name:
            return {self.details: ""}
        try:
            return {self.details: entry_details(self.host.lora_library().find(name))}
        except LibLoraError as exc:
            return {self.details: message(str(exc), "error")}

    def on_insert(self, data: dict) -> dict:
        """Append the chosen LoRA's tag to the prompt."""
        name = data[self.choice]
        if not name:
            return {self.details: message("choose a LoRA first", "warning")}
        try:
            entry = self.host.lora_library().find(name)
        except LibLoraError as exc:
            return {self.details: message(str(exc), "error")}
        lbw = (data[self.lbw_source] or "").strip() if data[self.with_lbw] else ""
        tag = entry.prompt_tag(float(data[self.strength]), lbw or None)
        prompt = (data[self.prompt] or "").rstrip()
        return {self.prompt: f"{prompt} {tag}".strip()}
