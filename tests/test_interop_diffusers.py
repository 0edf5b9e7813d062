"""Interop oracle: diffusers `load_lora_weights` + `fuse_lora` on the same tiny pipelines gives the same
weights as our merge, for kohya LoRA and LoCon files, on SD1 and SDXL, in fp32 and fp16."""
from __future__ import annotations

import warnings

import pytest
import torch

from lib_lora.io import save_file
from lib_lora.networks import load_network
from lib_lora.patching import Application, WeightPatcher
from lib_lora.sd.tiny import tiny_components
from lib_lora.types import Arch, Component
from tests.conftest import ROOT
from tests.helpers import make_network_file, targets_of

ROLES = {"lora": ["attn", "te_attn", "te_mlp"], "locon": ["attn", "resnet", "sampler", "te_attn", "te_mlp"]}
TOL = {torch.float32: 1e-6, torch.float16: 2e-3}


def _pipeline(arch: Arch, comps):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(ROOT / "models" / "tokenizer")
    if arch is Arch.SDXL:
        return StableDiffusionXLPipeline(vae=comps.vae, text_encoder=comps.text_encoders[0],
                                         text_encoder_2=comps.text_encoders[1], tokenizer=tok, tokenizer_2=tok,
                                         unet=comps.unet, scheduler=EulerDiscreteScheduler())
    return StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoders[0], tokenizer=tok, unet=comps.unet,
                                   scheduler=EulerDiscreteScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _weight(root, path):
    m = root.get_submodule(path)
    return (m.base_layer if hasattr(m, "base_layer") else m).weight.detach().clone()


@pytest.mark.parametrize("arch", [Arch.SD1, Arch.SDXL])
@pytest.mark.parametrize("kind", ["lora", "locon"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_our_merge_equals_diffusers_fuse(arch, kind, dtype, tmp_path):
    ref = tiny_components(arch.value, seed=5)
    for m in ref.text_encoders + [ref.unet]:
        m.to(dtype)
    selected = targets_of(ref, arch).select(ROLES[kind])
    path = tmp_path / f"{kind}.safetensors"
    save_file(make_network_file(selected, "lora", rank=4, seed=1, dtype=dtype), path)
    pipe = _pipeline(arch, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora(lora_scale=0.7)
    roots = {Component.UNET: ref.unet, Component.TE: ref.text_encoders[0],
             Component.TE1: ref.text_encoders[0], Component.TE2: ref.text_encoders[-1]}
    theirs = {t.name: _weight(roots[t.component], t.path) for t in selected}

    ours = tiny_components(arch.value, seed=5)
    for m in ours.text_encoders + [ours.unet]:
        m.to(dtype)
    targets = targets_of(ours, arch)
    report = WeightPatcher(targets).apply([Application(load_network(path, arch=arch), te=0.7, unet=0.7)])
    assert sum(report.applied.values()) == len(selected)
    for t in selected:
        torch.testing.assert_close(targets[t.name].param.detach(), theirs[t.name], atol=TOL[dtype], rtol=TOL[dtype],
                                   msg=lambda m, n=t.name: f"{n}: {m}")
