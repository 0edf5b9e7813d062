"""Run by the web UI (AUTOMATIC1111 / Forge) in its own venv before it loads our scripts.

It installs only small pure-Python packages the host lacks, pinned to versions that work with the host's
libraries, and never touches torch, xformers, gradio, transformers, accelerate or diffusers (the failure that
broke users' web UIs in other training extensions). On later starts everything is present and it does nothing.
It imports nothing of lib_lora.
"""
from __future__ import annotations

import importlib.util
import sys

# import name -> pip requirement (all pure Python and small)
PACKAGES = {
    "tomli": "tomli==2.0.1",  # TOML reading on Python 3.10 (the web UI's usual Python); 3.11 has tomllib
    "prodigyopt": "prodigyopt==1.1.2",
    "dadaptation": "dadaptation==3.2",
    "lion_pytorch": "lion-pytorch==0.2.5",
    "schedulefree": "schedulefree==1.4.1",
}
NEVER = ("torch", "xformers", "gradio", "transformers", "accelerate", "diffusers")


def missing() -> list[str]:
    wanted = {name: spec for name, spec in PACKAGES.items() if not (name == "tomli" and sys.version_info >= (3, 11))}
    return [spec for name, spec in wanted.items() if importlib.util.find_spec(name) is None]


def main() -> None:
    todo = missing()
    if not todo:
        return
    assert not any(spec.split("=")[0].lower() in NEVER for spec in todo)
    try:
        import launch  # the web UI's launcher module: honours --skip-install and its index settings
    except ImportError:
        import subprocess

        subprocess.run([sys.executable, "-m", "pip", "install", *todo], check=True)
        return
    for spec in todo:
        launch.run_pip(f"install {spec}", f"{spec} for LoRA Studio")


if __name__ == "__main__":
    main()
