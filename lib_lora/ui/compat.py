"""The few places where gradio 3.41 (A1111), 4.x (Forge) and 6.x (standalone) differ, in one module.

Everything else in `ui/` uses the subset the three share: Blocks, Tab, Row/Column, Accordion, Textbox,
Number, Slider, Dropdown, Checkbox, Button, Gallery, Markdown, HTML, `.click/.change/.then`, set-form inputs,
`gr.Progress` and `gr.update`.
"""
from __future__ import annotations

import html

import gradio as gr


def major_version() -> int:
    """gradio's major version (3, 4, 5, 6...)."""
    return int(gr.__version__.split(".")[0])


def js_kwargs(js: str | None) -> dict:
    """Event keyword for a client-side function: `_js=` in gradio 3, `js=` from 4 on."""
    if not js:
        return {}
    return {"_js": js} if major_version() < 4 else {"js": js}


def blocks(title: str, css: str | None = None) -> gr.Blocks:
    """A Blocks app; gradio 6 takes `css` in `launch()` instead (see `launch_kwargs`)."""
    kwargs: dict = {"title": title, "analytics_enabled": False}
    if css and major_version() < 6:
        kwargs["css"] = css
    return gr.Blocks(**kwargs)


def launch_kwargs(css: str | None = None) -> dict:
    return {"css": css} if css and major_version() >= 6 else {}


def enable_queue(app: gr.Blocks) -> gr.Blocks:
    """Turn the queue on (needed for progress in gradio 3). Every version's default runs one event of a kind
    at a time, which suits one model on one device."""
    return app.queue()


def update(**kwargs):
    """`gr.update(...)`: a change of a component's properties from a handler."""
    return gr.update(**kwargs)


def message(text: str, kind: str = "info") -> str:
    """Markdown for a status line. Escaped, so prompt syntax such as `<lora:x:1>` shows as typed."""
    icon = {"info": "", "error": "**Error:** ", "warning": "**Note:** "}[kind]
    return icon + html.escape(text, quote=False)


def poll(fn, outputs: list, seconds: float, inputs=None):
    """Run `fn` every `seconds` while the page is open (live training state): `gr.Timer` where it exists (4.40+),
    else the page-load event with `every=` (gradio 3; needs the queue, which every host turns on)."""
    quiet = {"show_progress": "hidden"}
    if hasattr(gr, "Timer"):
        return gr.Timer(seconds).tick(fn, inputs=inputs, outputs=outputs, **quiet)
    from gradio.context import Context

    return Context.root_block.load(fn, inputs=inputs, outputs=outputs, every=seconds, **quiet)


def quiet() -> dict:
    """Event keywords for handlers whose outputs should not flash a progress overlay."""
    return {"show_progress": "hidden"}


def file_path(value) -> str | None:
    """The path of an uploaded file: gradio 3 gives a temp-file object, 4+ a path string (or a dict in some
    components)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value or None
    if isinstance(value, dict):
        return value.get("path") or value.get("name")
    return getattr(value, "name", None)
