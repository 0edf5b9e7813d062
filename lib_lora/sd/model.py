"""`SDModel`: a loaded Stable Diffusion model as diffusers modules, whatever file it came from."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lib_lora.types import Arch


@dataclass(frozen=True)
class NoiseSchedule:
    """The training noise schedule (as in the LDM configs): 1000 steps, scaled-linear betas."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"


@dataclass
class SDModel:
    """Components of one model. `text_encoders`/`tokenizers`: one for SD1/SD2, two (CLIP-L, bigG) for SDXL.

    prediction_type: 'epsilon' or 'v_prediction'. resolution: native image size (512, 768, 1024, or 64 for
    the embedded tiny model). name/path/hash identify the file for infotext and metadata.
    """

    arch: Arch
    unet: nn.Module
    text_encoders: list[nn.Module]
    tokenizers: list
    vae: nn.Module
    prediction_type: str = "epsilon"
    resolution: int = 512
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)
    name: str = ""
    path: str = ""
    short_hash: str = ""
    vae_scale_factor: float = 0.18215

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def modules(self) -> list[nn.Module]:
        return [self.unet, *self.text_encoders, self.vae]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SDModel:
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for m in self.modules():
            m.to(**kwargs)
        return self
