"""LoRA Studio inside Forge's page: the extension loads without an error in Forge's log, and its top-level tab
(the training tab and the tools) is there and opens in Chromium; the screenshot is kept as an artifact."""
from __future__ import annotations

from tests.browser.appserver import browser_page, require_browser, screenshot
from tests.host.conftest import extension_errors

TAB = "LoRA Studio"


def test_extension_loads_without_errors(forge, txt2img):
    txt2img()  # Forge loads its model at the first generation: the status names it afterwards
    status = forge.get("/lora-studio/v1/status")
    assert status["host"] == "forge" and status["arch"] == "sd1" and status["checkpoint"].startswith("sd15-random")
    assert extension_errors(forge.log_text()) == []


def test_training_tab_is_in_the_page(forge):
    require_browser()
    with browser_page(forge.url + "/") as page:
        page.wait_for_selector("#txt2img_prompt textarea", timeout=300_000)
        tabs = page.eval_on_selector_all("#tabs > .tab-nav button", "els => els.map(e => e.innerText.trim())")
        assert TAB in tabs, tabs
        page.click(f'#tabs > .tab-nav button:text-is("{TAB}")')
        page.wait_for_selector("#lora_studio_tabs", state="visible", timeout=60_000)
        page.wait_for_timeout(1000)
        text = page.inner_text("#lora_studio_tabs")
        screenshot(page, "forge-lora-studio-tab.png")
    assert "Train" in text
