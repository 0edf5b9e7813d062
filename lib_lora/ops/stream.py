"""Tensor-by-tensor safetensors reading and writing, so a checkpoint never sits in memory whole.

`TensorReader` reads one tensor at a time with positioned reads (no memory map: mapped pages of a 2-7 GB file
would count as resident memory while they stay cached). `StreamWriter` writes the header first (every name,
dtype and shape is known before any data), then each tensor as it is produced, into a temporary file beside
the output that replaces it only when complete (fsync, rename): a failure or cancel leaves no partial file and
an existing file untouched. The data section is hashed while it is written, and that hash (`sshs_model_hash`,
sha256 of the data, what sd-scripts and A1111 compute) is patched into a fixed-width slot of the header.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from lib_lora.errors import FileFormatError, WriteError, describe_os_error, is_write_failure
from lib_lora.io.safetensors_io import Header, read_header

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
HASH_KEY = "sshs_model_hash"
_HASH_SLOT = "0" * 64


class TensorReader:
    """Reads tensors of one safetensors file by name, one at a time; use as a context manager."""

    def __init__(self, path: str | os.PathLike):
        self.header: Header = read_header(path)
        self.path = self.header.path
        self._file = None

    def __enter__(self) -> TensorReader:
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed in __exit__
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    def names(self) -> list[str]:
        """Names in the order their data lies in the file (sequential reads)."""
        return sorted(self.header.tensors, key=lambda k: self.header.tensors[k].start)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.header.tensors[k].shape for k in self.names()}

    def shape(self, key: str) -> tuple[int, ...]:
        return self.header.tensors[key].shape

    def dtype(self, key: str) -> torch.dtype:
        info = self.header.tensors[key]
        if info.dtype not in ST_DTYPES:
            raise FileFormatError(self.path, f"tensor {key!r}: dtype {info.dtype} is not supported here")
        return ST_DTYPES[info.dtype]

    def read(self, key: str) -> torch.Tensor:
        info = self.header.tensors.get(key)
        if info is None:
            raise FileFormatError(self.path, f"no tensor {key!r}")
        dtype = self.dtype(key)
        size = info.end - info.start
        buf = bytearray(size)
        if self._file is None:
            raise RuntimeError("TensorReader.read outside its `with` block")
        self._file.seek(self.header.data_start + info.start)
        if size and self._file.readinto(buf) != size:
            raise FileFormatError(self.path, f"tensor {key!r}: file ended early (truncated)")
        if not size:
            return torch.empty(info.shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)

    def stream(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for each name, the next one read by a worker thread while the caller works on this one
        (file reads release the GIL): reading overlaps the caller's arithmetic, one tensor ahead at most."""
        names = list(names)
        with ThreadPoolExecutor(1, thread_name_prefix="tensor-read") as pool:
            ahead = pool.submit(self.read, names[0]) if names else None
            for i, name in enumerate(names):
                tensor = ahead.result()
                ahead = pool.submit(self.read, names[i + 1]) if i + 1 < len(names) else None
                yield name, tensor


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def _write_all(fd: int, data: memoryview) -> None:
    """os.write until every byte is out (the one place data reaches the disk: a full disk raises here)."""
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _bytes_of(t: torch.Tensor) -> memoryview:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class StreamWriter:
    """Writes a safetensors file tensor by tensor in the order of `entries`; see the module docstring.

        with StreamWriter(path, entries, metadata) as w:
            for e in entries:
                w.write(e.name, tensor)
    The file appears at `path` only when the block ends without an error and every entry was written.
    """

    def __init__(self, path: str | os.PathLike, entries: list[Entry], metadata: Mapping[str, str] | None = None,
                 *, background: bool = False):
        self.path = Path(path)
        self.entries = entries
        self._index = 0
        # background: each tensor is hashed and written by a worker thread while the caller makes the next one
        # (hashing and os.write release the GIL); one write in flight at most, its error raised at the next call
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tensor-write") if background else None
        self._pending: Future | None = None
        self._hash = hashlib.sha256()
        meta = {k: v for k, v in (metadata or {}).items() if k != HASH_KEY}
        meta[HASH_KEY] = _HASH_SLOT
        header: dict[str, object] = {"__metadata__": meta}
        offset = 0
        for e in entries:
            header[e.name] = {"dtype": ST_NAMES[e.dtype], "shape": list(e.shape),
                              "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self._header = raw
        self._slot = raw.index(f'"{HASH_KEY}":"{_HASH_SLOT}"'.encode()) + len(HASH_KEY) + 4
        self._fd: int | None = None
        self._tmp: str | None = None

    def __enter__(self) -> StreamWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            _write_all(self._fd, memoryview(len(self._header).to_bytes(8, "little") + self._header))
        except BaseException:
            self._discard()
            raise
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        entry = self.entries[self._index] if self._index < len(self.entries) else None
        if entry is None or entry.name != name:
            raise RuntimeError(f"StreamWriter: expected {entry.name if entry else 'no more tensors'}, got {name}")
        if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
            raise RuntimeError(f"StreamWriter: {name} is {tensor.dtype} {tuple(tensor.shape)}, declared "
                               f"{entry.dtype} {entry.shape}")
        data = _bytes_of(tensor)
        self._index += 1
        if self._pool is None:
            self._put(data)
            return
        self._wait()
        self._pending = self._pool.submit(self._put, data)

    def _put(self, data: memoryview) -> None:
        self._hash.update(data)
        try:
            _write_all(self._fd, data)
        except OSError as exc:
            if not is_write_failure(exc):
                raise
            # one line naming the output; the temporary is removed when the `with` block ends
            raise WriteError(str(self.path), describe_os_error(exc)) from exc

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._wait()
        except BaseException:
            if exc_type is None:
                self._discard()
                raise
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
        if exc_type is not None:
            self._discard()
            return
        try:
            if self._index != len(self.entries):
                raise RuntimeError(f"StreamWriter: {len(self.entries) - self._index} declared tensors not written")
            os.lseek(self._fd, 8 + self._slot, os.SEEK_SET)
            _write_all(self._fd, memoryview(self._hash.hexdigest().encode()))
            os.fchmod(self._fd, 0o666 & ~_umask())
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            os.replace(self._tmp, self.path)
            self._tmp = None
        except BaseException:
            self._discard()
            raise

    @property
    def data_hash(self) -> str:
        return self._hash.hexdigest()

    def _discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tmp is not None and os.path.exists(self._tmp):
            os.unlink(self._tmp)
        self._tmp = None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
