"""`python -m lib_lora convert IN --to diffusers|kohya|lora --out OUT [--dtype fp16]`: key spelling, precision,
LoHa/LoKr/DoRA to plain LoRA, metadata edits."""
from __future__ import annotations

import argparse

from lib_lora.cli.ops_common import add_common_arguments, add_rank_arguments, progress_bar, rank_rule


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="LoRA-family .safetensors (kohya, LyCORIS, diffusers or PEFT spelling)")
    parser.add_argument("--to", choices=("kohya", "diffusers", "lora"), default="kohya",
                        help="kohya: kohya/LyCORIS spelling; diffusers: diffusers/PEFT spelling (lora_A/lora_B); "
                             "lora: plain LoRA, other algorithms by an SVD of their real change")
    add_rank_arguments(parser, "rank for modules turned into LoRA (LoHa, LoKr, DoRA, full)")
    parser.add_argument("--model", default=None, help="base checkpoint: needed to turn DoRA or IA3 into LoRA")
    parser.add_argument("--strip-metadata", action="store_true",
                        help="keep only what loaders need (network and architecture facts, hashes)")
    parser.add_argument("--set-metadata", action="append", default=[], metavar="KEY=VALUE", help="set a key")
    parser.add_argument("--drop-metadata", action="append", default=[], metavar="KEY", help="remove a key")
    add_common_arguments(parser, "stored precision (default: the input's)")


def run(args: argparse.Namespace) -> int:
    from lib_lora.errors import ConfigError
    from lib_lora.ops import ConvertRequest, convert

    pairs = []
    for item in args.set_metadata:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError("--set-metadata", item, "expected KEY=VALUE")
        pairs.append((key, value))
    request = ConvertRequest(args.input, args.out, args.to, rank_rule(args.rank, args.conv_rank, args), args.model,
                             args.dtype, args.strip_metadata, tuple(pairs), tuple(args.drop_metadata),
                             device=args.device, force=args.force)
    with progress_bar(not args.no_progress, "module") as (progress, stop):
        result = convert(request, progress, stop)
    for note in result.notes:
        print(note)
    info = result.info
    print(f"wrote {result.output} ({args.to}: {info.algorithm}, rank {info.rank}, {result.seconds:.1f} s)")
    return 0
