"""The LoRA folder: what is in it (name, alias, rank, algorithm, architecture, trigger words, hash), finding a
file by the name a prompt uses, and a cache of loaded networks.

A scan reads only the safetensors headers (shapes and metadata), so a folder of large files lists in
milliseconds; pickle files (.pt/.ckpt) are read with `torch.load(weights_only=True)` (see `lib_lora.io`).
Names follow the web UI: the file stem, and `ss_output_name` as an alias. The short hash is the web UI's:
the first 12 hex of the addnet hash (`sshs_model_hash` when the file stores it, else computed on demand).
"""
from __future__ import annotations

import difflib
import os
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

from lib_lora import keys
from lib_lora.errors import FileFormatError, LibLoraError
from lib_lora.info import tag_summary
from lib_lora.io import addnet_hash, load_state_dict, read_header, sha256_file, short_hash
from lib_lora.networks import LoadedNetwork, load_network
from lib_lora.networks.registry import detect
from lib_lora.types import Arch

STATE_FILE = "train_state.json"  # marks a training state folder (lib_lora.train.checkpoint.STATE_FILE)

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
# Which tensor of a module tells its rank, and along which dimension (the algorithm files define the shapes).
_RANK_TENSOR = {
    "lora": ("lora_down.weight", 0),
    "loha": ("hada_w1_b", 0),
    "lokr": ("lokr_w2_b", 0),
    "diag-oft": ("oft_blocks", 0),  # the number of blocks (A1111's dim)
}
# Metadata keys from which the architecture a LoRA was trained for is declared rather than guessed.
_ARCH_METADATA = ("ss_base_model_version", "modelspec.architecture", "ss_v2")


class LoraNotFoundError(LibLoraError):
    """A prompt names a LoRA the folder does not have."""

    def __init__(self, name: str, folder: str, close: list[str]):
        self.name, self.folder, self.close = name, folder, close
        hint = f"; did you mean: {', '.join(close)}?" if close else "; no similar names"
        super().__init__(f"LoRA {name!r} not found in {folder}{hint}")


@dataclass(frozen=True)
class LoraEntry:
    """One file of the LoRA folder, as the browser shows it. `error` is set (and the rest empty) for a file
    that cannot be read: it is listed with the reason instead of breaking the scan."""

    name: str
    path: str
    alias: str = ""
    rank: str = ""  # "8", or "4-16" when modules differ
    algorithm: str = ""
    arch: Arch | None = None
    arch_reason: str = ""
    arch_declared: bool = False  # the metadata states the architecture (not inferred from key names)
    trigger_words: tuple[str, ...] = ()
    stored_hash: str = ""  # sshs_model_hash from the metadata
    modules: int = 0
    error: str = ""

    @property
    def display_name(self) -> str:
        return self.name if not self.alias or self.alias == self.name else f"{self.name} ({self.alias})"

    def prompt_tag(self, weight: float = 1.0, lbw: str | None = None) -> str:
        """The web UI's syntax for this file: `<lora:name:1>`, `<lora:name:0.8:lbw=OUTS>`."""
        return f"<lora:{self.name}:{weight:g}" + (f":lbw={lbw}>" if lbw else ">")


@dataclass(frozen=True)
class _FileStamp:
    path: str
    mtime_ns: int
    size: int

    @classmethod
    def of(cls, path: str | os.PathLike) -> _FileStamp:
        st = os.stat(path)
        return cls(str(path), st.st_mtime_ns, st.st_size)


def _tensor_shapes(path: str) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    if path.lower().endswith(".safetensors"):
        header = read_header(path)
        return {k: t.shape for k, t in header.tensors.items()}, header.metadata
    loaded = load_state_dict(path)
    return {k: tuple(t.shape) for k, t in loaded.tensors.items()}, loaded.metadata


def _module_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, dict[str, tuple[int, ...]]]:
    # Parsed as SD1 to find module names; the names alone then tell SDXL apart (as load_network probes).
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        parsed = keys.parse_file_key(key, Arch.SD1)
        if parsed is not None:
            modules.setdefault(parsed.module, {})[parsed.suffix] = shape
    return modules


def _algorithm_and_rank(modules: dict[str, dict[str, tuple[int, ...]]]) -> tuple[str, str]:
    algos: Counter = Counter()
    ranks: Counter = Counter()
    for suffixes in modules.values():
        cls = detect(set(suffixes))
        if cls is None:
            continue
        label = cls.algo
        if label == "lora" and "dora_scale" in suffixes:
            label = "dora"
        elif label == "lora" and any(k > 1 for k in suffixes.get("lora_down.weight", ())[2:]):
            label = "locon"  # a k x k conv module: LyCORIS LoCon
        algos[label] += 1
        tensor, dim = _RANK_TENSOR.get(cls.algo, ("", 0))
        if tensor in suffixes:
            ranks[suffixes[tensor][dim]] += 1
    if "locon" in algos:
        algos.pop("lora", None)
    algorithm = next(iter(algos)) if len(algos) == 1 else ("mixed" if algos else "")
    if not ranks:
        return algorithm, ""
    lo, hi = min(ranks), max(ranks)
    return algorithm, str(lo) if lo == hi else f"{lo}-{hi}"


def trigger_words(metadata: dict[str, str]) -> tuple[str, ...]:
    """The trigger words a file declares (`modelspec.trigger_phrase`, comma-separated), else its most frequent
    training tags (`ss_tag_frequency`)."""
    declared = [w.strip() for w in metadata.get("modelspec.trigger_phrase", "").split(",") if w.strip()]
    return tuple(declared) if declared else tuple(tag_summary(metadata)[0])


