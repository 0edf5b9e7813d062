"""The LoRA Studio tab inside A1111 and training on the model A1111 has loaded (`shared.sd_model`), from the tab
and through the extension's API route (`/lora-studio/v1/train`):
- the tab is in the page with the host's model and LoRA folder as defaults, and a run started from it finishes
  (screenshots of the Training tab inside the host kept in tests/artifacts/);
- a 20-step run finishes on the loaded model (after a generation left the built-in LoRA's merged weights on it),
  its file is in the host's LoRA list at once and changes the image, and the host's images without a LoRA, and
  with the other LoRA, are bit-identical to those before training;
- while a run trains, the host's txt2img is refused with a message; a run stopped half-way leaves a resumable
  state (its resumption continues from the step it stopped at) and an intact model; the host's own Interrupt
  stops a run too, and the host's progress report (/sdapi/v1/progress) follows the run while it lasts."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lib_lora.sd.sample_dataset import write_sample_dataset
from lib_lora.train.checkpoint import STATE_FILE
from tests.host.conftest import artifact, diff
from tests.host.conftest import wait_for as host_wait_for

RUN_TIMEOUT = 900
OPTIONS = {"resolution": "64", "train_batch_size": 2, "learning_rate": 1e-3, "network_dim": 4, "network_alpha": 4,
           "seed": "3", "caption_extension": ".txt", "save_every_n_steps": "", "sample_prompts": ""}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_sample_dataset(tmp_path_factory.mktemp("a1111-train") / "data", "pink")


@pytest.fixture(scope="module")
def baseline(txt2img):
    """The host's images before any training: without a LoRA, and with one (which leaves its weights merged)."""
    plain, _ = txt2img()
    with_lora, _ = txt2img("<lora:t_lora:1>")
    return plain, with_lora


def wait_for(server, run_id: int, test, what: str, timeout: float = RUN_TIMEOUT) -> dict:
    return host_wait_for(server, run_id, test, what, timeout)


def test_the_tab_is_in_the_page_and_trains(a1111, dataset):
    from tests.browser.appserver import browser_page, require_browser, screenshot
    from tests.browser.test_studio_browser import fill, wait_progress

    require_browser()
    with browser_page(a1111.url, height=1400) as page:
        page.wait_for_selector("#tab_lora_studio_tab", state="attached", timeout=120_000)
        page.locator("#tabs > .tab-nav button", has_text="LoRA Studio").click()
        page.locator("#lora_studio_tabs button", has_text="Training").first.click()
        page.wait_for_selector("#lora_studio_train", state="visible", timeout=60_000)
        assert page.locator("#lora_studio_tabs button", has_text="X/Y plot").count() == 1
        assert page.locator("#lora_studio_tabs button", has_text="LoRA tools").count() == 1
        # the host's model and LoRA folder are the form's defaults
        assert page.locator("#lora_studio_opt_output_dir textarea").input_value() == str(a1111.lora_dir)
        shot = screenshot(page, "a1111_training_tab.png")
        fill(page, "train_data_dir", str(dataset.folder))
        fill(page, "output_name", "fromtab")
        fill(page, "caption_extension", ".txt")
        fill(page, "seed", "4")
        fill(page, "max_train_steps", "6")
        page.locator("#lora_studio_train_start").click()
        page.locator("#lora_studio_train_status").get_by_text("queued").wait_for(timeout=60_000)
        wait_progress(page, "p.status === 'finished' && p.step === 6", timeout=RUN_TIMEOUT * 1000)
        page.locator("#lora_studio_train_result").get_by_text("<lora:fromtab:1>").wait_for(timeout=60_000)
        assert "the web UI's Lora tab" in page.locator("#lora_studio_train_result").first.inner_text()
        screenshot(page, "a1111_training_done.png")
    assert shot.stat().st_size > 10_000
    assert "fromtab" in {item["name"] for item in a1111.get("/sdapi/v1/loras")}


