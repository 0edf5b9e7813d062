"""The Forge web UI (2025, its own `backend/`) adapter: with `a1111.py` and `a1111_train.py`, the only modules that
import the web UI.

Forge keeps A1111's extension API (scripts, callbacks, options, X/Y/Z plot, the API), so `ForgeAdapter` is the
A1111 adapter with what Forge does differently:
- its built-in LoRA (`sd_forge_lora`) keeps patches on model patchers and merges them when the model is loaded,
  so block weights are scaled copies of those patches (`webui_lbw.scale_patches`) on clones of the patchers;
- `shared.sd_model` is a placeholder until the first generation, then an engine object (not an nn.Module) whose
  U-Net lives at `forge_objects.unet.model.diffusion_model`;
- every loaded weight is an inference tensor, so training runs on our own modules over copies of them
  (`forge_train.py`).
"""
from __future__ import annotations

from typing import Any

from modules import shared

from lib_lora.errors import LibLoraError
from lib_lora.host import webui_lbw
from lib_lora.host.a1111 import A1111Adapter, builtin_networks
from lib_lora.host.webui_lbw import BlockRequest
from lib_lora.types import Arch


class ForgeWindows:
    """The patch sets of one generation's hooked LoRA files, switched at the denoiser callback for U-Net windows."""

    def __init__(self, arch: Arch, base_unet_patches: dict, hooked: dict[str, BlockRequest]):
        self.arch, self.base, self.hooked = arch, base_unet_patches, hooked
        self.state: tuple[bool, ...] = self.state_at(0)

    @property
    def windowed(self) -> bool:
        return any(r.start > 0 or r.stop is not None for r in self.hooked.values())

    def state_at(self, step: int) -> tuple[bool, ...]:
        return tuple(r.unet_on(step) for r in self.hooked.values())

    def patches_at(self, step: int) -> dict:
        return webui_lbw.scale_patches(self.base, self.hooked, self.arch, unet=True, step=step)


class ForgeAdapter(A1111Adapter):
    host_name = "forge"

    def __init__(self) -> None:
        super().__init__()
        self._windows: ForgeWindows | None = None

    def sd_model(self) -> Any:
        model = shared.sd_model
        return model if hasattr(model, "forge_objects") else None  # FakeInitialModel before the first generation

    def arch(self) -> Arch:
        model = self.sd_model()
        if model is None:
            return Arch.SD1
        from lib_lora.host.a1111 import model_arch

        return model_arch(model)

    def unet_module(self) -> Any:
        return self.sd_model().forge_objects.unet.model.diffusion_model

    # ------------------------------------------------------------------------------------ the LoRA hook

    def apply_requests(self, p: Any, requests: list[BlockRequest]) -> None:
        self._windows = None
        loaded = builtin_networks().loaded_networks
        matched = webui_lbw.match_requests(loaded, requests, lambda n: n.mentioned_name)
        hooked = {loaded[i].network_on_disk.filename: request for i, request in matched}
        if not hooked:
            return
        engine = p.sd_model
        after = engine.forge_objects_after_applying_lora
        arch = self.arch()
        windows = ForgeWindows(arch, dict(after.unet.lora_patches), hooked)
        unet, clip = after.unet.clone(), after.clip.clone()
        unet.lora_patches = windows.patches_at(0)
        clip.patcher.lora_patches = webui_lbw.scale_patches(after.clip.patcher.lora_patches, hooked, arch,
                                                            unet=False, step=0)
        after.unet, after.clip = unet, clip
        # Forge skips re-applying LoRAs while this hash is unchanged: make the next generation start again from
        # the unscaled patches (its loader re-merges only if the resulting patch identifiers differ).
        signature = ";".join(f"{name}={r.signature(arch)}" for name, r in hooked.items())
        engine.current_lora_hash = f"{engine.current_lora_hash}{webui_lbw.TAG}[{signature}]"
        self._windows = windows if windows.windowed else None

    def on_cfg_denoiser(self, params: Any) -> None:
        windows = self._windows
        if windows is None:
            return
        step = self.sampling_step(params)
        state = windows.state_at(step)
        if state == windows.state:
            return
        unet = shared.sd_model.forge_objects.unet  # the patcher this sampling runs
        unet.lora_patches = windows.patches_at(step)
        unet.refresh_loras()  # merges the new set into the loaded weights (Forge's own loader)
        windows.state = state

    def postprocess(self, p: Any) -> None:
        self._windows = None

    # ------------------------------------------------------------------------------------ Host protocol side

    def model_info(self):
        from lib_lora.host.base import ModelInfo

        model = self.sd_model()
        info = getattr(model, "sd_checkpoint_info", None) or getattr(shared.opts, "sd_model_checkpoint", None)
        if model is None or info is None:
            return None
        param = next(self.unet_module().parameters())
        arch = self.arch()
        return ModelInfo(arch=arch, name=getattr(info, "model_name", str(info)),
                         short_hash=getattr(info, "shorthash", "") or "", source=getattr(info, "filename", ""),
                         resolution={Arch.SDXL: 1024}.get(arch, 512), device=str(param.device),
                         dtype=str(param.dtype).removeprefix("torch."))

    # ------------------------------------------------------------------------------------ training

    def remove_lora_patches(self) -> str:
        """Forge's own loader puts back the weights it merged (from its backup) and forgets the merged set, so the
        next generation with a LoRA merges afresh. Returns what was done, for the run's log ("" when nothing was)."""
        from lib_lora.host.forge_train import restore_original_weights

        model = self.sd_model()
        self._windows = None
        if model is None:
            return ""
        names = [net.name for net in builtin_networks().loaded_networks]
        # Onto Forge's compute device first (a no-op where it keeps them there): the run trains where the weights
        # are. Loading re-merges the patcher's LoRA set, so the merges are undone after it.
        from backend import memory_management

        objects = model.forge_objects
        memory_management.load_models_gpu([objects.unet, objects.clip.patcher, objects.vae.patcher])
        restored = restore_original_weights(model)
        if not restored:
            return ""
        return (f"Forge's LoRA weights ({', '.join(names) or 'last used'}) were taken off {restored} weights of the "
                "model before training")

    def train_loaded(self, cfg, listeners, should_stop):
        """Train `cfg` through our modules over the weights Forge has loaded (`forge_train`): its own U-Net
        cannot be differentiated through."""
        from lib_lora.host.forge_train import train_on_engine

        model, info = self.sd_model(), self.model_info()
        if model is None or info is None:
            raise LibLoraError("Forge has not loaded a model yet: generate one image first (Forge loads its "
                               "model at the first generation)")
        return train_on_engine(model, cfg, self.model_facts(), listeners, should_stop, name=info.name,
                               path=info.source, short_hash=info.short_hash)

    def status(self) -> dict:
        out = super().status()
        model = self.sd_model()
        info = getattr(model, "sd_checkpoint_info", None)
        out.update(arch=self.arch().value if model is not None else None, checkpoint=getattr(info, "name", None))
        return out


def register() -> type:
    return ForgeAdapter().register()
