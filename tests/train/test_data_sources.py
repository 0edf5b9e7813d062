"""Dataset features of sd-scripts configs: fine-tuning metadata (metadata_file, in_json), mask folders for masked
loss, secondary_separator and wildcard captions, every PIL colour mode, and debug_dataset; each also in a short
training run on the tiny model."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lib_lora.errors import ConfigError
from lib_lora.io import read_metadata
from lib_lora.train.data.captions import expand_wildcards, process_caption
from lib_lora.train.data.config import DatasetConfig, SubsetConfig, SubsetOptions
from lib_lora.train.data.dataset import build_dataset
from lib_lora.train.data.images import load_image
from lib_lora.train.data.metadata import compose_caption
from lib_lora.train.data.modes import alpha_channel, to_rgb
from lib_lora.train.data.records import DatasetError
from lib_lora.train.data.sampler import epoch_plan
from lib_lora.train.data.summary import dataset_metadata, debug_report, tag_frequencies
from lib_lora.train.toml_config import load_config

# ---------------------------------------------------------------------------------------------------- helpers


def _png(path: Path, size=(64, 64), seed: int = 0, caption: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def _dataset(*subsets: SubsetConfig, **kw) -> DatasetConfig:
    return DatasetConfig(subsets=subsets, resolution=kw.pop("resolution", (64, 64)), **kw)


def _uses(dataset, seed: int = 0, epochs: int = 1):
    """Every batch of `epochs` epochs, loaded."""
    return [dataset.load_batch(p, seed) for e in range(1, epochs + 1) for p in epoch_plan(dataset, seed, e)]


# ---------------------------------------------------------------------------------------------------- captions


def test_secondary_separator_keeps_tags_together_when_shuffled_and_dropped():
    opts = SubsetOptions(shuffle_caption=True, caption_tag_dropout_rate=0.3, keep_tokens=1,
                         secondary_separator=";;;")
    caption = "sks, a, sky;;;cloud;;;day, b, c"
    outs = [process_caption(caption, opts, random.Random(s)) for s in range(60)]
    assert all(o.split(", ")[0] == "sks" for o in outs)
    for out in outs:
        tags = out.split(", ")
        assert ";;;" not in out and ("sky,cloud,day" in tags or "sky" not in out)  # whole, or dropped whole
    assert any("sky,cloud,day" in o for o in outs) and any("sky" not in o for o in outs)
    assert len({o.index("sky") for o in outs if "sky" in o}) > 2  # it moves as one tag
    plain = SubsetOptions(secondary_separator=";;;", caption_separator=".")
    # sd-scripts writes caption_separator in its place
    assert process_caption("x. sky;;;cloud", plain, random.Random(0)) == "x. sky.cloud"


def test_wildcards_and_multiline_captions():
    rng = random.Random(0)
    picks = {expand_wildcards("{simple|white|black} background", rng) for _ in range(40)}
    assert picks == {"simple background", "white background", "black background"}
    assert expand_wildcards("a, {{retro style}}, {x}", random.Random(0)) == "a, {retro style}, x"
    opts = SubsetOptions(enable_wildcard=True, caption_prefix="pre", caption_suffix="post")
    caption = "a photo of sks\nsks, a {red|blue} dog\na drawing of sks"
    outs = {process_caption(caption, opts, random.Random(s)) for s in range(60)}
    assert outs == {"pre a photo of sks post", "pre sks, a red dog post", "pre sks, a blue dog post",
                    "pre a drawing of sks post"}  # one line per use; prefix and suffix on every line
    assert process_caption(caption, SubsetOptions(), random.Random(0)) == "a photo of sks"  # no wildcard: line 1
    assert [process_caption(caption, opts, random.Random(s)) for s in range(9)] == \
        [process_caption(caption, opts, random.Random(s)) for s in range(9)]


def test_wildcard_captions_vary_per_use_and_repeat_exactly(tmp_path):
    folder = tmp_path / "imgs"
    _png(folder / "a.png")
    (folder / "a.txt").write_text("sks, {red|green|blue}\n\nanother line, sks\n", encoding="utf-8")
    sub = SubsetConfig(image_dir=folder, caption_extension=".txt", enable_wildcard=True, num_repeats=4)
    ds = build_dataset([_dataset(sub)])
    assert ds.items[0].caption == "sks, {red|green|blue}\nanother line, sks"  # every non-empty line kept
    first = [c for b in _uses(ds, seed=3, epochs=8) for c in b.captions]
    assert set(first) == {"sks, red", "sks, green", "sks, blue", "another line, sks"}
    assert first == [c for b in _uses(ds, seed=3, epochs=8) for c in b.captions]  # same (seed, epoch, batch, slot)


# ---------------------------------------------------------------------------------------------------- metadata


def _metadata_folder(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "ft"
    for i in range(4):
        _png(folder / f"img{i}.png", seed=i)
    meta = {
        "img0.png": {"caption": "a red square", "tags": "solo, simple background"},  # relative path
        "img1": {"caption": "a blue square"},  # the stem, as merge_captions_to_metadata writes it
        str(folder / "img2.png"): {"tags": "solo, circle"},  # absolute, tags only
        "img3.png": {"caption": "line one\nline two", "tags": "solo"},
    }
    file = tmp_path / "meta_cap.json"
    file.write_text(json.dumps(meta), encoding="utf-8")
    return folder, file


def test_metadata_file_lists_images_and_joins_caption_and_tags(tmp_path):
    folder, file = _metadata_folder(tmp_path)
    _png(folder / "unlisted.png", caption="never used")
    sub = SubsetConfig(image_dir=folder, metadata_file=file, num_repeats=2)
    ds = build_dataset([_dataset(sub)])
    captions = {it.path.name: it.caption for it in ds.items}
    assert captions == {"img0.png": "a red square,solo, simple background", "img1.png": "a blue square",
                        "img2.png": "solo, circle", "img3.png": "line one,solo"}  # sd-scripts: no space
    assert ds.num_train_images == 8
    assert tag_frequencies(ds) == {"meta_cap.json": {"solo": 3, "simple background": 1, "circle": 1}}
    data = load_config(None, overrides=["--dataset_config", str(_write_ds_toml(tmp_path, folder, file)),
                                        "--resolution", "64"]).data
    meta = dataset_metadata(build_dataset(data), data)
    (entry,) = json.loads(meta["ss_datasets"])
    assert entry["is_dreambooth"] is False and entry["subsets"][0]["metadata_file"] == "meta_cap.json"
    assert json.loads(meta["ss_dataset_dirs"]) == {"meta_cap.json": {"n_repeats": 3, "img_count": 4}}
    wild = build_dataset([_dataset(SubsetConfig(image_dir=folder, metadata_file=file, enable_wildcard=True))])
    assert next(it.caption for it in wild.items if it.path.name == "img3.png") == "line one,solo\nline two,solo"
    assert compose_caption("", "", ",") == "" and compose_caption("cap", "", ",") == "cap"


def _write_ds_toml(tmp_path: Path, folder: Path, file: Path) -> Path:
    toml = tmp_path / "ds.toml"
    toml.write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{folder}'\nmetadata_file = '{file.name}'\n"
                    "num_repeats = 3\n", encoding="utf-8")
    return toml


def test_metadata_problems_are_listed_together(tmp_path):
    folder, _ = _metadata_folder(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"img0.png": {"caption": 3}, "gone.png": {"caption": "x"}, "img1.png": "text",
                               "img2.png": {"caption": "ok"}, "img2": {"caption": "twice"}}), encoding="utf-8")
    with pytest.raises(DatasetError) as err:
        build_dataset([_dataset(SubsetConfig(image_dir=folder, metadata_file=bad))])
    reasons = [p.reason for p in err.value.problems]
    assert len(reasons) == 4 and all(p.path == str(bad) for p in err.value.problems)
    assert any("'img0.png'" in r and "must be text" in r for r in reasons)
    assert any("'gone.png'" in r and "no such image" in r for r in reasons)
    assert any("'img1.png'" in r for r in reasons) and any("listed twice" in r for r in reasons)
    broken = tmp_path / "broken.json"
    broken.write_text('{"img0.png": {"caption": "x"},}', encoding="utf-8")
    with pytest.raises(DatasetError, match="not valid JSON.*line 1"):
        build_dataset([_dataset(SubsetConfig(image_dir=folder, metadata_file=broken))])
    with pytest.raises(DatasetError, match="metadata_file not found"):
        build_dataset([_dataset(SubsetConfig(image_dir=folder, metadata_file=tmp_path / "none.json"))])
    lines = tmp_path / "meta.jsonl"  # sd-scripts' JSON Lines form
    lines.write_text('{"image_path": "img0.png", "caption": "jsonl caption", "tags": "t"}\n\n', encoding="utf-8")
    ds = build_dataset([_dataset(SubsetConfig(image_dir=folder, metadata_file=lines))])
    assert [it.caption for it in ds.items] == ["jsonl caption,t"]


def test_in_json_run_option_with_dataset_repeats(tmp_path):
    folder, file = _metadata_folder(tmp_path)
    cfg = load_config(None, overrides=["--train_data_dir", str(folder), "--in_json", str(file),
                                       "--dataset_repeats", "3", "--resolution", "64"])
    (sub,) = cfg.data.subsets
    assert sub.metadata_file == file and sub.image_dir == folder and sub.num_repeats == 3
    assert cfg.data.in_json == file and build_dataset(cfg.data).num_train_images == 12
    with pytest.raises(ConfigError, match="belongs to a subset"):
        toml = tmp_path / "ds_general.toml"
        toml.write_text(f"[general]\nmetadata_file = '{file}'\n[[datasets]]\n[[datasets.subsets]]\n"
                        f"image_dir = '{folder}'\n", encoding="utf-8")
        load_config(None, overrides=["--dataset_config", str(toml)])


# ---------------------------------------------------------------------------------------------------- masks


def _mask(path: Path, size=(64, 64), left_value: int = 255, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    values = np.zeros((size[1], size[0]), np.uint8)
    values[:, : size[0] // 2] = left_value
    image = Image.fromarray(values, "L")
    if mode == "RGB":  # red channel carries the mask; green/blue must be ignored
        image = Image.merge("RGB", (image, Image.new("L", size, 255), Image.new("L", size, 0)))
    image.save(path)
    return path


def test_mask_folder_gives_the_loss_mask_by_file_stem(tmp_path):
    for i in range(3):
        _png(tmp_path / "img" / f"p{i}.png", seed=i, caption="sks")
    _mask(tmp_path / "masks" / "p0.png")
    _mask(tmp_path / "masks" / "p1.png", mode="RGB")
    _mask(tmp_path / "masks" / "p2.bmp", left_value=128)
    sub = SubsetConfig(image_dir=tmp_path / "img", caption_extension=".txt", flip_aug=True, num_repeats=4,
                       conditioning_data_dir=tmp_path / "masks")
    ds = build_dataset([_dataset(sub)])
    assert {it.path.stem: it.mask.name for it in ds.items} == {"p0": "p0.png", "p1": "p1.png", "p2": "p2.bmp"}
    seen_flip = False
    for batch in _uses(ds, epochs=2):
        for k, path in enumerate(batch.paths):
            mask = batch.alpha_masks[k]
            left, right = (mask[:, 32:], mask[:, :32]) if batch.flipped[k] else (mask[:, :32], mask[:, 32:])
            seen_flip |= batch.flipped[k]
            expected = 128 / 255 if path.endswith("p2.png") else 1.0
            assert abs(left.mean().item() - expected) < 0.02 and right.max().item() < 0.02
    assert seen_flip


def test_mask_problems_are_listed_together_and_unused_masks_warned(tmp_path):
    for name in ("a", "b", "c", "d"):
        _png(tmp_path / "img" / f"{name}.png", caption="x")
    _mask(tmp_path / "masks" / "a.png", size=(32, 64))  # wrong size
    (tmp_path / "masks" / "b.png").write_bytes(b"not a png")  # unreadable
    _mask(tmp_path / "masks" / "d.png")
    _mask(tmp_path / "masks" / "d.jpg")  # two masks for one image
    _mask(tmp_path / "masks" / "zz.png")  # no image
    sub = SubsetConfig(image_dir=tmp_path / "img", caption_extension=".txt", conditioning_data_dir=tmp_path / "masks")
    with pytest.raises(DatasetError) as err:
        build_dataset([_dataset(sub)])
    found = {Path(p.path).name: p.reason for p in err.value.problems}
    assert set(found) == {"a.png", "b.png", "c.png", "d.png"}
    assert "32x64" in found["a.png"] and "no mask named 'c.*'" in found["c.png"] and "two masks" in found["d.png"]
    (tmp_path / "masks" / "d.png").unlink()
    _mask(tmp_path / "masks" / "a.png")
    _mask(tmp_path / "masks" / "b.png")
    _mask(tmp_path / "masks" / "c.png")
    ds = build_dataset([_dataset(sub)])
    assert any("1 masks match no image" in w and "zz.png" in w for w in ds.warnings)


def test_conditioning_data_dir_is_a_mask_folder_only_with_masked_loss(tmp_path):
    _png(tmp_path / "img" / "a.png", caption="x")
    _mask(tmp_path / "masks" / "a.png")
    toml = tmp_path / "ds.toml"
    toml.write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'img'}'\n"
                    f"conditioning_data_dir = 'masks'\ncaption_extension = '.txt'\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="ControlNet") as err:
        load_config(None, overrides=["--dataset_config", str(toml), "--resolution", "64"])
    assert err.value.field == "conditioning_data_dir" and "masked_loss" in err.value.reason
    cfg = load_config(None, overrides=["--dataset_config", str(toml), "--resolution", "64", "--masked_loss"])
    assert cfg.data.subsets[0].conditioning_data_dir == tmp_path / "masks"  # relative to the dataset TOML
    with pytest.raises(ConfigError, match="ControlNet"):
        load_config(None, overrides=["--train_data_dir", str(tmp_path), "--conditioning_data_dir", "masks"])


# ---------------------------------------------------------------------------------------------------- colour modes

GRADIENT = np.tile(np.linspace(0, 1, 64), (16, 1))  # 16 rows, 64 columns, 0..1 left to right


def _expected_gray() -> np.ndarray:
    return np.rint(GRADIENT * 255)


def _mode_image(mode: str) -> Image.Image:
    """A 64x16 left-to-right gradient in `mode` (grey, or one colour channel)."""
    g8 = np.rint(GRADIENT * 255).astype(np.uint8)
    g16 = np.rint(GRADIENT * 65535)
    if mode == "I;16":
        return Image.fromarray(g16.astype(np.uint16))
    if mode == "I;16B":
        return Image.frombytes("I;16B", (64, 16), g16.astype(">u2").tobytes())
    if mode == "I":
        return Image.fromarray(g16.astype(np.int32))
    if mode == "F":
        return Image.fromarray(GRADIENT.astype(np.float32))
    if mode == "1":
        return Image.fromarray(g8 > 127).convert("1")
    if mode == "P":
        return Image.fromarray(g8).convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
    gray = Image.fromarray(g8, "L")
    if mode in ("LA", "La"):
        return Image.merge("LA", (gray, Image.new("L", gray.size, 255))).convert(mode)
    return gray.convert("RGB").convert(mode)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "La", "P", "I;16", "I;16B", "I", "F", "RGB", "RGBA", "RGBa",
                                  "RGBX", "CMYK", "YCbCr", "LAB", "HSV"])
def test_every_colour_mode_becomes_8bit_rgb(mode):
    rgb = np.asarray(to_rgb(_mode_image(mode)), dtype=np.float64)
    assert rgb.shape == (16, 64, 3)
    expected = np.rint(GRADIENT > 0.5) * 255 if mode == "1" else _expected_gray()
    tolerance = {"LAB": 4, "YCbCr": 3}.get(mode, 1)  # colour-space round trips
    assert np.abs(rgb - expected[..., None]).max() <= tolerance, mode
    assert alpha_channel(_mode_image(mode)) is None or mode in ("LA", "La", "RGBA", "RGBa")


def test_16bit_grayscale_png_trains_as_its_grey_not_white(tmp_path):
    Image.fromarray(np.rint(GRADIENT * 65535).astype(np.uint16)).save(tmp_path / "g16.png")
    loaded = load_image(tmp_path / "g16.png", keep_alpha=True)
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")
    assert np.abs(np.asarray(loaded.rgb, np.float64)[..., 0] - _expected_gray()).max() <= 1
    assert np.asarray(loaded.alpha).min() == 255  # no transparency: all opaque


@pytest.mark.parametrize("kind", ["P", "L", "RGB", "I;16", "LA"])
def test_transparency_becomes_the_alpha_mask(tmp_path, kind):
    g8 = np.rint(GRADIENT * 255).astype(np.uint8)
    path = tmp_path / f"t_{kind.replace(';', '')}.png"
    if kind == "P":
        Image.fromarray(g8, "L").convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE).save(path, transparency=0)
    elif kind == "L":
        Image.fromarray(g8, "L").save(path, transparency=0)
    elif kind == "RGB":
        Image.fromarray(g8, "L").convert("RGB").save(path, transparency=(0, 0, 0))
    elif kind == "I;16":
        Image.fromarray(g8.astype(np.uint16) * 257).save(path, transparency=0)
    else:
        alpha = Image.fromarray(np.where(g8 == 0, 0, 255).astype(np.uint8))
        Image.merge("LA", (Image.fromarray(g8), alpha)).save(path)
    loaded = load_image(path, keep_alpha=True)
    alpha = np.asarray(loaded.alpha)
    transparent = np.asarray(Image.open(path).convert("RGBA"))[..., 3] == 0 if kind == "P" else g8 == 0
    assert transparent.any() and (alpha[transparent] == 0).all() and (alpha[~transparent] == 255).all()
    assert loaded.rgb.mode == "RGB"


# ---------------------------------------------------------------------------------------------------- debug_dataset


def test_debug_dataset_shows_the_dataset_and_trains_nothing(tmp_path, capsys):
    from lib_lora.cli import main

    for i in range(3):
        _png(tmp_path / "train" / "4_sks" / f"a{i}.png", seed=i, caption="sks, red;;;square, {big|small}")
    run = tmp_path / "run.toml"
    run.write_text(f"pretrained_model_name_or_path = 'missing.safetensors'\noutput_dir = '{tmp_path / 'out'}'\n"
                   f"logging_dir = '{tmp_path / 'logs'}'\ntrain_data_dir = 'train'\nresolution = 64\n"
                   "caption_extension = '.txt'\nsecondary_separator = ';;;'\nenable_wildcard = true\n"
                   "shuffle_caption = true\ndebug_dataset = true\nseed = 7\ntrain_batch_size = 2\n", encoding="utf-8")
    report = debug_report(load_config(run).data, seed=7)
    assert report.startswith("debug_dataset: 3 images, 12 training samples per epoch")
    assert "6 steps per epoch" in report and "4_sks: 3 images x 4 repeats" in report
    assert "bucket 0: 64x64, 12 images" in report
    shown = [line for line in report.splitlines() if line.strip().startswith("step ")]
    assert len(shown) == 3 and all("red,square" in s and ";;;" not in s.split("(written")[0] for s in shown)
    assert main(["train", "--config", str(run)]) == 0  # the model file does not even exist: nothing is loaded
    assert capsys.readouterr().out.strip() == report
    assert not (tmp_path / "out").exists() and not (tmp_path / "logs").exists()


# ---------------------------------------------------------------------------------------------------- training runs


def _train(tmp_path: Path, dataset_toml: str, **options) -> Path:
    from lib_lora.train.run import train
    from tests.train.fixtures import tiny_model, write_run

    (tmp_path / "ds.toml").write_text(dataset_toml, encoding="utf-8")
    run = write_run(tmp_path, train_data_dir=None, dataset_config="ds.toml", max_train_steps=2, **options)
    result = train(load_config(run), model=tiny_model())
    assert result.status == "finished" and result.steps == 2
    return result.final_file


def test_training_runs_on_fine_tuning_metadata_with_wildcards_and_secondary_separator(tmp_path):
    from tests.train.fixtures import write_images

    folder = write_images(tmp_path / "ft", 3)
    meta = {f"img{i}": {"caption": "sks {red|crimson} square\nsks, a square", "tags": "solo;;;alone, blue"}
            for i in range(3)}
    (tmp_path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    out = _train(tmp_path, "[general]\nenable_wildcard = true\nsecondary_separator = ';;;'\nshuffle_caption = true\n"
                           "[[datasets]]\nresolution = 128\nbatch_size = 2\n[[datasets.subsets]]\n"
                           f"image_dir = '{folder}'\nmetadata_file = 'meta.json'\nnum_repeats = 2\n")
    meta_out = read_metadata(out)
    assert json.loads(meta_out["ss_tag_frequency"]) == {"meta.json": {"solo;;;alone": 3, "blue": 3}}
    subset = json.loads(meta_out["ss_datasets"])[0]["subsets"][0]
    assert subset["enable_wildcard"] is True and subset["secondary_separator"] == ";;;"


def test_training_runs_on_in_json(tmp_path):
    from lib_lora.train.run import train
    from tests.train.fixtures import tiny_model, write_images, write_run

    write_images(tmp_path / "ft", 2)
    (tmp_path / "meta.json").write_text(json.dumps({"img0.png": {"caption": "sks"}, "img1.png": {"tags": "t"}}))
    run = write_run(tmp_path, train_data_dir="ft", in_json="meta.json", dataset_repeats=2, max_train_steps=2)
    result = train(load_config(run), model=tiny_model())
    assert result.status == "finished"
    assert json.loads(read_metadata(result.final_file)["ss_dataset_dirs"]) == {
        "meta.json": {"n_repeats": 2, "img_count": 2}}


def test_training_runs_with_mask_folder_16bit_images_and_cached_latents(tmp_path):
    from lib_lora.io import load_file
    from tests.train.fixtures import write_images

    folder = write_images(tmp_path / "img", 2)
    gray16 = np.rint(np.tile(np.linspace(0, 65535, 128), (128, 1))).astype(np.uint16)
    Image.fromarray(gray16).save(folder / "img1.png")  # a 16-bit grayscale PNG among RGB ones
    for i in range(2):  # all-zero masks: no pixel counts, so nothing may be learned
        _mask(tmp_path / "masks" / f"img{i}.png", size=(128, 128), left_value=0)
    out = _train(tmp_path, "[[datasets]]\nresolution = 128\nbatch_size = 2\n[[datasets.subsets]]\n"
                           f"image_dir = '{folder}'\nconditioning_data_dir = 'masks'\ncaption_extension = '.txt'\n",
                 masked_loss=True, cache_latents=True)
    assert read_metadata(out)["ss_cache_latents"] == "True"
    ups = [t for k, t in load_file(out).tensors.items() if k.endswith("lora_up.weight")]
    assert ups and all(torch.count_nonzero(t) == 0 for t in ups)  # the masks reached the loss, through the cache
