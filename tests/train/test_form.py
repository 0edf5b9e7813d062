"""The training form's engine side: every engine option is a form field (a new one appears by itself), values are
checked by the engine with its own messages, saved TOMLs run as the form's config, sd-scripts / kohya_ss TOMLs fill
the form, the dataset preview lists everything at once, and LoRA metadata edits are atomic with hashes recomputed."""
from __future__ import annotations

import dataclasses
import json
import sys

import pytest
from PIL import Image

from lib_lora.errors import ConfigError, FileFormatError
from lib_lora.io import addnet_hash, load_file, save_file
from lib_lora.io.metadata_edit import edit_metadata
from lib_lora.lora_library import LoraLibrary
from lib_lora.train import optimizers, schedulers, toml_config
from lib_lora.train.form_toml import form_from_toml, toml_from_form
from lib_lora.train.preview import preview_dataset
from lib_lora.train.schema import (
    GROUPS,
    HIDDEN,
    config_from_form,
    default_values,
    error_field,
    field_errors,
    option_specs,
    spec_map,
)
from lib_lora.train.toml_write import dumps
from tests.train.fixtures import write_images

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def test_every_engine_option_is_a_field_with_registry_choices():
    specs = spec_map()
    assert set(toml_config.OPTIONS) - HIDDEN <= set(specs)
    assert {"network_args.conv_dim", "network_args.algo", "network_args.dora_wd"} <= set(specs)
    assert {s.group for s in specs.values()} <= set(GROUPS)
    assert specs["optimizer_type"].choices == tuple(optimizers.optimizer_names())
    assert specs["lr_scheduler"].choices == tuple(schedulers.scheduler_names())
    assert specs["network_module"].widget == "choice" and specs["network_dim"].widget == "int"
    assert specs["min_snr_gamma"].widget == "text" and specs["flip_aug"].widget == "bool"
    assert specs["network_dim"].default == 4 and specs["resolution"].form_value((512, 512)) == "512"
    assert all(s.help for s in specs.values() if s.name in ("learning_rate", "train_data_dir", "network_dim"))


def test_a_new_engine_option_appears_without_ui_code(monkeypatch):
    table = dict(toml_config.OPTIONS)
    table["brand_new_option"] = toml_config.Option("brand_new_option", "loss", float | None)
    table["new_section_option"] = toml_config.Option("new_section_option", "somewhere_new", int)
    monkeypatch.setattr(toml_config, "OPTIONS", table)
    specs = spec_map()
    assert specs["brand_new_option"].group == "Loss & noise" and specs["brand_new_option"].widget == "text"
    assert specs["new_section_option"].group == "Advanced" and specs["new_section_option"].widget == "int"


def _form(tmp_path, **changes):
    write_images(tmp_path / "train" / "3_sks", n=3, size=64)
    values = default_values()
    values.update(pretrained_model_name_or_path="embedded", train_data_dir=str(tmp_path / "train"),
                  output_dir=str(tmp_path / "out"), output_name="mine", resolution="64", caption_extension=".txt",
                  max_train_steps=6, seed="7", learning_rate=1e-3, min_snr_gamma="5",
                  **{"network_args.conv_dim": "4", "optimizer_args": "weight_decay=0.05 betas=0.9,0.99"})
    values.update(changes)
    return values


def test_wrong_types_are_named_field_by_field(tmp_path):
    values = _form(tmp_path, min_snr_gamma="five", resolution="64x", **{"network_args.conv_alpha": "big"})
    errors = field_errors(values)
    assert set(errors) == {"min_snr_gamma", "resolution", "network_args.conv_alpha"}
    assert "expected a number" in errors["min_snr_gamma"]
    with pytest.raises(ConfigError) as info:
        config_from_form(_form(tmp_path, train_data_dir=str(tmp_path / "missing")))
    assert error_field(info.value, spec_map()) == "train_data_dir" and "folder not found" in str(info.value)
    with pytest.raises(ConfigError) as info:
        config_from_form(_form(tmp_path, network_dim=-2))
    assert error_field(info.value, spec_map()) == "network_dim"


def test_saved_toml_is_the_forms_config(tmp_path):
    values = _form(tmp_path, flip_aug=True, lr_scheduler="cosine")
    cfg = config_from_form(values)
    assert cfg.network.network_args.conv_dim == 4 and cfg.optimizer.kwargs == {"weight_decay": 0.05,
                                                                                 "betas": (0.9, 0.99)}
    path = tmp_path / "saved" / "run.toml"
    path.parent.mkdir()
    path.write_text(toml_from_form(values, path.name), encoding="utf-8")
    loaded = toml_config.load_config(path)

    def comparable(c):
        return {k: v for k, v in dataclasses.asdict(c).items() if k not in ("source", "notes")}

    assert comparable(loaded) == comparable(cfg)
    text = path.read_text()
    assert "[network]" in text and 'network_args = ["conv_dim=4"]' in text and "flip_aug = true" in text
    # and the form reads it back unchanged
    again, _ = form_from_toml(path)
    assert again["min_snr_gamma"] == "5" and again["network_args.conv_dim"] == "4" and again["flip_aug"] is True
    assert comparable(config_from_form(again)) == comparable(cfg)


