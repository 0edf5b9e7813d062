"""The Training tab: the generated form (`TrainForm`), Load/Save TOML, dataset preview with time and memory
estimates, Start / Stop / Resume on the host's run queue, and the live run (progress, loss and lr chart, sample
images, guard events, log, queue, the finished file). The run lives in the host process: this tab polls it, so a
reloaded page shows the live run again.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import gradio as gr

from lib_lora.errors import LibLoraError
from lib_lora.sd.sample_dataset import write_sample_dataset
from lib_lora.train.form_toml import form_from_toml, toml_from_form
from lib_lora.train.preview import DatasetPreview, preview_dataset
from lib_lora.train.runs import Estimate, RunView, format_duration
from lib_lora.train.schema import config_from_form
from lib_lora.ui import charts
from lib_lora.ui.compat import file_path, message, poll, update
from lib_lora.ui.train_form import PROMPTS_FIELD, TrainForm, elem_id

POLL_SECONDS = 1.0
SHOWN_SAMPLES = 8
# A first run on the sample dataset: about a minute on a CPU with the embedded model.
SAMPLE_RUN = {"output_name": "my-first-lora", "caption_extension": ".txt", "resolution": "64", "max_train_steps": 150,
              "train_batch_size": 4, "learning_rate": 1e-3, "network_dim": 8, "network_alpha": 8,
              "sample_every_n_steps": "50", "sample_prompts": "", "seed": "3"}


def preview_html(preview: DatasetPreview, estimate: Estimate | None) -> str:
    """The dataset preview as HTML (escaped: folder names and tags are user data)."""
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(f.path)}</td><td>{f.images}</td><td>{f.repeats}</td><td>{esc(f.class_tokens)}"
        f"{' (reg)' if f.is_reg else ''}</td><td>{f.captions_found}/{f.images} ({100 * f.caption_coverage:.0f}%)"
        f"</td><td>{esc(', '.join(f'{t} ({n})' for t, n in f.top_tags))}</td></tr>" for f in preview.folders)
    parts = ['<div class="lora-studio-preview"><table class="lora-studio-table"><thead><tr><th>folder</th>'
             "<th>images</th><th>repeats</th><th>class / trigger</th><th>captions</th><th>most frequent tags</th>"
             f"</tr></thead><tbody>{rows}</tbody></table>"]
    if preview.problems:
        items = "".join(f"<li><code>{esc(p.path)}</code>: {esc(p.reason)}</li>" for p in preview.problems)
        parts.append(f'<p><b>{len(preview.problems)} problem(s)</b> (fix them before training):</p>'
                     f'<ul class="lora-studio-problems">{items}</ul>')
    else:
        buckets = ", ".join(f"{w}x{h}: {n}" for (w, h), n in preview.buckets)
        parts.append(f"<p>Buckets (resolution: images with repeats): {esc(buckets)}<br>{esc(preview.summary)}; "
                     f"{preview.steps_per_epoch} steps per epoch, {preview.epochs} epoch(s).</p>")
        if estimate is not None:
            memory = f", about {estimate.memory_mb:.0f} MiB more memory" if estimate.memory_mb is not None else ""
            parts.append(f"<p>Estimate: {format_duration(estimate.seconds(preview.total_steps))} "
                         f"({estimate.seconds_per_step:.3f} s/step{memory}; from the {esc(estimate.source)}).</p>")
        else:
            parts.append("<p>No run of this kind on this model yet: press <b>Measure speed</b> for a short warm-up "
                         "that times a few steps.</p>")
    for warning in preview.warnings:
        parts.append(f"<p><b>Note:</b> {esc(warning)}</p>")
    return "".join(parts) + "</div>"


class TrainTab:
    """The tab; `build()` inside a Blocks context."""

    def __init__(self, host):
        self.host = host
        self.form = TrainForm(host)
        self.load_path = self.dataset_path = self.upload = self.load_button = None
        self.save_path = self.save_button = self.status = None
        self.preview_button = self.measure_button = self.preview = self.sample_button = None
        self.start_button = self.stop_button = self.resume_button = self.resume_from = None
        self.progress = self.chart = self.samples = self.log = self.queue = self.result = self.seen = None

    # ------------------------------------------------------------------------------------ layout

    def build(self) -> None:
        with gr.Row():
            self.load_path = gr.Textbox(label="Load a run TOML (sd-scripts / kohya_ss)", elem_id=elem_id("load_path"),
                                        scale=3)
            self.dataset_path = gr.Textbox(label="... and its dataset TOML (optional)", scale=2,
                                           elem_id=elem_id("load_dataset"))
            self.upload = gr.File(label="or upload a run TOML", file_types=[".toml"], scale=2)
            self.load_button = gr.Button("Load TOML", elem_id=elem_id("load"), scale=1)
        with gr.Row():
            self.save_path = gr.Textbox(label="Save as TOML (what `python -m lib_lora train --config FILE` runs)",
                                        elem_id=elem_id("save_path"), scale=5)
            self.save_button = gr.Button("Save TOML", elem_id=elem_id("save"), scale=1)
        self.status = gr.Markdown("", elem_id=elem_id("status"))
        self.form.build()
        with gr.Row():
            self.sample_button = gr.Button("Create a sample dataset (for the embedded model)",
                                           elem_id=elem_id("sample_dataset"))
            self.preview_button = gr.Button("Preview dataset", elem_id=elem_id("preview_button"))
            self.measure_button = gr.Button("Measure speed (warm-up)", elem_id=elem_id("measure"))
        self.preview = gr.HTML("", elem_id=elem_id("preview"))
        with gr.Row():
            self.start_button = gr.Button("Start (queue)", variant="primary", elem_id=elem_id("start"))
            self.stop_button = gr.Button("Stop (saves a resumable state)", elem_id=elem_id("stop"))
            self.resume_button = gr.Button("Resume", elem_id=elem_id("resume"))
            self.resume_from = gr.Textbox(label="Resume from a state folder (empty: the last stopped run)",
                                          elem_id=elem_id("resume_from"))
        self._build_live()
        self.wire()

    def _build_live(self) -> None:
        latest = self.host.training().latest()
        self.progress = gr.HTML(charts.progress_bar(latest), elem_id=elem_id("progress"))
        with gr.Row():
            with gr.Column(scale=3):
                self.chart = gr.HTML(charts.loss_chart(latest), elem_id=elem_id("chart"))
            with gr.Column(scale=2):
                self.samples = gr.Gallery(label="Latest sample images", columns=4, height=260,
                                          elem_id=elem_id("samples"))
        self.result = gr.Markdown("", elem_id=elem_id("result"))
        with gr.Row():
            self.log = gr.Textbox(label="Log", lines=10, max_lines=10, interactive=False, elem_id=elem_id("log"))
            self.queue = gr.HTML(charts.queue_table(self.host.training().runs()), elem_id=elem_id("queue"))
        self.seen = gr.State("")

    def wire(self) -> None:
        fields = self.form.components()
        labels = list(self.form.fields.values())
        live = [self.progress, self.chart, self.samples, self.log, self.queue, self.result, self.seen]
        self.load_button.click(self.on_load, inputs={self.load_path, self.dataset_path, self.upload, *fields},
                               outputs=[*fields, self.status])
        self.save_button.click(self.on_save, inputs={self.save_path, *fields}, outputs=[*labels, self.status])
        self.sample_button.click(self.on_sample_dataset, inputs=None, outputs=[*fields, self.status])
        self.preview_button.click(self.on_preview, inputs=set(fields), outputs=[*labels, self.status, self.preview])
        self.measure_button.click(self.on_measure, inputs=set(fields), outputs=[*labels, self.status, self.preview])
        self.start_button.click(self.on_start, inputs=set(fields), outputs=[*labels, self.status])
        self.stop_button.click(self.on_stop, inputs=None, outputs=[self.status], queue=False)
        self.resume_button.click(self.on_resume, inputs={self.resume_from, *fields}, outputs=[*labels, self.status])
        poll(self.on_poll, live, POLL_SECONDS, inputs=[self.seen])

    # ------------------------------------------------------------------------------------ handlers

    def _config(self, data: dict, **overrides: Any):
        """(config or None, label updates, error text) for the form's values."""
        values = {**self.form.values(data), **overrides}
        cfg, errors, text = self.form.check(values, lambda v: config_from_form(self.form.engine_values(v)))
        return cfg, values, self.form.labels(errors), text

    def on_start(self, data: dict) -> dict:
        """Check the form with the engine; queue the run (never two at once)."""
        cfg, values, labels, error = self._config(data)
        if cfg is None:
            return {**labels, self.status: message(f"{error} — nothing was started", "error")}
        self.form.remember(values)
        view = self.host.training().submit(cfg)
        where = view.log[-1].removeprefix("[queued] ") if view.log else "queued"
        notes = "".join(f"\n\n- {html.escape(n)}" for n in cfg.notes)
        return {**labels, self.status: message(f"Run #{view.id} ({view.label}) queued: {where}.") + notes}

    def on_stop(self) -> dict:
        view = self.host.training().stop()
        if view is None:
            return {self.status: message("no run is training", "warning")}
        return {self.status: message(f"Run #{view.id}: {view.status}")}

    def on_resume(self, data: dict) -> dict:
        """Resume the last stopped run, or the typed state folder with the form's settings."""
        folder = (data[self.resume_from] or "").strip()
        manager = self.host.training()
        try:
            if not folder:
                stopped = [v for v in manager.runs() if v.status == "stopped" and v.resumable]
                if not stopped:
                    return {self.status: message("no stopped run to resume: give a state folder", "warning")}
                view = manager.resume(stopped[-1].id)
                return {self.status: message(f"Run #{view.id} ({view.label}) queued from {stopped[-1].state_dir}")}
            cfg, _, labels, error = self._config(data, resume=folder)
            if cfg is None:
                return {**labels, self.status: message(f"{error} — nothing was started", "error")}
            view = manager.submit(cfg, f"{cfg.output.output_name} (resumed)")
        except LibLoraError as exc:
            return {self.status: message(str(exc), "error")}
        return {**labels, self.status: message(f"Run #{view.id} ({view.label}) queued from {folder}")}

    def on_preview(self, data: dict) -> dict:
        cfg, _, labels, error = self._config(data)
        if cfg is None:
            return {**labels, self.status: message(error, "error"), self.preview: ""}
        preview = preview_dataset(cfg)
        return {**labels, self.status: "", self.preview: preview_html(preview, self.host.training().estimate(cfg))}

    def on_measure(self, data: dict) -> dict:
        cfg, _, labels, error = self._config(data)
        if cfg is None:
            return {**labels, self.status: message(error, "error")}
        preview = preview_dataset(cfg)
        if not preview.ok:
            return {**labels, self.status: "", self.preview: preview_html(preview, None)}
        try:
            estimate = self.host.training().measure(cfg)
        except LibLoraError as exc:
            return {**labels, self.status: message(str(exc), "error")}
        return {**labels, self.status: "", self.preview: preview_html(preview, estimate)}

    def on_sample_dataset(self) -> dict:
        """Write a small kohya folder of the embedded model's world and fill the form for a first run with it."""
        root = Path(self.host.settings_dir()) / "datasets"
        n = 1
        while (root / f"sample-sks-{n}").exists():
            n += 1
        try:
            made = write_sample_dataset(root / f"sample-sks-{n}", "pink")
        except LibLoraError as exc:
            return {self.status: message(str(exc), "error")}
        values = {**SAMPLE_RUN, "train_data_dir": str(made.folder), PROMPTS_FIELD: f"{made.prompt} --s 20 --d 1"}
        text = (f"wrote {made.images} images to {made.folder} (trigger word '{made.trigger}'); the form is set for a "
                f"first run: press Start, then try `{made.prompt} <lora:{SAMPLE_RUN['output_name']}:1>` in Generate")
        return {**self.form.fill(values), self.status: message(text)}

    def on_load(self, data: dict) -> dict:
        """Fill the form from a run TOML (typed path or upload), then show what the engine says about it."""
        path = file_path(data[self.upload]) or (data[self.load_path] or "").strip()
        if not path:
            return {self.status: message("give the path of a run TOML, or upload one", "warning")}
        dataset = (data[self.dataset_path] or "").strip() or None
        try:
            values, notes = form_from_toml(path, dataset, inline_dir=Path(self.host.settings_dir()) / "datasets")
        except LibLoraError as exc:
            return {self.status: message(f"{exc} — the form was not changed", "error")}
        values[PROMPTS_FIELD] = ""
        listed = "".join(f"\n\n- {html.escape(n)}" for n in notes)
        return {**self.form.fill(values), self.status: message(f"loaded {path}") + listed}

    def on_save(self, data: dict) -> dict:
        """Write the run TOML (only a config the engine accepts is written)."""
        target = (data[self.save_path] or "").strip()
        if not target:
            return {self.status: message("give a file name for the TOML", "warning")}
        cfg, values, labels, error = self._config(data)
        if cfg is None:
            return {**labels, self.status: message(f"{error} — nothing was written", "error")}
        path = Path(target).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(toml_from_form(self.form.engine_values(values), path.name), encoding="utf-8")
        tmp.replace(path)
        self.form.remember(values)
        text = f"saved {path}: run it with `python -m lib_lora train --config {path}`"
        return {**labels, self.status: message(text)}

    def on_poll(self, seen: str) -> dict:
        """The live state of the run to show (the running one, else the latest); sample images only when new."""
        manager = self.host.training()
        view = manager.latest()
        signature = f"{view.id}:{len(view.samples)}" if view else ""
        out = {self.progress: charts.progress_bar(view), self.chart: charts.loss_chart(view),
               self.log: "\n".join(view.log) if view else "", self.queue: charts.queue_table(manager.runs()),
               self.result: self.result_text(view), self.seen: signature}
        out[self.samples] = self.sample_images(view) if signature != seen else update()
        return out

    def sample_images(self, view: RunView | None) -> list:
        if view is None:
            return []
        from PIL import Image

        shown = []
        for path in view.samples[-SHOWN_SAMPLES:]:
            try:
                with Image.open(path) as im:
                    shown.append((im.convert("RGB"), Path(path).name))
            except OSError:
                continue  # deleted since: show the others
        return shown

    def result_text(self, view: RunView | None) -> str:
        """The finished (or stopped) run's file with its metadata, or what went wrong."""
        if view is None or not view.ended:
            return ""
        if view.error:
            return message(f"run #{view.id} failed: {view.error}", "error")
        lines = [html.escape(view.report)]
        if view.result_file:
            try:
                info = self.host.lora_info(Path(view.result_file).stem)
                lines.append(f"**{html.escape(Path(view.result_file).name)}**: {html.escape(info.algorithm)}, rank "
                             f"{info.rank}, {html.escape(info.arch)}, short hash `{info.short_hash}`; in "
                             f"{html.escape(self.host.lora_list_hint, quote=False)} as "
                             f"`<lora:{html.escape(Path(view.result_file).stem)}:1>`")
            except LibLoraError:
                lines.append(f"file: `{html.escape(view.result_file)}` (outside the LoRA folder)")
        if view.resumable:
            lines.append(f"resumable state: `{html.escape(view.state_dir)}` (press Resume)")
        return "\n\n".join(lines)
