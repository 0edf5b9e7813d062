"""What the U-Net is conditioned on, and the prompt tokenisation both model families share (sd-scripts').

Long prompts (`max_token_length` 150 / 225), as sd-scripts does it:
- tokenize to max_token_length + 2 tokens (BOS, up to 225 tokens, EOS, padding), then cut the middle into
  chunks of 75 and wrap each as [BOS, 75 tokens, last token] -> (B, n, 77) ids. Where padding is not EOS
  (OpenCLIP's tokenizer pads with `!`, id 0), a chunk ending in a word gets EOS as its last token and a
  chunk that starts with padding gets EOS after BOS, so every chunk is a well-formed CLIP sequence.
- encode the B·n chunks, then rebuild one sequence: BOS state of the first chunk, the 75 content states
  of every chunk, last state of the last chunk -> (B, 75·n + 2, C): 77 for a plain prompt, 152 / 227 for
  150 / 225 tokens. (The web UI instead concatenates whole 77-token chunks; training follows sd-scripts.)
- SDXL's pooled embedding is the first chunk's.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lib_lora.errors import ConfigError

CHUNK = 75  # content tokens per CLIP sequence (77 with BOS and EOS)
MAX_TOKEN_LENGTHS = (None, 75, 150, 225)


@dataclass
class Conditioning:
    """What the U-Net is conditioned on, for one batch.

    context: (B, T, C) per-token states, T = 77 or max_token_length + 2 (SDXL: CLIP-L and bigG states
        concatenated on C). pooled: SDXL's pooled, projected embedding of the second encoder (B, 1280), else
        None. extra: other U-Net inputs, e.g. SDXL's `time_ids` (B, 6) = original (h, w), crop (top, left),
        target (h, w).
    """

    context: Tensor
    pooled: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return Conditioning(move(self.context), None if self.pooled is None else move(self.pooled),
                            {k: move(v) for k, v in self.extra.items()})

    def rows(self, index: Tensor) -> Conditioning:
        """The batch rows `index` (a row may repeat)."""
        return Conditioning(self.context[index], None if self.pooled is None else self.pooled[index],
                            {k: v[index] for k, v in self.extra.items()})

    def as_dict(self) -> dict[str, Tensor]:
        """The text-encoder part (batch first), as the text-encoder-output cache stores it."""
        out = {"context": self.context}
        if self.pooled is not None:
            out["pooled"] = self.pooled
        return out

    @classmethod
    def from_dict(cls, value: Mapping[str, Tensor] | Tensor) -> Conditioning:
        """Inverse of `as_dict` (a bare tensor is taken as the context)."""
        if isinstance(value, Tensor):
            return cls(value)
        if "context" not in value:
            raise ValueError(f"cached text-encoder outputs lack 'context' (keys: {sorted(value)})")
        return cls(value["context"], value.get("pooled"))


def check_max_token_length(max_token_length: int | None) -> int:
    """Number of 75-token chunks for a max_token_length (None/75 -> 1, 150 -> 2, 225 -> 3)."""
    if max_token_length not in MAX_TOKEN_LENGTHS:
        raise ConfigError("max_token_length", max_token_length, "must be 75, 150 or 225 (sd-scripts' chunks)")
    return 1 if max_token_length is None else max_token_length // CHUNK


def context_length(max_token_length: int | None) -> int:
    """Tokens in the context for a max_token_length: 77, 152 or 227."""
    return CHUNK * check_max_token_length(max_token_length) + 2


def _special_ids(tokenizer: Any) -> tuple[int, int, int]:
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    if bos is None or eos is None or pad is None:
        raise ConfigError("tokenizer", type(tokenizer).__name__, "needs bos, eos and pad token ids")
    return int(bos), int(eos), int(pad)


def tokenize(tokenizer: Any, captions: list[str], max_token_length: int | None) -> Tensor:
    """Token ids (B, n, 77) of captions, chunked as sd-scripts does (see the module docstring).

    tokenizer: a transformers CLIP tokenizer (callable with padding/max_length/truncation, with
    `model_max_length` 77 and bos/eos/pad token ids).
    """
    n = check_max_token_length(max_token_length)
    length = int(tokenizer.model_max_length)
    if length != CHUNK + 2:
        raise ConfigError("tokenizer.model_max_length", length, f"must be {CHUNK + 2} (CLIP)")
    total = CHUNK * n + 2
    ids = tokenizer(list(captions), padding="max_length", max_length=total, truncation=True,
                    return_tensors="pt").input_ids
    if n == 1:
        return ids[:, None]
    _, eos, pad = _special_ids(tokenizer)
    chunks = []
    for start in range(1, total - length + 2, CHUNK):
        chunk = torch.cat([ids[:, :1], ids[:, start:start + CHUNK], ids[:, -1:]], dim=1)
        if pad != eos:
            ends_in_word = (chunk[:, -2] != eos) & (chunk[:, -2] != pad)
            chunk[:, -1] = torch.where(ends_in_word, torch.full_like(chunk[:, -1], eos), chunk[:, -1])
            starts_empty = chunk[:, 1] == pad
            chunk[:, 1] = torch.where(starts_empty, torch.full_like(chunk[:, 1], eos), chunk[:, 1])
        chunks.append(chunk)
    return torch.stack(chunks, dim=1)


def merge_chunks(states: Tensor, n: int) -> Tensor:
    """(B·n, 77, C) states of the chunks -> (B, 75·n + 2, C): BOS, every chunk's 75 content states, last state."""
    if n == 1:
        return states
    bn, length, dim = states.shape
    per = states.reshape(bn // n, n, length, dim)
    content = per[:, :, 1:length - 1].reshape(bn // n, n * (length - 2), dim)
    return torch.cat([per[:, 0, :1], content, per[:, -1, length - 1:]], dim=1)


def first_eos(ids: Tensor, eos: int) -> Tensor:
    """Index of the first EOS token of each (N, L) row (where CLIP pools); the last index if there is none."""
    is_eos = ids == eos
    first = is_eos.int().argmax(dim=1)
    return torch.where(is_eos.any(dim=1), first, torch.full_like(first, ids.shape[1] - 1))


def sdxl_time_ids(original_sizes_hw: Tensor, crop_top_lefts: Tensor, target_sizes_hw: Tensor) -> Tensor:
    """SDXL size/crop conditioning (Podell et al. 2023, sec. 2.2) per sample: (B, 6) float32 =
    original (h, w), crop (top, left), target (h, w), the order of diffusers' `time_ids` and SGM's embedders."""
    parts = [original_sizes_hw, crop_top_lefts, target_sizes_hw]
    for name, t in zip(("original_sizes_hw", "crop_top_lefts", "target_sizes_hw"), parts):
        if t.dim() != 2 or t.shape[1] != 2:
            raise ValueError(f"{name} must be (B, 2), got shape {tuple(t.shape)}")
    return torch.cat([t.to(torch.float32) for t in parts], dim=1)


def check_clip_skip(clip_skip: int | None, layers: int) -> int:
    """clip_skip as a count of layers back from the last (None -> 1), checked against the encoder depth."""
    k = 1 if clip_skip is None else int(clip_skip)
    if not 1 <= k <= layers:
        raise ConfigError("clip_skip", clip_skip, f"must be 1..{layers} for this {layers}-layer text encoder")
    return k
