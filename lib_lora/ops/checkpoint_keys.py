"""LoRA targets of a single-file checkpoint (LDM/SGM layout), found from its tensor names and shapes alone.

The same names `keys.py` gives the modules of a loaded model: U-Net paths are located with `unet_layout` and
spelled as kohya does (diffusers paths for SD1/SD2, SGM paths for SDXL); CLIP text encoders keep their
transformers paths; OpenCLIP towers (SD2, SDXL's second encoder) have q/k/v fused in `attn.in_proj_weight`,
so each projection is a row block of that tensor. Linear and Conv2d weights (2-D and 4-D `.weight` tensors) are
targets; with `norms`, so are the GroupNorm/LayerNorm weights (1-D, LyCORIS `train_norm` targets, whose bias
changes too), named as keys.py names them. Embeddings are not. SD2's last OpenCLIP block is left out, as everywhere
else: SD2 conditions on the penultimate block, so no LoRA ever targets it.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from lib_lora.keys import NORM_ROLE, NORM_ROLES, kohya_name
from lib_lora.sd.components import TEXT_ENCODERS, UNET_PREFIX, TextEncoderSlot
from lib_lora.types import Arch, Component
from lib_lora.unet_layout import layout_for, parse_compvis, to_diffusers

_UNET_ROLES = {"attention": "attn", "resnet": "resnet", "downsampler": "sampler", "upsampler": "sampler",
               "top": "top"}
_CLIP_LAYER = re.compile(r"^(?:text_model\.)?encoder\.layers\.(\d+)\.(self_attn\.[qkv]_proj|self_attn\.out_proj|"
                         r"mlp\.fc1|mlp\.fc2|layer_norm1|layer_norm2)\.weight$")
_CLIP_FINAL_NORM = re.compile(r"^(?:text_model\.)?final_layer_norm\.weight$")
_OPENCLIP_LAYER = re.compile(r"^transformer\.resblocks\.(\d+)\.(attn\.in_proj_weight|attn\.out_proj\.weight|"
                             r"mlp\.c_fc\.weight|mlp\.c_proj\.weight|ln_1\.weight|ln_2\.weight)$")
_OPENCLIP_FINAL_NORM = "ln_final.weight"
_OPENCLIP_NAMES = {"attn.out_proj.weight": "self_attn.out_proj", "mlp.c_fc.weight": "mlp.fc1",
                   "mlp.c_proj.weight": "mlp.fc2", "ln_1.weight": "layer_norm1", "ln_2.weight": "layer_norm2"}
FINAL_NORM = "text_model.final_layer_norm"


@dataclass(frozen=True)
class CheckpointTarget:
    """One LoRA target inside a checkpoint file: its tensor, the rows it owns (fused q/k/v), its weight shape."""

    name: str  # kohya name
    key: str  # tensor name in the file
    shape: tuple[int, ...]  # shape of the target's weight (its row block for fused q/k/v)
    role: str  # 'attn' | 'resnet' | 'sampler' | 'top' | 'te_attn' | 'te_mlp', or a norm role (keys.NORM_ROLES)
    rows: tuple[int, int] | None = None

    @property
    def spatial(self) -> bool:
        """A k x k convolution with k > 1 (sd-scripts' 'conv' modules with their own rank)."""
        return len(self.shape) == 4 and tuple(self.shape[2:]) != (1, 1)


def _unet_targets(shapes: Mapping[str, tuple[int, ...]], arch: Arch, norms: bool) -> list[CheckpointTarget]:
    layout = layout_for(arch)
    dims = (1, 2, 4) if norms else (2, 4)
    out = []
    for key, shape in shapes.items():
        if not key.startswith(UNET_PREFIX) or not key.endswith(".weight") or len(shape) not in dims:
            continue
        path = key[len(UNET_PREFIX) : -len(".weight")]
        loc = parse_compvis(path, layout)
        if loc is None:
            continue
        canonical = path if arch is Arch.SDXL else to_diffusers(loc, layout)
        role = _UNET_ROLES[loc.part]
        out.append(CheckpointTarget(kohya_name(Component.UNET, canonical), key, tuple(shape),
                                    NORM_ROLE[role] if len(shape) == 1 else role))
    return out


def _te_role(path: str) -> str:
    if "layer_norm" in path:
        return "te_norm"
    return "te_attn" if ".self_attn." in path else "te_mlp"


def _clip_targets(shapes: Mapping[str, tuple[int, ...]], slot: TextEncoderSlot,
                  component: Component) -> list[CheckpointTarget]:
    out = []
    for key, shape in shapes.items():
        if not key.startswith(slot.prefix):
            continue
        m = _CLIP_LAYER.match(key[len(slot.prefix) :])
        if m:
            path = f"text_model.encoder.layers.{m.group(1)}.{m.group(2)}"
            out.append(CheckpointTarget(kohya_name(component, path), key, tuple(shape), _te_role(path)))
        elif _CLIP_FINAL_NORM.match(key[len(slot.prefix) :]):
            out.append(CheckpointTarget(kohya_name(component, FINAL_NORM), key, tuple(shape), "te_norm"))
    return out


def _openclip_targets(shapes: Mapping[str, tuple[int, ...]], slot: TextEncoderSlot,
                      component: Component) -> list[CheckpointTarget]:
    found, out = [], []
    for key, shape in shapes.items():
        if key.startswith(slot.prefix):
            m = _OPENCLIP_LAYER.match(key[len(slot.prefix) :])
            if m:
                found.append((int(m.group(1)), m.group(2), key, tuple(shape)))
            elif key[len(slot.prefix) :] == _OPENCLIP_FINAL_NORM:
                out.append(CheckpointTarget(kohya_name(component, FINAL_NORM), key, tuple(shape), "te_norm"))
    if slot.drop_last and found:
        last = max(n for n, *_ in found)
        found = [f for f in found if f[0] != last]
    for n, part, key, shape in found:
        base = f"text_model.encoder.layers.{n}"
        if part == "attn.in_proj_weight":
            d = shape[0] // 3
            for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                path = f"{base}.self_attn.{proj}"
                out.append(CheckpointTarget(kohya_name(component, path), key, (d, *shape[1:]), "te_attn",
                                            (i * d, (i + 1) * d)))
        else:
            path = f"{base}.{_OPENCLIP_NAMES[part]}"
            out.append(CheckpointTarget(kohya_name(component, path), key, shape, _te_role(path)))
    return out


def checkpoint_targets(shapes: Mapping[str, tuple[int, ...]], arch: Arch, norms: bool = False
                       ) -> dict[str, CheckpointTarget]:
    """Every LoRA target of a checkpoint whose tensor shapes (by file key) are `shapes`, by kohya name; with
    `norms`, the normalization layers too."""
    targets = _unet_targets(shapes, arch, norms)
    components = (Component.TE1, Component.TE2) if arch is Arch.SDXL else (Component.TE,)
    for slot, component in zip(TEXT_ENCODERS[arch], components):
        find = _clip_targets if slot.kind == "clip" else _openclip_targets
        targets += find(shapes, slot, component)
    return {t.name: t for t in targets if norms or t.role not in NORM_ROLES}


def sd_scripts_selection(target: CheckpointTarget, conv: bool) -> bool:
    """Whether sd-scripts' networks.lora makes a module for this target: attention blocks and text-encoder
    attention/MLP always; ResNet blocks and samplers (with their 1x1 and linear layers) only with a conv dim."""
    if target.role in ("attn", "te_attn", "te_mlp"):
        return True
    return conv and target.role in ("resnet", "sampler")
