"""The real web UIs of ../shared/hosts for tests: their venvs, the checkpoints they run, a running server.

Everything is cached under the checkout, ignored by git:
- `.host-venvs/a1111`, `.host-venvs/forge`: each host's own venv (its pinned gradio, transformers, ...), made by
  its `setup.sh` (idempotent: a later call only checks it). `venv_python(name)` makes it on first use.
- `.host-cache/`: the embedded tiny model exported for A1111 (`tiny_checkpoint()`) and the full-size
  random-weight SD1.5 that Forge needs (`random_sd15()`, ~2 GB, made by Forge's own tools/make_random_sd15.py).

A `HostServer` starts a host through its `run.sh` (CPU, offline, extensions from a folder of links) in its own
process group, waits for a route, talks JSON to its API and stops it. Builds take a file lock, so two test
processes (or two sessions sharing a checkout) never build the same thing at once.

Used by tests/host/ and by UI tests that build tabs under the hosts' gradio versions.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
HOSTS = SHARED / "hosts"
VENVS = ROOT / ".host-venvs"
CACHE = ROOT / ".host-cache"
HOST_NAMES = ("a1111", "forge")
SETUP_TIMEOUT = 1800


class HostUnavailable(RuntimeError):
    """The host bundle is not beside the checkout (../shared/hosts); tests skip with this reason."""


def bundle(name: str) -> Path:
    if name not in HOST_NAMES:
        raise ValueError(f"unknown host {name!r}; known: {HOST_NAMES}")
    folder = HOSTS / name
    if not (folder / "setup.sh").is_file():
        raise HostUnavailable(f"{folder}/setup.sh not found: the real web UIs live in ../shared/hosts beside the "
                              "checkout (CI always has it)")
    return folder


@contextlib.contextmanager
def _locked(name: str):
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def venv_dir(name: str) -> Path:
    return VENVS / name


STAMP = ".hostenv-stamp"


def setup_stamp(name: str) -> str:
    """A digest of the bundle's setup script and pin files: a venv made by them is current while it matches."""
    folder = bundle(name)
    files = [folder / "setup.sh", *sorted(folder.glob("*.txt"))]
    if (folder / "venv-shim").is_dir():
        files += sorted(p for p in (folder / "venv-shim").iterdir() if p.is_file())
    digest = hashlib.sha256()
    for path in (p for p in files if p.is_file()):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _current(name: str) -> bool:
    stamp = venv_dir(name) / STAMP
    return (venv_dir(name) / "bin" / "python").is_file() and stamp.is_file() and \
        stamp.read_text().strip() == setup_stamp(name)


