"""LoRA axes for the web UI's own X/Y/Z plot script (A1111 and Forge `scripts/xyz_grid.py`).

Each axis changes the first `<lora:...>` tag of the cell's prompt (the plot copies the processing object per
cell, so rewriting `p.prompt` is safe): text-encoder weight, U-Net weight, block weights (a preset name or an
`lbw` list), or the LoRA file (a prompt without a tag gets `<lora:FILE:1>`). The built-in LoRA and our block
hook then apply what the tag says, exactly as for a prompt typed by hand, and the cell's infotext has that tag.

Block-weight values are presets separated by commas (`ALL, INS, OUTS`); lists, which contain commas
themselves, are separated by ';' (`1,0,0,...;0,1,1,...`) or given in double quotes.
"""
from __future__ import annotations

import csv
from collections.abc import Callable
from typing import Any

from lib_lora.prompt_syntax import has_lora_tag, set_first_tag

PREFIX = "[LoRA Studio] "
LABELS = {
    "te": PREFIX + "LoRA text-encoder weight",
    "unet": PREFIX + "LoRA U-Net weight",
    "lbw": PREFIX + "LoRA block weights",
    "file": PREFIX + "LoRA file",
}


PENDING = "lora_studio_pending"  # options an axis set while the prompt had no tag yet (a file axis comes later)


def _rewrite(p: Any, **change: Any) -> None:
    pending = getattr(p, PENDING, None) or {}
    if "name" in change:
        change = {**pending, **change}
        setattr(p, PENDING, {})
    elif not any(has_lora_tag(text) for text in _prompts(p)):
        # The plot applies X before Y: a block-weight X with a file Y reaches a prompt without a tag first.
        # The adapter refuses the job if no file axis ever adds the tag.
        setattr(p, PENDING, {**pending, **change})
        return
    if isinstance(p.prompt, list):
        p.prompt = [set_first_tag(text, **change) for text in p.prompt]
    else:
        p.prompt = set_first_tag(p.prompt, **change)
    hr = getattr(p, "hr_prompt", "")
    if isinstance(hr, str) and hr:  # an empty hires prompt follows the main prompt by itself
        p.hr_prompt = set_first_tag(hr, **change)


def _prompts(p: Any) -> list[str]:
    return list(p.prompt) if isinstance(p.prompt, list) else [p.prompt]


def apply_te(p: Any, x: float, xs: list) -> None:
    _rewrite(p, te=f"{x:g}")


def apply_unet(p: Any, x: float, xs: list) -> None:
    _rewrite(p, unet=f"{x:g}")


def apply_lbw(p: Any, x: str, xs: list) -> None:
    _rewrite(p, lbw=x.strip())


def apply_file(p: Any, x: str, xs: list) -> None:
    _rewrite(p, name=x.strip())


def prepare_block_values(text: str) -> list[str]:
    """Split the values typed for the block-weight axis (see the module docstring)."""
    if ";" in text:
        return [v.strip() for v in text.split(";") if v.strip()]
    row = next(csv.reader([text], skipinitialspace=True), [])
    return [v.strip() for v in row if v.strip()]


def _label(short: str) -> Callable[[Any, Any, Any], str]:
    def format_value(p: Any, opt: Any, x: Any) -> str:
        return f"{short} {x:g}" if isinstance(x, float) else f"{short} {x}"

    return format_value


def make_axes(xyz: Any, lora_names: Callable[[], list[str]]) -> list:
    """The four AxisOptions, built with the plot module's own AxisOption class."""
    axis = xyz.AxisOption
    return [
        axis(LABELS["te"], float, apply_te, format_value=_label("TE")),
        axis(LABELS["unet"], float, apply_unet, format_value=_label("U-Net")),
        axis(LABELS["lbw"], str, apply_lbw, format_value=_label("lbw"), prepare=prepare_block_values),
        axis(LABELS["file"], str, apply_file, format_value=lambda p, opt, x: x, choices=lora_names),
    ]


def add_axes(xyz: Any, lora_names: Callable[[], list[str]]) -> int:
    """Append our axes to the plot's list unless there already (the UI can be rebuilt); returns how many."""
    present = {o.label for o in xyz.axis_options}
    new = [a for a in make_axes(xyz, lora_names) if a.label not in present]
    xyz.axis_options.extend(new)
    return len(new)
