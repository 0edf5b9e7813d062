"""Model families: the small protocol the training loop needs, so it never knows which model it trains.

    family = family_for(model)            # SDModel -> DiffusersFamily; the web UI's sd_model -> LdmFamily
    patcher = WeightPatcher(family.targets(), "hooked"); patcher.apply([Application(network)])
    cond = family.conditioning_for(batch, clip_skip=..., max_token_length=..., with_grad=train_te)
    latents = batch.latents if batch.latents is not None else family.encode_images(batch.images)
    noise = losses.make_noise(latents, ...); t = losses.sample_timesteps(...)
    noisy = losses.add_noise(latents, noise, t, family.alphas_cumprod)
    pred = family.predict(noisy, t, cond)
    target = losses.target_for(family.prediction_type, latents, noise, t, family.alphas_cumprod)
    ...
    family.close()                         # gives back what the family changed (flags, wrappers) on the model

Both implementations freeze every base weight (requires_grad False); only the network's parameters train.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lib_lora.train.families.conditioning import Conditioning, check_max_token_length, sdxl_time_ids
from lib_lora.types import Arch

if TYPE_CHECKING:
    from lib_lora.keys import ModelTargets
    from lib_lora.train.data.records import Batch

__all__ = ["Conditioning", "FamilyBase", "ModelFamily", "clip_root", "family_for", "posterior_latents",
           "weights_fingerprint"]

IDENTITY_PARTS = ("model", "vae", "text")


@runtime_checkable
class ModelFamily(Protocol):
    """What the trainer needs from a model. See `DiffusersFamily` and `LdmFamily`.

    arch: SD1/SD2/SDXL. prediction_type: 'epsilon' | 'v_prediction'. device, dtype: of the frozen U-Net
    weights. alphas_cumprod: float32 [num_train_timesteps] on `device`, the model's noise schedule.
    """

    arch: Arch
    prediction_type: str
    alphas_cumprod: Tensor
    can_park: bool  # the VAE / text encoders may leave the device between steps (`lib_lora.train.parking`)

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def targets(self) -> ModelTargets:
        """Every LoRA target by kohya name, on the modules that actually run (for WeightPatcher 'hooked')."""

    def text_encoders(self) -> list[nn.Module]:
        """The text encoder modules that hold the TE targets (one, or CLIP-L and bigG for SDXL)."""

    def unet(self) -> nn.Module:
        """The U-Net module that holds the U-Net targets."""

    def encode_images(self, images: Tensor, *, sample: bool = True,
                      generator: torch.Generator | None = None) -> Tensor:
        """(B, 3, H, W) images in [-1, 1] -> scaled latents (B, 4, H/8, W/8), float32, no grad.
        sample: draw from the VAE posterior (sd-scripts) with `generator`; False: its mean."""

    def encode_prompts(self, captions: list[str], *, clip_skip: int | None = None,
                       max_token_length: int | None = None, with_grad: bool = False) -> Conditioning:
        """Text conditioning (no extra). with_grad: keep the graph (a text-encoder network is trained)."""

    def conditioning_for(self, batch: Batch, *, clip_skip: int | None = None, max_token_length: int | None = None,
                         with_grad: bool = False, dedupe: bool = True) -> Conditioning:
        """`encode_prompts(batch.captions)` or the batch's cached outputs, plus SDXL time ids, on `device`.
        dedupe: encode each distinct caption once (the encoder is deterministic for them; pass False when a
        text-encoder network draws dropout masks per row)."""

    def predict(self, noisy: Tensor, timesteps: Tensor, cond: Conditioning) -> Tensor:
        """U-Net output for noisy latents at integer timesteps (inputs cast to `dtype`)."""

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute activations in backward (U-Net blocks and text-encoder layers); LoRA grads still flow."""

    def parts(self, part: str) -> list[nn.Module]:
        """The modules of one part: 'vae', 'text' (the text encoders) or 'model' (everything)."""

    def identity(self, part: str = "model") -> str:
        """Stable id for caches: 'vae' (latents), 'text' (text-encoder weights) or 'model' (everything)."""

    def text_identity(self, clip_skip: int | None, max_token_length: int | None) -> str:
        """Encoder id of text-encoder outputs encoded with these settings (for the text-encoder-output cache)."""

    def close(self) -> None:
        """Undo what the family changed on the model (checkpoint wrappers, requires_grad/checkpoint flags)."""


def family_for(model: Any, **kwargs: Any) -> ModelFamily:
    """The family for a model object: an `SDModel` (diffusers modules) or an LDM/SGM model shaped like the
    web UI's `shared.sd_model` (has `model.diffusion_model`). kwargs go to the family's constructor."""
    from lib_lora.sd.model import SDModel

    if isinstance(model, SDModel):
        from lib_lora.train.families.diffusers_family import DiffusersFamily

        return DiffusersFamily(model, **kwargs)
    if hasattr(getattr(model, "model", None), "diffusion_model"):
        from lib_lora.train.families.ldm_family import LdmFamily

        return LdmFamily(model, **kwargs)
    raise TypeError(f"no model family for {type(model).__name__}: expected an SDModel or a web UI model "
                    "with `model.diffusion_model`")


