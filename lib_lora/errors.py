"""Exceptions of lib_lora. Every error names what was wrong: the file, the key, the field, the shapes."""
from __future__ import annotations

from typing import Any


class LibLoraError(Exception):
    """Base class: anything lib_lora raises on purpose for bad input or an impossible request."""


class ConfigError(LibLoraError):
    """A configuration field has a value that cannot be used."""

    def __init__(self, field: str, value: Any, reason: str):
        self.field, self.value, self.reason = field, value, reason
        super().__init__(f"{field}={value!r}: {reason}")


class FileFormatError(LibLoraError):
    """A file could not be read as what it claims to be (truncated, corrupt, wrong format, pickle)."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


class KeyMapError(LibLoraError):
    """Keys of a file do not fit the model (another architecture, unknown spelling)."""


class ShapeMismatchError(LibLoraError):
    """A tensor in a file does not fit the module it targets."""

    def __init__(self, source: str, key: str, expected: Any, actual: Any, detail: str = ""):
        self.source, self.key, self.expected, self.actual = source, key, expected, actual
        extra = f" ({detail})" if detail else ""
        super().__init__(f"{source}: {key}: expected shape {tuple(expected)}, got {tuple(actual)}{extra}")


class NonFiniteError(LibLoraError):
    """NaN or inf where finite numbers are required."""

    def __init__(self, source: str, key: str, what: str = "values"):
        self.source, self.key = source, key
        super().__init__(f"{source}: {key}: contains NaN or inf {what}")


class ArchMismatchError(KeyMapError):
    """A LoRA made for one architecture (e.g. SDXL) applied to a model of another (e.g. SD1)."""


class BlockWeightError(LibLoraError):
    """A block-weight (lbw) string or preset cannot be parsed."""


class PromptSyntaxError(LibLoraError):
    """A `<lora:...>` tag in a prompt is malformed."""
