"""Bad input to the LoRA tools: clear errors naming what is wrong, inputs untouched, no partial output."""
from __future__ import annotations

import errno
import os

import pytest
import torch

from lib_lora.errors import ArchMismatchError, ConfigError, KeyMapError, NonFiniteError, ShapeMismatchError, WriteError
from lib_lora.io import save_file
from lib_lora.ops import (
    ConvertRequest,
    ExtractRequest,
    LoraInput,
    MergeLorasRequest,
    MergeModelRequest,
    OperationCancelled,
    RankRule,
    ResizeRequest,
    convert,
    extract,
    merge_into_model,
    merge_loras,
    resize,
)
from lib_lora.ops.stream import Entry, StreamWriter, TensorReader
from tests.ops.util import SMALL_A, SMALL_B, fingerprint

XL_META = {"ss_base_model_version": "sdxl_base_v1-0"}


@pytest.fixture()
def xl_lora(tmp_path):
    path = tmp_path / "xl.safetensors"
    save_file({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 64),
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(64, 2)}, path,
              XL_META)
    return path


def _leftovers(folder) -> list[str]:
    return [p for p in os.listdir(folder) if p.endswith(".tmp")]


def test_mismatched_architectures(xl_lora, tiny_checkpoints, tmp_path):
    out = str(tmp_path / "o.safetensors")
    with pytest.raises(ArchMismatchError, match="SDXL.*cannot be merged"):
        merge_loras(MergeLorasRequest((LoraInput(str(SMALL_A)), LoraInput(str(xl_lora))), out))
    with pytest.raises(ArchMismatchError, match="model is SD1"):
        merge_into_model(MergeModelRequest(str(tiny_checkpoints["sd1"]), (LoraInput(str(xl_lora)),), out))
    with pytest.raises(ArchMismatchError, match="SD1.x but .* is SDXL"):
        extract(ExtractRequest(str(tiny_checkpoints["sd1"]), str(tiny_checkpoints["sdxl"]), out))
    assert not os.path.exists(out)


def test_lora_for_another_model_and_shape_mismatch(tiny_checkpoints, real_lora_dir, tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"lora_te_text_model_encoder_layers_20_self_attn_q_proj.lora_down.weight": torch.zeros(2, 64),
               "lora_te_text_model_encoder_layers_20_self_attn_q_proj.lora_up.weight": torch.zeros(64, 2)}, foreign)
    with pytest.raises(KeyMapError, match="none of its 1 modules exist"):
        merge_into_model(MergeModelRequest(str(tiny_checkpoints["sd1"]), (LoraInput(str(foreign)),),
                                           str(tmp_path / "o.safetensors")))
    with pytest.raises(ShapeMismatchError, match="sd15_lora.*expected shape"):  # full-size SD1.5 LoRA, tiny model
        merge_into_model(MergeModelRequest(str(tiny_checkpoints["sd1"]),
                                           (LoraInput(str(real_lora_dir / "sd15_lora.safetensors")),),
                                           str(tmp_path / "o.safetensors")))
    with pytest.raises(ShapeMismatchError, match="another shape"):
        full_size = LoraInput(str(real_lora_dir / "sd15_lora.safetensors"))
        merge_loras(MergeLorasRequest((LoraInput(str(SMALL_A)), full_size), str(tmp_path / "o.safetensors")))
    assert not (tmp_path / "o.safetensors").exists()


