"""LoRA-family files for the host tests: random modules (`tests.helpers.lora_tensors`) on the real targets of the
embedded tiny model (A1111) or of SD1.5 (Forge), strong enough to change a 64 px image visibly, each also split
into its U-Net-only and text-encoder-only halves (the te=0 / unet=0 checks compare against those)."""
from __future__ import annotations

from pathlib import Path

import torch

from lib_lora.io import save_file
from lib_lora.keys import ModelTargets, Target, clip_text_targets, unet_targets
from lib_lora.types import Arch, Component
from tests.helpers import make_network_file

META = {"ss_base_model_version": "sd_v1", "ss_network_module": "networks.lora"}
# factors a random module's output side is multiplied by, so its effect shows at 64 px
STRENGTH = {"lora": 2.5, "dora": 2.5, "loha": 2.5, "lokr": 2.5, "ia3": 1.0, "full": 1.0}
OUTPUT_SIDE = ("lora_up.weight", "hada_w1_a", "hada_w2_a", "lokr_w2_a", "lokr_w2")


def tiny_targets() -> ModelTargets:
    from lib_lora.sd.embedded import load_embedded
    from lib_lora.sd.lora_generate import model_targets

    return model_targets(load_embedded("cpu", torch.float32))


def sd15_targets() -> ModelTargets:
    """SD1.5's LoRA targets from modules built on the meta device (shapes only, no weights, no memory)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lib_lora.sd.configs import shipped_config

    config = shipped_config(Arch.SD1)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(dict(config.unet))
        te = CLIPTextModel(CLIPTextConfig(**config.text_encoders[0]))
    return ModelTargets.merge(Arch.SD1, [unet_targets(unet, Arch.SD1, "diffusers"),
                                         clip_text_targets(te, Component.TE)])


def _strengthen(tensors: dict[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    return {k: v * factor if k.endswith(OUTPUT_SIDE) else v for k, v in tensors.items()}


def _column_dora(tensors: dict[str, torch.Tensor], by_name: dict[str, Target], seed: int) -> dict[str, torch.Tensor]:
    """DoRA magnitudes per input column ([1, in, 1, 1]), the form sd-scripts/LyCORIS write and A1111 1.10's
    decomposition assumes (it normalises columns whatever the shape; per-row magnitudes it gets wrong)."""
    g = torch.Generator().manual_seed(seed)
    out = dict(tensors)
    for key in [k for k in tensors if k.endswith(".dora_scale")]:
        shape = by_name[key.removesuffix(".dora_scale")].shape
        out[key] = (torch.rand(1, shape[1], *([1] * (len(shape) - 2)), generator=g) + 0.5).to(tensors[key].dtype)
    return out


def write_family(folder: Path, stem: str, targets: list[Target], algo: str, seed: int, dtype=torch.float32) -> Path:
    """`<stem>.safetensors` plus `<stem>_unet` and `<stem>_te` (each half alone); returns the full file."""
    folder.mkdir(parents=True, exist_ok=True)
    if algo == "ia3":
        # A1111's IA3 reshapes the scale for a 2-d weight only: on a conv (proj_in/proj_out) its sum fails and
        # it skips the layer, while our engine applies it; kept to linear layers, both agree.
        targets = [t for t in targets if len(t.shape) == 2]
    tensors = _strengthen(make_network_file(targets, algo=algo, rank=4, seed=seed, dtype=dtype), STRENGTH[algo])
    if algo == "dora":
        tensors = _column_dora(tensors, {t.name: t for t in targets}, seed)
    save_file(tensors, folder / f"{stem}.safetensors", META)
    save_file({k: v for k, v in tensors.items() if k.startswith("lora_unet_")}, folder / f"{stem}_unet.safetensors",
              META)
    save_file({k: v for k, v in tensors.items() if k.startswith("lora_te_")}, folder / f"{stem}_te.safetensors", META)
    return folder / f"{stem}.safetensors"


def write_oft(folder: Path, stem: str, targets: list[Target], seed: int, blocks: int = 4) -> Path:
    """A kohya/LyCORIS OFT file (`oft_blocks`: skew-symmetric block generators, `alpha` the constraint) on the
    U-Net's attention projections: a type the web UI's built-in LoRA loads that our own engine leaves to it."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for t in targets:
        out = t.shape[0]
        if not t.name.startswith("lora_unet_") or out % blocks or len(t.shape) != 2:
            continue
        size = out // blocks
        tensors[f"{t.name}.oft_blocks"] = torch.randn(blocks, size, size, generator=g) * 0.05
        tensors[f"{t.name}.alpha"] = torch.tensor(0.0)
    save_file(tensors, folder / f"{stem}.safetensors", {**META, "ss_network_module": "lycoris.kohya"})
    return folder / f"{stem}.safetensors"
