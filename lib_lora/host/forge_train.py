"""Training on the model Forge has loaded, through our own modules (no import of Forge: the adapter hands in its
engine object, `shared.sd_model`).

Forge's U-Net cannot be trained through: every weight it loads is an inference tensor (its loader runs under
`torch.inference_mode`, and autograd refuses to save those for backward), and its transformer blocks add
residuals in place (`x += ...` after a norm saved `x`), which autograd refuses too. So the run builds our
diffusers modules (the `SDModel` the standalone trainer uses, hence the diffusers model family) whose weights are
*aliases* of Forge's: ordinary tensors over the same memory (`alias`), with Forge's dtype and device. Nothing is
copied and nothing is read from disk; the base weights are frozen and never written, so Forge's model is the same
after the run, bit for bit. What training costs beyond Forge's own memory is the network, its optimizer state and
the activations of our forward.

Before the run, LoRA merges Forge made for the last generation are undone with Forge's own loader (it keeps the
originals), so the run trains on the checkpoint's weights.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lib_lora.errors import ConfigError
from lib_lora.sd.checkpoint import model_from_tensors
from lib_lora.sd.model import SDModel
from lib_lora.types import Arch

if TYPE_CHECKING:
    from lib_lora.train.config import TrainConfig
    from lib_lora.train.events import Listener
    from lib_lora.train.loop import TrainResult
    from lib_lora.train.metadata import ModelFacts

# Where each Forge component's state dict sits in an LDM checkpoint (SD1: Forge's CLIP is transformers' model,
# which is the SD1 file's layout under `cond_stage_model.`).
PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "clip_l": "cond_stage_model."}
PREDICTIONS = {"epsilon": "epsilon", "eps": "epsilon", "v_prediction": "v_prediction", "v": "v_prediction"}


def alias(tensor: Tensor) -> Tensor:
    """An ordinary (non-inference) tensor over `tensor`'s memory: autograd may save it for backward; no copy.

    Writing through it would change the host's weight too: the trainer only reads base weights."""
    out = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return out.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())


def _components(engine: Any) -> dict[str, nn.Module]:
    objects = getattr(engine, "forge_objects", None)
    if objects is None:
        raise ConfigError("model", type(engine).__name__, "Forge has not loaded a model yet: generate one image "
                                                          "first (Forge loads its model at the first generation)")
    encoders = dict(objects.clip.cond_stage_model.named_children())  # SD1: clip_l; SD2: clip_h; SDXL: + clip_g
    if set(encoders) != {"clip_l"}:
        raise ConfigError("model", sorted(encoders), "training inside Forge supports SD1.x models (one CLIP-L "
                                                     "text encoder) so far; train other models standalone or from "
                                                     "the CLI on the checkpoint file")
    return {"unet": objects.unet.model.diffusion_model, "vae": objects.vae.first_stage_model,
            "clip_l": encoders["clip_l"]}


def restore_original_weights(engine: Any) -> int:
    """Undo the LoRA merges of the last generation with Forge's own loader (it restores its backup and forgets
    the merged set, so the next generation merges what it needs again); returns how many weights it restored."""
    objects = engine.forge_objects
    restored = 0
    for model in (objects.unet.model, objects.clip.patcher.model):
        loader = getattr(model, "lora_loader", None)
        if loader is not None and loader.backup:
            restored += len(loader.backup)
            loader.refresh({})
    return restored


def loaded_tensors(engine: Any) -> dict[str, Tensor]:
    """Aliases of every weight of the loaded U-Net, VAE and text encoder, by their LDM checkpoint names."""
    out = {}
    for part, module in _components(engine).items():
        for key, tensor in module.state_dict(keep_vars=True).items():
            out[PREFIXES[part] + key] = alias(tensor.detach())
    return out


def prediction_type(engine: Any) -> str:
    predictor = getattr(engine.forge_objects.unet.model, "predictor", None)
    found = getattr(predictor, "prediction_type", "epsilon")
    return PREDICTIONS.get(str(found), "epsilon")


def trainable_model(engine: Any, *, name: str, path: str, short_hash: str = "") -> SDModel:
    """Our diffusers modules over the weights Forge has loaded (the checkpoint's own, LoRA merges undone)."""
    _components(engine)  # refuse before touching anything
    restore_original_weights(engine)
    tensors = loaded_tensors(engine)
    first = next(iter(tensors.values()))
    loaded = model_from_tensors(tensors, path or name, arch=Arch.SD1, prediction_type=prediction_type(engine),
                                device=first.device, dtype=first.dtype, short_hash=short_hash, name=name)
    return loaded.model


def train_on_engine(engine: Any, cfg: TrainConfig, facts: ModelFacts, listeners: Sequence[Listener],
                    should_stop: Callable[[], bool], *, name: str, path: str, short_hash: str = "") -> TrainResult:
    """Train `cfg` on the model Forge has loaded, through our diffusers modules over its weights (see the module
    docstring); sample images come from our pipeline on the same modules with the network attached."""
    from lib_lora.train import loop, session
    from lib_lora.train.distributed import DistContext
    from lib_lora.train.families.diffusers_family import DiffusersFamily
    from lib_lora.train.run import pipeline_sampler, vae_options

    model = trainable_model(engine, name=name, path=path, short_hash=short_hash)
    with vae_options(cfg, model):
        family = DiffusersFamily(model)
        family.can_park = False  # views of Forge's weights: `.to()` would copy them apart from Forge's model
        try:
            out_dir = Path(cfg.output.output_dir) if cfg.output.output_dir else Path("output")
            sample_fn = pipeline_sampler(model, out_dir / "sample", cfg.sampling.sample_sampler,
                                         cfg.output.output_name)
            s = session.prepare(cfg, family, facts, listeners=listeners, should_stop=should_stop,
                                sample_fn=sample_fn, dist=DistContext.detect(family.device))
            return loop.run(s)
        finally:
            family.close()
