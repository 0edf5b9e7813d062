"""Load SD1.x / SD2.x / SDXL single-file checkpoints (LDM/SGM layout) into diffusers modules, offline.

    model = load_checkpoint("v1-5-pruned-emaonly.safetensors")          # -> SDModel
    save_checkpoint(model, "tiny.safetensors")                           # + tiny.yaml for the web UI

Where the structure comes from, first match wins:
1. `lora_studio.sd_config` in the file's metadata (written by `save_checkpoint`: exact diffusers configs);
2. `<checkpoint stem>.yaml` beside the file (the web UI's convention): U-Net and VAE params;
3. tensor shapes, with what shapes cannot tell (head counts, activations) from the shipped full-size config.
Every tensor is checked against the model built from that config (errors name the file key and the shapes).

Prediction type, first match wins: the `prediction_type` argument; the yaml (`parameterization: "v"`,
absent = epsilon, as the ldm code reads it; SGM: the denoiser's V/Eps scaling); the file's LoRA Studio
metadata; a `v_pred` marker key (the ComfyUI/Forge convention for SDXL v-prediction fine-tunes);
`modelspec.prediction_type`; for SD2 only, the web UI's test: run the U-Net on a constant input at
t=999 and call it v-prediction when the output minus the input averages below -1 (a v model predicts
about -x0 there, an eps model about noise); SD1 and SDXL default to epsilon.

SD2's OpenCLIP tower has 24 blocks but SD2 conditions on the penultimate one (then the final norm), so,
as diffusers' own converter does, the text encoder is built with 23 layers and the last block is
reported as ignored; `save_checkpoint` writes an identity block in its place so the file keeps the
24-block layout and reloads to the same function.

Memory: tensors are cast in place and moved (not copied) into modules built on the meta device, so a
load peaks near the file size plus the cast weights (about 2x a fp16 file for fp32 modules).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lib_lora.errors import ConfigError, FileFormatError, KeyMapError, ShapeMismatchError
from lib_lora.io import load_state_dict, sha256_file
from lib_lora.sd import ldm_keys
from lib_lora.sd.checkpoint_save import SavedCheckpoint, config_of, ldm_state_dict, save_checkpoint
from lib_lora.sd.components import (
    DEFAULT_TOKENIZER_DIR,
    MARKERS,
    TEXT_ENCODERS,
    UNET_PREFIX,
    UNSUPPORTED_MARKERS,
    VAE_PREFIX,
    TextEncoderSlot,
    classify_ignored,
    detect_arch,
)
from lib_lora.sd.config_resolve import ResolvedConfig, resolve_config, v_prediction_variant
from lib_lora.sd.configs import PREDICTION_TYPES, SDConfig, unet_from_diffusers
from lib_lora.sd.ldm_yaml import read_ldm_yaml
from lib_lora.sd.model import NoiseSchedule, SDModel
from lib_lora.types import Arch
from lib_lora.unet_layout import UNetLayout, convert_state_dict, diffusers_to_compvis, parse_compvis

__all__ = [
    "ComponentTensors", "IgnoredKeys", "LoadReport", "LoadedCheckpoint", "SavedCheckpoint", "config_of", "detect_arch",
    "guess_v_prediction", "ldm_state_dict", "load_checkpoint", "load_tokenizers", "model_from_tensors",
    "read_checkpoint",
    "save_checkpoint", "split_components",
]


@dataclass(frozen=True)
class IgnoredKeys:
    """File tensors deliberately not loaded, with the reason."""

    reason: str
    keys: tuple[str, ...]


@dataclass(frozen=True)
class LoadReport:
    """How a checkpoint was read: where the config and prediction type came from, what was left out."""

    path: str
    arch: Arch
    prediction_type: str
    prediction_source: str
    config_source: str
    ignored: tuple[IgnoredKeys, ...] = ()
    unused: tuple[str, ...] = ()


@dataclass
class LoadedCheckpoint:
    model: SDModel
    report: LoadReport


@dataclass
class ComponentTensors:
    """The file's tensors split by component (prefixes removed); `unused`: keys of no component."""

    unet: dict[str, torch.Tensor]
    vae: dict[str, torch.Tensor]
    text_encoders: list[dict[str, torch.Tensor]]
    unused: list[str] = field(default_factory=list)
    ignored: dict[str, list[str]] = field(default_factory=dict)
    markers: set[str] = field(default_factory=set)

    def ignore(self, reason: str, keys: list[str]) -> None:
        if keys:
            self.ignored.setdefault(reason, []).extend(keys)


