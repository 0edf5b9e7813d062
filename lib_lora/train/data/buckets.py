"""Aspect-ratio buckets as sd-scripts makes them, and the bucket report (`ss_bucket_info`).

With bucketing, the bucket resolutions are every (w, h) with w, h multiples of `bucket_reso_steps` between
`min_bucket_reso` and `max_bucket_reso` and w*h at most the resolution's area (plus the largest square); an
image goes to the bucket with the closest aspect ratio, is resized to cover it and is cropped to it. With
`bucket_no_upscale`, the bucket comes from the image's own size (shrunk to the area first when larger), rounded
down to the steps, so small images are never enlarged. Without bucketing there is one bucket, the resolution.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lib_lora.errors import ConfigError
from lib_lora.train.data.config import DatasetOptions
from lib_lora.train.data.records import Placement, Size


def make_bucket_resolutions(max_reso: Size, min_size: int = 256, max_size: int = 1024,
                            divisible: int = 64) -> list[Size]:
    """Bucket resolutions for a maximum area of max_reso w*h, sorted (sd-scripts' `make_bucket_resolutions`)."""
    max_area = max_reso[0] * max_reso[1]
    resos = {(int(math.sqrt(max_area) // divisible) * divisible,) * 2}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


class BucketPlanner:
    """Places images into buckets for one dataset's options."""

    def __init__(self, options: DatasetOptions):
        self.options = options
        self.max_area = options.resolution[0] * options.resolution[1]
        steps = options.bucket_reso_steps
        self.resos: list[Size] = []
        if not options.enable_bucket:
            self.resos = [options.resolution]
        elif not options.bucket_no_upscale:
            self.resos = [r for r in make_bucket_resolutions(options.resolution, options.min_bucket_reso,
                                                             options.max_bucket_reso, steps) if min(r) > 0]
            if not self.resos:
                raise ConfigError("bucket_reso_steps", steps, f"no bucket fits: resolution {options.resolution} "
                                  f"with min/max_bucket_reso {options.min_bucket_reso}/{options.max_bucket_reso} "
                                  f"gives no side that is a positive multiple of {steps}")
        elif math.sqrt(self.max_area) < steps:
            raise ConfigError("bucket_reso_steps", steps, f"resolution {options.resolution} is smaller than one "
                              "bucket step, so no image fits a bucket")

    def place(self, size: Size) -> Placement:
        """The bucket of an image of `size` (w, h) and the size it is resized to before the crop.

        Raises:
            ValueError: with bucket_no_upscale, an image smaller than one step (the caller names the file).
        """
        width, height = size
        aspect = width / height
        if not self.options.bucket_no_upscale or not self.options.enable_bucket:
            reso = size if size in self.resos else min(self.resos, key=lambda r: abs(r[0] / r[1] - aspect))
            # Cover the bucket: match the side that would otherwise leave a gap, crop the other.
            scale = reso[1] / height if aspect > reso[0] / reso[1] else reso[0] / width
            resized = (int(width * scale + 0.5), int(height * scale + 0.5))
        else:
            shrunk = width * height > self.max_area
            resized = self._shrink_to_area(size) if shrunk else size
            steps = self.options.bucket_reso_steps
            reso = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
            if min(reso) == 0:
                what = f"{width}x{height}" + (f" (shrunk to {resized[0]}x{resized[1]}, the area of resolution "
                                              f"{self.options.resolution[0]}x{self.options.resolution[1]})"
                                              if shrunk else "")
                raise ValueError(f"{what} has a side shorter than bucket_reso_steps ({steps}) and "
                                 "bucket_no_upscale forbids enlarging it")
        return Placement(reso, resized, reso[0] / reso[1] - aspect)

    def _shrink_to_area(self, size: Size) -> Size:
        """Resize keeping the aspect to the max area; round the side whose rounding distorts least to the steps."""
        aspect = size[0] / size[1]
        width = math.sqrt(self.max_area * aspect)
        height = self.max_area / width
        by_width = self._round(width)
        by_height = self._round(height)
        ar_w = by_width / max(1, self._round(by_width / aspect))
        ar_h = self._round(by_height * aspect) / max(1, by_height)
        if abs(ar_w - aspect) < abs(ar_h - aspect):
            return by_width, int(by_width / aspect + 0.5)
        return int(by_height * aspect + 0.5), by_height

    def _round(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.options.bucket_reso_steps


@dataclass(frozen=True)
class BucketCount:
    resolution: Size
    count: int  # images including repeats, as sd-scripts counts


@dataclass(frozen=True)
class BucketReport:
    """Images per bucket and the mean absolute aspect error (over images, without repeats)."""

    buckets: tuple[BucketCount, ...]
    mean_img_ar_error: float

    def to_ss_dict(self) -> dict[str, Any]:
        """The shape of sd-scripts' `ss_bucket_info`: {"buckets": {"0": {"resolution": [w, h], "count": n}}, ...}."""
        buckets = {str(i): {"resolution": list(b.resolution), "count": b.count} for i, b in enumerate(self.buckets)}
        return {"buckets": buckets, "mean_img_ar_error": self.mean_img_ar_error}

    def describe(self) -> str:
        lines = [f"bucket {i}: {b.resolution[0]}x{b.resolution[1]}, {b.count} images (with repeats)"
                 for i, b in enumerate(self.buckets)]
        return "\n".join(lines + [f"mean aspect-ratio error: {self.mean_img_ar_error:.4f}"])


def bucket_report(placed: Iterable[tuple[Placement, int]]) -> BucketReport:
    """Report over (placement, repeats) pairs, buckets sorted by resolution."""
    counts: Counter[Size] = Counter()
    errors = []
    for placement, repeats in placed:
        counts[placement.bucket_reso] += repeats
        errors.append(abs(placement.ar_error))
    mean = sum(errors) / len(errors) if errors else 0.0
    return BucketReport(tuple(BucketCount(r, counts[r]) for r in sorted(counts)), mean)
