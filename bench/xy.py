"""X/Y plot cost on the embedded model: a 5x5 grid of LoRA TE strength x U-Net strength (0..1), 20 steps per image.

Three ways to make the same 25 images, each on its own copy of the model, interleaved cell by cell (the order
rotating), so a busy moment of a shared machine slows all three alike:
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
WAYS = ("plain", "full_apply", "series")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    # One copy of the model per way, cells interleaved: a busy moment of the shared machine slows all three alike.
    models = {}
    for name in WAYS:
        models[name], which = load_model()
    tmp = tempfile.TemporaryDirectory()
    selected = model_targets(models["plain"]).select(["attn", "te_attn", "te_mlp"])
    save_file(make_network_file(selected, "lora", rank=16, seed=0), Path(tmp.name) / "bench.safetensors")
    library = LoraLibrary(tmp.name)
    patchers = {name: WeightPatcher(model_targets(m)) for name, m in models.items()}
    originals = {name: checksum(m.unet, *m.text_encoders) for name, m in models.items()}
    base = Cell(GenerationParams("a red circle on a blue background", sampler="Euler a", steps=args.steps, seed=3),
                "bench")
    plan = make_plan(base, [AxisRequest("te", VALUES), AxisRequest("unet", VALUES)], AxisContext(library, Arch.SD1))
    requests = [job.cell.request() for job in plan.jobs()]

    def cell(way: str, r: GenerationParams) -> None:
        model, patcher = models[way], patchers[way]
        if way == "plain":
            generate_with_loras(model, replace(r, prompt=base.params.prompt), library, patcher=patcher)
        else:
            generate_with_loras(model, r, library, patcher=patcher, keep_applied=way == "series")

    def one_plot() -> dict[str, list[float]]:
        times: dict[str, list[float]] = {w: [] for w in WAYS}
        try:
            for i, r in enumerate(requests):
                for way in WAYS[i % 3:] + WAYS[: i % 3]:  # rotate who goes first
                    t0 = time.perf_counter()
                    cell(way, r)
                    times[way].append(time.perf_counter() - t0)
        finally:
            patchers["series"].restore()  # what generate_series does when its plot ends
        return times

    one_plot()  # warm-up: reads the file into the library's cache, first kernels
    per_run = {w: [] for w in WAYS}
    cell_ratios = {"series": [], "full_apply": []}
    for _ in range(args.repeat):
        times = one_plot()
        for w in WAYS:
            per_run[w].append(sum(times[w]) / len(requests))
        for w in cell_ratios:
            cell_ratios[w] += [a / b for a, b in zip(times[w], times["plain"])]
    for name, m in models.items():
        assert checksum(m.unet, *m.text_encoders) == originals[name], "the model must be restored exactly"
    per_image = {w: statistics.median(v) for w, v in per_run.items()}
    report("xy", {
        "model": which, "grid": "5x5 LoRA TE strength x U-Net strength", "steps": args.steps,
        "threads": args.threads, "repeat": args.repeat, "lora": f"rank 16, {len(selected)} modules",
        "seconds_per_image": {w: round(v, 4) for w, v in per_image.items()},
        "runs": {w: [round(x, 4) for x in v] for w, v in per_run.items()},
        "series_vs_plain": round(per_image["series"] / per_image["plain"], 3),
        "full_apply_vs_plain": round(per_image["full_apply"] / per_image["plain"], 3),
        "median_cell_ratio": {w: round(statistics.median(v), 3) for w, v in cell_ratios.items()},
        "target_series_vs_plain": 1.05,
        **patch_costs(patchers["full_apply"], library, per_image["plain"]),
    })


def patch_costs(patcher: WeightPatcher, library: LoraLibrary, image_seconds: float, repeat: int = 20) -> dict:
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
            "repatch_vs_full": round(a / b, 3), "repatch_share_of_an_image": round(a / image_seconds, 4),
            "full_apply_share_of_an_image": round(b / image_seconds, 4)}


if __name__ == "__main__":
    main()
