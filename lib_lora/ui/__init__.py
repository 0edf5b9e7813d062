"""Gradio UI, built against the `Host` protocol so the same tabs run standalone and inside the web UI.

Tabs come from the `TABS` registry (Generate, Training, X/Y plot, LoRA tools); each is a class
`Tab(host)` with `build()` that creates its components inside the current Blocks context and wires them.
Importing this package does not import gradio; building a tab does.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class TabSpec:
    """One tab: its label, and where its class lives (imported only when the tab is built)."""

    key: str
    label: str
    module: str
    factory: str
    standalone_only: bool = False  # e.g. Generate: inside the web UI, txt2img does this

    def create(self, host):
        return getattr(importlib.import_module(self.module), self.factory)(host)


TABS: dict[str, TabSpec] = {}


def register_tab(spec: TabSpec) -> TabSpec:
    """Add a tab (in display order). Raises ValueError for a duplicate key."""
    if spec.key in TABS:
        raise ValueError(f"tab {spec.key!r} registered twice")
    TABS[spec.key] = spec
    return spec


register_tab(TabSpec("generate", "Generate", "lib_lora.ui.generate_tab", "GenerateTab", standalone_only=True))
register_tab(TabSpec("train", "Training", "lib_lora.ui.train_tab", "TrainTab"))
register_tab(TabSpec("xy", "X/Y plot", "lib_lora.ui.xy_tab", "XYTab"))
register_tab(TabSpec("tools", "LoRA tools", "lib_lora.ui.tools_tab", "ToolsTab"))
