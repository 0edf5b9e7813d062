"""Test helpers: random LoRA-family files for a model's targets, model checksums."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from lib_lora.io import save_file
from lib_lora.keys import ModelTargets, Target, clip_text_targets, unet_targets
from lib_lora.sd.model import SDModel
from lib_lora.types import Arch, Component

ROOT = Path(__file__).resolve().parents[1]
TAGS = {"shapes": {"red circle": 12, "blue square": 7, "sks": 20}}


def targets_of(components, arch: Arch, spelling: str = "diffusers") -> ModelTargets:
    comps = [Component.TE1, Component.TE2] if arch is Arch.SDXL else [Component.TE]
    parts = [unet_targets(components.unet, arch, spelling)]
    parts += [clip_text_targets(te, c) for te, c in zip(components.text_encoders, comps)]
    return ModelTargets.merge(arch, parts)


def lora_tensors(target: Target, algo: str, rank: int, g: torch.Generator, scale: float = 0.05,
                 dtype=torch.float32) -> dict[str, torch.Tensor]:
    """File tensors (suffix -> tensor) of one random module of `algo` for `target`."""
    shape = target.shape
    out_f, in_f, kernel = shape[0], shape[1] if len(shape) > 1 else 1, tuple(shape[2:])

    def r(*s):
        return (torch.randn(*s, generator=g) * scale).to(dtype)

    if algo in ("lora", "dora"):
        t = {"lora_down.weight": r(rank, in_f, *kernel), "lora_up.weight": r(out_f, rank, *([1] * len(kernel)))}
        if algo == "dora":
            t["dora_scale"] = (torch.rand(out_f, *([1] * (len(shape) - 1)), generator=g) + 0.5).to(dtype)
    elif algo == "lora_tucker":
        t = {"lora_down.weight": r(rank, in_f, 1, 1), "lora_mid.weight": r(rank, rank, *kernel),
             "lora_up.weight": r(out_f, rank, 1, 1)}
    elif algo == "loha":
        inner = in_f * math.prod(kernel)
        t = {"hada_w1_a": r(out_f, rank), "hada_w1_b": r(rank, inner) * 10, "hada_w2_a": r(out_f, rank),
             "hada_w2_b": r(rank, inner) * 10}
    elif algo == "loha_tucker":
        t = {"hada_w1_a": r(rank, out_f), "hada_w1_b": r(rank, in_f), "hada_t1": r(rank, rank, *kernel) * 10,
             "hada_w2_a": r(rank, out_f), "hada_w2_b": r(rank, in_f), "hada_t2": r(rank, rank, *kernel) * 10}
    elif algo == "lokr":
        a = 2 if out_f % 2 == 0 else 1
        c = 2 if in_f % 2 == 0 else 1
        t = {"lokr_w1": r(a, c) * 10, "lokr_w2_a": r(out_f // a, rank),
             "lokr_w2_b": r(rank, (in_f // c) * math.prod(kernel))}
    elif algo == "lokr_full":
        a = 2 if out_f % 2 == 0 else 1
        c = 2 if in_f % 2 == 0 else 1
        t = {"lokr_w1_a": r(a, 1) * 10, "lokr_w1_b": r(1, c), "lokr_w2": r(out_f // a, in_f // c, *kernel)}
    elif algo == "lokr_tucker":
        a = 2 if out_f % 2 == 0 else 1
        c = 2 if in_f % 2 == 0 else 1
        t = {"lokr_w1": r(a, c) * 10, "lokr_w2_a": r(rank, out_f // a), "lokr_w2_b": r(rank, in_f // c),
             "lokr_t2": r(rank, rank, *kernel) * 10}
    elif algo in ("oft", "oft_rescaled", "oft_constrained"):
        from lib_lora.networks.lokr import factorization

        size, count = factorization(out_f, rank)
        t = {"oft_blocks": r(count, size, size) * 10}
        if algo == "oft_rescaled":
            t["rescale"] = (1 + r(out_f, *([1] * (len(shape) - 1)))).to(dtype)
        # the constraint (alpha x output size) binds: 0.05 x 24 = 1.2 is below ||Q|| of these blocks
        t["alpha"] = torch.tensor(0.05 if algo == "oft_constrained" else 0.0, dtype=dtype)
        return t
    elif algo == "oft_diag":  # old LyCORIS: the rotation itself, an orthogonal matrix per block
        from lib_lora.networks.lokr import factorization

        size, count = factorization(out_f, rank)
        q = r(count, size, size) * 10
        q = q - q.transpose(1, 2)
        eye = torch.eye(size)
        return {"oft_diag": ((eye + q) @ torch.linalg.inv(eye - q)).to(dtype)}
    elif algo == "ia3":
        return {"weight": r(out_f) * 10, "on_input": torch.tensor(False)}
    elif algo == "full":
        return {"diff": r(*shape)}
    elif algo == "norm":  # LyCORIS train_norm: a change of a normalization layer's weight and bias
        return {"w_norm": r(out_f) * 4, "b_norm": r(out_f) * 4}
    else:
        raise ValueError(algo)
    t["alpha"] = torch.tensor(float(rank) / 2, dtype=dtype)
    return t


def make_network_file(targets: list[Target], algo: str = "lora", rank: int = 4, seed: int = 0,
                      dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for t in targets:
        for suffix, tensor in lora_tensors(t, algo, rank, g, dtype=dtype).items():
            sd[f"{t.name}.{suffix}"] = tensor
    return sd


def checksum(*modules: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer, by name: equal iff the weights are bit-identical."""
    h = hashlib.sha256()
    for i, m in enumerate(modules):
        for name, t in sorted(m.state_dict().items()):
            h.update(f"{i}.{name}".encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def make_sd_model(components, arch: str = "sd1", resolution: int = 64) -> SDModel:
    """An SDModel over tiny components, with the offline tokenizer."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(ROOT / "models" / "tokenizer"))
    return SDModel(arch=Arch(arch), unet=components.unet, text_encoders=list(components.text_encoders),
                   tokenizers=[tok] * len(components.text_encoders), vae=components.vae,
                   prediction_type=components.prediction_type, resolution=resolution, name="tiny-test",
                   short_hash="0123abcd")


def write_lora_folder(folder: Path, sd1_components, sdxl_components) -> Path:
    """style.safetensors (alias mystyle, trigger tags), sub/other.pt, xl (SDXL), v2 (SD2 by metadata), broken."""
    folder.mkdir(parents=True, exist_ok=True)
    targets = targets_of(sd1_components, Arch.SD1)
    selected = targets.select(["attn", "te_attn", "te_mlp"])
    meta = {"ss_output_name": "mystyle", "ss_tag_frequency": json.dumps(TAGS), "ss_base_model_version": "sd_v1"}
    save_file(make_network_file(selected, rank=4, seed=1), folder / "style.safetensors", meta)
    (folder / "sub").mkdir(exist_ok=True)
    torch.save(make_network_file(targets.select(["attn"]), rank=2, seed=2), folder / "sub" / "other.pt")
    save_file(make_network_file(selected, rank=4, seed=3), folder / "v2.safetensors", {"ss_v2": "True"})
    xl = targets_of(sdxl_components, Arch.SDXL).select(["attn"])[:8]
    save_file(make_network_file(xl, rank=2, seed=4), folder / "xl.safetensors")
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    return folder
