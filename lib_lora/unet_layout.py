"""U-Net module locations in the two layouts we meet, and the arithmetic between them.

diffusers names blocks `down_blocks.i.resnets.j`, `mid_block.attentions.0`, `up_blocks.i.upsamplers.0`;
the LDM/compvis code the web UI runs (and SGM for SDXL) names the same modules
`input_blocks.N.k`, `middle_block.k`, `output_blocks.N.k`. A location is parsed from either spelling
into one `UNetLoc` record and rendered into the other, so no name is ever converted by chained
string replacement. The compvis index N is also what block ids (IN00..OUT11) count.

Example (SD1, layers_per_block=2):
    down_blocks.1.attentions.0.proj_in  <->  input_blocks.4.1.proj_in
    down_blocks.0.downsamplers.0.conv   <->  input_blocks.3.0.op
    up_blocks.0.upsamplers.0.conv       <->  output_blocks.2.1.conv
    up_blocks.1.resnets.2.conv1         <->  output_blocks.5.0.in_layers.2
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from lib_lora.types import Arch

# resnet children: diffusers name -> compvis name
RESNET_CHILDREN = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
RESNET_CHILDREN_REV = {v: k for k, v in RESNET_CHILDREN.items()}

# top-level modules outside the numbered blocks: diffusers path -> (compvis group, compvis path)
TOP_LEVEL = {
    "conv_in": ("input", "input_blocks.0.0"),
    "time_embedding.linear_1": ("time_embed", "time_embed.0"),
    "time_embedding.linear_2": ("time_embed", "time_embed.2"),
    "add_embedding.linear_1": ("label_emb", "label_emb.0.0"),
    "add_embedding.linear_2": ("label_emb", "label_emb.0.2"),
    "conv_norm_out": ("out", "out.0"),
    "conv_out": ("out", "out.2"),
}
TOP_LEVEL_REV = {v[1]: k for k, v in TOP_LEVEL.items()}


@dataclass(frozen=True)
class UNetLayout:
    """The structure that decides the arithmetic: resnets per down block, which blocks have attention."""

    layers_per_block: int
    down_has_attn: tuple[bool, ...]
    up_has_attn: tuple[bool, ...]

    @property
    def stride(self) -> int:
        return self.layers_per_block + 1

    @property
    def n_input_blocks(self) -> int:
        return self.stride * len(self.down_has_attn)

    @property
    def n_output_blocks(self) -> int:
        return self.stride * len(self.up_has_attn)


SD_LAYOUT = UNetLayout(2, (True, True, True, False), (False, True, True, True))
SDXL_LAYOUT = UNetLayout(2, (False, True, True), (True, True, False))


def layout_for(arch: Arch) -> UNetLayout:
    return SDXL_LAYOUT if arch is Arch.SDXL else SD_LAYOUT


@dataclass(frozen=True)
class UNetLoc:
    """Where a module sits in the U-Net, independent of spelling.

    group: 'input' | 'middle' | 'output' | 'time_embed' | 'label_emb' | 'out'
    index: compvis block number (input_blocks.N / output_blocks.N; 0 for the middle block and top level)
    part:  'resnet' | 'attention' | 'downsampler' | 'upsampler' | 'top'
    slot:  which resnet of the middle block (0 or 1); 0 elsewhere
    child: the path below the part in diffusers spelling (resnet 'conv1', sampler 'conv');
           for 'top' the whole diffusers path (e.g. 'time_embedding.linear_1')
    """

    group: str
    index: int
    part: str
    slot: int
    child: str


_DIFF_BLOCK = re.compile(
    r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.+))?$"
)
_DIFF_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.+))?$")
_CV_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)(?:\.(.+))?$")
_CV_MID = re.compile(r"^middle_block\.(\d+)(?:\.(.+))?$")


def _split_head(path: str, heads) -> tuple[str, str] | None:
    """(head, tail) when `path` is `head` or starts with `head.`, for the first matching head."""
    for head in heads:
        if path == head or path.startswith(head + "."):
            return head, path[len(head) + 1 :]
    return None


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _rename_head(path: str, table: dict[str, str]) -> str | None:
    found = _split_head(path, table)
    return None if found is None else _join(table[found[0]], found[1])


def parse_diffusers(path: str, layout: UNetLayout) -> UNetLoc | None:
    """Locate a diffusers U-Net module path; None for paths outside the known structure."""
    top = _split_head(path, TOP_LEVEL)
    if top:
        return UNetLoc(TOP_LEVEL[top[0]][0], 0, "top", 0, path)
    s = layout.stride
    m = _DIFF_BLOCK.match(path)
    if m:
        kind, i, part, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5) or ""
        down = kind == "down_blocks"
        if i >= len(layout.down_has_attn if down else layout.up_has_attn):
            return None
        if part in ("downsamplers", "upsamplers"):
            if j != 0 or (part == "downsamplers") != down:
                return None
            index = s * (i + 1) if down else s * i + layout.layers_per_block
            return UNetLoc("input" if down else "output", index, part[:-1], 0, rest)
        if j >= (layout.layers_per_block if down else s):
            return None
        index = 1 + s * i + j if down else s * i + j
        return UNetLoc("input" if down else "output", index, part[:-1], 0, rest)
    m = _DIFF_MID.match(path)
    if m:
        part, j, rest = m.group(1), int(m.group(2)), m.group(3) or ""
        return UNetLoc("middle", 0, part[:-1], j, rest)
    return None


def to_compvis(loc: UNetLoc, layout: UNetLayout) -> str:
    """Render a location in compvis/SGM spelling."""
    if loc.part == "top":
        return _rename_head(loc.child, {k: v[1] for k, v in TOP_LEVEL.items()}) or loc.child
    if loc.part == "resnet":
        child = _rename_head(loc.child, RESNET_CHILDREN) if loc.child else ""
        child = loc.child if child is None else child
    else:
        child = loc.child
    if loc.group == "middle":
        sub = 1 if loc.part == "attention" else 2 * loc.slot
        return _join(f"middle_block.{sub}", child)
    block = "input_blocks" if loc.group == "input" else "output_blocks"
    if loc.part == "downsampler":
        return _join(f"{block}.{loc.index}.0", _rename_head(child, {"conv": "op"}) or child)
    if loc.part == "upsampler":
        slot = 2 if layout.up_has_attn[loc.index // layout.stride] else 1
        return _join(f"{block}.{loc.index}.{slot}", child)
    return _join(f"{block}.{loc.index}.{0 if loc.part == 'resnet' else 1}", child)


def parse_compvis(path: str, layout: UNetLayout) -> UNetLoc | None:
    """Locate a compvis/SGM U-Net module path; None for paths outside the known structure."""
    top = _split_head(path, TOP_LEVEL_REV)
    if top:
        diff = _join(TOP_LEVEL_REV[top[0]], top[1])
        return UNetLoc(TOP_LEVEL[TOP_LEVEL_REV[top[0]]][0], 0, "top", 0, diff)
    s = layout.stride
    m = _CV_BLOCK.match(path)
    if m:
        block, n, k, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4) or ""
        if block == "input_blocks":
            if n == 0 or n >= layout.n_input_blocks:
                return None
            i, j = divmod(n - 1, s)
            if j == layout.layers_per_block:
                child = _rename_head(rest, {"op": "conv"})
                return None if k != 0 or child is None else UNetLoc("input", n, "downsampler", 0, child)
            return _resnet_or_attention("input", n, k, rest, layout.down_has_attn[i])
        if n >= layout.n_output_blocks:
            return None
        i, j = divmod(n, s)
        has_attn = layout.up_has_attn[i]
        if k == (2 if has_attn else 1) and j == layout.layers_per_block and _split_head(rest, ["conv"]):
            return UNetLoc("output", n, "upsampler", 0, rest)
        return _resnet_or_attention("output", n, k, rest, has_attn)
    m = _CV_MID.match(path)
    if m:
        k, rest = int(m.group(1)), m.group(2) or ""
        if k == 1:
            return UNetLoc("middle", 0, "attention", 0, rest)
        if k in (0, 2):
            child = _rename_head(rest, RESNET_CHILDREN_REV) if rest else ""
            return None if child is None else UNetLoc("middle", 0, "resnet", k // 2, child)
    return None


def _resnet_or_attention(group: str, n: int, k: int, rest: str, has_attn: bool) -> UNetLoc | None:
    if k == 0:
        child = _rename_head(rest, RESNET_CHILDREN_REV) if rest else ""
        return None if child is None else UNetLoc(group, n, "resnet", 0, child)
    if k == 1 and has_attn:
        return UNetLoc(group, n, "attention", 0, rest)
    return None


def to_diffusers(loc: UNetLoc, layout: UNetLayout) -> str:
    """Render a location in diffusers spelling."""
    if loc.part == "top":
        return loc.child
    if loc.group == "middle":
        return _join(f"mid_block.{loc.part}s.{loc.slot}", loc.child)
    s = layout.stride
    if loc.group == "input":
        if loc.part == "downsampler":
            return _join(f"down_blocks.{loc.index // s - 1}.downsamplers.0", loc.child)
        i, j = divmod(loc.index - 1, s)
        return _join(f"down_blocks.{i}.{loc.part}s.{j}", loc.child)
    i, j = divmod(loc.index, s)
    if loc.part == "upsampler":
        return _join(f"up_blocks.{i}.upsamplers.0", loc.child)
    return _join(f"up_blocks.{i}.{loc.part}s.{j}", loc.child)


def diffusers_to_compvis(path: str, layout: UNetLayout) -> str | None:
    loc = parse_diffusers(path, layout)
    return None if loc is None else to_compvis(loc, layout)


def compvis_to_diffusers(path: str, layout: UNetLayout) -> str | None:
    loc = parse_compvis(path, layout)
    return None if loc is None else to_diffusers(loc, layout)


def convert_state_dict(state_dict: dict, layout: UNetLayout, to: str) -> dict:
    """Rename every U-Net parameter between spellings ('compvis' or 'diffusers'); values are shared.

    Raises:
        KeyError: naming the first parameter whose module is outside the known structure.
    """
    parse = parse_diffusers if to == "compvis" else parse_compvis
    render = to_compvis if to == "compvis" else to_diffusers
    out = {}
    for key, value in state_dict.items():
        module, _, param = key.rpartition(".")
        loc = parse(module, layout)
        if loc is None:
            raise KeyError(f"U-Net parameter {key!r} is outside the known structure")
        out[f"{render(loc, layout)}.{param}"] = value
    return out
