"""X/Y plot cost on the embedded model: a 5x5 grid of LoRA TE strength x U-Net strength (0..1), 20 steps per image.

Three ways to make the same 25 images, interleaved in each repeat and timed per image:
- plain: the 25 generations without any LoRA (the reference: what the images cost by themselves);
- full apply: each cell through the Generate path on its own (`generate_with_loras`: apply the LoRA, generate,
  restore), as a plot without a series mode would;
- series: the X/Y path (`generate_with_loras(keep_applied=True)` in a row, as `StandaloneHost.generate_series`
  does), where a cell re-patches only the weights whose strength changed, and the model is restored at the end.
Also the patch alone: a cell-to-cell re-patch (TE strength changes) against a full apply + restore.

Target: series <= 1.05x plain per image (patching nearly free). The LoRA is rank 16 on every attention and
text-encoder target (as bench/generate.py); the grid's images go nowhere (no PNG writes in the timing).

    .venv/bin/python bench/xy.py [--repeat 3] [--steps 20] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import report  # noqa: E402
from bench.generate import load_model  # noqa: E402
from lib_lora.io import save_file  # noqa: E402
from lib_lora.lora_library import LoraLibrary  # noqa: E402
from lib_lora.patching import Application, WeightPatcher  # noqa: E402
from lib_lora.sd.lora_generate import generate_with_loras, model_targets  # noqa: E402
from lib_lora.sd.pipeline import GenerationParams  # noqa: E402
from lib_lora.types import Arch  # noqa: E402
from lib_lora.xy import AxisContext, AxisRequest, Cell, make_plan  # noqa: E402
from tests.helpers import checksum, make_network_file  # noqa: E402

VALUES = "0-1 [5]"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    model, which = load_model()
    targets = model_targets(model)
    tmp = tempfile.TemporaryDirectory()
    selected = targets.select(["attn", "te_attn", "te_mlp"])
    save_file(make_network_file(selected, "lora", rank=16, seed=0), Path(tmp.name) / "bench.safetensors")
    library, patcher = LoraLibrary(tmp.name), WeightPatcher(targets)
    original = checksum(model.unet, *model.text_encoders)
    base = Cell(GenerationParams("a red circle on a blue background", sampler="Euler a", steps=args.steps, seed=3),
                "bench")
    plan = make_plan(base, [AxisRequest("te", VALUES), AxisRequest("unet", VALUES)], AxisContext(library, Arch.SD1))
    requests = [job.cell.request() for job in plan.jobs()]
    plain_requests = [replace(r, prompt=base.params.prompt) for r in requests]

    def plain() -> None:
        for r in plain_requests:
            generate_with_loras(model, r, library, patcher=patcher)

    def full() -> None:
        for r in requests:
            generate_with_loras(model, r, library, patcher=patcher)

    def series() -> None:
        try:
            for r in requests:
                generate_with_loras(model, r, library, patcher=patcher, keep_applied=True)
        finally:
            patcher.restore()

    runs = {"plain": plain, "full_apply": full, "series": series}
    series()  # warm-up: reads the file into the library's cache, first kernels
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeat):
        for name, fn in runs.items():  # interleaved: a slow moment of the machine hits all three
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) / len(requests))
    assert checksum(model.unet, *model.text_encoders) == original, "the model must be restored exactly"
    per_image = {k: statistics.median(v) for k, v in times.items()}
    report("xy", {
        "model": which, "grid": "5x5 LoRA TE strength x U-Net strength", "steps": args.steps,
        "threads": args.threads, "repeat": args.repeat, "lora": f"rank 16, {len(selected)} modules",
        "seconds_per_image": {k: round(v, 4) for k, v in per_image.items()},
        "samples": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "series_vs_plain": round(per_image["series"] / per_image["plain"], 3),
        "full_apply_vs_plain": round(per_image["full_apply"] / per_image["plain"], 3),
        "target_series_vs_plain": 1.05,
        **patch_costs(patcher, library),
    })


def patch_costs(patcher: WeightPatcher, library: LoraLibrary, repeat: int = 20) -> dict:
    """Median seconds of a cell-to-cell re-patch (TE strength 0.5 -> 0.75, U-Net unchanged) and of a full
    apply + restore of the same LoRA."""
    network = library.load(library.find("bench"), Arch.SD1)
    step, full = [], []
    for _ in range(repeat):
        patcher.apply([Application(network, te=0.5, unet=1.0)])
        t0 = time.perf_counter()
        patcher.apply([Application(network, te=0.75, unet=1.0)])
        step.append(time.perf_counter() - t0)
        patcher.restore()
        t0 = time.perf_counter()
        patcher.apply([Application(network, te=0.75, unet=1.0)])
        patcher.restore()
        full.append(time.perf_counter() - t0)
    a, b = statistics.median(step), statistics.median(full)
    return {"repatch_te_only_s": round(a, 5), "full_apply_restore_s": round(b, 5),
            "repatch_vs_full": round(a / b, 3)}


if __name__ == "__main__":
    main()
