"""Axis values as users type them in the web UI's X/Y/Z plot: lists and ranges.

    0, 0.5, 1           a list
    0-1 (+0.25)         a range with a step: 0, 0.25, 0.5, 0.75, 1   (a negative step counts down: 1-0 (-0.5))
    0-1 [5]             a range with a count: 5 values from 0 to 1, evenly spaced
    1-4                 whole numbers only: a range with step 1 (1, 2, 3, 4)
    Euler a, "DPM++ 2M" text: comma-separated; quotes keep commas inside a value ("1,0,1,...")

Items mix freely (`0, 0.2-0.4 (+0.1), 1`). Errors name the axis field and the item that failed.
"""
from __future__ import annotations

import csv
import math
import re

from lib_lora.errors import ConfigError

VALUE_TYPES = ("float", "int", "str")
MAX_VALUES = 1000  # a typo such as `0-1 (+0.0001)` must not plan 10000 images
_NUMBER = r"[+-]?\s*(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_RANGE = re.compile(rf"^\s*({_NUMBER})\s*-\s*({_NUMBER})\s*(?:\(\s*({_NUMBER})\s*\)|\[\s*(\d+)\s*\])?\s*$")


def split_items(text: str) -> list[str]:
    """Comma-separated items; double quotes keep commas inside an item (the web UI reads them as CSV)."""
    rows = list(csv.reader([text], skipinitialspace=True))
    return [item.strip() for item in (rows[0] if rows else []) if item.strip()]


def _num(text: str) -> float:
    return float(text.replace(" ", ""))


def _clean(value: float) -> float:
    # 0.1 + 0.2 style sums would label a cell 0.30000000000000004
    return round(value, 10) + 0.0


def _expand_range(item: str, as_int: bool, field: str) -> list[float] | None:
    """The values of one range item, or None when `item` is not a range."""
    match = _RANGE.match(item)
    if match is None:
        return None
    start, end = _num(match.group(1)), _num(match.group(2))
    step, count = match.group(3), match.group(4)
    if count is not None:
        n = int(count)
        if n < 1:
            raise ConfigError(field, item, "a range [N] needs N >= 1")
        values = [start] if n == 1 else [start + (end - start) * i / (n - 1) for i in range(n)]
    else:
        if step is None and not as_int:
            raise ConfigError(field, item, "a range of decimal values needs a step `a-b (+s)` or a count `a-b [n]`")
        delta = _num(step) if step is not None else (1.0 if end >= start else -1.0)
        if delta == 0 or (end - start) * delta < 0:
            raise ConfigError(field, item, "the step must be non-zero and point from the start towards the end")
        n = math.floor((end - start) / delta + 1e-9) + 1
        if n > MAX_VALUES:
            raise ConfigError(field, item, f"{n} values; at most {MAX_VALUES}")
        values = [start + delta * i for i in range(n)]
    return [float(round(v)) for v in values] if as_int else [_clean(v) for v in values]


def _number_item(item: str, as_int: bool, field: str) -> list[float]:
    expanded = _expand_range(item, as_int, field)
    if expanded is not None:
        return expanded
    try:
        value = _num(item)
    except ValueError:
        kind = "a whole number" if as_int else "a number"
        raise ConfigError(field, item, f"expected {kind} or a range such as 0-1 (+0.25) or 0-1 [5]") from None
    if not math.isfinite(value):
        raise ConfigError(field, item, "must be finite")
    if as_int and value != int(value):
        raise ConfigError(field, item, "must be a whole number")
    return [value]


def parse_values(text: str, value_type: str, field: str = "values") -> list:
    """The values of one axis, typed: floats, ints or strings.

    Raises:
        ConfigError(field, item, reason): an item that is not a value of this type, an empty list, too many values.
    """
    if value_type not in VALUE_TYPES:
        raise ValueError(f"value_type must be one of {VALUE_TYPES}, not {value_type!r}")
    text = text or ""
    try:
        items = split_items(text)
    except csv.Error as exc:
        raise ConfigError(field, text, f"cannot split into values ({exc})") from None
    if not items:
        raise ConfigError(field, text, "no values given")
    if value_type == "str":
        values: list = items
    else:
        as_int = value_type == "int"
        numbers = [v for item in items for v in _number_item(item, as_int, field)]
        values = [int(v) for v in numbers] if as_int else numbers
    if len(values) > MAX_VALUES:
        raise ConfigError(field, text, f"{len(values)} values; at most {MAX_VALUES}")
    return values


def format_value(value) -> str:
    """How a value reads in a label or an infotext: 0.5, 1, Euler a."""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
