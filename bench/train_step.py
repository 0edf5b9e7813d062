"""Seconds per training step and peak RSS of our loop vs a plain diffusers + peft loop doing the same work:
tiny SD1 model, LoRA rank 16 on the same U-Net and text-encoder layers (kohya's targets), AdamW, batch 4,
64 px images read from disk each step, text encoder trained too.

Time: both loops run in one process on two copies of the model, step for step in turn (after each of our steps
the reference takes one), so a busy moment of this shared machine slows both alike. The figures are the ratio of
the summed step times and the median of the per-pair ratios. Memory: each side alone in its own process (peak
RSS is per process), same steps.

Two datasets: every image with the same caption (a kohya folder without caption files, captioned with its class
tokens; our loop then runs the text encoder once per distinct caption in the batch), and every image with its
own caption (no such saving). Both figures are reported.

    .venv/bin/python -m bench.train_step [--steps 40] [--threads 2]
Targets: time ratio ours / reference <= 0.8, memory ratio <= 1.0.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository root is the base

from bench.common import ROOT, report

RESOLUTION, BATCH, RANK = 64, 4, 16
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


CAPTION = "sks red square, blue background"
DATASETS = ("shared_caption", "own_captions")


def make_data(folder: Path, dataset: str = "shared_caption") -> None:
    from tests.train.fixtures import write_images

    images = write_images(folder / "train" / "1_sks", 16, size=RESOLUTION, caption=CAPTION)
    if dataset == "own_captions":
        for i, caption_file in enumerate(sorted(images.glob("*.txt"))):
            caption_file.write_text(f"{CAPTION}, photo {i}", encoding="utf-8")


def our_config(folder: Path, steps: int, output_dir: str):
    from lib_lora.train.toml_config import load_config
    from tests.train.fixtures import write_run

    return load_config(write_run(folder, resolution=RESOLUTION, train_batch_size=BATCH, network_dim=RANK,
                                 network_alpha=RANK, max_train_steps=steps, optimizer_type="AdamW",
                                 learning_rate=1e-4, output_dir=output_dir, divergence_guard=False))


def ours(folder: Path, steps: int) -> dict:
    import time

    from lib_lora.train.run import train
    from tests.train.fixtures import tiny_model

    cfg = our_config(folder, steps, "out-ours")
    stamps = []
    train(cfg, model=tiny_model(), listeners=[lambda e: stamps.append(time.perf_counter()) if e.kind == "step"
                                              else None])
    return step_times(stamps)


def reference_steps(folder: Path):
    """The reference loop, one optimizer step per `next()`."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from peft import LoraConfig
    from PIL import Image

    from tests.train.fixtures import tiny_model

    model = tiny_model()
    unet, te, vae, tok = model.unet, model.text_encoders[0], model.vae, model.tokenizers[0]
    for m in (unet, te, vae):
        m.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=UNET_TARGETS))
    te.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=TE_TARGETS))
    params = [p for m in (unet, te) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    files = sorted((folder / "train" / "1_sks").glob("*.png"))
    unet.train()
    te.train()
    step = 0
    while True:
        batch = files[(step * BATCH) % len(files):][:BATCH]
        pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB").resize(
            (RESOLUTION, RESOLUTION)), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1) for f in batch])
        captions = [f.with_suffix(".txt").read_text() for f in batch]
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * model.vae_scale_factor
        ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        hidden = te(ids).last_hidden_state
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],))
        pred = unet(scheduler.add_noise(latents, noise, t), t, hidden).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        yield


def reference(folder: Path, steps: int) -> dict:
    import time

    stamps = []
    loop = reference_steps(folder)
    for _ in range(steps):
        next(loop)
        stamps.append(time.perf_counter())
    return step_times(stamps)


def paired(folder: Path, steps: int, warmup: int = 3) -> dict:
    """Our loop with one reference step run after each of ours: per-step times of both sides, same moments."""
    import statistics
    import time

    from lib_lora.train.run import train
    from tests.train.fixtures import tiny_model

    ref_loop = reference_steps(folder)
    ours_s: list[float] = []
    ref_s: list[float] = []
    last: list[float] = []

    def after_step(event) -> None:
        if event.kind != "step":
            return
        now = time.perf_counter()
        if last:
            ours_s.append(now - last[0])
        start = time.perf_counter()
        next(ref_loop)
        ref_s.append(time.perf_counter() - start)
        last[:] = [time.perf_counter()]

    cfg = our_config(folder, steps + 1, "out-paired")
    train(cfg, model=tiny_model(), listeners=[after_step])
    ours_s, ref_s = ours_s[warmup:], ref_s[1 + warmup:]  # ref_s[i + 1] ran right after ours_s[i]
    ours_s = ours_s[:len(ref_s)]
    pairs = [a / b for a, b in zip(ours_s, ref_s)]
    return {"steps_paired": len(pairs), "ours_s_per_step": statistics.mean(ours_s),
            "reference_s_per_step": statistics.mean(ref_s), "time_ratio": round(sum(ours_s) / sum(ref_s), 3),
            "median_pair_ratio": round(statistics.median(pairs), 3),
            "pair_ratio_quartiles": [round(q, 3) for q in statistics.quantiles(pairs, n=4)]}


def step_times(stamps: list[float]) -> dict:
    """Mean seconds per step over the run, and the median step (less sensitive to a stall of the machine)."""
    import statistics

    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"seconds_per_step": (stamps[-1] - stamps[0]) / len(steps), "median_step_s": statistics.median(steps)}


def child(which: str, folder: str, steps: int, threads: int) -> None:
    import resource

    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    result = {"ours": ours, "reference": reference, "paired": paired}[which](Path(folder), steps)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def run_child(which: str, folder: Path, steps: int, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-m", "bench.train_step", "--child", which, str(folder), str(steps),
                          str(threads)], cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"bench child {which!r} failed:\n{out.stderr[-4000:]}")
    line = next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    results = {}
    for dataset in DATASETS:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            make_data(folder, dataset)
            timing = run_child("paired", folder, args.steps, args.threads)
            timing.pop("peak_rss_mb")
            ref = run_child("reference", folder, args.steps, args.threads)
            us = run_child("ours", folder, args.steps, args.threads)
        results[dataset] = {
            "time (paired, one process)": timing,
            "memory (each side alone)": {"ours_peak_rss_mb": round(us["peak_rss_mb"], 1),
                                         "reference_peak_rss_mb": round(ref["peak_rss_mb"], 1),
                                         "memory_ratio": round(us["peak_rss_mb"] / ref["peak_rss_mb"], 3),
                                         "alone_s_per_step": {"ours": round(us["seconds_per_step"], 4),
                                                              "reference": round(ref["seconds_per_step"], 4)}}}
    report("train_step", {
        "setup": f"tiny SD1, LoRA rank {RANK} on U-Net + text encoder (kohya targets), AdamW, batch {BATCH}, "
                 f"{RESOLUTION}px, {args.steps} steps, {args.threads} threads",
        **results, "time_target": "<= 0.8", "memory_target": "<= 1.0",
    })


if __name__ == "__main__":
    main()
