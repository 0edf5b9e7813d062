"""User-written config values -> checked, typed values: the `ConfigError` checks and the TOML/command-line coercion.

Both work from the option name the user wrote, so every failure reads `ConfigError(field, value, reason)`.
`coerce` follows a config dataclass's declared field types (`field_types`): a TOML value must already have a
compatible type, a command-line string is parsed ("true", "1e-4", "512,768", "conv_dim=4 conv_alpha=1").
"""
from __future__ import annotations

import shlex
import types
import typing
from pathlib import Path
from typing import Any

from lib_lora.errors import ConfigError

# ---------------------------------------------------------------------------------------------------- checks


def check(ok: bool, name: str, value: Any, reason: str) -> None:
    """Raise ConfigError(name, value, reason) unless `ok`."""
    if not ok:
        raise ConfigError(name, value, reason)


def check_positive(name: str, value: float | None, *, allow_zero: bool = False) -> None:
    """None passes; a number must be > 0 (or >= 0)."""
    if value is not None:
        check(value >= 0 if allow_zero else value > 0, name, value, "must be >= 0" if allow_zero else "must be > 0")


def check_fraction(name: str, value: float | None, *, inclusive_one: bool = False) -> None:
    """None passes; a number must be in [0, 1) (or [0, 1])."""
    if value is not None:
        ok = 0.0 <= value <= 1.0 if inclusive_one else 0.0 <= value < 1.0
        check(ok, name, value, "must be in [0, 1]" if inclusive_one else "must be in [0, 1)")


def check_choice(name: str, value: Any, choices: tuple) -> None:
    """`value` must be one of `choices`."""
    check(value in choices, name, value, f"must be one of {', '.join(map(str, choices))}")


# ---------------------------------------------------------------------------------------------------- coercion

_TRUE, _FALSE, _NONE = ("true", "yes", "on", "1"), ("false", "no", "off", "0"), ("none", "null")
_INVALID = object()


def field_types(cls: type) -> dict[str, Any]:
    """Declared field types of a config dataclass (annotations resolved)."""
    return typing.get_type_hints(cls)


def coerce(value: Any, hint: Any, *, name: str, base_dir: Path | None = None) -> Any:
    """Convert a TOML value or a command-line string to the declared type `hint`.

    Strings are parsed ("true", "1e-4", "512,768", "conv_dim=4 conv_alpha=1" for a list of strings); TOML
    values must already have a compatible type (an int for an int field; a float field takes ints). Relative
    paths are joined to `base_dir`. Raises ConfigError(name, value, "expected ...") otherwise.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, args, name=name, base_dir=base_dir)
    if origin is tuple:
        return _coerce_tuple(value, args, name=name, base_dir=base_dir)
    if hint is Any:
        return value
    parsed = _coerce_scalar(value, hint, base_dir)
    if parsed is _INVALID:
        raise ConfigError(name, value, f"expected {_type_name(hint)}")
    return parsed
def _coerce_scalar(value: Any, hint: Any, base_dir: Path | None) -> Any:
    text = value.strip() if isinstance(value, str) else None
    if hint is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if text is not None and text.lstrip("+-").isdigit():
            return int(text)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if text is not None:
            try:
                return float(text)
            except ValueError:
                return _INVALID
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is Path:
        if isinstance(value, (str, Path)) and str(value).strip():
            path = Path(str(value).strip()).expanduser()
            return path if path.is_absolute() or base_dir is None else base_dir / path
    else:
        raise TypeError(f"no coercion for field type {hint!r}")
    return _INVALID


def _coerce_union(value: Any, members: tuple, *, name: str, base_dir: Path | None) -> Any:
    if type(None) in members and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE)):
        return None
    options = [m for m in members if m is not type(None)]
    if isinstance(value, str):  # "1,2" must become a tuple before `str` accepts it as text
        options.sort(key=lambda m: m is str)
    for member in options:
        try:
            return coerce(value, member, name=name, base_dir=base_dir)
        except ConfigError:
            continue
    raise ConfigError(name, value, f"expected {' or '.join(_type_name(m) for m in options)}")


def _coerce_tuple(value: Any, args: tuple, *, name: str, base_dir: Path | None) -> tuple:
    variadic = len(args) == 2 and args[1] is Ellipsis
    elem_types = [args[0]] if variadic else list(args)
    if isinstance(value, str):
        # A list of strings is a command line (network_args); a list of numbers is comma-separated.
        items: list[Any] = shlex.split(value) if elem_types[0] is str else [v for v in value.split(",") if v.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    if not variadic and len(items) == 1 and len(elem_types) == 2:
        items = items * 2  # "512" means 512x512, as sd-scripts' resolution
    if not variadic and len(items) != len(elem_types):
        raise ConfigError(name, value, f"expected {len(elem_types)} values, got {len(items)}")
    types_ = elem_types * len(items) if variadic else elem_types
    return tuple(coerce(v, t, name=name, base_dir=base_dir) for v, t in zip(items, types_))


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        inner = _type_name(args[0])
        return f"a list of {inner}s" if args[-1] is Ellipsis else f"{len(args)} {inner}s (or one for all)"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "text", Path: "a path"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))
