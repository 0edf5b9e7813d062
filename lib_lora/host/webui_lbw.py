"""Per-block weights and U-Net step windows on the web UI's own built-in LoRA.

The prompt syntax is the one users already type (`<lora:name:1:lbw=OUTS:stop=10>`, see `prompt_syntax`); the
built-in LoRA of the host loads the file and applies te/unet strengths as usual, and this module scales what it
loaded, per block:

- A1111 (`extensions-builtin/Lora`): every module type it loads (LoRA/LoCon, LoHa, LoKr, IA3, full, norm,
  GLoRA, OFT/BOFT, DoRA) ends its weight change with `NetworkModule.finalize_updown`, which multiplies by
  `self.multiplier()`. The loaded network is replaced, in `networks.loaded_networks`, by a copy whose modules
  answer `multiplier() * block weight`; the cached original is never changed. The copy's name carries the
  weights, so the host re-merges exactly when they change (its `wanted_names` check).
- Forge (`sd_forge_lora`): patches are per parameter `[strength, patch, strength_model, offset, function]`;
  the patcher clones get the same patches with `strength * block weight`, under an identifier that carries the
  weights (Forge's loader re-merges when the identifiers change).

A U-Net window (`start=`/`stop=`) sets the U-Net part to 0 outside its steps: A1111 by the copy's unet
multiplier, Forge by switching between two patch sets at the denoiser callback.

No `modules.*` import here: the adapters (`a1111.py`, `forge.py`) hand the host's objects in.
"""
from __future__ import annotations

import copy
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lib_lora import blocks
from lib_lora.blocks import BlockWeights
from lib_lora.prompt_syntax import LoraCall, parse_tag, step_window
from lib_lora.types import Arch

INFOTEXT_KEY = "Lora block weights"
TAG = "@lbw"  # marks the host's network copies and patch identifiers made here


@dataclass(frozen=True)
class BlockRequest:
    """What one prompt tag asks beyond te/unet: block weights and a U-Net step window."""

    call: LoraCall
    weights: BlockWeights | None
    start: int
    stop: int | None

    @property
    def name(self) -> str:
        return self.call.name

    @property
    def hooked(self) -> bool:
        """Whether the host's own application must be changed for this tag."""
        return self.weights is not None or self.start > 0 or self.stop is not None

    def unet_on(self, step: int) -> bool:
        return self.start <= step and (self.stop is None or step < self.stop)

    def block_weight(self, block: str) -> float:
        return 1.0 if self.weights is None else self.weights[block]

    def signature(self, arch: Arch) -> str:
        """Stable text of what is applied (for the host's change detection and the infotext)."""
        parts = []
        if self.weights is not None:
            length = blocks.shortest_length(self.weights, arch)
            parts.append("lbw=" + blocks.format_weights(self.weights, arch, length))
        if self.start or self.stop is not None:
            parts.append(f"steps={self.start}-{'' if self.stop is None else self.stop}")
        return ":".join(parts)

    def infotext(self, arch: Arch) -> str:
        shown = self.call.lbw if self.call.lbw and "," not in self.call.lbw else None
        text = self.signature(arch)
        return f"{self.name}: {shown} ({text})" if shown else f"{self.name}: {text}"


def parse_requests(params_list: Iterable[Any], arch: Arch, presets: Mapping[str, str] | None,
                   steps: int) -> list[BlockRequest]:
    """One request per LoRA tag the host parsed (objects with `.items`, the host's ExtraNetworkParams).

    Raises:
        PromptSyntaxError, BlockWeightError, ConfigError: a malformed tag, unknown preset, empty window.
    """
    out = []
    for params in params_list:
        items = [str(i) for i in getattr(params, "items", [])]
        if not items:
            continue
        call = parse_tag(":".join(items))
        weights = blocks.resolve(call.lbw, arch, presets, x=call.x) if call.lbw else None
        start, stop = step_window(call, steps)
        out.append(BlockRequest(call, weights, start, stop))
    return out


def infotext(requests: Iterable[BlockRequest], arch: Arch) -> str | None:
    """The infotext value recording the resolved weights (None when no tag needed them)."""
    text = "; ".join(r.infotext(arch) for r in requests if r.hooked)
    return text or None


