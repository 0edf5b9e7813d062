"""A small TOML writer for the run and dataset TOMLs we write (tomllib only reads).

Supports what those files hold: strings, booleans, integers, finite floats, paths (as strings), arrays of those,
tables, and arrays of tables (`[[datasets]]`, `[[datasets.subsets]]`). The output reads back with `tomllib` to
the same values (tested).
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

_BARE = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def _key(name: str) -> str:
    return name if name and set(name) <= _BARE else json.dumps(name, ensure_ascii=False)


def _scalar(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: {value} cannot be written to TOML")
        text = repr(value)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(value, PurePath):
        value = str(value)
    if isinstance(value, str):
        # JSON's escapes are TOML basic-string escapes (\" \\ \n \t \uXXXX)
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Sequence):
        return "[" + ", ".join(_scalar(v, where) for v in value) + "]"
    raise TypeError(f"{where}: cannot write {type(value).__name__} to TOML")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and bool(value) and \
        all(isinstance(v, Mapping) for v in value)


def _table(doc: Mapping[str, Any], path: list[str], lines: list[str]) -> None:
    nested = []
    for name, value in doc.items():
        if value is None:
            continue  # TOML has no null: an unset option is left out
        if isinstance(value, Mapping) or _is_table_array(value):
            nested.append((name, value))
        else:
            lines.append(f"{_key(name)} = {_scalar(value, '.'.join([*path, name]))}")
    for name, value in nested:
        sub = [*path, name]
        header = ".".join(_key(p) for p in sub)
        items = [value] if isinstance(value, Mapping) else list(value)
        for item in items:
            lines += ["", f"[{header}]" if isinstance(value, Mapping) else f"[[{header}]]"]
            _table(item, sub, lines)


def dumps(doc: Mapping[str, Any], header: str = "") -> str:
    """TOML text of `doc` (None values are left out). `header` lines are written first as comments."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()] if header else []
    _table(doc, [], lines)
    return "\n".join(lines).strip("\n") + "\n"
