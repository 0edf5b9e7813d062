"""A1111 1.10.1 started once for the tests of this package, on the embedded tiny model exported for it, with
LoRA files for that model in its LoRA folder."""
from __future__ import annotations

import pytest

from tests import hostenv
from tests.host import loras
from tests.host.conftest import Txt2Img, artifact, require_host

PROMPT = "a red circle on a white background"
ALGOS = ("lora", "loha", "lokr", "ia3", "full", "dora")


@pytest.fixture(scope="package")
def a1111(tmp_path_factory):
    require_host("a1111")
    work = tmp_path_factory.mktemp("a1111")
    lora_dir = work / "Lora"
    targets = loras.tiny_targets()
    selected = targets.select(["attn", "te_attn", "te_mlp"])
    for seed, algo in enumerate(ALGOS, 1):
        loras.write_family(lora_dir, f"t_{algo}", selected, algo, seed)
    loras.write_oft(lora_dir, "t_oft", selected, seed=9)
    server = hostenv.HostServer("a1111", hostenv.tiny_checkpoint(), work,
                                extensions={"lora-studio": hostenv.ROOT}, lora_dir=lora_dir)
    server.start()
    try:
        server.wait("/lora-studio/v1/status")
        yield server
    finally:
        server.stop()
        artifact("a1111-server.log").write_text(server.log_text())


@pytest.fixture(scope="package")
def txt2img(a1111):
    return Txt2Img(a1111, steps=20, prompt=PROMPT)
