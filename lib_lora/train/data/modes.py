"""Any PIL colour mode to 8-bit RGB and its alpha channel, scaling where PIL's own conversion clips.

PIL's `convert("RGB")` clips high-bit-depth modes instead of scaling them: a 16-bit grayscale PNG (mode "I;16",
or "I" with older Pillow) comes out almost all white. Here:
- "I;16", "I;16L", "I;16B", "I;16N" and "I" are 16-bit data (PNG and TIFF open as these): scaled by 255/65535;
- "F" (32-bit float) is read as 0..1 when no value exceeds 1, else as 0..255 (clipped);
- "La" / "RGBa" (premultiplied alpha) are un-premultiplied through PIL;
- palette images ("P", "PA") and any mode with a `transparency` entry (a PNG tRNS colour key) keep their
  transparency as alpha, as PIL's RGBA conversion (sd-scripts' `convert("RGBA")`) gives it;
- every other mode ("1", "L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV") goes through PIL.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
_PREMULTIPLIED = {"La": "LA", "RGBa": "RGBA"}


def _gray_8bit(img: Image.Image) -> np.ndarray:
    """(H, W) uint8 of a 16-bit or float grayscale image."""
    values = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
        scale = 255.0 if values.size == 0 or values.max() <= 1.0 else 1.0
    else:
        scale = 255.0 / 65535.0
    return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)


def has_alpha(img: Image.Image) -> bool:
    """Whether the image carries transparency (an alpha channel, or a transparent palette entry / colour key)."""
    return img.mode in ALPHA_MODES or "transparency" in img.info


def to_rgb(img: Image.Image) -> Image.Image:
    """The image in mode "RGB", 8 bits per channel (colour values of transparent pixels kept, as sd-scripts)."""
    if img.mode in SIXTEEN_BIT_MODES or img.mode == "F":
        return Image.fromarray(_gray_8bit(img), "L").convert("RGB")
    if img.mode in _PREMULTIPLIED:
        return img.convert(_PREMULTIPLIED[img.mode]).convert("RGB")
    if img.mode in ("P", "PA") and has_alpha(img):
        return img.convert("RGBA").convert("RGB")  # PIL warns on palette transparency converted straight to RGB
    return img if img.mode == "RGB" else img.convert("RGB")


def alpha_channel(img: Image.Image) -> Image.Image | None:
    """The alpha channel as a mode "L" image (255 = opaque), or None when the image has no transparency."""
    if not has_alpha(img):
        return None
    if img.mode in ("RGBA", "LA"):
        return img.getchannel("A")
    if img.mode in _PREMULTIPLIED:
        return img.convert(_PREMULTIPLIED[img.mode]).getchannel("A")
    if img.mode in SIXTEEN_BIT_MODES:  # a tRNS grey key; PIL's RGBA conversion ignores it for these modes
        key = img.info["transparency"]
        return Image.fromarray(np.where(np.asarray(img) == key, 0, 255).astype(np.uint8), "L")
    return img.convert("RGBA").getchannel("A")


def red_channel(img: Image.Image) -> Image.Image:
    """The red channel of the image in RGB, as mode "L": how sd-scripts reads a mask (conditioning image)."""
    return to_rgb(img).getchannel("R")
