"""An X/Y(/Z) plot as a list of jobs: axes typed and checked against the host, then one `Cell` per image.

Everything is checked when the plan is made (values, LoRA names, presets, samplers), so a plot never stops
half-way on a typo. A random base seed (-1) is drawn once for the whole plot, so cells differ only by their axes.
Jobs run Z, then Y, then X: along X only the innermost value changes, which for strength and block-weight axes
means only the weights of the plotted LoRA are re-patched between neighbouring images.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

from lib_lora.errors import ConfigError
from lib_lora.sd.pipeline import MAX_SEED
from lib_lora.xy.axes import AxisContext, AxisKind, Cell, get_axis
from lib_lora.xy.values import format_value, parse_values

AXIS_NAMES = ("x", "y", "z")


@dataclass(frozen=True)
class Axis:
    """One axis of a plot: its kind, its values (expanded) and their labels."""

    kind: AxisKind
    values: tuple
    labels: tuple[str, ...]

    @property
    def title(self) -> str:
        return self.kind.label

    def __len__(self) -> int:
        return len(self.values)

    def describe(self) -> str:
        return f"{self.kind.label}: {', '.join(format_value(v) for v in self.values)}"


@dataclass(frozen=True)
class AxisRequest:
    """What the user chose for one axis: a kind key ("" = unused) and the values as typed."""

    kind: str = ""
    values: str = ""


@dataclass(frozen=True)
class Job:
    """One image: its place in the plot (x, y, z indices) and what to generate."""

    index: int
    x: int
    y: int
    z: int
    cell: Cell


def build_axis(request: AxisRequest, ctx: AxisContext, field_name: str) -> Axis | None:
    """The axis for a request, or None when no kind is chosen. Raises ConfigError naming `field_name`."""
    if not request.kind:
        return None
    kind = get_axis(request.kind, f"{field_name}_type")
    values = parse_values(request.values, kind.value_type, f"{field_name}_values")
    values = kind.check(values, ctx, f"{field_name}_values")
    return Axis(kind, tuple(values), tuple(kind.label_of(v, ctx) for v in values))


@dataclass(frozen=True)
class XYPlan:
    """The plot: a base cell and up to three axes. `jobs()` lists the images in the order they are made."""

    base: Cell
    x: Axis
    y: Axis | None = None
    z: Axis | None = None

    @property
    def axes(self) -> tuple[Axis | None, Axis | None, Axis | None]:
        return self.x, self.y, self.z

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.x), len(self.y) if self.y else 1, len(self.z) if self.z else 1

    @property
    def count(self) -> int:
        nx, ny, nz = self.shape
        return nx * ny * nz

    def cell_at(self, ix: int, iy: int, iz: int) -> Cell:
        cell = self.base
        for axis, i in ((self.x, ix), (self.y, iy), (self.z, iz)):
            if axis is not None:
                cell = axis.kind.apply(cell, axis.values[i], axis.values)
        return cell

    def jobs(self) -> list[Job]:
        nx, ny, nz = self.shape
        out = []
        for iz in range(nz):
            for iy in range(ny):
                for ix in range(nx):
                    out.append(Job(len(out), ix, iy, iz, self.cell_at(ix, iy, iz)))
        return out

    def estimate_seconds(self, seconds_per_step: float) -> float:
        """Time of the whole plot at `seconds_per_step` (per image, at the base size), steps axes included."""
        return sum(job.cell.params.steps * job.cell.params.batch_size for job in self.jobs()) * seconds_per_step

    def describe(self) -> str:
        """The plot for an infotext: `X: LoRA TE strength: 0, 0.5, 1; Y: ...`."""
        return "; ".join(f"{name.upper()}: {axis.describe()}" for name, axis in zip(AXIS_NAMES, self.axes) if axis)


def make_plan(base: Cell, requests: Sequence[AxisRequest], ctx: AxisContext) -> XYPlan:
    """Check the axes and build the plan.

    Args:
        base: the settings every cell starts from (`lora` is the plotted LoRA, if any).
        requests: X, Y and optionally Z (a request with kind "" is unused; X must be set).

    Raises:
        ConfigError: naming the axis field (`x_values`, `y_type`, ...) or `lora` when an axis needs a LoRA.
    """
    padded = list(requests) + [AxisRequest()] * (3 - len(requests))
    axes = [build_axis(r, ctx, name) for r, name in zip(padded, AXIS_NAMES)]
    if axes[0] is None:
        if axes[1] is None and axes[2] is None:
            raise ConfigError("x_type", "", "choose at least the X axis")
        axes = [a for a in axes if a is not None] + [None] * sum(a is None for a in axes)
    keys = [a.kind.key for a in axes if a is not None]
    if len(set(keys)) != len(keys):
        raise ConfigError("y_type", keys, "two axes of the same kind")
    plots_lora = base.lora or "lora" in keys
    needs = next((a for a in axes if a is not None and a.kind.needs_lora), None)
    if needs is not None and not plots_lora:
        raise ConfigError("lora", None,
                          f"the {needs.kind.label} axis needs a LoRA: choose one (or add a LoRA file axis)")
    if base.params.seed == -1:
        base = replace(base, params=replace(base.params, seed=random.randint(0, MAX_SEED)))
    return XYPlan(base, axes[0], axes[1], axes[2])
