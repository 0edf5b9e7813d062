"""Generation with `<lora:...>` prompts on the tiny random SD1 model: determinism, LoRA effect, block weights,
start/stop, exact restore (also after errors and cancellation), bad input, the LoRA library, the standalone
host and the `generate` CLI."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lib_lora.cli import main as cli_main
from lib_lora.errors import (
    ArchMismatchError,
    BlockWeightError,
    ConfigError,
    FileFormatError,
    LibLoraError,
    PromptSyntaxError,
)
from lib_lora.host.standalone import StandaloneHost
from lib_lora.io import addnet_hash, save_file
from lib_lora.lora_library import LoraLibrary, LoraNotFoundError
from lib_lora.patching import WeightPatcher
from lib_lora.sd.lora_generate import generate_with_loras, model_targets, plan_loras
from lib_lora.sd.model import SDModel
from lib_lora.sd.pipeline import GenerationCancelled, GenerationParams
from lib_lora.types import Arch
from tests.helpers import checksum, make_network_file, make_sd_model, targets_of, write_lora_folder

STEPS = 4


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in result.images])


@pytest.fixture(scope="module")
def model(tiny_sd1):
    return make_sd_model(tiny_sd1)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_sd1, tiny_sdxl):
    return write_lora_folder(tmp_path_factory.mktemp("loras"), tiny_sd1, tiny_sdxl)


@pytest.fixture(scope="module")
def library(lora_dir):
    return LoraLibrary(lora_dir)


@pytest.fixture(scope="module")
def patcher(model):
    return WeightPatcher(model_targets(model))


@pytest.fixture(scope="module")
def run(model, library, patcher):
    def _run(prompt: str, seed: int = 11, **kwargs):
        params = GenerationParams(prompt, steps=STEPS, seed=seed)
        return generate_with_loras(model, params, library, patcher=patcher, **kwargs)

    return _run


@pytest.fixture(scope="module")
def baseline(run):
    return pixels(run("a red circle"))


def model_sum(model: SDModel) -> str:
    return checksum(model.unet, *model.text_encoders, model.vae)


# ----------------------------------------------------------------------------- generation


def test_same_seed_same_image_and_a_lora_changes_it(run, baseline):
    assert np.array_equal(pixels(run("a red circle")), baseline)
    with_lora = pixels(run("a red circle <lora:style:1>"))
    assert np.abs(with_lora - baseline).max() > 10
    assert np.array_equal(pixels(run("a red circle <lora:style:1>")), with_lora)


@pytest.mark.parametrize("tag", ["<lora:style:1:lbw=NONE>", "<lora:style:1:lbw=0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0>",
                                 "<lora:style:0>"])
def test_all_zero_block_weights_equal_no_lora(run, baseline, tag):
    assert np.array_equal(pixels(run(f"a red circle {tag}")), baseline)


def test_block_weights_and_strengths_change_the_image(run, baseline):
    outs = pixels(run("a red circle <lora:style:1:lbw=OUTS>"))
    full = pixels(run("a red circle <lora:style:1>"))
    assert not np.array_equal(outs, baseline) and not np.array_equal(outs, full)
    te_only = pixels(run("a red circle <lora:style:1:0>"))
    assert not np.array_equal(te_only, baseline) and not np.array_equal(te_only, full)


def test_weights_restored_exactly_after_every_generation(run, model):
    before = model_sum(model)
    for prompt in ("<lora:style:1>", "<lora:style:0.5:lbw=INS> <lora:other:1>", "<lora:mystyle:1:1:stop=2>",
                   "<lora:style:1:start=0.5>"):
        run(f"a blue square {prompt}")
        assert model_sum(model) == before, prompt


def test_restored_after_error_and_after_cancellation(run, model, baseline):
    before = model_sum(model)

    def failing_progress(step, total):
        if step == 2:
            raise RuntimeError("boom in a progress callback")

    with pytest.raises(RuntimeError, match="boom"):
        run("a red circle <lora:style:1:lbw=OUTD>", progress=failing_progress)
    assert model_sum(model) == before
    calls = []
    with pytest.raises(GenerationCancelled, match="step 2 of 4"):
        run("a red circle <lora:style:1>", should_stop=lambda: calls.append(1) or len(calls) > 2)
    assert model_sum(model) == before
    assert np.array_equal(pixels(run("a red circle")), baseline)


def test_start_stop_switch_the_unet_part_only(run, library, patcher, model):
    full = pixels(run("a red circle <lora:style:1>"))
    te_only = pixels(run("a red circle <lora:style:1:0>"))
    assert np.array_equal(pixels(run(f"a red circle <lora:style:1:stop={STEPS}>")), full)
    # Prompts are encoded before step 0, so the text-encoder part stays on for a U-Net window that never opens.
    assert np.array_equal(pixels(run(f"a red circle <lora:style:1:start={STEPS}>")), te_only)
    half = pixels(run("a red circle <lora:style:1:stop=0.5>"))
    assert not np.array_equal(half, full) and not np.array_equal(half, te_only)
    assert np.array_equal(pixels(run("a red circle <lora:style:1:step=0-2>")), half)

    rewrites = []

    class Counting(WeightPatcher):
        def apply(self, applications):
            report = super().apply(applications)
            rewrites.append(report.rewritten)
            return report

    counting = Counting(model_targets(model))
    generate_with_loras(model, GenerationParams("x <lora:style:1:start=2>", steps=STEPS, seed=1), library,
                        patcher=counting)
    plan = plan_loras("<lora:style:1>", Arch.SD1, library, STEPS)
    unet_modules = sum(1 for n in plan.loras[0].network.modules if n.startswith("lora_unet_"))
    te_modules = len(plan.loras[0].network.modules) - unet_modules
    # apply (TE only), switch at step 2 (only the U-Net weights), restore (everything)
    assert rewrites == [te_modules, unet_modules, te_modules + unet_modules]


def test_infotext_keeps_the_typed_prompt_and_adds_lora_hashes(run, lora_dir):
    res = run("a red circle, <lora:style:0.8:lbw=OUTS>, <lora:mystyle:1>")
    info = res.infotexts[0]
    assert info.startswith("a red circle, <lora:style:0.8:lbw=OUTS>, <lora:mystyle:1>\n")
    short = addnet_hash(lora_dir / "style.safetensors")[:12]
    assert f'Lora hashes: "style: {short}, mystyle: {short}"' in info
    assert "Steps: 4, Sampler: Euler a, CFG scale: 7, Seed: 11, Size: 64x64" in info


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("prompt", "error", "words"), [
    ("<lora:stlye:1>", LoraNotFoundError, ["'stlye' not found", "did you mean", "style"]),
    ("<lora:style:abc>", PromptSyntaxError, ["text-encoder strength", "'abc'"]),
    ("<lora:style:1", PromptSyntaxError, ["unclosed"]),
    ("<lora:xl:1>", ArchMismatchError, ["xl.safetensors", "SDXL", "the loaded model is SD1.x"]),
    ("<lora:v2:1>", ArchMismatchError, ["SD2.x", "metadata"]),
    ("<lora:style:1:lbw=NOPE>", BlockWeightError, ["unknown block-weight preset 'NOPE'", "OUTS"]),
    ("<lora:style:1:lbw=1,0,1>", BlockWeightError, ["3 values"]),
    ("<lora:style:1:1:4>", ConfigError, ["dyn"]),
    ("<lora:style:1:start=3:stop=2>", ConfigError, ["stop must come after start"]),
    ("<lora:broken:1>", ConfigError, ["broken.safetensors", "cannot be used"]),
])
def test_bad_input_is_a_clear_error_and_changes_nothing(run, model, prompt, error, words):
    before = model_sum(model)
    with pytest.raises(error) as info:
        run(f"a red circle {prompt}")
    for word in words:
        assert word in str(info.value)
    assert model_sum(model) == before


# ----------------------------------------------------------------------------- library


def test_library_lists_names_aliases_ranks_algorithms_and_trigger_words(library, lora_dir):
    entries = {e.name: e for e in library.refresh()}
    assert set(entries) == {"style", "other", "v2", "xl", "broken"}
    style = entries["style"]
    assert (style.alias, style.rank, style.algorithm, style.arch) == ("mystyle", "4", "lora", Arch.SD1)
    assert style.arch_declared and style.modules == 192 + 72
    assert style.trigger_words[:3] == ("sks", "red circle", "blue square")
    assert entries["other"].path.endswith("sub/other.pt") and entries["other"].rank == "2"
    assert entries["xl"].arch is Arch.SDXL
    assert "truncated or corrupt" in entries["broken"].error
    assert library.find("mystyle") is library.find("style")
    assert style.prompt_tag(0.5, "OUTS") == "<lora:style:0.5:lbw=OUTS>"


def test_library_hashes_and_network_cache_follow_the_file(tmp_path, tiny_sd1):
    selected = targets_of(tiny_sd1, Arch.SD1).select(["attn"])[:4]
    path = tmp_path / "a.safetensors"
    save_file(make_network_file(selected, seed=1), path)
    save_file(make_network_file(selected, seed=2), tmp_path / "b.safetensors", {"sshs_model_hash": "ab" * 32})
    lib = LoraLibrary(tmp_path)
    a = lib.find("a")
    assert lib.short_hash(a) == addnet_hash(path)[:12]
    assert lib.short_hash(lib.find("b")) == "ab" * 6
    first = lib.load(a, Arch.SD1)
    assert lib.load(a, Arch.SD1) is first
    save_file(make_network_file(selected, seed=3), path)  # the file changes: a new network is read
    second = lib.load(lib.find("a"), Arch.SD1)
    assert second is not first
    name = selected[0].name
    assert not torch.equal(first.modules[name].lora_up.weight, second.modules[name].lora_up.weight)
    with pytest.raises(LoraNotFoundError, match="no similar names"):
        lib.find("zzzzzz")
    assert LoraLibrary(tmp_path / "missing").entries() == []


# ----------------------------------------------------------------------------- host and CLI


def test_standalone_host_saves_pngs_with_parameters_and_interrupts(model, lora_dir, tmp_path):
    host = StandaloneHost(model=model, lora_dir=lora_dir, outputs_dir=tmp_path)
    res = host.generate(GenerationParams("a red circle <lora:style:1>", steps=STEPS, seed=5, batch_size=2))
    assert len(res.paths) == 2 and res.seeds == [5, 6]
    with Image.open(res.paths[1]) as im:
        assert im.info["parameters"] == res.infotexts[1]
        assert "Seed: 6," in im.info["parameters"]
    before = model_sum(model)
    with pytest.raises(GenerationCancelled):
        host.generate(GenerationParams("x <lora:style:1>", steps=STEPS, seed=5),
                      progress=lambda s, t: host.interrupt())
    assert host.interrupted() and model_sum(model) == before


def test_missing_or_corrupt_model_file_keeps_the_loaded_model(model, lora_dir, tmp_path):
    host = StandaloneHost(model=model, lora_dir=lora_dir, outputs_dir=tmp_path)
    before = model_sum(model)
    with pytest.raises(FileFormatError, match="model file not found"):
        host.load_model(str(tmp_path / "nope.safetensors"))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 100)
    with pytest.raises(FileFormatError, match="corrupt.safetensors"):
        host.load_model(str(corrupt))
    assert host.model is model and model_sum(model) == before
    fresh = StandaloneHost(lora_dir=lora_dir, outputs_dir=tmp_path)
    with pytest.warns(UserWarning, match="corrupt.safetensors"):
        assert fresh.try_load(str(corrupt)) is None
    assert "corrupt.safetensors" in fresh.model_error()
    with pytest.raises(LibLoraError, match="corrupt.safetensors"):
        fresh.generate(GenerationParams("x", steps=1))


def test_embedded_model_missing_is_a_clear_message(tmp_path, monkeypatch, lora_dir):
    from lib_lora.sd import embedded

    monkeypatch.setattr(embedded, "EMBEDDED_DIR", tmp_path / "tiny-sd1")
    host = StandaloneHost(lora_dir=lora_dir, outputs_dir=tmp_path)
    with pytest.raises(FileFormatError) as info:
        host.load_model("embedded")
    assert "the embedded model could not be loaded" in str(info.value)
    assert "tools/build_tiny_model.py" in str(info.value) and "--model" in str(info.value)
    assert host.model_info() is None


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
    from lib_lora.sd.checkpoint_save import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(model, path, dtype=torch.float32, write_yaml=False)  # 8-group VAE: no web-UI yaml
    return path


def test_generate_cli_same_code_path(checkpoint, lora_dir, tmp_path, capsys, run, monkeypatch):
    import lib_lora.host.standalone as standalone

    calls = []
    engine = standalone.generate_with_loras

    def spy(model, params, library, **kwargs):
        calls.append((params, library.folder))
        return engine(model, params, library, **kwargs)

    monkeypatch.setattr(standalone, "generate_with_loras", spy)
    out = tmp_path / "img.png"
    prompt = "a red circle <lora:style:1:lbw=OUTS>"
    code = cli_main(["generate", "--model", str(checkpoint), "--prompt", prompt, "--seed", "11", "--steps",
                     str(STEPS), "--lora-dir", str(lora_dir), "--outputs", str(tmp_path / "outputs"),
                     "--out", str(out), "--no-progress"])
    assert code == 0
    # The path: the app's engine, called once with what the app would pass for these fields.
    ((params, root),) = calls
    assert Path(root) == Path(lora_dir) and params == GenerationParams(prompt, steps=STEPS, seed=11)
    with Image.open(out) as im:
        assert "Lora hashes:" in im.info["parameters"]
        cli_pixels = np.asarray(im, dtype=np.int16)
    # The picture: that of the in-memory model the checkpoint was written from. Another module instance may round
    # differently in the last bits on another CPU's kernels, and sampling carries that into a few pixel levels.
    diff = np.abs(cli_pixels - pixels(run(prompt))[0])
    assert diff.mean() < 0.5 and diff.max() <= 8, (diff.mean(), diff.max())
    assert "saved" in capsys.readouterr().out
    code = cli_main(["generate", "--model", str(checkpoint), "--prompt", "<lora:stlye:1>", "--steps", "1",
                     "--lora-dir", str(lora_dir), "--outputs", str(tmp_path / "outputs")])
    assert code == 1
    assert "did you mean: style" in capsys.readouterr().err
    assert cli_main(["generate", "--model", str(tmp_path / "missing.safetensors"), "--prompt", "x"]) == 1
    assert "model file not found" in capsys.readouterr().err
