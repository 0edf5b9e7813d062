"""Saving what training produces: LoRA files (atomic, with metadata, keep-last-N) and resumable state folders.

A state folder holds the network tensors (float32), the optimizer and scheduler state, and `train_state.json`
(step, epoch, data-sampler position, seed, lr scale, the network's module shapes). It is written to a temporary
folder and renamed into place, so an interrupted save leaves the previous state whole. Loading checks that the
network has the same modules and shapes before anything is restored.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lib_lora.errors import ConfigError, WriteError, describe_os_error, is_write_failure
from lib_lora.io import load_file, save_file, temp_prefix

STATE_FILE = "train_state.json"
STATE_VERSION = 1


@dataclass
class TrainState:
    """The loop's position, enough to continue exactly where it stopped."""

    step: int
    epoch: int
    sampler: dict[str, Any]
    seed: int
    lr_scale: float = 1.0
    rollbacks: int = 0
    shapes: dict[str, list[int]] = field(default_factory=dict)
    version: int = STATE_VERSION


def network_shapes(tensors: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in sorted(tensors.items())}


class SaveRegistry:
    """Remembers which files/folders a run wrote per kind, and deletes the oldest beyond keep-last-N."""

    def __init__(self):
        self.saved: dict[str, list[Path]] = {}

    def add(self, kind: str, path: Path, keep_last: int | None) -> list[Path]:
        items = self.saved.setdefault(kind, [])
        if path in items:
            items.remove(path)
        items.append(path)
        removed = []
        while keep_last is not None and keep_last > 0 and len(items) > keep_last:
            old = items.pop(0)
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=False)
            elif old.exists():
                old.unlink()
            removed.append(old)
        return removed


def save_lora(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    save_file(tensors, path, metadata)
    return path


def _atomic_dir(target: Path, write) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target), suffix=".tmp", dir=target.parent))
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700 folders
        write(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_write_failure(exc) and not isinstance(exc, WriteError):
            raise WriteError(str(target), describe_os_error(exc)) from exc
        raise


def save_state(folder: Path, state: TrainState, network: dict[str, torch.Tensor], optimizer: dict,
               scheduler: dict) -> Path:
    """Write a resumable state folder atomically."""
    def write(tmp: Path) -> None:
        save_file({k: v.detach().to(torch.float32) for k, v in network.items()}, tmp / "network.safetensors")
        torch.save(optimizer, tmp / "optimizer.pt")
        torch.save(scheduler, tmp / "scheduler.pt")
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2), encoding="utf-8")

    _atomic_dir(folder, write)
    return folder


@dataclass
class LoadedState:
    state: TrainState
    network: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict


def read_state(folder: Path) -> TrainState:
    """The `train_state.json` of a state folder (checked), without loading tensors.

    Raises:
        ConfigError('resume', ...): missing/corrupt folder or another version.
    """
    folder = Path(folder)
    state_file = folder / STATE_FILE
    if not state_file.is_file():
        raise ConfigError("resume", str(folder), f"not a training state folder (no {STATE_FILE})")
    try:
        state = TrainState(**json.loads(state_file.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as exc:
        raise ConfigError("resume", str(state_file), f"unreadable state ({exc})") from None
    if state.version != STATE_VERSION:
        raise ConfigError("resume", str(folder), f"state version {state.version}, this version reads {STATE_VERSION}")
    return state


def load_state(folder: Path, expected_shapes: dict[str, list[int]]) -> LoadedState:
    """Read a state folder and check it fits the network about to be trained.

    Raises:
        ConfigError('resume', ...): missing/corrupt folder, another version, or another network shape.
    """
    folder = Path(folder)
    state = read_state(folder)
    if state.shapes != expected_shapes:
        ours, theirs = set(expected_shapes), set(state.shapes)
        detail = [f"{len(theirs - ours)} tensors only in the state", f"{len(ours - theirs)} only in this network"]
        differing = [k for k in ours & theirs if state.shapes[k] != expected_shapes[k]]
        if differing:
            k = differing[0]
            detail.append(f"e.g. {k}: state {state.shapes[k]} vs network {expected_shapes[k]}")
        raise ConfigError("resume", str(folder), "the state belongs to another network shape (" +
                          ", ".join(detail) + "); check network_dim, conv_dim, algo and the base model")
    network = load_file(folder / "network.safetensors").tensors
    # torch.serialization.load, not torch.load: A1111 replaces `torch.load` with a checker that rejects the zip
    # entries newer torch writes and returns None; weights_only already refuses anything but tensors and containers.
    optimizer = torch.serialization.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    scheduler = torch.serialization.load(folder / "scheduler.pt", map_location="cpu", weights_only=True)
    return LoadedState(state, network, optimizer, scheduler)
