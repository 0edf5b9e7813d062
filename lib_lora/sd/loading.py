"""One way in for a base model, whatever the user names: "embedded", a diffusers folder or a single file."""
from __future__ import annotations

from pathlib import Path

import torch

from lib_lora.errors import FileFormatError
from lib_lora.sd.model import SDModel
from lib_lora.types import Arch

EMBEDDED = "embedded"


def load_model(source: str | Path | None, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
               arch: Arch | None = None, prediction_type: str | None = None) -> SDModel:
    """"embedded" (or None): the shipped tiny model; a folder: a diffusers save (SD1/SD2/SDXL); a file: a
    single-file checkpoint (`.safetensors`, or a pickle read with `weights_only=True`).

    Raises:
        FileFormatError: naming the path and what is wrong with it.
    """
    if source is None or str(source).strip() == EMBEDDED:
        from lib_lora.sd.embedded import load_embedded

        return load_embedded(device, dtype)
    path = Path(str(source).strip()).expanduser()
    if path.is_dir():
        from lib_lora.sd.diffusers_folder import is_diffusers_folder, load_diffusers_folder

        if (path / "model.json").is_file() and not (path / "model_index.json").is_file():
            from lib_lora.sd.embedded import load_embedded  # our embedded model's own folder, copied elsewhere

            return load_embedded(device, dtype, folder=path)
        if not is_diffusers_folder(path):
            raise FileFormatError(str(path), "a folder, but not a diffusers model (no unet/config.json); give a "
                                             "single-file checkpoint or a diffusers folder")
        return load_diffusers_folder(path, device=device, dtype=dtype, arch=arch, prediction_type=prediction_type)
    if not path.is_file():
        raise FileFormatError(str(path), "model file not found" if not path.exists() else "not a file")
    from lib_lora.sd.checkpoint import load_checkpoint

    return load_checkpoint(path, arch=arch, prediction_type=prediction_type, device=device, dtype=dtype)
