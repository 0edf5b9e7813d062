"""Data pipeline: folders, captions, buckets, images, epoch order and resume, caches, sd-scripts summaries."""
from __future__ import annotations

import json
import os
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lib_lora.errors import ConfigError
from lib_lora.train.data.buckets import BucketPlanner, make_bucket_resolutions
from lib_lora.train.data.cache import LatentCache, TextEncoderCache
from lib_lora.train.data.captions import process_caption, split_caption, tag_frequency
from lib_lora.train.data.config import DatasetConfig, DatasetOptions, SubsetConfig, SubsetOptions
from lib_lora.train.data.dataset import balance_reg_repeats, build_dataset
from lib_lora.train.data.images import crop_ltrb, probe_image
from lib_lora.train.data.records import DatasetError, SamplerState
from lib_lora.train.data.sampler import EpochSampler, epoch_plan
from lib_lora.train.data.summary import dataset_metadata, tag_frequencies
from lib_lora.train.toml_config import load_config


def _image(path: Path, size=(64, 64), seed: int = 0, mode: str = "RGB", caption: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = 4 if mode == "RGBA" else 3
    pixels = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels, mode).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def _subset(folder: Path, **kw) -> SubsetConfig:
    return SubsetConfig(image_dir=folder, caption_extension=kw.pop("caption_extension", ".txt"), **kw)


def _dataset(*subsets: SubsetConfig, **kw) -> DatasetConfig:
    return DatasetConfig(subsets=subsets, resolution=kw.pop("resolution", (64, 64)), **kw)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    for i in range(4):
        _image(tmp_path / "imgs" / f"a{i}.png", seed=i, caption=f"sks, red, tag{i}, white background")
    return tmp_path / "imgs"


# ---------------------------------------------------------------------------------------------------- captions


def test_caption_shuffle_keep_tokens_dropout_are_seeded():
    opts = SubsetOptions(shuffle_caption=True, keep_tokens=1)
    caption = "sks, a, b, c, d, e, f"
    outs = [process_caption(caption, opts, random.Random(s)) for s in range(20)]
    assert all(o.startswith("sks, ") for o in outs) and len(set(outs)) > 5
    assert all(sorted(o.split(", ")) == sorted(caption.split(", ")) for o in outs)
    assert outs == [process_caption(caption, opts, random.Random(s)) for s in range(20)]  # same seed, same caption
    assert process_caption(caption, SubsetOptions(caption_dropout_rate=1.0), random.Random(0)) == ""
    every = SubsetOptions(caption_dropout_every_n_epochs=3)
    assert [process_caption("x", every, random.Random(0), epoch=e) for e in (1, 2, 3, 6)] == ["x", "x", "", ""]
    tag_drop = SubsetOptions(caption_tag_dropout_rate=0.5, keep_tokens=1)
    dropped = [process_caption(caption, tag_drop, random.Random(s)) for s in range(20)]
    assert all(d.startswith("sks") for d in dropped) and min(len(d.split(", ")) for d in dropped) < 7
    assert dropped == [process_caption(caption, tag_drop, random.Random(s)) for s in range(20)]
    pre = SubsetOptions(caption_prefix="masterpiece", caption_suffix="end")
    assert process_caption("sks, red", pre, random.Random(0)) == "masterpiece sks, red end"


def test_keep_tokens_separator():
    parts = split_caption("sks, a dog ||| red, blue ||| best", keep_tokens_separator="|||")
    assert (parts.fixed, parts.flex, parts.fixed_suffix) == (["sks", "a dog"], ["red", "blue"], ["best"])
    opts = SubsetOptions(shuffle_caption=True, keep_tokens_separator="|||")
    outs = {process_caption("sks, a dog ||| r, g, b, c ||| best", opts, random.Random(s)) for s in range(10)}
    assert all(o.startswith("sks, a dog, ") and o.endswith(", best") for o in outs) and len(outs) > 1


def test_tag_frequency_shape():
    assert tag_frequency(["sks, Red , red", "sks"]) == {"sks": 2, "red": 2}


