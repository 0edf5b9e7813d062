"""The Training, X/Y plot and LoRA tools tabs in a real browser, on the embedded model:

1. fill the training form for a kohya folder made here, preview the dataset, start a 20-step run, see the progress
   bar, the loss chart and a sample image update, stop, resume, reach the end; the new file is in the Generate
   tab's LoRA browser and its metadata shows in the viewer;
2. a 3x3 TE-strength x U-Net-strength grid with that LoRA: the saved PNG has 9 cells and labels, and its (0,0)
   cell equals the image the Generate tab makes without the LoRA;
3. reload the page during a run: the run is still shown and can be stopped.

Screenshots go to tests/artifacts/ (not committed). Needs Debian chromium and the Python `playwright` package.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.browser.appserver import browser_page, require_browser, running_app, screenshot

pytestmark = pytest.mark.browser
RUN_TIMEOUT = 240_000  # ms: a 20-step run of the embedded model on a loaded 2-core machine
TRIGGER = "a sks circle on a blue background"


def write_kohya_folder(root: Path) -> Path:
    """`5_sks`: six pink circles captioned with the trigger word (the embedded model's own world)."""
    from lib_lora.sd.shapes import COLOURS, Combo, Placement, render

    folder = root / "5_sks"
    folder.mkdir(parents=True)
    COLOURS["_pink"] = (255, 150, 195)
    try:
        for i, bg in enumerate(["blue", "black", "green"] * 2):
            Image.fromarray(render(Combo("circle", "_pink", bg), Placement(32.0, 32.0, 30.0 + i))).save(
                folder / f"{i}.png")
            (folder / f"{i}.txt").write_text(f"a sks circle on a {bg} background", encoding="utf-8")
    finally:
        del COLOURS["_pink"]
    return root


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    require_browser()
    work = tmp_path_factory.mktemp("studio")
    write_kohya_folder(work / "data")
    return work


@pytest.fixture(scope="module")
def page(work):
    args = ["--model", "embedded", "--lora-dir", str(work / "loras"), "--outputs", str(work / "outputs")]
    with running_app(args, work / "app.log") as url, browser_page(url, height=1400) as page:
        yield page


def field(page, name: str):
    """The input element of a training-form field."""
    return page.locator(f"#lora_studio_opt_{name.replace('.', '_')}").locator("textarea, input").first


def fill(page, name: str, value: str) -> None:
    box = field(page, name)
    box.fill(value)
    box.press("Tab")  # gradio reads a field when it changes


def progress(page) -> dict:
    return page.locator("#lora_studio_train_progress .lora-studio-progress").first.evaluate(
        "el => ({status: el.dataset.status, step: Number(el.dataset.step), text: el.innerText})")


def wait_progress(page, test: str, timeout: int = RUN_TIMEOUT) -> None:
    """Wait until the live progress bar satisfies a JS condition on `p` ({status, step})."""
    page.wait_for_function(
        "cond => { const el = document.querySelector('#lora_studio_train_progress .lora-studio-progress');"
        " if (!el) return false; const p = {status: el.dataset.status, step: Number(el.dataset.step)};"
        " return Function('p', 'return ' + cond)(p); }", arg=test, timeout=timeout)


def open_tab(page, label: str) -> None:
    page.get_by_role("tab", name=label).click()


def choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=option, exact=True).click()


def test_train_preview_start_stop_resume_and_use_the_file(page, work):
    open_tab(page, "Training")
    fill(page, "train_data_dir", str(work / "data"))
    fill(page, "output_name", "browser")
    fill(page, "caption_extension", ".txt")
    fill(page, "seed", "5")
    fill(page, "max_train_steps", "20")
    fill(page, "train_batch_size", "6")  # all six images per step: a run slow enough to stop half-way
    page.get_by_text("Optimizer & schedule", exact=True).click()
    fill(page, "learning_rate", "0.001")
    page.get_by_text("Network", exact=True).click()
    fill(page, "network_dim", "4")
    fill(page, "network_alpha", "4")
    page.get_by_text("Sampling & saving", exact=True).click()
    fill(page, "sample_every_n_steps", "4")
    page.locator("#lora_studio_train_prompts textarea").fill(f"{TRIGGER} --s 10 --d 1")
    page.locator("#lora_studio_train_preview_button").click()
    preview = page.locator("#lora_studio_train_preview")
    preview.get_by_text("Buckets").wait_for(timeout=60_000)
    assert "5_sks" in preview.inner_text() and "30 samples per epoch" in preview.inner_text()
    screenshot(page, "studio_train_preview.png")

    page.locator("#lora_studio_train_start").click()
    page.locator("#lora_studio_train_status").get_by_text("queued").wait_for(timeout=30_000)
    wait_progress(page, "p.status === 'running' && p.step >= 2")
    page.locator("#lora_studio_train_stop").click()
    wait_progress(page, "p.status === 'stopped'")
    stopped = progress(page)
    assert stopped["step"] < 20, "the run was stopped before its end"
    page.locator("#lora_studio_train_result").get_by_text("press Resume").wait_for(timeout=30_000)

    page.locator("#lora_studio_train_resume").click()
    wait_progress(page, f"p.status === 'running' && p.step > {stopped['step']}")  # it goes on from there
    page.locator("#lora_studio_train_chart svg polyline.smoothed").wait_for(timeout=30_000)
    page.locator("#lora_studio_train_samples img").first.wait_for(timeout=RUN_TIMEOUT)
    screenshot(page, "studio_train_running.png")
    wait_progress(page, "p.status === 'finished' && p.step === 20")
    result = page.locator("#lora_studio_train_result")
    result.get_by_text("<lora:browser:1>").wait_for(timeout=30_000)
    assert "short hash" in result.inner_text()
    screenshot(page, "studio_train_done.png")

    open_tab(page, "Generate")
    page.locator("#lora_studio_lora_refresh").click()
    choose(page, "lora_studio_lora_choice", "browser")
    page.get_by_text("trigger words:").first.wait_for(timeout=30_000)

    open_tab(page, "LoRA tools")
    page.locator("#lora_studio_meta_refresh").click()
    choose(page, "lora_studio_meta_choice", "browser")
    details = page.locator("#lora_studio_meta_details")
    details.get_by_text("blocks touched").wait_for(timeout=30_000)
    text = details.inner_text()
    assert "ss_network_dim" in text and "sks" in text and "short" in text
    screenshot(page, "studio_tools.png")


