"""THE block map: which block id (BASE, IN00..IN11, M00, OUT00..OUT11) a LoRA module belongs to,
the 12/17/20/26-value lists and named presets users type, and user preset files.

Block ids follow the web UI's lora-block-weight extension: BASE is every text-encoder module, INnn and
OUTnn are the compvis `input_blocks.nn` / `output_blocks.nn`, M00 the middle block. SD1/SD2 have
IN00..IN11 and OUT00..OUT11, SDXL IN00..IN08 and OUT00..OUT08. A weight list of 12/17/20/26 values
gives the blocks of that list (`BLOCK_LISTS`); blocks not in the list get 0, as in that extension.

Modules outside the numbered blocks (U-Net time/label embedding, the final norm and conv) are not
covered by lora-block-weight's table; here the embeddings count as BASE (as sd-scripts' SDXL block
index counts them with its slot 0) and the final layers as the last OUT block, so a list of zeros
always switches a whole LoRA off.
"""
from __future__ import annotations

import os
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from lib_lora.errors import BlockWeightError
from lib_lora.keys import kohya_to_path
from lib_lora.types import Arch, Component, component_of
from lib_lora.unet_layout import layout_for, parse_compvis, parse_diffusers

BLOCK_IDS_26 = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
BLOCK_LISTS: dict[int, tuple[str, ...]] = {
    26: BLOCK_IDS_26,
    17: ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
         "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"),
    12: ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"),
    20: ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9))),
}
LIST_LABELS = {17: "17 (SD1/SD2 LoRA)", 26: "26 (SD1/SD2 full)", 12: "12 (SDXL LoRA)", 20: "20 (SDXL full)"}


def arch_block_ids(arch: Arch) -> tuple[str, ...]:
    """Every block id the architecture has, in list order."""
    return BLOCK_LISTS[20] if arch is Arch.SDXL else BLOCK_IDS_26


def lora_list_length(arch: Arch) -> int:
    """The list length users type for a plain LoRA on this architecture (17, or 12 for SDXL)."""
    return 12 if arch is Arch.SDXL else 17


def block_of(name: str, arch: Arch) -> str:
    """Block id of a kohya module name.

    Example: block_of("lora_unet_down_blocks_1_attentions_0_proj_in", Arch.SD1) == "IN04"
    """
    comp = component_of(name)
    if comp is None:
        raise BlockWeightError(f"{name!r} is not a kohya module name")
    if comp is not Component.UNET:
        return "BASE"
    layout = layout_for(arch)
    _, path = kohya_to_path(name)
    loc = parse_compvis(path, layout) if arch is Arch.SDXL else parse_diffusers(path, layout)
    if loc is None:
        raise BlockWeightError(f"{name!r}: no {arch.label} U-Net block holds this module")
    return _block_of_loc(loc, layout)


def block_of_compvis(path: str, arch: Arch) -> str:
    """Block id of a U-Net module by its compvis/SGM path, as the web UI's own model names it.

    Example: block_of_compvis("input_blocks.4.1.proj_in", Arch.SD1) == "IN04"
    """
    layout = layout_for(arch)
    loc = parse_compvis(path, layout)
    if loc is None:
        raise BlockWeightError(f"U-Net module {path!r}: no {arch.label} U-Net block holds this module")
    return _block_of_loc(loc, layout)


def _block_of_loc(loc, layout) -> str:
    if loc.group == "input":
        return f"IN{loc.index:02d}"
    if loc.group == "output":
        return f"OUT{loc.index:02d}"
    if loc.group == "middle":
        return "M00"
    if loc.group == "out":
        return f"OUT{layout.n_output_blocks - 1:02d}"
    return "BASE"  # time_embed / label_emb


# ------------------------------------------------------------------------------------------ presets

_SD_PRESETS = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
}
# The same names for SDXL's 12 LoRA blocks: IN04/05 shallow, IN07/08 deep, OUT00-02 deep, OUT03-05 shallow.
_SDXL_PRESETS = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,1,1,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,1,1,1,1,1,1,0,0,0",
    "OUTD": "1,0,0,0,0,1,1,1,1,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,1,1,1",
    "OUTALL": "1,0,0,0,0,0,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
}


def builtin_presets(arch: Arch) -> dict[str, str]:
    return dict(_SDXL_PRESETS if arch is Arch.SDXL else _SD_PRESETS)


def parse_presets_file(text: str, source: str = "presets", lenient: bool = False) -> dict[str, str]:
    """User presets, one `NAME:w1,w2,...` per line; blank lines and lines starting with '#' are skipped.

    lenient: read as the lora-block-weight extension reads its own `lbwpresets.txt`: a line without ':', with a
    '#', or whose list is not 12/17/20/26 values (e.g. its 61-value Flux presets) is skipped, not an error.

    Raises:
        BlockWeightError: naming the file and line of a malformed preset (not with lenient).
    """
    presets = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#") or (lenient and "#" in line):
            continue
        name, sep, values = line.partition(":")
        if not sep or not name.strip():
            if lenient:
                continue
            raise BlockWeightError(f"{source}, line {number}: expected NAME:w1,w2,... but got {raw!r}")
        if lenient and values.count(",") + 1 not in BLOCK_LISTS:
            continue
        parse_weight_list(values, f"{source}, line {number} ({name.strip()})")
        presets[name.strip()] = values.strip()
    return presets