# ---------------------------------------------------------------------------------------------------- buckets


def test_bucket_resolutions_match_sd_scripts():
    resos = make_bucket_resolutions((512, 512), 256, 1024, 64)
    assert (512, 512) in resos and (256, 1024) in resos and (1024, 256) in resos and (640, 384) in resos
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in resos)
    assert resos == sorted(resos) and len(resos) == len(set(resos))


def test_bucket_assignment_report_and_no_upscale(tmp_path):
    _image(tmp_path / "d" / "wide.png", (300, 100), caption="a")
    _image(tmp_path / "d" / "tall.png", (100, 300), caption="b")
    _image(tmp_path / "d" / "square.png", (200, 200), caption="c")
    sub = _subset(tmp_path / "d", num_repeats=2)
    ds = build_dataset([_dataset(sub, resolution=(128, 128), enable_bucket=True, min_bucket_reso=64,
                                 max_bucket_reso=256)])
    by_name = {it.path.name: it.placement for it in ds.items}
    # buckets of area <= 128*128 in steps of 64: 64x192, 64x256, 128x128, 192x64, 256x64
    assert by_name["wide.png"].bucket_reso == (192, 64) and by_name["tall.png"].bucket_reso == (64, 192)
    assert by_name["square.png"].bucket_reso == (128, 128) and by_name["square.png"].resized_size == (128, 128)
    assert by_name["wide.png"].resized_size == (192, 64)
    info = ds.groups[0].buckets.to_ss_dict()
    assert info == {"buckets": {"0": {"resolution": [64, 192], "count": 2},
                                "1": {"resolution": [128, 128], "count": 2},
                                "2": {"resolution": [192, 64], "count": 2}}, "mean_img_ar_error": 0.0}
    _image(tmp_path / "d" / "odd.png", (250, 100), caption="d")  # aspect 2.5 -> 192x64 (3.0), error 0.5
    ds = build_dataset([_dataset(sub, resolution=(128, 128), enable_bucket=True, min_bucket_reso=64,
                                 max_bucket_reso=256)])
    odd = next(it.placement for it in ds.items if it.path.name == "odd.png")
    assert odd.bucket_reso == (192, 64) and odd.resized_size == (192, 77) and odd.ar_error == pytest.approx(0.5)
    assert ds.groups[0].buckets.mean_img_ar_error == pytest.approx(0.5 / 4)
    no_up = BucketPlanner(DatasetOptions(resolution=(128, 128), enable_bucket=True, bucket_no_upscale=True,
                                         bucket_reso_steps=32))
    small = no_up.place((100, 70))
    assert small.bucket_reso == (96, 64) and small.resized_size == (100, 70)  # never enlarged
    big = no_up.place((400, 200))
    assert big.resized_size[0] * big.resized_size[1] <= 128 * 128 * 1.05 and big.bucket_reso[0] % 32 == 0
    assert abs(big.bucket_reso[0] / big.bucket_reso[1] - 2.0) < 0.3


def test_bucket_settings_that_fit_no_image(tmp_path):
    with pytest.raises(ConfigError, match="no bucket fits") as err:
        BucketPlanner(DatasetOptions(resolution=(32, 32), enable_bucket=True, min_bucket_reso=64,
                                     max_bucket_reso=64, bucket_reso_steps=64))
    assert err.value.field == "bucket_reso_steps"
    for i in range(2):
        _image(tmp_path / "small" / f"s{i}.png", (40, 40), caption="x")
    sub = _subset(tmp_path / "small")
    with pytest.raises(DatasetError, match="fit no bucket") as err:
        build_dataset([_dataset(sub, resolution=(128, 128), enable_bucket=True, bucket_no_upscale=True)])
    assert sorted(Path(p.path).name for p in err.value.problems) == ["s0.png", "s1.png"]
    assert "shorter than bucket_reso_steps" in str(err.value) and "bucket_no_upscale off" in str(err.value)


