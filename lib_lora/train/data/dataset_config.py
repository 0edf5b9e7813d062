"""Resolve datasets from a dataset TOML (`[general]` / `[[datasets]]` / `[[datasets.subsets]]`) or kohya folders.

Inheritance is sd-scripts': a subset option comes from the subset, else its dataset, else `[general]`, else
the run options (top-level TOML keys / command line), else the default. Relative `image_dir`s are resolved
against the dataset TOML's folder. Keys are checked at each level; an unknown key names the closest known one.
"""
from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lib_lora.errors import ConfigError
from lib_lora.train.coerce import coerce, field_types
from lib_lora.train.data.config import DatasetConfig, DatasetOptions, SubsetConfig, SubsetOptions
from lib_lora.train.data.folders import kohya_dirs, list_images

SUBSET_OPTION_TYPES = field_types(SubsetOptions)
DATASET_OPTION_TYPES = field_types(DatasetOptions)
SUBSET_ONLY_TYPES = {"image_dir": Path, "is_reg": bool, "metadata_file": Path, "conditioning_data_dir": Path}
# sd-scripts dataset keys with no effect here, and why.
DATASET_NO_EFFECT = {
    "cache_info": "image sizes are read when the dataset is built; nothing to cache",
}
# Run options that people also write into dataset TOMLs (sd-scripts refuses them there): a note says where they go.
RUN_ONLY = {"debug_dataset": "a run option: give it in the run TOML or as --debug_dataset"}
# sd-scripts dataset keys we do not implement: accepted only at their default value.
DATASET_UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "face_crop_aug_range": (None, "face-crop augmentation is not implemented"),
    "token_warmup_min": (1, "token warmup is not implemented"),
    "token_warmup_step": (0, "token warmup is not implemented"),
    "custom_attributes": (None, "custom attributes are not implemented"),
    "network_multiplier": (1.0, "per-dataset network multipliers are not implemented"),
}


