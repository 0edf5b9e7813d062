"""Running a plan: the host generates the cells one after another, then the grids are drawn and saved.

The host's `generate_series` keeps the LoRA weights applied between requests, so neighbouring cells that differ
only in strengths or block weights re-patch only what changed. Cancelling stops after the current image; what is
done is kept and drawn (missing cells grey). An error in one cell (say, a strength that overflows the weights)
ends the plot the same way, with the message.
"""
from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lib_lora.errors import LibLoraError
from lib_lora.sd.pipeline import GenerationParams, quote, save_png
from lib_lora.xy.grid import GridLayout, draw_grid
from lib_lora.xy.plan import XYPlan

# (requests, progress(step, total), should_stop) -> one result per request (its .images, .infotexts, .paths)
SeriesFn = Callable[..., Iterator]
ProgressFn = Callable[[float, str], None]  # (fraction done, description)


@dataclass
class XYResult:
    """What a plot made: per job its image, infotext and saved file (None where not made), and the grids."""

    plan: XYPlan
    images: list = field(default_factory=list)
    infotexts: list = field(default_factory=list)
    paths: list = field(default_factory=list)
    grids: list = field(default_factory=list)
    grid_paths: list[Path] = field(default_factory=list)
    layouts: list[GridLayout] = field(default_factory=list)
    cancelled: bool = False
    error: str = ""
    seconds: float = 0.0

    @property
    def done(self) -> int:
        return sum(im is not None for im in self.images)

    def summary(self) -> str:
        n = self.plan.count
        what = f"{self.done} of {n} images" if self.done < n else f"{n} images"
        how = " (cancelled)" if self.cancelled else f" (stopped: {self.error})" if self.error else ""
        return f"{what} in {self.seconds:.1f} s{how}; grid: {', '.join(map(str, self.grid_paths)) or '-'}"


def plot_infotext(first: str, plan: XYPlan) -> str:
    """A cell's infotext with the plot's axes added as one more field (`X/Y plot: "X: ...; Y: ..."`)."""
    return f"{first}, X/Y plot: {quote(plan.describe())}" if first else f"X/Y plot: {quote(plan.describe())}"


def _grid_file(folder: Path, z: int, count: int) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    suffix = f"-z{z}" if count > 1 else ""
    path = folder / f"xy-{stamp}{suffix}.png"
    n = 1
    while path.exists():
        path = folder / f"xy-{stamp}-{n}{suffix}.png"
        n += 1
    return path


def draw_plot(result: XYResult, out_dir: Path | None) -> None:
    """Draw (and save, with `out_dir`) one grid per Z value from what `result` holds."""
    plan = result.plan
    nx, ny, nz = plan.shape
    first = next((t for t in result.infotexts if t), "")
    infotext = plot_infotext(first, plan)
    for z in range(nz):
        cells = result.images[z * nx * ny:(z + 1) * nx * ny]
        grid, layout = draw_grid(cells, nx, ny, x_title=plan.x.title, x_labels=plan.x.labels,
                                 y_title=plan.y.title if plan.y else "", y_labels=plan.y.labels if plan.y else (),
                                 title=f"{plan.z.title}: {plan.z.labels[z]}" if plan.z else "")
        result.grids.append(grid)
        result.layouts.append(layout)
        if out_dir is not None:
            path = _grid_file(Path(out_dir), z, nz)
            save_png(grid, path, infotext)
            result.grid_paths.append(path)


def run_plan(plan: XYPlan, series: SeriesFn, *, out_dir: Path | None = None, progress: ProgressFn | None = None,
             should_stop: Callable[[], bool] | None = None) -> XYResult:
    """Generate every cell of `plan` through `series` (a host's `generate_series`), then draw and save the grids.

    Bad input was rejected by `make_plan`; an error raised while generating (LibLoraError) ends the plot early
    with `result.error` set. Cancelling (`should_stop`) is checked between images.
    """
    jobs = plan.jobs()
    requests: list[GenerationParams] = [j.cell.request() for j in jobs]
    result = XYResult(plan, [None] * len(jobs), [None] * len(jobs), [None] * len(jobs))
    started = time.perf_counter()
    done = [0]

    def on_step(step: int, total: int) -> None:
        if progress is not None:
            fraction = (done[0] + step / max(total, 1)) / len(jobs)
            progress(fraction, f"image {done[0] + 1}/{len(jobs)}, step {step}/{total}")

    stop = should_stop or (lambda: False)
    results = series(requests, progress=on_step, should_stop=stop)
    try:
        for job, made in zip(jobs, results):
            result.images[job.index] = made.images[0]
            result.infotexts[job.index] = made.infotexts[0]
            result.paths[job.index] = made.paths[0] if made.paths else None
            done[0] += 1
    except LibLoraError as exc:
        result.error = str(exc)
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()  # the host restores the model's weights when its series ends
    result.cancelled = not result.error and done[0] < len(jobs) and stop()
    result.seconds = time.perf_counter() - started
    draw_plot(result, out_dir)
    return result


def series_of(generate: Callable[..., object]) -> SeriesFn:
    """A `SeriesFn` from a one-request `generate(params, progress=, should_stop=)` (hosts without a series mode:
    each cell applies and restores its LoRAs on its own)."""

    def series(requests: Sequence[GenerationParams], progress=None, should_stop=None) -> Iterator:
        for params in requests:
            if should_stop is not None and should_stop():
                return
            yield generate(params, progress=progress)

    return series
