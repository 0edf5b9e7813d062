"""Shared pieces of the browser tests: start `python -m lib_lora.app` on a free port and wait for it, open Debian
chromium through Playwright (never `playwright install`), read values back from the page."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]
ARTIFACTS = ROOT / "tests" / "artifacts"
START_TIMEOUT = 120


def require_browser() -> None:
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"Debian chromium is not installed ({CHROMIUM} missing): run `apt-get install chromium` "
                    "(./launch.sh test does it when run as root) to run the browser test")
    pytest.importorskip("playwright", reason="the Python `playwright` package is missing (requirements-test.txt)")


def free_port() -> int:
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


@contextlib.contextmanager
def running_app(args: list[str], log: Path):
    """`python -m lib_lora.app ARGS --port N` in a subprocess; yields its URL; stops it afterwards."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lib_lora.app", *args, "--port", str(port)], cwd=ROOT,
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_up(proc, url, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def browser_page(url: str, width: int = 1400, height: int = 1200):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(url)
        try:
            yield page
        finally:
            browser.close()


def value_is(page, selector: str, expected: str, timeout: int = 30_000) -> None:
    page.wait_for_function("([sel, want]) => document.querySelector(sel).value === want", arg=[selector, expected],
                           timeout=timeout)


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path
