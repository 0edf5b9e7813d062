"""Data sections of the training config: subsets, datasets, caching (sd-scripts' option names).

`SubsetOptions` / `DatasetOptions` hold what may be given at any level of sd-scripts' inheritance (the run's
top level, `[general]`, `[[datasets]]`, `[[datasets.subsets]]`); `SubsetConfig` / `DatasetConfig` are the
resolved values of one subset / dataset (`data.dataset_config` resolves them).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lib_lora.train.coerce import check, check_choice, check_fraction, check_positive

RESIZE_INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "bicubic", "area", "box")


@dataclass(frozen=True, kw_only=True)
class SubsetOptions:
    """Subset options that may be given at any level (top, [general], [[datasets]], [[datasets.subsets]])."""

    num_repeats: int = 1
    caption_extension: str = ".caption"
    class_tokens: str | None = None
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str | None = None
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    alpha_mask: bool = False
    resize_interpolation: str | None = None
    secondary_separator: str | None = None  # joins tags that shuffle and drop as one; becomes caption_separator
    enable_wildcard: bool = False  # `{a|b}` choices and one line of a multi-line caption, picked per use

    def __post_init__(self) -> None:
        check(self.num_repeats >= 1, "num_repeats", self.num_repeats, "must be >= 1")
        check(self.caption_extension.startswith("."), "caption_extension", self.caption_extension,
              "must start with a dot, e.g. '.txt'")
        check(self.caption_separator != "", "caption_separator", self.caption_separator, "must not be empty")
        check(self.secondary_separator != "", "secondary_separator", self.secondary_separator,
              "must not be empty (leave it out to have none)")
        check_positive("keep_tokens", self.keep_tokens, allow_zero=True)
        check_fraction("caption_dropout_rate", self.caption_dropout_rate, inclusive_one=True)
        check_fraction("caption_tag_dropout_rate", self.caption_tag_dropout_rate, inclusive_one=True)
        check_positive("caption_dropout_every_n_epochs", self.caption_dropout_every_n_epochs, allow_zero=True)
        if self.resize_interpolation is not None:
            check_choice("resize_interpolation", self.resize_interpolation, RESIZE_INTERPOLATIONS)

    @property
    def varies_caption(self) -> bool:
        """Whether the caption given to the text encoder can change between uses of an image."""
        return (self.shuffle_caption or self.caption_dropout_rate > 0 or self.caption_tag_dropout_rate > 0
                or self.caption_dropout_every_n_epochs > 0 or self.enable_wildcard)


@dataclass(frozen=True, kw_only=True)
class SubsetConfig(SubsetOptions):
    """One folder of images: where, how often per epoch, and how its captions and pixels are treated.

    A subset with `metadata_file` is a fine-tuning subset (sd-scripts' FineTuningDataset): its images and captions
    are those listed in the JSON, relative keys resolved against `image_dir`. `conditioning_data_dir` is a folder
    of masks for masked loss (one per image, same file stem); the run refuses it without masked_loss.
    """

    image_dir: Path | None = None
    is_reg: bool = False
    metadata_file: Path | None = None
    conditioning_data_dir: Path | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.image_dir is not None or self.metadata_file is not None, "image_dir", None,
              "every subset needs an image_dir (or a metadata_file listing its images)")

    @property
    def name(self) -> str:
        """How sd-scripts names the subset in `ss_tag_frequency` / `ss_dataset_dirs`: the metadata file's name for
        a fine-tuning subset, else the image folder's."""
        return self.metadata_file.name if self.metadata_file is not None else self.image_dir.name  # type: ignore

    @property
    def location(self) -> Path:
        """The file or folder that errors name for this subset."""
        return self.image_dir if self.image_dir is not None else self.metadata_file  # type: ignore[return-value]

    @property
    def has_mask(self) -> bool:
        """Whether its images come with a loss mask (the alpha channel, or a mask folder)."""
        return self.alpha_mask or self.conditioning_data_dir is not None


@dataclass(frozen=True, kw_only=True)
class DatasetOptions:
    """Dataset options that may be given at the top level, in [general] or in [[datasets]]."""

    batch_size: int = 1
    resolution: tuple[int, int] = (512, 512)
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    validation_split: float = 0.0
    validation_seed: int | None = None

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        w, h = self.resolution
        check(w >= 8 and h >= 8, "resolution", self.resolution, "width and height must be at least 8")
        check(self.bucket_reso_steps >= 1, "bucket_reso_steps", self.bucket_reso_steps, "must be >= 1")
        self._round_to_vae_grid()
        w, h = self.resolution
        check_positive("min_bucket_reso", self.min_bucket_reso)
        check(self.max_bucket_reso >= self.min_bucket_reso, "max_bucket_reso", self.max_bucket_reso,
              f"must be >= min_bucket_reso ({self.min_bucket_reso})")
        if self.enable_bucket and not self.bucket_no_upscale:
            check(self.max_bucket_reso >= max(w, h), "max_bucket_reso", self.max_bucket_reso,
                  f"must be >= the largest side of resolution {self.resolution}")
        check_fraction("validation_split", self.validation_split)

    def _round_to_vae_grid(self) -> None:
        """Image sides must be multiples of 8 (the VAE's downscale factor). sd-scripts lets other values through
        for SD1/SD2 (kohya_ss presets carry 512x650 and bucket_reso_steps = 1), and the U-Net then sees latents of
        odd sizes; here they are rounded to the grid, and `adjustments` says so at the start of the run."""
        notes = []
        w, h = self.resolution
        if (w % 8 or h % 8) and not self.enable_bucket:
            rounded = (w - w % 8, h - h % 8)
            notes.append(f"resolution {w},{h}: sides must be multiples of 8, images are made {rounded[0]}x"
                         f"{rounded[1]}")
            object.__setattr__(self, "resolution", rounded)
        steps = self.bucket_reso_steps
        if steps % 8:
            rounded_steps = steps + 8 - steps % 8
            notes.append(f"bucket_reso_steps {steps}: bucket sides must be multiples of 8, using {rounded_steps}")
            object.__setattr__(self, "bucket_reso_steps", rounded_steps)
        # Not a dataclass field (the option table is built from the fields): read through `adjustments`.
        object.__setattr__(self, "_adjustments", tuple(notes))

    @property
    def adjustments(self) -> tuple[str, ...]:
        """What `__post_init__` rounded, for the notes shown at the start of a run."""
        return getattr(self, "_adjustments", ())


@dataclass(frozen=True, kw_only=True)
class DatasetConfig(DatasetOptions):
    """A group of subsets sharing resolution, bucketing and batch size."""

    subsets: tuple[SubsetConfig, ...]

    def __post_init__(self) -> None:
        super().__post_init__()
        check(len(self.subsets) > 0, "subsets", self.subsets, "a dataset needs at least one subset (image_dir)")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the images are (as the user wrote it) and the resolved datasets, plus caching."""

    datasets: tuple[DatasetConfig, ...]
    train_data_dir: Path | None = None
    reg_data_dir: Path | None = None
    dataset_config: Path | None = None
    cache_latents: bool = False
    cache_latents_to_disk: bool = False
    cache_text_encoder_outputs: bool = False
    cache_text_encoder_outputs_to_disk: bool = False
    cache_dir: Path | None = None  # ours: disk caches here instead of next to the images
    vae_batch_size: int = 1  # images per VAE call while caching latents
    in_json: Path | None = None  # fine-tuning metadata for train_data_dir (sd-scripts' fine-tuning method)
    dataset_repeats: int = 1  # num_repeats of subsets that set none (sd-scripts' name for fine-tuning runs)
    debug_dataset: bool = False  # show the dataset (`summary.debug_report`) and exit without training

    def __post_init__(self) -> None:
        check(len(self.datasets) > 0, "datasets", self.datasets,
              "no dataset: give train_data_dir (kohya folders) or dataset_config (a dataset TOML)")
        check(self.vae_batch_size >= 1, "vae_batch_size", self.vae_batch_size, "must be >= 1")
        check(self.dataset_repeats >= 1, "dataset_repeats", self.dataset_repeats, "must be >= 1")
        if self.cache_latents or self.cache_latents_to_disk:
            for sub in self.subsets:
                # sd-scripts refuses the same: a cached latent is one fixed crop with fixed colours.
                check(not (sub.color_aug or sub.random_crop), "cache_latents", True,
                      f"cannot be combined with color_aug or random_crop (subset {sub.location}): the cached "
                      "latent is encoded once, so per-step crops and colour changes cannot apply; turn one off")
        if self.caches_text_encoder_outputs:
            for sub in self.subsets:
                check(not sub.varies_caption, "cache_text_encoder_outputs", True,
                      f"cannot be combined with shuffle_caption, caption/tag dropout or enable_wildcard (subset "
                      f"{sub.location}): the cached encoding is of one fixed caption")

    @property
    def subsets(self) -> tuple[SubsetConfig, ...]:
        return tuple(s for d in self.datasets for s in d.subsets)

    def check_masks(self, masked_loss: bool) -> None:
        """With masked_loss, some subset needs a mask (alpha channel or mask folder). Without it, a
        conditioning_data_dir is ControlNet training data (what sd-scripts makes of it then), which is refused."""
        for sub in self.subsets:
            check(masked_loss or sub.conditioning_data_dir is None, "conditioning_data_dir",
                  str(sub.conditioning_data_dir), "ControlNet conditioning images: training a ControlNet is not "
                  "supported (with masked_loss = true, this folder holds the loss masks)")
        if masked_loss:
            check(any(s.has_mask for s in self.subsets), "masked_loss", True,
                  "needs a mask: alpha_mask = true (the image's alpha channel) or a mask folder "
                  "(conditioning_data_dir) on at least one subset")

    @property
    def caches_latents(self) -> bool:
        return self.cache_latents or self.cache_latents_to_disk

    @property
    def caches_text_encoder_outputs(self) -> bool:
        return self.cache_text_encoder_outputs or self.cache_text_encoder_outputs_to_disk