def suggest(name: str, known: list[str] | set[str]) -> str:
    """'; did you mean X?' for the closest known name, or ''."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _typed_table(table: Any, allowed: dict[str, Any], where: str, base_dir: Path | None,
                 notes: list[str]) -> dict[str, Any]:
    if not isinstance(table, Mapping):
        raise ConfigError(where, table, "expected a table")
    typed: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{where}.{key}" if where else key
        if key in DATASET_NO_EFFECT:
            notes.append(f"{name}: accepted, no effect here ({DATASET_NO_EFFECT[key]})")
        elif key in RUN_ONLY:
            notes.append(f"{name}: no effect in a dataset TOML ({RUN_ONLY[key]})")
        elif key in DATASET_UNSUPPORTED:
            default, reason = DATASET_UNSUPPORTED[key]
            if value != default:
                raise ConfigError(name, value, f"not supported: {reason}")
        elif key in SUBSET_ONLY_TYPES and key not in allowed:
            raise ConfigError(name, value, "belongs to a subset: write it in [[datasets.subsets]]")
        elif key not in allowed:
            raise ConfigError(name, value, f"unknown dataset option{suggest(key, allowed)}")
        else:
            typed[key] = coerce(value, allowed[key], name=name, base_dir=base_dir)
    return typed


Level = tuple[str, Mapping[str, Any]]  # (where it was written, its typed values); "" = run options


def _inherit(names: Any, levels: list[Level]) -> tuple[dict[str, Any], dict[str, str]]:
    """Each option from the first level that sets it, and where that was (to name it in errors)."""
    values, origins = {}, {}
    for name in names:
        for where, level in levels:
            if level.get(name) is not None:
                values[name], origins[name] = level[name], where
                break
    return values, origins


def _build(cls: type, values: dict[str, Any], origins: dict[str, str], where: str) -> Any:
    """Construct a config dataclass; a ConfigError names the TOML location the bad value came from."""
    try:
        return cls(**values)
    except ConfigError as exc:
        place = origins.get(exc.field, where)
        raise ConfigError(f"{place}.{exc.field}" if place else exc.field, exc.value, exc.reason) from None


def _subset(levels: list[Level], subset: Mapping[str, Any], where: str) -> SubsetConfig:
    if subset.get("image_dir") is None and subset.get("metadata_file") is None:
        raise ConfigError(f"{where}.image_dir", None, "every subset needs an image_dir (or a metadata_file)")
    values, origins = _inherit(SUBSET_OPTION_TYPES, [(where, subset), *levels])
    values.update({k: subset[k] for k in SUBSET_ONLY_TYPES if subset.get(k) is not None})
    return _build(SubsetConfig, values, origins, where)


def resolve_datasets(toml: Mapping[str, Any], *, base_dir: Path, fallback: Mapping[str, Any],
                     source: str = "dataset_config") -> tuple[tuple[DatasetConfig, ...], list[str]]:
    """Datasets of a dataset TOML, and notes (options accepted without effect).

    Args:
        toml: the parsed TOML (keys "general" and "datasets").
        base_dir: folder that relative image_dir paths are relative to (the TOML's folder).
        fallback: typed run options with subset/dataset option names (e.g. {"flip_aug": True, "batch_size": 2}).
        source: how errors name the file.
    """
    notes: list[str] = []
    unknown = set(toml) - {"general", "datasets"}
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"{source}: {key}", toml[key], "a dataset TOML has only [general] and [[datasets]]"
                          + suggest(key, {"general", "datasets"}))
    general_types = {**SUBSET_OPTION_TYPES, **DATASET_OPTION_TYPES}
    general = _typed_table(toml.get("general", {}), general_types, "general", base_dir, notes)
    raw_datasets = toml.get("datasets", [])
    if not isinstance(raw_datasets, list) or not raw_datasets:
        raise ConfigError(f"{source}: datasets", raw_datasets, "needs at least one [[datasets]] table")
    datasets = []
    for i, raw in enumerate(raw_datasets):
        where = f"datasets[{i}]"
        raw = dict(raw) if isinstance(raw, Mapping) else raw
        subsets_raw = raw.pop("subsets", None) if isinstance(raw, dict) else None
        dataset = _typed_table(raw, general_types, where, base_dir, notes)
        if not isinstance(subsets_raw, list) or not subsets_raw:
            raise ConfigError(f"{where}.subsets", subsets_raw, "needs at least one [[datasets.subsets]] table")
        levels: list[Level] = [(where, dataset), ("general", general), ("", fallback)]
        subset_types = {**SUBSET_OPTION_TYPES, **SUBSET_ONLY_TYPES}
        subsets = tuple(
            _subset(levels, _typed_table(s, subset_types, f"{where}.subsets[{j}]", base_dir, notes),
                    f"{where}.subsets[{j}]")
            for j, s in enumerate(subsets_raw))
        values, origins = _inherit(DATASET_OPTION_TYPES, levels)
        datasets.append(_build(DatasetConfig, {**values, "subsets": subsets}, origins, where))
    return tuple(datasets), notes


def _run_options_dataset(subsets: list[dict[str, Any]], fallback: Mapping[str, Any], where: str) -> DatasetConfig:
    """One dataset whose options all come from the run (no dataset TOML): a subset per dict of its own values."""
    built = []
    for own in subsets:
        values, origins = _inherit(SUBSET_OPTION_TYPES, [("", fallback)])
        values.update(own)
        built.append(_build(SubsetConfig, values, origins, where))
    values, origins = _inherit(DATASET_OPTION_TYPES, [("", fallback)])
    return _build(DatasetConfig, {**values, "subsets": tuple(built)}, origins, where)


def datasets_from_folders(train_data_dir: Path, reg_data_dir: Path | None, *,
                          fallback: Mapping[str, Any]) -> tuple[tuple[DatasetConfig, ...], list[str]]:
    """One dataset from kohya folders: a subset per `<repeats>_<name>` folder (reg folders marked is_reg)."""
    dirs, notes = kohya_dirs(train_data_dir, is_reg=False, option="train_data_dir")
    if reg_data_dir is not None:
        reg_dirs, reg_notes = kohya_dirs(reg_data_dir, is_reg=True, option="reg_data_dir")
        dirs, notes = dirs + reg_dirs, notes + reg_notes
    subsets = [{"image_dir": d.path, "is_reg": d.is_reg, "num_repeats": d.num_repeats,
                **({} if d.class_tokens is None else {"class_tokens": d.class_tokens})} for d in dirs]
    return (_run_options_dataset(subsets, fallback, ""),), notes


def datasets_from_metadata(in_json: Path, train_data_dir: Path | None, *,
                           fallback: Mapping[str, Any]) -> tuple[tuple[DatasetConfig, ...], list[str]]:
    """sd-scripts' fine-tuning method (`in_json` without a dataset TOML): one subset of the images the metadata
    lists, relative keys resolved against train_data_dir; repeats from `dataset_repeats` (in `fallback` as
    num_repeats)."""
    subset = {"metadata_file": in_json, **({} if train_data_dir is None else {"image_dir": train_data_dir})}
    return (_run_options_dataset([subset], fallback, "in_json"),), []


def datasets_from_run(opts: Mapping[str, Any], *,
                      fallback: Mapping[str, Any]) -> tuple[tuple[DatasetConfig, ...], list[str]]:
    """Datasets from run options without a dataset TOML: `in_json` (fine-tuning metadata) or `train_data_dir`
    (kohya folders, with `reg_data_dir`)."""
    if opts.get("in_json") is not None:
        datasets, notes = datasets_from_metadata(opts["in_json"], opts.get("train_data_dir"), fallback=fallback)
        if opts.get("reg_data_dir"):
            notes.append("reg_data_dir ignored: in_json (fine-tuning metadata) has no regularisation images")
        return datasets, notes
    if opts.get("train_data_dir") is not None:
        return datasets_from_folders(opts["train_data_dir"], opts.get("reg_data_dir"), fallback=fallback)
    raise ConfigError("train_data_dir", None, "no images: give train_data_dir (kohya folders), in_json (with "
                      "train_data_dir) or dataset_config (a dataset TOML)")


def validation_datasets(folder: Path, *, fallback: Mapping[str, Any]) -> tuple[DatasetConfig, ...]:
    """Datasets for a separate validation folder: its own images (repeats 1), or its kohya sub-folders."""
    if not list_images(folder):
        return datasets_from_folders(folder, None, fallback=fallback)[0]
    return (_run_options_dataset([{"image_dir": folder, "num_repeats": 1}], fallback, "validation_data_dir"),)
