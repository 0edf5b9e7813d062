"""lib_lora: the engine of LoRA Studio.

Core (this package minus `ui/`, `host/`, `app.py`) imports neither the web UI (`modules.*`) nor gradio.
"""
__version__ = "0.1.0"
