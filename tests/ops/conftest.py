"""Fixtures of the LoRA-tool tests."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tools_dir(real_lora_dir) -> Path:
    """sd-scripts' own tool outputs (../shared/fixtures/sd-scripts-tools, README there)."""
    folder = real_lora_dir.parent / "sd-scripts-tools"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found (CI has ../shared beside the checkout)")
    return folder


def _write_checkpoint(components, arch: str, folder: Path) -> Path:
    import torch

    from lib_lora.sd.checkpoint_save import save_checkpoint
    from tests.helpers import make_sd_model

    path = folder / f"tiny-{arch}.safetensors"
    save_checkpoint(make_sd_model(components, arch), path, dtype=torch.float32, write_yaml=False)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, tiny_sd1, tiny_sd2, tiny_sdxl) -> dict[str, Path]:
    """fp32 single-file checkpoints of the tiny SD1/SD2/SDXL models."""
    folder = tmp_path_factory.mktemp("checkpoints")
    return {arch: _write_checkpoint(c, arch, folder)
            for arch, c in (("sd1", tiny_sd1), ("sd2", tiny_sd2), ("sdxl", tiny_sdxl))}


@pytest.fixture(scope="session")
def tiny_sd1_checkpoint(tmp_path_factory, tiny_sd1) -> Path:
    return _write_checkpoint(tiny_sd1, "sd1", tmp_path_factory.mktemp("sd1"))
