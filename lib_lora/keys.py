"""THE key-naming module: model modules <-> kohya names, and every file spelling users have.

The canonical name of a LoRA target is its kohya name (`lora_unet_down_blocks_0_attentions_0_proj_in`,
`lora_te_text_model_encoder_layers_0_self_attn_q_proj`, SDXL `lora_te1_`/`lora_te2_`): files carry it
and A1111 uses it. SD1/SD2 U-Net names use diffusers module paths, SDXL names use SGM (compvis) paths,
text-encoder names use the transformers 4.x CLIP paths (with the `text_model.` level).

Names are produced by enumerating a model's real modules (`unet_targets`, `clip_text_targets`,
`open_clip_text_targets`) and converting their paths with `unet_layout`; file keys are parsed by
`parse_file_key`; a kohya name is turned back into a dotted path with a segment table
(`kohya_to_path`), never by guessing where underscores were dots.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from lib_lora.errors import KeyMapError
from lib_lora.types import Arch, Component, component_of
from lib_lora.unet_layout import (
    UNetLayout,
    compvis_to_diffusers,
    diffusers_to_compvis,
    layout_for,
    parse_compvis,
    parse_diffusers,
)

# Path segments that contain underscores. Every other segment of a module path is a single word
# or a number, so a kohya name splits back into its path unambiguously (tested over real module trees).
MULTI_WORD_SEGMENTS = (
    "down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks", "middle_block",
    "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in", "proj_out", "conv_shortcut",
    "time_emb_proj", "time_embedding", "time_embed", "label_emb", "add_embedding", "linear_1", "linear_2",
    "conv_in", "conv_out", "conv_norm_out", "in_layers", "out_layers", "emb_layers", "skip_connection",
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm", "layer_norm1",
    "layer_norm2", "token_embedding", "position_embedding", "text_projection", "in_proj", "c_fc", "c_proj",
)
_SEGMENTS_BY_LENGTH = sorted((s.split("_") for s in MULTI_WORD_SEGMENTS), key=len, reverse=True)


@dataclass(frozen=True, eq=False)
class Target:
    """One weight a LoRA module can change.

    name: kohya name; path: module path inside its root module; role: 'attn' | 'resnet' | 'sampler' | 'top'
    for the U-Net, 'te_attn' | 'te_mlp' | 'te_other' for text encoders, and for normalization layers (GroupNorm,
    LayerNorm: `NORM_ROLES`) 'attn_norm' | 'resnet_norm' | 'sampler_norm' | 'top_norm' | 'te_norm'; rows: for
    fused q/k/v projections (OpenCLIP `in_proj_weight`), the rows of the fused weight this target owns.
    """

    name: str
    component: Component
    path: str
    module: nn.Module
    role: str
    rows: tuple[int, int] | None = None
    # 'forward': the parent calls this layer, so a forward wrapper sees its input; 'param': the parent reads
    # the weight itself (nn.MultiheadAttention's q/k/v and out_proj), so bypass needs a parametrization.
    hook: str = "forward"

    @property
    def param(self) -> nn.Parameter:
        return self.module.in_proj_weight if self.rows is not None else self.module.weight

    @property
    def shape(self) -> torch.Size:
        w = self.param
        if self.rows is None:
            return w.shape
        return torch.Size((self.rows[1] - self.rows[0], *w.shape[1:]))

    @property
    def is_conv(self) -> bool:
        return isinstance(self.module, nn.Conv2d)

    @property
    def is_norm(self) -> bool:
        """A normalization layer (LyCORIS `train_norm` targets: its weight and bias change, `w_norm`/`b_norm`)."""
        return self.role in NORM_ROLES

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.shape[2:]) if len(self.shape) == 4 else ()


@dataclass
class ModelTargets:
    """Every LoRA target of one model, by kohya name."""

    arch: Arch
    targets: dict[str, Target]

    def __getitem__(self, name: str) -> Target:
        return self.targets[name]

    def __contains__(self, name: str) -> bool:
        return name in self.targets

    def __len__(self) -> int:
        return len(self.targets)

    def get(self, name: str) -> Target | None:
        return self.targets.get(name)

    def components(self) -> set[Component]:
        return {t.component for t in self.targets.values()}

    def select(self, roles: Iterable[str], components: Iterable[Component] | None = None) -> list[Target]:
        """Targets with one of `roles` (and in `components`, if given), in model order."""
        roles = set(roles)
        comps = set(components) if components is not None else None
        return [t for t in self.targets.values() if t.role in roles and (comps is None or t.component in comps)]

    @classmethod
    def merge(cls, arch: Arch, parts: Iterable[Iterable[Target]]) -> ModelTargets:
        table: dict[str, Target] = {}
        for part in parts:
            for t in part:
                if t.name in table:
                    raise KeyMapError(
                        f"two modules map to the same kohya name {t.name!r}: {table[t.name].path}, {t.path}"
                    )
                table[t.name] = t
        return cls(arch, table)


def kohya_name(component: Component, path: str) -> str:
    return component.prefix + path.replace(".", "_")


# Normalization layers a network can change (LyCORIS `train_norm`: every module whose class is a GroupNorm or
# LayerNorm; the LDM code's GroupNorm32 subclasses GroupNorm). Only affine ones have a weight to change.
NORM_TYPES = (nn.GroupNorm, nn.LayerNorm)
# the role of a normalization layer, by the role its neighbours (the layers of the same part) have
NORM_ROLE = {"attn": "attn_norm", "resnet": "resnet_norm", "sampler": "sampler_norm", "top": "top_norm",
              "te_attn": "te_norm", "te_mlp": "te_norm", "te_other": "te_norm"}
NORM_ROLES = frozenset(NORM_ROLE.values())


def _is_affine_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES) and getattr(module, "weight", None) is not None


def _lora_layers(root: nn.Module) -> Iterable[tuple[str, nn.Module, bool]]:
    """(path, module, is a normalization layer) of every layer a network can change, in model order."""
    for path, module in root.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            yield path, module, False
        elif _is_affine_norm(module):
            yield path, module, True


# ----------------------------------------------------------------------------------------- U-Net


def _unet_role(part: str) -> str:
    return {"attention": "attn", "resnet": "resnet", "downsampler": "sampler", "upsampler": "sampler"}.get(part, "top")


def unet_targets(unet: nn.Module, arch: Arch, spelling: str, layout: UNetLayout | None = None) -> list[Target]:
    """Targets of a U-Net whose module paths are in `spelling` 'diffusers' or 'compvis' (LDM/SGM).

    Args:
        unet: the U-Net module itself (diffusers `UNet2DConditionModel`, or `model.diffusion_model`).
        arch: decides the kohya spelling: diffusers paths for SD1/SD2, SGM paths for SDXL.
    """
    layout = layout or layout_for(arch)
    if spelling not in ("diffusers", "compvis"):
        raise ValueError(f"spelling must be 'diffusers' or 'compvis', not {spelling!r}")
    parse = parse_diffusers if spelling == "diffusers" else parse_compvis
    out = []
    for path, module, norm in _lora_layers(unet):
        loc = parse(path, layout)
        if loc is None:
            raise KeyMapError(f"U-Net module {path!r} is outside the {arch.label} {spelling} structure this map knows")
        if arch is Arch.SDXL:
            canonical = path if spelling == "compvis" else diffusers_to_compvis(path, layout)
        else:
            canonical = path if spelling == "diffusers" else compvis_to_diffusers(path, layout)
        role = _unet_role(loc.part)
        out.append(Target(kohya_name(Component.UNET, canonical), Component.UNET, path, module,
                          NORM_ROLE[role] if norm else role))
    return out


# ----------------------------------------------------------------------------------- text encoders


def _te_role(path: str) -> str:
    if ".self_attn." in f".{path}." or ".attn." in f".{path}.":
        return "te_attn"
    if ".mlp." in f".{path}.":
        return "te_mlp"
    return "te_other"


def clip_text_targets(te: nn.Module, component: Component) -> list[Target]:
    """Targets of a transformers CLIP text model (`CLIPTextModel`, `CLIPTextModelWithProjection`).

    transformers >= 5 flattened `CLIPTextModel` (no `text_model.` level); kohya names keep the level.
    """
    out = []
    for path, module, norm in _lora_layers(te):
        canonical = path if path.startswith("text_model.") or path == "text_projection" else f"text_model.{path}"
        role = _te_role(canonical)
        out.append(Target(kohya_name(component, canonical), component, path, module,
                          NORM_ROLE[role] if norm else role))
    return out


_OPENCLIP_BLOCK = re.compile(r"^(?:(?P<pre>.*)\.)?transformer\.resblocks\.(?P<n>\d+)\.(?P<rest>.+)$")
_OPENCLIP_CHILDREN = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                      "ln_1": "layer_norm1", "ln_2": "layer_norm2"}
_OPENCLIP_FINAL_NORM = re.compile(r"^(?:.*\.)?ln_final$")


def open_clip_text_targets(te: nn.Module, component: Component) -> list[Target]:
    """Targets of an OpenCLIP text tower (SD2's and SDXL-TE2's encoder as the web UI loads them).

    The fused `attn.in_proj_weight` of each `nn.MultiheadAttention` holds q, k and v as row blocks;
    each block is a target of its own, named as diffusers/transformers name the separate projections.
    Normalization layers (`ln_1`, `ln_2`, `ln_final`) get the transformers names (`layer_norm1`, `layer_norm2`,
    `final_layer_norm`).
    """
    out = []
    for path, module in te.named_modules():
        m = _OPENCLIP_BLOCK.match(path)
        if m is None:
            if _OPENCLIP_FINAL_NORM.match(path) and _is_affine_norm(module):
                out.append(Target(kohya_name(component, "text_model.final_layer_norm"), component, path, module,
                                  "te_norm"))
            continue
        n, rest = m.group("n"), m.group("rest")
        base = f"text_model.encoder.layers.{n}"
        if rest == "attn" and isinstance(module, nn.MultiheadAttention):
            d = module.embed_dim
            for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                name = kohya_name(component, f"{base}.self_attn.{proj}")
                out.append(Target(name, component, path, module, "te_attn", rows=(i * d, (i + 1) * d)))
        elif rest in _OPENCLIP_CHILDREN and (isinstance(module, nn.Linear) or _is_affine_norm(module)):
            canonical = f"{base}.{_OPENCLIP_CHILDREN[rest]}"
            hook = "param" if rest == "attn.out_proj" else "forward"
            role = "te_norm" if _is_affine_norm(module) else _te_role(canonical)
            out.append(Target(kohya_name(component, canonical), component, path, module, role, hook=hook))
    return out


# ------------------------------------------------------------------------------ names back to paths


def split_kohya(name: str) -> tuple[Component, str]:
    """(component, underscore body) of a kohya module name."""
    comp = component_of(name)
    if comp is None:
        raise KeyMapError(f"{name!r} is not a kohya LoRA module name (lora_unet_/lora_te_/lora_te1_/lora_te2_)")
    return comp, name[len(comp.prefix) :]


@functools.lru_cache(maxsize=65536)
def kohya_to_path(name: str) -> tuple[Component, str]:
    """(component, dotted module path in the kohya spelling) of a kohya name.

    Example: lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_out_0
             -> (UNET, 'down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0')
    """
    comp, body = split_kohya(name)
    atoms = body.split("_")
    segments, i = [], 0
    while i < len(atoms):
        for seg in _SEGMENTS_BY_LENGTH:
            if atoms[i : i + len(seg)] == seg:
                segments.append("_".join(seg))
                i += len(seg)
                break
        else:
            segments.append(atoms[i])
            i += 1
    return comp, ".".join(segments)


def diffusers_path(name: str, arch: Arch) -> tuple[Component, str]:
    """(component, module path as diffusers models name it) of a kohya name."""
    comp, path = kohya_to_path(name)
    if comp is Component.UNET and arch is Arch.SDXL:
        converted = compvis_to_diffusers(path, layout_for(arch))
        if converted is None:
            raise KeyMapError(f"{name!r}: not a module of the SDXL U-Net")
        path = converted
    return comp, path


def compvis_path(name: str, arch: Arch) -> tuple[Component, str]:
    """(component, U-Net path as the LDM/SGM code names it) of a kohya U-Net name."""
    comp, path = kohya_to_path(name)
    if comp is Component.UNET and arch is not Arch.SDXL:
        converted = diffusers_to_compvis(path, layout_for(arch))
        if converted is None:
            raise KeyMapError(f"{name!r}: not a module of the {arch.label} U-Net")
        path = converted
    return comp, path


# ------------------------------------------------------------------------------------- file keys

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
KOHYA_OFT_PREFIX = "oft_unet_"
# diffusers / PEFT component prefixes -> component (SDXL's first encoder is te1)
_DIFFUSERS_COMPONENTS = {"unet": Component.UNET, "text_encoder": Component.TE, "text_encoder_2": Component.TE2}
# tails that carry LoRA tensors in diffusers / PEFT spellings -> kohya suffix
_PEFT_TAILS = (
    (".lora_A.default.weight", "lora_down.weight"),
    (".lora_B.default.weight", "lora_up.weight"),
    (".lora_A.weight", "lora_down.weight"),
    (".lora_B.weight", "lora_up.weight"),
    (".lora.down.weight", "lora_down.weight"),
    (".lora.up.weight", "lora_up.weight"),
    (".lora_linear_layer.down.weight", "lora_down.weight"),
    (".lora_linear_layer.up.weight", "lora_up.weight"),
    (".lora_magnitude_vector.default.weight", "dora_scale"),
    (".lora_magnitude_vector.weight", "dora_scale"),
    (".lora_magnitude_vector", "dora_scale"),
    (".alpha", "alpha"),
)
# old diffusers attention-processor spelling: attn1.processor.to_q_lora.down.weight
_OLD_PROCESSOR = re.compile(
    r"^(?P<mod>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<dir>down|up)\.weight$"
)
_UNET_HEADS = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in", "conv_out", "time_embedding.", "add_embedding.",
               "conv_norm_out")


@dataclass(frozen=True)
class FileKey:
    """A tensor key of a LoRA file, parsed: the kohya module it belongs to and its kohya/LyCORIS suffix."""

    key: str
    module: str
    suffix: str
    spelling: str  # 'kohya' | 'peft' | 'kohya-oft'


def parse_file_key(key: str, arch: Arch) -> FileKey | None:
    """Parse one tensor key of a LoRA file; None when the key is not in any spelling we know.

    kohya/LyCORIS: `lora_unet_xxx.lora_down.weight`, `lora_te1_xxx.hada_w1_a`, `lora_te_xxx.alpha`.
    diffusers/PEFT: `unet.<path>.lora_A.weight`, `text_encoder.<path>.lora_B.weight`, `<path>.lora.down.weight`,
    `base_model.model.<path>.lora_A.weight`, old `unet.<path>.processor.to_q_lora.down.weight`.
    `arch` decides how diffusers U-Net paths become SDXL (SGM) kohya names and whether `text_encoder` is te or te1.
    """
    if key.startswith(KOHYA_PREFIXES):
        module, sep, suffix = key.partition(".")
        return FileKey(key, module, suffix, "kohya") if sep and suffix else None
    if key.startswith(KOHYA_OFT_PREFIX):  # sd-scripts' networks.oft names its U-Net modules oft_unet_*
        module, sep, suffix = key.partition(".")
        return FileKey(key, "lora_unet_" + module.removeprefix(KOHYA_OFT_PREFIX), suffix, "kohya-oft") \
            if sep and suffix else None
    body = key.removeprefix("base_model.model.")
    comp_name, _, rest = body.partition(".")
    comp = _DIFFUSERS_COMPONENTS.get(comp_name)
    if comp is None:  # no component prefix (PEFT save of one model): decide by the path's head
        rest = body
        if body.startswith(_UNET_HEADS):
            comp = Component.UNET
        elif body.startswith(("text_model.", "encoder.layers.")):
            comp = Component.TE
        else:
            return None
    if comp is Component.TE and arch is Arch.SDXL:
        comp = Component.TE1
    m = _OLD_PROCESSOR.match(rest)
    if m:
        proj = "to_out.0" if m.group("proj") == "to_out" else m.group("proj")
        path, suffix = f"{m.group('mod')}.{proj}", f"lora_{m.group('dir')}.weight"
    else:
        found = next(((tail, sfx) for tail, sfx in _PEFT_TAILS if rest.endswith(tail)), None)
        if found is None:
            return None
        path, suffix = rest[: -len(found[0])], found[1]
    if comp is Component.UNET:
        if arch is Arch.SDXL:
            converted = diffusers_to_compvis(path, layout_for(arch))
            if converted is None:
                return None
            path = converted
    elif not path.startswith("text_model.") and path != "text_projection":
        path = f"text_model.{path}"
    return FileKey(key, kohya_name(comp, path), suffix, "peft")


_PEFT_SUFFIX = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "alpha": "alpha"}
_PEFT_COMPONENT = {Component.UNET: "unet", Component.TE: "text_encoder", Component.TE1: "text_encoder",
                   Component.TE2: "text_encoder_2"}


def to_peft_key(module: str, suffix: str, arch: Arch) -> str:
    """diffusers/PEFT spelling of a kohya module + suffix (LoRA tensors and alpha only)."""
    if suffix not in _PEFT_SUFFIX:
        raise KeyMapError(f"{module}.{suffix}: only lora_down/lora_up/alpha have a diffusers/PEFT spelling")
    comp, path = diffusers_path(module, arch)
    return f"{_PEFT_COMPONENT[comp]}.{path}.{_PEFT_SUFFIX[suffix]}"


# ------------------------------------------------------------------------------- architecture guess


@dataclass(frozen=True)
class ArchGuess:
    arch: Arch
    reason: str


def guess_arch(modules: Iterable[str], shapes: Mapping[str, tuple[int, ...]] | None = None,
               metadata: Mapping[str, str] | None = None) -> ArchGuess:
    """Best guess of the architecture a LoRA was made for, from module names, shapes and metadata.

    `shapes` maps kohya module name -> shape of its `lora_down.weight` (or any input-side tensor).
    """
    names = list(modules)
    meta = metadata or {}
    if any(n.startswith(("lora_te1_", "lora_te2_")) for n in names) or any(
        kohya_to_path(n)[1].startswith(("input_blocks.", "output_blocks.", "middle_block.")) for n in names
        if n.startswith("lora_unet_")
    ):
        return ArchGuess(Arch.SDXL, "SDXL key names (lora_te1_/lora_te2_ or input_blocks_)")
    version = meta.get("ss_base_model_version", "")
    spec = meta.get("modelspec.architecture", "")
    if version.startswith("sdxl") or spec.startswith("stable-diffusion-xl"):
        return ArchGuess(Arch.SDXL, "metadata says SDXL")
    if meta.get("ss_v2") == "True" or version.startswith("sd_v2") or spec.startswith("stable-diffusion-v2"):
        return ArchGuess(Arch.SD2, "metadata says SD2")
    if version.startswith("sd_v1") or spec.startswith("stable-diffusion-v1"):
        return ArchGuess(Arch.SD1, "metadata says SD1")
    for name, shape in (shapes or {}).items():
        if name.endswith("_self_attn_q_proj") and len(shape) >= 2 and shape[-1] in (768, 1024):
            return ArchGuess(Arch.SD1 if shape[-1] == 768 else Arch.SD2, f"text-encoder width {shape[-1]}")
        if name.endswith("_attn2_to_k") and len(shape) >= 2 and shape[-1] in (768, 1024):
            return ArchGuess(Arch.SD1 if shape[-1] == 768 else Arch.SD2, f"cross-attention width {shape[-1]}")
    return ArchGuess(Arch.SD1, "SD1/SD2 key names; no metadata or known width to tell SD2 apart, assumed SD1")
