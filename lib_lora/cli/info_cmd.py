"""`python -m lib_lora info FILE [--json]`."""
from __future__ import annotations

import argparse

from lib_lora.info import describe, format_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a .safetensors LoRA/LyCORIS/diffusers/PEFT file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    info = describe(args.file)
    print(info.to_json() if args.json else format_text(info))
    return 0
