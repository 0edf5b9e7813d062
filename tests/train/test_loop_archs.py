"""The same loop on SD2 (v-prediction) and SDXL diffusers models, and on the web UI's LDM model object: the
web-UI path trains the same network as the diffusers path on the same weights."""
from __future__ import annotations

import pytest
import torch

from lib_lora.info import describe
from lib_lora.io import load_file, read_metadata
from lib_lora.sd.checkpoint import load_tokenizers
from lib_lora.train import loop, session
from lib_lora.train.families import family_for
from lib_lora.train.metadata import ModelFacts
from lib_lora.train.run import train
from lib_lora.train.toml_config import load_config
from lib_lora.types import Arch
from tests.train.fixtures import tiny_model, write_images, write_run
from tests.train.ldm_standin import sd1_pair


@pytest.mark.parametrize("arch,version,modules", [
    ("sd2", "sd_v2_v", {"te": 72, "unet": 192}),
    ("sdxl", "sdxl_base_v1-0", {"te1": 72, "te2": 72, "unet": 242}),
])
def test_sd2_and_sdxl_train(tmp_path, arch, version, modules):
    write_images(tmp_path / "train" / "3_sks", 2)
    cfg = load_config(write_run(tmp_path, max_train_steps=2, train_batch_size=1))
    model = tiny_model(arch)
    if arch == "sdxl":
        model.tokenizers = load_tokenizers(Arch.SDXL)
    result = train(cfg, model=model)
    meta = read_metadata(result.final_file)
    assert meta["ss_base_model_version"] == version
    assert meta["modelspec.prediction_type"] == ("v" if arch == "sd2" else "epsilon")
    assert describe(result.final_file).modules == modules


def _run(tmp_path, family, name):
    cfg = load_config(write_run(tmp_path, max_train_steps=3, train_batch_size=2, output_name=name))
    losses = []
    s = session.prepare(cfg, family, ModelFacts(family.arch, False, name),
                        listeners=[lambda e: losses.append(e.loss) if e.kind == "step" else None])
    result = loop.run(s)
    return losses, load_file(result.final_file).tensors


def test_web_ui_model_trains_like_the_diffusers_model(tmp_path):
    write_images(tmp_path / "train" / "5_sks", 4)
    diffusers_model, standin = sd1_pair(seed=4)
    with family_for(diffusers_model) as fam:
        ref_losses, ref = _run(tmp_path, fam, "diffusers")
    with family_for(standin) as fam:
        ldm_losses, ldm = _run(tmp_path, fam, "webui")
    assert ref.keys() == ldm.keys()
    torch.testing.assert_close(torch.tensor(ldm_losses), torch.tensor(ref_losses), rtol=1e-3, atol=1e-4)
    # float rounding differs between the two U-Net codes; the network as a whole must agree closely
    ups = [k for k in ref if k.endswith("lora_up.weight")]
    diff = torch.cat([(ldm[k] - ref[k]).flatten() for k in ups]).norm()
    relative = float(diff / torch.cat([ref[k].flatten() for k in ups]).norm())
    assert relative < 1e-3, f"LoRA trained on the web UI's model differs from the diffusers one by {relative:.2e}"
