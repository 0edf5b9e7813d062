"""The tabs on the web UIs' gradio versions: in the A1111 venv (gradio 3.41.2) and the Forge venv (gradio 4.40.0),
built by the hosts' own setup scripts (`tests/hostenv.py`), every tab builds and one handler of each runs against
the real core (`tests/host_ui_check.py`)."""
from __future__ import annotations

import json

import pytest

from tests.hostenv import run_in_host

EXPECTED_GRADIO = {"a1111": "3.41.2", "forge": "4.40.0"}


@pytest.mark.slow
@pytest.mark.parametrize("host", sorted(EXPECTED_GRADIO))
def test_every_tab_builds_and_runs_a_handler_on_the_hosts_gradio(host, tmp_path):
    proc = run_in_host(host, ["tests/host_ui_check.py", str(tmp_path)], timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("HOST_UI_CHECK ")]
    assert proc.returncode == 0 and lines, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    report = json.loads(lines[-1].removeprefix("HOST_UI_CHECK "))
    assert report["gradio"] == EXPECTED_GRADIO[host]
    assert report["tabs"] == ["generate", "tools", "train", "xy"]
    assert report["generate"].startswith("a cat <lora:style:0.5>\nSteps: 4")
    assert "expected a number" in report["train_bad_label"] and "queued" in report["train_start"]
    assert 'data-status="finished"' in report["train_progress"] and report["train_chart_has_line"]
    assert "<lora:hosted:1>" in report["train_result"]
    assert report["xy_grid"].endswith(".png") and "4 images" in report["xy_status"]
    assert "saved" in report["tools_status"] and "modelspec.title: Hosted" in report["tools_details"]
    assert report["tools_resize"].startswith("wrote") and "style-r1.safetensors" in report["tools_resize"]
