"""What every operation shares: progress and cancel callbacks, output-path checks, devices and dtypes."""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from lib_lora.errors import ConfigError, LibLoraError

Progress = Callable[[int, int, str], None]  # (done, total, message)
ShouldStop = Callable[[], bool]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
DEVICES = ("auto", "cpu", "cuda")


class OperationCancelled(LibLoraError):
    """`should_stop()` said stop: nothing was written (a partial output never replaces anything)."""


def check_dtype(field: str, value: str | None, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if value not in DTYPES:
        raise ConfigError(field, value, f"must be one of {', '.join(DTYPES)}" + (" or None" if allow_none else ""))


def check_device(value: str) -> None:
    if value not in DEVICES and not value.startswith("cuda:"):
        raise ConfigError("device", value, "must be 'auto', 'cpu', 'cuda' or 'cuda:N'")


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when present, else the CPU; asking for CUDA without it is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", name, "CUDA is not available on this machine")
    return torch.device(name)


def check_positive(field: str, value: int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(field, value, "must be a whole number >= 1")


def check_output(output: str | os.PathLike, inputs: Iterable[str | os.PathLike], force: bool,
                 field: str = "output") -> Path:
    """The output path, checked before any work: a .safetensors name, not one of the inputs, not an existing
    file unless `force`, and a folder that exists or can be made."""
    out = Path(output).expanduser()
    if out.suffix.lower() != ".safetensors":
        raise ConfigError(field, str(out), "outputs are written as .safetensors")
    for given in inputs:
        src = Path(given).expanduser()
        if out.resolve() == src.resolve() or (out.exists() and src.exists() and os.path.samefile(out, src)):
            raise ConfigError(field, str(out), f"is the input {src}; choose another output path (inputs are never "
                                               "overwritten)")
    if out.is_dir():
        raise ConfigError(field, str(out), "is a folder")
    if out.exists() and not force:
        raise ConfigError(field, str(out), "exists; pass force=True (--force) to replace it")
    return out


def check_input(field: str, path: str | os.PathLike) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(field, str(path), "file not found")
    return str(p)


@dataclass
class Ticker:
    """Reports progress and honours cancel requests at each step of an operation."""

    total: int
    progress: Progress | None = None
    should_stop: ShouldStop | None = None
    done: int = 0
    started: float = 0.0

    def __post_init__(self):
        self.started = time.perf_counter()

    def check(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise OperationCancelled(f"cancelled after {self.done} of {self.total} steps; nothing was written")

    def step(self, message: str = "", n: int = 1) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total, message)
        self.check()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started
