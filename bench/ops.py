"""The LoRA tools against the way sd-scripts does the same jobs, measured in one run on the same machine.

- resize: `rank128.safetensors` (make_loras.py: rank 128 on the 350 modules of the real LoCon, 3x3 convs
  included) to rank 32. Ours (SVD through the factors) vs the reference sd-scripts' resize_lora.py uses: per
  module, form up @ down and take its SVD (here the thin SVD, which is faster than sd-scripts' full_matrices
  call; `--sd-scripts-svd` uses that). Both include reading and writing the files. Target: ratio >= 10, same
  ΔW per module.
- merge into a model: `rank64_b.safetensors` into a full-size SD1.5-shaped fp16 checkpoint. Ours (streamed)
  vs loading every tensor, merging with the same arithmetic and saving, each in its own process for its peak
  RSS. Targets: peak RSS <= 0.6x, time <= 1.0x.
- extract: dim 64 from two full-size SD1.5-shaped checkpoints. Ours (`svd="auto"`: randomized SVD of the
  leading ranks) vs the same extraction with the full SVD of every ΔW. Targets: time <= 0.3x with the same
  error (||ΔW - up·down|| / ||ΔW|| per module).

    .venv/bin/python -m bench.ops [--dir /tmp/ops-bench] [--only resize,merge,extract]

The input files (4.6 GB) are written into --dir on first use (bench/sd_files.py) and kept.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, report  # noqa: E402
from bench.sd_files import ensure  # noqa: E402
from lib_lora.io import load_file, save_file  # noqa: E402
from lib_lora.networks import load_network  # noqa: E402
from lib_lora.ops import (  # noqa: E402
    ExtractRequest,
    LoraInput,
    MergeModelRequest,
    RankRule,
    ResizeRequest,
    extract,
    merge_into_model,
    resize,
)
from lib_lora.ops.checkpoint_keys import checkpoint_targets  # noqa: E402
from lib_lora.ops.modules import module_delta  # noqa: E402
from lib_lora.ops.stream import TensorReader  # noqa: E402
from lib_lora.patching import fits_dtype  # noqa: E402
from lib_lora.types import Arch  # noqa: E402


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


# ------------------------------------------------------------------------------------------------ resize


def reference_resize(src: Path, out: Path, rank: int, full_matrices: bool) -> None:
    """sd-scripts' resize_lora.py procedure: per module up @ down in float32, its SVD, U·S and Vh of the kept ranks."""
    sd = {k: v.to(torch.float32) for k, v in load_file(src).tensors.items()}
    result = {}
    for key in [k for k in sd if k.endswith(".lora_down.weight")]:
        name = key[: -len(".lora_down.weight")]
        down, up = sd[key], sd[f"{name}.lora_up.weight"]
        scale = float(sd[f"{name}.alpha"]) / down.shape[0]
        u, s, vh = torch.linalg.svd(up.flatten(1) @ down.flatten(1), full_matrices=full_matrices)
        result[f"{name}.lora_up.weight"] = (u[:, :rank] * s[:rank]).reshape(up.shape[0], rank, *up.shape[2:]).half()
        result[f"{name}.lora_down.weight"] = vh[:rank].reshape(rank, *down.shape[1:]).contiguous().half()
        result[f"{name}.alpha"] = torch.tensor(scale * rank).half()
    save_file(result, out)


def bench_resize(paths, tmp: Path, sd_scripts_svd: bool) -> dict:
    ours_out, ref_out = tmp / "resize-ours.safetensors", tmp / "resize-ref.safetensors"
    t0 = time.perf_counter()
    resize(ResizeRequest(str(paths["rank128"]), str(ours_out), RankRule(32), "fp16", "cpu", force=True))
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    reference_resize(paths["rank128"], ref_out, 32, full_matrices=sd_scripts_svd)
    t_ref = time.perf_counter() - t0
    ours, ref = load_network(ours_out), load_network(ref_out)
    errors = []
    for name in ref.modules:
        a = module_delta(name, ours.modules[name], ours.arch).matrix()
        b = module_delta(name, ref.modules[name], ref.arch).matrix()
        errors.append(float((a - b).norm() / b.norm()))
    return {"modules": len(errors), "ours_s": round(t_ours, 2), "reference_s": round(t_ref, 2),
            "reference": "per-module SVD of up @ down (" + ("full_matrices, as sd-scripts calls it" if sd_scripts_svd
                                                             else "thin") + ")",
            "speedup_reference_over_ours": round(t_ref / t_ours, 1), "target": ">= 10",
            "delta_rel_diff_max": f"{max(errors):.2e}", "delta_rel_diff_median": f"{statistics.median(errors):.2e}"}


# ------------------------------------------------------------------------------------------------ merge


