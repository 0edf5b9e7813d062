"""A LoRA given to a merge, with its strengths in the prompt syntax's terms, and loading a set of them."""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from lib_lora import blocks
from lib_lora.errors import ArchMismatchError, ConfigError, PromptSyntaxError
from lib_lora.networks import LoadedNetwork, load_network
from lib_lora.ops.common import check_input
from lib_lora.patching import Application
from lib_lora.prompt_syntax import parse_tag
from lib_lora.types import Arch

_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


@dataclass(frozen=True)
class LoraInput:
    """One LoRA of a merge: `te` and `unet` strengths (A1111's), `lbw` block weights (preset or list).

    `LoraInput.parse("style.safetensors:0.8:lbw=OUTALL")` reads the `<lora:...>` syntax with a path for the name.
    """

    path: str
    te: float = 1.0
    unet: float | None = None  # None: the same as te, as in `<lora:name:0.8>`
    lbw: str | None = None

    def __post_init__(self):
        for field, value in (("te", self.te), ("unet", self.unet)):
            if value is not None and not isinstance(value, (int, float)):
                raise ConfigError(field, value, "must be a number")

    @property
    def unet_strength(self) -> float:
        return self.te if self.unet is None else self.unet

    @classmethod
    def parse(cls, spec: str) -> LoraInput:
        """`PATH[:te[:unet or lbw]][:lbw=...][:te=...][:unet=...]`, as after `<lora:` in a prompt."""
        drive = spec[:2] if _DRIVE.match(spec) else ""
        try:
            call = parse_tag(spec[len(drive):], spec)
        except PromptSyntaxError as exc:
            raise ConfigError("lora", spec, str(exc)) from None
        if call.dyn is not None or call.start is not None or call.stop is not None:
            raise ConfigError("lora", spec, "dyn/start/stop apply while sampling; a merge takes te, unet and lbw")
        return cls(drive + call.name, call.te, call.unet, call.lbw)

    def application(self, network: LoadedNetwork, arch: Arch) -> Application:
        weights = blocks.resolve(self.lbw, arch) if self.lbw else None
        return Application(network, te=float(self.te), unet=float(self.unet_strength), blocks=weights)

    def describe(self) -> str:
        text = f"{self.te:g}" if self.unet is None else f"te {self.te:g}, unet {self.unet:g}"
        return text + (f", lbw {self.lbw}" if self.lbw else "")


def load_inputs(inputs: Sequence[LoraInput], arch: Arch | None = None) -> list[LoadedNetwork]:
    """Load every LoRA (all before any work); SDXL files never mix with SD1/SD2 ones (nor with an `arch` given)."""
    if not inputs:
        raise ConfigError("inputs", [], "give at least one LoRA")
    nets = [load_network(check_input("lora", i.path), arch=arch) for i in inputs]
    xl = [n for n in nets if n.file_arch().arch is Arch.SDXL]
    if arch is not None:
        wrong = [n for n in nets if (n.file_arch().arch is Arch.SDXL) != (arch is Arch.SDXL)]
        if wrong:
            guess = wrong[0].file_arch()
            raise ArchMismatchError(f"{wrong[0].path}: this LoRA is for {guess.arch.label} ({guess.reason}); "
                                    f"the model is {arch.label}")
    elif xl and len(xl) != len(nets):
        other = next(n for n in nets if n not in xl)
        raise ArchMismatchError(f"{xl[0].path} is an SDXL LoRA ({xl[0].file_arch().reason}) but {other.path} is "
                                f"for SD1/SD2 ({other.file_arch().reason}): they cannot be merged")
    return nets


def common_arch(nets: Sequence[LoadedNetwork]) -> Arch:
    """The architecture of a set of LoRAs: the first one's guess, SD2 if any says SD2 (metadata or width)."""
    arches = [n.file_arch().arch for n in nets]
    if Arch.SDXL in arches:
        return Arch.SDXL
    return Arch.SD2 if Arch.SD2 in arches else arches[0]