def load_presets_file(path: str | os.PathLike, lenient: bool = False) -> dict[str, str]:
    with open(path, encoding="utf-8-sig") as f:
        return parse_presets_file(f.read(), str(path), lenient)


# --------------------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class BlockWeights:
    """A weight for every block id of BLOCK_IDS_26 (ids an architecture lacks are simply unused)."""

    weights: tuple[float, ...]
    source: str = ""

    def __post_init__(self):
        if len(self.weights) != len(BLOCK_IDS_26):
            raise ValueError("BlockWeights holds exactly 26 weights")

    def __getitem__(self, block: str) -> float:
        return self.weights[BLOCK_IDS_26.index(block)]

    def as_dict(self, arch: Arch | None = None) -> dict[str, float]:
        ids = arch_block_ids(arch) if arch else BLOCK_IDS_26
        return {b: self[b] for b in ids}

    def is_uniform(self, value: float = 1.0) -> bool:
        return all(w == value for w in self.weights)

    @classmethod
    def uniform(cls, value: float = 1.0) -> BlockWeights:
        return cls((value,) * len(BLOCK_IDS_26), f"all {value:g}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, float], source: str = "") -> BlockWeights:
        unknown = [b for b in values if b not in BLOCK_IDS_26]
        if unknown:
            raise BlockWeightError(f"unknown block ids {unknown}; known: {', '.join(BLOCK_IDS_26)}")
        return cls(tuple(float(values.get(b, 0.0)) for b in BLOCK_IDS_26), source)


def parse_weight_list(text: str, source: str = "lbw", x: float = 1.0, rng: random.Random | None = None) -> list[float]:
    """Parse `w1,w2,...` of 12/17/20/26 values into floats.

    Besides numbers, lora-block-weight's special values are accepted: `R` (random in [0,1)), `U`
    (random in [-0.5,1.5)), rounded to 3 decimals, and `X`, `X+0.2`, `X-0.2` (the `x=` value plus an offset).
    """
    items = [t.strip() for t in text.split(",")]
    if len(items) not in BLOCK_LISTS:
        raise BlockWeightError(
            f"{source}: {len(items)} values given; a block-weight list has "
            + " or ".join(LIST_LABELS[n] for n in (17, 26, 12, 20))
            + " values"
        )
    rng = rng or random.Random()
    out = []
    for i, item in enumerate(items):
        if item == "R":
            out.append(round(rng.random(), 3))
        elif item == "U":
            out.append(round(rng.uniform(-0.5, 1.5), 3))
        elif item.startswith("X"):
            offset = item[1:].replace(" ", "")
            try:
                out.append(x + (float(offset) if offset else 0.0))
            except ValueError:
                raise BlockWeightError(f"{source}: value {i + 1} ({item!r}) is not X, X+n or X-n") from None
        else:
            try:
                out.append(float(item))
            except ValueError:
                raise BlockWeightError(f"{source}: value {i + 1} ({item!r}) is not a number") from None
    return out


def expand(values: list[float], source: str = "") -> BlockWeights:
    """Spread a 12/17/20/26 list over all 26 ids; ids not in the list get 0 (lora-block-weight's rule)."""
    ids = BLOCK_LISTS.get(len(values))
    if ids is None:
        raise BlockWeightError(f"{source or 'block weights'}: {len(values)} values; expected 12, 17, 20 or 26")
    table = dict(zip(ids, values))
    return BlockWeights(tuple(float(table.get(b, 0.0)) for b in BLOCK_IDS_26), source)


def resolve(spec: str, arch: Arch, user_presets: Mapping[str, str] | None = None, x: float = 1.0,
            rng: random.Random | None = None) -> BlockWeights:
    """Block weights from what a user typed after `lbw=`: a preset name or a list of values.

    User presets take precedence over the built-in ones of the same name.

    Raises:
        BlockWeightError: unknown preset (listing the known ones), wrong list length, non-number.
    """
    spec = spec.strip()
    presets = {**builtin_presets(arch), **(user_presets or {})}
    if "," not in spec:
        if spec not in presets:
            known = ", ".join(sorted(presets))
            raise BlockWeightError(f"unknown block-weight preset {spec!r}; known presets: {known}")
        return expand(parse_weight_list(presets[spec], f"preset {spec}", x, rng), spec)
    return expand(parse_weight_list(spec, "lbw", x, rng), spec)


def weights_by_module(names: Iterable[str], arch: Arch, weights: BlockWeights) -> dict[str, float]:
    """Block weight of every module name (each module gets exactly one weight)."""
    return {name: weights[block_of(name, arch)] for name in names}


def shortest_length(weights: BlockWeights, arch: Arch) -> int:
    """The shortest list length of `arch` that writes these weights exactly (ids outside the list are 0)."""
    for n in ((12, 20) if arch is Arch.SDXL else (17, 26)):
        if all(weights[b] == 0 for b in arch_block_ids(arch) if b not in BLOCK_LISTS[n]):
            return n
    return len(arch_block_ids(arch))


def format_weights(weights: BlockWeights, arch: Arch, length: int | None = None) -> str:
    """The `lbw=` string for these weights as a list of `length` values (default: all of the arch's ids)."""
    ids = BLOCK_LISTS[length] if length else arch_block_ids(arch)
    return ",".join(f"{weights[b]:g}" for b in ids)