def test_nan_in_a_lora_and_in_a_checkpoint(tiny_checkpoints, tmp_path):
    bad = tmp_path / "nan.safetensors"
    tensors = {k: v.clone() for k, v in __import__("safetensors.torch").torch.load_file(SMALL_B).items()}
    key = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, bad)
    with pytest.raises(NonFiniteError, match=key.split(".")[0]):
        resize(ResizeRequest(str(bad), str(tmp_path / "o.safetensors"), RankRule(2)))
    from lib_lora.networks import load_network
    from lib_lora.ops.checkpoint_keys import checkpoint_targets
    from lib_lora.types import Arch

    model = tmp_path / "nan-model.safetensors"
    with TensorReader(tiny_checkpoints["sd1"]) as reader:
        names = reader.names()
        targets = checkpoint_targets(reader.shapes(), Arch.SD1)
    merged = targets[sorted(load_network(SMALL_A, arch=Arch.SD1).modules)[0]].key
    # a tensor the merge leaves alone, and one it merges (checked after merging, still named as the model's)
    for victim in (names[len(names) // 2], merged):
        with TensorReader(tiny_checkpoints["sd1"]) as reader, \
                StreamWriter(model, [Entry(k, reader.dtype(k), reader.shape(k)) for k in names]) as w:
            for k in names:
                t = reader.read(k).clone()
                if k == victim:
                    t.view(-1)[0] = float("inf")
                w.write(k, t)
        with pytest.raises(NonFiniteError, match=victim) as err:
            merge_into_model(MergeModelRequest(str(model), (LoraInput(str(SMALL_A)),),
                                               str(tmp_path / "o.safetensors")))
        assert "strength" not in str(err.value)
        assert not (tmp_path / "o.safetensors").exists() and not _leftovers(tmp_path)


def test_output_equal_to_an_input_or_existing(tmp_path):
    copy = tmp_path / "a.safetensors"
    copy.write_bytes(SMALL_A.read_bytes())
    before = fingerprint(copy)
    with pytest.raises(ConfigError, match="is the input"):
        resize(ResizeRequest(str(copy), str(copy), RankRule(2), force=True))
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep me")
    with pytest.raises(ConfigError, match="exists; pass force"):
        convert(ConvertRequest(str(copy), str(existing)))
    assert existing.read_bytes() == b"keep me" and fingerprint(copy) == before
    convert(ConvertRequest(str(copy), str(existing), force=True))
    assert existing.read_bytes() != b"keep me"
    with pytest.raises(ConfigError, match="outputs are written as .safetensors"):
        convert(ConvertRequest(str(copy), str(tmp_path / "out.pt")))


def test_disk_full_leaves_no_partial_file(tiny_checkpoints, tmp_path, monkeypatch):
    """Simulated ENOSPC halfway through: the error surfaces, no output or temporary file, the old output intact."""
    from lib_lora.io import safetensors_io
    from lib_lora.ops import stream

    out = tmp_path / "out.safetensors"
    out.write_bytes(b"previous")
    written = []

    def full_disk(fd, data):
        if sum(written) > 200_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(len(data))
        os.write(fd, data)

    monkeypatch.setattr(stream, "_write_all", full_disk)
    with pytest.raises(WriteError, match="out.safetensors: could not be written: no space left on device"):
        merge_into_model(MergeModelRequest(str(tiny_checkpoints["sd1"]), (LoraInput(str(SMALL_A)),), str(out),
                                           force=True))
    assert out.read_bytes() == b"previous" and not _leftovers(tmp_path)

    def partial_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors_io, "st_save_file", partial_save)
    with pytest.raises(WriteError, match="out.safetensors: could not be written: no space left on device"):
        resize(ResizeRequest(str(SMALL_A), str(out), RankRule(2), force=True))
    assert out.read_bytes() == b"previous" and not _leftovers(tmp_path)


def test_cancel_and_progress(tiny_checkpoints, tmp_path):
    seen = []
    out = tmp_path / "out.safetensors"
    before = fingerprint(tiny_checkpoints["sd1"])
    with pytest.raises(OperationCancelled, match="nothing was written"):
        merge_into_model(MergeModelRequest(str(tiny_checkpoints["sd1"]), (LoraInput(str(SMALL_A)),), str(out)),
                         progress=lambda done, total, message: seen.append((done, total)),
                         should_stop=lambda: len(seen) >= 5)
    assert not out.exists() and not _leftovers(tmp_path) and fingerprint(tiny_checkpoints["sd1"]) == before
    assert [d for d, _ in seen] == [1, 2, 3, 4, 5] and len({t for _, t in seen}) == 1
    seen.clear()
    resize(ResizeRequest(str(SMALL_A), str(out), RankRule(2)), progress=lambda d, t, m: seen.append((d, t, m)))
    assert seen[-1][0] == seen[-1][1] == 12 and seen[0][2].startswith("lora_")


@pytest.mark.parametrize("make, match", [
    (lambda: RankRule(0), "rank=0"),
    (lambda: RankRule(8, method="sv_fro"), "needs a parameter"),
    (lambda: RankRule(8, method="sv_fro", param=1.5), r"fraction in \(0, 1\]"),
    (lambda: RankRule(8, method="median", param=1), "method='median'"),
    (lambda: MergeLorasRequest((LoraInput(str(SMALL_A)),), "o.safetensors", mode="svd"), "needs a RankRule"),
    (lambda: ExtractRequest("a", "b", "o.safetensors", svd="lowrank", method="sv_cumulative", param=0.5),
     "every singular value"),
    (lambda: ConvertRequest("a", "o.safetensors", to="onnx"), "to='onnx'"),
    (lambda: ResizeRequest("a", "o.safetensors", RankRule(4), dtype="fp8"), "dtype='fp8'"),
    (lambda: LoraInput.parse("a.safetensors:0.5:start=3"), "dyn/start/stop"),
])
def test_bad_requests_name_the_field(make, match):
    with pytest.raises(ConfigError, match=match):
        make()
