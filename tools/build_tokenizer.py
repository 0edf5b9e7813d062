"""Build CLIP tokenizer files (vocab.json, merges.txt) offline.

The byte-pair-encoding table CLIP was trained with ships inside the `open-clip-torch` wheel as
`open_clip/bpe_simple_vocab_16e6.txt.gz`. CLIP's vocabulary is derived from it deterministically
(256 byte symbols, the same with an end-of-word marker, one entry per merge, then the two special
tokens), so `transformers.CLIPTokenizer` can be built without downloading anything from a model hub.

Usage:  python tools/build_tokenizer.py [--bpe PATH/bpe_simple_vocab_16e6.txt.gz] [--out models/tokenizer]
Without --bpe the wheel is fetched with `pip download --no-deps open-clip-torch` (a package install).
"""
from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
N_MERGES = VOCAB_SIZE - 256 * 2 - 2  # 48894 merges are used by CLIP


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def read_bpe_from_wheel() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, "open-clip-torch==3.3.0"],
            check=True,
        )
        wheel = next(Path(tmp).glob("open_clip_torch-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(BPE_MEMBER)


def build(bpe_gz: bytes, out: Path) -> None:
    lines = gzip.decompress(bpe_gz).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != VOCAB_SIZE:
        raise SystemExit(f"unexpected vocabulary size {len(vocab)} (expected {VOCAB_SIZE})")
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    merge_text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    (out / "merges.txt").write_text(merge_text, encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = dict(special, model_max_length=77, do_lower_case=True, tokenizer_class="CLIPTokenizer")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bpe", type=Path, help="path to bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "models" / "tokenizer")
    args = parser.parse_args()
    data = args.bpe.read_bytes() if args.bpe else read_bpe_from_wheel()
    build(data, args.out)
    print(f"wrote tokenizer files to {args.out}")


if __name__ == "__main__":
    main()
