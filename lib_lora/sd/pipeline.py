"""Text-to-image generation on an `SDModel` (standalone app, CLI, training samples).

SD1 (eps), SD2 (v-prediction) and SDXL (two text encoders, pooled embedding and size conditioning), with
the web UI's sampler names, seeds and infotext, so a PNG made here reads back in the web UI's
"PNG Info" tab. Image i of a batch uses seed + i and its own CPU generator, as the web UI does, so an
image can be re-made alone from the seed its infotext reports.
"""
from __future__ import annotations

import json
import math
import os
import random
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from lib_lora.errors import ConfigError, LibLoraError
from lib_lora.sd.model import SDModel
from lib_lora.sd.samplers import SAMPLERS, SamplerSpec, register_sampler
from lib_lora.types import Arch

__all__ = [
    "SAMPLERS",
    "GenerationCancelled",
    "GenerationParams",
    "GenerationResult",
    "PromptEmbeds",
    "encode_prompts",
    "format_infotext",
    "generate",
    "register_sampler",
    "save_png",
]

MAX_SEED = 2**32 - 1


class GenerationCancelled(LibLoraError):
    """`should_stop()` returned True during generation."""

    def __init__(self, step: int, total: int):
        self.step, self.total = step, total
        super().__init__(f"generation cancelled (at step {step} of {total})")


@dataclass(frozen=True)
class GenerationParams:
    """One txt2img request, in the web UI's terms. width/height 0 mean the model's native resolution."""

    prompt: str
    negative_prompt: str = ""
    sampler: str = "Euler a"
    steps: int = 20
    cfg_scale: float = 7.0
    seed: int = -1  # -1 = random; the seed used is reported
    width: int = 0
    height: int = 0
    batch_size: int = 1
    clip_skip: int = 1

    def validate(self) -> None:
        """Raise ConfigError naming the first field that cannot be used."""
        if not isinstance(self.prompt, str):
            raise ConfigError("prompt", self.prompt, "must be a string")
        if not isinstance(self.negative_prompt, str):
            raise ConfigError("negative_prompt", self.negative_prompt, "must be a string")
        if self.sampler not in SAMPLERS:
            raise ConfigError("sampler", self.sampler, f"unknown sampler; known: {', '.join(SAMPLERS)}")
        _check_int("steps", self.steps, 1, 1000)
        if not isinstance(self.cfg_scale, (int, float)) or not math.isfinite(self.cfg_scale) or self.cfg_scale < 0:
            raise ConfigError("cfg_scale", self.cfg_scale, "must be a finite number >= 0")
        _check_int("seed", self.seed, -1, MAX_SEED)
        for name in ("width", "height"):
            value = getattr(self, name)
            _check_int(name, value, 0, 8192)
            if value % 8:
                raise ConfigError(name, value, "must be a multiple of 8 (the VAE downsamples by 8)")
        _check_int("batch_size", self.batch_size, 1, 256)
        _check_int("clip_skip", self.clip_skip, 1, 12)

    def resolved_size(self, model: SDModel) -> tuple[int, int]:
        """(width, height) with 0 replaced by the model's resolution."""
        return (self.width or model.resolution, self.height or model.resolution)