def _in_state_folder(path: Path) -> bool:
    # A training state folder (`name-state/network.safetensors`) holds a resumable state, not a LoRA to apply.
    return (path.parent / STATE_FILE).is_file()


def describe_file(path: str | os.PathLike) -> LoraEntry:
    """A library entry for one file, from its header (safetensors) or its tensors (pickle formats)."""
    path = str(path)
    name = Path(path).stem
    try:
        shapes, metadata = _tensor_shapes(path)
    except FileFormatError as exc:
        return LoraEntry(name, path, error=exc.reason)
    modules = _module_shapes(shapes)
    if not modules:
        return LoraEntry(name, path, error="no LoRA-family tensors (a model checkpoint?)")
    algorithm, rank = _algorithm_and_rank(modules)
    downs = {m: s.get("lora_down.weight", next(iter(s.values()))) for m, s in modules.items()}
    guess = keys.guess_arch(modules, downs, metadata)
    return LoraEntry(
        name=name, path=path, alias=metadata.get("ss_output_name", ""), rank=rank, algorithm=algorithm,
        arch=guess.arch, arch_reason=guess.reason, arch_declared=any(k in metadata for k in _ARCH_METADATA),
        trigger_words=trigger_words(metadata), stored_hash=metadata.get("sshs_model_hash", ""), modules=len(modules),
    )


class LoraLibrary:
    """The LoRA files under one folder (recursive). `refresh()` rescans; unchanged files are not re-read.

    Args:
        folder: the LoRA folder; it need not exist (the library is then empty).
        cache_size: how many loaded networks stay in memory (least recently used are dropped).
    """

    def __init__(self, folder: str | os.PathLike, cache_size: int = 8):
        self.folder = Path(folder)
        self.cache_size = cache_size
        self._entries: dict[str, LoraEntry] = {}
        self._described: dict[_FileStamp, LoraEntry] = {}
        self._hashes: dict[_FileStamp, str] = {}
        self._networks: OrderedDict[tuple[_FileStamp, Arch], LoadedNetwork] = OrderedDict()
        self._scanned = False

    # ------------------------------------------------------------------------------------- listing

    def refresh(self) -> list[LoraEntry]:
        """Rescan the folder; returns the entries sorted by name."""
        found: dict[_FileStamp, LoraEntry] = {}
        files = sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in LORA_SUFFIXES and p.is_file()
                       and not _in_state_folder(p)) if self.folder.is_dir() else []
        for path in files:
            stamp = _FileStamp.of(path)
            found[stamp] = self._described.get(stamp) or describe_file(path)
        self._described = found
        self._entries = {}
        for entry in found.values():
            self._entries.setdefault(entry.name, entry)  # two files with one stem: the first in path order wins
        self._scanned = True
        return self.entries()

    def entries(self) -> list[LoraEntry]:
        if not self._scanned:
            self.refresh()
        return sorted(self._entries.values(), key=lambda e: e.name.lower())

    def names(self) -> list[str]:
        return [e.name for e in self.entries()]

    def find(self, name: str) -> LoraEntry:
        """The entry a prompt's `<lora:name>` means: a file stem, else an `ss_output_name` alias.

        A name not found triggers one rescan (a file may have been added since).

        Raises:
            LoraNotFoundError: listing the closest names the folder has.
        """
        for attempt in range(2):
            if attempt or not self._scanned:
                self.refresh()
            entry = self._entries.get(name) or next((e for e in self._entries.values() if e.alias == name), None)
            if entry is not None:
                return entry
        known = list(self._entries) + [e.alias for e in self._entries.values() if e.alias]
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.4)
        if not close:
            close = [k for k in known if name.lower() in k.lower() or k.lower() in name.lower()][:5]
        raise LoraNotFoundError(name, str(self.folder), close)

    # ------------------------------------------------------------------------------- hashes, loading

    def short_hash(self, entry: LoraEntry) -> str:
        """The web UI's 12-hex short hash: stored `sshs_model_hash`, else the addnet hash (safetensors) or the
        file's sha256 (pickle formats), computed once per file version."""
        if entry.stored_hash:
            return short_hash(entry.stored_hash)
        stamp = _FileStamp.of(entry.path)
        if stamp not in self._hashes:
            is_st = entry.path.lower().endswith(".safetensors")
            self._hashes[stamp] = addnet_hash(entry.path) if is_st else sha256_file(entry.path)
        return short_hash(self._hashes[stamp])

    def load(self, entry: LoraEntry, arch: Arch) -> LoadedNetwork:
        """The network of a file, for a model of `arch`; cached, and re-read when the file changes.

        Raises:
            FileFormatError: the file is gone or unreadable (naming it).
        """
        try:
            stamp = _FileStamp.of(entry.path)
        except FileNotFoundError:
            raise FileFormatError(entry.path, "file not found (removed since the folder was scanned?)") from None
        key = (stamp, arch)
        network = self._networks.get(key)
        if network is None:
            for old in [k for k in self._networks if k[0].path == stamp.path]:
                del self._networks[old]  # an older version of the same file
            network = load_network(entry.path, arch=arch, name=entry.name)
            self._networks[key] = network
            while len(self._networks) > self.cache_size:
                self._networks.popitem(last=False)
        self._networks.move_to_end(key)
        return network
