"""Mask folders for masked loss: `conditioning_data_dir` of a subset when `masked_loss` is on.

As sd-scripts (its ControlNet dataset, which `train_network.py --masked_loss` uses for masks): each image has one
mask file in the folder with the same file stem (`img01.png` -> `masks/img01.png` or `.jpg`, ...), of the image's
size; the loss weight is the mask's red channel (255 = full weight, 0 = ignored). The mask is resized, cropped and
flipped with its image. Masks that are missing, unreadable or of another size are problems reported before
training; masks without an image are reported as a warning (sd-scripts refuses them; they are harmless).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lib_lora.errors import FileFormatError
from lib_lora.train.data.folders import list_images
from lib_lora.train.data.images import probe_image
from lib_lora.train.data.records import Problem, Size


@dataclass
class MaskFolder:
    """The masks of one subset, by file stem, and what is wrong with the folder itself."""

    folder: Path
    by_stem: dict[str, Path] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @classmethod
    def scan(cls, folder: Path) -> MaskFolder:
        found = cls(folder)
        if not folder.is_dir():
            found.problems.append(Problem(str(folder), "conditioning_data_dir (mask folder) not found"))
            return found
        for path in list_images(folder):
            if path.stem in found.by_stem:
                found.problems.append(Problem(str(path), f"two masks for one image stem: also "
                                                         f"{found.by_stem[path.stem].name}"))
            else:
                found.by_stem[path.stem] = path
        return found

    def mask_for(self, image: Path, image_size: Size) -> tuple[Path | None, Problem | None]:
        """The mask of an image, or the problem with it (missing, unreadable, other size)."""
        mask = self.by_stem.get(image.stem)
        if mask is None:
            return None, Problem(str(image), f"no mask named '{image.stem}.*' in {self.folder}")
        try:
            size = probe_image(mask)
        except FileFormatError as exc:
            return None, Problem(exc.path, exc.reason)
        if size != image_size:
            return None, Problem(str(mask), f"mask is {size[0]}x{size[1]}, its image {image.name} is "
                                            f"{image_size[0]}x{image_size[1]}: a mask must have its image's size")
        return mask, None

    def unused(self, images: list[Path]) -> list[Path]:
        """Masks whose stem matches none of `images`."""
        stems = {p.stem for p in images}
        return [m for stem, m in sorted(self.by_stem.items()) if stem not in stems]
