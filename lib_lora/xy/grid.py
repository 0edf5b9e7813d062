"""The plot image: cells in a grid with the axis titles and value labels, saved as a PNG carrying the infotext.

Small cells (the embedded model draws 64 px) are enlarged by a whole factor with nearest-neighbour, so labels
stay legible and each cell is still exactly its image, pixel for pixel, at `GridLayout.cell_box(...)`.
Missing cells (a cancelled plot) are drawn grey.
"""
from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

MIN_CELL = 128  # px: smaller images are enlarged by a whole factor up to at least this
PAD = 6
MISSING = (96, 96, 96)


@dataclass(frozen=True)
class GridLayout:
    """Where things are in a grid image (pixels)."""

    cols: int
    rows: int
    cell_w: int
    cell_h: int
    scale: int
    left: int  # width of the row-label column
    top: int  # height of the title and column-label rows
    width: int
    height: int

    def cell_box(self, col: int, row: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of one cell in the grid image."""
        x0 = self.left + col * self.cell_w * self.scale
        y0 = self.top + row * self.cell_h * self.scale
        return x0, y0, x0 + self.cell_w * self.scale, y0 + self.cell_h * self.scale


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:  # older Pillow (the web UI's venv): the fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw, text: str, font) -> tuple[int, int]:
    if not text:
        return 0, 0
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _wrap(draw, text: str, font, width: int) -> str:
    """Wrap `text` to lines that fit `width` pixels (by characters, measured on an average glyph)."""
    avg = max(1, _text_size(draw, "abcdefghij", font)[0] // 10)
    return "\n".join(textwrap.wrap(text, max(4, width // avg), break_long_words=True)) or text


def draw_grid(images: Sequence, cols: int, rows: int, *, x_title: str = "", x_labels: Sequence[str] = (),
              y_title: str = "", y_labels: Sequence[str] = (), title: str = "", font_size: int = 14):
    """A PIL image of `images` (row-major, None for a missing cell) with titles and labels; returns (image, layout).

    Raises:
        ValueError: a number of images or labels that does not fit cols x rows.
    """
    from PIL import Image, ImageDraw

    if len(images) != cols * rows:
        raise ValueError(f"{len(images)} images for a {cols}x{rows} grid")
    if (x_labels and len(x_labels) != cols) or (y_labels and len(y_labels) != rows):
        raise ValueError("one label per column and per row")
    present = [im for im in images if im is not None]
    cell_w, cell_h = present[0].size if present else (MIN_CELL, MIN_CELL)
    scale = max(1, math.ceil(MIN_CELL / max(1, min(cell_w, cell_h))))
    w, h = cell_w * scale, cell_h * scale
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    col_labels = [_wrap(probe, t, font, w - 2 * PAD) for t in x_labels]
    left = 0
    row_labels: list[str] = []
    if y_labels or y_title:
        left = max(w, 160)
        row_labels = [_wrap(probe, t, font, left - 2 * PAD) for t in y_labels]
    line = _text_size(probe, "Ag", font)[1] + PAD
    heads = [t for t in (title, x_title) if t]
    label_h = max((_text_size(probe, t, font)[1] for t in col_labels), default=0)
    top = len(heads) * line + (label_h + 2 * PAD if col_labels else 0) + PAD
    y_head = _wrap(probe, y_title, font, left - 2 * PAD) if y_title else ""
    top = max(top, _text_size(probe, y_head, font)[1] + 2 * PAD if y_head else 0)
    layout = GridLayout(cols, rows, cell_w, cell_h, scale, left, top, left + cols * w, top + rows * h)
    canvas = Image.new("RGB", (layout.width, layout.height), "white")
    draw = ImageDraw.Draw(canvas)
    y = PAD
    for text in heads:
        draw.text((left + PAD, y), text, fill="black", font=font)
        y += line
    if y_head:
        draw.multiline_text((PAD, PAD), y_head, fill="black", font=font)
    for col, text in enumerate(col_labels):
        x0, _, _, _ = layout.cell_box(col, 0)
        tw, _ = _text_size(draw, text, font)
        draw.multiline_text((x0 + (w - tw) // 2, top - label_h - PAD), text, fill="black", font=font, align="center")
    for row, text in enumerate(row_labels):
        _, y0, _, _ = layout.cell_box(0, row)
        _, th = _text_size(draw, text, font)
        draw.multiline_text((PAD, y0 + (h - th) // 2), text, fill="black", font=font)
    for i, image in enumerate(images):
        box = layout.cell_box(i % cols, i // cols)
        if image is None:
            draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=MISSING)
            continue
        cell = image.convert("RGB")
        if cell.size != (cell_w, cell_h):
            cell = cell.resize((cell_w, cell_h))
        canvas.paste(cell.resize((w, h), Image.NEAREST) if scale > 1 else cell, box[:2])
    return canvas, layout
