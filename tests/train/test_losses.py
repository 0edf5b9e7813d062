"""Invariants of the loss helpers (lib_lora/train/losses.py)."""
from __future__ import annotations

import pytest
import torch

from lib_lora.errors import ConfigError
from lib_lora.train import losses

AC = losses.alphas_cumprod_for()


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_schedule_is_sd_scaled_linear():
    # Known values of SD's schedule (the ldm buffer): alphas_cumprod[0] = 1 - 0.00085, [999] ≈ 0.00466.
    assert AC.shape == (1000,) and AC.dtype == torch.float32
    assert AC[0].item() == pytest.approx(1 - 0.00085, rel=1e-7)
    assert AC[-1].item() == pytest.approx(0.00466, rel=1e-3)
    losses.check_schedule(AC)
    with pytest.raises(ConfigError, match="alphas_cumprod"):
        losses.check_schedule(torch.ones(10))
    with pytest.raises(ConfigError, match="beta_schedule"):
        losses.alphas_cumprod_for(beta_schedule="cosine")


def test_add_noise_and_v_target_identities():
    x0, eps = torch.randn(6, 4, 8, 8, generator=_gen(1)), torch.randn(6, 4, 8, 8, generator=_gen(2))
    t = torch.tensor([0, 1, 250, 500, 750, 999])
    a, s = AC[t].sqrt().view(-1, 1, 1, 1), (1 - AC[t]).sqrt().view(-1, 1, 1, 1)
    xt = losses.add_noise(x0, eps, t, AC)
    torch.testing.assert_close(xt, a * x0 + s * eps)
    assert losses.target_for("epsilon", x0, eps, t, AC) is eps
    v = losses.target_for("v_prediction", x0, eps, t, AC)
    # (x_t, v) is a rotation of (x0, ε): both recover exactly, and the norm is preserved.
    torch.testing.assert_close(a * xt - s * v, x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(s * xt + a * v, eps, atol=1e-5, rtol=0)
    torch.testing.assert_close(xt.pow(2) + v.pow(2), x0.pow(2) + eps.pow(2), atol=1e-4, rtol=0)
    with pytest.raises(ConfigError, match="prediction_type"):
        losses.target_for("sample", x0, eps, t, AC)


def test_add_noise_keeps_half_precision():
    x0 = torch.randn(2, 4, 4, 4).half()
    assert losses.add_noise(x0, torch.randn_like(x0), torch.tensor([3, 900]), AC).dtype == torch.float16


def test_timesteps_uniform_in_half_open_range():
    t = losses.sample_timesteps(20000, min_timestep=100, max_timestep=200, generator=_gen())
    assert t.dtype == torch.long and int(t.min()) == 100 and int(t.max()) == 199
    assert abs(t.float().mean().item() - 149.5) < 1.0
    full = losses.sample_timesteps(50000, generator=_gen(1))
    assert int(full.min()) == 0 and int(full.max()) == 999
    assert torch.equal(losses.sample_timesteps(8, generator=_gen(3)), losses.sample_timesteps(8, generator=_gen(3)))
    with pytest.raises(ConfigError, match="min_timestep"):
        losses.sample_timesteps(2, min_timestep=500, max_timestep=500)


def test_noise_offset_shifts_each_channel_mean():
    noise = torch.randn(4000, 4, 8, 8, generator=_gen(0))
    out = losses.noise_offset(noise, 0.1, generator=_gen(1))
    shift = out - noise
    # constant over the image for each (sample, channel) ...
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift))
    # ... drawn from N(0, offset²)
    assert shift[:, :, 0, 0].std().item() == pytest.approx(0.1, rel=0.05)
    assert abs(shift[:, :, 0, 0].mean().item()) < 0.01
    weaker = losses.noise_offset(noise, 0.1, random_strength=True, generator=_gen(1)) - noise
    assert weaker.abs().max() < shift.abs().max()  # scaled by one U(0, 1) draw


def test_multires_noise_unit_std_and_low_frequencies():
    noise = torch.randn(16, 4, 32, 32, generator=_gen(0))
    out = losses.multires_noise(noise, iterations=6, discount=0.3, generator=_gen(1))
    assert out.std().item() == pytest.approx(1.0, abs=1e-5)

    def neighbour_corr(x):
        a, b = x[..., :, :-1].reshape(-1), x[..., :, 1:].reshape(-1)
        return torch.corrcoef(torch.stack([a, b]))[0, 1].item()

    assert abs(neighbour_corr(noise)) < 0.02  # white noise
    # the coarse levels correlate neighbouring pixels (clearly visible with a large discount)
    strong = losses.multires_noise(noise, iterations=6, discount=0.8, generator=_gen(1))
    assert neighbour_corr(strong) > 0.15 and strong.std().item() == pytest.approx(1.0, abs=1e-5)
    again = losses.multires_noise(noise, iterations=6, discount=0.3, generator=_gen(1))
    assert torch.equal(out, again)


