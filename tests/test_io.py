"""io: validated loads with clear errors, refusal of unsafe pickles, atomic saves, hashes."""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import torch

from lib_lora.errors import FileFormatError
from lib_lora.io import addnet_hash, load_file, load_state_dict, precalculate_hashes, read_metadata, save_file
from lib_lora.networks import load_network
from tests.conftest import ROOT


def _sample(tmp_path, name="a.safetensors"):
    path = tmp_path / name
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 4), "lora_unet_x.lora_up.weight": torch.ones(4, 2)},
              path, {"ss_output_name": "a"})
    return path


def test_round_trip_and_metadata(tmp_path):
    path = _sample(tmp_path)
    f = load_file(path)
    assert set(f.tensors) == {"lora_unet_x.lora_down.weight", "lora_unet_x.lora_up.weight"}
    assert read_metadata(path) == {"ss_output_name": "a"}
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    with pytest.raises(TypeError, match="ss_epoch"):
        save_file({"x": torch.ones(1)}, tmp_path / "b.safetensors", {"ss_epoch": 3})


def test_truncated_and_corrupt_files_name_the_file(tmp_path):
    path = _sample(tmp_path)
    data = path.read_bytes()
    trunc = tmp_path / "truncated.safetensors"
    trunc.write_bytes(data[:-5])
    with pytest.raises(FileFormatError, match=r"truncated.safetensors.*(truncated|corrupt)"):
        load_network(trunc)
    short = tmp_path / "short.safetensors"
    short.write_bytes(data[:5])
    with pytest.raises(FileFormatError, match="short.safetensors.*too short"):
        load_file(short)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(data[:8] + b"\xff" * (len(data) - 8))
    with pytest.raises(FileFormatError, match="corrupt.safetensors"):
        load_file(corrupt)
    with pytest.raises(FileFormatError, match="file not found"):
        load_file(tmp_path / "missing.safetensors")


def test_other_formats_renamed_are_recognised(tmp_path):
    zipped = tmp_path / "renamed.safetensors"
    torch.save({"w": torch.ones(2)}, zipped)  # a torch zip checkpoint given a safetensors name
    with pytest.raises(FileFormatError, match="renamed.safetensors.*zip"):
        load_network(zipped)
    pickled = tmp_path / "pickled.safetensors"
    pickled.write_bytes(pickle.dumps({"w": [1, 2, 3]}, protocol=4))
    with pytest.raises(FileFormatError, match="pickle"):
        load_file(pickled)
    png = tmp_path / "image.safetensors"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(FileFormatError, match="PNG"):
        load_file(png)
    assert zipfile.is_zipfile(zipped)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickles_are_never_unpickled_unsafely(tmp_path):
    ok = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"lora_unet_x.lora_down.weight": torch.ones(2, 4),
                               "lora_unet_x.lora_up.weight": torch.ones(4, 2)}}, ok)
    assert set(load_state_dict(ok).tensors) == {"lora_unet_x.lora_down.weight", "lora_unet_x.lora_up.weight"}
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "x": _Evil()}, evil)
    with pytest.raises(FileFormatError, match=r"evil.pt.*refusing to unpickle.*safetensors"):
        load_state_dict(evil)


def test_hash_ignores_metadata(tmp_path):
    tensors = {"a": torch.arange(10.0), "b": torch.ones(3, dtype=torch.float16)}
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    save_file(tensors, one, {"ss_output_name": "x"})
    save_file(tensors, two, {"ss_output_name": "x", "modelspec.title": "another title"})
    assert addnet_hash(one) == addnet_hash(two) == precalculate_hashes(tensors, {"ss_output_name": "x"})[0]


WRITER = """
import sys, torch
sys.path.insert(0, {root!r})
from lib_lora.io import save_file
big = {{"w": torch.randn(4_000_000)}}
i = 0
while True:
    i += 1
    save_file(big | {{"step": torch.tensor(i)}}, {path!r}, {{"ss_steps": str(i)}})
"""


def test_kill_during_save_leaves_previous_file_intact(tmp_path):
    path = tmp_path / "net.safetensors"
    save_file({"w": torch.zeros(4), "step": torch.tensor(0)}, path, {"ss_steps": "0"})
    for delay in (0.3, 0.7, 1.1):
        proc = subprocess.Popen([sys.executable, "-c", WRITER.format(root=str(ROOT), path=str(path))])
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        f = load_file(path)  # whatever was there last is complete and readable
        assert f.metadata["ss_steps"] == str(int(f.tensors["step"]))
    for leftover in tmp_path.glob(".net.safetensors.*.tmp"):
        leftover.unlink()  # a killed writer can leave its temporary file; never the target


def test_pickled_checkpoints_are_read_safely(tmp_path):
    import os

    from lib_lora.io import load_state_dict

    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, good)
    assert torch.equal(load_state_dict(good).tensors["w"], torch.ones(2))

    marker = tmp_path / "ran"

    class Payload:  # what a malicious checkpoint carries: a call made while unpickling
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "x": Payload()}, evil)
    with pytest.raises(FileFormatError, match="arbitrary code"):
        load_state_dict(evil)
    assert not marker.exists()

    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(bytes(range(7, 250)) * 40)
    with pytest.raises(FileFormatError, match="not a PyTorch checkpoint"):
        load_state_dict(noise)
    truncated = tmp_path / "cut.ckpt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(FileFormatError, match="damaged or truncated"):
        load_state_dict(truncated)
    renamed = tmp_path / "renamed.ckpt"
    save_file({"w": torch.zeros(3)}, renamed)
    assert torch.equal(load_state_dict(renamed).tensors["w"], torch.zeros(3))
