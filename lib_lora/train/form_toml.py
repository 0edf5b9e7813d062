"""Run TOMLs <-> training-form values: "Save TOML" writes what `python -m lib_lora train --config FILE` runs, and
"Load TOML" fills the form from any sd-scripts / kohya_ss run TOML (plus its dataset TOML).

Saved files use sd-scripts' option names in one table per form group (sd-scripts and this engine merge one-level
tables, as kohya_ss writes them); paths are written absolute, so the file runs from any working folder.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any

from lib_lora.train import toml_config
from lib_lora.train.schema import ALWAYS_SAVED, GROUPS, NETWORK_ARG, default_values, option_specs, typed_options
from lib_lora.train.toml_write import dumps

HEADER = "LoRA Studio training run: python -m lib_lora train --config {name}"


def _table_name(group: str) -> str:
    return re.sub(r"[^a-z]+", "_", group.lower()).strip("_")


EMBEDDED = "embedded"  # the shipped tiny model: a name, not a path (train.run.EMBEDDED)


def _absolute(value: Any) -> Any:
    if isinstance(value, PurePath) and str(value) != EMBEDDED:
        return str(Path(value).expanduser().resolve())
    if isinstance(value, tuple):
        return [_absolute(v) for v in value]
    return str(value) if isinstance(value, PurePath) else value


def toml_from_form(values: Mapping[str, Any], name: str = "run.toml") -> str:
    """The run TOML of these form values (non-default options, plus the ones every reader wants to see).

    Raises:
        ConfigError: a value the engine does not accept (as `typed_options`).
    """
    typed, _ = typed_options(values)
    tables: dict[str, dict[str, Any]] = {_table_name(g): {} for g in GROUPS}
    for spec in option_specs():
        if spec.name.startswith(NETWORK_ARG) or spec.name not in typed:
            continue
        value = typed[spec.name]
        if value is None or (spec.is_default(value) and spec.name not in ALWAYS_SAVED):
            continue
        tables[_table_name(spec.group)][spec.name] = _absolute(value)
    if typed.get("network_args"):
        tables[_table_name(GROUPS[1])]["network_args"] = list(typed["network_args"])
    return dumps({k: v for k, v in tables.items() if v}, HEADER.format(name=name))


def _dataset_doc_absolute(doc: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """An inline dataset config with every image_dir made absolute (it is written to another folder)."""
    out = {k: v for k, v in doc.items()}
    datasets = []
    for ds in doc.get("datasets", []):
        ds = dict(ds)
        ds["subsets"] = [{**sub, "image_dir": str((base / str(sub["image_dir"])).resolve())} if "image_dir" in sub
                         else dict(sub) for sub in ds.get("subsets", [])]
        datasets.append(ds)
    out["datasets"] = datasets
    return out


def form_from_toml(path: str | Path, dataset_config: str | Path | None = None,
                   inline_dir: Path | None = None) -> tuple[dict[str, Any], list[str]]:
    """Form values from a run TOML (sd-scripts names, any one-level tables) and optionally a dataset TOML.

    A dataset config written inline in the run TOML (`[general]` / `[[datasets]]`) is saved as its own dataset TOML
    in `inline_dir` and named in `dataset_config`. Returns (values, notes): notes list options accepted without
    effect here.

    Raises:
        FileFormatError: not TOML (with the parser's line and column). ConfigError: an unknown option (with the
        closest known name) or a value of the wrong type.
    """
    path = Path(path).resolve()
    flat, inline = toml_config.flatten_run_toml(toml_config.read_toml(path), str(path))
    notes: list[str] = []
    typed = toml_config.convert_options(flat, base_dir=path.parent, notes=notes)
    toml_config._legacy_optimizer_flags(typed)  # noqa: SLF001 - the engine's own mapping of the legacy flags
    values = default_values()
    specs = {s.name: s for s in option_specs()}
    if "network_args" in typed:
        parsed = toml_config.parse_network_args(typed.pop("network_args"))
        for key, value in parsed["args"].items():
            values[NETWORK_ARG + key] = specs[NETWORK_ARG + key].form_value(value)
        typed.update(parsed["blockwise"])
        typed.update(parsed["loraplus"])
    if "optimizer_args" in typed and isinstance(typed["optimizer_args"], Mapping):
        typed["optimizer_args"] = tuple(f"{k}={v}" for k, v in typed["optimizer_args"].items())
    for key, value in typed.items():
        if key in specs:
            values[key] = specs[key].form_value(value)
    if inline is not None and dataset_config is None:
        if inline_dir is None:
            raise ValueError("a run TOML with an inline dataset needs inline_dir")
        inline_dir.mkdir(parents=True, exist_ok=True)
        target = inline_dir / f"{path.stem}-dataset.toml"
        target.write_text(dumps(_dataset_doc_absolute(inline, path.parent), f"datasets of {path}"), encoding="utf-8")
        values["dataset_config"] = str(target)
        notes.append(f"the dataset written inline in {path.name} was saved as {target}")
    if dataset_config is not None:
        values["dataset_config"] = str(Path(dataset_config).resolve())
    return values, notes
