"""install.py in each host's own venv, run the way the web UI runs it at start (its python, from its folder):
the first run adds only our small packages, pinned, and changes nothing else (torch, gradio, transformers, ...
keep their versions); the second run installs nothing.

The cached host venv may already hold our packages from an earlier run: they are uninstalled first, which puts
the venv back to what the host's setup.sh made."""
from __future__ import annotations

import subprocess

import pytest

from tests import hostenv
from tests.host.conftest import require_host

# install.py's requirements: distribution name -> pinned version (tomli only below Python 3.11; hosts run 3.11)
OURS = {"prodigyopt": "1.1.2", "dadaptation": "3.2", "lion-pytorch": "0.2.5", "schedulefree": "1.4.1"}
NEVER = ("torch", "xformers", "gradio", "transformers", "accelerate", "diffusers")


@pytest.mark.parametrize("host", hostenv.HOST_NAMES)
def test_install_adds_only_our_small_packages_once(host):
    require_host(host)
    python = hostenv.venv_python(host)
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", *OURS], check=True, capture_output=True)
    before = hostenv.pip_freeze(host)
    assert not set(OURS) & set(before)
    first = hostenv.run_installer(host, hostenv.ROOT)
    assert first.returncode == 0, first.stdout + first.stderr
    after = hostenv.pip_freeze(host)
    added = {k: v for k, v in after.items() if k not in before}
    changed = {k: (before[k], after[k]) for k in before if after.get(k) != before[k]}
    assert added == OURS and changed == {}, (added, changed)
    assert all(before.get(name) == after.get(name) for name in NEVER)
    second = hostenv.run_installer(host, hostenv.ROOT)
    assert second.returncode == 0 and "Installing" not in second.stdout, second.stdout + second.stderr
    assert hostenv.pip_freeze(host) == after
