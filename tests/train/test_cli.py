"""The `train` command as users run it: the user guide's example (dataset TOML + sd-scripts flags written as TOML
keys) and a two-process `accelerate launch` on CPU (gloo)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lib_lora.io import read_metadata
from lib_lora.sd.checkpoint import save_checkpoint
from tests.conftest import ROOT
from tests.train.fixtures import tiny_model, write_images

DATASET_TOML = """[general]
enable_bucket = false   # aspect-ratio bucketing on/off
flip_aug = false        # no horizontal-flip augmentation
shuffle_caption = true  # shuffle caption tags each time an image is used
keep_tokens = 1         # protect the first token (the trigger word) from shuffling

[[datasets]]
batch_size = 1
resolution = [128, 128]

  [[datasets.subsets]]
  image_dir = 'images'
  caption_extension = '.txt'
  num_repeats = 40
"""
# the user guide's accelerate command, flag for flag, as TOML keys (model, paths and step count adapted)
RUN_TOML = """pretrained_model_name_or_path = "model.safetensors"
output_dir = "out"
prior_loss_weight = 1.0
network_dim = 4
network_alpha = 0
learning_rate = 1e-4
max_train_steps = {steps}
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


@pytest.fixture()
def example(tmp_path):
    write_images(tmp_path / "images", 3, caption="AAA, red square, blue background")
    (tmp_path / "settings.toml").write_text(DATASET_TOML, encoding="utf-8")
    save_checkpoint(tiny_model(), tmp_path / "model.safetensors", write_yaml=False, dtype=torch.float32)
    return tmp_path


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_user_guide_example_runs_as_is(example):
    (example / "run.toml").write_text(RUN_TOML.format(steps=3), encoding="utf-8")
    done = _cli([sys.executable, "-m", "lib_lora", "train", "--config", "run.toml", "--no-progress"], example)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "xformers: accepted, no effect here" in done.stdout
    meta = read_metadata(example / "out" / "last.safetensors")
    assert meta["ss_network_alpha"] == "4.0" and meta["ss_clip_skip"] == "2" and meta["ss_seed"] == "42"
    assert meta["ss_optimizer"].startswith("bitsandbytes.optim") and meta["ss_mixed_precision"] == "bf16"
    subsets = json.loads(meta["ss_datasets"])[0]["subsets"]
    assert subsets[0]["num_repeats"] == 40 and subsets[0]["keep_tokens"] == 1 and subsets[0]["shuffle_caption"]


def test_unknown_option_names_the_closest(example):
    (example / "run.toml").write_text(RUN_TOML.format(steps=3) + "network_dimm = 8\n", encoding="utf-8")
    done = _cli([sys.executable, "-m", "lib_lora", "train", "--config", "run.toml"], example)
    assert done.returncode == 1
    assert "network_dimm" in done.stderr and "network_dim" in done.stderr
    assert not (example / "out").exists()


def test_two_process_accelerate_launch_writes_one_file(example):
    (example / "run.toml").write_text(RUN_TOML.format(steps=2).replace('"AdamW8bit"', '"AdamW"'), encoding="utf-8")
    accelerate = Path(sys.executable).with_name("accelerate")
    done = _cli([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
                 "-m", "lib_lora", "train", "--config", "run.toml", "--no-progress"], example)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert sorted(p.name for p in (example / "out").iterdir()) == ["last.safetensors"]
    assert done.stdout.count("[start]") == 1  # only rank 0 reports
    meta = read_metadata(example / "out" / "last.safetensors")
    assert meta["ss_steps"] == "2"