def test_kohya_toml_fills_the_form(tmp_path):
    write_images(tmp_path / "imgs", n=2, size=64)
    path = tmp_path / "kohya.toml"
    path.write_text("""
[model_arguments]
pretrained_model_name_or_path = "embedded"
[additional_network_arguments]
network_module = "networks.lora"
network_dim = 8
network_args = ["conv_dim=2", "down_lr_weight=sine"]
[optimizer_arguments]
use_8bit_adam = false
optimizer_type = "Lion"
learning_rate = 2e-4
[training_arguments]
output_dir = "out"
xformers = true
max_train_steps = 9
[general]
caption_extension = ".txt"
[[datasets]]
resolution = 64
[[datasets.subsets]]
image_dir = "imgs"
num_repeats = 2
""", encoding="utf-8")
    values, notes = form_from_toml(path, inline_dir=tmp_path / "settings")
    assert values["network_dim"] == 8 and values["network_args.conv_dim"] == "2"
    assert values["down_lr_weight"] == "sine" and values["optimizer_type"] == "Lion"
    assert values["output_dir"] == str(tmp_path / "out") and values["max_train_steps"] == 9
    assert any("xformers" in n for n in notes) and any("inline" in n for n in notes)
    cfg = config_from_form(values)
    assert cfg.data.subsets[0].image_dir == tmp_path / "imgs" and cfg.data.subsets[0].num_repeats == 2

    path.write_text("[model_arguments]\nnetwork_dim = = 4\n", encoding="utf-8")
    with pytest.raises(FileFormatError, match="not valid TOML"):
        form_from_toml(path)
    path.write_text("learning_rat = 1e-4\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="learning_rate"):
        form_from_toml(path)


def test_dataset_preview_lists_everything_at_once(tmp_path):
    train = tmp_path / "train"
    write_images(train / "4_sks", n=3, size=64, caption="sks, red square, blue")
    write_images(train / "1_other", n=2, size=64, caption="a thing")
    (train / "1_other" / "img0.txt").write_text("", encoding="utf-8")
    (train / "1_other" / "img1.txt").write_bytes(b"caf\xe9")
    (train / "4_sks" / "bad.png").write_bytes(b"not a png")
    values = _form(tmp_path, train_data_dir=str(train))
    preview = preview_dataset(config_from_form(values))
    assert not preview.ok
    reasons = " | ".join(f"{p.path}: {p.reason}" for p in preview.problems)
    assert "bad.png" in reasons and "img1.txt" in reasons and "empty caption" in reasons
    good = tmp_path / "good"
    write_images(good / "4_sks", n=3, size=64, caption="sks, red square, blue")
    Image.new("RGB", (192, 64)).save(good / "4_sks" / "wide.png")
    preview = preview_dataset(config_from_form(_form(tmp_path, train_data_dir=str(good), enable_bucket=True,
                                                     min_bucket_reso=32, max_bucket_reso=128,
                                                     bucket_reso_steps=32)))
    assert preview.ok and preview.samples_per_epoch == 16
    folder = preview.folders[0]
    assert (folder.images, folder.repeats, folder.class_tokens, folder.captions_found) == (4, 4, "sks", 3)
    assert folder.top_tags[0] == ("sks", 4)  # the uncaptioned image gets the class token
    assert sum(n for _, n in preview.buckets) == 16 and len(preview.buckets) == 2
    assert preview.total_steps == 6 and preview.steps_per_epoch >= 1


def test_toml_writer_round_trips():
    doc = {"a": 1, "b": 1e-4, "c": "x \"q\" \\ é", "d": [1, 2], "e": True, "f": None, "t": {"k": [0.5, 1.0]},
           "datasets": [{"resolution": 64, "subsets": [{"image_dir": "/x", "num_repeats": 2}, {"image_dir": "/y"}]}]}
    back = tomllib.loads(dumps(doc, "two\nlines"))
    assert back == {k: v for k, v in doc.items() if v is not None}


def test_metadata_edit_is_atomic_and_recomputes_hashes(tmp_path):
    import torch

    path = tmp_path / "style.safetensors"
    tensors = {"lora_unet_x.lora_down.weight": torch.ones(2, 3), "lora_unet_x.lora_up.weight": torch.zeros(3, 2)}
    save_file(tensors, path, {"ss_output_name": "style", "ss_tag_frequency": json.dumps({"a": {"old": 3}})})
    assert LoraLibrary(tmp_path).find("style").trigger_words == ("old",)
    meta = edit_metadata(path, {"title": "My style", "trigger_words": "pastel, soft", "description": ""})
    loaded = load_file(path)
    assert loaded.metadata == meta and meta["modelspec.title"] == "My style"
    assert "modelspec.description" not in meta and torch.equal(loaded.tensors["lora_unet_x.lora_down.weight"],
                                                               tensors["lora_unet_x.lora_down.weight"])
    assert meta["sshs_model_hash"] == addnet_hash(path)
    assert LoraLibrary(tmp_path).find("style").trigger_words == ("pastel", "soft")
    with pytest.raises(ConfigError):
        edit_metadata(path, {"sshs_model_hash": "x"})
    assert [p.name for p in tmp_path.iterdir()] == ["style.safetensors"]  # no temporary file left behind


def test_option_specs_are_ordered_by_group():
    order = [GROUPS.index(s.group) for s in option_specs()]
    assert order == sorted(order)
