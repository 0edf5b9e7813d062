"""Caption processing as sd-scripts does it, as pure functions of an explicit `random.Random`.

Order (sd-scripts `process_caption`): prefix/suffix joined with a space; whole-caption dropout
(`caption_dropout_rate`, or every `caption_dropout_every_n_epochs`-th epoch); then, when shuffling or tag
dropout is on, the caption is split on `caption_separator` into fixed tokens (the first `keep_tokens`, or
everything before `keep_tokens_separator`, plus anything after a second separator) and flexible ones, which
are shuffled and then dropped with `caption_tag_dropout_rate`; the result is joined with ", ".
"""
from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from lib_lora.train.data.config import SubsetOptions


@dataclass(frozen=True)
class SplitCaption:
    """A caption cut into the tokens that stay in place and those that may move or drop."""

    fixed: list[str]
    flex: list[str]
    fixed_suffix: list[str]


def split_caption(caption: str, separator: str = ",", keep_tokens: int = 0,
                  keep_tokens_separator: str | None = None) -> SplitCaption:
    """Split into fixed / flexible / fixed-suffix tokens (stripped).

    Example: split_caption("sks, a dog ||| red, blue ||| best", keep_tokens_separator="|||")
        -> fixed ["sks", "a dog"], flex ["red", "blue"], fixed_suffix ["best"]
    """
    def tokens(text: str) -> list[str]:
        return [t.strip() for t in text.split(separator) if t.strip()]

    if keep_tokens_separator and keep_tokens_separator in caption:
        fixed_part, flex_part = caption.split(keep_tokens_separator, 1)
        suffix_part = ""
        if keep_tokens_separator in flex_part:
            flex_part, suffix_part = flex_part.split(keep_tokens_separator, 1)
        return SplitCaption(tokens(fixed_part), tokens(flex_part), tokens(suffix_part))
    all_tokens = [t.strip() for t in caption.strip().split(separator)]
    return SplitCaption(all_tokens[:keep_tokens], all_tokens[keep_tokens:], [])


def shuffle_tokens(tokens: list[str], rng: random.Random) -> list[str]:
    """A shuffled copy."""
    out = list(tokens)
    rng.shuffle(out)
    return out


def drop_tags(tokens: list[str], rate: float, rng: random.Random) -> list[str]:
    """Each token kept with probability 1 - rate (one draw per token, in order)."""
    if rate <= 0:
        return list(tokens)
    return [t for t in tokens if rng.random() >= rate]


def drops_whole_caption(rate: float, every_n_epochs: int, epoch: int, rng: random.Random) -> bool:
    """Whether the whole caption is replaced by "" this time. `epoch` is 1-based (sd-scripts' current_epoch)."""
    dropped = rate > 0 and rng.random() < rate
    return dropped or (every_n_epochs > 0 and epoch % every_n_epochs == 0)


def process_caption(caption: str, options: SubsetOptions, rng: random.Random, epoch: int = 1) -> str:
    """The caption the text encoder sees for one use of an image (see the module docstring for the order)."""
    if options.caption_prefix:
        caption = f"{options.caption_prefix} {caption}"
    if options.caption_suffix:
        caption = f"{caption} {options.caption_suffix}"
    if drops_whole_caption(options.caption_dropout_rate, options.caption_dropout_every_n_epochs, epoch, rng):
        return ""
    caption = caption.split("\n")[0]
    if not (options.shuffle_caption or options.caption_tag_dropout_rate > 0):
        return caption
    parts = split_caption(caption, options.caption_separator, options.keep_tokens, options.keep_tokens_separator)
    flex = shuffle_tokens(parts.flex, rng) if options.shuffle_caption else parts.flex
    flex = drop_tags(flex, options.caption_tag_dropout_rate, rng)
    return ", ".join(parts.fixed + flex + parts.fixed_suffix)


def tag_frequency(captions: Iterable[str]) -> dict[str, int]:
    """sd-scripts' tag counts of one folder: tags split on ",", stripped, lower-cased; once per image."""
    counts: Counter[str] = Counter()
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip()
            if tag:
                counts[tag.lower()] += 1
    return dict(counts)
