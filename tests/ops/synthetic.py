"""Synthetic SD1.5-shaped checkpoints whose every tensor can be rebuilt alone from its name.

Each tensor is drawn from its own generator (seeded by a CRC of its name), so a test can rebuild a handful of
tensors of a 2 GB file that was made once, outside the test run, to pin what another tool computed from it.
A "tuned" checkpoint adds to each LoRA target a change shaped like a real fine-tune's: singular values decaying
over ~96 values plus 2% white noise.
"""
from __future__ import annotations

import math
import warnings
import zlib
from pathlib import Path

import torch

from lib_lora.ops.checkpoint_keys import checkpoint_targets
from lib_lora.ops.stream import Entry, StreamWriter
from lib_lora.types import Arch


def generator(key: str, salt: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{salt}:{key}".encode()))


def base_weight(key: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float16) -> torch.Tensor:
    return (torch.randn(shape, generator=generator(key, "base")) * 0.02).to(dtype)


def fine_tune_delta(key: str, shape: tuple[int, ...], rank: int = 96) -> torch.Tensor:
    g = generator(key, "tuned")
    out_f, inner = shape[0], math.prod(shape[1:])
    k = min(rank, out_f, inner)
    u = torch.linalg.qr(torch.randn(out_f, k, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(inner, k, generator=g, dtype=torch.float64))[0]
    s = torch.exp(-torch.arange(k, dtype=torch.float64) / (k / 6)) * 2e-3 * math.sqrt(out_f)
    low = (u * s) @ v.T
    noise_std = 0.02 * low.norm() / math.sqrt(out_f * inner)
    noise = torch.randn(out_f, inner, generator=g, dtype=torch.float64) * noise_std
    return (low + noise).reshape(shape).to(torch.float32)


def tuned_weight(key: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float16) -> torch.Tensor:
    return (base_weight(key, shape, dtype).to(torch.float32) + fine_tune_delta(key, shape)).to(dtype)


def sd15_shapes() -> dict[str, tuple[int, ...]]:
    """LDM key -> shape of an SD1.5 checkpoint (U-Net, VAE, CLIP-L), from the shipped config on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lib_lora.sd.checkpoint_save import ldm_state_dict
    from lib_lora.sd.configs import shipped_config
    from lib_lora.sd.model import SDModel

    config = shipped_config(Arch.SD1)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet = UNet2DConditionModel.from_config(dict(config.unet))
        vae = AutoencoderKL.from_config(dict(config.vae))
        te = CLIPTextModel(CLIPTextConfig(**config.text_encoders[0]))
    model = SDModel(arch=Arch.SD1, unet=unet, text_encoders=[te], tokenizers=[None], vae=vae,
                    prediction_type="epsilon", resolution=512, name="sd15-random")
    return {k: tuple(v.shape) for k, v in ldm_state_dict(model, config, dtype=None).items()}


def write_checkpoint(path: str | Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype = torch.float16,
                     tuned: bool = False) -> None:
    """The base (or, with `tuned`, the fine-tuned) checkpoint of these tensor shapes, written tensor by tensor."""
    targets = {t.key for t in checkpoint_targets(shapes, Arch.SD1).values()} if tuned else set()
    entries = [Entry(k, dtype, s) for k, s in shapes.items()]
    with StreamWriter(path, entries, {"modelspec.title": Path(path).stem}) as w:
        for e in entries:
            w.write(e.name, tuned_weight(e.name, e.shape, dtype) if e.name in targets else base_weight(e.name, e.shape,
                                                                                                        dtype))


# Small LoRAs on the tiny SD1 model's layers (tests/data/ops/small_*.safetensors), made once by `small_lora` and
# committed together with what sd-scripts wrote from them (see tests/data/ops/README.md).
SMALL_SHAPES = {
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (64, 64),
    "lora_te_text_model_encoder_layers_0_self_attn_k_proj": (64, 64),
    "lora_te_text_model_encoder_layers_0_mlp_fc1": (128, 64),
    "lora_unet_down_blocks_0_attentions_0_proj_in": (32, 32, 1, 1),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (32, 32),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (32, 64),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj": (256, 32),
    "lora_unet_down_blocks_0_resnets_0_conv1": (32, 32, 3, 3),
    "lora_unet_down_blocks_0_resnets_0_time_emb_proj": (32, 128),
    "lora_unet_up_blocks_3_resnets_0_conv_shortcut": (32, 64, 1, 1),
    "lora_unet_mid_block_resnets_0_conv1": (64, 64, 3, 3),
    "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2": (64, 256),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0": (64, 64),
}
SMALL_A = [n for n in SMALL_SHAPES if not n.endswith("k_proj")]
SMALL_B = [n for n in SMALL_SHAPES if n.endswith(("q_proj", "k_proj", "proj_in", "attn1_to_q", "conv1", "to_out_0"))]


def small_lora(names: list[str], rank: int, alpha: float, seed: int, spectral: bool) -> dict[str, torch.Tensor]:
    """kohya tensors (fp16) for `names`. `spectral`: ΔW's singular values decay at a different rate per module
    (0.25 ... 0.95 per step) so sd-scripts' dynamic methods keep different ranks; the time_emb_proj module has
    up = 0 (an untrained module: sd-scripts keeps rank 1). Otherwise plain Gaussian factors."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, name in enumerate(names):
        shape = SMALL_SHAPES[name]
        out_f, inner = shape[0], math.prod(shape[1:])
        if spectral:
            decay = 0.25 + 0.7 * i / max(1, len(names) - 1)
            s = decay ** torch.arange(rank, dtype=torch.float64) * 0.5
            up = torch.linalg.qr(torch.randn(out_f, rank, generator=g, dtype=torch.float64))[0] * s
            down = torch.linalg.qr(torch.randn(inner, rank, generator=g, dtype=torch.float64))[0].T
            if name.endswith("time_emb_proj"):
                up = torch.zeros_like(up)
        else:
            up = torch.randn(out_f, rank, generator=g, dtype=torch.float64) * 0.1
            down = torch.randn(rank, inner, generator=g, dtype=torch.float64) * 0.1
        conv = len(shape) == 4
        sd[f"{name}.lora_down.weight"] = down.reshape(rank, *shape[1:]).to(torch.float16).contiguous()
        sd[f"{name}.lora_up.weight"] = (up.reshape(out_f, rank, 1, 1) if conv else up).to(torch.float16).contiguous()
        sd[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float16)
    return sd


SMALL_METADATA = {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1", "ss_v2": "False"}


def write_small_loras(folder: str | Path) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    save_file(small_lora(SMALL_A, 8, 4.0, 0, True), folder / "small_a.safetensors", SMALL_METADATA)
    save_file(small_lora(SMALL_B, 4, 2.0, 1, False), folder / "small_b.safetensors", SMALL_METADATA)
