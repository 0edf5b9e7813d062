"""Forge started once for the tests of this package, on the full-size random-weight SD1.5 (Forge recognises only
real SD widths, so it cannot run the tiny model), few sampling steps at 64 px, with SD1.5 LoRA files made here."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import hostenv
from tests.host import loras
from tests.host.conftest import Txt2Img, artifact, require_host

PROMPT = "a red circle on a white background"
STEPS = 4
ALGOS = ("lora", "loha", "lokr")


@pytest.fixture(scope="package")
def forge(tmp_path_factory):
    require_host("forge")
    work = tmp_path_factory.mktemp("forge")
    lora_dir = work / "Lora"
    selected = loras.sd15_targets().select(["attn", "te_attn", "te_mlp"])
    for seed, algo in enumerate(ALGOS, 1):
        loras.write_family(lora_dir, f"f_{algo}", selected, algo, seed, dtype=torch.float16)
    server = hostenv.HostServer("forge", hostenv.random_sd15(), work, extensions={"lora-studio": hostenv.ROOT},
                                lora_dir=lora_dir)
    server.start()
    try:
        server.wait("/lora-studio/v1/status", timeout=600)
        yield server
    finally:
        server.stop()
        artifact("forge-server.log").write_text(server.log_text())


@pytest.fixture(scope="package")
def txt2img(forge):
    return Txt2Img(forge, steps=STEPS, prompt=PROMPT)


def cli_generate(lora_dir: Path, prompt: str, out_dir: Path) -> np.ndarray:
    """`python -m lib_lora generate` on the same checkpoint, LoRA folder and settings as `txt2img`."""
    from PIL import Image

    out = out_dir / f"cli-{abs(hash(prompt))}.png"
    command = [sys.executable, "-m", "lib_lora", "generate", "--model", str(hostenv.random_sd15()),
               "--lora-dir", str(lora_dir), "--prompt", prompt, "--seed", "1234", "--steps", str(STEPS), "--cfg", "7",
               "--sampler", "Euler a", "--width", "64", "--height", "64", "--outputs", str(out_dir / "outputs"),
               "--out", str(out), "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=hostenv.ROOT, check=False,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return np.asarray(Image.open(out).convert("RGB"))