def match_requests(loaded: list, requests: list[BlockRequest],
                   name_of: Callable[[Any], str]) -> list[tuple[int, BlockRequest]]:
    """(index in `loaded`, request) for loaded networks whose tag needs a hook, matched by the name typed."""
    pending = list(requests)
    out = []
    for index, net in enumerate(loaded):
        name = name_of(net)
        for request in pending:
            if request.name == name:
                pending.remove(request)
                if request.hooked:
                    out.append((index, request))
                break
    return out


# ------------------------------------------------------------------------------------------------ A1111


class A1111Hook:
    """Per-generation state on A1111's built-in LoRA: the scaled network copies and their windows.

    Args:
        arch: the loaded model's architecture.
        unet_block: block id of a U-Net torch module (the adapter maps the host's modules to compvis paths).
    """

    def __init__(self, arch: Arch, unet_block: Callable[[Any], str]):
        self.arch = arch
        self.unet_block = unet_block
        self.active: list[tuple[Any, BlockRequest, float]] = []  # (copy, request, unet multiplier asked for)

    def apply(self, loaded: list, requests: list[BlockRequest]) -> None:
        """Replace, in the host's `loaded_networks` list, each network a request hooks by a scaled copy."""
        self.active = []
        for index, request in match_requests(loaded, requests, lambda n: getattr(n, "mentioned_name", n.name)):
            original = loaded[index]
            net = self._scaled_copy(original, request)
            loaded[index] = net
            self.active.append((net, request, original.unet_multiplier))
        self.at_step(0)

    def _scaled_copy(self, original: Any, request: BlockRequest) -> Any:
        net = copy.copy(original)
        net.name = f"{original.name}{TAG}[{request.signature(self.arch)}]"
        net.modules = {key: self._scaled_module(module, net, request) for key, module in original.modules.items()}
        return net

    def _scaled_module(self, module: Any, net: Any, request: BlockRequest) -> Any:
        scaled = copy.copy(module)
        scaled.network = net
        # A1111's own rule for which multiplier a module takes (NetworkModule.multiplier).
        is_te = "transformer" in str(module.sd_key)[:20]
        weight = request.block_weight("BASE" if is_te else self.unet_block(module.sd_module))
        base = type(module).multiplier

        def multiplier(self: Any) -> float:
            return base(self) * weight

        scaled.multiplier = types.MethodType(multiplier, scaled)
        return scaled

    def at_step(self, step: int) -> None:
        """Switch U-Net parts on or off for sampling step `step` (the host re-merges what changed)."""
        for net, request, unet in self.active:
            net.unet_multiplier = unet if request.unet_on(step) else 0.0

    def clear(self) -> None:
        self.active = []


# ------------------------------------------------------------------------------------------------ Forge


UNET_PREFIX = "diffusion_model."


def forge_block(param_key: str, arch: Arch) -> str:
    """Block id of a Forge U-Net parameter (`diffusion_model.input_blocks.1.1.proj_in.weight`)."""
    path = param_key.removeprefix(UNET_PREFIX).rsplit(".", 1)[0]
    return blocks.block_of_compvis(path, arch)


def scale_patches(lora_patches: Mapping[tuple, Mapping[str, list]], hooked: Mapping[str, BlockRequest],
                  arch: Arch, *, unet: bool, step: int) -> dict[tuple, dict[str, list]]:
    """A Forge patcher's `lora_patches` with the patches of hooked files scaled per block.

    Args:
        lora_patches: {(filename, strength_patch, strength_model, online): {param key: [[strength, patch,
            strength_model, offset, function], ...]}}.
        hooked: request per LoRA file path.
        unet: whether these are U-Net patches (else text encoder: every module is BASE, no window).
        step: the sampling step (U-Net windows).
    """
    out: dict[tuple, dict[str, list]] = {}
    for identifier, patches in lora_patches.items():
        filename, *rest = identifier
        request = hooked.get(filename)
        if request is None:
            out[identifier] = dict(patches)
            continue
        on = request.unet_on(step) if unet else True
        scaled = {}
        for key, entries in patches.items():
            weight = (request.block_weight(forge_block(key, arch)) if unet else request.block_weight("BASE"))
            factor = weight if on else 0.0
            scaled[key] = [[entry[0] * factor, *entry[1:]] for entry in entries]
        state = request.signature(arch) + ("" if on else ":off")
        out[(f"{filename}{TAG}[{state}]", *rest)] = scaled
    return out
