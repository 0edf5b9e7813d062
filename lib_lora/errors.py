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


class WriteError(LibLoraError, OSError):
    """A file could not be written (disk full, no permission); no partial file was left, the old one is intact."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = str(path), reason
        LibLoraError.__init__(self, f"{path}: could not be written: {reason}")

    def __str__(self) -> str:
        return f"{self.path}: could not be written: {self.reason}"


def is_write_failure(exc: BaseException) -> bool:
    """An exception that means "the bytes could not be written": an OSError, safetensors' SafetensorError carrying
    an I/O error, or torch.save's RuntimeError from its stream writer."""
    text = str(exc)
    return (isinstance(exc, OSError) or (type(exc).__name__ == "SafetensorError" and "Io" in text)
            or (isinstance(exc, RuntimeError) and ("PytorchStreamWriter" in text or "file write failed" in text)))


def describe_os_error(exc: BaseException) -> str:
    """A short reason for a failed write: 'no space left on device' whatever layer reported it."""
    text = str(exc)
    if getattr(exc, "errno", None) == 28 or "No space left" in text or "StorageFull" in text:
        return "no space left on device"
    if getattr(exc, "errno", None) == 13 or "Permission denied" in text:
        return "permission denied"
    if getattr(exc, "strerror", None):
        return exc.strerror
    return text.splitlines()[0] if text else type(exc).__name__


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
