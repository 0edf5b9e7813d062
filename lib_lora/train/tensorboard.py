"""TensorBoard logging of a run (loss, smoothed loss, validation loss, lr per group, sample images), as a
ProgressEvent listener. The log folder is `<logging_dir>/<log_prefix><timestamp>`, as sd-scripts names it."""
from __future__ import annotations

import time
from pathlib import Path

from lib_lora.train.events import ProgressEvent


class TensorBoardLogger:
    """Writes events with torch's SummaryWriter; if tensorboard is not installed, says so once and stays silent."""

    def __init__(self, logging_dir: Path, prefix: str | None = None):
        self.folder = Path(logging_dir) / f"{prefix or ''}{time.strftime('%Y%m%d%H%M%S')}"
        self.writer = None
        self.unavailable: str | None = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            self.unavailable = f"TensorBoard logging is off: {exc} (pip install tensorboard)"
            return
        self._writer_class = SummaryWriter

    def __call__(self, event: ProgressEvent) -> None:
        if event.kind == "start" and self.writer is None and self.unavailable is None:
            # made only once the run starts: a run refused before its first step leaves no folder behind
            self.folder.mkdir(parents=True, exist_ok=True)
            self.writer = self._writer_class(str(self.folder))
        w = self.writer
        if w is None:
            return
        if event.kind == "start":
            w.add_text("config", "```\n" + event.data.get("config", "") + "\n```", event.step)
            if event.data.get("notes"):
                w.add_text("notes", "\n".join(f"- {n}" for n in event.data["notes"]), event.step)
        elif event.kind == "step":
            w.add_scalar("loss/current", event.loss, event.step)
            if event.smoothed is not None:
                w.add_scalar("loss/average", event.smoothed, event.step)
            for name, lr in event.lrs.items():
                w.add_scalar(f"lr/{name}", lr, event.step)
            for name, value in event.data.get("max_norm", {}).items():  # sd-scripts' tags
                w.add_scalar(f"max_norm/{name}", value, event.step)
        elif event.kind == "validation" and event.val_loss is not None:
            w.add_scalar("loss/validation", event.val_loss, event.step)
        elif event.kind == "rollback":
            w.add_text("guard", event.message, event.step)
        elif event.kind == "sample":
            self._images(event)
        elif event.kind in ("done", "stopped"):
            w.add_text("report", event.message, event.step)
            w.flush()
            w.close()

    def _images(self, event: ProgressEvent) -> None:
        import numpy as np
        from PIL import Image

        for i, path in enumerate(event.paths):
            with Image.open(path) as im:
                array = np.asarray(im.convert("RGB"))
            self.writer.add_image(f"samples/{i:02d}", array, event.step, dataformats="HWC")
