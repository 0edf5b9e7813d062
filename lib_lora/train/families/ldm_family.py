"""The LDM model family: trains on a model shaped like the web UI's `shared.sd_model` (A1111 / Forge 1).

What it reads (each missing attribute is an error naming it):
- `model.diffusion_model`: the ldm/sgm `UNetModel`, called directly as `(x, timesteps=t, context=c[, y=v])`, so
  the host's own attention implementation runs;
- `cond_stage_model` (SD1: hijacked CLIP embedder whose `.wrapped` has `.transformer` (transformers CLIP) and
  `.tokenizer`; SD2: OpenCLIP embedder whose `.wrapped.model` has `transformer.resblocks`), or for SDXL
  `conditioner.embedders[0]` (CLIP-L) and `[1]` (OpenCLIP bigG);
- `encode_first_stage` + `get_first_stage_encoding`, `alphas_cumprod`, `parameterization` ('eps' / 'v'), and
  `is_sdxl` / `is_sd2` (inferred from the structure when absent).

The text encoders are run module by module, never through `get_learned_conditioning` (Forge decorates it
with inference_mode, and the web UI's prompt parsing is not sd-scripts' tokenisation), so a text-encoder
LoRA gets gradients and both families see the same tokens. Encoding conventions equal the diffusers family's:
SD2 runs the blocks its embedder runs (all but `layer_idx` = 1, the penultimate) then `ln_final`, which is
what the 23-layer diffusers conversion computes; clip_skip k stops k − 1 blocks earlier.

ldm's own gradient checkpointing (`checkpoint=True` / `use_checkpoint=True` blocks, as in v1-inference.yaml)
differentiates only w.r.t. the block's inputs and own parameters, so it would silently drop the gradients of
LoRA modules hooked inside; the family routes such blocks to their `_forward` while it lives, and offers
non-reentrant checkpointing of whole U-Net blocks instead. `close()` undoes every change.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lib_lora import keys
from lib_lora.errors import ConfigError
from lib_lora.keys import ModelTargets, Target
from lib_lora.train.families import FamilyBase, clip_root, posterior_latents
from lib_lora.train.families.conditioning import (
    Conditioning,
    check_clip_skip,
    check_max_token_length,
    first_eos,
    merge_chunks,
    tokenize,
)
from lib_lora.train.losses import check_schedule
from lib_lora.types import Arch, Component

PARAMETERIZATIONS = {"eps": "epsilon", "v": "v_prediction"}
_BLOCK_INDEX = re.compile(r"(?:^|\.)transformer\.resblocks\.(\d+)\.")


def _require(obj: Any, path: str, what: str, root: str = "sd_model") -> Any:
    """`obj.a.b.c` for path 'a.b.c', or an error naming the first missing attribute."""
    current = obj
    for i, name in enumerate(path.split(".")):
        if not hasattr(current, name):
            where = ".".join([root, *path.split(".")[:i]])
            raise ConfigError(f"{root}.{path}", None, f"{what}: `{where}` ({type(current).__name__}) has no "
                              f"attribute `{name}`")
        current = getattr(current, name)
    return current


def _unwrap(embedder: nn.Module) -> nn.Module:
    # The web UI's hijack wraps each embedder (`FrozenCLIPEmbedderWithCustomWords.wrapped`).
    return getattr(embedder, "wrapped", embedder)


@dataclass
class _ClipTower:
    """A transformers CLIP text model inside an ldm `FrozenCLIPEmbedder`."""

    transformer: nn.Module
    tokenizer: Any
    component: Component

    @property
    def layers(self) -> list[nn.Module]:
        return list(clip_root(self.transformer).encoder.layers)

    def targets(self) -> list[Target]:
        return keys.clip_text_targets(self.transformer, self.component)

    def states(self, ids: Tensor) -> tuple[Tensor, ...]:
        """Embedding output then each layer's output (no final norm), as transformers' `hidden_states`."""
        return tuple(self.transformer(ids, output_hidden_states=True).hidden_states)

    def final_norm(self, x: Tensor) -> Tensor:
        return clip_root(self.transformer).final_layer_norm(x)


@dataclass
class _OpenClipTower:
    """An OpenCLIP text tower (`token_embedding`, `positional_embedding`, `transformer.resblocks`, `ln_final`,
    `attn_mask`, `text_projection`). `used`: blocks the embedder runs (SD2: all but the last)."""

    model: nn.Module
    tokenizer: Any
    component: Component
    used: int

    @property
    def layers(self) -> list[nn.Module]:
        return list(self.model.transformer.resblocks)[:self.used]

    def targets(self) -> list[Target]:
        # Blocks past `used` never run: LoRA modules there would get no gradient.
        out = []
        for t in keys.open_clip_text_targets(self.model, self.component):
            m = _BLOCK_INDEX.search(f"{t.path}.")
            if m is None or int(m.group(1)) < self.used:
                out.append(t)
        return out

    def states(self, ids: Tensor) -> tuple[Tensor, ...]:
        """Embedding output then each used block's output (batch first), like `_ClipTower.states`."""
        m = self.model
        x = m.token_embedding(ids) + m.positional_embedding[: ids.shape[1]].to(m.token_embedding.weight.dtype)
        batch_first = bool(getattr(m.transformer, "batch_first", False))  # open_clip >= 2.24 is batch first
        mask = getattr(m, "attn_mask", None)
        if mask is not None:
            mask = mask[: ids.shape[1], : ids.shape[1]]
        out = [x]
        x = x if batch_first else x.permute(1, 0, 2)
        for block in self.layers:
            x = block(x, attn_mask=mask)
            out.append(x if batch_first else x.permute(1, 0, 2))
        return tuple(out)

    def final_norm(self, x: Tensor) -> Tensor:
        return self.model.ln_final(x)

    def project(self, x: Tensor) -> Tensor:
        proj = self.model.text_projection
        return proj(x) if isinstance(proj, nn.Module) else x @ proj