# ---------------------------------------------------------------------------------------------------- bad input


def test_every_bad_file_is_reported_before_training(folder):
    (folder / "broken.png").write_bytes(b"not an image at all")
    good = (folder / "a0.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    buf = _image(folder / "trunc.jpg").read_bytes()
    (folder / "trunc.jpg").write_bytes(buf[: len(buf) // 2])
    (folder / "a1.txt").write_bytes("sks, caf\xe9".encode("latin-1"))
    with pytest.raises(DatasetError) as err:
        build_dataset([_dataset(_subset(folder))])
    found = {Path(p.path).name: p.reason for p in err.value.problems}
    assert set(found) == {"broken.png", "truncated.png", "trunc.jpg", "a1.txt"}
    assert "not valid UTF-8" in found["a1.txt"] and "offset" in found["a1.txt"]
    assert "nothing was trained" in str(err.value)


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "10_empty").mkdir()
    with pytest.raises(DatasetError, match="empty") as err:
        build_dataset([_dataset(_subset(tmp_path / "10_empty"))])
    assert err.value.problems[0].path.endswith("10_empty")
    with pytest.raises(DatasetError, match="image folder not found"):
        build_dataset([_dataset(_subset(tmp_path / "missing"))])


def test_captions_bom_missing_and_wrong_extension(tmp_path):
    _image(tmp_path / "10_sks dog" / "a.png")
    (tmp_path / "10_sks dog" / "a.txt").write_bytes("\ufeffsks, bom caption\n".encode())
    _image(tmp_path / "10_sks dog" / "b.png")
    _image(tmp_path / "10_sks dog" / "c.png")
    (tmp_path / "10_sks dog" / "c.caption").write_text("other ext", encoding="utf-8")
    cfg = load_config(None, overrides=["--train_data_dir", str(tmp_path), "--caption_extension", ".txt",
                                       "--resolution", "64"])
    ds = build_dataset(cfg.data)
    captions = {it.path.name: (it.caption, it.caption_missing) for it in ds.items}
    assert captions == {"a.png": ("sks, bom caption", False), "b.png": ("sks dog", True),
                        "c.png": ("sks dog", True)}  # missing caption -> the folder's class tokens
    (warning,) = ds.warnings
    assert "2 of 3 images have no '.txt' caption" in warning and "c.caption" in warning


def test_exif_orientation_alpha_mask_and_tensor_range(tmp_path):
    img = Image.fromarray(np.zeros((40, 80, 3), dtype=np.uint8))  # 80 wide, 40 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: shown 40 wide, 80 high
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert probe_image(tmp_path / "rot.jpg") == (40, 80)
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[:, :32, 3] = 255
    (tmp_path / "m").mkdir()
    Image.fromarray(rgba, "RGBA").save(tmp_path / "m" / "mask.png")
    (tmp_path / "m" / "mask.txt").write_text("x")
    ds = build_dataset([_dataset(_subset(tmp_path / "m", alpha_mask=True))])
    batch = ds.load_batch(epoch_plan(ds, 0, 1)[0], seed=0)
    assert batch.images.shape == (1, 3, 64, 64) and batch.images.dtype == torch.float32
    assert batch.images.min() >= -1.0 and batch.images.max() <= 1.0
    assert batch.alpha_masks.shape == (1, 64, 64)
    assert batch.alpha_masks[0, :, :32].min() == 1.0 and batch.alpha_masks[0, :, 32:].max() == 0.0


def test_resize_crop_without_buckets_and_sdxl_sizes(tmp_path):
    _image(tmp_path / "d" / "wide.png", (128, 64), caption="x")
    ds = build_dataset([_dataset(_subset(tmp_path / "d", flip_aug=True), resolution=(64, 64))])
    assert ds.items[0].placement.resized_size == (128, 64) and ds.items[0].placement.bucket_reso == (64, 64)
    plans = [p for e in range(1, 6) for p in epoch_plan(ds, 3, e)]
    batches = [ds.load_batch(p, 3) for p in plans]
    flips = [b.flipped[0] for b in batches]
    assert True in flips and False in flips
    for b in batches:
        assert b.original_sizes_hw.tolist() == [[64, 128]] and b.target_sizes_hw.tolist() == [[64, 64]]
    ltrb = crop_ltrb((64, 64), (128, 64))  # sd-scripts' convention: image fitted in the bucket
    assert ltrb == (0, 16, 64, 48)
    flipped = next(b for b in batches if b.flipped[0])
    plain = next(b for b in batches if not b.flipped[0])
    assert torch.equal(flipped.images[0], plain.images[0].flip(-1))


def test_color_aug_and_random_crop_are_seeded(tmp_path):
    _image(tmp_path / "d" / "a.png", (96, 64), caption="x")
    ds = build_dataset([_dataset(_subset(tmp_path / "d", color_aug=True, random_crop=True), resolution=(64, 64))])
    plans = epoch_plan(ds, 0, 1)
    outs = [ds.load_batch(replace(plans[0], index=i), 0) for i in range(12)]
    distinct = {tuple(o.images.flatten()[:50].tolist()) for o in outs}
    assert len(distinct) > 3  # crops and colours vary with the batch index
    again = ds.load_batch(plans[0], 0)
    assert torch.equal(again.images, ds.load_batch(plans[0], 0).images)


# ---------------------------------------------------------------------------------------------------- order


def test_epoch_order_is_deterministic_and_bucketed(tmp_path):
    for i in range(3):
        _image(tmp_path / "d" / f"w{i}.png", (128, 64), seed=i, caption="w")
        _image(tmp_path / "d" / f"t{i}.png", (64, 128), seed=10 + i, caption="t")
    ds = build_dataset([_dataset(_subset(tmp_path / "d", num_repeats=3), resolution=(64, 64), enable_bucket=True,
                                 min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32, batch_size=2)])
    a, b = epoch_plan(ds, 7, 1), epoch_plan(ds, 7, 1)
    assert a == b and a != epoch_plan(ds, 7, 2) and a != epoch_plan(ds, 8, 1)
    assert sum(len(p.items) for p in a) == 6 * 3  # repeats expanded
    for plan in a:  # a batch never mixes buckets
        assert {ds.items[i].placement.bucket_reso for i in plan.items} == {plan.bucket_reso}
    assert len(a) == ds.num_batches_per_epoch == 10  # 9 per bucket -> 5 batches of 2 (last one partial)


def test_sampler_resumes_mid_epoch_with_the_same_order(folder):
    ds = build_dataset([_dataset(_subset(folder, num_repeats=3, shuffle_caption=True, flip_aug=True),
                                 batch_size=2)])
    straight = EpochSampler(ds, seed=5)
    full = [p for _ in range(3) for p in straight.epoch_batches()]  # 3 epochs of 6 batches
    first = EpochSampler(ds, seed=5)
    taken = []
    for plan in first.epoch_batches():
        taken.append(plan)
        if len(taken) == 4:
            break
    saved = json.loads(first.state().to_json())
    resumed = EpochSampler(ds, seed=5, state=SamplerState.from_dict(saved))
    rest = [p for _ in range(3) for p in resumed.epoch_batches()][: len(full) - 4]
    assert taken + rest == full
    a, b = ds.load_batch(full[5], 5), ds.load_batch(rest[1], 5)  # same batch -> same pixels and captions
    assert a.captions == b.captions and torch.equal(a.images, b.images)
    changed = build_dataset([_dataset(_subset(folder, num_repeats=2), batch_size=2)])
    with pytest.raises(ConfigError, match="another dataset"):
        EpochSampler(changed, seed=5, state=SamplerState.from_dict(saved))
    shards = [EpochSampler(ds, seed=5, rank=r, world_size=4).batches(1) for r in range(4)]
    assert len({len(s) for s in shards}) == 1 and {p.index for s in shards for p in s} == set(range(6))


def test_regularisation_balancing_and_loss_weights(tmp_path):
    assert balance_reg_repeats(20, [1, 1, 1]) == [7, 7, 6]
    assert balance_reg_repeats(2, [5, 5]) == [5, 0]  # sd-scripts cuts the list when reg is larger
    for i in range(2):
        _image(tmp_path / "train" / f"t{i}.png", seed=i, caption="sks")
    for i in range(3):
        _image(tmp_path / "reg" / f"r{i}.png", seed=9 + i, caption="dog")
    ds = build_dataset([_dataset(_subset(tmp_path / "train", num_repeats=10),
                                 _subset(tmp_path / "reg", num_repeats=1, is_reg=True))], prior_loss_weight=0.5)
    assert ds.num_train_images == 20 and ds.num_reg_images == 3
    assert sorted(ds.groups[0].repeats) == [6, 7, 7, 10, 10]
    plans = epoch_plan(ds, 0, 1)
    weights = torch.cat([ds.load_batch(p, 0).loss_weights for p in plans])
    assert weights.tolist().count(0.5) == 20 and weights.tolist().count(1.0) == 20


def test_validation_split_holds_images_out(tmp_path):
    for i in range(10):
        _image(tmp_path / "d" / f"i{i}.png", seed=i, caption="x")
    ds_cfg = _dataset(_subset(tmp_path / "d", flip_aug=True, shuffle_caption=True), validation_split=0.2,
                      validation_seed=1)
    train, val = build_dataset([ds_cfg], split="train"), build_dataset([ds_cfg], split="validation")
    names = lambda d: {it.path.name for it in d.items}  # noqa: E731
    assert len(names(train)) == 8 and len(names(val)) == 2 and not names(train) & names(val)
    assert val.evaluation and not any(val.load_batch(p, 0).flipped[0] for p in epoch_plan(val, 0, 1))
    assert [p.items for p in epoch_plan(val, 0, 1)] == [p.items for p in epoch_plan(val, 9, 4)]  # fixed order


# ---------------------------------------------------------------------------------------------------- caches


class FakeVAE:
    """8x average pool to 4 channels, counting the images it encodes."""

    def __init__(self):
        self.images = 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.images += pixels.shape[0]
        pooled = torch.nn.functional.avg_pool2d(pixels, 8)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], 1)


