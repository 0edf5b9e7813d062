"""Parking: the VAE and text encoders leave the accelerator while steps run, when their outputs are cached.

With `cache_latents` the steps never run the VAE, and with `cache_text_encoder_outputs` they never run the text
encoders; on a GPU those modules only hold memory between steps. The run moves them to the CPU before its first
step and back for whatever needs them (sample images, a validation pass on uncached images) and at its end, so the
model the run was given (the web UI's loaded model included) ends where it started. Moving a tensor to the CPU and
back copies it exactly: nothing of the model changes.

On the CPU there is nothing to free, and a family whose weights are views of someone else's storage (Forge's loaded
model) must not be moved: `.to()` would copy them apart from the host's model. Such a family sets `can_park` False.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

CPU = torch.device("cpu")
NAMES = {"vae": "the VAE", "text": "the text encoder(s)"}


def _on(module: nn.Module, device: torch.device) -> bool:
    """Every weight of `module` is on `device` (a module that a host already keeps elsewhere is left alone)."""
    tensors = [*module.parameters(), *module.buffers()]
    return bool(tensors) and all(t.device == device for t in tensors)


class Parking:
    """The modules of `groups` ({"vae": [...], "text": [...]}) that are on `device`, parked on the CPU on request."""

    def __init__(self, groups: dict[str, list[nn.Module]], device: torch.device, *, allowed: bool = True):
        self.device = torch.device(device)
        movable = allowed and self.device.type != "cpu"
        self.groups = {name: [m for m in modules if _on(m, self.device)] for name, modules in groups.items()
                       if movable}
        self.groups = {name: modules for name, modules in self.groups.items() if modules}
        self.parked = False

    def describe(self) -> str:
        """The run log's line ("" when nothing is parked)."""
        if not self.groups:
            return ""
        what = " and ".join(NAMES.get(name, name) for name in self.groups)
        return f"{what} wait on the CPU between steps (their outputs are cached), freeing {self.device} memory"

    def park(self) -> None:
        if self.groups and not self.parked:
            self._move(CPU)
            self.parked = True

    def unpark(self) -> None:
        if self.parked:
            self._move(self.device)
            self.parked = False

    @contextlib.contextmanager
    def unparked(self) -> Iterator[None]:
        """The modules back on the device for a while (samples, validation); parked again afterwards."""
        was = self.parked
        self.unpark()
        try:
            yield
        finally:
            if was:
                self.park()

    def _move(self, device: torch.device) -> None:
        with torch.no_grad():
            for modules in self.groups.values():
                for module in modules:
                    module.to(device)
        if device == CPU and self.device.type == "cuda":
            torch.cuda.empty_cache()


def parking_for(family, caches_latents: bool, caches_text: bool) -> Parking:
    """What a run of `family` can park: the VAE when latents are cached, the text encoders when their outputs are."""
    groups = {}
    if caches_latents:
        groups["vae"] = family.parts("vae")
    if caches_text:
        groups["text"] = family.parts("text")
    return Parking(groups, family.device, allowed=getattr(family, "can_park", True))
