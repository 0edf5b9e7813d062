"""`python -m lib_lora extract --base B --tuned T --dim 64 [--conv-dim 32] --out OUT`: a LoRA of the difference
between a fine-tuned checkpoint and its base (sd-scripts' extract_lora_from_models.py)."""
from __future__ import annotations

import argparse

from lib_lora.cli.ops_common import add_common_arguments, add_rank_arguments, progress_bar


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="the original checkpoint .safetensors")
    parser.add_argument("--tuned", required=True, help="the fine-tuned checkpoint .safetensors")
    add_rank_arguments(parser, "rank of linear and 1x1 layers (default 4); with --dynamic, the cap",
                       rank_flag="--dim", conv_flag="--conv-dim")
    parser.set_defaults(conv_dim=None)
    parser.add_argument("--clamp-quantile", type=float, default=0.99, help="clamp factors at this quantile (0.99)")
    parser.add_argument("--no-clamp", action="store_true", help="no quantile clamp")
    parser.add_argument("--min-diff", type=float, default=0.01,
                        help="text encoders whose weights moved by at most this are left out (0.01)")
    parser.add_argument("--svd", choices=("auto", "full", "lowrank"), default="auto",
                        help="auto: randomized SVD where the leading ranks suffice, full SVD otherwise")
    add_common_arguments(parser, "stored precision (default fp16)")


def run(args: argparse.Namespace) -> int:
    from lib_lora.ops import ExtractRequest, extract

    dim = args.dim if args.dim is not None else (None if args.dynamic else 4)
    request = ExtractRequest(args.base, args.tuned, args.out, dim, args.conv_dim, args.dynamic or "fixed", args.param,
                             None if args.no_clamp else args.clamp_quantile, args.min_diff, args.svd,
                             args.dtype or "fp16", args.device, args.force)
    with progress_bar(not args.no_progress, "tensor") as (progress, stop):
        result = extract(request, progress, stop)
    for note in result.notes:
        print(note)
    print(f"wrote {result.output} ({len(result.modules)} modules, rank {result.info.rank}; SVD "
          f"{result.svd_used['lowrank']} randomized, {result.svd_used['full']} full; {result.seconds:.1f} s)")
    return 0
