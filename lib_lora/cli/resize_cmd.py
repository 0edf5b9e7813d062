"""`python -m lib_lora resize IN --rank 32 --out OUT` / `--dynamic sv_fro --param 0.9`: resize a LoRA (sd-scripts'
resize_lora.py rules, computed through the factors)."""
from __future__ import annotations

import argparse

from lib_lora.cli.ops_common import add_common_arguments, add_rank_arguments, progress_bar, rank_rule


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="LoRA-family .safetensors to resize (non-LoRA modules come out as LoRA)")
    add_rank_arguments(parser, "new rank; with --dynamic, the most a module may keep")
    add_common_arguments(parser, "stored precision (default: the input's)")
    parser.add_argument("--verbose", action="store_true",
                        help="print every module: kept sum(S), Frobenius fraction, max(S) ratio, rank and alpha")


def run(args: argparse.Namespace) -> int:
    from lib_lora.errors import ConfigError
    from lib_lora.ops import ResizeRequest, resize

    rule = rank_rule(args.rank, args.conv_rank, args)
    if rule is None:
        raise ConfigError("--rank", None, "give --rank N and/or --dynamic METHOD --param P")
    request = ResizeRequest(args.input, args.out, rule, args.dtype, args.device, args.force)
    with progress_bar(not args.no_progress, "module") as (progress, stop):
        result = resize(request, progress, stop)
    lines = result.report().splitlines()
    print("\n".join(lines if args.verbose else lines[-1:]))
    for note in result.notes:
        print(note)
    print(f"wrote {result.output} ({result.info.algorithm}, rank {result.info.rank}, {result.seconds:.1f} s)")
    return 0