def _grid_cell(path: Path, col: int, row: int) -> np.ndarray:
    """Cell (col, row) of a saved 3x3 grid of 64 px images, found by re-laying out the same labels."""
    from lib_lora.xy.grid import draw_grid

    with Image.open(path) as im:
        grid = im.convert("RGB")
        info = im.info["parameters"]
    labels = ["0", "0.5", "1"]
    _, layout = draw_grid([Image.new("RGB", (64, 64))] * 9, 3, 3, x_title="LoRA TE strength", x_labels=labels,
                          y_title="LoRA U-Net strength", y_labels=labels)
    assert grid.size == (layout.width, layout.height), "9 cells with their labels"
    a = np.asarray(grid)
    assert (a[: layout.top, layout.left:] < 100).any() and (a[layout.top:, : layout.left] < 100).any(), "labels"
    assert 'X: LoRA TE strength: 0, 0.5, 1; Y: LoRA U-Net strength: 0, 0.5, 1' in info
    cell = grid.crop(layout.cell_box(col, row)).resize((64, 64), Image.NEAREST)
    return np.asarray(cell)


def test_te_by_unet_grid_and_its_zero_cell(page, work):
    open_tab(page, "Generate")
    page.locator("#lora_studio_prompt textarea").fill(TRIGGER)
    page.locator("#lora_studio_seed input").fill("7")
    page.locator("#lora_studio_generate").click()
    page.locator("#lora_studio_status").first.get_by_text("seeds 7").wait_for(timeout=120_000)
    plain = sorted((work / "outputs" / "txt2img-images").rglob("*-7.png"))[-1]

    open_tab(page, "X/Y plot")
    page.locator("#lora_studio_xy_refresh").click()
    choose(page, "lora_studio_xy_lora", "browser")
    page.locator("#lora_studio_xy_prompt textarea").fill(TRIGGER)
    page.locator("#lora_studio_xy_seed input").fill("7")
    page.locator("#lora_studio_xy_estimate").click()
    page.locator("#lora_studio_xy_status").get_by_text("9 images (3 x 3)").wait_for(timeout=60_000)
    page.locator("#lora_studio_xy_run").click()
    page.locator("#lora_studio_xy_status").get_by_text(re.compile(r"9 images in")).wait_for(timeout=180_000)
    page.locator("#lora_studio_xy_grid img").first.wait_for(timeout=30_000)
    screenshot(page, "studio_xy.png")
    (grid,) = sorted((work / "outputs" / "xy-grids").glob("*.png"))
    with Image.open(plain) as im:
        without = np.asarray(im.convert("RGB"))
    assert np.array_equal(_grid_cell(grid, 0, 0), without), "TE 0 x U-Net 0 is the image without the LoRA"
    assert not np.array_equal(_grid_cell(grid, 2, 2), without), "full strength changes the image"


def test_a_reloaded_page_shows_the_live_run_and_can_stop_it(page):
    open_tab(page, "Training")
    fill(page, "output_name", "long")
    fill(page, "max_train_steps", "400")
    fill(page, "sample_every_n_steps", "")
    page.locator("#lora_studio_train_prompts textarea").fill("")
    page.locator("#lora_studio_train_start").click()
    wait_progress(page, "p.status === 'running' && p.step >= 2")
    page.reload()
    open_tab(page, "Training")
    wait_progress(page, "p.status === 'running'", timeout=60_000)
    assert "long" in progress(page)["text"]
    screenshot(page, "studio_after_reload.png")
    page.locator("#lora_studio_train_stop").click()
    wait_progress(page, "p.status === 'stopped'")
    assert progress(page)["step"] < 400
