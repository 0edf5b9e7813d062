"""HTTP routes LoRA Studio adds to the web UI's FastAPI app (`on_app_started`), under /lora-studio/v1.

    GET  /lora-studio/v1/status           host, model architecture, checkpoint, folders, the training job
    GET  /lora-studio/v1/presets          block-weight presets: built-in ones for the loaded model, the user's file
    GET  /lora-studio/v1/xyz-axes         the X/Y/Z plot's axis labels, in the order its type indexes count
    POST /lora-studio/v1/train            start training the loaded model: {"options": {sd-scripts names}}
    GET  /lora-studio/v1/train[?run=ID]   a run (default: the running one, else the latest): status, step, loss,
                                          files, report; and the list of runs
    POST /lora-studio/v1/train/stop       stop the running run after its current step (the LoRA and a resumable
                                          state are saved); {"resume_run": ID} to POST /train continues it

Bodies and answers are plain JSON (no pydantic models: the hosts ship pydantic 1 and 2). Bad input answers
400 with {"error": message}; nothing is started then.
"""
from __future__ import annotations

from typing import Any

from lib_lora import blocks
from lib_lora.errors import LibLoraError

PREFIX = "/lora-studio/v1"


def add_routes(app: Any, adapter: Any) -> None:
    from fastapi import Body
    from fastapi.responses import JSONResponse

    def guarded(fn, *args) -> Any:
        try:
            return fn(*args)
        except LibLoraError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)

    @app.get(f"{PREFIX}/status")
    def status() -> dict:
        out = adapter.status()
        out["training"] = adapter.training().status() if hasattr(adapter, "training") else None
        return out

    @app.get(f"{PREFIX}/presets")
    def presets() -> Any:
        return guarded(lambda: {"builtin": blocks.builtin_presets(adapter.arch()), "user": adapter.user_presets()})

    @app.get(f"{PREFIX}/xyz-axes")
    def xyz_axes(tab: str = "txt2img") -> dict:
        return {"tab": tab, "labels": adapter.xyz_axis_labels(tab == "img2img")}

    if not hasattr(adapter, "training"):
        return

    @app.post(f"{PREFIX}/train")
    def train(body: dict = Body(...)) -> Any:  # noqa: B008 - FastAPI's way of declaring a JSON body
        return guarded(adapter.training().start, body)

    @app.get(f"{PREFIX}/train")
    def train_status(run: int | None = None) -> Any:
        return guarded(adapter.training().status, run)

    @app.post(f"{PREFIX}/train/stop")
    def train_stop() -> dict:
        return adapter.training().stop()
