"""LoRA Studio's entry point in the AUTOMATIC1111 / Forge web UI: the training and tools tabs, per-block LoRA
weights (`<lora:name:1:lbw=...>`), X/Y/Z plot axes, settings and API routes. Everything lives in `lib_lora`; the
web UI finds the always-visible script class below and calls the callbacks `register()` added."""
from lib_lora.host.webui import register

LoraStudioScript = register()