def weights_fingerprint(modules: Iterable[nn.Module]) -> str:
    """A cheap hash of weights: names, shapes, dtypes and 64 evenly spaced values of every parameter/buffer.

    Reads O(number of tensors) values, so it is instant even for SDXL; any real change to a weight (a merged
    LoRA, another VAE) changes the sampled values.
    """
    h = hashlib.sha256()
    for i, module in enumerate(modules):
        for name, t in module.state_dict(keep_vars=False).items():
            h.update(f"{i}.{name}:{tuple(t.shape)}:{t.dtype}".encode())
            flat = t.detach().reshape(-1)
            if flat.numel():
                step = max(1, flat.numel() // 64)
                h.update(flat[::step][:64].to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()[:16]


def clip_root(te: nn.Module) -> nn.Module:
    """The module holding `encoder` and `final_layer_norm` of a transformers CLIP text model: transformers 5
    flattened `CLIPTextModel` (no `text_model` level); 4.x and `CLIPTextModelWithProjection` keep the level."""
    return getattr(te, "text_model", te)


def posterior_latents(mean: Tensor, std: Tensor, sample: bool, generator: torch.Generator | None) -> Tensor:
    """A draw mean + std·N(0, I) from the VAE posterior (or its mean), float32; noise drawn on the
    generator's device so a seed gives the same latents in both families and on any machine."""
    mean = mean.float()
    if not sample:
        return mean
    device = generator.device if generator is not None else mean.device
    noise = torch.randn(mean.shape, generator=generator, device=device, dtype=torch.float32).to(mean.device)
    return mean + std.float() * noise


class _Checkpointed:
    """Instance-level forward wrappers running modules under non-reentrant `torch.utils.checkpoint`.

    Non-reentrant because the base weights are frozen and block inputs may not require grad: the reentrant
    variant would then return outputs without a graph and the LoRA parameters inside would get no grads.
    """

    def __init__(self) -> None:
        self._wrapped: list[tuple[nn.Module, Any, Any]] = []

    @property
    def active(self) -> bool:
        return bool(self._wrapped)

    def wrap(self, modules: Iterable[nn.Module]) -> None:
        for module in modules:
            previous = module.__dict__.get("forward")
            original = module.forward

            def forward(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
                if not torch.is_grad_enabled():
                    return _original(*args, **kwargs)
                return checkpoint(_original, *args, use_reentrant=False, **kwargs)

            module.forward = forward
            self._wrapped.append((module, forward, previous))

    def unwrap(self) -> None:
        while self._wrapped:
            module, forward, previous = self._wrapped.pop()
            if module.__dict__.get("forward") is not forward:
                raise RuntimeError(f"forward of {type(module).__name__} was re-wrapped by someone else; not removing")
            if previous is None:
                del module.forward
            else:
                module.forward = previous


class FamilyBase:
    """Shared parts of the two families: batch glue, identities, checkpoint wrappers, frozen weights."""

    arch: Arch
    prediction_type: str
    alphas_cumprod: Tensor
    can_park = True

    def __init__(self) -> None:
        self._checkpointed = _Checkpointed()
        self._fingerprints: dict[str, str] = {}
        self._frozen: list[tuple[nn.Parameter, bool]] = []

    # -- to implement
    def encode_prompts(self, captions: list[str], *, clip_skip: int | None = None,
                       max_token_length: int | None = None, with_grad: bool = False) -> Conditioning:
        raise NotImplementedError

    def _identity_modules(self, part: str) -> list[nn.Module]:
        raise NotImplementedError

    def _model_hash(self) -> str:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    # -- shared
    def conditioning_for(self, batch: Batch, *, clip_skip: int | None = None, max_token_length: int | None = None,
                         with_grad: bool = False, dedupe: bool = True) -> Conditioning:
        if batch.text_encoder_outputs is not None and not with_grad:
            cond = Conditioning.from_dict(batch.text_encoder_outputs)
        else:
            captions = list(batch.captions)
            # A folder without caption files captions every image with its class tokens (sd-scripts), so whole
            # batches often share one caption: run the text encoder once per distinct caption. Indexing the
            # result gives the same values, and the same gradients (summed over the rows that share a caption).
            unique = list(dict.fromkeys(captions)) if dedupe else captions
            cond = self.encode_prompts(unique, clip_skip=clip_skip, max_token_length=max_token_length,
                                       with_grad=with_grad)
            if len(unique) < len(captions):
                position = {c: i for i, c in enumerate(unique)}
                cond = cond.rows(torch.tensor([position[c] for c in captions], device=cond.context.device))
        cond = cond.to(self.device)
        if self.arch is Arch.SDXL:
            cond.extra["time_ids"] = sdxl_time_ids(batch.original_sizes_hw, batch.crop_top_lefts,
                                                   batch.target_sizes_hw).to(self.device)
        return cond

    def parts(self, part: str) -> list[nn.Module]:
        """The modules of one part: 'vae', 'text' (the text encoders) or 'model' (everything)."""
        return list(self._identity_modules(part))

    def identity(self, part: str = "model") -> str:
        if part not in IDENTITY_PARTS:
            raise ValueError(f"identity part must be one of {IDENTITY_PARTS}, not {part!r}")
        if part not in self._fingerprints:
            self._fingerprints[part] = weights_fingerprint(self._identity_modules(part))
        model = self._model_hash() or "-"
        return f"{self.arch.value}:{self.prediction_type}:{model}:{part}:{self._fingerprints[part]}"

    def text_identity(self, clip_skip: int | None, max_token_length: int | None) -> str:
        """Id of text-encoder outputs for these encoding settings (the text-encoder-output cache's encoder id)."""
        check_max_token_length(max_token_length)
        return f"{self.identity('text')}:clip_skip={clip_skip}:max_tokens={max_token_length}"

    def _freeze(self, modules: Iterable[nn.Module]) -> None:
        """requires_grad False on every weight, remembering what it was for `close()`."""
        seen = {id(p) for p, _ in self._frozen}
        for module in modules:
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    self._frozen.append((p, p.requires_grad))
                    p.requires_grad_(False)

    def _unfreeze(self) -> None:
        for p, flag in self._frozen:
            p.requires_grad_(flag)
        self._frozen.clear()

    def __enter__(self) -> FamilyBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._checkpointed.unwrap()