def load_checkpoint(path: str | os.PathLike, *, arch: Arch | str | None = None, prediction_type: str | None = None,
                    device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    tokenizer_dir: str | os.PathLike | None = None, compute_hash: bool = True) -> SDModel:
    """Load a single-file checkpoint as an `SDModel`; unused tensors are reported with a warning.

    dtype: of the modules (default float32, the safe choice for CPU work and training master weights).
    arch: if given, must match what the keys say. See the module docstring for config and prediction type.

    Raises:
        FileFormatError: unreadable/truncated file, unknown architecture, missing tensors, bad yaml.
        ShapeMismatchError: a tensor that does not fit the config (names the key and both shapes).
    """
    loaded = read_checkpoint(path, arch=arch, prediction_type=prediction_type, device=device, dtype=dtype,
                             tokenizer_dir=tokenizer_dir, compute_hash=compute_hash)
    if loaded.report.unused:
        shown = ", ".join(loaded.report.unused[:10])
        more = len(loaded.report.unused) - 10
        warnings.warn(f"{loaded.report.path}: {len(loaded.report.unused)} tensors have no place in the model and "
                      f"were not loaded: {shown}" + (f" and {more} more" if more > 0 else ""), stacklevel=2)
    return loaded.model


def read_checkpoint(path: str | os.PathLike, *, arch: Arch | str | None = None, prediction_type: str | None = None,
                    device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    tokenizer_dir: str | os.PathLike | None = None, compute_hash: bool = True) -> LoadedCheckpoint:
    """`load_checkpoint` returning the `LoadReport` too (no warning)."""
    path = str(path)
    if prediction_type not in (None, *PREDICTION_TYPES):
        raise ConfigError("prediction_type", prediction_type, f"must be one of {PREDICTION_TYPES}")
    file = load_state_dict(path)
    yaml_path = Path(path).with_suffix(".yaml")
    return model_from_tensors(file.tensors, path, metadata=file.metadata, arch=arch, prediction_type=prediction_type,
                              device=device, dtype=dtype, tokenizer_dir=tokenizer_dir,
                              yaml_path=yaml_path if yaml_path.is_file() else None,
                              short_hash=sha256_file(path)[:10] if compute_hash else "")


