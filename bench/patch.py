"""Apply + restore a rank-32 LoRA (every U-Net and text-encoder target, block weights on) on a
full-size SD1.5-shaped U-Net + text encoder (random weights from a local config, nothing downloaded),
against diffusers `load_lora_weights` + `fuse_lora` + `unfuse_lora` (+ `unload_lora_weights`, which puts the
model back as it was) on the same model in the same run. Target: ratio ours / diffusers <= 1.0.

    .venv/bin/python bench/patch.py [--repeat 3] [--dtype float32|float16]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository root is the base

from bench.common import ROOT, report, timed
from lib_lora import blocks
from lib_lora.io import save_file
from lib_lora.networks import load_network
from lib_lora.patching import Application, WeightPatcher
from lib_lora.types import Arch
from tests.fullsize import CLIP_L, SD15_UNET
from tests.helpers import checksum, make_network_file, targets_of


def build(dtype):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        te = CLIPTextModel(CLIPTextConfig(**CLIP_L))
    for m in (unet, te):
        m.to_empty(device="cpu")
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.02)
        m.to(dtype).eval().requires_grad_(False)
    return unet, te


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    warnings.filterwarnings("ignore")
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    unet, te = build(dtype)
    comps = SimpleNamespace(unet=unet, text_encoders=[te])
    targets = targets_of(comps, Arch.SD1)
    selected = targets.select(["attn", "te_attn", "te_mlp"])
    tmp = tempfile.TemporaryDirectory()
    path = f"{tmp.name}/rank32.safetensors"
    save_file(make_network_file(selected, "lora", rank=32, seed=0, dtype=dtype), path)
    weights = blocks.resolve("0.5,1,1,1,0.8,0.8,0.8,1,0.6,0.6,0.6,1,1,1,1,1,1", Arch.SD1)
    original = checksum(unet, te)
    patcher = WeightPatcher(targets)

    def ours():
        net = load_network(path, arch=Arch.SD1)
        patcher.apply([Application(net, te=1.0, unet=1.0, blocks=weights)])
        patcher.restore()

    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(block_out_channels=(32,), norm_num_groups=8), text_encoder=te,
        tokenizer=CLIPTokenizer.from_pretrained(ROOT / "models" / "tokenizer"), unet=unet,
        scheduler=EulerDiscreteScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    scales = {"text_encoder": 0.5, "unet": {"down": 0.8, "mid": 1.0, "up": 0.6}}

    def theirs():
        pipe.load_lora_weights(path, adapter_name="bench")
        pipe.set_adapters(["bench"], adapter_weights=[scales])
        pipe.fuse_lora(adapter_names=["bench"])
        pipe.unfuse_lora()
        pipe.unload_lora_weights()

    t_ours, s_ours = timed(ours, args.repeat)
    assert checksum(unet, te) == original, "our restore must be bit-exact"
    t_theirs, s_theirs = timed(theirs, args.repeat)
    report("patch", {
        "model": "SD1.5-shaped U-Net + CLIP-L text encoder, random weights", "dtype": args.dtype,
        "lora": f"rank 32, {len(selected)} modules, block weights on",
        "ours_s": round(t_ours, 3), "diffusers_s": round(t_theirs, 3),
        "ours_samples": [round(s, 3) for s in s_ours], "diffusers_samples": [round(s, 3) for s in s_theirs],
        "ratio_ours_over_diffusers": round(t_ours / t_theirs, 3), "target": "<= 1.0",
        "bit_exact_restore": True,
    })


if __name__ == "__main__":
    main()
