"""Key tables between single-file (LDM/SGM/OpenCLIP) spellings and diffusers/transformers module trees.

A `KeyRule` pairs a key template in the LDM file with its twin in the diffusers/transformers model.
Templates hold named fields: `{i}`, `{j}`, `{n}` (block numbers), `{p}` (a parameter name such as
`weight`), `{u}` (a block number counted from the other end: the VAE decoder lists its up blocks
from the lowest resolution in diffusers but from the highest in LDM) and `{qkv}` (one of q/k/v, for
OpenCLIP's fused attention projection). Conversion parses a key with the source template and renders
the target one, so no name is rewritten by chained string replacement. Tensors change with the rule's
kind: `conv1x1` (LDM 1x1 conv <-> Linear), `transpose` (OpenCLIP `text_projection` is applied as
`x @ P`, transformers stores `P.T`), `qkv` (one fused `in_proj` tensor <-> three projections).

The U-Net is not here: `lib_lora.unet_layout` owns its spelling arithmetic.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from functools import cache

import torch

FIELD_PATTERNS = {"p": r"[a-z_]+", "qkv": r"q|k|v"}
QKV = ("q", "k", "v")


@dataclass(frozen=True)
class KeyRule:
    """One tensor family: `ldm` and `diffusers` key templates and how the tensor changes between them."""

    ldm: str
    diffusers: str
    kind: str = "plain"  # plain | conv1x1 | transpose | qkv


@dataclass
class ConvertedKeys:
    """Result of a conversion: renamed tensors, the source key of each, and source keys no rule matched."""

    tensors: dict[str, torch.Tensor]
    source_of: dict[str, str]
    unused: list[str] = field(default_factory=list)


@cache
def _compile(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    out = []
    for k, part in enumerate(parts):
        if k % 2:
            out.append(f"(?P<{part}>{FIELD_PATTERNS.get(part, r'[0-9]+')})")
        else:
            out.append(re.escape(part))
    return re.compile("^" + "".join(out) + "$")


def _render(template: str, fields: Mapping[str, str], flip: Mapping[str, int]) -> str:
    values = dict(fields)
    for name, count in flip.items():
        if name in values:
            values[name] = str(count - 1 - int(values[name]))
    return template.format(**values)


def _match(key: str, rules: Iterable[KeyRule], side: str) -> tuple[KeyRule, dict[str, str]] | None:
    for rule in rules:
        m = _compile(getattr(rule, side)).match(key)
        if m:
            return rule, m.groupdict()
    return None


def to_diffusers(state_dict: MutableMapping[str, torch.Tensor], rules: tuple[KeyRule, ...],
                 flip: Mapping[str, int] | None = None) -> ConvertedKeys:
    """Rename LDM keys (relative to their component prefix) into diffusers ones, consuming `state_dict`.

    Entries are popped as they are converted so the caller never holds two copies of a large model.
    """
    flip = flip or {}
    out = ConvertedKeys({}, {})
    for key in list(state_dict):
        found = _match(key, rules, "ldm")
        if found is None:
            out.unused.append(key)
            continue
        rule, fields = found
        tensor = state_dict.pop(key)
        target = _render(rule.diffusers, {**fields, "qkv": "{qkv}"}, flip)
        if rule.kind == "qkv":
            for name, part in zip(QKV, tensor.chunk(3, dim=0)):
                out.tensors[target.format(qkv=name)] = part
                out.source_of[target.format(qkv=name)] = key
            continue
        out.tensors[target] = _reshape(tensor, rule.kind, to="diffusers")
        out.source_of[target] = key
    return out


def to_ldm(state_dict: Mapping[str, torch.Tensor], rules: tuple[KeyRule, ...],
           flip: Mapping[str, int] | None = None) -> ConvertedKeys:
    """Rename diffusers keys into LDM ones (fusing q/k/v where the LDM side keeps them fused)."""
    flip = flip or {}
    out = ConvertedKeys({}, {})
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        found = _match(key, rules, "diffusers")
        if found is None:
            out.unused.append(key)
            continue
        rule, fields = found
        target = _render(rule.ldm, fields, flip)
        out.source_of[target] = key
        if rule.kind == "qkv":
            parts = pending.setdefault(target, {})
            parts[fields["qkv"]] = tensor
            if len(parts) == 3:
                out.tensors[target] = torch.cat([parts.pop(n) for n in QKV], dim=0)
                del pending[target]
            continue
        out.tensors[target] = _reshape(tensor, rule.kind, to="ldm")
    for target, parts in pending.items():
        missing = [n for n in QKV if n not in parts]
        raise KeyError(f"cannot fuse {target!r}: the {'/'.join(missing)} projection(s) are missing")
    return out


def _reshape(tensor: torch.Tensor, kind: str, to: str) -> torch.Tensor:
    if kind == "transpose":
        return tensor.t().contiguous()
    if kind == "conv1x1":
        if to == "diffusers" and tensor.ndim == 4:
            return tensor.reshape(tensor.shape[0], tensor.shape[1])
        if to == "ldm" and tensor.ndim == 2:
            return tensor.reshape(*tensor.shape, 1, 1)
    return tensor


# --- VAE: LDM Encoder/Decoder (first_stage_model.*) <-> diffusers AutoencoderKL ----------------------------
RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
# LDM's AttnBlock projects with 1x1 convolutions where diffusers' Attention has Linear layers.
VAE_ATTENTION = {"norm": ("group_norm", "plain"), "q": ("to_q", "conv1x1"), "k": ("to_k", "conv1x1"),
                 "v": ("to_v", "conv1x1"), "proj_out": ("to_out.0", "conv1x1")}


def _resnet_rules(ldm: str, diffusers: str) -> tuple[KeyRule, ...]:
    return tuple(KeyRule(f"{ldm}.{a}.{{p}}", f"{diffusers}.{b}.{{p}}") for a, b in RESNET.items())


def _vae_side(side: str, levels: str, block: str, sampler: str, index: str) -> tuple[KeyRule, ...]:
    rules = [
        KeyRule(f"{side}.conv_in.{{p}}", f"{side}.conv_in.{{p}}"),
        KeyRule(f"{side}.norm_out.{{p}}", f"{side}.conv_norm_out.{{p}}"),
        KeyRule(f"{side}.conv_out.{{p}}", f"{side}.conv_out.{{p}}"),
        KeyRule(f"{side}.{levels}.{{{index}}}.{sampler}.conv.{{p}}",
                f"{side}.{block}.{{{index}}}.{sampler}rs.0.conv.{{p}}"),
        *_resnet_rules(f"{side}.{levels}.{{{index}}}.block.{{j}}", f"{side}.{block}.{{{index}}}.resnets.{{j}}"),
        *_resnet_rules(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0"),
        *_resnet_rules(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1"),
    ]
    rules += [KeyRule(f"{side}.mid.attn_1.{a}.{{p}}", f"{side}.mid_block.attentions.0.{b}.{{p}}", kind)
              for a, (b, kind) in VAE_ATTENTION.items()]
    return tuple(rules)


VAE_RULES: tuple[KeyRule, ...] = (
    *_vae_side("encoder", "down", "down_blocks", "downsample", "i"),
    *_vae_side("decoder", "up", "up_blocks", "upsample", "u"),
    KeyRule("quant_conv.{p}", "quant_conv.{p}"),
    KeyRule("post_quant_conv.{p}", "post_quant_conv.{p}"),
)


def vae_flip(n_levels: int) -> dict[str, int]:
    """Index flip for the decoder's up blocks, which the two layouts number from opposite ends."""
    return {"u": n_levels}


