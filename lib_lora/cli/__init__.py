"""The command-line front door: `python -m lib_lora COMMAND ...`.

Each command is a module in this package with `add_arguments(parser)` and `run(args) -> int`; the
registry below is the list the help shows. Commands import their engines lazily, so `info` never
loads diffusers.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from lib_lora.errors import LibLoraError

COMMANDS = {
    "info": ("lib_lora.cli.info_cmd", "show what a LoRA-family file holds"),
    "generate": ("lib_lora.cli.generate_cmd", "generate images with <lora:...> prompts (the Generate tab's engine)"),
    "train": ("lib_lora.cli.train_cmd", "train a LoRA-family network (sd-scripts option names, TOML)"),
    "merge": ("lib_lora.cli.merge_cmd", "merge LoRAs into a checkpoint (--model), or into one LoRA (exact or SVD)"),
    "resize": ("lib_lora.cli.resize_cmd", "resize a LoRA to a rank or by sd-scripts' dynamic rules"),
    "extract": ("lib_lora.cli.extract_cmd", "extract a LoRA from a fine-tuned checkpoint and its base"),
    "convert": ("lib_lora.cli.convert_cmd", "convert a LoRA: key spelling, precision, to plain LoRA, metadata"),
    "export-model": ("lib_lora.cli.export_model_cmd",
                     "write a model (e.g. the embedded one) as an LDM single-file checkpoint + yaml for the web UI"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lib_lora", description="LoRA Studio command line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        # No abbreviations: `train` passes every option it does not know itself on as an sd-scripts override,
        # and `--conf` silently meaning `--config` there would be a trap.
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    if getattr(module, "TAKES_OVERRIDES", False):
        # sd-scripts' options anywhere on the line (`train --config run.toml --max_train_steps 10`); a `--`
        # separator is tolerated, as older docs wrote it.
        args.overrides = [t for t in extra if t != "--"]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(module.run(args) or 0)
    except LibLoraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
