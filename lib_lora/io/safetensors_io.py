"""Load and save `.safetensors` files: loads are validated before any tensor is built, saves are atomic.

Pickle-based files (.ckpt/.pt/.bin/.pth) are never unpickled with arbitrary code: they are read with
`torch.load(weights_only=True)` or refused with a message saying how to convert them.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file as st_load_path
from safetensors.torch import save_file as st_save_file

from lib_lora.errors import FileFormatError, WriteError, describe_os_error, is_write_failure

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
MAX_HEADER = 100 * 1024 * 1024
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Header:
    """What the JSON header of a safetensors file says, checked against the file's size."""

    path: str
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    data_start: int
    file_size: int


@dataclass
class LoadedFile:
    path: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)


def _sniff_other_format(path: str, head: bytes) -> str | None:
    if head[:2] == b"PK":
        return "a zip archive (a PyTorch pickle checkpoint renamed?)"
    if head[:1] == b"\x80" and len(head) > 1 and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle"
    if head[:4] == b"\x89PNG":
        return "a PNG image"
    if head[:1] in (b"{", b"<"):
        return "a text file"
    return None


def read_header(path: str | os.PathLike) -> Header:
    """Read and validate the header of a safetensors file without loading tensors.

    Raises:
        FileFormatError: missing, truncated or corrupt file, or another format renamed `.safetensors`.
    """
    path = str(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FileFormatError(path, f"file is {size} bytes long: too short to be safetensors (truncated?)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or n + 8 > size:
                other = _sniff_other_format(path, head)
                if other:
                    raise FileFormatError(path, f"not a safetensors file: looks like {other}")
                if n > MAX_HEADER:
                    raise FileFormatError(path, "not a safetensors file (its first 8 bytes are no header length)")
                raise FileFormatError(
                    path, f"header length {n} does not fit a file of {size} bytes (truncated or corrupt)"
                )
            raw = f.read(n)
    except FileNotFoundError:
        raise FileFormatError(path, "file not found") from None
    except IsADirectoryError:
        raise FileFormatError(path, "is a directory, not a file") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        other = _sniff_other_format(path, head)
        what = f"looks like {other}" if other else f"header is not valid JSON ({exc})"
        raise FileFormatError(path, f"not a readable safetensors file: {what}") from None
    if not isinstance(header, dict):
        raise FileFormatError(path, "safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FileFormatError(path, "__metadata__ must map strings to strings")
    data_len = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise FileFormatError(path, f"tensor {name!r}: malformed header entry {info!r}") from None
        if dtype not in DTYPE_SIZES:
            raise FileFormatError(path, f"tensor {name!r}: unknown dtype {dtype!r}")
        need = math.prod(shape) * DTYPE_SIZES[dtype]
        if not (0 <= start <= end <= data_len) or end - start != need:
            raise FileFormatError(
                path,
                f"tensor {name!r}: data range [{start}, {end}) does not fit {data_len} data bytes "
                f"or shape {list(shape)} {dtype} (truncated or corrupt)",
            )
        tensors[name] = TensorInfo(dtype, shape, start, end)
    return Header(path, dict(metadata), tensors, 8 + n, size)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` of a safetensors file (validated header, no tensors loaded)."""
    return read_header(path).metadata


def load_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedFile:
    """Load every tensor and the metadata of a safetensors file, after validating its header.

    Raises:
        FileFormatError: see `read_header`; also for pickle files given with a safetensors name.
    """
    header = read_header(path)
    try:
        tensors = st_load_path(header.path)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types; re-raise with the path
        raise FileFormatError(header.path, f"could not decode tensors: {exc}") from exc
    if device != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return LoadedFile(header.path, tensors, header.metadata)


def load_state_dict(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedFile:
    """Load a LoRA/checkpoint file of any supported format.

    `.safetensors` is read with validation; pickle formats only with `torch.load(weights_only=True)`,
    which refuses arbitrary objects. Nested `state_dict` entries (as in `.ckpt`) are unwrapped.
    """
    path = str(path)
    if not path.lower().endswith(PICKLE_SUFFIXES):
        return load_file(path, device)
    if not os.path.exists(path):
        raise FileFormatError(path, "file not found")
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # 8-byte header length, then the JSON header
        return load_file(path, device)  # a safetensors file under a pickle name: read it safely as what it is
    # torch.save writes a zip archive; older files are a bare pickle (protocol 2+ starts with 0x80)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        other = _sniff_other_format(path, head)
        raise FileFormatError(path, "not a PyTorch checkpoint (neither a torch zip archive nor a pickle)"
                              + (f": it looks like {other}" if other else f"; it starts with bytes {head[:4].hex()}"))
    try:
        # not `torch.load`, which A1111 replaces with a checker that returns None for files of newer torch
        obj = torch.serialization.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load's refusal comes in several exception types
        if "weights only" not in str(exc).lower() and "unsupported global" not in str(exc).lower():
            raise FileFormatError(path, f"damaged or truncated PyTorch file ({type(exc).__name__}: "
                                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        raise FileFormatError(
            path,
            "refusing to unpickle this file: it holds objects other than tensors, and unpickling can run "
            "arbitrary code. Convert it to .safetensors in a trusted environment first, e.g. "
            "`python -c \"import torch,safetensors.torch as s; sd=torch.load('IN',weights_only=False); "
            "s.save_file({k:v.contiguous() for k,v in sd.get('state_dict',sd).items()}, 'OUT.safetensors')\"` "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
        ) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise FileFormatError(path, f"expected a dict of tensors, found {type(obj).__name__}")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return LoadedFile(path, tensors, {})


def save_file(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write a safetensors file atomically: a temporary file in the same folder, fsync, rename.

    A crash or kill at any point leaves either the old file or the new one, never a partial file.
    """
    path = Path(path)
    meta = dict(metadata or {})
    bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata values must be strings; not for keys {bad}")
    prepared = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        st_save_file(prepared, tmp, metadata=meta or None)
        if meta:
            _sort_metadata(tmp)
        os.chmod(tmp, default_file_mode())  # mkstemp makes 0600 files; others (the web UI) must read ours
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, (KeyboardInterrupt, SystemExit, WriteError)) or not is_write_failure(exc):
            raise
        raise WriteError(str(path), describe_os_error(exc)) from exc
    _fsync_dir(path.parent)


def _sort_metadata(path: str) -> None:
    """Rewrite a safetensors header with its metadata keys sorted, in place.

    safetensors serialises the metadata from a hash map, so its key order varies between processes and two
    saves of the same tensors differ in bytes (and in the web UI's checkpoint hash). The sorted header has the
    same length, so the tensor data stays where it is.
    """
    with open(path, "rb+") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > size:  # another escaping than safetensors' own; never seen, but never corrupt the file
            raise OSError(f"{path}: the sorted safetensors header does not fit ({len(text)} > {size} bytes)")
        f.seek(8)
        f.write(text + b" " * (size - len(text)))


def default_file_mode() -> int:
    """The mode a plain `open(path, "w")` would give a new file (0666 minus the umask)."""
    return 0o666 & ~_umask()


def temp_prefix(target: Path) -> str:
    """Hidden temporaries carry the writer's process id, so a later run can tell an abandoned one (its writer
    is gone: killed during a save) from one being written right now."""
    return f".{target.name}.{os.getpid()}-"


_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[^.]*\.tmp$|^\.(?P<old>.+)\.old-(?P<oldpid>\d+)$")
_ANONYMOUS_TEMP = re.compile(r"^\..+\.tmp$")
STALE_AFTER_S = 3600  # temporaries without a process id (older versions): left alone for an hour


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the hidden temporaries of atomic saves in `folder` whose writer is gone; returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for entry in folder.iterdir():
        match = _TEMP.match(entry.name)
        if match:
            stale = not _alive(int(match["pid"] or match["oldpid"]))
        else:
            stale = bool(_ANONYMOUS_TEMP.match(entry.name)) and now - entry.stat().st_mtime > STALE_AFTER_S
        if stale:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open folders; the rename itself is still atomic
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
