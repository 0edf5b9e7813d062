"""The training options as a form: one `OptionSpec` per option the engine accepts, grouped into sections, with its
type, default, help and choices; and the way back from form values to the engine's config and to a run TOML.

Specs are derived from the engine's own tables (`toml_config.OPTIONS`, the config dataclasses' defaults,
`NetworkArgs` fields, the optimizer/scheduler/network registries), so an option added to the engine appears in the
form with no UI code: it lands in its section's group (or "Advanced"), typed by its declared type. Values are
checked by the engine itself (`convert_options`, `build_config`), so the messages are the engine's `ConfigError`s.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib_lora.errors import ConfigError
from lib_lora.train import config as tc
from lib_lora.train import optimizers, schedulers, toml_config
from lib_lora.train.blockwise import BlockwiseConfig
from lib_lora.train.coerce import field_types
from lib_lora.train.config import NetworkArgs, TrainConfig
from lib_lora.train.data.config import RESIZE_INTERPOLATIONS, DatasetOptions, SubsetOptions
from lib_lora.train.option_help import HELP

MODEL_DATA, NETWORK, OPTIMIZER = "Model & data", "Network", "Optimizer & schedule"
LOSS, CACHING, SAVING, VALIDATION, ADVANCED = ("Loss & noise", "Caching & memory", "Sampling & saving",
                                               "Validation & guard", "Advanced")
GROUPS = (MODEL_DATA, NETWORK, OPTIMIZER, LOSS, CACHING, SAVING, VALIDATION, ADVANCED)
NETWORK_ARG = "network_args."  # form names of `network_args` items: network_args.conv_dim, ...

_SECTION_GROUP = {"model": MODEL_DATA, "data": MODEL_DATA, "dataset": MODEL_DATA, "run": MODEL_DATA,
                  "network": NETWORK, "blockwise": NETWORK, "network_args": NETWORK, "optimizer": OPTIMIZER,
                  "loss": LOSS, "output": SAVING, "sampling": SAVING, "validation": VALIDATION, "guard": VALIDATION,
                  "logging": ADVANCED}
_NAME_GROUP = {
    **{n: CACHING for n in ("cache_latents", "cache_latents_to_disk", "cache_text_encoder_outputs",
                            "cache_text_encoder_outputs_to_disk", "cache_dir", "vae_batch_size",
                            "gradient_checkpointing", "mixed_precision", "no_half_vae")},
    **{n: SAVING for n in ("resume", "save_state", "save_state_on_train_end")},
    **{n: ADVANCED for n in ("v2", "v_parameterization", "sdxl", "vae", "max_token_length", "caption_separator",
                             "keep_tokens_separator", "caption_prefix", "caption_suffix", "bucket_reso_steps",
                             "resize_interpolation", "validation_seed", "dim_from_weights")},
    "optimizer_args": OPTIMIZER, "gradient_accumulation_steps": OPTIMIZER,
    "output_dir": MODEL_DATA, "output_name": MODEL_DATA,
}
# Shown first in their group, in this order (the rest follow in the engine's declaration order).
_FIRST = ("pretrained_model_name_or_path", "train_data_dir", "reg_data_dir", "dataset_config", "output_dir",
          "output_name", "resolution", "train_batch_size", "max_train_steps", "max_train_epochs", "seed",
          "network_module", "network_dim", "network_alpha", "optimizer_type", "learning_rate", "lr_scheduler")
# Legacy spellings and the assembled list: the form shows their modern / itemised forms.
HIDDEN = {"use_8bit_adam", "use_lion_optimizer", "caption_extention", "network_args"}
# Always written to a saved TOML, even at their defaults: what a reader of the file wants to see.
ALWAYS_SAVED = ("pretrained_model_name_or_path", "train_data_dir", "dataset_config", "output_dir", "output_name",
                "resolution", "max_train_steps", "seed", "network_module", "network_dim", "network_alpha",
                "optimizer_type", "learning_rate", "lr_scheduler", "train_batch_size")


def _choices() -> dict[str, tuple[str, ...]]:
    """Options whose values come from a registry or a fixed list of the engine."""
    return {"network_module": tuple(tc.NETWORK_MODULES), "optimizer_type": tuple(optimizers.optimizer_names()),
            "lr_scheduler": tuple(schedulers.scheduler_names()), "mixed_precision": tc.MIXED_PRECISIONS,
            "save_precision": tc.SAVE_PRECISIONS, "sample_sampler": tc.SAMPLE_SAMPLERS, "log_with": tc.LOG_WITH,
            "resize_interpolation": RESIZE_INTERPOLATIONS, "save_model_as": ("safetensors",),
            NETWORK_ARG + "algo": tc.LYCORIS_ALGOS, NETWORK_ARG + "preset": tc.LYCORIS_PRESETS}


def _text(value: Any) -> str:
    """A value as typed in a text field: 5.0 reads "5", 0.0001 stays "0.0001"."""
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    return str(value)


@dataclass(frozen=True)
class OptionSpec:
    """One form field: an engine option (or a `network_args` item), its type, default, choices and help."""

    name: str
    group: str
    hint: Any
    default: Any
    choices: tuple[str, ...] = ()
    help: str = ""

    @property
    def optional(self) -> bool:
        return typing.get_origin(self.hint) in (typing.Union, types.UnionType) and \
            type(None) in typing.get_args(self.hint)

    @property
    def widget(self) -> str:
        """bool | choice | int | float | text (optional numbers, lists, paths and text are typed as text)."""
        if self.hint is bool:
            return "bool"
        if self.choices:
            return "choice"
        if self.hint in (int, float):
            return "int" if self.hint is int else "float"
        return "text"

    def form_value(self, value: Any) -> Any:
        """An option value as its widget shows it (None: empty)."""
        if self.widget in ("bool", "int", "float"):
            return self.default if value is None else value
        if value is None:
            return ""
        if isinstance(value, tuple) and len(value) == 2 and value[0] == value[1] and self.name == "resolution":
            return str(value[0])
        if isinstance(value, (tuple, list)):
            return ",".join(_text(v) for v in value) if all(not isinstance(v, str) for v in value) else \
                " ".join(_text(v) for v in value)
        return _text(value)

    def is_default(self, value: Any) -> bool:
        if value in (None, ""):
            return True
        return self.form_value(value) == self.form_value(self.default)


def _defaults(*classes: type) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out.setdefault(f.name, f.default)
            elif f.default_factory is not dataclasses.MISSING:
                out.setdefault(f.name, f.default_factory())
    return out


def option_specs() -> list[OptionSpec]:
    """Every option of the engine as a form field, in group order (see module docstring)."""
    defaults = _defaults(*toml_config.SECTIONS.values(), BlockwiseConfig, SubsetOptions, DatasetOptions)
    defaults.pop("datasets", None)
    choices = _choices()
    specs = []
    for name, option in toml_config.OPTIONS.items():
        if name in HIDDEN:
            continue
        hint = option.hint
        group = _NAME_GROUP.get(name, _SECTION_GROUP.get(option.section, ADVANCED))
        specs.append(OptionSpec(name, group, hint, defaults.get(name), choices.get(name, ()), HELP.get(name, "")))
    arg_defaults = _defaults(NetworkArgs)
    for name, hint in field_types(NetworkArgs).items():
        full = NETWORK_ARG + name
        specs.append(OptionSpec(full, NETWORK, hint, arg_defaults.get(name), choices.get(full, ()),
                                HELP.get(full, "network argument (network_args) of LoRA / LyCORIS")))
    first = {n: i for i, n in enumerate(_FIRST)}
    order = {g: i for i, g in enumerate(GROUPS)}
    return sorted(specs, key=lambda s: (order[s.group], first.get(s.name, len(first))))


def spec_map() -> dict[str, OptionSpec]:
    return {s.name: s for s in option_specs()}


# ------------------------------------------------------------------------------------------- form -> engine


def _raw_options(values: Mapping[str, Any], specs: Mapping[str, OptionSpec]) -> tuple[dict[str, Any], list[str]]:
    """Form values -> {sd-scripts name: value as typed} (unset and default booleans left out), network args."""
    raw: dict[str, Any] = {}
    args: list[str] = []
    for name, value in values.items():
        spec = specs.get(name)
        if spec is None or value is None or (isinstance(value, str) and not value.strip()):
            continue
        if spec.widget == "bool" and bool(value) == bool(spec.default):
            continue
        if name.startswith(NETWORK_ARG):
            if not spec.is_default(value):
                args.append(f"{name[len(NETWORK_ARG):]}={value}")
            continue
        raw[name] = value.strip() if isinstance(value, str) else value
    return raw, args


def field_errors(values: Mapping[str, Any]) -> dict[str, str]:
    """{form field: the engine's message} for every value that is not of its option's type (checked one by one,
    so every such field is named at once)."""
    specs = spec_map()
    raw, args = _raw_options(values, specs)
    errors: dict[str, str] = {}
    for name, value in raw.items():
        try:
            toml_config.convert_options({name: value}, base_dir=None, notes=[])
        except ConfigError as exc:
            errors[name] = str(exc)
    for item in args:
        try:
            toml_config.parse_network_args([item])
        except ConfigError as exc:
            errors[NETWORK_ARG + item.partition("=")[0]] = str(exc)
    return errors


def error_field(exc: ConfigError, names: set[str] | Mapping[str, Any]) -> str | None:
    """The form field an engine ConfigError is about (None when it is about no single field)."""
    field = str(exc.field).split(": ")[-1]
    candidates = [field, NETWORK_ARG + field.removeprefix(NETWORK_ARG), field.split(".")[-1],
                  {"batch_size": "train_batch_size", "datasets": "train_data_dir", "subsets": "train_data_dir",
                   "image_dir": "train_data_dir"}.get(field.split(".")[-1], "")]
    return next((c for c in candidates if c in names), None)


def typed_options(values: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Form values -> typed options with sd-scripts' names (what `build_config` takes), and the engine's notes."""
    raw, args = _raw_options(values, spec_map())
    notes: list[str] = []
    typed = toml_config.convert_options(raw, base_dir=None, notes=notes)
    if args:
        typed["network_args"] = tuple(args)
    return typed, notes


def config_from_form(values: Mapping[str, Any]) -> TrainConfig:
    """The engine's config for these form values; raises the engine's ConfigError / DatasetError as is."""
    typed, notes = typed_options(values)
    if typed.get("dataset_config") is not None:
        from lib_lora.train.toml_config import read_toml

        path = Path(typed["dataset_config"]).resolve()
        return toml_config.build_config(typed, dataset_doc=read_toml(path), dataset_base=path.parent, notes=notes,
                                        dataset_source=str(path))
    return toml_config.build_config(typed, notes=notes)


def default_values() -> dict[str, Any]:
    """The form at the engine's defaults."""
    return {s.name: s.form_value(s.default) for s in option_specs()}


__all__ = ["ALWAYS_SAVED", "GROUPS", "OptionSpec", "config_from_form", "default_values", "error_field", "field_errors",
           "option_specs", "spec_map", "typed_options"]
