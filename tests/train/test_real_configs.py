"""The configs users bring (../shared/configs/real-world: kohya_ss GUI presets as the GUI writes them, sd-scripts
documentation examples, scaled to the tiny model) train to the end through the command line, or are refused
before anything runs with one line naming the option.

Each case runs as `run_config.sh` runs it (placeholders filled in a scratch copy, `extra_args` after the TOML),
through `python -m lib_lora train`'s own entry point, on the embedded model exported as a web-UI checkpoint.
A trained file must be read back by `info` with the configured network, dim and alpha.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lib_lora.cli import main as cli_main
from lib_lora.info import describe
from lib_lora.io import read_metadata
from lib_lora.train.toml_config import flatten_run_toml, parse_overrides, read_toml
from tests.conftest import SHARED

CASES_DIR = SHARED / "configs" / "real-world"
CASES = sorted(p.name for p in CASES_DIR.iterdir() if (p / "run.toml").is_file()) if CASES_DIR.is_dir() else []

# Refused on purpose, with the option the one-line error must name.
REFUSED = {
    # the GUI's bucket_reso_steps = 64 kept, with images scaled down to 64..128 px: shrunk to the area they have a
    # side under one step (sd-scripts would make a zero-height bucket and crash)
    "k20_standard_multires__gui_faithful": "bucket_reso_steps",
}
# What `info` calls each configured algorithm (LoRA-type files with convolution modules read as LoCon).
FILE_ALGORITHM = {"lora": "lora", "locon": "lora", "dylora": "lora", "lora_fa": "lora", "loha": "loha",
                  "lokr": "lokr", "ia3": "ia3", "full": "full", "diag-oft": "diag-oft", "dora": "dora"}
SAMPLE_PROMPT = "zqx, a red circle on a blue background --w 64 --h 64 --s 4 --d 1\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    if not CASES:
        pytest.skip(f"real-world configs not found at {CASES_DIR} (CI always has ../shared beside the checkout)")
    root = tmp_path_factory.mktemp("real-world")
    subprocess.run([sys.executable, str(SHARED / "configs" / "make_data.py"), str(root / "data")], check=True,
                   capture_output=True)
    # the prompt file the GUI writes for the k17 cases (sample_prompts = {DATA}/prompts.txt); make_data.py has none
    (root / "data" / "prompts.txt").write_text(SAMPLE_PROMPT, encoding="utf-8")
    assert cli_main(["export-model", "--out", str(root / "model" / "tiny.safetensors")]) == 0
    return root


def _materialise(case: str, world: Path, out: Path) -> tuple[Path, list[str]]:
    """The case with {MODEL} {DATA} {OUT} {HERE} filled in, as run_config.sh does; returns (folder, argv)."""
    here = world / "cases" / case
    here.mkdir(parents=True)
    values = {"{MODEL}": str(world / "model" / "tiny.safetensors"), "{DATA}": str(world / "data"),
              "{OUT}": str(out), "{HERE}": str(here)}
    for src in (CASES_DIR / case).iterdir():
        if src.is_file():
            text = src.read_text(encoding="utf-8")
            for key, value in values.items():
                text = text.replace(key, value)
            (here / src.name).write_text(text, encoding="utf-8")
    argv = ["train", "--config", str(here / "run.toml"), "--no-progress"]
    if (here / "ds.toml").is_file():
        argv += ["--dataset_config", str(here / "ds.toml")]
    if (here / "extra_args").is_file():
        argv += [line for line in (here / "extra_args").read_text(encoding="utf-8").splitlines() if line]
    return here, argv


def _configured(run_toml: Path, extra: list[str]) -> dict:
    """What the user wrote (the TOML, then command-line tokens), read without the engine's config code."""
    options, _ = flatten_run_toml(read_toml(run_toml), str(run_toml))
    options.update(parse_overrides(extra))
    raw_args = options.get("network_args", [])
    args = dict(str(a).split("=", 1) for a in ([raw_args] if isinstance(raw_args, str) else raw_args) if "=" in str(a))
    module = options.get("network_module", "networks.lora")
    algo = {"networks.lora": "lora", "networks.dylora": "dylora", "networks.lora_fa": "lora_fa"}.get(
        module, args.get("algo", "lora").strip())
    dim = int(options.get("network_dim", 4))
    alpha = float(options.get("network_alpha", 1.0)) or float(dim)
    if args.get("dora_wd", "False").strip().lower() == "true" and algo in ("lora", "locon"):
        algo = "dora"
    convs = "conv_dim" in args or "conv_block_dims" in args or (module == "lycoris.kohya" and algo == "locon")
    norm = module == "lycoris.kohya" and args.get("train_norm", "False").strip().lower() == "true"
    return {"module": module, "algo": algo, "dim": dim, "alpha": alpha, "convs": convs, "norm": norm,
            "name": options.get("output_name", "last")}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_real_config_trains_or_is_refused_clearly(case, world, capsys):
    out = world / "out" / case
    here, argv = _materialise(case, world, out)
    code = cli_main(argv)
    captured = capsys.readouterr()
    if case in REFUSED:
        errors = [line for line in captured.err.splitlines() if line.strip()]
        # one line; a dataset refusal lists each file below it
        assert code == 1 and errors[0].startswith("error: ") and all(e.startswith("  ") for e in errors[1:]), \
            captured.err
        assert REFUSED[case] in errors[0], errors[0]
        assert not out.exists() or not any(out.iterdir()), "a refused run must write nothing"
        return
    assert code == 0, captured.err[-3000:] + captured.out[-3000:]
    want = _configured(here / "run.toml", argv[argv.index("--no-progress") + 1:])
    path = out / f"{want['name']}.safetensors"
    info = describe(path)
    expected = FILE_ALGORITHM[want["algo"]]
    if expected == "lora" and (want["convs"] or want["module"] == "lycoris.kohya"):
        expected = "locon"  # LyCORIS trains k x k convolutions at network_dim unless conv_dim says otherwise
    assert info.algorithms == [expected] + (["norm"] if want["norm"] else []), (info.algorithms, want)
    meta = read_metadata(path)
    assert meta["ss_network_module"] == want["module"]
    assert int(meta["ss_network_dim"]) == want["dim"] and float(meta["ss_network_alpha"]) == want["alpha"], meta