def test_a_run_trains_the_loaded_model_and_gives_it_back(a1111, txt2img, dataset, baseline):
    plain, with_lora = baseline
    prompts = dataset.folder.parent / "prompts.txt"
    prompts.write_text(f"{dataset.prompt} --w 64 --h 64 --s 8 --d 5\n")
    options = {**OPTIONS, "train_data_dir": str(dataset.folder), "output_name": "new", "max_train_steps": 20,
               "sample_prompts": str(prompts), "sample_every_n_steps": "10"}
    run = a1111.post("/lora-studio/v1/train", {"options": options})["run"]
    run = wait_for(a1111, run["id"], lambda r: r["status"] == "finished", "finished")
    assert run["step"] == 20 and Path(run["result_file"]) == a1111.lora_dir / "new.safetensors"
    assert any("t_lora" in line and "taken off" in line for line in run["log"]), run["log"]
    assert len(run["samples"]) == 2 and all(Path(p).is_file() for p in run["samples"])  # drawn by the host
    assert "new" in {item["name"] for item in a1111.get("/sdapi/v1/loras")}  # listed without a refresh or restart

    after, _ = txt2img()
    assert np.array_equal(after, plain), "the model was not given back exactly"
    lora_after, _ = txt2img("<lora:t_lora:1>")
    assert np.array_equal(lora_after, with_lora)
    trained, info = txt2img(f"{dataset.prompt} <lora:new:1>")
    untrained, _ = txt2img(dataset.prompt)
    assert diff(trained, untrained) > 0.5
    assert "new: " in info["infotexts"][0]  # Lora hashes: the host loaded our file
    status = a1111.get("/lora-studio/v1/status")
    artifact("a1111_trained_lora.json").write_text(json.dumps({"run": run, "diff": diff(trained, untrained),
                                                               "status_after": status}, indent=1))


def test_a_run_stopped_half_way_is_resumable_and_the_model_intact(a1111, txt2img, dataset, baseline):
    plain, _ = baseline
    options = {**OPTIONS, "train_data_dir": str(dataset.folder), "output_name": "halfway", "max_train_steps": 2000}
    run = a1111.post("/lora-studio/v1/train", {"options": options})["run"]
    at = wait_for(a1111, run["id"], lambda r: r["step"] >= 3, "past step 3")
    progress = a1111.get("/sdapi/v1/progress?skip_current_image=true")  # the host's own progress report
    assert progress["state"]["job"] == "LoRA Studio training", progress
    assert progress["state"]["sampling_steps"] == 2000 and progress["state"]["sampling_step"] >= at["step"]
    assert 0 < progress["progress"] < 0.5 and progress["eta_relative"] > 0
    assert progress["textinfo"].startswith("LoRA Studio training: step ")

    refused = txt2img.raw()
    assert refused["images"] == []
    assert "LoRA Studio is training on the loaded model" in refused["info"]

    a1111.post("/lora-studio/v1/train/stop")
    stopped = wait_for(a1111, run["id"], lambda r: r["status"] == "stopped", "stopped", timeout=300)
    assert stopped["resumable"] and Path(stopped["state_dir"], STATE_FILE).is_file()
    assert 3 <= stopped["step"] < 2000
    assert a1111.get("/sdapi/v1/progress")["state"]["job"] != "LoRA Studio training"
    after, _ = txt2img()
    assert np.array_equal(after, plain)

    resumed = a1111.post("/lora-studio/v1/train", {"resume_run": run["id"]})["run"]
    going = wait_for(a1111, resumed["id"], lambda r: r["step"] > stopped["step"], "continuing")
    assert going["seed"] == stopped["seed"]
    a1111.post("/sdapi/v1/interrupt")  # the web UI's own Interrupt stops a run too
    interrupted = wait_for(a1111, resumed["id"], lambda r: r["status"] == "stopped", "stopped", timeout=300)
    assert interrupted["resumable"] and any("Interrupt" in line for line in interrupted["log"])
    again, _ = txt2img()
    assert np.array_equal(again, plain)
