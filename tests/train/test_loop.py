"""The training loop end to end on a tiny SD1 model: files and metadata, exact resume, the divergence guard,
stop requests, every trained algorithm, sampling, and clear errors before any step."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

from lib_lora.errors import ConfigError, LibLoraError
from lib_lora.info import describe
from lib_lora.io import addnet_hash, load_file, read_metadata
from lib_lora.networks import load_network
from lib_lora.train.run import train
from lib_lora.train.toml_config import load_config
from lib_lora.types import Arch
from tests.train.fixtures import tiny_model, write_images, write_run


def _setup(tmp_path: Path, n_images: int = 4, **options) -> Path:
    write_images(tmp_path / "train" / "5_sks", n_images)
    return write_run(tmp_path, **options)


def _events(kinds=None):
    seen = []

    def listen(e):
        if kinds is None or e.kind in kinds:
            seen.append(e)

    return seen, listen


def test_training_writes_a_file_every_tool_reads(tmp_path):
    cfg = load_config(_setup(tmp_path, max_train_steps=4, save_every_n_steps=2, output_name="style"))
    events, listen = _events()
    result = train(cfg, model=tiny_model(), listeners=[listen])
    assert result.status == "finished" and result.steps == 4
    assert result.final_file == tmp_path / "out" / "style.safetensors"
    assert (tmp_path / "out" / "style-step00000002.safetensors").is_file()
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("step") == 4
    steps = [e for e in events if e.kind == "step"]
    assert all(e.loss is not None and e.lrs for e in steps) and steps[-1].eta_s == 0

    meta = read_metadata(result.final_file)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_output_name"] == "style"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_steps"] == "4" and meta["ss_network_dim"] == "4"
    assert json.loads(meta["ss_tag_frequency"]) == {"5_sks": {"sks red square": 4}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"5_sks": {"n_repeats": 5, "img_count": 4}}
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["sshs_model_hash"] == addnet_hash(result.final_file)
    info = describe(result.final_file)
    assert info.algorithm == "lora" and info.modules == {"te": 72, "unet": 192} and info.unmatched_keys == []

    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    model = tiny_model()
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0],
                                   unet=model.unet, scheduler=EulerDiscreteScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    before = model.unet.down_blocks[0].attentions[0].proj_in.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(str(result.final_file))
        pipe.fuse_lora()
    after = model.unet.down_blocks[0].attentions[0].proj_in.base_layer.weight
    assert not torch.equal(before, after)


def test_resume_continues_exactly(tmp_path):
    straight_dir, split_dir = tmp_path / "a", tmp_path / "b"
    straight_dir.mkdir()
    split_dir.mkdir()
    straight_events, listen_a = _events({"step"})
    cfg = load_config(_setup(straight_dir, max_train_steps=20, n_images=5))
    straight = train(cfg, model=tiny_model(), listeners=[listen_a])

    first_events, listen_b = _events({"step"})
    stop_at_10 = lambda: bool(first_events) and first_events[-1].step >= 10  # noqa: E731
    cfg = load_config(_setup(split_dir, max_train_steps=20, n_images=5))
    first = train(cfg, model=tiny_model(), listeners=[listen_b], should_stop=stop_at_10)
    assert first.status == "stopped" and first.steps == 10
    state = split_dir / "out" / "tiny-state"
    assert (state / "train_state.json").is_file()
    second_events, listen_c = _events({"step"})
    cfg = load_config(split_dir / "run.toml", overrides=["--resume", str(state)])
    second = train(cfg, model=tiny_model(), listeners=[listen_c])
    assert second.status == "finished" and second.steps == 20

    resumed = first_events + second_events
    assert [e.step for e in resumed] == list(range(1, 21))
    def names(events):
        return [[Path(p).name for p in e.data["batch"]] for e in events]

    assert names(resumed) == names(straight_events)
    assert [e.lrs for e in resumed] == [e.lrs for e in straight_events]
    a = load_file(straight.final_file).tensors
    b = load_file(second.final_file).tensors
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)


def test_divergence_guard_rolls_back_and_keeps_a_usable_file(tmp_path):
    # The random-weight fixture's output passes through normalisations that bound the loss at any lr unless the
    # final conv trains too (LyCORIS preset full); then an absurd lr without clipping blows up within steps.
    cfg = load_config(_setup(tmp_path, max_train_steps=12, learning_rate=1e4, optimizer_type="SGDNesterov",
                             max_grad_norm=0.0, network_module="lycoris.kohya",
                             network_args=["algo=locon", "preset=full", "conv_dim=4"], guard_window=3,
                             guard_patience=1, guard_spike_factor=2.0, guard_max_rollbacks=2,
                             guard_snapshot_every_n_steps=1))
    events, listen = _events({"rollback", "done", "stopped"})
    result = train(cfg, model=tiny_model(), listeners=[listen])
    rollbacks = [e for e in events if e.kind == "rollback"]
    assert rollbacks, "lr 1e4 without clipping must trip the guard"
    assert "rolled back" in rollbacks[0].message and "lowered the lr" in rollbacks[0].message
    assert result.status in ("finished", "diverged")
    assert "divergence guard: rollback 1" in result.report
    net = load_network(result.final_file, arch=Arch.SD1)
    for module in net.modules.values():
        for t in module.file_tensors().values():
            assert torch.isfinite(t.float()).all()


def test_stop_request_saves_the_lora_and_a_state(tmp_path):
    cfg = load_config(_setup(tmp_path, max_train_steps=50))
    events, listen = _events({"step"})
    result = train(cfg, model=tiny_model(), listeners=[listen], should_stop=lambda: len(events) >= 3)
    assert result.status == "stopped" and result.steps == 3
    assert "resume" in result.report
    assert (tmp_path / "out" / "tiny.safetensors").is_file()
    assert json.loads((tmp_path / "out" / "tiny-state" / "train_state.json").read_text())["step"] == 3


NETWORKS = {
    "lora": ({}, "lora"),
    "locon": ({"network_args": ["conv_dim=4", "conv_alpha=2"]}, "locon"),
    "loha": ({"network_module": "lycoris.kohya", "network_args": ["algo=loha", "preset=attn-mlp"]}, "loha"),
    "lokr": ({"network_module": "lycoris.kohya", "network_args": ["algo=lokr", "factor=4"]}, "lokr"),
    # LyCORIS' way to ask for a full second factor (kohya_ss presets): must not allocate rank-100000 pairs
    "lokr_full": ({"network_module": "lycoris.kohya", "network_dim": 100000, "network_alpha": 1,
                   "network_args": ["algo=lokr", "conv_dim=100000", "conv_alpha=1"]}, "lokr"),
    "lokr_decomposed": ({"network_module": "lycoris.kohya", "network_dim": 2,
                         "network_args": ["algo=lokr", "factor=4", "decompose_both=True", "conv_dim=2",
                                          "use_tucker=True"]}, "lokr"),
    "dora": ({"network_module": "lycoris.kohya", "network_args": ["algo=lora", "dora_wd=True"]}, "dora"),
    "ia3": ({"network_module": "lycoris.kohya", "network_args": ["algo=ia3"], "learning_rate": 1e-2}, "ia3"),
    "lora_fa": ({"network_module": "networks.lora_fa"}, "lora"),
    "dylora": ({"network_module": "networks.dylora", "network_args": ["unit=2"]}, "lora"),
    "dropouts": ({"network_dropout": 0.1, "network_args": ["rank_dropout=0.2", "module_dropout=0.1"]}, "lora"),
}


@pytest.mark.parametrize("kind", NETWORKS)
def test_every_network_kind_trains_and_loads(tmp_path, kind):
    options, algo = NETWORKS[kind]
    cfg = load_config(_setup(tmp_path, max_train_steps=2, train_batch_size=1, **options))
    result = train(cfg, model=tiny_model())
    assert result.status == "finished"
    net = load_network(result.final_file)
    assert net.algorithms() == [algo] and net.unmatched_keys == []
    # the configured dim, as sd-scripts writes it (per-module ranks differ for LoHa, IA3, full LoKr factors)
    assert load_file(result.final_file).metadata["ss_network_dim"] == str(options.get("network_dim", 4))
    changed = [m for m in net.modules.values() if m.delta(torch.zeros(m.delta_shape())).abs().sum() > 0] \
        if algo == "lora" else list(net.modules)
    assert changed, "two steps must move the network away from its zero start"


def test_lokr_factor_shapes_follow_lycoris_rules(tmp_path):
    from lib_lora.networks.lokr import LoKrModule

    full = LoKrModule.create("x", torch.Size([64, 32]), 100000, 1.0)  # 64 = 8x8, 32 = 4x8: full w2 [8, 8]
    assert full.lokr_w2.shape == (8, 8) and full.lokr_w2_a is None and full.rank is None and full.scale == 1.0
    low = LoKrModule.create("x", torch.Size([64, 32]), 2, 1.0)
    assert low.lokr_w2_a.shape == (8, 2) and low.lokr_w2_b.shape == (2, 8) and low.scale == 0.5
    both = LoKrModule.create("x", torch.Size([64, 64, 3, 3]), 1, 1.0, decompose_both=True, use_tucker=True)
    assert both.lokr_w1_a.shape == (8, 1) and both.lokr_t2.shape == (1, 1, 3, 3)
    for m, shape in ((full, (64, 32)), (low, (64, 32)), (both, (64, 64, 3, 3))):  # ΔW starts at zero
        assert m.delta(torch.zeros(shape)).abs().max() == 0


def test_unet_only_and_block_lr(tmp_path):
    cfg = load_config(_setup(tmp_path, max_train_steps=2, network_train_unet_only=True,
                             down_lr_weight="0,0,0,0,0,0,0,0,0,0,0,0", up_lr_weight="1,1,1,1,1,1,1,1,1,1,1,1"))
    result = train(cfg, model=tiny_model())
    info = describe(result.final_file)
    assert info.modules == {"unet": 120}  # no TE, no IN blocks: M00 (1 transformer) + OUT03..11 (9) x 12 modules
    assert not any(b.startswith("IN") for b in info.blocks)


def test_samples_during_training(tmp_path):
    (tmp_path / "prompts.txt").write_text("# samples\nsks red square --w 64 --h 64 --d 3 --s 4 --l 5\n"
                                          "a cat --n blurry --w 64 --h 64 --s 3\n", encoding="utf-8")
    cfg = load_config(_setup(tmp_path, max_train_steps=4, sample_every_n_steps=2, sample_prompts="prompts.txt",
                             sample_sampler="k_euler_a", logging_dir="logs", log_prefix="run-"))
    events, listen = _events({"sample"})
    train(cfg, model=tiny_model(), listeners=[listen])
    assert [len(e.paths) for e in events] == [2, 2]
    assert all(Path(p).is_file() for e in events for p in e.paths)
    assert sorted(os.listdir(tmp_path / "out" / "sample"))[0].startswith("tiny_000002_00_3")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = (tmp_path / "logs").iterdir()
    assert run_dir.name.startswith("run-")
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss/current")] == [1, 2, 3, 4]
    assert "samples/00" in acc.Tags()["images"] and "config" in str(acc.Tags())


def _write_bad_image(tmp_path):
    (tmp_path / "train" / "5_sks" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")


BAD = {
    "empty dataset": (lambda p: (p / "train" / "5_sks" / "img0.png").parent, {}, "empty"),
    "corrupt image": (_write_bad_image, {}, "broken.png"),
    "caption encoding": (lambda p: (p / "train" / "5_sks" / "img1.txt").write_bytes(b"caf\xe9 \xff"), {}, "img1.txt"),
    "bucket fits no image": (lambda p: None, {"enable_bucket": True, "min_bucket_reso": 64, "max_bucket_reso": 64,
                                              "resolution": 32}, "bucket"),
    "unknown optimizer": (lambda p: None, {"optimizer_type": "AdamWTurbo"}, "AdamWTurbo"),
    "unknown scheduler": (lambda p: None, {"lr_scheduler": "cosine_forever"}, "cosine_forever"),
    "output not writable": (lambda p: (p / "blocked").write_text("a file"), {"output_dir": "blocked/out"},
                            "output_dir"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_fails_before_any_step(tmp_path, case):
    prepare, options, match = BAD[case]
    if case == "empty dataset":
        (tmp_path / "train" / "5_sks").mkdir(parents=True)
        write_run(tmp_path, **options)
    else:
        _setup(tmp_path, **options)
        prepare(tmp_path)
    events, listen = _events({"step"})
    with pytest.raises(LibLoraError, match=match):
        cfg = load_config(tmp_path / "run.toml")
        train(cfg, model=tiny_model(), listeners=[listen])
    assert events == []
    out = tmp_path / "out"
    assert not out.exists() or not [p for p in out.iterdir() if not p.name.startswith(".")]


def test_resume_from_another_network_shape_is_refused_and_overwrites_nothing(tmp_path):
    cfg = load_config(_setup(tmp_path, max_train_steps=2, save_state=True))
    first = train(cfg, model=tiny_model())
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    cfg = load_config(tmp_path / "run.toml", overrides=["--network_dim", "8", "--resume",
                                                        str(tmp_path / "out" / "tiny-state")])
    with pytest.raises(ConfigError, match="another network shape"):
        train(cfg, model=tiny_model())
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == before
    assert first.final_file.is_file()


def test_repeated_captions_share_one_encoding_only_without_text_encoder_dropout(tmp_path):
    from lib_lora.train import session
    from lib_lora.train.families import family_for
    from lib_lora.train.run import model_facts

    model = tiny_model()
    family = family_for(model)
    try:
        def deterministic(**options) -> bool:
            cfg = load_config(_setup(tmp_path, **options))
            return session.prepare(cfg, family, model_facts(model)).text_encoder_is_deterministic

        assert deterministic()
        assert not deterministic(network_dropout=0.1)
        assert not deterministic(network_args=["module_dropout=0.1"])
        assert deterministic(network_dropout=0.1, network_train_unet_only=True)
    finally:
        family.close()


def test_batched_deltas_train_the_same_network_as_module_by_module(tmp_path, monkeypatch):
    """The loop computes the ΔW of same-shaped small modules in one batched product per pass: the trained file is
    the one the module-by-module path gives (weight decay on, clip skip 2 so the last text-encoder layer's modules
    get no gradient and must stay untouched, gradient accumulation over two micro-batches).

    SGD, not Adam: the two paths round gradients differently in the last bits, and Adam's normalised step turns a
    rounding-sized difference in a near-zero gradient into a difference of up to 2·lr; SGD keeps it rounding-sized,
    so the comparison can be tight on any CPU."""
    from lib_lora.networks import lora
    from lib_lora.train import network

    options = dict(network_dim=16, network_alpha=8, max_train_steps=3, clip_skip=2, gradient_accumulation_steps=2,
                   optimizer_type="SGDNesterov", learning_rate=0.5, optimizer_args=["weight_decay=0.1"],
                   divergence_guard=False)
    used = []
    shared = lora.shared_deltas

    def spy(groups):
        used.append(sum(len(g.members) for g in groups))
        return shared(groups)

    monkeypatch.setattr(network, "shared_deltas", spy)
    batched = train(load_config(_setup(tmp_path / "shared", **options)), model=tiny_model()).final_file
    assert len(used) == 6 and used[0] > 200  # every micro-batch, nearly all 264 modules
    monkeypatch.setattr(network, "SHARED_DELTA_MAX_ELEMENTS", 0)
    alone = train(load_config(_setup(tmp_path / "single", **options)), model=tiny_model()).final_file
    got, expected = load_file(batched).tensors, load_file(alone).tensors
    assert got.keys() == expected.keys()
    moved = 0
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)
        if "layers_11_" in key:  # no gradient, no optimizer step, in both
            assert torch.equal(got[key], expected[key]), key
        elif key.endswith("lora_up.weight"):  # zero at the start: the steps moved it well past the tolerance
            moved += int(expected[key].abs().max() > 1e-4)
    assert moved > len(expected) // 6, moved  # of the ~260 modules (3 tensors each), most moved


@pytest.mark.parametrize("kind", ["locon", "loha", "lokr"])
def test_scale_weight_norms_bounds_every_factorised_module(tmp_path, kind):
    """Each module's ||ΔW|| stays at or under the bound after every step, whatever the factorisation."""
    from lib_lora.sd.lora_generate import model_targets

    options, _ = NETWORKS[kind]
    bound = 1e-3
    cfg = load_config(_setup(tmp_path, max_train_steps=2, train_batch_size=1, learning_rate=1e-2,
                             scale_weight_norms=bound, **options))
    seen = []
    model = tiny_model()
    result = train(cfg, model=model, listeners=[lambda e: seen.append(e) if e.kind == "step" else None])
    targets = model_targets(model)
    norms = [float(m.delta(torch.zeros(targets[name].shape)).norm()) for name, m in load_network(
        result.final_file).modules.items()]
    assert max(norms) <= bound * 1.001, max(norms)
    assert all(e.data["max_norm"]["max_key_norm"] <= bound * 1.001 for e in seen)
    assert seen[-1].data["max_norm"]["keys_scaled"] > 0


