"""Seconds per image of the embedded model at its native size (64 px), 20 steps, on the CPU, and the overhead of
one LoRA with block weights (rank 16 on every attention and text-encoder target, `lbw=` a 17-value list) as
a ratio to no LoRA, measured in the same run with the runs interleaved. Target: ratio <= 1.10.

The LoRA goes through the whole Generate path (prompt parsing, library lookup, cached network, merge, restore).
Without the embedded weights (models/tiny-sd1) it falls back to the random tiny SD1 of the same structure and
says so: the timing depends on the structure, not on the weights.

    .venv/bin/python bench/generate.py [--repeat 5] [--steps 20] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository root is the base

from bench.common import ROOT, report, timed  # noqa: E402
from lib_lora.io import save_file  # noqa: E402
from lib_lora.lora_library import LoraLibrary  # noqa: E402
from lib_lora.patching import WeightPatcher  # noqa: E402
from lib_lora.sd.lora_generate import StepSwitcher, generate_with_loras, model_targets, plan_loras  # noqa: E402
from lib_lora.sd.model import SDModel  # noqa: E402
from lib_lora.sd.pipeline import GenerationParams  # noqa: E402
from lib_lora.types import Arch  # noqa: E402
from tests.helpers import checksum, make_network_file  # noqa: E402

LBW = "1,0.5,0.5,0.5,1,1,1,1,0.8,0.8,0.8,1,1,1,1,0.6,0.6"


def load_model() -> tuple[SDModel, str]:
    from lib_lora.errors import FileFormatError
    from lib_lora.sd.embedded import load_embedded

    try:
        return load_embedded(), "embedded tiny-sd1"
    except FileFormatError as exc:
        from transformers import CLIPTokenizer

        from lib_lora.sd.tiny import tiny_components

        c = tiny_components("sd1")
        tok = CLIPTokenizer.from_pretrained(str(ROOT / "models" / "tokenizer"))
        model = SDModel(Arch.SD1, c.unet, c.text_encoders, [tok], c.vae, resolution=64, name="tiny-random")
        return model, f"random tiny SD1, same structure (embedded weights unavailable: {exc})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    model, which = load_model()
    targets = model_targets(model)
    selected = targets.select(["attn", "te_attn", "te_mlp"])
    tmp = tempfile.TemporaryDirectory()
    save_file(make_network_file(selected, "lora", rank=16, seed=0), Path(tmp.name) / "bench.safetensors")
    library, patcher = LoraLibrary(tmp.name), WeightPatcher(targets)
    original = checksum(model.unet, *model.text_encoders)
    prompts = {"none": "a red circle on a blue background",
               "lora": f"a red circle on a blue background <lora:bench:0.8:lbw={LBW}>"}

    def once(kind: str) -> float:
        params = GenerationParams(prompts[kind], steps=args.steps, seed=1)
        t0 = time.perf_counter()
        generate_with_loras(model, params, library, patcher=patcher)
        return time.perf_counter() - t0

    first_lora = once("lora")  # includes reading the file; later runs use the library's cache
    once("none")
    samples: dict[str, list[float]] = {"none": [], "lora": []}
    for i in range(args.repeat):
        for kind in (("none", "lora") if i % 2 == 0 else ("lora", "none")):
            samples[kind].append(once(kind))
    assert checksum(model.unet, *model.text_encoders) == original, "weights must be restored exactly"

    def lora_work() -> None:  # what a LoRA adds to a generation, without the denoising noise around it
        plan = plan_loras(prompts["lora"], model.arch, library, args.steps)
        StepSwitcher(patcher, plan).apply_at(0)
        patcher.restore()

    work, _ = timed(lora_work, repeat=max(5, args.repeat))
    none, lora = statistics.median(samples["none"]), statistics.median(samples["lora"])
    report("generate", {
        "model": which, "size": f"{model.resolution}x{model.resolution}", "steps": args.steps, "sampler": "Euler a",
        "device": "cpu", "threads": args.threads,
        "lora": f"rank 16, {len(selected)} modules (attention + text encoder), lbw 17-value list, strength 0.8",
        "seconds_per_image_no_lora": round(none, 3), "seconds_per_image_with_lora": round(lora, 3),
        "first_run_with_lora_incl_file_load_s": round(first_lora, 3),
        "samples_no_lora": [round(s, 3) for s in samples["none"]],
        "samples_with_lora": [round(s, 3) for s in samples["lora"]],
        "ratio_lora_over_none": round(lora / none, 3), "target": "<= 1.10",
        "lora_work_s (parse + lookup + merge + restore)": round(work, 4),
        "ratio_from_lora_work": round((none + work) / none, 3), "bit_exact_restore": True,
    })


if __name__ == "__main__":
    main()
