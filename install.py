"""Run by the web UI (AUTOMATIC1111 / Forge) in its own venv, before it loads our scripts, at every start.

It installs only small pure-Python packages the host lacks, at pinned versions, with `--no-deps` (their only
dependencies, torch and typing-extensions, come with every web UI), so pip never resolves, upgrades or
replaces anything else: torch, xformers, gradio, transformers, accelerate and diffusers are never touched (the
failure that broke users' web UIs in other training extensions). On later starts everything is present and it
does nothing. It imports nothing of lib_lora.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys

# import name -> pip requirement (all pure Python and small: optimizers users know from sd-scripts)
PACKAGES = {
    "tomli": "tomli==2.0.1",  # TOML reading on Python 3.10 (the web UI's usual Python); 3.11 has tomllib
    "prodigyopt": "prodigyopt==1.1.2",
    "dadaptation": "dadaptation==3.2",
    "lion_pytorch": "lion-pytorch==0.2.5",
    "schedulefree": "schedulefree==1.4.1",
}
NEVER = ("torch", "xformers", "gradio", "transformers", "accelerate", "diffusers")


def missing() -> list[str]:
    """The requirements whose module cannot be imported here."""
    wanted = {name: spec for name, spec in PACKAGES.items() if not (name == "tomli" and sys.version_info >= (3, 11))}
    return [spec for name, spec in wanted.items() if importlib.util.find_spec(name) is None]


def main() -> None:
    todo = missing()
    if not todo:
        return
    if any(spec.split("==")[0].lower() in NEVER for spec in todo):
        raise SystemExit(f"LoRA Studio install.py refuses to install {todo}: the web UI owns those packages")
    try:
        import launch  # the web UI's launcher: honours --skip-install and the user's pip index settings
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", *todo], check=True)
        return
    launch.run_pip(f"install --no-deps {' '.join(todo)}", f"LoRA Studio requirements: {', '.join(todo)}")


if __name__ == "__main__":
    main()
