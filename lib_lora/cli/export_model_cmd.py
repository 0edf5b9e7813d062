"""`python -m lib_lora export-model --model embedded|PATH --out FILE.safetensors`: write a model as one LDM-layout
checkpoint with the web UI's `.yaml` beside it (and a text-encoder config folder where the yaml needs one).

This is how the embedded tiny model reaches the web UI: copy the three outputs into its
`models/Stable-diffusion/` folder and pick the checkpoint there. The yaml names the text-encoder folder as
`models/Stable-diffusion/<stem>.text_encoder`, relative to the web UI's folder; for a web UI that keeps its
checkpoints elsewhere (--ckpt-dir, --data-dir), export into that folder with `--text-encoder-ref absolute`.
Two exports of the same model are byte-identical (the same checkpoint hash in the web UI).
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="embedded", help="'embedded' (default) or a checkpoint .safetensors")
    parser.add_argument("--out", required=True, help="FILE.safetensors to write (the yaml goes beside it)")
    parser.add_argument("--precision", choices=("fp16", "fp32"), default="fp16", help="stored dtype (default fp16)")
    parser.add_argument("--no-yaml", action="store_true", help="write the checkpoint only")
    parser.add_argument("--force", action="store_true", help="replace FILE if it exists")
    parser.add_argument("--text-encoder-ref", choices=("webui", "absolute"), default="webui",
                        help="how the yaml names the text-encoder folder: 'webui' (default) as "
                             "models/Stable-diffusion/<stem>.text_encoder, relative to the web UI's folder; "
                             "'absolute' as the absolute path of the folder written beside FILE")


def run(args: argparse.Namespace) -> int:
    import torch

    from lib_lora.errors import ConfigError
    from lib_lora.host.standalone import load_model_source
    from lib_lora.sd.checkpoint_save import save_checkpoint

    out = Path(args.out).expanduser()
    if out.exists() and not args.force:
        raise ConfigError("--out", str(out), "exists; pass --force to replace it")
    model = load_model_source(args.model, "cpu", torch.float32)
    dtype = torch.float16 if args.precision == "fp16" else torch.float32
    out.parent.mkdir(parents=True, exist_ok=True)
    saved = save_checkpoint(model, out, dtype=dtype, write_yaml=not args.no_yaml,
                            text_encoder_ref=args.text_encoder_ref)
    print(f"wrote {saved.path}")
    for extra in (saved.yaml_path, saved.text_encoder_dir):
        if extra:
            print(f"wrote {extra}")
    return 0
