"""Caption processing as sd-scripts does it, as pure functions of an explicit `random.Random`.

Order (sd-scripts `process_caption`): whole-caption dropout (`caption_dropout_rate`, or every
`caption_dropout_every_n_epochs`-th epoch); one line of the caption (a random one with `enable_wildcard`, else
the first); prefix/suffix joined with a space; with `enable_wildcard`, each `{a|b|c}` replaced by one of its
choices (`{{` / `}}` stand for literal braces); then, when shuffling or tag dropout is on, the caption is split on
`caption_separator` into fixed tokens (the first `keep_tokens`, or everything before `keep_tokens_separator`,
plus anything after a second separator) and flexible ones, which are shuffled and then dropped with
`caption_tag_dropout_rate`; the result is joined with ", ". Last, `secondary_separator` is replaced by
`caption_separator`: tags joined by it (`sky;;;cloud`) move and drop as one tag.

sd-scripts adds prefix/suffix before picking the line, so only the first line keeps the prefix and only the last
the suffix; here every line gets both, which is what the options say.
"""
from __future__ import annotations

import random
import re
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


_WILDCARD = re.compile(r"\{\{|\}\}|\{([^{}]+)\}")


def expand_wildcards(caption: str, rng: random.Random) -> str:
    """Each `{a|b|c}` replaced by one of its choices (one draw each, left to right); `{{`/`}}` become `{`/`}`.

    Example: expand_wildcards("{red|blue} hair, {{retro}}", rng) -> "blue hair, {retro}"
    """
    def replace(match: re.Match[str]) -> str:
        if match.group(1) is None:
            return match.group(0)[0]
        return rng.choice(match.group(1).split("|"))

    return _WILDCARD.sub(replace, caption)


def pick_line(caption: str, rng: random.Random | None) -> str:
    """One line of a caption: a random one when `rng` is given (multi-line captions with enable_wildcard), else
    the first."""
    lines = caption.split("\n")
    if rng is None or len(lines) == 1:
        return lines[0]
    return rng.choice(lines)


def drops_whole_caption(rate: float, every_n_epochs: int, epoch: int, rng: random.Random) -> bool:
    """Whether the whole caption is replaced by "" this time. `epoch` is 1-based (sd-scripts' current_epoch)."""
    dropped = rate > 0 and rng.random() < rate
    return dropped or (every_n_epochs > 0 and epoch % every_n_epochs == 0)


def process_caption(caption: str, options: SubsetOptions, rng: random.Random, epoch: int = 1) -> str:
    """The caption the text encoder sees for one use of an image (see the module docstring for the order)."""
    if drops_whole_caption(options.caption_dropout_rate, options.caption_dropout_every_n_epochs, epoch, rng):
        return ""
    caption = pick_line(caption, rng if options.enable_wildcard else None)
    if options.caption_prefix:
        caption = f"{options.caption_prefix} {caption}"
    if options.caption_suffix:
        caption = f"{caption} {options.caption_suffix}"
    if options.enable_wildcard:
        caption = expand_wildcards(caption, rng)
    if options.shuffle_caption or options.caption_tag_dropout_rate > 0:
        parts = split_caption(caption, options.caption_separator, options.keep_tokens, options.keep_tokens_separator)
        flex = shuffle_tokens(parts.flex, rng) if options.shuffle_caption else parts.flex
        flex = drop_tags(flex, options.caption_tag_dropout_rate, rng)
        caption = ", ".join(parts.fixed + flex + parts.fixed_suffix)
    if options.secondary_separator:
        caption = caption.replace(options.secondary_separator, options.caption_separator)
    return caption


def tag_frequency(captions: Iterable[str]) -> dict[str, int]:
    """sd-scripts' tag counts of one folder: tags split on "," (and on line breaks of multi-line captions),
    stripped, lower-cased; each occurrence counted."""
    counts: Counter[str] = Counter()
    for caption in captions:
        for tag in caption.replace("\n", ",").split(","):
            tag = tag.strip()
            if tag:
                counts[tag.lower()] += 1
    return dict(counts)
