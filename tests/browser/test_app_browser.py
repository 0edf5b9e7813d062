"""The standalone app in a real browser: start `python -m lib_lora.app` on a tiny checkpoint, type a prompt with a
LoRA and an lbw preset, generate, see the image and its parameters; an unknown LoRA shows a message and the app
keeps working. The screenshot is kept in tests/artifacts/ (not committed).

Needs Debian chromium (`apt-get install chromium`; `./launch.sh test` installs it when it can) and the Python
`playwright` package; never `playwright install`.
"""
from __future__ import annotations

import re

import pytest
import torch

from tests.browser.appserver import ARTIFACTS, browser_page, require_browser, running_app, value_is
from tests.helpers import make_sd_model, write_lora_folder

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, tiny_sd1, tiny_sdxl):
    require_browser()
    from lib_lora.sd.checkpoint_save import save_checkpoint

    work = tmp_path_factory.mktemp("app")
    checkpoint = work / "tiny.safetensors"
    save_checkpoint(make_sd_model(tiny_sd1), checkpoint, dtype=torch.float32, write_yaml=False)
    loras = write_lora_folder(work / "loras", tiny_sd1, tiny_sdxl)
    args = ["--model", str(checkpoint), "--lora-dir", str(loras), "--outputs", str(work / "outputs")]
    with running_app(args, work / "app.log") as url:
        yield url


@pytest.fixture(scope="module")
def page(app_url):
    with browser_page(app_url) as page:
        yield page


_value_is = value_is


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
