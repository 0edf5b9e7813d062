"""Training config: sd-scripts option names from TOML and the command line, validation, typed args, ss_* values."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib_lora.errors import ConfigError, FileFormatError
from lib_lora.train.config import NetworkConfig, OptimizerConfig, coerce
from lib_lora.train.data.config import DataConfig
from lib_lora.train.data.dataset import build_dataset
from lib_lora.train.toml_config import (
    NO_EFFECT,
    dims_by_block,
    load_config,
    lr_weights_by_block,
    no_effect_table,
    options_from_command_line,
    parse_overrides,
)
from lib_lora.types import Arch

# The dataset TOML of user-guide.md, verbatim.
SETTINGS_TOML = """\
[general]
enable_bucket = false   # aspect-ratio bucketing on/off
flip_aug = false        # no horizontal-flip augmentation
shuffle_caption = true  # shuffle caption tags each time an image is used
keep_tokens = 1         # protect the first token (the trigger word) from shuffling

[[datasets]]
batch_size = 1
resolution = [384, 512]

  [[datasets.subsets]]
  image_dir = 'path/to/images'
  caption_extension = '.txt'
  num_repeats = 40
"""
# The sd-scripts command of user-guide.md, verbatim.
COMMAND = """accelerate launch --num_cpu_threads_per_process 12 train_network.py --pretrained_model_name_or_path=MODEL
  --output_dir=OUT --prior_loss_weight=1.0 --network_dim=4 --network_alpha=0 --learning_rate=1e-4
  --max_train_steps=800 --optimizer_type="AdamW8bit" --xformers --mixed_precision=bf16
  --persistent_data_loader_workers --save_every_n_epochs=10 --save_model_as=safetensors --clip_skip=2
  --seed=42 --network_module=networks.lora --dataset_config=settings.toml"""
# The same flags written as TOML keys.
RUN_TOML = """\
pretrained_model_name_or_path = "MODEL"
output_dir = "OUT"
prior_loss_weight = 1.0
network_dim = 4
network_alpha = 0
learning_rate = 1e-4
max_train_steps = 800
optimizer_type = "AdamW8bit"
xformers = true
mixed_precision = "bf16"
persistent_data_loader_workers = true
save_every_n_epochs = 10
save_model_as = "safetensors"
clip_skip = 2
seed = 42
network_module = "networks.lora"
dataset_config = "settings.toml"
"""


def _images(folder: Path, n: int, size=(48, 64), caption: str | None = "sks, red shirt, white background") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        if caption is not None:
            (folder / f"img{i}.txt").write_text(f"{caption}, tag{i}", encoding="utf-8")


@pytest.fixture()
def guide_dirs(tmp_path: Path) -> Path:
    """The folder layout of the guide: any_dir/train/{10_AAA,10_BBB}, any_dir/reg/10_AAA, settings.toml."""
    train = tmp_path / "any_dir" / "train"
    _images(train / "path" / "to" / "images", 3, size=(96, 128))  # resized to 384x512 when loaded
    _images(train / "10_AAA", 2)
    _images(train / "10_BBB", 2)
    _images(tmp_path / "any_dir" / "reg" / "10_AAA", 3, caption=None)
    (train / "settings.toml").write_text(SETTINGS_TOML, encoding="utf-8")
    return train


def _check_guide_values(cfg) -> None:
    (ds,) = cfg.data.datasets
    (sub,) = ds.subsets
    assert ds.resolution == (384, 512) and ds.batch_size == 1 and ds.enable_bucket is False
    assert sub.num_repeats == 40 and sub.caption_extension == ".txt"
    assert sub.shuffle_caption is True and sub.keep_tokens == 1 and sub.flip_aug is False
    assert sub.image_dir.is_dir() and sub.image_dir.parts[-3:] == ("path", "to", "images")
    assert cfg.network.network_dim == 4 and cfg.network.network_alpha == 0 and cfg.network.alpha == 4.0
    assert cfg.network.network_module == "networks.lora" and cfg.network.algo == "lora"
    assert cfg.optimizer.optimizer_type == "AdamW8bit" and cfg.optimizer.learning_rate == 1e-4
    assert cfg.optimizer.effective_unet_lr == 1e-4 and cfg.optimizer.effective_text_encoder_lr() == 1e-4
    assert cfg.run.max_train_steps == 800 and cfg.run.mixed_precision == "bf16" and cfg.run.seed == 42
    assert cfg.loss.prior_loss_weight == 1.0 and cfg.model.clip_skip == 2
    assert cfg.output.save_every_n_epochs == 10 and cfg.output.save_model_as == "safetensors"
    assert any(n.startswith("xformers: accepted, no effect") for n in cfg.notes)
    assert any(n.startswith("persistent_data_loader_workers: accepted") for n in cfg.notes)


def test_user_guide_command_line_loads_as_is(guide_dirs, monkeypatch):
    monkeypatch.chdir(guide_dirs)
    cfg = load_config(None, overrides=options_from_command_line(COMMAND))
    _check_guide_values(cfg)
    assert cfg.output.output_dir == guide_dirs / "OUT"  # command-line paths: relative to the working directory
    dataset = build_dataset(cfg.data, seed=cfg.run.seed)
    assert dataset.num_train_images == 3 * 40 and dataset.num_batches_per_epoch == 120


def test_user_guide_flags_as_toml_keys(guide_dirs, tmp_path, monkeypatch):
    run = guide_dirs / "run.toml"
    run.write_text(RUN_TOML, encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # TOML paths are relative to the TOML, not to the working directory
    cfg = load_config(run)
    _check_guide_values(cfg)
    assert cfg.model.pretrained_model_name_or_path == guide_dirs / "MODEL"
    assert cfg.source == run.resolve()


def test_kohya_folders_with_regularisation(guide_dirs):
    reg = guide_dirs.parent / "reg"
    (guide_dirs / "logs").mkdir()
    cfg = load_config(None, overrides=["--train_data_dir", str(guide_dirs), "--reg_data_dir", str(reg),
                                       "--caption_extension", ".txt", "--resolution", "64"])
    subsets = cfg.data.datasets[0].subsets
    assert [(s.image_dir.name, s.num_repeats, s.class_tokens, s.is_reg) for s in subsets] == [
        ("10_AAA", 10, "AAA", False), ("10_BBB", 10, "BBB", False), ("10_AAA", 10, "AAA", True)]
    assert cfg.data.datasets[0].resolution == (64, 64)
    assert any("skipped" in n and "logs" in n for n in cfg.notes)  # 'logs' and 'path' are not concept folders


def test_train_data_dir_without_concept_folders_is_an_error(tmp_path):
    _images(tmp_path / "flat", 2)
    with pytest.raises(ConfigError, match="no '<repeats>_<name>' sub-folder.*2 images directly") as err:
        load_config(None, overrides=["--train_data_dir", str(tmp_path / "flat")])
    assert err.value.field == "train_data_dir"


def test_sections_are_flattened_and_inline_dataset(tmp_path):
    _images(tmp_path / "imgs", 2)
    (tmp_path / "run.toml").write_text("""
