"""Shared test fixtures: tiny models built in code, paths to the shared real-file fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Tiny models: one thread is as fast as two and never oversubscribes the cores when processes run side by side.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REAL_LORA = SHARED / "fixtures" / "real-lora"


@pytest.fixture(scope="session")
def real_lora_dir() -> Path:
    if not REAL_LORA.is_dir():
        pytest.skip(f"shared fixtures not found at {REAL_LORA} (CI always has ../shared beside the checkout)")
    return REAL_LORA


@pytest.fixture(scope="session")
def tiny_sd1():
    from lib_lora.sd.tiny import tiny_components

    return tiny_components("sd1", seed=0)


@pytest.fixture(scope="session")
def tiny_sd2():
    from lib_lora.sd.tiny import tiny_components

    return tiny_components("sd2", seed=1)


@pytest.fixture(scope="session")
def tiny_sdxl():
    from lib_lora.sd.tiny import tiny_components

    return tiny_components("sdxl", seed=2)
