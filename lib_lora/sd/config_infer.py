"""Infer component structure from the tensor shapes of a single-file checkpoint.

Shapes fix channels, context width, resnets per level, transformer depths, linear vs conv `proj_in`,
the VAE's channels and the text encoders' widths and depths. They do not fix attention head counts
(q/k/v are one matrix whatever the split), activation functions or norm group counts: those come from a
yaml beside the file, the file's own LoRA Studio metadata, or the shipped full-size config of the arch.
All functions take `{key: shape}` with the component prefix already removed.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from lib_lora.errors import KeyMapError
from lib_lora.sd.configs import LdmUNet, LdmVae

Shapes = Mapping[str, Sequence[int]]
# every released CLIP / OpenCLIP text tower uses 64-wide attention heads (768/12, 1024/16, 1280/20)
CLIP_HEAD_WIDTH = 64


def _shape(shapes: Shapes, key: str, what: str) -> Sequence[int]:
    if key not in shapes:
        raise KeyMapError(f"{what}: expected tensor {key!r} is missing")
    return shapes[key]


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})


def infer_unet(shapes: Shapes) -> LdmUNet:
    """The U-Net's structure (heads unset) from `model.diffusion_model.*` shapes."""
    what = "U-Net"
    conv_in = _shape(shapes, "input_blocks.0.0.weight", what)
    model_channels = conv_in[0]
    n_levels = len(_indices(shapes, r"^input_blocks\.(\d+)\.0\.op\.weight$")) + 1
    n_blocks = max(_indices(shapes, r"^input_blocks\.(\d+)\."), default=0) + 1
    if n_blocks % n_levels:
        raise KeyMapError(f"{what}: {n_blocks} input blocks do not split into {n_levels} levels")
    stride = n_blocks // n_levels
    mult, attention, depths = [], [], []
    for level in range(n_levels):
        first = 1 + stride * level
        out_ch = _shape(shapes, f"input_blocks.{first}.0.out_layers.3.weight", what)[0]
        if out_ch % model_channels:
            raise KeyMapError(f"{what}: level {level} has {out_ch} channels, not a multiple of {model_channels}")
        mult.append(out_ch // model_channels)
        attention.append(f"input_blocks.{first}.1.proj_in.weight" in shapes)
        depths.append(len(_indices(shapes, rf"^input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.")) or 1)
    attn2 = sorted(k for k in shapes if k.endswith(".attn2.to_k.weight"))
    if not attn2:
        raise KeyMapError(f"{what}: no cross-attention (attn2.to_k) tensors found")
    proj_in = next(k for k in sorted(shapes) if k.endswith(".1.proj_in.weight"))
    label = shapes.get("label_emb.0.0.weight")
    return LdmUNet(
        in_channels=conv_in[1], out_channels=_shape(shapes, "out.2.weight", what)[0],
        model_channels=model_channels, channel_mult=tuple(mult), num_res_blocks=stride - 1,
        attention_levels=tuple(attention), depths=tuple(depths),
        depth_middle=len(_indices(shapes, r"^middle_block\.1\.transformer_blocks\.(\d+)\.")) or 1,
        context_dim=shapes[attn2[0]][1], use_linear=len(shapes[proj_in]) == 2,
        adm_in_channels=label[1] if label is not None else None,
    )


def infer_vae(shapes: Shapes) -> LdmVae:
    """The autoencoder's structure from `first_stage_model.*` shapes."""
    what = "VAE"
    conv_in = _shape(shapes, "encoder.conv_in.weight", what)
    ch = conv_in[0]
    levels = _indices(shapes, r"^encoder\.down\.(\d+)\.block\.0\.conv2\.weight$")
    if not levels:
        raise KeyMapError(f"{what}: no encoder.down.N.block tensors found")
    mult = []
    for level in levels:
        out_ch = shapes[f"encoder.down.{level}.block.0.conv2.weight"][0]
        if out_ch % ch:
            raise KeyMapError(f"{what}: level {level} has {out_ch} channels, not a multiple of {ch}")
        mult.append(out_ch // ch)
    return LdmVae(
        ch=ch, ch_mult=tuple(mult),
        num_res_blocks=len(_indices(shapes, r"^encoder\.down\.0\.block\.(\d+)\.conv1\.weight$")),
        z_channels=_shape(shapes, "decoder.conv_in.weight", what)[1],
        embed_dim=_shape(shapes, "post_quant_conv.weight", what)[1],
        in_channels=conv_in[1], out_ch=_shape(shapes, "decoder.conv_out.weight", what)[0],
    )


def _heads(hidden: int, base: Mapping[str, Any], what: str) -> int:
    if hidden == base.get("hidden_size"):
        return int(base["num_attention_heads"])
    if hidden % CLIP_HEAD_WIDTH:
        raise KeyMapError(f"{what}: cannot infer the attention heads of a {hidden}-wide text encoder "
                          f"(not a multiple of {CLIP_HEAD_WIDTH}); the file carries no config saying it")
    return hidden // CLIP_HEAD_WIDTH


def infer_clip(shapes: Shapes, base: Mapping[str, Any]) -> dict[str, Any]:
    """CLIPTextConfig arguments from the shapes of a transformers-layout tower (`text_model.*` keys)."""
    what = "CLIP text encoder"
    vocab, hidden = _shape(shapes, "text_model.embeddings.token_embedding.weight", what)
    layers = _indices(shapes, r"^text_model\.encoder\.layers\.(\d+)\.")
    return dict(base, vocab_size=vocab, hidden_size=hidden, num_hidden_layers=len(layers),
                max_position_embeddings=_shape(shapes, "text_model.embeddings.position_embedding.weight", what)[0],
                intermediate_size=_shape(shapes, "text_model.encoder.layers.0.mlp.fc1.weight", what)[0],
                num_attention_heads=_heads(hidden, base, what))


def infer_openclip(shapes: Shapes, base: Mapping[str, Any], drop_last: bool) -> dict[str, Any]:
    """CLIPTextConfig arguments from an OpenCLIP tower; `drop_last`: the last block is unused (SD2)."""
    what = "OpenCLIP text encoder"
    vocab, hidden = _shape(shapes, "token_embedding.weight", what)
    n_blocks = len(_indices(shapes, r"^transformer\.resblocks\.(\d+)\."))
    if n_blocks < 1 + drop_last:
        raise KeyMapError(f"{what}: has {n_blocks} residual blocks")
    cfg = dict(base, vocab_size=vocab, hidden_size=hidden, num_hidden_layers=n_blocks - drop_last,
               max_position_embeddings=_shape(shapes, "positional_embedding", what)[0],
               intermediate_size=_shape(shapes, "transformer.resblocks.0.mlp.c_fc.weight", what)[0],
               num_attention_heads=_heads(hidden, base, what))
    if "text_projection" in shapes:
        cfg["projection_dim"] = shapes["text_projection"][1]
    return cfg