def test_latent_cache_reuse_and_invalidation(folder, tmp_path):
    sub = _subset(folder, flip_aug=True)
    ds = build_dataset([_dataset(sub)])
    vae = FakeVAE()
    stats = LatentCache(vae, "vae-a", to_disk=True, batch_size=3).build(ds)
    assert (stats.encoded, stats.reused) == (4, 0) and vae.images == 8  # flipped twins encoded too
    assert len(list(folder.glob("*.latents.safetensors"))) == 4
    batch = ds.load_batch(epoch_plan(ds, 0, 1)[0], 0)
    assert batch.images is None and batch.latents.shape == (1, 4, 8, 8)
    cache = LatentCache(vae, "vae-a", to_disk=True, in_memory=False)
    assert cache.build(build_dataset([_dataset(sub)])).encoded == 0  # a new run reuses the disk files
    # the image changes (content and mtime) -> only that one is encoded again
    _image(folder / "a2.png", seed=99)
    os.utime(folder / "a2.png", ns=(1, 1))
    assert LatentCache(vae, "vae-a", to_disk=True).build(build_dataset([_dataset(sub)])).encoded == 1
    # resolution, flip setting, encoder id: every entry is stale
    assert LatentCache(vae, "vae-a", to_disk=True).build(
        build_dataset([_dataset(sub, resolution=(32, 32))])).encoded == 4
    assert LatentCache(vae, "vae-a", to_disk=True).build(
        build_dataset([_dataset(_subset(folder, flip_aug=False))])).encoded == 4
    assert LatentCache(vae, "vae-b", to_disk=True).build(build_dataset([_dataset(sub)])).encoded == 4
    # in memory, the same object keeps valid entries and re-encodes changed ones
    memory = LatentCache(vae, "vae-a", cache_dir=tmp_path / "cache")
    memory.build(ds)
    assert memory.build(ds).encoded == 0
    progress = []
    LatentCache(vae, "vae-a", to_disk=True, cache_dir=tmp_path / "c2").build(ds, progress=progress.append)
    assert progress[-1].done == progress[-1].total == 4 and (tmp_path / "c2").is_dir()


