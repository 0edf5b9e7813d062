"""The diffusers model family: trains on an `SDModel` (standalone app and CLI).

Text encoding follows sd-scripts (tokenisation and long prompts: `conditioning.py`):
- SD1/SD2: the last layer's states after the final layer norm; clip_skip k takes the states after the
  k-th layer from the end (`hidden_states[-k]`) and applies the final layer norm (sd-scripts, the web UI).
  SD2's OpenCLIP tower is loaded as a 23-layer CLIPTextModel (SD2 conditions on the penultimate of 24
  blocks), so clip_skip 1 is already SD2's penultimate layer, as in sd-scripts.
- SDXL: CLIP-L's and bigG's penultimate states (`hidden_states[-2]`, no final norm) concatenated on the
  channel axis; pooled = bigG's text projection of its final-normed last states at the first EOS token
  (sd-scripts' `pool_workaround`, independent of the config's eos id). clip_skip is ignored, as sd-scripts
  ignores it for SDXL (the web UI too, unless its SDXL CLIP-L skip option is on).
Works with the transformers 4 (`text_model.` level) and 5 (flattened `CLIPTextModel`) module trees.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from lib_lora import keys
from lib_lora.errors import ConfigError
from lib_lora.keys import ModelTargets
from lib_lora.sd.model import SDModel
from lib_lora.train.families import FamilyBase, clip_root, posterior_latents
from lib_lora.train.families.conditioning import (
    Conditioning,
    check_clip_skip,
    check_max_token_length,
    first_eos,
    merge_chunks,
    tokenize,
)
from lib_lora.train.losses import PREDICTION_TYPES, alphas_cumprod_for
from lib_lora.types import Arch, Component


class DiffusersFamily(FamilyBase):
    """`ModelFamily` over diffusers/transformers modules of an `SDModel` (frozen: requires_grad False)."""

    def __init__(self, model: SDModel, *, tokenizers: list | None = None):
        super().__init__()
        self.model = model
        self.arch = model.arch
        if model.prediction_type not in PREDICTION_TYPES:
            raise ConfigError("prediction_type", model.prediction_type, f"must be one of {PREDICTION_TYPES}")
        self.prediction_type = model.prediction_type
        self.tokenizers = list(tokenizers if tokenizers is not None else model.tokenizers)
        expected = 2 if self.arch is Arch.SDXL else 1
        if len(model.text_encoders) != expected or len(self.tokenizers) != expected:
            raise ConfigError("text_encoders", (len(model.text_encoders), len(self.tokenizers)),
                              f"{self.arch.label} needs {expected} text encoder(s) and as many tokenizers")
        for m in model.modules():
            m.eval()
        self._freeze(model.modules())
        s = model.schedule
        self.alphas_cumprod = alphas_cumprod_for(s.num_train_timesteps, s.beta_start, s.beta_end,
                                                 s.beta_schedule).to(self.device)
        self._targets: ModelTargets | None = None

    # ------------------------------------------------------------------------------------------ modules

    @property
    def device(self) -> torch.device:
        return next(self.model.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.unet.parameters()).dtype

    def unet(self) -> nn.Module:
        return self.model.unet

    def text_encoders(self) -> list[nn.Module]:
        return list(self.model.text_encoders)

    def targets(self) -> ModelTargets:
        if self._targets is None:
            comps = [Component.TE1, Component.TE2] if self.arch is Arch.SDXL else [Component.TE]
            parts = [keys.unet_targets(self.model.unet, self.arch, "diffusers")]
            parts += [keys.clip_text_targets(te, c) for te, c in zip(self.model.text_encoders, comps)]
            self._targets = ModelTargets.merge(self.arch, parts)
        return self._targets

    # ------------------------------------------------------------------------------------------ encoding

    @torch.no_grad()
    def encode_images(self, images: Tensor, *, sample: bool = True,
                      generator: torch.Generator | None = None) -> Tensor:
        vae = self.model.vae
        param = next(vae.parameters())
        dist = vae.encode(images.to(param.device, param.dtype)).latent_dist
        z = posterior_latents(dist.mean, dist.std, sample, generator)
        shift = getattr(getattr(vae, "config", None), "shift_factor", None) or 0.0
        return (z - shift) * self.model.vae_scale_factor

    def encode_prompts(self, captions: list[str], *, clip_skip: int | None = None,
                       max_token_length: int | None = None, with_grad: bool = False) -> Conditioning:
        n = check_max_token_length(max_token_length)
        with contextlib.nullcontext() if with_grad else torch.no_grad():
            if self.arch is Arch.SDXL:
                return self._encode_sdxl(captions, max_token_length, n)
            te, tok = self.model.text_encoders[0], self.tokenizers[0]
            k = check_clip_skip(clip_skip, te.config.num_hidden_layers)
            ids = tokenize(tok, captions, max_token_length).reshape(-1, tok.model_max_length)
            states = te(ids.to(self.device), output_hidden_states=True).hidden_states[-k]
            return Conditioning(merge_chunks(clip_root(te).final_layer_norm(states), n))

    def _encode_sdxl(self, captions: list[str], max_token_length: int | None, n: int) -> Conditioning:
        (te1, te2), (tok1, tok2) = self.model.text_encoders, self.tokenizers
        ids1 = tokenize(tok1, captions, max_token_length).reshape(-1, tok1.model_max_length).to(self.device)
        ids2 = tokenize(tok2, captions, max_token_length).reshape(-1, tok2.model_max_length).to(self.device)
        states1 = te1(ids1, output_hidden_states=True).hidden_states[-2]
        hidden2 = te2(ids2, output_hidden_states=True).hidden_states
        last = clip_root(te2).final_layer_norm(hidden2[-1])
        pooled = te2.text_projection(last[torch.arange(last.shape[0], device=last.device),
                                          first_eos(ids2, tok2.eos_token_id)])
        context = torch.cat([merge_chunks(states1, n), merge_chunks(hidden2[-2], n)], dim=-1)
        return Conditioning(context, pooled.reshape(len(captions), n, -1)[:, 0])

    # ------------------------------------------------------------------------------------------ U-Net

    def predict(self, noisy: Tensor, timesteps: Tensor, cond: Conditioning) -> Tensor:
        dtype, device = self.dtype, self.device
        kwargs = {}
        if self.arch is Arch.SDXL:
            if cond.pooled is None or "time_ids" not in cond.extra:
                raise ValueError("SDXL needs the pooled embedding and extra['time_ids'] (use conditioning_for)")
            kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled.to(device, dtype),
                                           "time_ids": cond.extra["time_ids"].to(device, dtype)}
        out = self.model.unet(noisy.to(device, dtype), timesteps.to(device), cond.context.to(device, dtype),
                              **kwargs)
        return out.sample

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self._checkpointed.unwrap()
        if enabled:
            # diffusers' default checkpoint function is non-reentrant, so frozen inputs are fine.
            self.model.unet.enable_gradient_checkpointing()
            # transformers checkpoints only in training mode (and 4.x re-entrantly): wrap the layers instead.
            self._checkpointed.wrap(layer for te in self.model.text_encoders
                                    for layer in clip_root(te).encoder.layers)
        else:
            self.model.unet.disable_gradient_checkpointing()

    # ------------------------------------------------------------------------------------------ identity

    def _identity_modules(self, part: str) -> list[nn.Module]:
        return {"vae": [self.model.vae], "text": list(self.model.text_encoders)}.get(part, self.model.modules())

    def _model_hash(self) -> str:
        return self.model.short_hash

    def close(self) -> None:
        self.set_gradient_checkpointing(False)
        self._unfreeze()
