"""The standalone app in a real browser: start `python -m lib_lora.app` on a tiny checkpoint, type a prompt with a
LoRA and an lbw preset, generate, see the image and its parameters; an unknown LoRA shows a message and the app
keeps working. The screenshot is kept in tests/artifacts/ (not committed).

Needs Debian chromium (`apt-get install chromium`; `./launch.sh test` installs it when it can) and the Python
`playwright` package; never `playwright install`.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.helpers import make_sd_model, write_lora_folder

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]
ARTIFACTS = ROOT / "tests" / "artifacts"
START_TIMEOUT = 120

pytestmark = pytest.mark.browser


def _require_browser() -> None:
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"Debian chromium is not installed ({CHROMIUM} missing): run `apt-get install chromium` "
                    "(./launch.sh test does it when run as root) to run the browser test")
    pytest.importorskip("playwright", reason="the Python `playwright` package is missing (requirements-test.txt)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the app exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 - localhost
                # the app prints its URL once launch() has returned, a moment after the server answers
                if r.status == 200 and f"running at {url}" in log.read_text():
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the app did not answer at {url} within {START_TIMEOUT}s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, tiny_sd1, tiny_sdxl):
    _require_browser()
    from lib_lora.sd.checkpoint_save import save_checkpoint

    work = tmp_path_factory.mktemp("app")
    checkpoint = work / "tiny.safetensors"
    save_checkpoint(make_sd_model(tiny_sd1), checkpoint, dtype=torch.float32, write_yaml=False)
    loras = write_lora_folder(work / "loras", tiny_sd1, tiny_sdxl)
    port, log = _free_port(), work / "app.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "lib_lora.app", "--model", str(checkpoint), "--lora-dir", str(loras),
           "--outputs", str(work / "outputs"), "--port", str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_up(proc, url, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def page(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.goto(app_url)
        yield page
        browser.close()


def _value_is(page, selector: str, expected: str) -> None:
    page.wait_for_function("([sel, want]) => document.querySelector(sel).value === want", arg=[selector, expected],
                           timeout=30_000)


def test_generate_with_a_lora_and_an_lbw_preset(page):
    page.locator("#lora_studio_model_status").first.get_by_text("SD1.x").wait_for(timeout=30_000)
    page.locator("#lora_studio_prompt textarea").fill("a red circle")
    # the block-weight editor writes the lbw= value of a preset, the browser inserts the LoRA with it
    page.get_by_text("Block weights (lbw)").click()
    page.locator("#lora_studio_lbw_preset input").click()
    page.get_by_role("option", name="OUTS", exact=True).click()
    _value_is(page, "#lora_studio_lbw textarea", "OUTS")
    page.locator("#lora_studio_lora_choice input").click()
    page.get_by_role("option", name="style", exact=True).click()
    page.get_by_label("with the block weights below").check()
    page.locator("#lora_studio_lora_insert").click()
    _value_is(page, "#lora_studio_prompt textarea", "a red circle <lora:style:1:lbw=OUTS>")
    page.locator("#lora_studio_seed input").fill("7")
    page.locator("#lora_studio_generate").click()
    page.locator("#lora_studio_gallery img").first.wait_for(timeout=90_000)
    info = page.locator("#lora_studio_infotext textarea")
    page.wait_for_function("el => el.value.includes('Lora hashes')", arg=info.element_handle(), timeout=30_000)
    text = info.input_value()
    assert text.startswith("a red circle <lora:style:1:lbw=OUTS>\n")
    assert "Seed: 7," in text and 'Lora hashes: "style: ' in text
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "app_generate.png"), full_page=True)
    assert (ARTIFACTS / "app_generate.png").stat().st_size > 10_000


def test_unknown_lora_shows_a_message_and_the_app_keeps_running(page):
    page.locator("#lora_studio_prompt textarea").fill("a red circle <lora:stlye:1>")
    page.locator("#lora_studio_generate").click()
    status = page.locator("#lora_studio_status").first
    status.get_by_text("did you mean").wait_for(timeout=60_000)
    assert "'stlye' not found" in status.inner_text()
    page.locator("#lora_studio_prompt textarea").fill("a blue square <lora:mystyle:0.5>")
    page.locator("#lora_studio_generate").click()
    status.get_by_text("seeds").wait_for(timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "app_after_error.png"), full_page=True)


def test_progress_shows_and_interrupt_cancels(page):
    page.locator("#lora_studio_prompt textarea").fill("a red circle <lora:style:1>")
    steps = page.locator("#lora_studio_steps input[type=number]")
    steps.fill("150")
    steps.press("Enter")
    page.locator("#lora_studio_generate").click()
    page.get_by_text(re.compile(r"step \d+/150")).first.wait_for(timeout=30_000)  # gr.Progress while it runs
    page.locator("#lora_studio_interrupt").click()
    status = page.locator("#lora_studio_status").first
    status.get_by_text("cancelled").wait_for(timeout=30_000)
    assert "of 150" in status.inner_text()
