"""X/Y plot axis kinds: a registry. Each kind types its values, checks them against what the host has (LoRA files,
block-weight presets, samplers) and sets them on a `Cell`, the description of one image.

The UI's axis dropdowns list `AXES`; a new kind is one `register_axis(AxisKind(...))`.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from lib_lora import blocks
from lib_lora.errors import ConfigError, LibLoraError
from lib_lora.lora_library import LoraLibrary
from lib_lora.sd.pipeline import MAX_SEED, GenerationParams
from lib_lora.sd.samplers import SAMPLERS
from lib_lora.types import Arch
from lib_lora.xy.values import format_value


@dataclass(frozen=True)
class Cell:
    """One image of a plot: the generation settings, and the plotted LoRA with its strengths and block weights.

    `params.prompt` is the prompt as typed (it may hold other LoRA tags); the plotted LoRA's tag is added by
    `request()`, so TE and U-Net strengths stay separate values an axis can set.
    """

    params: GenerationParams
    lora: str | None = None
    te: float = 1.0
    unet: float = 1.0
    lbw: str | None = None

    def tag(self) -> str:
        if not self.lora:
            return ""
        lbw = f":lbw={self.lbw}" if self.lbw else ""
        return f"<lora:{self.lora}:te={self.te:g}:unet={self.unet:g}{lbw}>"

    def request(self) -> GenerationParams:
        """The generation request of this cell (the LoRA tag appended to the prompt)."""
        tag = self.tag()
        return replace(self.params, prompt=f"{self.params.prompt} {tag}".strip()) if tag else self.params


@dataclass(frozen=True)
class AxisContext:
    """What values are checked against: the host's LoRA folder, the model's architecture, presets, samplers."""

    library: LoraLibrary
    arch: Arch = Arch.SD1
    presets: Mapping[str, str] = field(default_factory=dict)
    samplers: Sequence[str] = field(default_factory=lambda: tuple(SAMPLERS))
    prompt: str = ""
    negative_prompt: str = ""


def _same(values: list, ctx: AxisContext, field_name: str) -> list:
    return values


def _plain_label(value: Any, ctx: AxisContext) -> str:
    return format_value(value)


@dataclass(frozen=True)
class AxisKind:
    """One kind of axis.

    apply: set a value on a cell (given the axis's whole value list: Prompt S/R searches for the first).
    check: validate (and possibly expand) the typed values, raising ConfigError(field, value, reason).
    label_of: a value's label in the grid. weights_only: cells that differ only along this axis need only a
    re-patch of the LoRA weights (the model and prompt encodings are unchanged).
    needs_lora: the axis sets something of the plotted LoRA, so a LoRA must be chosen.
    """

    key: str
    label: str
    value_type: str
    apply: Callable[[Cell, Any, Sequence], Cell]
    check: Callable[[list, AxisContext, str], list] = _same
    label_of: Callable[[Any, AxisContext], str] = _plain_label
    weights_only: bool = False
    needs_lora: bool = False
    example: str = ""


AXES: dict[str, AxisKind] = {}


def register_axis(kind: AxisKind) -> AxisKind:
    """Add an axis kind (in display order). Raises ValueError for a duplicate key."""
    if kind.key in AXES:
        raise ValueError(f"axis kind {kind.key!r} registered twice")
    AXES[kind.key] = kind
    return kind


def get_axis(key: str, field_name: str = "axis") -> AxisKind:
    if key not in AXES:
        raise ConfigError(field_name, key, f"unknown axis; known: {', '.join(AXES)}")
    return AXES[key]


# ---------------------------------------------------------------------------------------------- checks


def _check_strengths(values: list, ctx: AxisContext, field_name: str) -> list:
    for v in values:
        if abs(v) > 100:
            raise ConfigError(field_name, v, "a LoRA strength beyond +-100 is surely a typo")
    return values


def _check_blocks(values: list, ctx: AxisContext, field_name: str) -> list:
    for v in values:
        try:
            blocks.resolve(v, ctx.arch, ctx.presets)
        except LibLoraError as exc:
            raise ConfigError(field_name, v, str(exc)) from None
    return values


_EPOCH = re.compile(r"(\d+)$")


def _run_order(name: str, prefix: str) -> tuple[int, int]:
    # `name-000002` before `name-000010`, the final file (no number) last
    rest = name[len(prefix):]
    match = _EPOCH.search(rest)
    return (0, int(match.group(1))) if match else (1, 0)


def _check_loras(values: list, ctx: AxisContext, field_name: str) -> list:
    """Names must exist; `NAME*` expands to every file whose name starts with NAME (the epoch files of a run)."""
    out: list[str] = []
    for value in values:
        if value.endswith("*"):
            prefix = value[:-1]
            found = sorted((n for n in ctx.library.names() if n.startswith(prefix)),
                           key=lambda n: _run_order(n, prefix))
            if not found:
                raise ConfigError(field_name, value,
                                  f"no LoRA file name starts with {prefix!r} in {ctx.library.folder}")
            out += found
            continue
        try:
            out.append(ctx.library.find(value).name)
        except LibLoraError as exc:
            raise ConfigError(field_name, value, str(exc)) from None
    return out


def _lora_label(value: str, ctx: AxisContext) -> str:
    try:
        words = ctx.library.find(value).trigger_words[:3]
    except LibLoraError:
        words = ()
    return f"{value} ({', '.join(words)})" if words else value


def _check_seeds(values: list, ctx: AxisContext, field_name: str) -> list:
    for v in values:
        if not -1 <= v <= MAX_SEED:
            raise ConfigError(field_name, v, f"a seed is 0..{MAX_SEED} (or -1 for random)")
    return values


def _check_sr(values: list, ctx: AxisContext, field_name: str) -> list:
    search = values[0]
    if search not in ctx.prompt and search not in ctx.negative_prompt:
        raise ConfigError(field_name, search, "Prompt S/R: the first value is searched for, and the prompt does "
                          "not contain it")
    return values


def _check_cfg(values: list, ctx: AxisContext, field_name: str) -> list:
    for v in values:
        if v < 0:
            raise ConfigError(field_name, v, "CFG scale must be >= 0")
    return values


def _check_steps(values: list, ctx: AxisContext, field_name: str) -> list:
    for v in values:
        if not 1 <= v <= 1000:
            raise ConfigError(field_name, v, "steps must be 1..1000")
    return values


def _check_samplers(values: list, ctx: AxisContext, field_name: str) -> list:
    known = {s.lower(): s for s in ctx.samplers}
    out = []
    for v in values:
        if v.lower() not in known:
            raise ConfigError(field_name, v, f"unknown sampler; known: {', '.join(ctx.samplers)}")
        out.append(known[v.lower()])
    return out


# ---------------------------------------------------------------------------------------------- setters


def _set_params(cell: Cell, **changes) -> Cell:
    return replace(cell, params=replace(cell.params, **changes))


def _te(c: Cell, v: float, vs: Sequence) -> Cell:
    return replace(c, te=float(v))


def _unet(c: Cell, v: float, vs: Sequence) -> Cell:
    return replace(c, unet=float(v))


def _both(c: Cell, v: float, vs: Sequence) -> Cell:
    return replace(c, te=float(v), unet=float(v))


def _lbw(c: Cell, v: str, vs: Sequence) -> Cell:
    return replace(c, lbw=v)


def _lora(c: Cell, v: str, vs: Sequence) -> Cell:
    return replace(c, lora=v)


def _sr(c: Cell, v: str, vs: Sequence) -> Cell:
    return replace_in_prompts(c, vs[0], v)


def _param(name: str, cast: Callable[[Any], Any]) -> Callable[[Cell, Any, Sequence], Cell]:
    def apply(c: Cell, v: Any, vs: Sequence) -> Cell:
        return _set_params(c, **{name: cast(v)})

    return apply


for _kind in (
    AxisKind("te", "LoRA TE strength", "float", _te, _check_strengths, weights_only=True, needs_lora=True,
             example="0, 0.5, 1"),
    AxisKind("unet", "LoRA U-Net strength", "float", _unet, _check_strengths, weights_only=True, needs_lora=True,
             example="0-1 [3]"),
    AxisKind("strength", "LoRA strength (TE and U-Net)", "float", _both, _check_strengths, weights_only=True,
             needs_lora=True, example="0-1 (+0.25)"),
    AxisKind("lbw", "LoRA block weights (preset or lbw list)", "str", _lbw, _check_blocks, weights_only=True,
             needs_lora=True, example='ALL, INS, OUTS, "1,0,0,0,0,0,0,0,1,1,1,1"'),
    AxisKind("lora", "LoRA file", "str", _lora, _check_loras, _lora_label,
             example="mystyle-000001, mystyle   or   mystyle*   (every epoch file of a run)"),
    AxisKind("seed", "Seed", "int", _param("seed", int), _check_seeds, example="1-4"),
    AxisKind("prompt_sr", "Prompt S/R", "str", _sr, _check_sr, example="red, blue, green"),
    AxisKind("cfg", "CFG scale", "float", _param("cfg_scale", float), _check_cfg, example="3-9 (+3)"),
    AxisKind("steps", "Steps", "int", _param("steps", int), _check_steps, example="10, 20, 30"),
    AxisKind("sampler", "Sampler", "str", _param("sampler", str), _check_samplers, example="Euler a, DPM++ 2M"),
):
    register_axis(_kind)


def replace_in_prompts(cell: Cell, search: str, value: str) -> Cell:
    """Prompt S/R: every occurrence of `search` in the prompt and negative prompt replaced by `value`."""
    p = cell.params
    return _set_params(cell, prompt=p.prompt.replace(search, value),
                       negative_prompt=p.negative_prompt.replace(search, value))