def test_lycoris_trains_kxk_convs_at_network_dim_without_conv_dim(tmp_path):
    # LyCORIS' kohya front end: conv_dim and conv_alpha default to network_dim and network_alpha
    cfg = load_config(_setup(tmp_path, max_train_steps=1, train_batch_size=1, network_module="lycoris.kohya",
                             network_dim=4, network_alpha=2, network_args=["algo=locon", "preset=full"]))
    tensors = load_file(train(cfg, model=tiny_model()).final_file).tensors
    kxk = [k for k, v in tensors.items() if k.endswith("lora_down.weight") and v.dim() == 4 and v.shape[-1] == 3]
    assert kxk and all(tensors[k].shape[0] == 4 for k in kxk)
    assert all(float(tensors[k.replace("lora_down.weight", "alpha")]) == 2.0 for k in kxk)


def test_disk_full_while_saving_is_one_clear_error_and_loses_nothing(tmp_path, monkeypatch):
    from lib_lora.errors import WriteError
    from lib_lora.io import safetensors_io

    real, calls = safetensors_io.st_save_file, []

    def fill_the_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 1:
            return real(tensors, path, metadata=metadata)
        with open(path, "wb") as f:  # what a full disk leaves: a partial file, then the error
            f.write(b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors_io, "st_save_file", fill_the_disk)
    cfg = load_config(_setup(tmp_path, max_train_steps=6, save_every_n_steps=2, train_batch_size=1))
    with pytest.raises(WriteError) as err:
        train(cfg, model=tiny_model())
    message = str(err.value)
    assert "no space left on device" in message and "tiny-step00000004.safetensors" in message
    assert "the last file written is" in message and "tiny-step00000002.safetensors" in message
    assert "\n" not in message
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["tiny-step00000002.safetensors"]  # no temporaries left
    assert load_file(out / "tiny-step00000002.safetensors").metadata["ss_steps"] == "2"