def venv_python(name: str) -> Path:
    """The host venv's python, made by the host's own setup.sh on first use (minutes) or when the bundle's setup
    files change; later calls are instant."""
    setup = bundle(name) / "setup.sh"
    venv = venv_dir(name)
    log = VENVS / f"{name}.log"
    with _locked(f"venv-{name}"):
        if _current(name):
            return venv / "bin" / "python"
        VENVS.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as out:
            result = subprocess.run(["bash", str(setup), str(venv)], stdout=out, stderr=subprocess.STDOUT,
                                    timeout=SETUP_TIMEOUT, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{setup} {venv} failed ({result.returncode}); see {log}:\n{_tail(log)}")
        (venv / STAMP).write_text(setup_stamp(name) + "\n")
    return venv / "bin" / "python"


def host_python(name: str) -> Path:
    """`venv_python` for tests: skips (saying why) without the host bundles, fails with the log if setup fails."""
    import pytest

    try:
        return venv_python(name)
    except HostUnavailable as exc:
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


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _run_cached(target: Path, stamp: str, command: list[str], what: str, env: dict | None = None) -> Path:
    """Run `command` to make `target` unless `target` exists with the same stamp beside it."""
    stamp_file = target.with_name(target.name + ".stamp")
    if target.is_file() and stamp_file.is_file() and stamp_file.read_text() == stamp:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0 or not target.is_file():
        raise RuntimeError(f"{what} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    stamp_file.write_text(stamp)
    return target


def tiny_checkpoint() -> Path:
    """The embedded tiny model as `export-model` writes it for the web UI (yaml with an absolute text-encoder
    path, since the hosts run from their own folder)."""
    from lib_lora.sd.embedded import EMBEDDED_DIR, embedded_hash

    target = CACHE / "tiny" / "tiny-sd1.safetensors"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "lib_lora", "export-model", "--out", str(target), "--force",
               "--text-encoder-ref", "absolute"]
    with _locked("tiny"):
        return _run_cached(target, f"{embedded_hash(EMBEDDED_DIR)}:3", command, "export-model", env)


def random_sd15() -> Path:
    """Forge's full-size SD1.5-architecture checkpoint with random weights (seed 0; ~2 GB, ~40 s)."""
    tool = bundle("forge") / "tools" / "make_random_sd15.py"
    python = venv_python("forge")
    target = CACHE / "sd15-random.safetensors"
    with _locked("sd15"):
        return _run_cached(target, "seed0", [str(python), str(tool), str(bundle("forge") / "src"), str(target)],
                           "make_random_sd15.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HostServer:
    """One running web UI (started by its run.sh), with JSON helpers for its API.

    Args:
        name: "a1111" or "forge".  checkpoint: the model it loads.  workdir: scratch folder for everything the
        host writes (data dir / scratch copy, extensions links, log).  extensions: {folder name: path}.
        lora_dir: the host's --lora-dir.  extra_args: more command-line flags.
    """

    def __init__(self, name: str, checkpoint: Path, workdir: Path, *, extensions: dict[str, Path],
                 lora_dir: Path, extra_args: tuple[str, ...] = ()):
        self.name, self.checkpoint, self.workdir = name, Path(checkpoint), Path(workdir)
        self.extensions, self.lora_dir, self.extra_args = extensions, Path(lora_dir), tuple(extra_args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> HostServer:
        python = venv_python(self.name)
        ext = self.workdir / "extensions"
        ext.mkdir(parents=True, exist_ok=True)
        for folder, target in self.extensions.items():
            link = ext / folder
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(Path(target).resolve(), target_is_directory=True)
        self.lora_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "A1111_WORK_DIR": str(self.workdir / "data"), "A1111_LORA_DIR": str(self.lora_dir),
               "FORGE_SCRATCH": str(self.workdir / "scratch"), "LORA_DIR": str(self.lora_dir),
               "OMP_NUM_THREADS": os.environ.get("HOST_THREADS", "1")}
        env.pop("PYTHONPATH", None)  # the host imports our package from its extensions folder, as users run it
        command = ["bash", str(bundle(self.name) / "run.sh"), str(python.parent.parent), str(self.checkpoint),
                   str(ext), str(self.port), *self.extra_args]
        self.log = open(self.log_path, "w")  # noqa: SIM115 - open while the server runs
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        return self

    def wait(self, path: str = "/sdapi/v1/sd-models", timeout: float = 300) -> HostServer:
        """Until `path` answers 200 (an extension's routes come a moment after the web UI's own)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = self.proc and self.proc.returncode
                raise RuntimeError(f"{self.name} exited ({code}):\n{self.log_text()[-6000:]}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=5) as r:  # noqa: S310 - localhost
                    if r.status == 200:
                        return self
            except (OSError, urllib.error.HTTPError):
                pass
            time.sleep(1)
        raise TimeoutError(f"{self.name} did not answer {path} within {timeout}s:\n{self.log_text()[-6000:]}")

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 900) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - localhost
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as exc:
            text = exc.read()
            try:
                return exc.code, json.loads(text)
            except ValueError:
                return exc.code, {"error": text.decode(errors="replace")}

    def get(self, path: str, timeout: float = 120) -> dict:
        status, answer = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise AssertionError(f"GET {path}: {status} {answer}")
        return answer

    def post(self, path: str, body: dict | None = None, timeout: float = 900) -> dict:
        status, answer = self.request("POST", path, body or {}, timeout=timeout)
        if status != 200:
            raise AssertionError(f"POST {path}: {status} {answer}\n{self.log_text()[-3000:]}")
        return answer

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.log.close()
        self.proc = None


def run_installer(name: str, extension: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run an extension's install.py as the web UI does at start: its venv's python, from the web UI's folder,
    with that folder on PYTHONPATH (so `import launch` gives the installer the host's pip helpers)."""
    python = venv_python(name)
    src = bundle(name) / "src"
    env = {**os.environ, "PYTHONPATH": str(src), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([str(python), str(Path(extension) / "install.py")], cwd=src, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def pip_freeze(name: str) -> dict[str, str]:
    """{distribution name (lower case): version} of a host venv."""
    out = subprocess.run([str(venv_python(name)), "-m", "pip", "freeze", "--disable-pip-version-check"],
                         capture_output=True, text=True, check=True).stdout
    pins = {}
    for line in out.splitlines():
        name_, sep, version = line.partition("==")
        if sep:
            pins[name_.strip().lower().replace("_", "-")] = version.strip()
    return pins
