"""Records of the data pipeline: progress, problems found in a dataset, images, batch plans, batches, sampler state."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lib_lora.errors import ConfigError, LibLoraError

Size = tuple[int, int]  # (width, height), as sd-scripts writes resolutions


@dataclass(frozen=True)
class DataProgress:
    """Progress of a long data task (checking images, caching): `done` of `total`, the file being handled."""

    stage: str
    done: int
    total: int
    path: str = ""


ProgressCallback = Callable[[DataProgress], None]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file of the dataset."""

    path: str
    reason: str


class DatasetError(LibLoraError):
    """The dataset cannot be used. Lists every problem found, so they can all be fixed in one go."""

    def __init__(self, summary: str, problems: list[Problem] | tuple[Problem, ...] = ()):
        self.summary, self.problems = summary, tuple(problems)
        lines = [summary] + [f"  {p.path}: {p.reason}" for p in self.problems]
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Placement:
    """Where an image goes: its bucket, the size it is resized to before cropping, the aspect error."""

    bucket_reso: Size
    resized_size: Size
    ar_error: float


@dataclass(frozen=True)
class ImageItem:
    """One image of the dataset (counted once; repeats live in the dataset groups)."""

    index: int
    path: Path
    caption: str  # as read (class tokens / "" when the caption file is missing; metadata caption + tags)
    caption_missing: bool
    dataset_index: int
    subset_index: int  # index into the dataset's subsets
    is_reg: bool
    size: Size  # after EXIF orientation
    placement: Placement
    mask: Path | None = None  # the mask file (a subset's conditioning_data_dir), when there is one


@dataclass(frozen=True)
class BatchPlan:
    """One batch of one epoch: which images, from which dataset and bucket. `index` counts from 0 in the epoch."""

    epoch: int  # 1-based, as sd-scripts' ss_epoch
    index: int
    dataset_index: int
    bucket_reso: Size
    items: tuple[int, ...]


@dataclass
class Batch:
    """What the loop consumes. Images are (B,3,H,W) float32 in [-1, 1], or latents when cached.

    Sizes for SDXL conditioning are (height, width), as sd-scripts passes them.
    """

    plan: BatchPlan
    captions: list[str]
    loss_weights: torch.Tensor  # (B,): prior_loss_weight for regularisation images, else 1
    is_reg: tuple[bool, ...]
    flipped: tuple[bool, ...]
    paths: tuple[str, ...]
    original_sizes_hw: torch.Tensor  # (B, 2) long
    crop_top_lefts: torch.Tensor  # (B, 2) long
    target_sizes_hw: torch.Tensor  # (B, 2) long
    images: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    alpha_masks: torch.Tensor | None = None  # (B, H, W) in [0, 1] at image resolution, when alpha_mask is on
    text_encoder_outputs: Any = None  # what encode_captions returned, stacked, when cached


@dataclass(frozen=True)
class SamplerState:
    """Where the data order stands: epoch (1-based) and batches consumed in it. All randomness of the data
    pipeline (order, caption shuffles, dropouts, flips, crops, colour jitter) is derived from (seed, epoch,
    batch index, slot), so these numbers are the whole random state. `fingerprint` identifies the dataset."""

    seed: int
    epoch: int
    position: int
    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplerState:
        try:
            return cls(seed=int(data["seed"]), epoch=int(data["epoch"]), position=int(data["position"]),
                       fingerprint=str(data["fingerprint"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError("resume", data, f"not a sampler state ({exc})") from None
