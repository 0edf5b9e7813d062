"""Small shared records: architectures and model components."""
from __future__ import annotations

from enum import Enum


class Arch(str, Enum):
    """Model architecture family. The value is what files and the CLI say."""

    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"

    @property
    def label(self) -> str:
        return {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}[self.value]


class Component(str, Enum):
    """Which part of the model a LoRA module targets. The value is the kohya key prefix without `lora_`."""

    TE = "te"  # the text encoder of SD1/SD2
    TE1 = "te1"  # SDXL CLIP-L
    TE2 = "te2"  # SDXL OpenCLIP bigG
    UNET = "unet"

    @property
    def is_text_encoder(self) -> bool:
        return self is not Component.UNET

    @property
    def prefix(self) -> str:
        return f"lora_{self.value}_"


def component_of(kohya_name: str) -> Component | None:
    """Component of a kohya module name, from its prefix (`lora_te1_...` -> TE1), or None."""
    for comp in (Component.TE1, Component.TE2, Component.TE, Component.UNET):
        if kohya_name.startswith(comp.prefix):
            return comp
    return None