[model_arguments]
pretrained_model_name_or_path = "m.safetensors"
[optimizer_arguments]
optimizer_type = "adamw"
optimizer_args = ["weight_decay=0.1", "betas=0.9,0.99"]
lr_scheduler = "COSINE_with_restarts"
lr_warmup_steps = 0.1
lr_scheduler_num_cycles = 3
lr_scheduler_min_lr_ratio = 0.5
[additional_network_arguments]
network_module = "lycoris.kohya"
network_dim = 8
network_args = ["algo=locon", "conv_dim=4", "dropout=0.1", "rank_dropout=0.2", "module_dropout=0.05",
                "dora_wd=True", "rank_dropout_scale=True", "preset=attn-mlp", "use_cp=true"]
[general]
flip_aug = true
[[datasets]]
resolution = 64
[[datasets.subsets]]
image_dir = "imgs"
caption_extension = ".txt"
""", encoding="utf-8")
    cfg = load_config(tmp_path / "run.toml")
    assert cfg.model.pretrained_model_name_or_path == tmp_path / "m.safetensors"
    assert cfg.optimizer.optimizer_type == "AdamW" and cfg.optimizer.kwargs == {"weight_decay": 0.1,
                                                                                "betas": (0.9, 0.99)}
    assert cfg.optimizer.lr_scheduler == "cosine_with_restarts" and cfg.optimizer.warmup_steps(200) == 20
    spec = cfg.optimizer.schedule(200)
    assert (spec.num_cycles, spec.min_lr_ratio, spec.warmup_steps) == (3, 0.5, 20)
    args = cfg.network.network_args
    assert (args.algo, args.conv_dim, args.dropout, args.rank_dropout, args.module_dropout) == ("locon", 4, 0.1, 0.2,
                                                                                                  0.05)
    assert args.dora_wd is True and args.rank_dropout_scale and args.preset == "attn-mlp" and args.use_tucker is True
    assert cfg.network.algo == "locon" and cfg.network.conv_alpha == 1.0
    assert cfg.data.datasets[0].subsets[0].flip_aug is True and cfg.data.datasets[0].resolution == (64, 64)
    meta = cfg.ss_metadata()
    assert json.loads(meta["ss_network_args"]) == {"algo": "locon", "conv_dim": "4", "dropout": "0.1",
                                                   "rank_dropout": "0.2", "module_dropout": "0.05", "dora_wd": "True",
                                                   "rank_dropout_scale": "True", "preset": "attn-mlp",
                                                   "use_cp": "true"}
    assert all(isinstance(v, str) for v in meta.values()) and meta["ss_network_dim"] == "8"


def test_overrides_win_and_take_lists(guide_dirs):
    run = guide_dirs / "run.toml"
    run.write_text(RUN_TOML, encoding="utf-8")
    cfg = load_config(run, overrides=["--learning_rate=5e-5", "--unet_lr", "1e-4", "--text_encoder_lr", "1e-5",
                                      "2e-5", "--flip_aug", "--network_args", "conv_dim=8", "conv_alpha=0",
                                      "--shuffle_caption", "false", "--gradient_checkpointing"])
    opt = cfg.optimizer
    assert opt.learning_rate == 5e-5 and opt.effective_unet_lr == 1e-4
    assert opt.effective_text_encoder_lr(0) == 1e-5 and opt.effective_text_encoder_lr(1) == 2e-5
    # general (top-level) flip_aug fills what the dataset TOML leaves unset; the TOML's own values win
    sub = cfg.data.datasets[0].subsets[0]
    assert sub.flip_aug is False and sub.shuffle_caption is True
    assert cfg.network.algo == "locon" and cfg.network.conv_alpha == 8.0 and cfg.run.gradient_checkpointing


def test_parse_overrides_shapes():
    assert parse_overrides(["--a=1", "--flip_aug", "--network_args", "x=1", "y=2", "--seed", "3"]) == [
        ("a", "1"), ("flip_aug", True), ("network_args", ["x=1", "y=2"]), ("seed", "3")]
    with pytest.raises(ConfigError, match="takes one value"):
        parse_overrides(["--seed", "1", "2"])
    with pytest.raises(ConfigError, match="expected --key"):
        parse_overrides(["seed", "1"])


def test_unknown_key_names_the_closest(guide_dirs):
    run = guide_dirs / "run.toml"
    run.write_text(RUN_TOML + 'netwrok_dim = 8\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="did you mean 'network_dim'") as err:
        load_config(run)
    assert err.value.field == "netwrok_dim"
    run.write_text(RUN_TOML, encoding="utf-8")
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        load_config(run, overrides=["--learning_rat", "1"])
    with pytest.raises(ConfigError, match="did you mean 'conv_dim'") as err:
        load_config(run, overrides=["--network_args", "conv_dmi=4"])
    assert err.value.field == "network_args.conv_dmi"
    (guide_dirs / "settings.toml").write_text(SETTINGS_TOML.replace("num_repeats", "num_repeat"), encoding="utf-8")
    with pytest.raises(ConfigError, match="did you mean 'num_repeats'") as err:
        load_config(run)
    assert err.value.field == "datasets[0].subsets[0].num_repeat"


@pytest.mark.parametrize(("line", "field", "reason"), [
    ('network_dim = "four"', "network_dim", "expected an integer"),
    ('mixed_precision = "fp8"', "mixed_precision", "must be one of no, fp16, bf16"),
    ('lr_scheduler = "cosine_restarts"', "lr_scheduler", "unknown scheduler; known: constant"),
    ('optimizer_type = "Adam9bit"', "optimizer_type", "unknown optimizer; known: AdamW, AdamW8bit"),
    ("network_dropout = 1.5", "network_dropout", "must be in"),
    ("lr_warmup_steps = 1.5", "lr_warmup_steps", "ratio"),
    ("clip_skip = 13", "clip_skip", "1..12"),
    ("full_fp16 = true", "full_fp16", "not supported here"),
    ('save_model_as = "ckpt"', "save_model_as", "only 'safetensors'"),
    ("network_train_unet_only = true\nnetwork_train_text_encoder_only = true", "network_train_text_encoder_only",
     "cannot be combined"),
    ('sample_every_n_steps = 10', "sample_prompts", "no prompt file"),
])
def test_bad_values_name_the_field(guide_dirs, line, field, reason):
    run = guide_dirs / "run.toml"
    lines = [ln for ln in RUN_TOML.splitlines() if ln.split(" = ")[0] not in line.split(" = ")[0]]
    run.write_text("\n".join(lines) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=reason) as err:
        load_config(run)
    assert err.value.field == field


@pytest.mark.parametrize(("edit", "field"), [
    (("resolution = [384, 512]", 'resolution = "big"'), "datasets[0].resolution"),
    (("num_repeats = 40", "num_repeats = 0"), "datasets[0].subsets[0].num_repeats"),
    (("keep_tokens = 1 ", "keep_tokens = -1 "), "general.keep_tokens"),
    (("image_dir = 'path/to/images'", ""), "datasets[0].subsets[0].image_dir"),
    (("batch_size = 1", "batch_size = 1\nmetadata_file = 'x.json'"), "datasets[0].metadata_file"),
])
def test_bad_dataset_values_name_the_location(guide_dirs, edit, field):
    (guide_dirs / "settings.toml").write_text(SETTINGS_TOML.replace(*edit), encoding="utf-8")
    (guide_dirs / "run.toml").write_text(RUN_TOML, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(guide_dirs / "run.toml")
    assert err.value.field.endswith(field)


def test_broken_toml_names_the_file(tmp_path):
    (tmp_path / "run.toml").write_text("network_dim = = 4\n", encoding="utf-8")
    with pytest.raises(FileFormatError, match="run.toml: not valid TOML"):
        load_config(tmp_path / "run.toml")


def test_cross_section_rules(guide_dirs):
    run = guide_dirs / "run.toml"
    run.write_text(RUN_TOML, encoding="utf-8")
    with pytest.raises(ConfigError, match="color_aug or random_crop") as err:
        load_config(run, overrides=["--cache_latents", "--random_crop"])
    assert err.value.field == "cache_latents"
    with pytest.raises(ConfigError, match="shuffle_caption") as err:
        load_config(run, overrides=["--cache_text_encoder_outputs"])
    assert err.value.field == "cache_text_encoder_outputs"
    with pytest.raises(ConfigError, match="schedules itself"):
        load_config(run, overrides=["--optimizer_type", "AdamWScheduleFree", "--lr_scheduler", "cosine"])
    cfg = load_config(run, overrides=["--masked_loss"])
    assert cfg.data.subsets[0].alpha_mask and cfg.loss.masked_loss
    cfg = load_config(run, overrides=["--use_8bit_adam", "--optimizer_type", "adamw8bit"])
    assert cfg.optimizer.optimizer_type == "AdamW8bit"


def test_no_effect_table_lists_runtime_flags():
    table = no_effect_table()
    for name in ("xformers", "sdpa", "mem_eff_attn", "persistent_data_loader_workers", "max_data_loader_n_workers",
                 "lowram", "highvram"):
        assert f"| `{name}` |" in table and NO_EFFECT[name]


def test_coerce_types():
    assert coerce("512,768", tuple[int, int], name="r") == (512, 768)
    assert coerce(512, tuple[int, int], name="r") == (512, 512)
    assert coerce("0.1", int | float, name="w") == 0.1 and coerce("10", int | float, name="w") == 10
    assert coerce("sine+0.5", str | tuple[float, ...], name="d") == "sine+0.5"
    assert coerce("1,0.5,0", str | tuple[float, ...], name="d") == (1.0, 0.5, 0.0)
    assert coerce("None", int | None, name="x") is None
    assert coerce("rel/x", Path, name="p", base_dir=Path("/base")) == Path("/base/rel/x")
    with pytest.raises(ConfigError, match="expected true or false"):
        coerce(1, bool, name="flag")


def test_block_ids_from_sd_scripts_counting():
    net = NetworkConfig(network_dim=8, network_alpha=4)
    bw = type(net.blockwise)(down_lr_weight="sine", mid_lr_weight=(0.5,), up_lr_weight=(0.0, 1.0),
                             block_lr_zero_threshold=0.1)
    weights = lr_weights_by_block(bw, Arch.SD1)
    assert list(weights) == [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
    assert weights["IN00"] == 0.0 and weights["IN11"] == 1.0  # sin(0) = 0 is under the threshold
    assert math.isclose(weights["IN06"], math.sin(math.pi * 6 / 11 / 2))
    assert weights["M00"] == 0.5 and weights["OUT00"] == 0.0 and weights["OUT05"] == 1.0  # padded with 1
    dims = list(range(1, 26))
    net = NetworkConfig(network_dim=8, blockwise=type(net.blockwise)(block_dims=tuple(dims), up_lr_weight="zeros"))
    ranks = dims_by_block(net, Arch.SD1)
    assert ranks["IN00"].dim == 1 and ranks["M00"].dim == 13 and ranks["OUT11"].dim == 0  # lr 0 -> no module
    assert ranks["IN00"].alpha == 1.0
    sdxl = NetworkConfig(blockwise=type(net.blockwise)(block_dims=(4,) * 10 + (4, 8, 4) + (4,) * 10))
    with pytest.raises(ConfigError, match="one block id"):
        dims_by_block(sdxl, Arch.SDXL)
    with pytest.raises(ConfigError, match="SD1.x needs 25"):
        dims_by_block(sdxl, Arch.SD1)


def test_optimizer_config_normalises_names_and_defaults():
    opt = OptimizerConfig(optimizer_type="adamw8BIT", lr_scheduler="Linear", learning_rate=1e-3)
    assert opt.optimizer_type == "AdamW8bit" and opt.lr_scheduler == "linear"
    assert opt.effective_unet_lr == 1e-3 and opt.effective_text_encoder_lr(1) == 1e-3


def test_empty_data_config_is_an_error():
    with pytest.raises(ConfigError, match="no dataset") as err:
        DataConfig(datasets=())
    assert err.value.field == "datasets"


# Every option name the issue lists, with a valid non-default value, and where it must land.
ISSUE_OPTIONS = {
    "pretrained_model_name_or_path": ("m.safetensors", "model"), "v2": (True, "model"),
    "v_parameterization": (True, "model"), "clip_skip": (2, "model"), "max_token_length": (225, "model"),
    "output_dir": ("out", "output"), "output_name": ("mylora", "output"), "save_precision": ("fp16", "output"),
    "save_every_n_epochs": (2, "output"), "save_every_n_steps": (50, "output"), "save_last_n_epochs": (3, "output"),
    "save_last_n_steps": (200, "output"), "save_last_n_epochs_state": (2, "output"),
    "save_last_n_steps_state": (100, "output"), "no_metadata": (True, "output"), "training_comment": ("hi", "output"),
    "metadata_title": ("T", "output"), "metadata_author": ("A", "output"), "metadata_description": ("D", "output"),
    "metadata_license": ("L", "output"), "metadata_tags": ("a,b", "output"),
    "network_module": ("networks.lora", "network"), "network_dim": (16, "network"), "network_alpha": (8, "network"),
    "network_train_unet_only": (True, "network"), "network_weights": ("prev.safetensors", "network"),
    "scale_weight_norms": (1.0, "network"), "network_dropout": (0.1, "network"),
    "loraplus_lr_ratio": (16.0, "network"), "loraplus_unet_lr_ratio": (8.0, "network"),
    "loraplus_text_encoder_lr_ratio": (4.0, "network"),
    "learning_rate": (2e-4, "optimizer"), "unet_lr": (1e-4, "optimizer"), "text_encoder_lr": (5e-5, "optimizer"),
    "optimizer_type": ("Lion", "optimizer"), "lr_scheduler": ("cosine_with_restarts", "optimizer"),
    "lr_warmup_steps": (10, "optimizer"), "lr_scheduler_num_cycles": (3, "optimizer"),
    "lr_scheduler_power": (2.0, "optimizer"), "lr_scheduler_min_lr_ratio": (0.5, "optimizer"),
    "max_grad_norm": (0.5, "optimizer"),
    "max_train_steps": (123, "run"), "max_train_epochs": (4, "run"), "train_batch_size": (2, "run"),
    "gradient_accumulation_steps": (2, "run"), "gradient_checkpointing": (True, "run"),
    "mixed_precision": ("fp16", "run"), "save_state": (True, "run"), "resume": ("state_dir", "run"),
    "seed": (7, "run"),
    "cache_latents": (True, "data"), "cache_latents_to_disk": (True, "data"),
    "min_snr_gamma": (5.0, "loss"), "debiased_estimation_loss": (True, "loss"), "v_pred_like_loss": (0.1, "loss"),
    "noise_offset": (0.05, "loss"), "multires_noise_iterations": (6, "loss"),
    "multires_noise_discount": (0.2, "loss"), "prior_loss_weight": (0.5, "loss"), "masked_loss": (True, "loss"),
    "sample_every_n_steps": (100, "sampling"), "sample_every_n_epochs": (1, "sampling"),
    "sample_prompts": ("prompts.txt", "sampling"), "sample_sampler": ("k_euler_a", "sampling"),
    "logging_dir": ("logs", "logging"), "log_prefix": ("run1", "logging"),
    "validate_every_n_steps": (50, "validation"),
    "divergence_guard": (False, "guard"), "guard_spike_factor": (4.0, "guard"), "guard_window": (20, "guard"),
    "guard_patience": (5, "guard"), "guard_max_rollbacks": (2, "guard"), "guard_lr_decay": (0.3, "guard"),
}
DATASET_ISSUE_OPTIONS = {  # top-level fallbacks of every subset / dataset
    "resolution": ((64, 64), "64,64"), "enable_bucket": (True, True), "min_bucket_reso": (64, 64),
    "max_bucket_reso": (128, 128), "bucket_reso_steps": (32, 32), "bucket_no_upscale": (True, True),
    "caption_extension": (".txt", ".txt"), "shuffle_caption": (False, False), "keep_tokens": (2, 2),
    "keep_tokens_separator": ("|||", "|||"), "caption_dropout_rate": (0.1, 0.1),
    "caption_dropout_every_n_epochs": (3, 3), "caption_tag_dropout_rate": (0.2, 0.2), "flip_aug": (True, True),
    "color_aug": (False, False), "random_crop": (False, False), "alpha_mask": (True, True),
    "validation_split": (0.25, 0.25),
}
BLOCKWISE_ISSUE_OPTIONS = {
    "down_lr_weight": ("sine+0.5", "sine+0.5"), "mid_lr_weight": ("0.5", (0.5,)),
    "up_lr_weight": ("1,1,0.5", (1, 1, .5)),
    "block_lr_zero_threshold": (0.1, 0.1), "block_dims": (",".join(["4"] * 25), (4,) * 25),
    "block_alphas": (",".join(["2"] * 25), (2.0,) * 25), "conv_block_dims": (",".join(["2"] * 25), (2,) * 25),
    "conv_block_alphas": (",".join(["1"] * 25), (1.0,) * 25),
}


def test_every_issue_option_lands_in_its_field(tmp_path):
    from lib_lora.train.toml_config import build_config, convert_options

    _images(tmp_path / "10_sks", 2)
    raw = {name: value for name, (value, _) in ISSUE_OPTIONS.items()}
    raw.update({name: value for name, (value, _) in BLOCKWISE_ISSUE_OPTIONS.items()})
    raw.update({name: value for name, (_, value) in DATASET_ISSUE_OPTIONS.items()})
    raw.update(train_data_dir=str(tmp_path), network_args=["conv_dim=4"], optimizer_args=["weight_decay=0.1"])
    notes: list[str] = []
    cfg = build_config(convert_options(raw, base_dir=tmp_path, notes=notes), notes=notes)
    for name, (value, section) in ISSUE_OPTIONS.items():
        got = getattr(getattr(cfg, section), name)
        assert got == (tmp_path / value if isinstance(got, Path) else value), name
    for name, (_, expected) in BLOCKWISE_ISSUE_OPTIONS.items():
        assert getattr(cfg.network.blockwise, name) == expected, name
    sub, ds = cfg.data.datasets[0].subsets[0], cfg.data.datasets[0]
    for name, (expected, _) in DATASET_ISSUE_OPTIONS.items():
        assert getattr(sub if hasattr(sub, name) and name != "resolution" else ds, name) == expected, name
    assert ds.batch_size == 2 and cfg.optimizer.kwargs == {"weight_decay": 0.1}
    assert cfg.network.network_args.conv_dim == 4 and cfg.data.caches_latents


def test_option_tables_are_disjoint():
    from lib_lora.train.toml_config import OPTIONS, UNSUPPORTED

    assert not set(OPTIONS) & set(NO_EFFECT) and not set(OPTIONS) & set(UNSUPPORTED)
    assert not set(NO_EFFECT) & set(UNSUPPORTED)


def test_total_steps_from_epochs(guide_dirs):
    run = guide_dirs / "run.toml"
    run.write_text(RUN_TOML, encoding="utf-8")
    assert load_config(run).total_steps(120) == 800
    cfg = load_config(run, overrides=["--max_train_epochs", "3", "--gradient_accumulation_steps", "2"])
    assert cfg.total_steps(120) == 3 * 60 and cfg.total_steps(120, num_processes=2) == 3 * 30
