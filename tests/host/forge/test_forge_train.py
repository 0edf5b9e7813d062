"""Training on the model Forge has loaded, through the extension's API route (`/lora-studio/v1/train`), on our own
modules over Forge's weights (Forge's U-Net cannot be differentiated through):
- a 20-step run finishes (after a generation left Forge's LoRA merged into the weights), its file is in Forge's
  LoRA list at once and changes the image, and Forge's images without a LoRA, and with the other LoRA, are
  bit-identical to those before training;
- while a run trains, Forge's txt2img is refused with a message; a run stopped half-way (Stop, or Forge's own
  Interrupt) leaves a resumable state, its resumption goes on from there, and the model is intact.
The server's resident memory is sampled while the run trains and kept as an artifact (forge_training_memory.json):
the figure the README quotes."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib_lora.sd.sample_dataset import write_sample_dataset
from lib_lora.train.checkpoint import STATE_FILE
from tests.host.conftest import artifact, diff
from tests.host.conftest import wait_for as host_wait_for
from tests.host.forge.conftest import cli_generate

RUN_TIMEOUT = 1200
OPTIONS = {"resolution": "64", "train_batch_size": 1, "learning_rate": 2e-3, "network_dim": 4, "network_alpha": 4,
           "seed": "3", "caption_extension": ".txt", "save_every_n_steps": "", "sample_prompts": ""}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_sample_dataset(tmp_path_factory.mktemp("forge-train") / "data", "pink")


@pytest.fixture(scope="module")
def baseline(txt2img, dataset):
    """Forge's images before any training: without a LoRA (two prompts), and with one (which leaves its weights
    merged)."""
    plain, _ = txt2img()
    untrained, _ = txt2img(prompt=dataset.prompt)  # the dataset's prompt alone (txt2img's own is replaced)
    assert untrained.std() > 10, "Forge drew a blank image before training"
    with_lora, _ = txt2img("<lora:f_lora:1>")
    return plain, with_lora, untrained


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_for(server, run_id: int, test, what: str, timeout: float = RUN_TIMEOUT, memory: list | None = None) -> dict:
    sample = None if memory is None else (lambda: memory.append(rss_mb(server.proc.pid)))
    return host_wait_for(server, run_id, test, what, timeout, sample)


def test_a_run_trains_the_loaded_model_and_gives_it_back(forge, txt2img, dataset, baseline, tmp_path):
    plain, with_lora, untrained_before = baseline
    before_mb = rss_mb(forge.proc.pid)
    options = {**OPTIONS, "train_data_dir": str(dataset.folder), "output_name": "new", "max_train_steps": 20}
    started = time.monotonic()
    run = forge.post("/lora-studio/v1/train", {"options": options})["run"]
    memory: list[float] = []
    run = wait_for(forge, run["id"], lambda r: r["status"] == "finished", "finished", memory=memory)
    seconds = time.monotonic() - started
    assert run["step"] == 20 and Path(run["result_file"]) == forge.lora_dir / "new.safetensors"
    assert any("f_lora" in line and "taken off" in line for line in run["log"]), run["log"]
    assert "new" in {item["name"] for item in forge.get("/sdapi/v1/loras")}  # listed without a refresh or restart

    after, _ = txt2img()
    assert np.array_equal(after, plain), "Forge's model was not given back exactly"
    assert np.array_equal(txt2img("<lora:f_lora:1>")[0], with_lora)
    trained, _ = txt2img(prompt=f"{dataset.prompt} <lora:new:1>")
    untrained, _ = txt2img(prompt=dataset.prompt)
    for name, image in (("trained", trained), ("untrained", untrained)):
        Image.fromarray(image).save(artifact(f"forge_{name}.png"))
    assert np.array_equal(untrained, untrained_before)
    assert diff(trained, untrained) > 0.5 and trained.std() > 10  # Forge loads the file and it changes the image
    ours = cli_generate(forge.lora_dir, f"{dataset.prompt} <lora:new:1>", tmp_path)  # ... as our engine applies it
    worst = np.abs(trained.astype(int) - ours.astype(int)).max()
    assert diff(trained, ours) < 1.0 and worst <= 8, (diff(trained, ours), worst, diff(trained, untrained))
    figures = {"rss_before_mb": round(before_mb), "rss_peak_during_run_mb": round(max(memory, default=0)),
               "extra_mb": round(max(memory, default=0) - before_mb), "run_peak_memory_mb": run.get("peak_memory_mb"),
               "run_seconds": round(seconds, 1),
               "diff_trained_untrained": diff(trained, untrained)}
    artifact("forge_training_memory.json").write_text(json.dumps({"figures": figures, "run": run}, indent=1))


def test_a_run_stopped_half_way_is_resumable_and_the_model_intact(forge, txt2img, dataset, baseline):
    plain = baseline[0]
    options = {**OPTIONS, "train_data_dir": str(dataset.folder), "output_name": "halfway", "max_train_steps": 2000}
    run = forge.post("/lora-studio/v1/train", {"options": options})["run"]
    wait_for(forge, run["id"], lambda r: r["step"] >= 2, "past step 2")

    refused = txt2img.raw()
    assert refused["images"] == []
    assert "LoRA Studio is training on the loaded model" in refused["info"]

    forge.post("/lora-studio/v1/train/stop")
    stopped = wait_for(forge, run["id"], lambda r: r["status"] == "stopped", "stopped", timeout=300)
    assert stopped["resumable"] and Path(stopped["state_dir"], STATE_FILE).is_file()
    assert 2 <= stopped["step"] < 2000
    assert np.array_equal(txt2img()[0], plain)

    resumed = forge.post("/lora-studio/v1/train", {"resume_run": run["id"]})["run"]
    going = wait_for(forge, resumed["id"], lambda r: r["step"] > stopped["step"], "continuing")
    assert going["seed"] == stopped["seed"]
    forge.post("/sdapi/v1/interrupt")  # Forge's own Interrupt stops a run too
    interrupted = wait_for(forge, resumed["id"], lambda r: r["status"] == "stopped", "stopped", timeout=300)
    assert interrupted["resumable"] and any("Interrupt" in line for line in interrupted["log"])
    assert np.array_equal(txt2img()[0], plain)
