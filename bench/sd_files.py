"""Full-size SD1.5-shaped files with random weights for the ops benchmarks (nothing downloaded): a single-file
LDM checkpoint with the tensor names and shapes of a real v1-5 file, a fine-tune of it whose change looks like
a real one's (`tests/ops/synthetic.py`), and the rank-128 / rank-64 LoRAs of
`../shared/fixtures/sd-scripts-tools/make_loras.py`. About 4.6 GB in all; written tensor by tensor.

    .venv/bin/python -m bench.sd_files OUT_DIR
"""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT  # noqa: E402
from tests.ops.synthetic import sd15_shapes, write_checkpoint  # noqa: E402

FIXTURES = ROOT.parent / "shared" / "fixtures"


def files(out: Path) -> dict[str, Path]:
    return {"base": out / "sd15-random-fp16.safetensors", "tuned": out / "sd15-tuned-fp16.safetensors",
            "rank128": out / "rank128.safetensors", "rank64": out / "rank64_b.safetensors"}


def ensure(out: Path) -> dict[str, Path]:
    """Write whichever of the files is missing; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = files(out)
    shapes = None
    for what in ("base", "tuned"):
        if not paths[what].exists():
            shapes = shapes or sd15_shapes()
            write_checkpoint(paths[what], shapes, tuned=what == "tuned")
    if not paths["rank128"].exists() or not paths["rank64"].exists():
        script = FIXTURES / "sd-scripts-tools" / "make_loras.py"
        argv, sys.argv = sys.argv, [str(script), str(FIXTURES / "real-lora" / "sd15_locon.safetensors"), str(out)]
        try:
            runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv = argv
    return paths


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    for path in ensure(parser.parse_args().out).values():
        print(path)


if __name__ == "__main__":
    main()
