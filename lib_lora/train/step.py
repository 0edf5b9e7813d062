"""One batch's loss, and the validation loss: noise, timesteps, the forward process, the U-Net's prediction and
the weighted error, with every random draw taken from a generator seeded by (seed, step, micro-batch, rank)."""
from __future__ import annotations

import hashlib

import torch

from lib_lora.train import losses
from lib_lora.train.data import Batch


def step_seed(seed: int, step: int, micro: int = 0, rank: int = 0) -> int:
    """A 63-bit seed for one micro-batch of one optimizer step (same values -> same noise, same dropout)."""
    digest = hashlib.sha256(f"{seed}/{step}/{micro}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def batch_loss(s, batch: Batch, seed: int) -> torch.Tensor:
    """The training loss of one batch (a scalar with gradient into the network)."""
    cfg, family = s.cfg, s.family
    device = family.device
    g = _generator(seed, device)
    torch.manual_seed(seed)  # module/rank/neuron dropout use the global generator
    latents = _latents(family, batch, g)
    loss_cfg = cfg.loss
    noise = losses.make_noise(latents, offset=loss_cfg.noise_offset,
                              offset_random_strength=loss_cfg.noise_offset_random_strength,
                              adaptive_noise_scale=loss_cfg.adaptive_noise_scale,
                              multires_iterations=loss_cfg.multires_noise_iterations,
                              multires_discount=loss_cfg.multires_noise_discount, generator=g)
    t = losses.sample_timesteps(latents.shape[0], min_timestep=loss_cfg.min_timestep,
                                max_timestep=loss_cfg.max_timestep, generator=g, device=device)
    return _loss_at(s, batch, latents, noise, t, with_grad=s.network_trains_text_encoder)


def _latents(family, batch: Batch, g: torch.Generator) -> torch.Tensor:
    if batch.latents is not None:
        return batch.latents.to(family.device, torch.float32)
    with torch.no_grad():
        return family.encode_images(batch.images.to(family.device), generator=g)


def _loss_at(s, batch: Batch, latents, noise, t, *, with_grad: bool) -> torch.Tensor:
    family, cfg = s.family, s.cfg
    ac = family.alphas_cumprod
    cond = family.conditioning_for(batch, clip_skip=cfg.model.clip_skip, max_token_length=cfg.model.max_token_length,
                                   with_grad=with_grad, dedupe=not with_grad or s.text_encoder_is_deterministic)
    noisy = losses.add_noise(latents, noise, t, ac)
    pred = family.predict(noisy, t, cond)
    target = losses.target_for(family.prediction_type, latents, noise, t, ac)
    loss, _ = losses.diffusion_loss(pred, target, t, ac, prediction_type=family.prediction_type,
                                    loss_weights=batch.loss_weights, alpha_masks=batch.alpha_masks,
                                    min_snr_gamma=cfg.loss.min_snr_gamma,
                                    scale_v_pred_loss_like_noise_pred=cfg.loss.scale_v_pred_loss_like_noise_pred,
                                    v_pred_like_loss=cfg.loss.v_pred_like_loss,
                                    debiased_estimation_loss=cfg.loss.debiased_estimation_loss)
    return loss


def validation_loss(s) -> float:
    """Mean loss over the validation set with fixed noise and timesteps per batch (comparable across steps)."""
    from lib_lora.train.data.sampler import epoch_plan

    plans = epoch_plan(s.validation, s.seed, 1)
    limit = s.cfg.validation.max_validation_steps
    plans = plans[:limit] if limit else plans
    total, count = 0.0, 0
    for index, plan in enumerate(plans):
        batch = s.validation.load_batch(plan, s.seed)
        g = _generator(step_seed(s.seed, -1, index), s.family.device)
        latents = _latents(s.family, batch, g)
        noise = losses.make_noise(latents, generator=g)
        t = losses.sample_timesteps(latents.shape[0], generator=g, device=s.family.device)
        total += float(_loss_at(s, batch, latents, noise, t, with_grad=False)) * latents.shape[0]
        count += latents.shape[0]
    return total / max(count, 1)
