"""Parking: with cached latents / text-encoder outputs the VAE and text encoders wait on the CPU between steps and
come back for sample images, validation and the end of the run.

This machine has no GPU, so the move itself (`module.to`) is not what is checked here: the run's orchestration is,
with a Parking that records instead of moving, and the VAE / text encoders watched: they must never run while parked.
"""
from __future__ import annotations

import torch
from torch import nn

from lib_lora.train import loop
from lib_lora.train.parking import CPU, Parking
from lib_lora.train.run import train
from lib_lora.train.toml_config import load_config
from tests.train.fixtures import tiny_model, write_images, write_run


def test_nothing_is_parked_on_the_cpu_or_when_the_family_forbids_it():
    groups = {"vae": [nn.Linear(2, 2)], "text": [nn.Linear(2, 2)]}
    on_cpu = Parking(groups, torch.device("cpu"))
    assert on_cpu.groups == {} and on_cpu.describe() == ""
    on_cpu.park()
    assert not on_cpu.parked
    forbidden = Parking(groups, torch.device("cuda", 0), allowed=False)
    assert forbidden.groups == {} and forbidden.describe() == ""
    # modules that are not on the run's device (a host keeps them elsewhere) are left where they are
    elsewhere = Parking(groups, torch.device("cuda", 0))
    assert elsewhere.groups == {}


class RecordingParking(Parking):
    """Parks every module of its groups (the device check is for real accelerators) and records instead of moving."""

    def __init__(self, groups, device, *, allowed=True):
        super().__init__({}, device, allowed=allowed)
        self.groups = {name: modules for name, modules in groups.items() if modules}
        self.moves: list[str] = []

    def _move(self, device):
        assert device == (self.device if self.parked else CPU)
        self.moves.append("unpark" if self.parked else "park")


def test_cached_runs_keep_the_vae_and_text_encoder_off_the_device_between_steps(tmp_path, monkeypatch):
    made = []

    def recording(family, caches_latents, caches_text):
        groups = {"vae": family.parts("vae") if caches_latents else [],
                  "text": family.parts("text") if caches_text else []}
        made.append(RecordingParking(groups, family.device))
        return made[-1]

    monkeypatch.setattr(loop, "parking_for", recording)
    model = tiny_model()
    used = []  # (what ran, parked at that moment)

    def watch(module, name):
        module.register_forward_pre_hook(lambda *_: used.append((name, made[-1].parked if made else False)))

    watch(model.vae.encoder, "vae")
    watch(model.vae.decoder, "vae")
    for te in model.text_encoders:
        watch(te, "text")
    (tmp_path / "prompts.txt").write_text("sks red square --w 64 --h 64 --s 2\n", encoding="utf-8")
    write_images(tmp_path / "train" / "5_sks", 4)
    cfg = load_config(write_run(tmp_path, max_train_steps=4, cache_latents=True, cache_text_encoder_outputs=True,
                                network_train_unet_only=True, sample_every_n_steps=2, sample_prompts="prompts.txt",
                                validation_split=0.25, validate_every_n_steps=3))
    events = []
    result = train(cfg, model=model, listeners=[events.append])
    assert result.status == "finished"
    (parking,) = made
    assert set(parking.groups) == {"vae", "text"}
    # parked before the first step; back for each sample (steps 2, 4) and the validation pass (step 3); back at the end
    assert parking.moves == ["park", "unpark", "park", "unpark", "park", "unpark", "park", "unpark"]
    assert not parking.parked
    kinds = [e.kind for e in events]
    assert kinds.count("sample") == 2 and kinds.count("validation") == 1
    # the caches were built before parking (the VAE and encoders ran then), the samples and validation ran them
    # unparked, and no training step needed them while parked
    assert any(name == "vae" for name, _ in used) and any(name == "text" for name, _ in used)
    assert not [u for u in used if u[1]], "a parked module ran"
    start = next(e for e in events if e.kind == "start")
    assert any("wait on the CPU between steps" in n for n in start.data["notes"])


def test_uncached_runs_park_nothing(tmp_path, monkeypatch):
    seen = []
    original = loop.parking_for

    def spy(family, caches_latents, caches_text):
        seen.append((caches_latents, caches_text))
        return original(family, caches_latents, caches_text)

    monkeypatch.setattr(loop, "parking_for", spy)
    write_images(tmp_path / "train" / "5_sks", 2)
    assert train(load_config(write_run(tmp_path, max_train_steps=1)), model=tiny_model()).status == "finished"
    assert seen == [(False, False)]
