"""The `lib_lora.ui` tabs mounted in the web UI (`on_ui_tabs`): one top-level "LoRA Studio" tab holding every
registered tab that is not standalone-only (inside the web UI its own txt2img does what the Generate tab does),
built by the same classes as in the standalone app, over the web UI's `Host`."""
from __future__ import annotations

from typing import Any

ELEM_ID = "lora_studio_tab"
TITLE = "LoRA Studio"


def mounted_specs() -> list:
    from lib_lora.ui import TABS

    return [spec for spec in TABS.values() if not spec.standalone_only]


def build_tabs(host: Any) -> list[tuple[Any, str, str]]:
    """[(Blocks, title, elem_id)] for the web UI's `on_ui_tabs`; empty when no tab applies."""
    import gradio as gr

    specs = mounted_specs()
    if not specs:
        return []
    with gr.Blocks(analytics_enabled=False) as root, gr.Tabs(elem_id="lora_studio_tabs"):
        for spec in specs:
            with gr.Tab(spec.label, elem_id=f"lora_studio_{spec.key}"):
                spec.create(host).build()
    return [(root, TITLE, ELEM_ID)]