def reference_merge(model: Path, lora: Path, out: Path) -> None:
    """Load every tensor, merge with the same arithmetic (NetworkModule.merged in float32), save everything."""
    loaded = load_file(model)
    tensors = loaded.tensors
    net = load_network(lora, arch=Arch.SD1)
    targets = checkpoint_targets({k: tuple(v.shape) for k, v in tensors.items()}, Arch.SD1)
    for name, module in net.modules.items():
        t = targets[name]
        w = tensors[t.key]
        merged = module.merged(w.to(torch.float32), 1.0)
        assert fits_dtype(merged, w.dtype)
        tensors[t.key] = merged.to(w.dtype)
    save_file(tensors, out, loaded.metadata)


def merge_child(which: str, model: str, lora: str, out: str) -> None:
    t0 = time.perf_counter()
    if which == "ours":
        merge_into_model(MergeModelRequest(model, (LoraInput(lora),), out, device="cpu", force=True))
    else:
        reference_merge(Path(model), Path(lora), Path(out))
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_gb": peak_rss_gb()}))


def _run_child(which: str, paths, out: Path) -> dict:
    cmd = [sys.executable, "-m", "bench.ops", "--child", which, str(paths["base"]), str(paths["rank64"]), str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_merge(paths, tmp: Path) -> dict:
    ours = _run_child("ours", paths, tmp / "merge-ours.safetensors")
    ref = _run_child("reference", paths, tmp / "merge-ref.safetensors")
    same = True
    with TensorReader(tmp / "merge-ours.safetensors") as a, TensorReader(tmp / "merge-ref.safetensors") as b:
        for key in a.names():
            if not torch.equal(a.read(key), b.read(key)):
                same = False
                break
    for f in ("merge-ours.safetensors", "merge-ref.safetensors"):
        (tmp / f).unlink()
    return {"checkpoint_gb": round(paths["base"].stat().st_size / 1e9, 2),
            "ours_s": round(ours["seconds"], 1), "reference_s": round(ref["seconds"], 1),
            "ours_peak_rss_gb": round(ours["peak_rss_gb"], 2), "reference_peak_rss_gb": round(ref["peak_rss_gb"], 2),
            "rss_ratio": round(ours["peak_rss_gb"] / ref["peak_rss_gb"], 3), "rss_target": "<= 0.6",
            "time_ratio": round(ours["seconds"] / ref["seconds"], 3), "time_target": "<= 1.0",
            "identical_output_tensors": same}


# ------------------------------------------------------------------------------------------------ extract


def _extract_errors(paths, lora: Path) -> list[float]:
    net = load_network(lora, arch=Arch.SD1)
    with TensorReader(paths["base"]) as base, TensorReader(paths["tuned"]) as tuned:
        targets = checkpoint_targets(base.shapes(), Arch.SD1)
        errors = []
        for name, module in net.modules.items():
            t = targets[name]
            diff = (tuned.read(t.key).to(torch.float32) - base.read(t.key).to(torch.float32)).flatten(1)
            approx = module_delta(name, module, Arch.SD1).matrix()
            errors.append(float((diff - approx).norm() / diff.norm()))
    return errors


def bench_extract(paths, tmp: Path) -> dict:
    figures = {}
    for how in ("auto", "full"):
        out = tmp / f"extract-{how}.safetensors"
        t0 = time.perf_counter()
        result = extract(ExtractRequest(str(paths["base"]), str(paths["tuned"]), str(out), dim=64, svd=how,
                                        device="cpu", force=True))
        seconds = time.perf_counter() - t0
        errors = _extract_errors(paths, out)
        figures[how] = {"s": round(seconds, 1), "svd_used": result.svd_used, "modules": len(errors),
                        "error_mean": round(statistics.fmean(errors), 5), "error_max": round(max(errors), 5),
                        "notes": result.notes}
    ours, ref = figures["auto"], figures["full"]
    return {"ours (auto: randomized where enough)": ours, "reference (full SVD)": ref,
            "time_ratio": round(ours["s"] / ref["s"], 3), "target": "<= 0.3",
            "error_mean_ratio": round(ours["error_mean"] / ref["error_mean"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "lora-studio-ops-bench")
    parser.add_argument("--only", default="resize,merge,extract")
    parser.add_argument("--sd-scripts-svd", action="store_true",
                        help="resize reference with full_matrices=True, as sd-scripts calls torch.linalg.svd (slow)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        merge_child(*args.child)
        return
    paths = ensure(args.dir)
    figures = {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for part in args.only.split(","):
            if part == "resize":
                figures["resize rank 128 -> 32"] = bench_resize(paths, Path(tmp), args.sd_scripts_svd)
            elif part == "merge":
                figures["merge rank 64 into SD1.5 fp16"] = bench_merge(paths, Path(tmp))
            elif part == "extract":
                figures["extract dim 64"] = bench_extract(paths, Path(tmp))
            report("ops (partial)", figures)
    report("ops", figures)


if __name__ == "__main__":
    main()
