"""Diffusion training losses as pure functions over tensors and a noise schedule (`alphas_cumprod`).

Notation: ᾱ_t = alphas_cumprod[t], α = √ᾱ_t, σ = √(1 − ᾱ_t) (α² + σ² = 1), x_t = α·x0 + σ·ε (DDPM, Ho et
al. 2020, eq. 4), SNR(t) = α²/σ² = ᾱ_t / (1 − ᾱ_t).

The order of operations is sd-scripts' `train_network.py`, so runs compare with it:
    noise = make_noise(latents, ...)                      # randn, then noise offset, then multires noise
    t = sample_timesteps(B, min_timestep, max_timestep)   # uniform integers in [min, max)
    noisy = add_noise(latents, noise, t, ac); target = target_for(prediction_type, latents, noise, t, ac)
    per_sample = per_sample_mse(pred, target, mask)       # mean over C, H, W (mask multiplies, no renormalising)
    per_sample = per_sample * loss_weights                # prior_loss_weight of regularisation images
    per_sample = per_sample * min_snr_weights(...)        # if min_snr_gamma
    per_sample = per_sample * SNR/(SNR+1)                 # if scale_v_pred_loss_like_noise_pred (v only)
    per_sample = per_sample * (1 + k (SNR+1)/SNR)         # if v_pred_like_loss = k
    per_sample = per_sample * debiased_weights(...)       # if debiased_estimation_loss
    loss = per_sample.mean()
`diffusion_loss` does everything from `per_sample_mse` on.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lib_lora.errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction")


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, ...) to broadcast over a (B, ...) tensor."""
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1)))


