"""Forge started once for the tests of this package, on the full-size random-weight SD1.5 (Forge recognises only
real SD widths, so it cannot run the tiny model), few sampling steps at 64 px, with SD1.5 LoRA files made here."""
from __future__ import annotations

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
