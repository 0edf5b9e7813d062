"""LoRA tools: resize, merge LoRAs (more in progress)."""