def _check_int(field: str, value, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(field, value, f"must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ConfigError(field, value, f"must be between {lo} and {hi}")


@dataclass
class GenerationResult:
    images: list  # PIL images
    seeds: list[int]
    infotexts: list[str]  # one per image, web-UI style


@dataclass
class PromptEmbeds:
    """Conditioning for the U-Net: per-token states, and for SDXL the pooled embedding."""

    hidden: torch.Tensor  # (batch, tokens, cross_attention_dim)
    pooled: torch.Tensor | None = None  # SDXL: (batch, projection_dim) of the second encoder


# ----------------------------------------------------------------------------------------- prompts


def _token_ids(tokenizer, prompts: list[str], device: torch.device) -> torch.Tensor:
    # 77 tokens, truncated, padded with the tokenizer's pad token, as SD was trained.
    out = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")
    return out.input_ids.to(device)


def _final_layer_norm(text_encoder) -> torch.nn.Module:
    # transformers 5 flattened CLIPTextModel (no `text_model` level); CLIPTextModelWithProjection kept it.
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


def encode_prompts(model: SDModel, prompts: list[str], clip_skip: int = 1) -> PromptEmbeds:
    """Encode prompts as `generate` conditions on them.

    SD1/SD2: the last layer's states (after the final layer norm); clip_skip k > 1 takes the output of the
    k-th layer from the end and applies the final layer norm, as the web UI does.
    SDXL: penultimate states of both encoders (no final norm) concatenated, pooled output of the second;
    clip_skip moves both back by k - 1 more layers.
    """
    device = model.device
    if model.arch is Arch.SDXL:
        states, pooled = [], None
        for te, tok in zip(model.text_encoders, model.tokenizers):
            out = te(_token_ids(tok, prompts, device), output_hidden_states=True)
            states.append(out.hidden_states[-(clip_skip + 1)])
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return PromptEmbeds(torch.cat(states, dim=-1), pooled)
    te, tok = model.text_encoders[0], model.tokenizers[0]
    ids = _token_ids(tok, prompts, device)
    if clip_skip == 1:
        return PromptEmbeds(te(ids).last_hidden_state)
    out = te(ids, output_hidden_states=True)
    return PromptEmbeds(_final_layer_norm(te)(out.hidden_states[-clip_skip]))


# -------------------------------------------------------------------------------------- generation


def _resolve_seed(seed: int) -> int:
    return random.randrange(MAX_SEED) if seed == -1 else int(seed)


def _initial_noise(seeds: list[int], shape: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Generator]]:
    # CPU generators whatever the device: the same seed gives the same image on any machine.
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return torch.stack([torch.randn(shape, generator=g) for g in gens]), gens


def _sdxl_time_ids(width: int, height: int, n: int) -> torch.Tensor:
    # (original size, crop top-left, target size): an uncropped image at the requested size.
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(n, 1)


def _conditioning(model: SDModel, params: GenerationParams, n: int, use_cfg: bool) -> dict:
    """U-Net keyword arguments for a batch of n images (uncond first when CFG is on)."""
    prompts = [params.prompt] * n
    if use_cfg:
        prompts = [params.negative_prompt] * n + prompts
    emb = encode_prompts(model, prompts, params.clip_skip)
    kwargs: dict = {"encoder_hidden_states": emb.hidden.to(model.dtype)}
    if model.arch is Arch.SDXL:
        w, h = params.resolved_size(model)
        kwargs["added_cond_kwargs"] = {
            "text_embeds": emb.pooled.to(model.dtype),
            "time_ids": _sdxl_time_ids(w, h, len(prompts)).to(model.device, model.dtype),
        }
    return kwargs


def generate(
    model: SDModel,
    params: GenerationParams,
    *,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    extra_infotext: Mapping[str, str] | None = None,
) -> GenerationResult:
    """Generate `params.batch_size` images.

    progress(step, total) runs after each denoising step; should_stop() is polled before each step
    (True raises GenerationCancelled); on_step(step_index, total) runs before each U-Net evaluation.
    """
    params.validate()
    width, height = params.resolved_size(model)
    seed = _resolve_seed(params.seed)
    seeds = [seed + i for i in range(params.batch_size)]
    spec: SamplerSpec = SAMPLERS[params.sampler]
    scheduler = spec.build(model.schedule, model.prediction_type)
    device, dtype = model.device, model.dtype
    scheduler.set_timesteps(params.steps, device=device)
    use_cfg = params.cfg_scale != 1.0
    n = params.batch_size
    with torch.inference_mode():
        cond = _conditioning(model, params, n, use_cfg)
        noise, gens = _initial_noise(seeds, (model.unet.config.in_channels, height // 8, width // 8))
        latents = (noise * scheduler.init_noise_sigma).to(device, torch.float32)
        timesteps = scheduler.timesteps
        for i, t in enumerate(timesteps):
            if should_stop is not None and should_stop():
                raise GenerationCancelled(i, len(timesteps))
            if on_step is not None:
                on_step(i, len(timesteps))
            x = torch.cat([latents] * 2) if use_cfg else latents
            x = scheduler.scale_model_input(x, t).to(dtype)
            pred = model.unet(x, t, **cond).sample.float()
            if use_cfg:
                uncond, text = pred.chunk(2)
                pred = uncond + params.cfg_scale * (text - uncond)
            step_kwargs = {"generator": gens} if spec.stochastic else {}
            latents = scheduler.step(pred, t, latents, **step_kwargs).prev_sample
            if progress is not None:
                progress(i + 1, len(timesteps))
        images = _decode(model, latents)
    done = replace(params, width=width, height=height)
    infotexts = [format_infotext(done, s, model, extra_infotext) for s in seeds]
    return GenerationResult(images, seeds, infotexts)


def _decode(model: SDModel, latents: torch.Tensor) -> list:
    from PIL import Image

    vae_dtype = next(model.vae.parameters()).dtype
    x = model.vae.decode((latents / model.vae_scale_factor).to(vae_dtype)).sample.float()
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


# ---------------------------------------------------------------------------------------- infotext


def quote(value) -> str:
    """The web UI's infotext quoting: JSON-quote a value holding a comma, colon or newline."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def format_infotext(params: GenerationParams, seed: int, model: SDModel,
                    extra: Mapping[str, str] | None = None) -> str:
    """Infotext as the web UI writes it: prompt, `Negative prompt: ...` if any, then `key: value, ...`."""
    width, height = params.resolved_size(model)
    fields: dict[str, object | None] = {
        "Steps": params.steps,
        "Sampler": params.sampler,
        "CFG scale": _number(params.cfg_scale),
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": model.short_hash or None,
        "Model": model.name or None,
        "Clip skip": params.clip_skip if params.clip_skip > 1 else None,
    }
    fields.update(extra or {})
    line = ", ".join(f"{k}: {quote(v)}" for k, v in fields.items() if v is not None)
    negative = f"\nNegative prompt: {params.negative_prompt}" if params.negative_prompt else ""
    return f"{params.prompt}{negative}\n{line}".strip()


def save_png(image, path: str | os.PathLike, infotext: str) -> None:
    """Write a PNG carrying the infotext in its "parameters" text chunk (read by the web UI's PNG Info).

    Written to a temporary file and renamed, so a crash never leaves half an image.
    """
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text("parameters", infotext)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
