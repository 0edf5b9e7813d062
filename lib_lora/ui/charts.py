"""Live training charts and progress as HTML/SVG strings: the same picture in gradio 3, 4 and 6 (gr.HTML), no
plotting library. Loss (raw and smoothed), validation loss, divergence-guard events as marked vertical lines,
and the learning rate in a strip below."""
from __future__ import annotations

import html
import math
from collections.abc import Sequence

from lib_lora.train.runs import RunView, format_duration

WIDTH, HEIGHT, LR_HEIGHT = 640, 220, 70
LEFT, RIGHT, TOP, BOTTOM = 52, 12, 12, 22
COLOURS = {"raw": "#9bb7d4", "smoothed": "#1f5fa8", "val": "#d9822b", "rollback": "#c0392b", "lr": "#2e8b57"}


def _scale(lo: float, hi: float, a: float, b: float):
    span = (hi - lo) or 1.0
    return lambda v: a + (v - lo) / span * (b - a)


def _polyline(points: Sequence[tuple[float, float]], colour: str, width: float, cls: str) -> str:
    if not points:
        return ""
    text = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    return f'<polyline class="{cls}" fill="none" stroke="{colour}" stroke-width="{width}" points="{text}"/>'


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        return [lo]
    return [lo + (hi - lo) * i / n for i in range(n + 1)]


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def _frame(x0: float, y0: float, x1: float, y1: float, lo: float, hi: float, y_of) -> list[str]:
    parts = [f'<rect x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" fill="none" stroke="#8886"/>']
    for v in _ticks(lo, hi):
        y = y_of(v)
        parts.append(f'<text x="{x0 - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{_fmt(v)}</text>')
    return parts


def loss_chart(view: RunView | None) -> str:
    """The loss and lr charts of a run as inline SVG (an empty frame before the first step)."""
    if view is None:
        return '<div class="lora-studio-chart"><em>No run yet.</em></div>'
    total = max(view.total_steps, view.step, 1)
    finite = [(s, v, m) for s, v, m in view.losses if v is not None and math.isfinite(v)]
    values = [v for _, v, _ in finite] + [v for _, v in view.val_losses if math.isfinite(v)]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    x_of = _scale(0, total, LEFT, WIDTH - RIGHT)
    y_of = _scale(lo, hi, HEIGHT - BOTTOM, TOP)
    # Scales to the column's width (viewBox), so it never overflows a narrow layout.
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="lora-studio-loss" viewBox="0 0 {WIDTH} '
             f'{HEIGHT + LR_HEIGHT}" style="width:100%;max-width:{WIDTH * 2}px;height:auto" font-family="sans-serif">']
    parts += _frame(LEFT, TOP, WIDTH - RIGHT, HEIGHT - BOTTOM, lo, hi, y_of)
    parts.append(f'<text x="{WIDTH - RIGHT}" y="{HEIGHT - 6}" font-size="10" text-anchor="end">step {view.step} / '
                 f'{total}</text>')
    parts.append(_polyline([(x_of(s), y_of(v)) for s, v, _ in finite], COLOURS["raw"], 1, "raw"))
    parts.append(_polyline([(x_of(s), y_of(m)) for s, _, m in finite if m is not None], COLOURS["smoothed"], 2,
                           "smoothed"))
    for s, v in view.val_losses:
        parts.append(f'<circle class="val" cx="{x_of(s):.1f}" cy="{y_of(v):.1f}" r="3" fill="{COLOURS["val"]}">'
                     f'<title>validation loss {v:.4g} at step {s}</title></circle>')
    for mark in view.guard:
        x = x_of(mark.step)
        parts.append(f'<line class="guard {mark.kind}" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{HEIGHT - BOTTOM}" '
                     f'stroke="{COLOURS["rollback"]}" stroke-dasharray="4 3"><title>{html.escape(mark.message)}'
                     f'</title></line>')
        parts.append(f'<text x="{x + 3:.1f}" y="{TOP + 10}" font-size="10" fill="{COLOURS["rollback"]}">'
                     f'{"rollback" if mark.kind == "rollback" else "guard stop"}</text>')
    parts += _lr_strip(view, x_of)
    parts.append(_legend())
    parts.append("</svg>")
    return "".join(parts)