def test_text_encoder_cache_and_invalidation(folder):
    calls = []

    def encode(captions: list[str]) -> dict[str, torch.Tensor]:
        calls.extend(captions)
        return {"hidden": torch.stack([torch.full((3, 2), float(len(c))) for c in captions]),
                "pooled": torch.zeros(len(captions), 2)}

    def encoded(encoder_id: str) -> int:
        fresh = build_dataset([_dataset(_subset(folder))])
        return TextEncoderCache(encode, encoder_id, to_disk=True).build(fresh).encoded

    ds = build_dataset([_dataset(_subset(folder))])
    assert TextEncoderCache(encode, "te-a", to_disk=True).build(ds).encoded == 4 and len(calls) == 4
    batch = ds.load_batch(epoch_plan(ds, 0, 1)[0], 0)
    assert batch.text_encoder_outputs["hidden"].shape == (1, 3, 2)
    assert encoded("te-a") == 0
    (folder / "a0.txt").write_text("new caption", encoding="utf-8")
    assert encoded("te-a") == 1 and calls[-1] == "new caption"
    assert encoded("te-b") == 4


# ---------------------------------------------------------------------------------------------------- summaries


def test_sd_scripts_summaries(tmp_path):
    for name, caps in (("10_sks dog", ["sks, dog", "sks, red"]), ("5_cat", ["cat"])):
        for i, cap in enumerate(caps):
            _image(tmp_path / "train" / name / f"{i}.png", seed=i, caption=cap)
    _image(tmp_path / "reg" / "1_dog" / "r.png", caption="dog")
    cfg = load_config(None, overrides=["--train_data_dir", str(tmp_path / "train"), "--reg_data_dir",
                                       str(tmp_path / "reg"), "--caption_extension", ".txt", "--resolution", "64"])
    ds = build_dataset(cfg.data)
    assert tag_frequencies(ds) == {"10_sks dog": {"sks": 2, "dog": 1, "red": 1}, "5_cat": {"cat": 1},
                                   "1_dog": {"dog": 1}}
    meta = dataset_metadata(ds, cfg.data, total_batch_size=4)
    assert json.loads(meta["ss_dataset_dirs"]) == {"10_sks dog": {"n_repeats": 10, "img_count": 2},
                                                   "5_cat": {"n_repeats": 5, "img_count": 1}}
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_dog": {"n_repeats": 1, "img_count": 1}}
    assert meta["ss_num_train_images"] == "25" and meta["ss_num_reg_images"] == "1"
    assert meta["ss_resolution"] == "(64, 64)" and meta["ss_bucket_info"] == "null"
    assert meta["ss_total_batch_size"] == "4" and "ss_datasets" not in meta


def test_separate_validation_folder(tmp_path):
    from lib_lora.train.data.dataset_config import validation_datasets

    for i in range(3):
        _image(tmp_path / "val" / f"v{i}.png", seed=i, caption="v")
    _image(tmp_path / "valk" / "2_cat" / "c.png", caption="c")
    (plain,) = validation_datasets(tmp_path / "val", fallback={"caption_extension": ".txt", "resolution": (64, 64)})
    assert plain.subsets[0].num_repeats == 1 and plain.resolution == (64, 64)
    ds = build_dataset([plain], split="all", evaluation=True)
    assert len(ds.items) == 3 and ds.evaluation and ds.num_batches_per_epoch == 3
    (kohya,) = validation_datasets(tmp_path / "valk", fallback={"resolution": (64, 64)})
    assert kohya.subsets[0].class_tokens == "cat" and kohya.subsets[0].num_repeats == 2
