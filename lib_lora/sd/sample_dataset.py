"""Sample training datasets in the embedded model's own world (`shapes`): kohya folders a new user can train a first
LoRA on in a minute on a CPU, and the data of the shipped sample LoRA.

- "pink" (a concept): circles, squares and triangles in a pink the model has never seen, captioned with the trigger
  word in place of the colour (`a sks circle on a blue background`); after training, `sks` draws pink.
- "pastel" (a style): ordinary scenes with every colour mixed halfway with white, captioned
  `a red circle on a blue background, pastel`; after training, `pastel` washes the colours out.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lib_lora.errors import ConfigError
from lib_lora.sd.shapes import BASE_SHAPES, COLOURS, Combo, render, sample_placement, training_combos

PINK = (255, 150, 195)  # > 100 (RGB distance) from every colour the embedded model knows


@dataclass(frozen=True)
class SampleDataset:
    """A written dataset: the kohya folder (`train_data_dir`), its trigger word and a prompt to try it with."""

    folder: Path
    trigger: str
    prompt: str
    images: int


def pastel(rgb: tuple[int, int, int], amount: float = 0.5) -> tuple[int, int, int]:
    """A colour mixed with white."""
    mixed = np.asarray(rgb, np.float32) * (1 - amount) + 255.0 * amount
    return tuple(int(round(v)) for v in mixed)


def _write(folder: Path, scenes: list[tuple[Combo, str]], rng: np.random.Generator,
           colours: dict[str, tuple[int, int, int]]) -> None:
    from PIL import Image

    for i, (combo, caption) in enumerate(scenes):
        Image.fromarray(render(combo, sample_placement(rng), colours=colours)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption, encoding="utf-8")


def _pink(folder: Path, images: int, rng: np.random.Generator) -> SampleDataset:
    sub = folder / "10_sks"
    sub.mkdir(parents=True)
    backgrounds = [c for c in COLOURS if c not in ("magenta", "white")]
    scenes = []
    for i in range(images):
        shape, bg = BASE_SHAPES[i % len(BASE_SHAPES)], backgrounds[int(rng.integers(len(backgrounds)))]
        scenes.append((Combo(shape, "_sample_pink", bg), f"a sks {shape} on a {bg} background"))
    _write(sub, scenes, rng, {"_sample_pink": PINK})
    return SampleDataset(folder, "sks", "a sks circle on a blue background", images)


def _pastel(folder: Path, images: int, rng: np.random.Generator) -> SampleDataset:
    sub = folder / "4_pastel"
    sub.mkdir(parents=True)
    combos = training_combos()
    picks = rng.choice(len(combos), size=images, replace=False)
    scenes = [(combos[int(k)], f"{combos[int(k)].caption}, pastel") for k in picks]
    _write(sub, scenes, rng, {name: pastel(rgb) for name, rgb in COLOURS.items()})
    return SampleDataset(folder, "pastel", "a red circle on a blue background, pastel", images)


KINDS: dict[str, Callable[[Path, int, np.random.Generator], SampleDataset]] = {"pink": _pink, "pastel": _pastel}


def write_sample_dataset(folder: str | Path, kind: str = "pink", images: int = 12, seed: int = 0) -> SampleDataset:
    """Write a sample kohya dataset into `folder` (which must not exist yet, or be empty).

    Raises:
        ConfigError: an unknown kind, or a folder that already holds files (nothing is overwritten).
    """
    if kind not in KINDS:
        raise ConfigError("kind", kind, f"unknown sample dataset; known: {', '.join(KINDS)}")
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError("folder", str(folder), "already holds files; choose an empty or new folder")
    folder.mkdir(parents=True, exist_ok=True)
    return KINDS[kind](folder, images, np.random.default_rng(seed))
