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
