"""LoRA-family networks: one file per algorithm, a registry, and loading a file into modules.

`load_network(path)` reads any supported file (kohya/LyCORIS/diffusers/PEFT spellings), detects
each module's algorithm from its tensor suffixes, and reports every key it did not use.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lib_lora import keys
from lib_lora.errors import FileFormatError
from lib_lora.io import LoadedFile, load_state_dict
from lib_lora.networks import full, ia3, loha, lokr, lora, norm, oft  # noqa: F401  (registration order = detection order)
from lib_lora.networks.base import LayerOp, NetworkModule
from lib_lora.networks.registry import ALGORITHMS, detect, register
from lib_lora.types import Arch, Component, component_of

__all__ = ["ALGORITHMS", "LayerOp", "LoadedNetwork", "NetworkModule", "load_network", "module_label", "register"]


@dataclass
class LoadedNetwork:
    """A LoRA-family file, understood: its modules by kohya name, and what was left over."""

    name: str
    path: str | None
    arch: Arch
    arch_reason: str
    modules: dict[str, NetworkModule]
    metadata: dict[str, str] = field(default_factory=dict)
    unmatched_keys: list[str] = field(default_factory=list)
    spelling: str = "kohya"
    _file_arch: keys.ArchGuess | None = field(default=None, repr=False, compare=False)

    def file_arch(self) -> keys.ArchGuess:
        """The architecture the file's key names and metadata point to (computed once)."""
        if self._file_arch is None:
            self._file_arch = keys.guess_arch(self.modules, None, self.metadata)
        return self._file_arch

    def components(self) -> dict[Component, int]:
        counts: dict[Component, int] = defaultdict(int)
        for name in self.modules:
            counts[component_of(name)] += 1
        return dict(counts)

    def algorithms(self) -> list[str]:
        """Algorithm names of the file; a LoRA file with k x k conv modules is LoCon (its linear modules too)."""
        labels = {module_label(m) for m in self.modules.values()}
        if "locon" in labels:
            labels.discard("lora")
        return sorted(labels)


def module_label(module: NetworkModule) -> str:
    """What users call the module's algorithm: lora, locon (LoRA on a k x k conv), dora, loha, lokr, ia3, full,
    diag-oft, norm (a normalization layer's change, LyCORIS train_norm)."""
    if module.dora_scale is not None and module.algo == "lora":
        return "dora"
    if isinstance(module, lora.LoRAModule):
        kernel = module.lora_mid.weight.shape[2:] if module.lora_mid is not None else module.lora_down.weight.shape[2:]
        if any(k > 1 for k in kernel):
            return "locon"
    return module.algo


def _peft_alphas(metadata: Mapping[str, str]) -> dict[str, object]:
    """diffusers' `lora_adapter_metadata` ({"unet.lora_alpha": 8, ...}), if the file has it."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def _peft_alpha_for(module: str, path_hint: str, table: Mapping[str, object]) -> float | None:
    comp = component_of(module)
    prefix = {Component.UNET: "unet", Component.TE: "text_encoder", Component.TE1: "text_encoder",
              Component.TE2: "text_encoder_2"}[comp]
    pattern = table.get(f"{prefix}.alpha_pattern") or {}
    if isinstance(pattern, dict):
        for suffix, value in pattern.items():
            if path_hint.endswith(suffix):
                return float(value)
    value = table.get(f"{prefix}.lora_alpha")
    return None if value is None else float(value)


def _group_keys(tensors: Mapping[str, Tensor], arch: Arch):
    groups: dict[str, dict[str, Tensor]] = defaultdict(dict)
    hints: dict[str, str] = {}
    unmatched: list[str] = []
    spellings = set()
    for key, tensor in tensors.items():
        parsed = keys.parse_file_key(key, arch)
        if parsed is None:
            unmatched.append(key)
            continue
        spellings.add(parsed.spelling)
        groups[parsed.module][parsed.suffix] = tensor
        hints[parsed.module] = key
    return groups, hints, unmatched, spellings


def load_network(source: str | os.PathLike | LoadedFile | Mapping[str, Tensor], arch: Arch | None = None,
                 name: str | None = None) -> LoadedNetwork:
    """Read a LoRA-family file (or tensors) into modules.

    Args:
        source: a path, an already loaded file, or a state dict.
        arch: the architecture of the model it will be applied to; guessed from keys/metadata if None.
        name: display name (default: the file's stem).

    Raises:
        FileFormatError: unreadable file, or no LoRA-family tensors in it.
        NonFiniteError: NaN/inf in a tensor (naming the key).
        ShapeMismatchError: tensors of a module that do not fit each other.
    """
    if isinstance(source, LoadedFile):
        loaded = source
    elif isinstance(source, Mapping):
        loaded = LoadedFile("<state dict>", dict(source), {})
    else:
        loaded = load_state_dict(source)
    path = None if loaded.path == "<state dict>" else loaded.path
    guess_arch = arch
    if guess_arch is None:
        probe, _, _, _ = _group_keys(loaded.tensors, Arch.SD1)
        shapes = {m: tuple(t.get("lora_down.weight", next(iter(t.values()))).shape) for m, t in probe.items()}
        guess = keys.guess_arch(probe.keys(), shapes, loaded.metadata)
        guess_arch, reason = guess.arch, guess.reason
    else:
        reason = "given"
    groups, hints, unmatched, spellings = _group_keys(loaded.tensors, guess_arch)
    peft_alpha = _peft_alphas(loaded.metadata)
    modules: dict[str, NetworkModule] = {}
    for module_name, tensors in groups.items():
        cls = detect(set(tensors))
        if cls is None:
            unmatched.extend(f"{module_name}.{s}" for s in tensors)
            continue
        owned = set(cls.owned())
        unmatched.extend(f"{module_name}.{s}" for s in tensors if s not in owned)
        used = {s: t for s, t in tensors.items() if s in owned}
        if "alpha" not in used and cls.uses_alpha and peft_alpha:
            alpha = _peft_alpha_for(module_name, hints[module_name], peft_alpha)
            if alpha is not None:
                used["alpha"] = torch.tensor(alpha)
        modules[module_name] = cls.from_tensors(module_name, used, path or "<state dict>")
    if not modules:
        sample = ", ".join(list(loaded.tensors)[:3])
        raise FileFormatError(loaded.path, f"no LoRA-family tensors found (keys start: {sample}); "
                                           "is this a model checkpoint rather than a LoRA?")
    stem = name or (os.path.splitext(os.path.basename(path))[0] if path else "network")
    spelling = spellings.pop() if len(spellings) == 1 else "mixed"
    return LoadedNetwork(stem, path, guess_arch, reason, modules, dict(loaded.metadata), sorted(unmatched), spelling)
