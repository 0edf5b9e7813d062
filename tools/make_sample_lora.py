"""Build the sample LoRA shipped in `models/Lora/`: a "pastel" style for the embedded tiny model, trained by our own
CLI (`python -m lib_lora train --config ...`), so a new user has something to generate with, vary block weights on
and plot on the first start.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/make_sample_lora.py [--out models/Lora/sample-pastel.safetensors]

The dataset is rendered here from the embedded model's own world (`lib_lora.sd.shapes`): shapes and backgrounds
drawn in pastel colours (each colour mixed halfway with white), captioned `a red circle on a blue background,
pastel`, so the trigger word `pastel` washes the colours out while the prompt still picks shape and colours.
Seeded: the same command writes the same file (on the same machine and torch build).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib_lora.sd.sample_dataset import write_sample_dataset  # noqa: E402

TRIGGER = "pastel"
NAME = "sample-pastel"
DESCRIPTION = "Sample LoRA for the embedded tiny model: it lightens colours towards pastel (trigger word 'pastel')."


def run_toml(path: Path, data: Path, out: Path, steps: int, seed: int) -> Path:
    text = f"""# the sample LoRA: python -m lib_lora train --config {path.name}
pretrained_model_name_or_path = "embedded"
train_data_dir = "{data}"
caption_extension = ".txt"
resolution = 64
output_dir = "{out}"
output_name = "{NAME}"
save_precision = "fp16"
network_module = "networks.lora"
network_dim = 4
network_alpha = 4
optimizer_type = "AdamW"
learning_rate = 1e-3
lr_scheduler = "cosine"
lr_warmup_steps = 20
max_train_steps = {steps}
train_batch_size = 4
seed = {seed}
min_snr_gamma = 5
metadata_title = "Pastel (LoRA Studio sample)"
metadata_trigger_phrase = "{TRIGGER}"
metadata_description = "{DESCRIPTION}"
metadata_author = "LoRA Studio"
metadata_license = "same as LoRA Studio"
training_comment = "made by tools/make_sample_lora.py"
"""
    path.write_text(text, encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "models" / "Lora" / f"{NAME}.safetensors"))
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", help="keep the dataset and run TOML in this folder (default: a temporary folder)")
    args = p.parse_args(argv)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="sample-lora-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        data = write_sample_dataset(work / "data", "pastel", args.images, args.seed).folder
        config = run_toml(work / "run.toml", data, work / "out", args.steps, args.seed)
        cmd = [sys.executable, "-m", "lib_lora", "train", "--config", str(config), "--no-progress"]
        print("[sample]", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(work / "out" / f"{NAME}.safetensors", out)
        print(f"[sample] wrote {out} ({out.stat().st_size / 1024:.0f} KiB)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
