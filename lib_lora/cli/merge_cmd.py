"""`python -m lib_lora merge ...`: LoRAs into a checkpoint (`--model`), or LoRAs into one LoRA.

    merge --model M.safetensors --lora A.safetensors:0.8 --lora "B.safetensors:1:lbw=OUTALL" --out merged.safetensors
    merge --lora A.safetensors:0.7 --lora B.safetensors:0.5 --out AB.safetensors             (exact: ranks stacked)
    merge --lora A.safetensors:0.7 --lora B.safetensors:0.5 --rank 32 --out AB.safetensors   (SVD to rank 32)
A `--lora` value is written as after `<lora:` in a prompt, with a path for the name: PATH[:te[:unet]][:lbw=...].
"""
from __future__ import annotations

import argparse

from lib_lora.cli.ops_common import add_common_arguments, add_rank_arguments, progress_bar, rank_rule


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__.split("\n", 1)[1]
    parser.add_argument("--model", default=None, help="checkpoint .safetensors (SD1/SD2/SDXL) to merge the LoRAs into")
    parser.add_argument("--lora", action="append", required=True, metavar="PATH[:te[:unet]][:lbw=..]",
                        help="a LoRA and its strengths (repeat for several); lbw= takes a preset or a list")
    add_rank_arguments(parser, "LoRA + LoRA: merge by SVD to this rank (default: exact, ranks stacked)")
    parser.add_argument("--clamp-quantile", type=float, default=None,
                        help="SVD merge: clamp the factors at this quantile as sd-scripts' svd_merge_lora does (it "
                             "uses 0.99; default: no clamp, the best approximation at the rank)")
    add_common_arguments(parser, "stored precision (default: as the input; for --model each tensor keeps its own)")


def run(args: argparse.Namespace) -> int:
    from lib_lora.errors import ConfigError
    from lib_lora.ops import LoraInput, MergeLorasRequest, MergeModelRequest, merge_into_model, merge_loras

    loras = tuple(LoraInput.parse(spec) for spec in args.lora)
    rule = rank_rule(args.rank, args.conv_rank, args)
    if args.model:
        if rule is not None:
            raise ConfigError("--rank", args.rank, "a merge into a checkpoint has no rank; drop --rank/--dynamic")
        request = MergeModelRequest(args.model, loras, args.out, args.dtype, args.device, args.force)
        with progress_bar(not args.no_progress, "tensor") as (progress, stop):
            result = merge_into_model(request, progress, stop)
        for name, count in result.applied.items():
            missing = result.unmatched[name]
            print(f"{name}: {count} modules merged" + (f", {len(missing)} not in the model" if missing else ""))
        print(f"wrote {result.output} ({result.arch.label}, {result.tensors} tensors, {result.seconds:.1f} s)")
        return 0
    if rule is None and args.clamp_quantile is not None:
        raise ConfigError("--clamp-quantile", args.clamp_quantile, "applies to an SVD merge (give --rank/--dynamic)")
    request = MergeLorasRequest(loras, args.out, "exact" if rule is None else "svd", rule, args.clamp_quantile,
                                args.dtype, args.device, args.force)
    with progress_bar(not args.no_progress, "module") as (progress, stop):
        result = merge_loras(request, progress, stop)
    for note in result.notes:
        print(note)
    print(f"wrote {result.output} ({request.mode}, rank {result.info.rank}, {len(result.modules)} modules, "
          f"{result.seconds:.1f} s)")
    return 0
