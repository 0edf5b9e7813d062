"""Which web UI we are in: AUTOMATIC1111 or Forge (its `modules_forge` package). Imports neither by itself;
`register()` hands over to the adapter of the running host (`a1111.py` / `forge.py`)."""
from __future__ import annotations

import importlib.util


def is_forge() -> bool:
    return importlib.util.find_spec("modules_forge") is not None


def register() -> type:
    """Wire LoRA Studio into the running web UI; returns the always-visible Script class for `scripts/`."""
    if is_forge():
        from lib_lora.host import forge

        return forge.register()
    from lib_lora.host import a1111

    return a1111.register()
