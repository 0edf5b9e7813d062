"""The `<lora:...>` prompt syntax users already type in the web UI.

Positional items follow A1111 (`<lora:name:te:unet:dyn>`: te defaults to 1, unet to te) with the
lora-block-weight additions: the third item may be a block-weight preset or list instead of a U-Net
strength, and named items `te=`, `unet=`, `dyn=`, `lbw=` (legacy `w=`), `start=`, `stop=`, `step=A-B`,
`x=`. Items are split on ':' and a named item on its first '=' as the web UI does.

Examples:
    <lora:style:0.8>                      te = unet = 0.8
    <lora:style:1:0.5>                    te 1, unet 0.5
    <lora:style:1:lbw=OUTS:stop=10>       block preset OUTS, off from step 10
    <lora:style:1:1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1>
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from lib_lora.errors import ConfigError, PromptSyntaxError

TAG = re.compile(r"<(\w+):([^>]+)>")
NETWORK_TYPES = ("lora", "lyco")
NAMED_KEYS = ("te", "unet", "dyn", "lbw", "w", "start", "stop", "step", "x")


@dataclass(frozen=True)
class LoraCall:
    """One `<lora:...>` tag, parsed. `lbw` is the raw preset name or list (resolved per architecture later);
    `start`/`stop` are step numbers, or fractions of the steps when in (0, 1)."""

    name: str
    te: float = 1.0
    unet: float = 1.0
    dyn: int | None = None
    lbw: str | None = None
    start: float | None = None
    stop: float | None = None
    x: float = 1.0
    tag: str = ""


@dataclass(frozen=True)
class ParsedPrompt:
    text: str  # the prompt with LoRA tags removed
    loras: tuple[LoraCall, ...]


def _number(value: str, what: str, tag: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise PromptSyntaxError(f"{tag}: {what} must be a number, not {value!r}") from None


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def parse_tag(body: str, tag: str | None = None) -> LoraCall:
    """Parse the part after `<lora:` (e.g. `name:1:lbw=INS`)."""
    tag = tag or f"<lora:{body}>"
    positional, named = [], {}
    for item in body.split(":"):
        parts = item.split("=", 1)
        if len(parts) == 2:
            key = parts[0].strip()
            if key not in NAMED_KEYS:
                hint = f"known: {', '.join(NAMED_KEYS)}"
                if key == "lbwe":
                    hint = "lbwe= (elemental weights) is not supported"
                raise PromptSyntaxError(f"{tag}: unknown option {key!r}; {hint}")
            named[key] = parts[1].strip()
        else:
            positional.append(item.strip())
    if not positional or not positional[0]:
        raise PromptSyntaxError(f"{tag}: missing LoRA name (expected <lora:name:weight>)")
    if len(positional) > 4:
        raise PromptSyntaxError(f"{tag}: too many ':' items (name, te, unet or block weights, dyn)")
    name = positional[0]
    te = _number(positional[1], "text-encoder strength", tag) if len(positional) > 1 else 1.0
    te = _number(named["te"], "te", tag) if "te" in named else te
    lbw = named.get("lbw", named.get("w"))
    unet = te
    if len(positional) > 2:
        if _is_number(positional[2]):
            unet = float(positional[2])
        elif lbw is None:
            lbw = positional[2]
        else:
            raise PromptSyntaxError(f"{tag}: U-Net strength {positional[2]!r} is not a number")
    unet = _number(named["unet"], "unet", tag) if "unet" in named else unet
    dyn_text = named.get("dyn", positional[3] if len(positional) > 3 else None)
    dyn = None
    if dyn_text is not None:
        if not dyn_text.isdigit():
            raise PromptSyntaxError(f"{tag}: dyn must be a whole number, not {dyn_text!r}")
        dyn = int(dyn_text)
    start = _number(named["start"], "start", tag) if "start" in named else None
    stop = _number(named["stop"], "stop", tag) if "stop" in named else None
    if "step" in named:
        a, sep, b = named["step"].partition("-")
        if not sep:
            raise PromptSyntaxError(f"{tag}: step must look like step=A-B, not {named['step']!r}")
        start, stop = _number(a, "step start", tag), _number(b, "step end", tag)
    if lbw is not None and not lbw:
        raise PromptSyntaxError(f"{tag}: empty block-weight value")
    x = _number(named["x"], "x", tag) if "x" in named else 1.0
    return LoraCall(name, te, unet, dyn, lbw, start, stop, x, tag)


def parse_prompt(prompt: str) -> ParsedPrompt:
    """Split a prompt into its text and its `<lora:...>`/`<lyco:...>` tags.

    Raises:
        PromptSyntaxError: a malformed tag, or a tag of a network type we do not handle (e.g. hypernet).
    """
    calls = []

    def take(match: re.Match) -> str:
        kind, body = match.group(1), match.group(2)
        if kind not in NETWORK_TYPES:
            raise PromptSyntaxError(f"{match.group(0)}: '{kind}' networks are not supported here (only lora/lyco)")
        calls.append(parse_tag(body, match.group(0)))
        return ""

    text = TAG.sub(take, prompt)
    if "<lora:" in text or "<lyco:" in text:
        start = text.find("<lora:") if "<lora:" in text else text.find("<lyco:")
        raise PromptSyntaxError(f"unclosed or empty LoRA tag near {text[start:start + 40]!r}")
    text = re.sub(r"\s*,\s*(,\s*)+", ", ", text)
    text = re.sub(r"\s{2,}", " ", text).strip().strip(",").strip()
    return ParsedPrompt(text, tuple(calls))


def resolve_step(value: float | None, total_steps: int) -> int | None:
    """A start/stop value as a step number: values in (0, 1) are fractions of `total_steps`."""
    if value is None:
        return None
    if 0 < value < 1:
        return int(round(value * total_steps))
    return int(value)


def step_window(call: LoraCall, total_steps: int) -> tuple[int, int | None]:
    """(first step with the U-Net part on, first step with it off again or None) for `start=`/`stop=`.

    Raises:
        ConfigError: a negative step, or a stop not after the start (the U-Net part would never be on).
    """
    start = resolve_step(call.start, total_steps) or 0
    stop = resolve_step(call.stop, total_steps)
    if start < 0 or (stop is not None and stop < 0):
        raise ConfigError("start/stop", (call.start, call.stop), f"{call.tag}: steps cannot be negative")
    if stop is not None and stop <= start:
        raise ConfigError("start/stop", (call.start, call.stop),
                          f"{call.tag}: stop must come after start (the U-Net part would never be on)")
    return start, stop


def _split_items(body: str) -> tuple[list[str], list[tuple[str, str]]]:
    positional, named = [], []
    for item in body.split(":"):
        key, sep, value = item.partition("=")
        if sep:
            named.append((key.strip(), value.strip()))
        else:
            positional.append(item.strip())
    return positional, named


def _join_items(positional: list[str], named: list[tuple[str, str]]) -> str:
    return ":".join([*positional, *(f"{k}={v}" for k, v in named)])


def for_webui(prompt: str) -> str:
    """The prompt with every LoRA tag in the spelling the web UI's built-in LoRA reads: a block-weight preset or
    list given as the third positional item (`<lora:name:1:OUTS>`) becomes `lbw=` (the built-in would take it
    for a U-Net strength and fail). Everything else is left as typed."""

    def fix(match: re.Match) -> str:
        kind, body = match.group(1), match.group(2)
        if kind not in NETWORK_TYPES:
            return match.group(0)
        positional, named = _split_items(body)
        if len(positional) <= 2 or _is_number(positional[2]):
            return match.group(0)
        named.insert(0, ("lbw", positional.pop(2)))
        return f"<{kind}:{_join_items(positional, named)}>"

    return TAG.sub(fix, prompt)


def has_lora_tag(prompt: str) -> bool:
    return any(m.group(1) in NETWORK_TYPES for m in TAG.finditer(prompt))


def set_first_tag(prompt: str, *, name: str | None = None, **options: str) -> str:
    """The prompt with its first LoRA tag changed: another file (`name`) and/or named options set (`te="0.5"`,
    `unet=...`, `lbw=...`). Setting te or unet spells both out (`te=..:unet=..`), so changing one never
    changes the other through the web UI's "unet defaults to te" rule. A prompt without a LoRA tag gets
    `<lora:name:1>` appended when `name` is given.

    Raises:
        PromptSyntaxError: an unknown option; options without `name` for a prompt that has no LoRA tag.
    """
    unknown = [k for k in options if k not in NAMED_KEYS]
    if unknown:
        raise PromptSyntaxError(f"unknown LoRA tag options {unknown}; known: {', '.join(NAMED_KEYS)}")
    for match in TAG.finditer(prompt):
        if match.group(1) not in NETWORK_TYPES:
            continue
        positional, named = _split_items(match.group(2))
        if len(positional) > 2 and not _is_number(positional[2]):
            named.insert(0, ("lbw", positional.pop(2)))
        if name is not None:
            positional[0] = name
        if "te" in options or "unet" in options:
            values = dict(named)
            te = values.get("te", positional[1] if len(positional) > 1 else "1")
            unet = values.get("unet", positional[2] if len(positional) > 2 else te)
            if len(positional) > 3:
                named.append(("dyn", positional[3]))
            positional = positional[:1]
            options = {"te": te, "unet": unet, **options}
        for key, value in options.items():
            named = [(k, v) for k, v in named if k != key and not (key == "lbw" and k == "w")] + [(key, value)]
        tag = f"<{match.group(1)}:{_join_items(positional, named)}>"
        return prompt[:match.start()] + tag + prompt[match.end():]
    if name is None:
        raise PromptSyntaxError(f"the prompt has no <lora:...> tag to set {', '.join(options)} on; "
                                "add one, or plot a LoRA file axis too")
    extra = "".join(f":{k}={v}" for k, v in options.items())
    return f"{prompt} <lora:{name}:1{extra}>".strip()