def test_make_noise_order_and_determinism():
    lat = torch.zeros(2, 4, 8, 8)
    plain = losses.make_noise(lat, generator=_gen(5))
    torch.testing.assert_close(plain, torch.randn(2, 4, 8, 8, generator=_gen(5)))
    both = losses.make_noise(lat, offset=0.1, multires_iterations=3, multires_discount=0.3, generator=_gen(5))
    assert both.std().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_equal_min_snr_in_x0_space(prediction_type):
    gamma = 5.0
    t = torch.arange(0, 1000, 37)
    snr = AC[t] / (1 - AC[t])
    w = losses.min_snr_weights(t, AC, gamma, prediction_type)
    expected = torch.minimum(snr, torch.tensor(gamma)) / (snr if prediction_type == "epsilon" else snr + 1)
    torch.testing.assert_close(w, expected)
    # The invariant behind the formula: any prediction, weighted in its own space, gives min(SNR, γ)·‖x̂0 − x0‖².
    x0, eps = torch.randn(len(t), 4, 4, 4, generator=_gen(1)), torch.randn(len(t), 4, 4, 4, generator=_gen(2))
    pred = torch.randn(len(t), 4, 4, 4, generator=_gen(3))
    a, s = AC[t].sqrt().view(-1, 1, 1, 1), (1 - AC[t]).sqrt().view(-1, 1, 1, 1)
    xt = a * x0 + s * eps
    target = losses.target_for(prediction_type, x0, eps, t, AC)
    x0_hat = (xt - s * pred) / a if prediction_type == "epsilon" else a * xt - s * pred
    own = w * losses.per_sample_mse(pred, target)
    x0_space = torch.minimum(snr, torch.tensor(gamma)) * losses.per_sample_mse(x0_hat, x0)
    torch.testing.assert_close(own, x0_space, rtol=2e-3, atol=1e-5)
    assert (w <= 1.0 + 1e-6).all()


def test_masked_loss_ignores_masked_pixels():
    pred, target = torch.randn(2, 4, 8, 8, generator=_gen(1)), torch.randn(2, 4, 8, 8, generator=_gen(2))
    alpha = torch.ones(2, 64, 64)
    alpha[:, :, :32] = 0.0  # left half of each image masked out (whole latent columns 0..3)
    mask = losses.mask_for_loss(alpha, (8, 8))
    assert mask.shape == (2, 1, 8, 8) and torch.equal(mask[..., :4], torch.zeros(2, 1, 8, 4))
    base = losses.per_sample_mse(pred, target, mask)
    changed = pred.clone()
    changed[..., :4] += 100.0
    torch.testing.assert_close(losses.per_sample_mse(changed, target, mask), base)
    # sd-scripts' scale: masked pixels count as zero error in the mean
    torch.testing.assert_close(base, ((pred - target) ** 2)[..., 4:].mean(dim=(1, 2, 3)) / 2)
    full = losses.mask_for_loss(torch.ones(2, 64, 64), (8, 8))
    torch.testing.assert_close(losses.per_sample_mse(pred, target, full), losses.per_sample_mse(pred, target))


def test_prior_loss_weights_and_reduction():
    per = torch.tensor([1.0, 2.0, 3.0, 4.0])
    weights = torch.tensor([1.0, 1.0, 0.5, 0.5])  # two regularisation images at prior_loss_weight 0.5
    assert losses.reduce_loss(per, weights).item() == pytest.approx((1 + 2 + 1.5 + 2) / 4)
    assert losses.reduce_loss(per).item() == pytest.approx(2.5)


def test_diffusion_loss_composes_the_parts():
    pred, target = torch.randn(3, 4, 8, 8, generator=_gen(1)), torch.randn(3, 4, 8, 8, generator=_gen(2))
    t = torch.tensor([10, 500, 990])
    w = torch.tensor([1.0, 0.25, 1.0])
    alpha = torch.rand(3, 64, 64, generator=_gen(3))
    loss, per = losses.diffusion_loss(pred, target, t, AC, prediction_type="v_prediction", loss_weights=w,
                                      alpha_masks=alpha, min_snr_gamma=5.0)
    manual = (losses.per_sample_mse(pred, target, losses.mask_for_loss(alpha, (8, 8))) * w
              * losses.min_snr_weights(t, AC, 5.0, "v_prediction"))
    torch.testing.assert_close(per, manual)
    torch.testing.assert_close(loss, manual.mean())
    assert not per.requires_grad


def test_debiased_and_v_pred_like_weights_follow_sd_scripts():
    # sd-scripts: snr clamped at 1000; debiased 1/sqrt(snr) (eps) or 1/(snr+1) (v); v_pred_like adds
    # k * loss * (snr+1)/snr; scale_v_pred_loss_like_noise_pred multiplies a v-loss by snr/(snr+1).
    t = torch.tensor([0, 200, 999])
    s = (AC[t] / (1 - AC[t])).clamp(max=1000.0)
    assert s[0].item() == 1000.0
    torch.testing.assert_close(losses.debiased_weights(t, AC, "epsilon"), 1 / s.sqrt())
    torch.testing.assert_close(losses.debiased_weights(t, AC, "v_prediction"), 1 / (s + 1))
    torch.testing.assert_close(losses.v_pred_like_weights(t, AC, 0.2), 1 + 0.2 * (s + 1) / s)
    torch.testing.assert_close(losses.v_as_noise_weights(t, AC), s / (s + 1))
    w = losses.debiased_weights(t, AC, "epsilon")
    assert w[2] > 10 * w[1] > 10 * w[0]  # the noisy end dominates
    pred, target = torch.randn(3, 4, 8, 8, generator=_gen(1)), torch.randn(3, 4, 8, 8, generator=_gen(2))
    loss, per = losses.diffusion_loss(pred, target, t, AC, prediction_type="epsilon", min_snr_gamma=5.0,
                                      v_pred_like_loss=0.2, debiased_estimation_loss=True)
    manual = (losses.per_sample_mse(pred, target) * losses.min_snr_weights(t, AC, 5.0, "epsilon")
              * losses.v_pred_like_weights(t, AC, 0.2) * w)
    torch.testing.assert_close(per, manual)
    # the eps-only scaling leaves an eps loss alone
    _, plain = losses.diffusion_loss(pred, target, t, AC, prediction_type="epsilon",
                                     scale_v_pred_loss_like_noise_pred=True)
    torch.testing.assert_close(plain, losses.per_sample_mse(pred, target))
