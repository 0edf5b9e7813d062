"""Sample prompts during training, in sd-scripts' prompt-file formats.

`.txt`: one prompt per line, `#` lines ignored, options after the prompt: `--n` negative prompt, `--w`/`--h` size,
`--d` seed, `--l` CFG scale, `--s` steps (also `--ss` sampler). `.toml`: `[prompt]` defaults with
`[[prompt.subset]]` entries; `.json`: a list of objects (`prompt`, `negative_prompt`, `width`, `height`, `scale`,
`seed`, `sample_steps`, `sample_sampler`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from lib_lora.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 in some web-UI venvs
    import tomli as tomllib

# sd-scripts' sample_sampler names -> the web-UI sampler names our pipeline registers
SD_SCRIPTS_SAMPLERS = {
    "ddim": "DDIM", "k_euler": "Euler", "euler": "Euler", "k_euler_a": "Euler a", "euler_a": "Euler a",
    "dpmsolver++": "DPM++ 2M", "dpmsolver": "DPM++ 2M", "dpmsingle": "DPM++ 2M", "k_dpm_2": "DPM++ 2M",
    "k_dpm_2_a": "Euler a", "k_lms": "Euler", "heun": "Euler", "pndm": "UniPC", "unipc": "UniPC",
}
_OPTION = re.compile(r"\s--(n|w|h|d|l|s|ss)\s+")


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative_prompt: str = ""
    width: int | None = None  # None: the model's native size
    height: int | None = None
    seed: int | None = None
    cfg_scale: float = 7.5
    steps: int = 20
    sampler: str | None = None  # None: the run's sample_sampler


def map_sampler(name: str, source: str = "sample_sampler") -> str:
    """An sd-scripts sampler name (or one of ours) as the web-UI name our pipelines use."""
    key = name.strip()
    if key.lower() in SD_SCRIPTS_SAMPLERS:
        return SD_SCRIPTS_SAMPLERS[key.lower()]
    if key in SD_SCRIPTS_SAMPLERS.values():
        return key
    known = sorted(set(SD_SCRIPTS_SAMPLERS) | set(SD_SCRIPTS_SAMPLERS.values()))
    raise ConfigError(source, name, f"unknown sampler; known: {', '.join(known)}")


def _number(text: str, cast, where: str, option: str):
    try:
        return cast(text)
    except ValueError:
        raise ConfigError(where, text, f"--{option} needs a number") from None


def parse_line(line: str, where: str = "sample_prompts") -> SamplePrompt | None:
    """One line of a `.txt` prompt file; None for blank and comment lines."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    parts = _OPTION.split(" " + text)
    prompt = parts[0].strip()
    fields: dict = {}
    for option, value in zip(parts[1::2], parts[2::2]):
        value = value.strip()
        if option == "n":
            fields["negative_prompt"] = value
        elif option in ("w", "h"):
            fields["width" if option == "w" else "height"] = _number(value, int, where, option)
        elif option == "d":
            fields["seed"] = _number(value, int, where, option)
        elif option == "l":
            fields["cfg_scale"] = _number(value, float, where, option)
        elif option == "s":
            fields["steps"] = _number(value, int, where, option)
        else:
            fields["sampler"] = map_sampler(value, where)
    if not prompt:
        raise ConfigError(where, line, "a prompt line needs text before its --options")
    return SamplePrompt(prompt, **fields)


def _from_mapping(entry: dict, defaults: dict, where: str) -> SamplePrompt:
    merged = {**defaults, **entry}
    if not merged.get("prompt"):
        raise ConfigError(where, entry, "each entry needs a 'prompt'")
    sampler = merged.get("sample_sampler") or merged.get("sampler")
    return SamplePrompt(
        prompt=str(merged["prompt"]), negative_prompt=str(merged.get("negative_prompt", "")),
        width=merged.get("width"), height=merged.get("height"), seed=merged.get("seed"),
        cfg_scale=float(merged.get("scale", merged.get("cfg_scale", 7.5))),
        steps=int(merged.get("sample_steps", merged.get("steps", 20))),
        sampler=map_sampler(sampler, where) if sampler else None)


def load_prompts(path: str | Path) -> list[SamplePrompt]:
    """Read a prompt file of any of the three formats.

    Raises:
        ConfigError: naming the file (and line) of anything it cannot read.
    """
    path = Path(path)
    where = f"sample_prompts ({path})"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("sample_prompts", str(path), f"cannot read it: {exc}") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(where, exc.msg, f"invalid JSON at line {exc.lineno}") from None
        entries = data if isinstance(data, list) else [data]
        return [_from_mapping(e, {}, where) for e in entries]
    if path.suffix.lower() == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(where, str(exc), "invalid TOML") from None
        section = data.get("prompt", data)
        defaults = {k: v for k, v in section.items() if k != "subset"}
        subsets = section.get("subset") or [defaults]
        return [_from_mapping(e, defaults, where) for e in subsets]
    return prompts_from_text(text, where, option="sample_prompts", value=str(path))


def prompts_from_text(text: str, where: str = "sample_prompt_text", *, option: str = "sample_prompt_text",
                      value: str | None = None) -> list[SamplePrompt]:
    """Prompts written one per line in sd-scripts' syntax (`--n negative --w 512 --s 20 ...`); `#` comments."""
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        parsed = parse_line(line, f"{where}, line {number}")
        if parsed is not None:
            prompts.append(parsed)
    if not prompts:
        raise ConfigError(option, value if value is not None else text, "holds no prompt")
    return prompts
