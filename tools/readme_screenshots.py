"""Make the README's screenshots of the Training, X/Y plot and LoRA tools tabs: start the app on the embedded model
with the shipped sample LoRA, walk through the README's first session in Debian chromium, save PNGs.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/readme_screenshots.py [--out docs/screenshots]

Needs Debian chromium and the `playwright` package (never `playwright install`). Outputs and settings go to a
temporary folder; only the screenshots are written into the checkout.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.browser.appserver import browser_page, running_app  # noqa: E402

PROMPT = "a red circle on a blue background, pastel"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        loras = Path(tmp) / "loras"  # the shipped sample, and what the walk trains (the checkout stays clean)
        loras.mkdir()
        shutil.copyfile(ROOT / "models" / "Lora" / "sample-pastel.safetensors", loras / "sample-pastel.safetensors")
        app_args = ["--model", "embedded", "--lora-dir", str(loras), "--outputs", str(Path(tmp) / "outputs")]
        with running_app(app_args, Path(tmp) / "app.log") as url, browser_page(url, width=1200, height=1600) as page:
            page.get_by_role("tab", name="Training").click()
            page.locator("#lora_studio_train_sample_dataset").click()
            page.locator("#lora_studio_train_status").get_by_text("wrote 12 images").wait_for(timeout=60_000)
            page.locator("#lora_studio_train_preview_button").click()
            page.locator("#lora_studio_train_preview").get_by_text("Buckets").wait_for(timeout=60_000)
            page.locator("#lora_studio_train_start").click()
            page.wait_for_function("() => { const el = document.querySelector('#lora_studio_train_progress "
                                   ".lora-studio-progress'); return el && el.dataset.status === 'finished'; }",
                                   timeout=900_000)
            page.locator("#lora_studio_train_samples img").first.wait_for(timeout=60_000)
            clip = _clip(page, "#lora_studio_train_sample_dataset", "#lora_studio_train_queue")
            page.screenshot(path=str(out / "train.png"), full_page=True, clip=clip)
            print(f"[screenshots] {out / 'train.png'}")

            page.get_by_role("tab", name="X/Y plot").click()
            page.locator("#lora_studio_xy_lora input").first.click()
            page.get_by_role("option", name="sample-pastel", exact=True).click()
            page.locator("#lora_studio_xy_prompt textarea").fill(PROMPT)
            page.locator("#lora_studio_xy_seed input").fill("3")
            page.locator("#lora_studio_xy_run").click()
            page.locator("#lora_studio_xy_status").get_by_text(re.compile(r"9 images in")).wait_for(timeout=300_000)
            page.locator("#lora_studio_xy_grid img").first.wait_for(timeout=30_000)
            clip = _clip(page, "#lora_studio_xy_lora", "#lora_studio_xy_grid")
            page.screenshot(path=str(out / "xy.png"), full_page=True, clip=clip)
            print(f"[screenshots] {out / 'xy.png'}")

            page.get_by_role("tab", name="LoRA tools").click()
            page.locator("#lora_studio_meta_refresh").click()
            page.locator("#lora_studio_meta_choice input").first.click()
            page.get_by_role("option", name="sample-pastel", exact=True).click()
            page.locator("#lora_studio_meta_details").get_by_text("blocks touched").wait_for(timeout=60_000)
            clip = _clip(page, "#lora_studio_meta_choice", "#lora_studio_meta_details")
            page.screenshot(path=str(out / "tools.png"), full_page=True, clip=clip)
            print(f"[screenshots] {out / 'tools.png'}")
    return 0


def _clip(page, first: str, last: str) -> dict:
    """The page region from the top of `first` to the bottom of `last`, full width."""
    def box(selector: str) -> dict:  # page coordinates (a full-page screenshot's)
        return page.locator(selector).first.evaluate(
            "el => { const r = el.getBoundingClientRect(); return {y: r.top + window.scrollY, h: r.height}; }")

    a, b = box(first), box(last)
    top = max(0, a["y"] - 10)
    return {"x": 0, "y": top, "width": page.viewport_size["width"], "height": b["y"] + b["h"] + 10 - top}


if __name__ == "__main__":
    sys.exit(main())