def _randn(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    # Drawn on the generator's device (usually the CPU), so a seed gives the same numbers on any machine.
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(like.device, like.dtype)


def _schedule_at(alphas_cumprod: Tensor, timesteps: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """(α, σ) per sample, shaped to broadcast over `like`, computed in float32 and cast to its dtype."""
    ac = alphas_cumprod.to(device=like.device, dtype=torch.float32)[timesteps.to(like.device).long()]
    alpha, sigma = ac.sqrt(), (1.0 - ac).sqrt()
    return _per_sample(alpha, like).to(like.dtype), _per_sample(sigma, like).to(like.dtype)


# ------------------------------------------------------------------------------------------------ schedule


def alphas_cumprod_for(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                       beta_schedule: str = "scaled_linear") -> Tensor:
    """ᾱ of the LDM training schedule, float32 [num_train_timesteps].

    'scaled_linear' (SD's): β = linspace(√β_start, √β_end, T)²; 'linear': β = linspace(β_start, β_end, T).
    Computed in float64 then rounded, as the ldm code builds the buffer the web UI's model carries.
    """
    if beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    else:
        raise ConfigError("beta_schedule", beta_schedule, "must be 'scaled_linear' or 'linear'")
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


def snr(timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """SNR(t) = ᾱ_t / (1 − ᾱ_t), float32 (B,)."""
    ac = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps.long()]
    return ac / (1.0 - ac)


# --------------------------------------------------------------------------------------------- noise, t


def sample_timesteps(batch_size: int, *, min_timestep: int | None = None, max_timestep: int | None = None,
                     num_train_timesteps: int = 1000, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> Tensor:
    """Timesteps drawn uniformly from the integers in [min_timestep, max_timestep) (sd-scripts' defaults 0, T)."""
    lo = 0 if min_timestep is None else int(min_timestep)
    hi = num_train_timesteps if max_timestep is None else int(max_timestep)
    if not 0 <= lo < hi <= num_train_timesteps:
        raise ConfigError("min_timestep", (min_timestep, max_timestep),
                          f"need 0 <= min_timestep < max_timestep <= {num_train_timesteps}")
    gen_device = generator.device if generator is not None else device
    t = torch.randint(lo, hi, (batch_size,), generator=generator, device=gen_device)
    return t.to(device) if device is not None else t


def noise_offset(noise: Tensor, offset: float, *, random_strength: bool = False,
                 generator: torch.Generator | None = None, latents: Tensor | None = None,
                 adaptive_scale: float | None = None) -> Tensor:
    """Offset noise (N. Guttenberg, "Diffusion with Offset Noise", Crosslabs 2023): add offset·N(0, 1) per
    sample and channel, constant over the image, so the model learns to change the mean brightness.

    random_strength: the offset is scaled by U(0, 1), one draw per batch (sd-scripts' noise_offset_random_strength).
    adaptive_scale: the offset grows by adaptive_scale·|mean of the latent| per sample and channel, clamped at 0
        (sd-scripts' adaptive_noise_scale; a negative scale lowers it). Needs `latents`.
    """
    if random_strength:
        gen_device = generator.device if generator is not None else noise.device
        offset = offset * float(torch.rand(1, generator=generator, device=gen_device))
    per_channel = (noise.shape[0], noise.shape[1], *([1] * (noise.dim() - 2)))
    if adaptive_scale is not None:
        mean = latents.float().mean(dim=tuple(range(2, latents.dim())), keepdim=True).abs()
        offset = (offset + adaptive_scale * mean).clamp(min=0.0).to(noise.dtype)
    shift = _randn(per_channel, noise, generator)
    return noise + offset * shift


def multires_noise(noise: Tensor, *, iterations: int, discount: float,
                   generator: torch.Generator | None = None) -> Tensor:
    """Multi-resolution ("pyramid") noise (J. Whitaker, "Multi-Resolution Noise for Diffusion Model Training",
    2023; sd-scripts' `pyramid_noise_like`): add noise drawn at sizes (H, W) / r^i, r ~ U(2, 4) per level,
    upsampled bilinearly and weighted discount^i, stopping at 1 pixel; then rescale to unit std over the batch.
    """
    b, c, h, w = noise.shape
    out = noise.clone()
    gen_device = generator.device if generator is not None else noise.device
    for i in range(iterations):
        r = float(torch.rand(1, generator=generator, device=gen_device)) * 2 + 2
        hn, wn = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        level = _randn((b, c, hn, wn), noise, generator)
        out = out + F.interpolate(level, size=(h, w), mode="bilinear") * discount ** i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def make_noise(latents: Tensor, *, offset: float | None = None, offset_random_strength: bool = False,
               adaptive_noise_scale: float | None = None, multires_iterations: int | None = None,
               multires_discount: float = 0.3, generator: torch.Generator | None = None) -> Tensor:
    """The noise ε for one batch: N(0, I), then `noise_offset`, then `multires_noise` (sd-scripts' order)."""
    noise = _randn(tuple(latents.shape), latents, generator)
    if offset:
        noise = noise_offset(noise, offset, random_strength=offset_random_strength, generator=generator,
                             latents=latents, adaptive_scale=adaptive_noise_scale)
    if multires_iterations:
        noise = multires_noise(noise, iterations=multires_iterations, discount=multires_discount,
                               generator=generator)
    return noise


# ---------------------------------------------------------------------------------------- forward process


def add_noise(x0: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε (DDPM's q(x_t | x0))."""
    alpha, sigma = _schedule_at(alphas_cumprod, timesteps, x0)
    return alpha * x0 + sigma * noise


def target_for(prediction_type: str, x0: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """What the U-Net learns to output: ε for 'epsilon'; v = α·ε − σ·x0 for 'v_prediction'
    (Salimans & Ho, "Progressive Distillation", 2022, sec. 4; diffusers' `get_velocity`)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        alpha, sigma = _schedule_at(alphas_cumprod, timesteps, x0)
        return alpha * noise - sigma * x0
    raise ConfigError("prediction_type", prediction_type, f"must be one of {PREDICTION_TYPES}")


# ---------------------------------------------------------------------------------------------- weighting


def min_snr_weights(timesteps: Tensor, alphas_cumprod: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-γ loss weights (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy",
    ICCV 2023): weight the x0-space loss by min(SNR, γ). An ε-loss is SNR times the x0-loss and a v-loss
    (SNR + 1) times it, so the weights are min(SNR, γ)/SNR for ε and min(SNR, γ)/(SNR + 1) for v.
    """
    if not gamma > 0:
        raise ConfigError("min_snr_gamma", gamma, "must be > 0")
    s = snr(timesteps, alphas_cumprod)
    clipped = torch.clamp(s, max=float(gamma))
    if prediction_type == "epsilon":
        return clipped / s
    if prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    raise ConfigError("prediction_type", prediction_type, f"must be one of {PREDICTION_TYPES}")


# sd-scripts clamps the SNR at 1000 in these three weightings (it is ~5e5 at t = 0 on SD's schedule).
SNR_CLAMP = 1000.0


def _clamped_snr(timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    return torch.clamp(snr(timesteps, alphas_cumprod), max=SNR_CLAMP)


def debiased_weights(timesteps: Tensor, alphas_cumprod: Tensor, prediction_type: str) -> Tensor:
    """Debiased estimation (Yu et al. 2023, as sd-scripts' `debiased_estimation_loss`): 1/sqrt(SNR) for ε,
    1/(SNR + 1) for v. Weighs the noisy end, where a model decides colours and layout, far above the clean end."""
    s = _clamped_snr(timesteps, alphas_cumprod)
    if prediction_type == "epsilon":
        return 1.0 / torch.sqrt(s)
    if prediction_type == "v_prediction":
        return 1.0 / (s + 1.0)
    raise ConfigError("prediction_type", prediction_type, f"must be one of {PREDICTION_TYPES}")


def v_pred_like_weights(timesteps: Tensor, alphas_cumprod: Tensor, strength: float) -> Tensor:
    """sd-scripts' `v_pred_like_loss`: add `strength` times the loss as a v-loss would weigh it, i.e.
    loss + strength * loss * (SNR + 1)/SNR."""
    s = _clamped_snr(timesteps, alphas_cumprod)
    return 1.0 + strength * (s + 1.0) / s


def v_as_noise_weights(timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """sd-scripts' `scale_v_pred_loss_like_noise_pred`: SNR/(SNR + 1), a v-loss scaled to an ε-loss's size."""
    s = _clamped_snr(timesteps, alphas_cumprod)
    return s / (s + 1.0)


def mask_for_loss(alpha_masks: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, H, W) image-resolution alpha masks -> (B, 1, h, w) at latent size, by area averaging (sd-scripts)."""
    if alpha_masks.dim() != 3:
        raise ValueError(f"alpha masks must be (B, H, W), got shape {tuple(alpha_masks.shape)}")
    return F.interpolate(alpha_masks[:, None].to(torch.float32), size=size, mode="area")


def per_sample_mse(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Squared error in float32, times the mask (B, 1, h, w) if given, averaged over all but the batch axis.

    As sd-scripts' masked loss, masked-out pixels count as zero error in the mean (no division by the mask
    area), so the loss scale follows the mask's coverage.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    err = (pred.float() - target.float()) ** 2
    if mask is not None:
        err = err * mask.to(err.device, err.dtype)
    return err.mean(dim=tuple(range(1, err.dim())))


def reduce_loss(per_sample: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean over the batch of per-sample losses times their weights (prior-preservation: reg images weigh
    `prior_loss_weight`, as sd-scripts: a plain mean, not normalised by the sum of weights)."""
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device, per_sample.dtype)
    return per_sample.mean()


def diffusion_loss(pred: Tensor, target: Tensor, timesteps: Tensor, alphas_cumprod: Tensor, *,
                   prediction_type: str, loss_weights: Tensor | None = None, alpha_masks: Tensor | None = None,
                   min_snr_gamma: float | None = None, scale_v_pred_loss_like_noise_pred: bool = False,
                   v_pred_like_loss: float | None = None,
                   debiased_estimation_loss: bool = False) -> tuple[Tensor, Tensor]:
    """(scalar loss, detached per-sample losses) for one batch; see the module docstring for the order."""
    mask = mask_for_loss(alpha_masks, tuple(pred.shape[-2:])) if alpha_masks is not None else None
    per_sample = per_sample_mse(pred, target, mask)
    if loss_weights is not None:
        per_sample = per_sample * loss_weights.to(per_sample.device, per_sample.dtype)
    if min_snr_gamma:
        per_sample = per_sample * min_snr_weights(timesteps.to(per_sample.device), alphas_cumprod, min_snr_gamma,
                                                  prediction_type)
    t = timesteps.to(per_sample.device)
    if scale_v_pred_loss_like_noise_pred and prediction_type == "v_prediction":
        per_sample = per_sample * v_as_noise_weights(t, alphas_cumprod)
    if v_pred_like_loss:
        per_sample = per_sample * v_pred_like_weights(t, alphas_cumprod, v_pred_like_loss)
    if debiased_estimation_loss:
        per_sample = per_sample * debiased_weights(t, alphas_cumprod, prediction_type)
    return per_sample.mean(), per_sample.detach()


def check_schedule(alphas_cumprod: Tensor) -> None:
    """ᾱ must be decreasing values in (0, 1): anything else is not a DDPM schedule (e.g. a half-precision
    buffer that rounded to 1.0 at t=0 gives SNR = inf)."""
    ac = alphas_cumprod.detach().double()
    if ac.dim() != 1 or ac.numel() < 2:
        raise ConfigError("alphas_cumprod", tuple(ac.shape), "must be a 1-D schedule")
    if not (bool((ac > 0).all()) and bool((ac < 1).all()) and bool((ac[1:] <= ac[:-1]).all())):
        lo, hi = float(ac.min()), float(ac.max())
        raise ConfigError("alphas_cumprod", f"[{lo:.6g}, {hi:.6g}]", "must decrease within (0, 1)")
