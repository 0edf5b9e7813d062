"""A separate VAE file (sd-scripts' `vae` option; the web UI's VAE selector): `vae-ft-mse-840000-ema-pruned`,
`sdxl_vae`, ... in the LDM spelling (`encoder.down.0...`, also under `first_stage_model.`) or diffusers'
(`encoder.down_blocks.0...`), safetensors or a pickle read with `weights_only=True`."""
from __future__ import annotations

from pathlib import Path

import torch

from lib_lora.errors import FileFormatError
from lib_lora.io import load_state_dict
from lib_lora.sd import ldm_keys

LDM_PREFIX = "first_stage_model."


def load_vae_file(path: str | Path, like: torch.nn.Module) -> torch.nn.Module:
    """A copy of the model's VAE module (`like`: same config, device and dtype) with the file's weights.

    Raises:
        FileFormatError: not a VAE (keys of another kind), or weights that do not fit the model's VAE.
    """
    from diffusers import AutoencoderKL

    from lib_lora.sd.checkpoint import _assign

    path = str(path)
    tensors = {k[len(LDM_PREFIX):] if k.startswith(LDM_PREFIX) else k: v
               for k, v in load_state_dict(path).tensors.items()}
    tensors = {k: v for k, v in tensors.items() if k.startswith(("encoder.", "decoder.", "quant_conv.",
                                                                 "post_quant_conv."))}
    if not tensors:
        raise FileFormatError(path, "no VAE tensors (encoder.*, decoder.*): not a VAE file")
    first = next(iter(like.parameters()))
    vae = AutoencoderKL.from_config(like.config).to(first.device, first.dtype)
    if any(k.startswith("encoder.down_blocks.") for k in tensors):  # diffusers' spelling already
        converted = ldm_keys.ConvertedKeys(tensors, {k: k for k in tensors})
    else:
        flip = ldm_keys.vae_flip(len(like.config.block_out_channels))
        converted = ldm_keys.to_diffusers(tensors, ldm_keys.VAE_RULES, flip)
    converted.tensors = {k: v.to(first.dtype) for k, v in converted.tensors.items()}
    _assign(vae, converted, path, "VAE", "the model's VAE config", "", lambda k: k)
    return vae.eval().requires_grad_(False)
