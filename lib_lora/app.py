"""The standalone app (`./launch.sh`): the UI's tabs on a `StandaloneHost`.

    python -m lib_lora.app [--model PATH|embedded] [--lora-dir DIR] [--outputs DIR] [--lbw-presets FILE]
                           [--port N] [--listen]
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib_lora.host.standalone import DEFAULT_LORA_DIR, DEFAULT_OUTPUTS_DIR, EMBEDDED, ROOT, StandaloneHost
from lib_lora.ui import TABS, TabSpec

TITLE = "LoRA Studio"
CSS = """
.lora-studio-table { border-collapse: collapse; width: 100%; font-size: 0.9em; }
.lora-studio-table th, .lora-studio-table td { border-bottom: 1px solid #8884; padding: 2px 6px; text-align: left; }
"""


@dataclass
class StudioApp:
    """The built app: gradio Blocks, and the tab objects by registry key (tests call their handlers)."""

    blocks: Any
    tabs: dict[str, Any] = field(default_factory=dict)


def build_app(host, tabs: Iterable[TabSpec] | None = None) -> StudioApp:
    """The Blocks app with one tab per registry entry (all of `TABS` by default). Nothing is launched."""
    import gradio as gr

    from lib_lora.ui import compat

    built = {}
    with compat.blocks(TITLE, app_css()) as app:
        gr.Markdown(f"## {TITLE}")
        with gr.Tabs():
            for spec in tabs if tabs is not None else TABS.values():
                with gr.Tab(spec.label, id=spec.key):
                    built[spec.key] = spec.create(host)
                    built[spec.key].build()
    return StudioApp(app, built)


def app_css() -> str:
    # The extension's style.css (served by the web UI there) applies standalone too.
    extra = ROOT / "style.css"
    return CSS + (extra.read_text(encoding="utf-8") if extra.is_file() else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lib_lora.app", description=f"{TITLE} standalone app")
    p.add_argument("--model", default=EMBEDDED, help="checkpoint .safetensors (SD1/SD2/SDXL), or 'embedded' (default)")
    p.add_argument("--lora-dir", default=str(DEFAULT_LORA_DIR), help="LoRA folder (default: models/Lora)")
    p.add_argument("--outputs", default=str(DEFAULT_OUTPUTS_DIR), help="where images are saved (default: outputs/)")
    p.add_argument("--lbw-presets", default=None, help="user block-weight presets file (NAME:w1,w2,... per line)")
    p.add_argument("--port", type=int, default=None, help="port (default: the first free one from 7860)")
    p.add_argument("--listen", action="store_true", help="listen on all interfaces (0.0.0.0), not only localhost")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lib_lora.ui import compat

    host = StandaloneHost(lora_dir=args.lora_dir, outputs_dir=args.outputs, presets_file=args.lbw_presets)
    print(f"[{TITLE}] loading model: {args.model}", flush=True)
    info = host.try_load(args.model)
    print(f"[{TITLE}] " + (f"model: {info.label}" if info else f"no model loaded: {host.model_error()}"), flush=True)
    app = compat.enable_queue(build_app(host).blocks)
    Path(args.outputs).mkdir(parents=True, exist_ok=True)
    allowed = [str(Path(p).resolve()) for p in (args.outputs, args.lora_dir)]
    app.launch(server_name="0.0.0.0" if args.listen else "127.0.0.1", server_port=args.port,
               prevent_thread_lock=True, allowed_paths=allowed, inbrowser=False, **compat.launch_kwargs(app_css()))
    print(f"[{TITLE}] running at {app.local_url}  (Ctrl-C to stop)", flush=True)
    try:
        app.block_thread()
    except KeyboardInterrupt:
        app.close()
    finally:
        host.close()  # a running training stops after its step and saves a resumable state
    return 0


if __name__ == "__main__":
    sys.exit(main())