def test_a_killed_save_leaves_temporaries_the_next_run_removes(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = out / ".tiny.safetensors.99999999-x1y2.tmp"  # no such process: its writer is gone
    dead.write_bytes(b"partial")
    old_dir = out / ".tiny-state.99999999-abcd.tmp"
    old_dir.mkdir()
    cfg = load_config(_setup(tmp_path, max_train_steps=1, train_batch_size=1))
    events, listen = _events({"warning"})
    train(cfg, model=tiny_model(), listeners=[listen])
    assert not dead.exists() and not old_dir.exists()
    assert any("interrupted save" in e.message for e in events)


def test_a_refused_run_leaves_no_folder(tmp_path):
    cfg = load_config(_setup(tmp_path, output_dir="new/out", logging_dir="new/logs"))
    (tmp_path / "train" / "5_sks" / "img0.png").write_bytes(b"not an image")
    with pytest.raises(LibLoraError):
        train(cfg, model=tiny_model())
    assert not (tmp_path / "new").exists()


def test_a_run_without_seed_resumes_by_its_own_instruction(tmp_path):
    cfg = load_config(_setup(tmp_path, max_train_steps=4, train_batch_size=1, seed=None))
    assert cfg.run.seed is None
    events, listen = _events({"step"})
    first = train(cfg, model=tiny_model(), listeners=[listen], should_stop=lambda: len(events) >= 2)
    assert first.status == "stopped"
    state = first.report.split("resume = '")[1].split("'")[0]  # the instruction the run printed
    second = train(load_config(tmp_path / "run.toml", overrides=["--resume", state]), model=tiny_model())
    assert second.status == "finished" and second.steps == 4
    seeds = {load_file(f).metadata["ss_seed"] for f in (first.final_file, second.final_file)}
    assert len(seeds) == 1


def _vae_spy(model, used: list):
    return lambda event: used.append(model.vae)


def test_vae_option_trains_with_another_vae_and_gives_the_model_back(tmp_path):
    from lib_lora.errors import FileFormatError
    from lib_lora.io import save_file
    from lib_lora.sd.checkpoint_save import save_checkpoint

    other = tiny_model(seed=5)  # another VAE of the same shape
    save_checkpoint(other, tmp_path / "other.safetensors", dtype=torch.float32, write_yaml=False)  # LDM spelling
    save_file(other.vae.state_dict(), tmp_path / "vae_diffusers.safetensors")  # diffusers spelling
    for name, vae in (("own", None), ("ldm", "other.safetensors"), ("diffusers", "vae_diffusers.safetensors")):
        model = tiny_model()
        before = model.vae
        used = []
        events, listen = _events({"step"})
        cfg = load_config(_setup(tmp_path / name, max_train_steps=1, train_batch_size=1,
                                 vae=str(tmp_path / vae) if vae else None))
        assert train(cfg, model=model, listeners=[listen, _vae_spy(model, used)]).status == "finished"
        assert model.vae is before
        expected = before if vae is None else other.vae
        # the VAE the run encoded with holds the file's weights, whichever spelling the file uses
        got = {k: v.reshape(-1) for k, v in used[0].state_dict().items()}
        want = {k: v.reshape(-1) for k, v in expected.state_dict().items()}
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    lora = next((tmp_path / "own" / "out").glob("*.safetensors"))
    with pytest.raises(FileFormatError, match="not a VAE"):
        train(load_config(_setup(tmp_path / "bad", max_train_steps=1, vae=str(lora))), model=tiny_model())