def model_from_tensors(tensors: dict[str, torch.Tensor], path: str, *, metadata: Mapping[str, str] | None = None,
                       arch: Arch | str | None = None, prediction_type: str | None = None,
                       device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                       tokenizer_dir: str | os.PathLike | None = None, yaml_path: Path | None = None,
                       short_hash: str = "", name: str = "") -> LoadedCheckpoint:
    """An `SDModel` from a checkpoint's tensors by their file (LDM) names, as `read_checkpoint` builds it.

    The modules take the tensors themselves (renamed, reshaped as views; cast only where `dtype` differs), so
    tensors that share memory with another model's weights keep sharing it. `tensors` is emptied.
    path: how errors and the model name the source.
    """
    if prediction_type not in (None, *PREDICTION_TYPES):
        raise ConfigError("prediction_type", prediction_type, f"must be one of {PREDICTION_TYPES}")
    try:
        found = detect_arch(tensors)
    except KeyMapError as exc:
        raise FileFormatError(path, str(exc)) from None
    wanted = _arch(arch)
    if wanted is not None and wanted is not found:
        raise FileFormatError(path, f"expected an {wanted.label} checkpoint, but its keys are {found.label}'s")
    parts = split_components(tensors, found, path)  # empties tensors: no second reference stays alive
    _cast(parts, dtype or torch.float32)
    ldm_yaml = read_ldm_yaml(yaml_path) if yaml_path is not None else None
    try:
        resolved = resolve_config(found, parts, metadata or {}, ldm_yaml, prediction_type)
        unet, vae, text_encoders = _build(resolved, parts, path)
    except (ConfigError, KeyMapError) as exc:
        raise FileFormatError(path, f"cannot build the model: {exc}") from None
    config, prediction_source = resolved.config, resolved.prediction_source
    if resolved.prediction_source == "":  # SD2 with nothing saying: the web UI's test decides
        if guess_v_prediction(unet):
            config = v_prediction_variant(config)
            unet = _rebuild_unet(unet, config)
        prediction_source = "U-Net output test (as the web UI guesses SD2 models)"
    model = SDModel(
        arch=found, unet=unet, text_encoders=text_encoders, tokenizers=load_tokenizers(found, tokenizer_dir), vae=vae,
        prediction_type=config.prediction_type, resolution=config.resolution,
        schedule=ldm_yaml.schedule if ldm_yaml and ldm_yaml.schedule else NoiseSchedule(),
        name=name or Path(path).stem, path=path, short_hash=short_hash, vae_scale_factor=config.vae_scale_factor,
    )
    if torch.device(device) != torch.device("cpu"):
        for module in model.modules():  # not SDModel.to: diffusers warns when `dtype=None` is passed
            module.to(device)
    report = LoadReport(path, found, config.prediction_type, prediction_source, resolved.config_source,
                        tuple(IgnoredKeys(r, tuple(k)) for r, k in parts.ignored.items()), tuple(parts.unused))
    return LoadedCheckpoint(model, report)


def split_components(tensors: dict[str, torch.Tensor], arch: Arch, path: str) -> ComponentTensors:
    """Move tensors into per-component dicts (prefix removed), emptying `tensors`; drop known-unneeded ones."""
    slots = TEXT_ENCODERS[arch]
    parts = ComponentTensors({}, {}, [{} for _ in slots])
    targets = [(UNET_PREFIX, parts.unet), (VAE_PREFIX, parts.vae)]
    targets += [(slot.prefix, sd) for slot, sd in zip(slots, parts.text_encoders)]
    for key, what in UNSUPPORTED_MARKERS.items():
        if key in tensors:
            raise FileFormatError(path, f"{what} (marker key {key!r}): not supported")
    for key in list(tensors):
        if key in MARKERS:
            del tensors[key]
            parts.markers.add(key)
            parts.ignore(MARKERS[key], [key])
            continue
        reason = classify_ignored(key)
        if reason:
            del tensors[key]
            parts.ignore(reason, [key])
            continue
        for prefix, sd in targets:
            if key.startswith(prefix):
                sd[key[len(prefix):]] = tensors.pop(key)
                break
        else:
            parts.unused.append(key)
            del tensors[key]
    if not parts.vae:
        raise FileFormatError(path, "the file has no VAE (first_stage_model.*): a U-Net/text-encoder-only file is "
                                    "not a full checkpoint")
    in_channels = parts.unet["input_blocks.0.0.weight"].shape[1] if "input_blocks.0.0.weight" in parts.unet else 4
    if in_channels != 4:
        kind = {9: "an inpainting", 8: "an instruct-pix2pix"}.get(in_channels, f"a {in_channels}-channel")
        raise FileFormatError(path, f"{kind} model (U-Net input has {in_channels} channels): not supported")
    return parts


def _arch(arch: Arch | str | None) -> Arch | None:
    try:
        return None if arch is None else Arch(arch)
    except ValueError:
        raise ConfigError("arch", arch, f"must be one of {[a.value for a in Arch]}") from None


