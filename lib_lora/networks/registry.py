"""Registry of LoRA-family algorithms, and detection of the algorithm of a module from its file suffixes."""
from __future__ import annotations

from lib_lora.networks.base import NetworkModule

ALGORITHMS: dict[str, type[NetworkModule]] = {}


def register(cls: type[NetworkModule]) -> type[NetworkModule]:
    """Class decorator: one line per algorithm (lower-case, unique name)."""
    name = cls.algo
    if not name or name != name.lower():
        raise ValueError(f"algorithm name must be non-empty lower case, not {name!r}")
    if name in ALGORITHMS:
        raise ValueError(f"algorithm {name!r} registered twice")
    ALGORITHMS[name] = cls
    return cls


def detect(suffixes: set[str]) -> type[NetworkModule] | None:
    """The algorithm whose detection keys appear among a module's file suffixes (first match wins)."""
    for cls in ALGORITHMS.values():
        if cls.claims(suffixes):
            return cls
    return None
