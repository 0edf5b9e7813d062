"""Tests against the real web UIs of ../shared/hosts (A1111 1.10.1 and Forge), each started once per package
(tests/host/a1111, tests/host/forge) on CPU with this checkout linked into its extensions folder.

Helpers here decode the API's images and check the host's log; `tests/hostenv.py` builds venvs and starts
servers. Without ../shared/hosts (only CI and these machines have it) the tests skip and say why.
"""
from __future__ import annotations

import base64
import io
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests import hostenv

ARTIFACTS = hostenv.ROOT / "tests" / "artifacts"
# The host reads an extension's git remote to list it; a checkout without an `origin` remote (a local clone or
# worktree) makes it print this, which says nothing about the extension's code.
NO_REMOTE = "Failed reading extension data from Git repository (lora-studio)"


def require_host(name: str) -> None:
    try:
        hostenv.bundle(name)
    except hostenv.HostUnavailable as exc:
        pytest.skip(str(exc))


def has_git_remote() -> bool:
    result = subprocess.run(["git", "-C", str(hostenv.ROOT), "remote"], capture_output=True, text=True, check=False)
    return bool(result.stdout.strip())


def extension_errors(log: str) -> list[str]:
    """Lines of the host's log that report an error about our extension (loading, callbacks, scripts)."""
    lines = log.splitlines()
    bad = []
    for i, line in enumerate(lines):
        context = "\n".join(lines[i:i + 12])
        mentions_us = "lora_studio" in context or "lib_lora" in context or "lora-studio" in context
        error = line.startswith("***") or "Traceback" in line or "Error loading script" in line
        if error and mentions_us and not (NO_REMOTE in line and not has_git_remote()):
            bad.append(context)
    return bad


def decode(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def diff(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference in 0..255 units."""
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean())


class Txt2Img:
    """`/sdapi/v1/txt2img` with fixed settings: one 64 px image, seed 1234, Euler a."""

    def __init__(self, server: hostenv.HostServer, steps: int, prompt: str):
        self.server, self.steps, self.prompt = server, steps, prompt

    def __call__(self, suffix: str = "", **extra) -> tuple[np.ndarray, dict]:
        body = {"prompt": f"{self.prompt} {suffix}".strip(), "seed": 1234, "sampler_name": "Euler a",
                "steps": self.steps, "width": 64, "height": 64, "cfg_scale": 7, "batch_size": 1, **extra}
        answer = self.server.post("/sdapi/v1/txt2img", body)
        info = json.loads(answer["info"])
        assert answer["images"], f"no image for {body['prompt']!r}: {info.get('comments')}"
        return decode(answer["images"][0]), info

    def raw(self, suffix: str = "", **extra) -> dict:
        body = {"prompt": f"{self.prompt} {suffix}".strip(), "seed": 1234, "sampler_name": "Euler a",
                "steps": self.steps, "width": 64, "height": 64, "cfg_scale": 7, **extra}
        return self.server.post("/sdapi/v1/txt2img", body)


def artifact(name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / name


def run_state(server, run_id: int) -> dict:
    """A training run as the extension's API route reports it."""
    return server.get(f"/lora-studio/v1/train?run={run_id}")["run"]


def wait_for(server, run_id: int, test: Callable[[dict], bool], what: str, timeout: float,
             on_poll: Callable[[], None] | None = None) -> dict:
    """Poll run `run_id` until `test(run)`; a failed/diverged/cancelled run, or `timeout` seconds, fail the test
    (with the run's log). `on_poll` runs at every poll (e.g. to sample the server's memory)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = run_state(server, run_id)
        if on_poll is not None:
            on_poll()
        if test(run):
            return run
        if run["status"] in ("failed", "diverged", "cancelled"):
            raise AssertionError(f"run #{run_id} {run['status']}: {run['error']}\n" + "\n".join(run["log"]))
        time.sleep(0.5)
    raise AssertionError(f"run #{run_id} not {what} after {timeout} s: {run_state(server, run_id)}")
