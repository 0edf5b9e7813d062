"""Train the embedded tiny SD1 model from scratch on the procedural "coloured shapes" scenes.

Three phases, plain torch loops, seeded:
1. VAE (the web UI's LDM `AutoencoderKL` could host it: 32 norm groups, channels 32, 4 blocks, factor 8)
   on freshly rendered 64 px scenes: MSE + a small KL term.
2. Encode a fixed set of scenes to latent distributions once; `vae_scale_factor` = 1 / std of the latents.
3. U-Net (`SD1_UNET`) and text encoder (`CLIP_TE`) jointly, DDPM eps objective on the SD noise schedule
   (scaled_linear 0.00085..0.012, 1000 steps), min-SNR weighting times a capped (SNR+1)/SNR boost of the noisy
   end, 10% empty captions for CFG, EMA weights.
   The text encoder must learn with the U-Net: a frozen random encoder leaves colours near chance.

Then the weights are written in fp16 as diffusers folders (text encoder keys spelled `text_model.*`, as
transformers-4 loaders expect), the held-out prompts are evaluated through the real pipeline from the
written files, and a sample grid is saved.

Usage (about 40 minutes on 2 CPU cores):
    HF_HUB_OFFLINE=1 .venv/bin/python tools/build_tiny_model.py --out models/tiny-sd1
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib_lora.sd import shapes  # noqa: E402
from lib_lora.sd.model import NoiseSchedule  # noqa: E402
from lib_lora.sd.tiny import CLIP_TE, SD1_UNET  # noqa: E402
from lib_lora.train.losses import alphas_cumprod_for  # noqa: E402

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(64, 64, 64, 64), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=64,
)
# SD1's module tree at 64 channels throughout: the web UI's ldm code normalises with GroupNorm(32), and over 32
# channels that is one channel per group, which erases the flat colours this world is made of (measured:
# colour matches stayed near 30% at 32 channels, 56% at 64 after the same 400 steps).
UNET_CONFIG = dict(SD1_UNET, block_out_channels=(64, 64, 64, 64), sample_size=8)


def vae_config(cfg: BuildConfig) -> dict:
    return dict(VAE_CONFIG, block_out_channels=(cfg.vae_channels,) * 4, layers_per_block=cfg.vae_layers)


@dataclass(frozen=True)
class BuildConfig:
    out: str = "models/tiny-sd1"
    seed: int = 0
    threads: int = 2
    vae_steps: int = 600
    vae_batch: int = 32
    vae_channels: int = 64
    vae_layers: int = 0
    vae_lr: float = 2e-3
    kl_weight: float = 1e-4
    latent_images: int = 8192
    steps: int = 1400
    captions_per_batch: int = 16
    images_per_caption: int = 4
    lr: float = 2e-3
    warmup: int = 100
    caption_dropout: float = 0.1
    ema_decay: float = 0.99
    min_snr_gamma: float = 5.0
    high_noise_weight: float = 8.0
    aux_weight: float = 0.1
    offset_noise: float = 0.0
    log_every: int = 50


class Clock:
    """Wall and CPU time since start (CPU time of this process, all threads)."""

    def __init__(self) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    def wall(self) -> float:
        return time.perf_counter() - self.wall0

    def cpu(self) -> float:
        return time.process_time() - self.cpu0

    def stamp(self) -> str:
        return f"[{self.wall() / 60:5.1f} min wall, {self.cpu() / 60:5.1f} min CPU]"


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def lr_at(step: int, total: int, warmup: int) -> float:
    """Linear warmup, then cosine down to 10% (a tail near zero would waste the short budget)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------ VAE


