"""Merging LoRAs into a checkpoint: WeightPatcher's result bit for bit, sd-scripts' merge_lora.py --sd_model."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from lib_lora.keys import NORM_ROLES
from lib_lora.networks import load_network
from lib_lora.ops import LoraInput, MergeModelRequest, merge_into_model
from lib_lora.ops.checkpoint_keys import checkpoint_targets
from lib_lora.ops.stream import Entry, StreamWriter, TensorReader
from lib_lora.patching import WeightPatcher
from lib_lora.sd.checkpoint import load_checkpoint
from lib_lora.types import Arch, Component
from tests.helpers import checksum, make_network_file
from tests.ops.synthetic import sd15_shapes
from tests.ops.util import SD_SCRIPTS, SMALL_A, SMALL_B, _inner, terms


def _model_targets(model, arch: Arch):
    from lib_lora.keys import ModelTargets, clip_text_targets, unet_targets

    comps = [Component.TE1, Component.TE2] if arch is Arch.SDXL else [Component.TE]
    return ModelTargets.merge(arch, [unet_targets(model.unet, arch, "diffusers")] +
                              [clip_text_targets(te, c) for te, c in zip(model.text_encoders, comps)])


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_merge_into_model_equals_weight_patcher_bit_for_bit(arch, tiny_checkpoints, tmp_path):
    """Two LoRAs (LoRA/LoCon and train_norm layers with te/unet strengths and block weights, LoHa at a negative
    strength) merged into an fp32 file, loaded back, equal the same stack WeightPatcher merges into the loaded model
    (SD2 and SDXL: the OpenCLIP q/k/v are row blocks of one fused tensor in the file)."""
    from lib_lora.io import save_file

    a = Arch(arch)
    src = tiny_checkpoints[arch]
    model = load_checkpoint(src, compute_hash=False)
    targets = _model_targets(model, a)
    chosen = [t for t in targets.targets.values() if t.role != "te_other" and t.role not in NORM_ROLES]
    norms = [t for t in targets.targets.values() if t.role in NORM_ROLES]
    g = torch.Generator().manual_seed(2)
    norm_tensors = {f"{t.name}.{part}": torch.randn(t.shape[0], generator=g) * 0.1 for t in norms
                    for part in ("w_norm", "b_norm")}  # train_norm layers: their weight and bias change
    save_file({**make_network_file(chosen, "lora", 4, 1), **norm_tensors}, tmp_path / "a.safetensors")
    save_file(make_network_file([t for t in chosen if t.role in ("attn", "te_attn")], "loha", 2, 2),
              tmp_path / "b.safetensors")
    loras = (LoraInput(str(tmp_path / "a.safetensors"), 0.7, 0.9, "OUTALL"), LoraInput(str(tmp_path / "b.safetensors"),
                                                                                        -0.5))
    out = tmp_path / "merged.safetensors"
    result = merge_into_model(MergeModelRequest(str(src), loras, str(out)))
    assert result.arch is a and all(not m for m in result.unmatched.values())
    WeightPatcher(targets).apply([i.application(load_network(i.path, arch=a), a) for i in loras])
    merged = load_checkpoint(out, compute_hash=False)
    assert checksum(merged.unet, *merged.text_encoders, merged.vae) == checksum(model.unet, *model.text_encoders,
                                                                                 model.vae)


def test_fp16_output_and_the_web_ui_yaml(tiny_checkpoints, tmp_path):
    src = tmp_path / "model.safetensors"
    shutil.copyfile(tiny_checkpoints["sd1"], src)
    src.with_suffix(".yaml").write_text("model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n")
    out = tmp_path / "merged.safetensors"
    result = merge_into_model(MergeModelRequest(str(src), (LoraInput(str(SMALL_A), 0.8),), str(out), dtype="fp16"))
    with TensorReader(out) as reader:
        assert {reader.dtype(k) for k in reader.names()} == {torch.float16}
        meta = reader.metadata
    assert out.with_suffix(".yaml").read_text() == src.with_suffix(".yaml").read_text()
    operation = json.loads(meta["lora_studio.operation"])
    assert operation["operation"] == "merge-into-model" and operation["applied"] == {"small_a": 12}
    assert meta["modelspec.merged_from"] == "model, small_a" and result.tensors == len(reader.names())
    out.with_suffix(".yaml").unlink()  # a stand-in yaml: the web UI's would describe the model
    assert load_checkpoint(out, compute_hash=False).arch is Arch.SD1


def _sd15_subset(path, keys) -> None:
    """An SD1.5-named file holding only `keys`, all zeros (enough to be recognised and merged into)."""
    shapes = sd15_shapes()
    entries = [Entry(k, torch.float32, shapes[k]) for k in keys]
    with StreamWriter(path, entries) as w:
        for e in entries:
            w.write(e.name, torch.zeros(e.shape))


def test_same_changes_as_sd_scripts_merge_into_a_full_size_sd15(real_lora_dir, tmp_path):
    """sd-scripts' merge_lora.py --sd_model (sd15_lora 0.7, sd15_locon -0.4; README in tests/data/ops): the change
    of every one of the 350 weights, by norm, and the leading entries of some, merged here into zeros."""
    # the pinned change is fl32(W0 + ΔW) - W0 with W0 ~ N(0, 0.02²): it carries W0's rounding (~1e-9 per entry,
    # ~1e-4 of the norm); merged into zeros here, ours has none
    pins = json.loads((SD_SCRIPTS / "merge_model_pins.json").read_text())["modules"]
    a = load_network(real_lora_dir / "sd15_lora.safetensors")
    b = load_network(real_lora_dir / "sd15_locon.safetensors")
    assert set(pins) == set(b.modules)
    for name, pin in pins.items():
        parts = [t for net, s in ((a, 0.7), (b, -0.4)) if name in net.modules for t in terms(net, name, s)]
        assert math.sqrt(_inner(parts, parts)) == pytest.approx(pin["fro"], rel=3e-4), name

    chosen = ["lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_unet_down_blocks_0_attentions_0_proj_in",
              "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
              "lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_0_resnets_0_time_emb_proj",
              "lora_unet_up_blocks_3_resnets_0_conv_shortcut"]
    targets = checkpoint_targets(sd15_shapes(), Arch.SD1)
    src, out = tmp_path / "zeros.safetensors", tmp_path / "merged.safetensors"
    _sd15_subset(src, [targets[n].key for n in chosen])
    loras = (LoraInput(str(real_lora_dir / "sd15_lora.safetensors"), 0.7),
             LoraInput(str(real_lora_dir / "sd15_locon.safetensors"), -0.4))
    result = merge_into_model(MergeModelRequest(str(src), loras, str(out)))
    assert result.applied == {"sd15_lora": 3, "sd15_locon": 6} and len(result.unmatched["sd15_locon"]) == 344
    with TensorReader(out) as reader:
        for name in chosen:
            change = reader.read(targets[name].key).reshape(targets[name].shape[0], -1)
            assert float(change.norm()) == pytest.approx(pins[name]["fro"], rel=3e-4), name
            wanted = torch.tensor(pins[name]["corner"]).reshape(4, 4)
            assert torch.allclose(change[:4, :4], wanted, rtol=1e-3, atol=1e-8), name


def test_text_encoder_and_unet_strengths_and_block_weights_are_per_module(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints["sd1"]
    out = tmp_path / "merged.safetensors"
    lora = LoraInput(str(SMALL_B), 0.0, 1.0, "NONE")  # te 0, and every U-Net block weighted 0 by the preset
    result = merge_into_model(MergeModelRequest(str(src), (lora,), str(out)))
    assert result.applied == {"small_b": 0}
    with TensorReader(src) as before, TensorReader(out) as after:
        assert all(torch.equal(before.read(k), after.read(k)) for k in before.names())