def _lr_strip(view: RunView, x_of) -> list[str]:
    lrs = [(s, v) for s, v in view.lrs if v is not None and math.isfinite(v)]
    y0, y1 = HEIGHT + 4, HEIGHT + LR_HEIGHT - BOTTOM
    lo, hi = (min(v for _, v in lrs), max(v for _, v in lrs)) if lrs else (0.0, 1.0)
    if hi - lo < 1e-15:
        lo, hi = 0.0, hi * 1.1 or 1.0
    y_of = _scale(lo, hi, y1, y0)
    parts = [f'<rect x="{LEFT}" y="{y0}" width="{WIDTH - RIGHT - LEFT}" height="{y1 - y0}" fill="none" '
             f'stroke="#8886"/>', f'<text x="{LEFT - 4}" y="{y0 + 10}" font-size="10" text-anchor="end">'
             f'{_fmt(hi)}</text>', f'<text x="{LEFT + 4}" y="{y1 + 14}" font-size="10">learning rate</text>']
    parts.append(_polyline([(x_of(s), y_of(v)) for s, v in lrs], COLOURS["lr"], 1.5, "lr"))
    return parts


def _legend() -> str:
    items = [("raw", "loss"), ("smoothed", "smoothed"), ("val", "validation"), ("rollback", "guard event")]
    out, x = [], LEFT + 6
    for key, label in items:
        out.append(f'<rect x="{x}" y="{TOP + 4}" width="10" height="3" fill="{COLOURS[key]}"/>'
                   f'<text x="{x + 13}" y="{TOP + 9}" font-size="10">{label}</text>')
        x += 14 + 7 * len(label)
    return "".join(out)


def progress_bar(view: RunView | None) -> str:
    """The run's progress bar with step/epoch, it/s and ETA (a plain line while queued or after the end)."""
    if view is None:
        return '<div class="lora-studio-progress"><em>No run yet: fill in the form and press Start.</em></div>'
    fraction = view.step / view.total_steps if view.total_steps else 0.0
    rate = f"{view.it_per_s:.2f} it/s" if view.it_per_s else "- it/s"
    eta = format_duration(view.eta_s) if view.status in ("running", "stopping") else "-"
    text = (f"run #{view.id} {html.escape(view.label)}: <b>{view.status}</b> · step {view.step}/"
            f"{view.total_steps or '?'} · epoch {view.epoch} · {rate} · ETA {eta}")
    return (f'<div class="lora-studio-progress" data-status="{view.status}" data-step="{view.step}">'
            f'<div style="background:#8883;border-radius:4px;height:14px;overflow:hidden">'
            f'<div class="lora-studio-bar" style="width:{100 * fraction:.1f}%;height:100%;background:#1f5fa8"></div>'
            f'</div><div style="font-size:0.9em;margin-top:2px">{text}</div></div>')


def queue_table(views: Sequence[RunView]) -> str:
    """The runs of this session, newest first: id, label, status, steps, result."""
    if not views:
        return "<p><em>The queue is empty.</em></p>"
    rows = []
    for v in reversed(views):
        result = html.escape(v.result_file or v.error or "")
        rows.append(f"<tr><td>#{v.id}</td><td>{html.escape(v.label)}</td><td>{v.status}</td>"
                    f"<td>{v.step}/{v.total_steps or '?'}</td><td>{result}</td></tr>")
    head = "<tr><th>run</th><th>name</th><th>status</th><th>steps</th><th>file / error</th></tr>"
    body = "".join(rows)
    return f'<table class="lora-studio-table lora-studio-queue"><thead>{head}</thead><tbody>{body}</tbody></table>'
