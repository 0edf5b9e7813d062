"""Base models saved as diffusers folders (SD1 / SD2 / SDXL) load offline and train like single files."""
from __future__ import annotations

import json

import pytest
import torch

from lib_lora.errors import FileFormatError
from lib_lora.sd.diffusers_folder import load_diffusers_folder
from lib_lora.sd.loading import load_model
from lib_lora.sd.tiny import tiny_components
from lib_lora.types import Arch


def save_folder(folder, name: str, seed: int = 0, prediction_type: str = "epsilon"):
    comps = tiny_components(name, seed=seed)
    comps.unet.save_pretrained(folder / "unet")
    comps.vae.save_pretrained(folder / "vae")
    for i, te in enumerate(comps.text_encoders):
        te.save_pretrained(folder / ("text_encoder" if i == 0 else "text_encoder_2"))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"prediction_type": prediction_type, "beta_start": 0.00085, "beta_end": 0.012,
         "num_train_timesteps": 1000}), encoding="utf-8")
    (folder / "model_index.json").write_text("{}", encoding="utf-8")
    return comps


@pytest.mark.parametrize("name,arch,prediction", [("sd1", Arch.SD1, "epsilon"), ("sd2", Arch.SD2, "v_prediction"),
                                                   ("sdxl", Arch.SDXL, "epsilon")])
def test_folder_loads_with_every_weight(tmp_path, name, arch, prediction):
    comps = save_folder(tmp_path, name, prediction_type=prediction)
    model = load_model(tmp_path)
    assert model.arch is arch and model.prediction_type == prediction and model.resolution == 128
    assert len(model.tokenizers) == len(model.text_encoders) == len(comps.text_encoders)
    assert model.short_hash and len(model.short_hash) == 10
    pairs = [(model.unet, comps.unet), (model.vae, comps.vae), *zip(model.text_encoders, comps.text_encoders)]
    for ours, theirs in pairs:
        expected = theirs.state_dict()
        for key, value in ours.state_dict().items():
            if key in expected:
                assert torch.equal(value, expected[key]), key


def test_a_training_config_takes_a_folder(tmp_path):
    from lib_lora.train.run import train
    from lib_lora.train.toml_config import load_config
    from tests.train.fixtures import write_images, write_run

    save_folder(tmp_path / "model", "sd1")
    write_images(tmp_path / "train" / "5_sks", 2)
    cfg = load_config(write_run(tmp_path, pretrained_model_name_or_path="model", max_train_steps=1,
                                train_batch_size=1))
    assert train(cfg).status == "finished"


def test_bad_folders_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileFormatError, match="not a diffusers model"):
        load_model(tmp_path / "empty")
    save_folder(tmp_path / "m", "sd1")
    (tmp_path / "m" / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileFormatError, match="no weights"):
        load_model(tmp_path / "m")
    with pytest.raises(FileFormatError, match="expected an SDXL"):
        load_diffusers_folder(tmp_path / "m", arch=Arch.SDXL)
