"""`python -m lib_lora generate --prompt "..." [--model PATH|embedded] ...`: the Generate tab's code path
(the standalone host and `lora_generate`) from a terminal, with the same `<lora:...>` prompt syntax."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lib_lora.sd.samplers import SAMPLERS

    parser.add_argument("--model", default="embedded", help="checkpoint .safetensors (SD1/SD2/SDXL) or 'embedded'")
    parser.add_argument("--prompt", required=True, help='prompt, e.g. "a red circle <lora:style:0.8:lbw=OUTS>"')
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--seed", type=int, default=-1, help="seed (-1: random; image i of a batch uses seed + i)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.0, help="CFG scale")
    parser.add_argument("--sampler", default="Euler a", help=f"one of: {', '.join(SAMPLERS)}")
    parser.add_argument("--width", type=int, default=0, help="0: the model's native size")
    parser.add_argument("--height", type=int, default=0, help="0: the model's native size")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--lora-dir", default=None, help="LoRA folder (default: models/Lora)")
    parser.add_argument("--lbw-presets", default=None, help="user block-weight presets file")
    parser.add_argument("--outputs", default=None, help="outputs folder (default: outputs/)")
    parser.add_argument("--out", default=None, help="also write the image here (FILE.png; FILE-N.png for a batch)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _copy_targets(out: str, n: int) -> list[Path]:
    path = Path(out)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lib_lora.host.standalone import DEFAULT_LORA_DIR, DEFAULT_OUTPUTS_DIR, StandaloneHost
    from lib_lora.sd.pipeline import GenerationParams

    host = StandaloneHost(lora_dir=args.lora_dir or DEFAULT_LORA_DIR, outputs_dir=args.outputs or DEFAULT_OUTPUTS_DIR,
                          presets_file=args.lbw_presets)
    info = host.load_model(args.model)
    print(f"model: {info.label}")
    params = GenerationParams(args.prompt, args.negative, args.sampler, args.steps, args.cfg, args.seed,
                              args.width, args.height, args.batch_size)
    bar = None if args.no_progress else tqdm(total=args.steps, unit="step", leave=False)

    def progress(step: int, total: int) -> None:
        if bar is not None:
            bar.n = step
            bar.refresh()

    try:
        result = host.generate(params, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    for path, info_text in zip(result.paths, result.infotexts):
        print(f"saved {path}\n{info_text}")
    if args.out:
        for src, dst in zip(result.paths, _copy_targets(args.out, len(result.paths))):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)  # the saved PNG, parameters chunk included
            print(f"wrote {dst}")
    return 0
