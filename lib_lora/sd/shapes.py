"""The procedural "coloured shapes" world: captioned 64x64 scenes and the metric that reads them back.

A scene is one shape of one named colour on a plain background of another, e.g. "a red circle on a blue
background". The embedded tiny model is trained on these scenes (minus `HELD_OUT`, 40 fixed combinations
kept to test that it composes seen words in unseen ways), and LoRA tests build "new concept" fixtures from
them (register a shape kind such as "star", or bind a colour to a trigger word).

The metric works on any RGB image: background colour from the corner patches, shape colour from the pixels
far from the background, shape kind from the fill ratio (shape area / bounding-box area), which is
scale-invariant: circle pi/4, square 1, triangle 1/2.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

IMAGE_SIZE = 64
CORNER = 5  # side of the corner patches that must show only background
MARGIN = 7  # shapes keep this far from the border, so the corner patches stay clean
MIN_SIZE, MAX_SIZE = 22, 44  # bounding-box side in pixels (of a 64 px image)

# Well separated in RGB (every pair > 95 apart), so the nearest-colour read-back is unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 60, 225),
    "yellow": (240, 225, 40),
    "cyan": (40, 215, 230),
    "magenta": (220, 45, 210),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "orange": (250, 130, 15),
    "purple": (115, 35, 150),
}

MaskFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ShapeKind:
    """A shape drawn inside its bounding box. `inside(u, v)` takes coordinates in [-1, 1] (v grows downwards)."""

    name: str
    inside: MaskFn
    fill_ratio: float = field(default=0.0)


def _fill_ratio(inside: MaskFn, n: int = 512) -> float:
    # Measured against the mask's own bounding box, as the metric measures images (a star does not fill
    # the [-1, 1] box it is drawn in).
    c = (np.arange(n) + 0.5) / n * 2 - 1
    v, u = np.meshgrid(c, c, indexing="ij")
    mask = inside(u, v)
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    return float(mask.sum() / ((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)))


SHAPES: dict[str, ShapeKind] = {}


def register_shape(name: str, inside: MaskFn) -> ShapeKind:
    """Add a shape kind (its fill ratio is measured from the mask, so the metric can classify it)."""
    kind = ShapeKind(name, inside, _fill_ratio(inside))
    SHAPES[name] = kind
    return kind


def _star(u: np.ndarray, v: np.ndarray, points: int = 5, inner: float = 0.45) -> np.ndarray:
    # A point is inside a star polygon when its radius is below the polygon's radius at that angle;
    # between an outer and an inner vertex the edge is straight, so solve for the radius along the ray.
    ang = np.arctan2(u, -v) % (2 * np.pi / points)
    half = np.pi / points
    a = np.where(ang > half, 2 * half - ang, ang)
    p1, p2 = np.array([0.0, 1.0]), np.array([np.sin(half) * inner, np.cos(half) * inner])
    d = p2 - p1
    denom = np.sin(a) * d[1] - np.cos(a) * d[0]
    edge_r = (p1[0] * d[1] - p1[1] * d[0]) / np.where(np.abs(denom) < 1e-9, 1e-9, denom)
    return np.hypot(u, v) <= np.abs(edge_r)


register_shape("circle", lambda u, v: u * u + v * v <= 1.0)
register_shape("square", lambda u, v: (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0))
register_shape("triangle", lambda u, v: (v >= -1.0) & (v <= 1.0) & (np.abs(u) <= (v + 1.0) / 2.0))
# Not used by the embedded model; ready for "new concept" fixtures.
register_shape("ring", lambda u, v: (u * u + v * v <= 1.0) & (u * u + v * v >= 0.55**2))
register_shape("star", _star)

BASE_SHAPES = ("circle", "square", "triangle")


@dataclass(frozen=True)
class Combo:
    """What a scene shows; `caption` is the prompt that asks for it."""

    shape: str
    colour: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def all_combos(shapes: Sequence[str] = BASE_SHAPES, colours: Sequence[str] = tuple(COLOURS)) -> list[Combo]:
    """Every (shape, colour, background) with colour != background, in a fixed order."""
    return [Combo(s, c, b) for s in shapes for c in colours for b in colours if c != b]


def _held_out() -> tuple[Combo, ...]:
    # A fixed rule rather than a random draw: 40 distinct (colour, background) pairs (offsets 1, 3, 5, 7
    # around the colour list), shapes in turn. Every word still occurs in training, and each held-out pair
    # is seen in training only with the other shapes.
    names, out = list(COLOURS), []
    for i in range(40):
        colour = names[i % 10]
        background = names[(i % 10 + 1 + 2 * (i // 10)) % 10]
        out.append(Combo(BASE_SHAPES[i % 3], colour, background))
    return tuple(out)


HELD_OUT: tuple[Combo, ...] = _held_out()


def training_combos() -> list[Combo]:
    """All base combos except `HELD_OUT` (230 of 270)."""
    held = set(HELD_OUT)
    return [c for c in all_combos() if c not in held]


@dataclass(frozen=True)
class Placement:
    """Bounding box of the shape: centre (x, y) and side, in pixels."""

    cx: float
    cy: float
    size: float


def sample_placement(rng: np.random.Generator, image_size: int = IMAGE_SIZE) -> Placement:
    """Random size and position, scaled to `image_size`, keeping the shape off the corner patches."""
    k = image_size / IMAGE_SIZE
    size = rng.uniform(MIN_SIZE, MAX_SIZE) * k
    lo, hi = MARGIN * k + size / 2, image_size - MARGIN * k - size / 2
    return Placement(float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)), float(size))


def render(combo: Combo, placement: Placement, image_size: int = IMAGE_SIZE, supersample: int = 4,
           colours: dict[str, tuple[int, int, int]] | None = None) -> np.ndarray:
    """Draw a scene as an (H, W, 3) uint8 array, anti-aliased by supersampling. `colours` (name -> RGB) are
    looked up before the named `COLOURS` (sample datasets draw colours the model does not know)."""
    table = {**COLOURS, **(colours or {})}
    try:
        kind, fg, bg = SHAPES[combo.shape], table[combo.colour], table[combo.background]
    except KeyError as exc:
        raise KeyError(f"unknown shape or colour {exc.args[0]!r} in {combo}: shapes {sorted(SHAPES)}, "
                       f"colours {sorted(COLOURS)}") from None
    n = image_size * supersample
    c = (np.arange(n) + 0.5) / supersample
    y, x = np.meshgrid(c, c, indexing="ij")
    half = placement.size / 2
    mask = kind.inside((x - placement.cx) / half, (y - placement.cy) / half).astype(np.float32)
    alpha = mask.reshape(image_size, supersample, image_size, supersample).mean(axis=(1, 3))[..., None]
    img = alpha * np.asarray(fg, np.float32) + (1 - alpha) * np.asarray(bg, np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_random(combo: Combo, rng: np.random.Generator, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """`render` at a random placement drawn from `rng`."""
    return render(combo, sample_placement(rng, image_size), image_size)


def sample_batch(rng: np.random.Generator, n: int, combos: Sequence[Combo]) -> tuple[np.ndarray, list[Combo]]:
    """n random scenes of random combos: (n, H, W, 3) uint8 images and their combos."""
    picks = [combos[i] for i in rng.integers(0, len(combos), size=n)]
    return np.stack([render_random(c, rng) for c in picks]), picks


# ---------------------------------------------------------------------------------------------- metric


@dataclass(frozen=True)
class Analysis:
    """What the metric reads from one image."""

    background: str
    shape_colour: str | None  # None: no pixel stands out from the background
    shape: str | None
    fill_ratio: float
    background_rgb: tuple[int, int, int]
    shape_rgb: tuple[int, int, int] | None


def nearest_colour(rgb: Sequence[float], colours: Sequence[str] | None = None) -> str:
    """Name of the named colour closest to `rgb` (Euclidean in RGB)."""
    names = list(colours or COLOURS)
    table = np.asarray([COLOURS[n] for n in names], np.float32)
    return names[int(np.argmin(((table - np.asarray(rgb, np.float32)) ** 2).sum(axis=1)))]


def classify_fill(ratio: float, shapes: Sequence[str] = BASE_SHAPES) -> str:
    """Shape kind whose fill ratio is closest to `ratio`."""
    return min(shapes, key=lambda s: abs(SHAPES[s].fill_ratio - ratio))


def analyse(image, shapes: Sequence[str] = BASE_SHAPES, min_distance: float = 60.0) -> Analysis:
    """Read background colour, shape colour and shape kind from an RGB image (PIL or HxWx3 array)."""
    img = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, np.float32)[..., :3]
    h, w = img.shape[:2]
    k = max(1, round(CORNER * min(h, w) / IMAGE_SIZE))
    corners = np.concatenate([p.reshape(-1, 3) for p in (img[:k, :k], img[:k, -k:], img[-k:, :k], img[-k:, -k:])])
    bg_rgb = np.median(corners, axis=0)
    dist = np.sqrt(((img - bg_rgb) ** 2).sum(axis=-1))
    far = float(np.percentile(dist, 99))
    if far < min_distance:
        return Analysis(nearest_colour(bg_rgb), None, None, 0.0, _rgb(bg_rgb), None)
    # Half-way between background and shape: the edge of an anti-aliased or blurred shape.
    mask = dist > far / 2
    core = dist > far * 0.75
    shape_rgb = np.median(img[core], axis=0)
    rows, cols = np.nonzero(mask.sum(axis=1) >= 2)[0], np.nonzero(mask.sum(axis=0) >= 2)[0]
    if len(rows) == 0 or len(cols) == 0:
        return Analysis(nearest_colour(bg_rgb), nearest_colour(shape_rgb), None, 0.0, _rgb(bg_rgb), _rgb(shape_rgb))
    box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    ratio = float(mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].sum() / box)
    return Analysis(nearest_colour(bg_rgb), nearest_colour(shape_rgb), classify_fill(ratio, shapes), ratio,
                    _rgb(bg_rgb), _rgb(shape_rgb))


def _rgb(a: np.ndarray) -> tuple[int, int, int]:
    r, g, b = (int(round(float(x))) for x in a)
    return (r, g, b)


@dataclass(frozen=True)
class ItemResult:
    combo: Combo
    analysis: Analysis

    @property
    def background_ok(self) -> bool:
        return self.analysis.background == self.combo.background

    @property
    def colour_ok(self) -> bool:
        return self.analysis.shape_colour == self.combo.colour

    @property
    def shape_ok(self) -> bool:
        return self.analysis.shape == self.combo.shape


@dataclass(frozen=True)
class EvalReport:
    """Colour checks: two per image (background, shape colour). Shape checks: one per image."""

    colour_matches: int
    colour_checks: int
    shape_matches: int
    shape_checks: int
    per_item: tuple[ItemResult, ...]

    @property
    def colour_accuracy(self) -> float:
        return self.colour_matches / max(1, self.colour_checks)

    @property
    def shape_accuracy(self) -> float:
        return self.shape_matches / max(1, self.shape_checks)

    def summary(self) -> str:
        return (f"colour {self.colour_matches}/{self.colour_checks} ({self.colour_accuracy:.0%}), "
                f"shape {self.shape_matches}/{self.shape_checks} ({self.shape_accuracy:.0%})")

    def failures(self) -> list[str]:
        """One line per image with any wrong check, for test messages."""
        out = []
        for it in self.per_item:
            if not (it.background_ok and it.colour_ok and it.shape_ok):
                a = it.analysis
                out.append(f"{it.combo.caption!r}: read {a.shape_colour} {a.shape} (fill {a.fill_ratio:.2f}) "
                           f"on {a.background}")
        return out


def evaluate(images: Sequence, combos: Sequence[Combo], shapes: Sequence[str] = BASE_SHAPES) -> EvalReport:
    """Score generated images against the combos they were asked for."""
    if len(images) != len(combos):
        raise ValueError(f"evaluate: {len(images)} images for {len(combos)} combos")
    items = tuple(ItemResult(c, analyse(img, shapes)) for img, c in zip(images, combos))
    colour = sum(int(i.background_ok) + int(i.colour_ok) for i in items)
    shape = sum(int(i.shape_ok) for i in items)
    return EvalReport(colour, 2 * len(items), shape, len(items), items)
