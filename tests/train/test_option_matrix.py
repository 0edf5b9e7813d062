"""Every training option the engine accepts, switched on in a short end-to-end run.

The list of options is the config schema itself (`toml_config.OPTIONS`: every field of the config sections, the
dataset options and sd-scripts' extra names), so a new option is in this test the moment it exists. A flag is
switched on by flipping its default and a number by a generic small value; options that need a particular value
or a companion (a prompt file, a state folder, validation images) are in ON / NEEDS below. An option neither rule
can switch on fails `test_every_option_has_an_on_value`, so none goes untested.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import pytest

from lib_lora.cli import main as cli_main
from lib_lora.io import load_file
from lib_lora.train.run import train
from lib_lora.train.toml_config import OPTIONS, load_config
from tests.train.fixtures import tiny_model, write_images, write_run

BLOCKS_25 = ",".join(["2"] * 25)
# Values that switch an option on where the generic rule cannot; a callable gets the run folder.
ON: dict[str, Any] = {
    "pretrained_model_name_or_path": "embedded",
    "vae": lambda d: _vae_file(d),
    "clip_skip": 2, "max_token_length": 150,
    "network_module": "networks.lora_fa", "network_dim": 8, "network_alpha": 2.0,
    "network_weights": lambda d: _lora_file(d), "dim_from_weights": True,
    "optimizer_type": "SGDNesterov", "lr_scheduler": "cosine", "lr_warmup_steps": 1,
    "lr_scheduler_type": "StepLR", "lr_scheduler_args": ["step_size=1", "gamma=0.5"],
    "text_encoder_lr": 5e-4, "mixed_precision": "bf16", "seed": 7,
    "resume": lambda d: _state_folder(d), "output_dir": "out2", "output_name": "other",
    "save_model_as": "safetensors", "save_precision": "fp16",
    "sample_prompts": lambda d: _prompts(d), "sample_prompt_text": "sks red square --w 64 --h 64 --s 2",
    "sample_sampler": "euler_a",
    "min_timestep": 100, "max_timestep": 900,
    "validation_data_dir": lambda d: write_images(d / "val", 2).name,
    "logging_dir": "logs", "log_prefix": "p-", "log_with": "none", "log_tracker_name": "tracker",
    "train_data_dir": "train", "reg_data_dir": lambda d: _reg(d), "dataset_config": lambda d: _dataset_toml(d),
    "cache_dir": "cache", "in_json": lambda d: _metadata(d), "dataset_repeats": 2,
    "down_lr_weight": "sine", "mid_lr_weight": [0.5], "up_lr_weight": "cosine", "block_lr_zero_threshold": 0.1,
    "block_dims": BLOCKS_25, "block_alphas": BLOCKS_25, "conv_block_dims": BLOCKS_25, "conv_block_alphas": BLOCKS_25,
    "caption_extension": ".txt", "class_tokens": "sks thing", "caption_separator": ";",
    "keep_tokens_separator": "|||", "caption_prefix": "photo of", "caption_suffix": "high quality",
    "resize_interpolation": "bicubic", "secondary_separator": ";;;", "resolution": [64, 64],
    "min_bucket_reso": 64, "max_bucket_reso": 192, "bucket_reso_steps": 32,
    "validation_split": 0.5, "network_args": ["conv_dim=2"], "optimizer_args": ["weight_decay=0.1"],
    "caption_extention": ".txt", "epoch": 1, "noise_offset_type": "Original",
    "multires_noise_discount": 0.5, "max_validation_steps": 1, "guard_window": 5, "max_train_steps": 3,
}
# Companions an option needs to do anything (or to be accepted at all).
NEEDS: dict[str, dict[str, Any]] = {
    "v_parameterization": {"scale_v_pred_loss_like_noise_pred": False},
    "scale_v_pred_loss_like_noise_pred": {"v_parameterization": True},
    "dim_from_weights": {"network_weights": ON["network_weights"]},
    "lr_scheduler_args": {"lr_scheduler_type": "StepLR"},
    "lr_scheduler_type": {"lr_scheduler_args": ON["lr_scheduler_args"]},
    "in_json": {"train_data_dir": "flat"}, "vae_batch_size": {"cache_latents": True},
    "lr_scheduler_min_lr_ratio": {"lr_scheduler": "cosine_with_min_lr"},
    "lr_scheduler_num_cycles": {"lr_scheduler": "cosine_with_restarts"},
    "lr_scheduler_power": {"lr_scheduler": "polynomial"},
    "save_state_on_train_end": {}, "save_every_n_epochs": {"max_train_steps": None, "max_train_epochs": 2},
    "save_last_n_epochs": {"save_every_n_epochs": 1, "max_train_steps": None, "max_train_epochs": 3},
    "save_last_n_epochs_state": {"save_every_n_epochs": 1, "save_state": True, "max_train_steps": None,
                                 "max_train_epochs": 3},
    "save_last_n_steps": {"save_every_n_steps": 1}, "save_last_n_steps_state": {"save_every_n_steps": 1,
                                                                                "save_state": True},
    "sample_every_n_steps": {"sample_prompt_text": ON["sample_prompt_text"]},
    "sample_every_n_epochs": {"sample_prompt_text": ON["sample_prompt_text"]},
    "sample_at_first": {"sample_prompt_text": ON["sample_prompt_text"]},
    "sample_sampler": {"sample_at_first": True, "sample_prompt_text": ON["sample_prompt_text"]},
    "adaptive_noise_scale": {"noise_offset": 0.05}, "noise_offset_random_strength": {"noise_offset": 0.05},
    "multires_noise_discount": {"multires_noise_iterations": 2}, "noise_offset_type": {"noise_offset": 0.05},
    "validate_every_n_steps": {"validation_split": 0.5}, "validate_every_n_epochs": {"validation_split": 0.5},
    "max_validation_steps": {"validation_split": 0.5}, "validation_seed": {"validation_split": 0.5},
    "log_prefix": {"logging_dir": "logs"}, "log_tracker_name": {"logging_dir": "logs"},
    "cache_latents_to_disk": {}, "cache_dir": {"cache_latents_to_disk": True},
    "cache_text_encoder_outputs": {"network_train_unet_only": True},
    "cache_text_encoder_outputs_to_disk": {"network_train_unet_only": True},
    "prior_loss_weight": {"reg_data_dir": ON["reg_data_dir"]},
    "dataset_repeats": {"in_json": ON["in_json"], "train_data_dir": "flat"},
    "block_lr_zero_threshold": {"down_lr_weight": "sine"}, "block_alphas": {"block_dims": BLOCKS_25},
    "conv_block_alphas": {"conv_block_dims": BLOCKS_25},
    "keep_tokens": {"shuffle_caption": True}, "keep_tokens_separator": {"shuffle_caption": True},
    "secondary_separator": {"shuffle_caption": True},
    "epoch": {"max_train_steps": None}, "max_train_epochs": {"max_train_steps": None},
    "min_bucket_reso": {"enable_bucket": True}, "max_bucket_reso": {"enable_bucket": True, "min_bucket_reso": 64},
    "bucket_reso_steps": {"enable_bucket": True}, "bucket_no_upscale": {"enable_bucket": True},
    "masked_loss": {}, "max_timestep": {"min_timestep": 100},
    "loraplus_unet_lr_ratio": {}, "use_lion_optimizer": {}, "guard_patience": {"guard_window": 5},
}
# Options that select the model's architecture: they need that model.
MODEL_FOR = {"v2": "sd2", "sdxl": "sdxl"}
# Options whose "on" is not a training run at all.
NOT_A_RUN = {"debug_dataset"}


def _is_optional(hint: Any) -> bool:
    return type(None) in typing.get_args(hint)


def _core(hint: Any) -> Any:
    members = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return members[0]


def _default(name: str) -> Any:
    from lib_lora.train import toml_config

    for cls in (*toml_config.SECTIONS.values(), toml_config.BlockwiseConfig, toml_config.SubsetOptions,
                toml_config.DatasetOptions):
        for f in dataclasses.fields(cls):
            if f.name == name and f.default is not dataclasses.MISSING:
                return f.default
    return None


def on_value(name: str) -> Any:
    """The value that switches `name` on, or raises KeyError when no rule knows one."""
    if name in ON:
        return ON[name]
    hint, default = OPTIONS[name].hint, _default(name)
    core = _core(hint)
    if core is bool:
        return not default if isinstance(default, bool) else True
    if core is int:
        return 1 if default is None else default + 1
    if core is float:
        return 0.1 if not default else default / 2
    if core is str and default is None:  # free text (titles, comments, ...)
        return f"{name} of the matrix run"
    raise KeyError(name)


def _resolve(value: Any, folder: Path) -> Any:
    return value(folder) if callable(value) else value


def _options(name: str, folder: Path) -> dict[str, Any]:
    options = {name: on_value(name)}
    options.update(NEEDS.get(name, {}))
    return {k: _resolve(v, folder) for k, v in options.items()}


def test_every_option_has_an_on_value():
    missing = []
    for name in OPTIONS:
        try:
            on_value(name)
        except KeyError:
            missing.append(name)
    assert not missing, f"add these options to ON (a value that switches each on): {missing}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_option_switched_on_trains_end_to_end(tmp_path, name):
    write_images(tmp_path / "train" / "1_sks", 4, size=64)
    base = dict(resolution=64, max_train_steps=2, train_batch_size=1, network_dim=2, network_alpha=1)
    options = {**base, **_options(name, tmp_path)}
    run = write_run(tmp_path, **options)
    if name in NOT_A_RUN:
        assert cli_main(["train", "--config", str(run), "--no-progress"]) == 0
        assert not (tmp_path / "out").exists(), "debug_dataset shows the dataset and trains nothing"
        return
    cfg = load_config(run)
    model = None if name == "pretrained_model_name_or_path" else tiny_model(MODEL_FOR.get(name, "sd1"))
    result = train(cfg, model=model)
    assert result.status == "finished", result.report
    assert result.final_file.is_file() and load_file(result.final_file).tensors


def _lora_file(folder: Path) -> str:
    source = folder / "source"
    write_images(source / "train" / "1_sks", 2, size=64)
    result = train(load_config(write_run(source, resolution=64, max_train_steps=1, train_batch_size=1,
                                         network_dim=2, network_alpha=1)), model=tiny_model())
    return str(result.final_file)


def _state_folder(folder: Path) -> str:
    # the same run stopped after one step (its run.toml is then replaced by the resuming one)
    train(load_config(write_run(folder, resolution=64, max_train_steps=1, train_batch_size=1, network_dim=2,
                                network_alpha=1, save_state=True)), model=tiny_model())
    return str(folder / "out" / "tiny-state")


def _vae_file(folder: Path) -> str:
    from lib_lora.io import save_file

    save_file(tiny_model(seed=4).vae.state_dict(), folder / "vae.safetensors")
    return str(folder / "vae.safetensors")


def _prompts(folder: Path) -> str:
    (folder / "prompts.txt").write_text("sks red square --w 64 --h 64 --s 2\n", encoding="utf-8")
    return "prompts.txt"


def _reg(folder: Path) -> str:
    write_images(folder / "reg" / "1_thing", 2, size=64, caption="thing")
    return "reg"


def _dataset_toml(folder: Path) -> str:
    (folder / "ds.toml").write_text(
        '[general]\nresolution = 64\n[[datasets]]\nbatch_size = 1\n[[datasets.subsets]]\n'
        f'image_dir = "{(folder / "train" / "1_sks").as_posix()}"\nnum_repeats = 2\ncaption_extension = ".txt"\n',
        encoding="utf-8")
    return "ds.toml"


def _metadata(folder: Path) -> str:
    import json

    images = write_images(folder / "flat", 3, size=64)
    meta = {str(p): {"caption": "sks red square", "tags": "simple"} for p in sorted(images.glob("*.png"))}
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return "meta.json"