# --- CLIP-L text encoder (transformers layout inside the file) -----------------------------------------------
CLIP_LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
              "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")
CLIP_RULES: tuple[KeyRule, ...] = (
    KeyRule("text_model.embeddings.token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    KeyRule("text_model.embeddings.position_embedding.weight", "text_model.embeddings.position_embedding.weight"),
    *(KeyRule(f"text_model.encoder.layers.{{n}}.{m}.{{p}}", f"text_model.encoder.layers.{{n}}.{m}.{{p}}")
      for m in CLIP_LAYER),
    KeyRule("text_model.final_layer_norm.{p}", "text_model.final_layer_norm.{p}"),
)

# --- OpenCLIP text tower (SD2 cond_stage_model.model.*, SDXL conditioner.embedders.1.model.*) ---------------
OPENCLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
OPENCLIP_RULES: tuple[KeyRule, ...] = (
    KeyRule("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    KeyRule("positional_embedding", "text_model.embeddings.position_embedding.weight"),
    KeyRule("transformer.resblocks.{n}.attn.in_proj_{p}", "text_model.encoder.layers.{n}.self_attn.{qkv}_proj.{p}",
            "qkv"),
    *(KeyRule(f"transformer.resblocks.{{n}}.{a}.{{p}}", f"text_model.encoder.layers.{{n}}.{b}.{{p}}")
      for a, b in OPENCLIP_LAYER.items()),
    KeyRule("ln_final.{p}", "text_model.final_layer_norm.{p}"),
    KeyRule("text_projection", "text_projection.weight", "transpose"),
)
# Present in OpenCLIP towers but without a place in a transformers text model.
OPENCLIP_IGNORED = {"logit_scale": "CLIP's contrastive temperature, unused for conditioning",
                    "attn_mask": "the causal mask, rebuilt by the model"}


def fit_text_model_prefix(tensors: dict[str, torch.Tensor], module_keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Adapt `text_model.`-prefixed keys to the module's own tree.

    transformers >= 5 flattened `CLIPTextModel` (no `text_model.` level) but kept it in
    `CLIPTextModelWithProjection`; transformers 4 has it in both. The module decides.
    """
    if any(k.startswith("text_model.") for k in module_keys):
        return tensors
    return {k.removeprefix("text_model."): v for k, v in tensors.items()}


def with_text_model_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The module's keys in the transformers-4 spelling files use (`text_model.` before the encoder)."""
    out = {}
    for k, v in state_dict.items():
        top = k.split(".", 1)[0]
        out[k if top in ("text_model", "text_projection") else f"text_model.{k}"] = v
    return out
