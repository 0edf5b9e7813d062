"""Image loading and the per-use pixel pipeline: EXIF orientation, RGB (+ alpha mask), resize, crop, colour
jitter, flip, tensor in [-1, 1]. Every random choice comes from the `random.Random` passed in.
"""
from __future__ import annotations

import colorsys
import random
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from lib_lora.errors import FileFormatError
from lib_lora.train.data.modes import alpha_channel, red_channel, to_rgb
from lib_lora.train.data.records import Placement, Size

# sd-scripts resizes with OpenCV: INTER_AREA when shrinking, LANCZOS4 when enlarging. PIL's BOX is area averaging.
INTERPOLATIONS = {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST,
                  "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                  "area": Image.Resampling.BOX, "box": Image.Resampling.BOX}
PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)
HUE_SHIFT_LIMIT = 8 / 180  # sd-scripts shifts OpenCV hue (0..180) by up to 8
_EXIF_ORIENTATION = 0x0112


def probe_image(path: Path) -> Size:
    """(width, height) after EXIF orientation, after checking that the file decodes completely.

    PNG is checked by its chunk checksums (`verify`), JPEG by a reduced-size decode (fast, still reads every
    byte), other formats by a full decode.

    Raises:
        FileFormatError: not an image, truncated or corrupt.
    """
    try:
        with Image.open(path) as img:
            if img.format == "PNG":
                img.verify()  # must come first on a freshly opened file
        with Image.open(path) as img:
            width, height = img.size
            if img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                width, height = height, width
            if img.format != "PNG":
                if img.format == "JPEG":
                    img.draft("RGB", (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
                img.load()
    except PIL_ERRORS as exc:
        raise FileFormatError(str(path), f"unreadable image ({type(exc).__name__}: {exc})") from None
    if width < 1 or height < 1:
        raise FileFormatError(str(path), f"image has no pixels ({width}x{height})")
    return width, height


@dataclass
class LoadedImage:
    """An image in RGB, and its alpha channel as a mode "L" image when a mask was asked for."""

    rgb: Image.Image
    alpha: Image.Image | None


def load_image(path: Path, *, keep_alpha: bool = False, mask: Path | None = None) -> LoadedImage:
    """Load, apply EXIF orientation, convert to 8-bit RGB (any PIL mode, see `modes`). With keep_alpha, the alpha
    channel (or all-opaque); with `mask`, that file's red channel instead (a mask folder for masked loss)."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            alpha = alpha_channel(img) if keep_alpha and mask is None else None
            if keep_alpha and mask is None and alpha is None:
                alpha = Image.new("L", img.size, 255)
            rgb = to_rgb(img)
    except PIL_ERRORS as exc:
        raise FileFormatError(str(path), f"unreadable image ({type(exc).__name__}: {exc})") from None
    if mask is not None:
        alpha = load_mask(mask)
        if alpha.size != rgb.size:
            raise FileFormatError(str(mask), f"mask is {alpha.size[0]}x{alpha.size[1]}, its image {path.name} is "
                                  f"{rgb.size[0]}x{rgb.size[1]}")
    return LoadedImage(rgb, alpha)


def load_mask(path: Path) -> Image.Image:
    """A mask file as mode "L": EXIF orientation applied, then the red channel of its RGB (sd-scripts reads a
    conditioning image's red channel as the loss weight; 255 = full weight, 0 = ignored)."""
    try:
        with Image.open(path) as img:
            return red_channel(ImageOps.exif_transpose(img))
    except PIL_ERRORS as exc:
        raise FileFormatError(str(path), f"unreadable mask ({type(exc).__name__}: {exc})") from None


def crop_ltrb(bucket: Size, original: Size) -> tuple[int, int, int, int]:
    """sd-scripts' crop box for SDXL conditioning: the image fitted inside the bucket, centred (its convention,
    independent of the actual crop)."""
    bucket_ar, image_ar = bucket[0] / bucket[1], original[0] / original[1]
    if bucket_ar > image_ar:
        width, height = bucket[1] * image_ar, bucket[1]
    else:
        width, height = bucket[0], bucket[0] / image_ar
    left, top = (bucket[0] - width) // 2, (bucket[1] - height) // 2
    return int(left), int(top), int(left + width), int(top + height)


def resize_and_crop(image: LoadedImage, placement: Placement, *, random_crop: bool, rng: random.Random,
                    interpolation: str | None = None) -> LoadedImage:
    """Resize to `placement.resized_size`, then crop to the bucket (centred, or at a random offset)."""
    (w, h), (bw, bh) = placement.resized_size, placement.bucket_reso
    if image.rgb.size != (w, h):
        enlarging = w * h > image.rgb.size[0] * image.rgb.size[1]
        method = INTERPOLATIONS[interpolation] if interpolation else (
            Image.Resampling.LANCZOS if enlarging else Image.Resampling.BOX)
        image = LoadedImage(image.rgb.resize((w, h), method),
                            image.alpha.resize((w, h), method) if image.alpha is not None else None)
    left = rng.randint(0, w - bw) if random_crop and w > bw else max(0, (w - bw) // 2)
    top = rng.randint(0, h - bh) if random_crop and h > bh else max(0, (h - bh) // 2)
    box = (left, top, left + bw, top + bh)
    return LoadedImage(image.rgb.crop(box), image.alpha.crop(box) if image.alpha is not None else None)


def color_jitter(rgb: Image.Image, rng: random.Random) -> Image.Image:
    """sd-scripts' colour augmentation: a third of the time, half hue shift (up to 8/180 of the wheel), half gamma
    in [0.95, 1.05]."""
    if rng.random() > 0.33:
        return rgb
    if rng.random() > 0.5:
        shift = rng.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT)
        hsv = np.asarray(rgb.convert("HSV"), dtype=np.int16)
        hsv[..., 0] = (hsv[..., 0] + round(shift * 256)) % 256
        return Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")
    gamma = rng.uniform(0.95, 1.05)
    pixels = np.asarray(rgb, dtype=np.float32) / 255.0
    return Image.fromarray(np.clip(pixels ** gamma * 255.0 + 0.5, 0, 255).astype(np.uint8), "RGB")


def hue_of(rgb: tuple[int, int, int]) -> float:
    """Hue in [0, 1) of one RGB colour (for tests and reports)."""
    return colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0]


def to_tensor(rgb: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1]."""
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32).copy())
    return pixels.permute(2, 0, 1) / 127.5 - 1.0


def mask_to_tensor(alpha: Image.Image) -> torch.Tensor:
    """(H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(alpha, dtype=np.float32).copy()) / 255.0


@dataclass
class PreparedImage:
    """One use of an image: pixels for the VAE, optional mask, and sd-scripts' SDXL size conditioning."""

    pixels: torch.Tensor  # (3, H, W) in [-1, 1]
    alpha: torch.Tensor | None  # (H, W) in [0, 1]
    original_size: Size
    crop_ltrb: tuple[int, int, int, int]


@dataclass(frozen=True)
class Augment:
    """The per-use choices for one image (decided by the caller from its rng)."""

    flip: bool = False
    random_crop: bool = False
    color_aug: bool = False


def prepare_image(path: Path, placement: Placement, augment: Augment, rng: random.Random, *,
                  keep_alpha: bool = False, interpolation: str | None = None,
                  mask: Path | None = None) -> PreparedImage:
    """Load and transform one image for one use: resize/crop to its bucket, colour jitter, flip, to tensors.
    The mask (alpha channel or mask file) is resized, cropped and flipped with the pixels."""
    image = load_image(path, keep_alpha=keep_alpha, mask=mask)
    original = image.rgb.size
    image = resize_and_crop(image, placement, random_crop=augment.random_crop, rng=rng, interpolation=interpolation)
    rgb = color_jitter(image.rgb, rng) if augment.color_aug else image.rgb
    alpha = image.alpha
    if augment.flip:
        rgb = ImageOps.mirror(rgb)
        alpha = ImageOps.mirror(alpha) if alpha is not None else None
    return PreparedImage(to_tensor(rgb), mask_to_tensor(alpha) if alpha is not None else None, original,
                         crop_ltrb(placement.bucket_reso, original))