def _cast(parts: ComponentTensors, dtype: torch.dtype) -> None:
    # in place, one tensor at a time: the old tensor is freed as soon as its replacement exists
    for sd in (parts.unet, parts.vae, *parts.text_encoders):
        for key, value in sd.items():
            if value.is_floating_point() and value.dtype != dtype:
                sd[key] = value.to(dtype)


def _empty(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a module with parameters on the meta device: no memory, no random init; weights are assigned."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return factory()


def _build(resolved: ResolvedConfig, parts: ComponentTensors, path: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    config, source = resolved.config, resolved.config_source
    layout = unet_from_diffusers(config.unet)[0].layout
    unet = _empty(lambda: UNet2DConditionModel.from_config(dict(config.unet)))
    _assign(unet, _convert_unet(parts.unet, layout, parts), path, "U-Net", source, UNET_PREFIX,
            lambda k: _unet_ldm_name(k, layout))
    vae = _empty(lambda: AutoencoderKL.from_config(dict(config.vae)))
    flip = ldm_keys.vae_flip(len(config.vae["block_out_channels"]))
    converted = ldm_keys.to_diffusers(parts.vae, ldm_keys.VAE_RULES, flip)
    parts.unused += [VAE_PREFIX + k for k in converted.unused]
    _assign(vae, converted, path, "VAE", source, VAE_PREFIX, lambda k: _rule_ldm_name(k, ldm_keys.VAE_RULES, flip))
    text_encoders = []
    for index, (slot, te_cfg, sd) in enumerate(zip(TEXT_ENCODERS[config.arch], config.text_encoders,
                                                   parts.text_encoders)):
        text_encoders.append(_build_text_encoder(slot, te_cfg, sd, parts, path, f"text encoder {index + 1}", source))
    for module in (unet, vae, *text_encoders):
        module.eval().requires_grad_(False)
    return unet, vae, text_encoders


def _build_text_encoder(slot: TextEncoderSlot, te_cfg, sd, parts: ComponentTensors, path: str, what: str, source: str):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if slot.with_projection else CLIPTextModel
    model = _empty(lambda: cls(CLIPTextConfig(**te_cfg)))
    if slot.kind == "clip":
        rules = ldm_keys.CLIP_RULES
        if not any(k.startswith("text_model.") for k in sd):  # files written with transformers < 4.x layout
            sd = {f"text_model.{k}": v for k, v in sd.items()}
    else:
        rules = ldm_keys.OPENCLIP_RULES
        _drop_openclip_extras(sd, slot, int(te_cfg["num_hidden_layers"]), parts)
    converted = ldm_keys.to_diffusers(sd, rules)
    parts.unused += [slot.prefix + k for k in converted.unused]
    module_keys = model.state_dict().keys()
    converted.tensors = ldm_keys.fit_text_model_prefix(converted.tensors, module_keys)
    converted.source_of = ldm_keys.fit_text_model_prefix(converted.source_of, module_keys)
    _assign(model, converted, path, what, source, slot.prefix, lambda k: _te_ldm_name(k, rules))
    return model


def _drop_openclip_extras(sd: dict, slot: TextEncoderSlot, n_layers: int, parts: ComponentTensors) -> None:
    for key, reason in ldm_keys.OPENCLIP_IGNORED.items():
        if sd.pop(key, None) is not None:
            parts.ignore(reason, [slot.prefix + key])
    if slot.drop_last:
        last = f"transformer.resblocks.{n_layers}."
        dropped = [k for k in sd if k.startswith(last)]
        parts.ignore("SD2 conditions on the penultimate OpenCLIP block: the last block is unused",
                     [slot.prefix + k for k in dropped])
        for k in dropped:
            del sd[k]
    if not slot.with_projection and "text_projection" in sd:
        del sd["text_projection"]
        parts.ignore("SD2 uses per-token states, not the pooled projection", [slot.prefix + "text_projection"])


def _convert_unet(sd: dict[str, torch.Tensor], layout: UNetLayout, parts: ComponentTensors) -> ldm_keys.ConvertedKeys:
    known = {}
    for key in list(sd):
        if parse_compvis(key.rpartition(".")[0], layout) is None:
            parts.unused.append(UNET_PREFIX + key)
        else:
            known[key] = sd.pop(key)
    renamed = convert_state_dict(known, layout, to="diffusers")
    return ldm_keys.ConvertedKeys(renamed, dict(zip(renamed, known)))


def _unet_ldm_name(key: str, layout: UNetLayout) -> str:
    module, _, param = key.rpartition(".")
    return f"{diffusers_to_compvis(module, layout) or module}.{param}"


def _te_ldm_name(key: str, rules) -> str:
    spelled = key if key.startswith(("text_model.", "text_projection")) else f"text_model.{key}"
    return _rule_ldm_name(spelled, rules, {})


def _rule_ldm_name(key: str, rules, flip) -> str:
    try:
        converted = ldm_keys.to_ldm({key: torch.empty(0)}, rules, flip)
    except KeyError:  # one of a fused q/k/v triple
        return key
    return next(iter(converted.tensors), key)


def _assign(module: torch.nn.Module, converted: ldm_keys.ConvertedKeys, path: str, what: str, source: str,
            prefix: str, ldm_name: Callable[[str], str]) -> None:
    """Check every tensor against the module built from the config, then move the tensors in.

    prefix: the component's key prefix in the file, so errors name keys as the file spells them.
    """
    expected = module.state_dict()
    extra = [k for k in converted.tensors if k not in expected]
    if extra:
        names = ", ".join(prefix + converted.source_of[k] for k in extra[:5])
        raise FileFormatError(path, f"{what}: {len(extra)} tensors have no place in the model built from {source} "
                                    f"(e.g. {names}); the config does not match the file")
    missing = [k for k in expected if k not in converted.tensors]
    if missing:
        names = ", ".join(prefix + ldm_name(k) for k in missing[:8])
        raise FileFormatError(path, f"{what}: {len(missing)} tensors missing from the file (config from {source}): "
                                    f"{names}" + (" ..." if len(missing) > 8 else ""))
    for key, tensor in converted.tensors.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ShapeMismatchError(path, prefix + converted.source_of[key], expected[key].shape, tensor.shape,
                                     f"{what} {key}; config from {source}")
    module.load_state_dict(converted.tensors, strict=True, assign=True)


def _rebuild_unet(unet: torch.nn.Module, config: SDConfig) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    new = _empty(lambda: UNet2DConditionModel.from_config(dict(config.unet)))
    new.load_state_dict(unet.state_dict(), strict=True, assign=True)
    return new.eval().requires_grad_(False)


@torch.no_grad()
def guess_v_prediction(unet: torch.nn.Module) -> bool:
    """The web UI's SD2 test: at t=999 a v model's output minus its (constant 0.5) input averages below -1."""
    param = next(unet.parameters())
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, dtype=param.dtype, device=param.device)
    context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, dtype=param.dtype, device=param.device)
    out = unet(x, torch.tensor([999], device=param.device), encoder_hidden_states=context).sample
    return (out.float() - x.float()).mean().item() < -1


def load_tokenizers(arch: Arch, tokenizer_dir: str | os.PathLike | None = None) -> list:
    """CLIP BPE tokenizers for the arch's text encoders, from local files.

    OpenCLIP's tokenizer is the same BPE but pads with token 0 (`!`) where CLIP pads with `<|endoftext|>`.
    """
    from transformers import CLIPTokenizer

    folder = Path(tokenizer_dir or DEFAULT_TOKENIZER_DIR)
    if not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
        raise FileFormatError(str(folder), "CLIP tokenizer files (vocab.json, merges.txt) not found; "
                                           "build them with `python tools/build_tokenizer.py`")
    pads = {"clip": "<|endoftext|>", "openclip": "!"}
    return [CLIPTokenizer.from_pretrained(str(folder), pad_token=pads[slot.kind]) for slot in TEXT_ENCODERS[arch]]
