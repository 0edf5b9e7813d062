"""The web UIs' own Python environments, for tests that must run under the hosts' pinned packages (gradio 3.41.2 in
A1111 1.10, gradio 4.40.0 in Forge, their transformers, numpy, Pillow).

`host_python("a1111")` returns the interpreter of `.host-venvs/a1111` under the checkout (git-ignored), created by
the host bundle's own `setup.sh` (`../shared/hosts/<name>/setup.sh`, which pins exactly what the host installs) on
first use. Later calls are instant: a stamp of the bundle's setup files is kept in the venv, and `setup.sh` runs
again only when those files change. A lock file serialises creation between test processes. Every test that needs
a host venv (the UI on old gradio versions, the web-UI integration) goes through this one helper.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ROOT.parent / "shared" / "hosts"
VENV_ROOT = ROOT / ".host-venvs"
HOSTS = ("a1111", "forge")
SETUP_TIMEOUT = 3600  # a first creation downloads torch and the host's requirements
STAMP = ".hostenv-stamp"


def bundle(name: str) -> Path:
    if name not in HOSTS:
        raise ValueError(f"unknown host {name!r}; known: {HOSTS}")
    return BUNDLES / name


def _setup_files(folder: Path) -> list[Path]:
    files = [folder / "setup.sh", *sorted(folder.glob("*.txt"))]
    shim = folder / "venv-shim"
    if shim.is_dir():
        files += sorted(p for p in shim.iterdir() if p.is_file())
    return [p for p in files if p.is_file()]


def setup_stamp(name: str) -> str:
    """A digest of the bundle's setup script and pin files: the venv is current while it matches."""
    h = hashlib.sha256()
    for path in _setup_files(bundle(name)):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def venv_dir(name: str) -> Path:
    return VENV_ROOT / name


def _current(name: str) -> bool:
    venv = venv_dir(name)
    stamp = venv / STAMP
    return (venv / "bin" / "python").is_file() and stamp.is_file() and stamp.read_text().strip() == setup_stamp(name)


def ensure_venv(name: str) -> Path:
    """Create or refresh `.host-venvs/<name>` with the bundle's setup.sh (no-op when current); returns its python.

    Raises:
        FileNotFoundError: the host bundle is missing (no ../shared beside the checkout).
        RuntimeError: setup.sh failed (with the end of its log).
    """
    script = bundle(name) / "setup.sh"
    if not script.is_file():
        raise FileNotFoundError(f"host bundle not found: {script} (../shared/hosts beside the checkout)")
    python = venv_dir(name) / "bin" / "python"
    if _current(name):
        return python
    VENV_ROOT.mkdir(parents=True, exist_ok=True)
    with open(VENV_ROOT / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test process may be creating it right now
        if _current(name):
            return python
        log = VENV_ROOT / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.run(["bash", str(script), str(venv_dir(name))], stdout=out, stderr=subprocess.STDOUT,
                                  timeout=SETUP_TIMEOUT, check=False)
        if proc.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"{script} failed ({proc.returncode}); end of {log}:\n{tail}")
        (venv_dir(name) / STAMP).write_text(setup_stamp(name) + "\n")
    return python


def host_python(name: str) -> Path:
    """`ensure_venv` for tests: skips (saying why) without the host bundles, fails with the log if setup fails."""
    try:
        return ensure_venv(name)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    except RuntimeError as exc:
        pytest.fail(str(exc))
    raise AssertionError("unreachable")


def run_in_host(name: str, args: list[str], *, timeout: float = 600, env: dict | None = None
                ) -> subprocess.CompletedProcess:
    """Run the host venv's python with this checkout importable (PYTHONPATH), offline, from the checkout root."""
    python = host_python(name)
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("VIRTUAL_ENV", None)
    return subprocess.run([str(python), *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout, check=False)