def train_vae(cfg: BuildConfig, clock: Clock, callback=None):
    from diffusers import AutoencoderKL

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    # channels-last convolutions (9% faster per step measured alone; the build's VAE phase took as long as before)
    vae = AutoencoderKL(**vae_config(cfg)).train().to(memory_format=torch.channels_last)
    with torch.no_grad():
        # Start with a posterior std near 0.05: at the default std 1 the sampled latents are noise and the
        # decoder first spends a few hundred steps learning only the mean image.
        vae.quant_conv.bias[VAE_CONFIG["latent_channels"]:] = -6.0
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr, fused=True)
    combos = shapes.all_combos()  # the VAE may see held-out scenes: it is not what the test measures
    for step in range(cfg.vae_steps):
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * lr_at(step, cfg.vae_steps, 50)
        x = to_tensor(shapes.sample_batch(rng, cfg.vae_batch, combos)[0]).contiguous(memory_format=torch.channels_last)
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        # L1 keeps edges sharp (the metric reads corners); MSE pulls the colours.
        rec = F.mse_loss(recon, x) + F.l1_loss(recon, x)
        kl = post.kl().mean() / post.mean[0].numel()
        loss = rec + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0, foreach=True)
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.vae_steps - 1:
            print(f"{clock.stamp()} vae {step:5d} loss {rec.item():.5f} kl {kl.item():.3f}", flush=True)
        if callback is not None:
            callback(step, vae)
    return vae.eval().requires_grad_(False).to(memory_format=torch.contiguous_format)


def check_vae(vae, seed: int, n: int = 200) -> shapes.EvalReport:
    """Metric on reconstructions of held-out scenes: what the decoder can show at all."""
    rng = np.random.default_rng(seed + 1)
    combos = [shapes.HELD_OUT[i % len(shapes.HELD_OUT)] for i in range(n)]
    imgs = np.stack([shapes.render_random(c, rng) for c in combos])
    with torch.no_grad():
        rec = vae.decode(vae.encode(to_tensor(imgs)).latent_dist.mode()).sample
    out = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return shapes.evaluate(list(out), combos)


# ------------------------------------------------------------------------------------------ latents


@dataclass
class LatentSet:
    """Latent distributions of rendered training scenes, `per_combo` consecutive images per combo."""

    mean: torch.Tensor
    std: torch.Tensor
    combos: list
    per_combo: int
    scale: float


def encode_dataset(vae, cfg: BuildConfig, clock: Clock) -> LatentSet:
    rng = np.random.default_rng(cfg.seed + 2)
    combos = shapes.training_combos()
    per_combo = math.ceil(cfg.latent_images / len(combos))
    means, stds = [], []
    order = [c for c in combos for _ in range(per_combo)]
    with torch.no_grad():
        for i in range(0, len(order), 256):
            imgs = np.stack([shapes.render_random(c, rng) for c in order[i : i + 256]])
            post = vae.encode(to_tensor(imgs)).latent_dist
            means.append(post.mean)
            stds.append(post.std)
    mean, std = torch.cat(means), torch.cat(stds)
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    sample = mean + std * torch.randn(mean.shape, generator=gen)
    # SD's convention: latents times vae_scale_factor have unit variance (0.18215 for SD1.5's VAE).
    scale = float(1.0 / sample.std())
    print(f"{clock.stamp()} encoded {len(order)} scenes; latent std {sample.std():.4f} -> scale {scale:.5f}, "
          f"posterior std {std.mean():.4f}", flush=True)
    return LatentSet(mean, std, combos, per_combo, scale)


# ---------------------------------------------------------------------------------------- diffusion


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


