"""Sampler registry: the web UI's sampler names -> diffusers schedulers built from the model's noise schedule.

Timestep spacing follows what the web UI does: its k-diffusion samplers take `linspace(999, 0, steps)`
(diffusers' "linspace"), its DDIM uses SD's own "leading" spacing with `steps_offset=1`.
"""
from __future__ import annotations

from dataclasses import dataclass

from lib_lora.sd.model import NoiseSchedule


@dataclass(frozen=True)
class SamplerSpec:
    """One registry entry: the diffusers scheduler class name and its options beyond the noise schedule."""

    name: str
    scheduler: str
    options: tuple[tuple[str, object], ...] = ()
    # Ancestral samplers add fresh noise each step, drawn from the per-image generators.
    stochastic: bool = False

    def build(self, schedule: NoiseSchedule, prediction_type: str):
        """A fresh scheduler instance (schedulers carry state between steps, so never share one)."""
        import diffusers

        cls = getattr(diffusers, self.scheduler)
        return cls(
            num_train_timesteps=schedule.num_train_timesteps,
            beta_start=schedule.beta_start,
            beta_end=schedule.beta_end,
            beta_schedule=schedule.beta_schedule,
            prediction_type=prediction_type,
            **dict(self.options),
        )

    __call__ = build


_K = (("timestep_spacing", "linspace"),)
_DPM2M = (("algorithm_type", "dpmsolver++"), ("solver_order", 2))
_LDM = (("timestep_spacing", "leading"), ("steps_offset", 1))

SAMPLERS: dict[str, SamplerSpec] = {}


def register_sampler(spec: SamplerSpec) -> SamplerSpec:
    """Add a sampler under its web-UI name (the UI's dropdown lists this registry)."""
    SAMPLERS[spec.name] = spec
    return spec


for _spec in (
    SamplerSpec("Euler a", "EulerAncestralDiscreteScheduler", _K, stochastic=True),
    SamplerSpec("Euler", "EulerDiscreteScheduler", _K),
    SamplerSpec("DPM++ 2M", "DPMSolverMultistepScheduler", _K + _DPM2M),
    SamplerSpec("DPM++ 2M Karras", "DPMSolverMultistepScheduler", _K + _DPM2M + (("use_karras_sigmas", True),)),
    SamplerSpec("UniPC", "UniPCMultistepScheduler", _K),
    SamplerSpec("DDIM", "DDIMScheduler", _LDM + (("clip_sample", False), ("set_alpha_to_one", False))),
):
    register_sampler(_spec)
