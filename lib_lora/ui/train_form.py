"""The training form, generated from the engine's option schema (`lib_lora.train.schema`): one field per option,
grouped in accordions, typed by the option's declared type. No option is named here, so an option the engine gains
appears in the form by itself.

Errors are the engine's own `ConfigError` messages, shown in the label of the field they are about (every
wrongly-typed field at once, then the first semantic error), before anything starts.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gradio as gr

from lib_lora.errors import ConfigError, LibLoraError
from lib_lora.train.schema import GROUPS, MODEL_DATA, SAVING, OptionSpec, error_field, field_errors, option_specs
from lib_lora.ui.compat import update

PER_ROW = 3
LAST_USED = "train-last.json"
PROMPTS_FIELD = "sample prompts (typed)"


def elem_id(name: str) -> str:
    """Element id of a control of the training tab."""
    return "lora_studio_train_" + name.replace(".", "_")


def field_id(name: str) -> str:
    """Element id of an option's field (its own namespace: options such as `resume` share names with buttons)."""
    return "lora_studio_opt_" + name.replace(".", "_")


def _info(spec: OptionSpec) -> str:
    default = spec.form_value(spec.default)
    shown = f"default {default}" if default not in ("", None) else "unset by default"
    return f"{spec.help} ({shown})" if spec.help else shown


def _component(spec: OptionSpec, value: Any):
    common = {"label": spec.name, "info": _info(spec), "elem_id": field_id(spec.name)}
    if spec.widget == "bool":
        return gr.Checkbox(value=bool(value), **common)
    if spec.widget == "choice":
        choices = ([""] if spec.optional else []) + list(spec.choices)
        return gr.Dropdown(choices=choices, value=value if value in choices else choices[0], **common)
    if spec.widget in ("int", "float"):
        return gr.Number(value=value, precision=0 if spec.widget == "int" else None, **common)
    return gr.Textbox(value="" if value is None else str(value), placeholder="(unset)" if spec.optional else "",
                      lines=1, max_lines=3, **common)


class TrainForm:
    """The fields (by option name) plus the typed sample prompts; `values(data)` reads them back."""

    def __init__(self, host):
        self.host = host
        self.specs = option_specs()
        self.fields: dict[str, Any] = {}
        self.prompts = None

    # ------------------------------------------------------------------------------------ building

    def initial_values(self) -> dict[str, Any]:
        """Defaults, then what the host proposes, then the values last used (restored across restarts)."""
        values = {s.name: s.form_value(s.default) for s in self.specs}
        values.update(self.host.train_defaults())
        values.update(self.last_used())
        return values

    def build(self) -> None:
        values = self.initial_values()
        for group in GROUPS:
            specs = [s for s in self.specs if s.group == group]
            if not specs:
                continue
            with gr.Accordion(group, open=group == MODEL_DATA, elem_id=elem_id("group_" + group.split()[0].lower())):
                for i in range(0, len(specs), PER_ROW):
                    with gr.Row():
                        for spec in specs[i:i + PER_ROW]:
                            self.fields[spec.name] = _component(spec, values.get(spec.name))
                if group == SAVING:
                    self.prompts = gr.Textbox(
                        value=values.get(PROMPTS_FIELD, ""), lines=3, elem_id=elem_id("prompts"),
                        label="Sample prompts typed here (one per line, sd-scripts syntax: prompt --n negative --s "
                              "steps --l cfg --d seed --w width --h height); used when sample_prompts is empty")

    def components(self) -> list:
        return [*self.fields.values(), self.prompts]

    # ------------------------------------------------------------------------------------ values

    def values(self, data: Mapping) -> dict[str, Any]:
        """Form values by option name (sample prompts under PROMPTS_FIELD)."""
        out = {name: data[c] for name, c in self.fields.items()}
        out[PROMPTS_FIELD] = data.get(self.prompts, "") or ""
        return out

    def engine_values(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The values the engine takes: typed sample prompts written to a prompt file in the settings folder."""
        out = {k: v for k, v in values.items() if k != PROMPTS_FIELD}
        text = (values.get(PROMPTS_FIELD) or "").strip()
        if text and not str(out.get("sample_prompts") or "").strip():
            name = str(out.get("output_name") or "run").strip() or "run"
            path = Path(self.host.settings_dir()) / "prompts" / f"{name}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n", encoding="utf-8")
            out["sample_prompts"] = str(path)
        return out

    def fill(self, values: Mapping[str, Any]) -> dict:
        """Updates that put `values` into the fields (labels reset)."""
        out = {}
        for spec in self.specs:
            if spec.name in values:
                out[self.fields[spec.name]] = update(value=values[spec.name], label=spec.name)
        if PROMPTS_FIELD in values:
            out[self.prompts] = values[PROMPTS_FIELD]
        return out

    def labels(self, errors: Mapping[str, str]) -> dict:
        """Every field's label: the option name, with the engine's message where there is one."""
        return {c: update(label=f"{name} — ⚠ {errors[name]}" if name in errors else name)
                for name, c in self.fields.items()}

    def check(self, values: Mapping[str, Any], build) -> tuple[Any, dict[str, str], str]:
        """(built object or None, {field: message}, message): type errors of every field first, then whatever
        `build(engine_values)` raises (the engine's ConfigError / DatasetError)."""
        errors = field_errors(values)
        if errors:
            first = next(iter(errors.values()))
            return None, errors, f"{len(errors)} field(s) with a value of the wrong type, e.g. {first}"
        try:
            return build(values), {}, ""
        except ConfigError as exc:
            name = error_field(exc, self.fields)
            return None, ({name: str(exc)} if name else {}), str(exc)
        except LibLoraError as exc:
            return None, {}, str(exc)

    # ------------------------------------------------------------------------------------ last used

    def _last_path(self) -> Path:
        return Path(self.host.settings_dir()) / LAST_USED

    def last_used(self) -> dict[str, Any]:
        path = self._last_path()
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}  # damaged: start from the defaults
        known = {s.name for s in self.specs} | {PROMPTS_FIELD}
        return {k: v for k, v in data.items() if k in known} if isinstance(data, dict) else {}

    def remember(self, values: Mapping[str, Any]) -> None:
        path = self._last_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(values), indent=1, default=str), encoding="utf-8")
        tmp.replace(path)