class LdmFamily(FamilyBase):
    """`ModelFamily` over a web-UI-shaped LDM/SGM model. `tokenizers`: transformers CLIP tokenizers, one per
    text encoder, for OpenCLIP towers, which carry none (e.g. `lib_lora.sd.checkpoint.load_tokenizers`)."""

    def __init__(self, model: Any, *, tokenizers: list | None = None):
        super().__init__()
        self.model = model
        self._unet = _require(model, "model.diffusion_model", "the U-Net")
        self.arch = self._detect_arch()
        param = getattr(model, "parameterization", "eps")
        if param not in PARAMETERIZATIONS:
            raise ConfigError("sd_model.parameterization", param, f"must be one of {sorted(PARAMETERIZATIONS)}")
        self.prediction_type = PARAMETERIZATIONS[param]
        ac = _require(model, "alphas_cumprod", "the noise schedule")
        self.alphas_cumprod = ac.detach().to(self.device, torch.float32)
        check_schedule(self.alphas_cumprod)
        self._towers = self._find_towers(tokenizers)
        self._targets: ModelTargets | None = None
        self._bypassed: list[tuple[nn.Module, Any]] = []
        vae = getattr(model, "first_stage_model", None)
        self._freeze([self._unet, *self.text_encoders(), *([vae] if isinstance(vae, nn.Module) else [])])
        self._bypass_ldm_checkpointing()

    # ------------------------------------------------------------------------------------------ structure

    def _detect_arch(self) -> Arch:
        m = self.model
        if getattr(m, "is_sdxl", hasattr(m, "conditioner")):
            return Arch.SDXL
        is_sd2 = getattr(m, "is_sd2", None)
        if is_sd2 is None:
            is_sd2 = hasattr(_unwrap(_require(m, "cond_stage_model", "the text encoder")), "model")
        return Arch.SD2 if is_sd2 else Arch.SD1

    def _find_towers(self, tokenizers: list | None) -> list[_ClipTower | _OpenClipTower]:
        if self.arch is Arch.SDXL:
            embedders = _require(self.model, "conditioner.embedders", "the SDXL text encoders")
            specs = [(embedders[0], Component.TE1, "conditioner.embedders.0"),
                     (embedders[1], Component.TE2, "conditioner.embedders.1")]
        else:
            specs = [(_require(self.model, "cond_stage_model", "the text encoder"), Component.TE, "cond_stage_model")]
        if tokenizers is not None and len(tokenizers) != len(specs):
            raise ConfigError("tokenizers", len(tokenizers), f"{self.arch.label} needs {len(specs)} tokenizer(s)")
        towers = []
        for i, (embedder, comp, where) in enumerate(specs):
            inner = _unwrap(embedder)
            tok = tokenizers[i] if tokenizers is not None else getattr(inner, "tokenizer", None)
            if tok is None:
                raise ConfigError(f"sd_model.{where}.tokenizer", None, "this text encoder carries no transformers "
                                  "tokenizer; pass tokenizers=lib_lora.sd.checkpoint.load_tokenizers(arch)")
            if hasattr(inner, "transformer"):
                towers.append(_ClipTower(inner.transformer, tok, comp))
            elif hasattr(inner, "model"):
                blocks = len(_require(inner, "model.transformer.resblocks", "the OpenCLIP tower"))
                skip = 0 if self.arch is Arch.SDXL else int(getattr(inner, "layer_idx", 1))
                towers.append(_OpenClipTower(inner.model, tok, comp, blocks - skip))
            else:
                raise ConfigError(f"sd_model.{where}", type(inner).__name__,
                                  "expected `.transformer` (CLIP) or `.model` (OpenCLIP)")
        return towers

    @property
    def device(self) -> torch.device:
        return next(self._unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self._unet.parameters()).dtype

    def unet(self) -> nn.Module:
        return self._unet

    def text_encoders(self) -> list[nn.Module]:
        return [t.transformer if isinstance(t, _ClipTower) else t.model for t in self._towers]

    def targets(self) -> ModelTargets:
        if self._targets is None:
            parts = [keys.unet_targets(self._unet, self.arch, "compvis"), *(t.targets() for t in self._towers)]
            self._targets = ModelTargets.merge(self.arch, parts)
        return self._targets

    # ------------------------------------------------------------------------------------------ encoding

    @torch.no_grad()
    def encode_images(self, images: Tensor, *, sample: bool = True,
                      generator: torch.Generator | None = None) -> Tensor:
        encode = _require(self.model, "encode_first_stage", "the VAE encoder")
        scale = _require(self.model, "get_first_stage_encoding", "the latent scaling")
        vae = getattr(self.model, "first_stage_model", None)
        param = next(vae.parameters()) if isinstance(vae, nn.Module) else None
        x = images.to(param.device, param.dtype) if param is not None else images.to(self.device)
        posterior = encode(x)
        if hasattr(posterior, "mean") and hasattr(posterior, "std"):  # ldm: a DiagonalGaussianDistribution
            posterior = posterior_latents(posterior.mean, posterior.std, sample, generator)
        latents = scale(posterior)  # sgm: encode_first_stage already sampled and scaled; this returns it as is
        return latents.clone().float() if latents.is_inference() else latents.float()

    def encode_prompts(self, captions: list[str], *, clip_skip: int | None = None,
                       max_token_length: int | None = None, with_grad: bool = False) -> Conditioning:
        n = check_max_token_length(max_token_length)
        with contextlib.nullcontext() if with_grad else torch.no_grad():
            ids = [tokenize(t.tokenizer, captions, max_token_length).reshape(-1, t.tokenizer.model_max_length)
                   .to(self.device) for t in self._towers]
            if self.arch is not Arch.SDXL:
                tower = self._towers[0]
                k = check_clip_skip(clip_skip, len(tower.layers))
                return Conditioning(merge_chunks(tower.final_norm(tower.states(ids[0])[-k]), n))
            clip_l, big_g = self._towers
            states1 = clip_l.states(ids[0])[-2]
            states2 = big_g.states(ids[1])
            last = big_g.final_norm(states2[-1])
            rows = torch.arange(last.shape[0], device=last.device)
            pooled = big_g.project(last[rows, first_eos(ids[1], big_g.tokenizer.eos_token_id)])
            context = torch.cat([merge_chunks(states1, n), merge_chunks(states2[-2], n)], dim=-1)
            return Conditioning(context, pooled.reshape(len(captions), n, -1)[:, 0])

    # ------------------------------------------------------------------------------------------ U-Net

    def _vector(self, cond: Conditioning) -> Tensor:
        """SGM's `y`: pooled embedding, then sinusoidal embeddings of the six size/crop numbers (SGM's
        ConcatTimestepEmbedderND: [cos, sin] per number), sized to the U-Net's `label_emb` input."""
        if cond.pooled is None or "time_ids" not in cond.extra:
            raise ValueError("SDXL needs the pooled embedding and extra['time_ids'] (use conditioning_for)")
        label_emb = _require(self._unet, "label_emb", "SDXL's vector conditioning",
                             "sd_model.model.diffusion_model")
        first = next(m for m in label_emb.modules() if isinstance(m, nn.Linear))
        pooled = cond.pooled.to(self.device, torch.float32)
        dim = (first.in_features - pooled.shape[1]) // 6
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=self.device, dtype=torch.float32) / half)
        args = cond.extra["time_ids"].to(self.device, torch.float32).reshape(-1)[:, None] * freqs[None]
        sizes = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).reshape(pooled.shape[0], -1)
        return torch.cat([pooled, sizes], dim=-1)

    def predict(self, noisy: Tensor, timesteps: Tensor, cond: Conditioning) -> Tensor:
        dtype, device = self.dtype, self.device
        kwargs = {"context": cond.context.to(device, dtype)}
        if self.arch is Arch.SDXL:
            kwargs["y"] = self._vector(cond).to(dtype)
        return self._unet(noisy.to(device, dtype), timesteps=timesteps.to(device), **kwargs)

    # ------------------------------------------------------------------------------------------ checkpointing

    def _bypass_ldm_checkpointing(self) -> None:
        for module in self._unet.modules():
            flagged = getattr(module, "checkpoint", False) is True or getattr(module, "use_checkpoint", False)
            # ldm's AttentionBlock checkpoints unconditionally.
            if callable(getattr(module, "_forward", None)) and (flagged or type(module).__name__ == "AttentionBlock"):
                self._bypassed.append((module, module.__dict__.get("forward")))
                module.forward = module._forward

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self._checkpointed.unwrap()
        if enabled:
            u = self._unet
            self._checkpointed.wrap([*u.input_blocks, u.middle_block, *u.output_blocks])
            self._checkpointed.wrap(layer for t in self._towers for layer in t.layers)

    # ------------------------------------------------------------------------------------------ identity

    def _identity_modules(self, part: str) -> list[nn.Module]:
        vae = getattr(self.model, "first_stage_model", None)
        vae_list = [vae] if isinstance(vae, nn.Module) else []
        return {"vae": vae_list, "text": self.text_encoders()}.get(part, [self._unet, *self.text_encoders(),
                                                                           *vae_list])

    def _model_hash(self) -> str:
        info = getattr(self.model, "sd_checkpoint_info", None)
        return str(getattr(self.model, "sd_model_hash", None) or getattr(info, "shorthash", None) or "")

    def close(self) -> None:
        super().close()
        while self._bypassed:
            module, previous = self._bypassed.pop()
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        self._unfreeze()
