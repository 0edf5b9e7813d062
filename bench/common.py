"""Shared helpers for benchmarks: timing with medians, peak RSS, result printing."""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/x.py` as well as `python -m bench.x`
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def timed(fn, repeat: int = 3, warmup: int = 1) -> tuple[float, list[float]]:
    """(median seconds, all samples) of fn() after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), samples


def report(name: str, figures: dict) -> None:
    print(json.dumps({"bench": name, **figures}, indent=2))
