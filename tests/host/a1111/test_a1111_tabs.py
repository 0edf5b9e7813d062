"""The X/Y plot and LoRA tools tabs inside A1111, in chromium: a TE x U-Net grid of one of the host's LoRA files
drawn through the host's own txt2img (its zero cell is the host's API image without the LoRA, bit for bit), and a
LoRA file's metadata read from the host's LoRA folder (screenshots in tests/artifacts/)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from tests.host.a1111.conftest import PROMPT
from tests.host.conftest import Txt2Img, diff


def open_studio(page, tab: str) -> None:
    page.wait_for_selector("#tab_lora_studio_tab", state="attached", timeout=120_000)
    page.locator("#tabs > .tab-nav button", has_text="LoRA Studio").click()
    page.locator("#lora_studio_tabs button", has_text=tab).first.click()


def grid_cell(path: Path, col: int, row: int) -> np.ndarray:
    """Cell (col, row) of a saved 3x3 TE x U-Net grid of 64 px images. The host's Pillow measures the label text a
    pixel or so differently from ours, so the layout redrawn here is moved by the difference in size (the labels
    are above and left of the cells)."""
    from lib_lora.xy.grid import draw_grid

    with Image.open(path) as im:
        grid = im.convert("RGB")
    labels = ["0", "0.5", "1"]
    _, layout = draw_grid([Image.new("RGB", (64, 64))] * 9, 3, 3, x_title="LoRA TE strength", x_labels=labels,
                          y_title="LoRA U-Net strength", y_labels=labels)
    dx, dy = grid.width - layout.width, grid.height - layout.height
    left, top, right, bottom = layout.cell_box(col, row)
    cell = grid.crop((left + dx, top + dy, right + dx, bottom + dy))
    return np.asarray(cell.resize((64, 64), Image.NEAREST))


def choose(page, elem_id: str, option: str) -> None:
    """Pick a dropdown option (gradio 3.41 lists them as `li[role=button]` with `data-value`)."""
    page.locator(f"#{elem_id} input").first.click()
    page.locator(f"#{elem_id} li[data-value='{option}']").click()


def test_xy_and_tools_tabs_work_on_the_hosts_files(a1111):
    from tests.browser.appserver import browser_page, require_browser, screenshot

    require_browser()
    with browser_page(a1111.url, height=1400) as page:
        open_studio(page, "X/Y plot")
        page.locator("#lora_studio_xy_refresh").click()
        choose(page, "lora_studio_xy_lora", "t_lora")
        page.locator("#lora_studio_xy_prompt textarea").fill(PROMPT)
        page.locator("#lora_studio_xy_run").click()
        status = page.locator("#lora_studio_xy_status")
        status.get_by_text(re.compile(r"9 images in")).wait_for(timeout=300_000)
        page.locator("#lora_studio_xy_grid img").first.wait_for(timeout=30_000)
        screenshot(page, "a1111_xy_tab.png")
        grid = Path(re.search(r"grid: (\S+\.png)", status.first.inner_text()).group(1))

        open_studio(page, "LoRA tools")
        page.locator("#lora_studio_meta_refresh").click()
        choose(page, "lora_studio_meta_choice", "t_lora")
        details = page.locator("#lora_studio_meta_details")
        details.get_by_text("blocks touched").wait_for(timeout=60_000)
        screenshot(page, "a1111_tools_tab.png")

    # the tab drew through the host's own txt2img: its TE 0 x U-Net 0 cell is the host's image without the LoRA
    with Image.open(grid) as im:
        seed = int(re.search(r"Seed: (\d+)", im.info["parameters"]).group(1))  # one random seed for the plot
    plain, _ = Txt2Img(a1111, steps=20, prompt=PROMPT)(seed=seed, sampler_name="DPM++ 2M")
    assert np.array_equal(grid_cell(grid, 0, 0), plain), diff(grid_cell(grid, 0, 0), plain)
    assert not np.array_equal(grid_cell(grid, 2, 2), plain)