class CaptionProbe(torch.nn.Module):
    """Auxiliary heads reading (colour, shape, background) from the text encoder's states at the end-of-text
    and padding positions, the 68 of 77 tokens the U-Net's cross-attention mostly sees.

    Without it the randomly initialised encoder separates the captions so slowly that after 1200 steps the
    background colour was still at chance; with it the states carry the three words from the first
    hundred steps, one head per word, which also keeps them separable for unseen combinations.
    Only used for training; not saved.
    """

    def __init__(self, dim: int, n_colours: int, n_shapes: int):
        super().__init__()
        self.colour = torch.nn.Linear(dim, n_colours)
        self.shape = torch.nn.Linear(dim, n_shapes)
        self.background = torch.nn.Linear(dim, n_colours)

    def loss(self, hidden: torch.Tensor, after_text: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h = hidden[after_text]  # (positions, dim)
        t = targets.unsqueeze(1).expand(-1, hidden.shape[1], -1)[after_text]
        return sum(F.cross_entropy(head(h), t[:, i]) for i, head in enumerate((self.colour, self.shape,
                                                                               self.background)))


def caption_targets(combos: list) -> torch.Tensor:
    colours, kinds = list(shapes.COLOURS), list(shapes.BASE_SHAPES)
    return torch.tensor([[colours.index(c.colour), kinds.index(c.shape), colours.index(c.background)]
                         for c in combos])


def train_diffusion(cfg: BuildConfig, data: LatentSet, tokenizer, clock: Clock, callback=None):
    """Joint U-Net + text-encoder training; returns the EMA copies."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(cfg.seed + 4)
    rng = np.random.default_rng(cfg.seed + 5)
    unet = UNet2DConditionModel(**UNET_CONFIG).train()
    te = CLIPTextModel(CLIPTextConfig(**CLIP_TE)).train()
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(te).eval()
    probe = CaptionProbe(CLIP_TE["hidden_size"], len(shapes.COLOURS), len(shapes.BASE_SHAPES))
    params = list(unet.parameters()) + list(te.parameters()) + list(probe.parameters())
    # fused (one kernel over all tensors; the per-tensor loop took 13% of a step on CPU)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01, fused=True)
    ids = tokenize(tokenizer, [c.caption for c in data.combos] + [""])
    empty = len(data.combos)
    # pad id == end-of-text id in CLIP: every position from the first one on
    after_text = torch.cumsum(ids == tokenizer.eos_token_id, dim=1) > 0
    targets = caption_targets(data.combos)
    ab = alphas_cumprod_for(**asdict(NoiseSchedule()))
    n_cap, n_img = cfg.captions_per_batch, cfg.images_per_caption
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_at(step, cfg.steps, cfg.warmup)
        # A few captions per batch, several scenes each: the 77-token text encoder runs on 17 rows, not 64.
        chosen = rng.choice(len(data.combos), size=n_cap, replace=False)
        idx = torch.from_numpy((chosen[:, None] * data.per_combo
                                + rng.integers(0, data.per_combo, size=(n_cap, n_img))).reshape(-1))
        z = (data.mean[idx] + data.std[idx] * torch.randn_like(data.mean[idx])) * data.scale
        rows = torch.from_numpy(np.append(chosen, empty))
        cond_row = torch.arange(n_cap).repeat_interleave(n_img)
        cond_row[torch.rand(len(cond_row)) < cfg.caption_dropout] = n_cap  # the empty caption, for CFG
        states = te(ids[rows]).last_hidden_state
        hidden = states[cond_row]
        t = torch.randint(0, len(ab), (len(idx),))
        a = ab[t].view(-1, 1, 1, 1)
        noise = torch.randn_like(z)
        if cfg.offset_noise:
            noise = noise + cfg.offset_noise * torch.randn(len(z), z.shape[1], 1, 1)
        pred = unet(a.sqrt() * z + (1 - a).sqrt() * noise, t, hidden).sample
        # min-SNR-gamma weighting (Hang et al. 2023) for the eps objective: converges in fewer steps.
        snr = ab[t] / (1 - ab[t])
        weight = snr.clamp(max=cfg.min_snr_gamma) / snr
        # The eps loss hardly sees colours at the noisy end (an x0 error there is scaled by sqrt(SNR) < 0.1),
        # where the text alone must decide them: weigh those steps as a v-loss would, up to a cap (measured:
        # colour matches 56% -> 89% at 600 steps with the cap at 8).
        if cfg.high_noise_weight > 1:
            weight = weight * (1 + 1 / snr).clamp(max=cfg.high_noise_weight)
        loss = (weight * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        aux = probe.loss(states[:n_cap], after_text[chosen], targets[chosen])
        loss = loss + cfg.aux_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_te, te, decay)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            print(f"{clock.stamp()} diffusion {step:5d} loss {loss.item():.4f} (caption probe {aux.item():.3f})",
                  flush=True)
        if callback is not None:
            callback(step, ema_unet, ema_te)
    return ema_unet.requires_grad_(False), ema_te.requires_grad_(False)


# ------------------------------------------------------------------------------------------- saving


def save_model(out: Path, unet, te, vae, scale: float, build: dict) -> None:
    """diffusers folders with fp16 safetensors; text-encoder keys spelled `text_model.*` (transformers 4)."""
    from lib_lora.io import save_file
    from lib_lora.sd.embedded import TE_PREFIX, WEIGHTS

    def half(sd: dict) -> dict:
        return {k: v.detach().to(torch.float16).contiguous() for k, v in sd.items()}

    for sub, module in (("unet", unet), ("vae", vae)):
        (out / sub).mkdir(parents=True, exist_ok=True)
        module.save_config(out / sub)
        save_file(half(module.state_dict()), out / sub / WEIGHTS[sub])
    (out / "text_encoder").mkdir(parents=True, exist_ok=True)
    te_config = te.config.to_dict()
    te_config.update(architectures=["CLIPTextModel"], dtype="float16")
    (out / "text_encoder" / "config.json").write_text(json.dumps(te_config, indent=2) + "\n")
    te_sd = {TE_PREFIX + k.removeprefix(TE_PREFIX): v for k, v in half(te.state_dict()).items()}
    # transformers 4 keeps position_ids as a saved buffer and reports it missing otherwise.
    te_sd[TE_PREFIX + "embeddings.position_ids"] = torch.arange(CLIP_TE["max_position_embeddings"]).unsqueeze(0)
    save_file(te_sd, out / "text_encoder" / WEIGHTS["text_encoder"])
    info = {"name": "tiny-sd1", "arch": "sd1", "prediction_type": "epsilon", "resolution": 64,
            "vae_scale_factor": round(scale, 6), "schedule": asdict(NoiseSchedule()), "build": build}
    (out / "model.json").write_text(json.dumps(info, indent=2) + "\n")


def evaluate_and_grid(out: Path) -> dict:
    """Held-out evaluation through the pipeline on the written fp16 files; writes the sample grid."""
    from PIL import Image

    from lib_lora.sd.embedded import evaluate_held_out, load_embedded

    model = load_embedded(folder=out)
    report, images = evaluate_held_out(model)
    cells = [np.asarray(im) for im in images[:16]]
    grid = np.concatenate([np.concatenate(cells[r * 4 : r * 4 + 4], axis=1) for r in range(4)], axis=0)
    Image.fromarray(grid).resize((512, 512), Image.NEAREST).save(out / "samples.png", optimize=True)
    print(report.summary())
    for line in report.failures():
        print("  ", line)
    return {"colour_matches": report.colour_matches, "colour_checks": report.colour_checks,
            "shape_matches": report.shape_matches, "shape_checks": report.shape_checks}


def cpu_seconds_all_threads() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def main(argv: list[str] | None = None) -> None:
    from transformers import CLIPTokenizer

    defaults = BuildConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    cfg = BuildConfig(**vars(parser.parse_args(argv)))
    torch.set_num_threads(cfg.threads)
    clock = Clock()
    out = ROOT / cfg.out if not Path(cfg.out).is_absolute() else Path(cfg.out)
    vae = train_vae(cfg, clock)
    print(f"{clock.stamp()} VAE reconstructions of held-out scenes: {check_vae(vae, cfg.seed).summary()}", flush=True)
    data = encode_dataset(vae, cfg, clock)
    tokenizer = CLIPTokenizer.from_pretrained(str(ROOT / "models" / "tokenizer"))
    unet, te = train_diffusion(cfg, data, tokenizer, clock)
    build = {"config": asdict(cfg), "train_wall_minutes": round(clock.wall() / 60, 1),
             "train_cpu_minutes": round(cpu_seconds_all_threads() / 60, 1), "torch": torch.__version__}
    save_model(out, unet, te, vae, data.scale, build)
    build["eval"] = evaluate_and_grid(out)
    build["total_wall_minutes"] = round(clock.wall() / 60, 1)
    info = json.loads((out / "model.json").read_text())
    info["build"] = build
    (out / "model.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"{clock.stamp()} done: {out}")


if __name__ == "__main__":
    main()
