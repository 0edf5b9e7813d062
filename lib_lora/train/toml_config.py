"""sd-scripts' option names -> `TrainConfig`: run TOML, dataset TOML, `--key value` overrides, `ss_*` values.

A run TOML uses sd-scripts' names, at the top level or in any one-level section (kohya_ss writes
`[model_arguments]`, `[optimizer_arguments]`, ...; sd-scripts flattens them, so do we). A run TOML may also carry
the dataset config inline (`[general]` + `[[datasets]]`). Relative paths in a TOML are relative to that TOML's
folder; paths given as overrides are relative to the working directory.

Options of sd-scripts that only concern its own runtime are accepted and listed in `TrainConfig.notes`
(`NO_EFFECT`, with the reason); options we do not implement are accepted only at their default value
(`UNSUPPORTED`); anything else unknown is an error naming the closest known option.
"""
from __future__ import annotations

import ast
import sys
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib_lora.errors import ConfigError, FileFormatError
from lib_lora.train import algo_args, gui_keys
from lib_lora.train import config as tc

# dims_by_block, lr_weights_by_block and BlockRank are re-exported: they were defined here before `blockwise`.
from lib_lora.train.blockwise import BlockRank, BlockwiseConfig, dims_by_block, lr_weights_by_block  # noqa: F401
from lib_lora.train.coerce import coerce, field_types
from lib_lora.train.config import NetworkArgs, NetworkConfig, TrainConfig
from lib_lora.train.data.config import DataConfig, DatasetOptions, SubsetOptions
from lib_lora.train.data.dataset_config import (
    DATASET_NO_EFFECT,
    DATASET_UNSUPPORTED,
    datasets_from_run,
    resolve_datasets,
    suggest,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (web-UI venvs): the same parser, from PyPI
    import tomli as tomllib

SECTIONS: dict[str, type] = {
    "model": tc.ModelConfig, "network": NetworkConfig, "optimizer": tc.OptimizerConfig, "run": tc.RunConfig,
    "output": tc.OutputConfig, "sampling": tc.SamplingConfig, "loss": tc.LossConfig, "validation": tc.ValidationConfig,
    "guard": tc.GuardConfig, "logging": tc.LoggingConfig, "data": DataConfig,
}
# Fields assembled from several options, not set by name:
_BUILT_FIELDS = {"network_args", "network_args_raw", "blockwise", "datasets", "optimizer_args", "lr_scheduler_args"}
LORA_PLUS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")

_RUNTIME = "sd-scripts runtime detail; this engine decides it itself"
NO_EFFECT: dict[str, str] = {
    "xformers": "attention: PyTorch SDPA, or the web UI's own attention (xformers when it has it)",
    "sdpa": "attention: PyTorch SDPA is always used", "mem_eff_attn": "attention: PyTorch SDPA is always used",
    "persistent_data_loader_workers": "images are loaded by the engine's own sampler",
    "max_data_loader_n_workers": "images are loaded by the engine's own sampler",
    "lowram": _RUNTIME, "highvram": _RUNTIME, "disable_mmap_load_safetensors": _RUNTIME,
    "tokenizer_cache_dir": "the CLIP tokenizer ships with the app (offline)",
    "console_log_level": "logging goes to the console and TensorBoard", "console_log_file": _RUNTIME,
    "console_log_simple": _RUNTIME, "log_config": "the resolved config is always written to the log",
    "ddp_timeout": "accelerate's defaults are used", "ddp_gradient_as_bucket_view": "accelerate's defaults are used",
    "ddp_static_graph": "accelerate's defaults are used", "dynamo_backend": "torch.compile is not used",
    "wandb_api_key": "TensorBoard only", "wandb_run_name": "TensorBoard only",
    "log_tracker_config": "TensorBoard only",
    "huggingface_repo_id": "no uploads (offline)", "huggingface_repo_type": "no uploads (offline)",
    "huggingface_path_in_repo": "no uploads (offline)", "huggingface_token": "no uploads (offline)",
    "huggingface_repo_visibility": "no uploads (offline)", "save_state_to_huggingface": "no uploads (offline)",
    "resume_from_huggingface": "no downloads (offline)", "async_upload": "no uploads (offline)",
    "skip_cache_check": "caches are always validated by their keys (cheap: file size and time)",
    "num_cpu_threads_per_process": "an `accelerate launch` option, not a training option",
    "output_config": "the CLI writes no config file", "config_file": "the CLI takes --config",
    **DATASET_NO_EFFECT,
}
UNSUPPORTED: dict[str, tuple[Any, Any, str]] = {  # name: (type, default, reason); only the default is accepted
    "full_fp16": (bool, False, "full fp16 training is not implemented (use mixed_precision)"),
    "full_bf16": (bool, False, "full bf16 training is not implemented (use mixed_precision)"),
    "fp8_base": (bool, False, "fp8 base weights are not implemented"),
    "fp8_base_unet": (bool, False, "fp8 base weights are not implemented"),
    "fused_backward_pass": (bool, False, "fused backward passes are not implemented"),
    "weighted_captions": (bool, False, "weighted captions are not implemented"),
    "lr_decay_steps": (int | float, 0, "warmup_stable_decay is not implemented"),
    "lr_scheduler_timescale": (int | None, None, "inverse_sqrt is not implemented"),
    "zero_terminal_snr": (bool, False, "zero terminal SNR is not implemented"),
    "ip_noise_gamma": (float | None, None, "input perturbation noise is not implemented"),
    "ip_noise_gamma_random_strength": (bool, False, "input perturbation noise is not implemented"),
    "loss_type": (str, "l2", "only the l2 loss is implemented"),
    "huber_schedule": (str, "snr", "only the l2 loss is implemented"),
    "huber_c": (float, 0.1, "only the l2 loss is implemented"),
    "huber_scale": (float, 1.0, "only the l2 loss is implemented"),
    "deepspeed": (bool, False, "DeepSpeed is not supported (use plain accelerate)"),
    "initial_epoch": (int | None, None, "use resume"), "initial_step": (int | None, None, "use resume"),
    "skip_until_initial_step": (bool, False, "use resume"),
    "base_weights": (tuple[str, ...] | None, None, "merging base weights before training is not implemented"),
    "base_weights_multiplier": (tuple[float, ...] | None, None, "merging base weights is not implemented"),
    "dataset_class": (str | None, None, "custom dataset classes are not supported"),
    "save_n_epoch_ratio": (int | None, None, "use save_every_n_epochs"),
    "text_encoder_batch_size": (int | None, None, "text-encoder outputs are cached with a fixed batch size"),
    "conditioning_data_dir": (str | None, None, "a run-level conditioning_data_dir is ControlNet training data; for "
                              "masked loss, give a mask folder per subset in a dataset TOML"),
    **{k: (Any, default, reason) for k, (default, reason) in DATASET_UNSUPPORTED.items()},
}
ALIASES = {"caption_extention": "caption_extension"}  # sd-scripts' historical spelling
EMBEDDED = "embedded"  # pretrained_model_name_or_path naming the shipped tiny model
ARG_TABLES = ("network_args", "optimizer_args", "lr_scheduler_args")  # key=value lists, or TOML tables


@dataclass(frozen=True)
class Option:
    """A known option: which section it belongs to and its declared type."""

    name: str
    section: str  # a key of SECTIONS, "blockwise", "dataset" (a dataset fallback) or "special"
    hint: Any


def _option_table() -> dict[str, Option]:
    table: dict[str, Option] = {}

    def add(name: str, section: str, hint: Any) -> None:
        if name in table:
            raise RuntimeError(f"option {name!r} declared by both {table[name].section} and {section}")
        table[name] = Option(name, section, hint)

    for section, cls in SECTIONS.items():
        for name, hint in field_types(cls).items():
            if name not in _BUILT_FIELDS:
                add(name, section, hint)
    for name, hint in field_types(BlockwiseConfig).items():
        add(name, "blockwise", hint)
    for name, hint in {**field_types(SubsetOptions), **field_types(DatasetOptions)}.items():
        if name not in ("batch_size", "num_repeats"):  # the run's names are train_batch_size / folder names
            add(name, "dataset", hint)
    for name, hint in (("network_args", tuple[str, ...]), ("optimizer_args", tuple[str, ...]),
                       ("lr_scheduler_args", tuple[str, ...]),
                       ("use_8bit_adam", bool), ("use_lion_optimizer", bool), ("caption_extention", str),
                       ("epoch", int), ("noise_offset_type", str)):
        add(name, "special", hint)
    return table


OPTIONS = _option_table()
if set(OPTIONS) & (set(NO_EFFECT) | set(UNSUPPORTED)):
    raise RuntimeError(f"options both known and listed as no-effect/unsupported: "
                       f"{sorted(set(OPTIONS) & (set(NO_EFFECT) | set(UNSUPPORTED)))}")


def known_names() -> set[str]:
    """Every name a run TOML or the command line may use."""
    return set(OPTIONS) | set(NO_EFFECT) | set(UNSUPPORTED)


# ---------------------------------------------------------------------------------------------------- reading


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file (UTF-8, BOM tolerated); errors name the file."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise ConfigError("config", str(path), "file not found") from None
    except UnicodeDecodeError as exc:
        raise FileFormatError(str(path), f"not UTF-8 text (offset {exc.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FileFormatError(str(path), f"not valid TOML: {exc}") from None


def flatten_run_toml(doc: Mapping[str, Any], source: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(options, inline dataset config or None): one-level sections are merged into the top level."""
    doc = dict(doc)
    inline = None
    if "datasets" in doc:
        inline = {"datasets": doc.pop("datasets"), **({"general": doc.pop("general")} if "general" in doc else {})}
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        pairs = value.items() if isinstance(value, Mapping) and key not in ARG_TABLES else [(key, value)]
        for name, item in pairs:
            if name in flat:
                raise ConfigError(name, item, f"given twice in {source} (sections are merged, as sd-scripts does)")
            flat[name] = item
    return flat, inline


def _is_flag(token: str) -> bool:
    return token.startswith("--") and len(token) > 2


def parse_overrides(tokens: Sequence[str]) -> list[tuple[str, Any]]:
    """`--key value`, `--key=value`, `--flag`, and lists (`--network_args conv_dim=4 conv_alpha=1`) -> pairs."""
    pairs, i = [], 0
    while i < len(tokens):
        token = tokens[i]
        if not _is_flag(token):
            raise ConfigError("overrides", token, "expected --key value, --key=value or --flag")
        key, eq, value = token[2:].partition("=")
        key = key.replace("-", "_")
        i += 1
        if eq:
            pairs.append((key, value))
            continue
        values = []
        while i < len(tokens) and not _is_flag(tokens[i]):
            values.append(tokens[i])
            i += 1
        pairs.append((key, _override_value(key, values)))
    return pairs


def _is_list(hint: Any) -> bool:
    """Whether a declared type takes several values (a tuple, or a union with one)."""
    return typing.get_origin(hint) is tuple or any(typing.get_origin(a) is tuple for a in typing.get_args(hint))


def _override_value(key: str, values: list[str]) -> Any:
    name = ALIASES.get(key, key)
    if name not in OPTIONS and name not in UNSUPPORTED:  # no-effect or unknown (convert_options names it)
        return True if not values else values[0] if len(values) == 1 else values
    hint = OPTIONS[name].hint if name in OPTIONS else UNSUPPORTED[name][0]
    if hint is bool:
        if len(values) > 1:
            raise ConfigError(key, values, "is a flag: give at most one value (true/false)")
        return values[0] if values else True
    if not values:
        raise ConfigError(key, None, "needs a value")
    if _is_list(hint):
        return values if len(values) > 1 or name in ARG_TABLES else values[0]
    if len(values) > 1:
        raise ConfigError(key, values, "takes one value")
    return values[0]


def convert_options(raw: Mapping[str, Any], *, base_dir: Path | None, notes: list[str]) -> dict[str, Any]:
    """Typed values of known options; no-effect options become notes; unknown names raise (with suggestions)."""
    unknown = [k for k in raw if ALIASES.get(k, k) not in known_names()]
    if unknown:
        hints = ", ".join(f"'{k}'{suggest(k, known_names())}" for k in unknown)
        raise ConfigError(unknown[0], raw[unknown[0]], f"unknown option ({hints})")
    typed: dict[str, Any] = {}
    unset = []
    for key, value in raw.items():
        key = ALIASES.get(key, key)
        if gui_keys.is_placeholder(key, value, _hint(key)):
            unset.append(key)
        elif key == "pretrained_model_name_or_path" and isinstance(value, str) and value.strip() == EMBEDDED:
            typed[key] = Path(EMBEDDED)  # the shipped model, not a file beside the TOML
        elif key == "sample_prompts" and _is_prompt_text(value, base_dir):
            typed["sample_prompt_text"] = value
            notes.append("sample_prompts holds prompt text, not a file: used as the prompt (as the kohya_ss GUI "
                         "does)")
        elif key in NO_EFFECT:
            notes.append(f"{key}: accepted, no effect here ({NO_EFFECT[key]})")
        elif key in UNSUPPORTED:
            hint, default, reason = UNSUPPORTED[key]
            if coerce(value, hint, name=key, base_dir=None) != default:
                raise ConfigError(key, value, f"not supported here: {reason}")
        elif key in ARG_TABLES and isinstance(value, Mapping):
            typed[key] = dict(value)  # a TOML table: already typed
        else:
            typed[key] = coerce(value, OPTIONS[key].hint, name=key, base_dir=base_dir)
    if unset:
        notes.append(f"left unset (empty, false or 0, as the kohya_ss GUI writes unset fields): {', '.join(unset)}")
    return typed


def _hint(name: str) -> Any:
    if name in OPTIONS:
        return OPTIONS[name].hint
    return UNSUPPORTED[name][0] if name in UNSUPPORTED else Any


def _is_prompt_text(value: Any, base_dir: Path | None) -> bool:
    """A `sample_prompts` value that is prompt text (the GUI's text box), not a path: no such file, no folder
    separator, no prompt-file suffix."""
    if not isinstance(value, str) or any(sep in value for sep in "/\\"):
        return False
    text = value.strip()
    if Path(text).suffix.lower() in (".txt", ".toml", ".json"):
        return False
    return not (base_dir / text if base_dir else Path(text)).exists()


# ---------------------------------------------------------------------------------------------------- args


def _key_values(items: Sequence[str] | Mapping[str, Any], option: str) -> list[tuple[str, Any]]:
    if isinstance(items, Mapping):
        return list(items.items())
    pairs = []
    for item in items:
        key, eq, value = str(item).partition("=")
        if not eq or not key.strip():
            raise ConfigError(option, item, "expected key=value, e.g. conv_dim=8")
        pairs.append((key.strip(), value.strip()))
    return pairs


def parse_network_args(items: Sequence[str] | Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """`network_args` -> {"args": NetworkArgs fields, "blockwise": BlockwiseConfig fields, "loraplus": ratios,
    "raw": (key, text) pairs as written}. Values are typed by the field they set ("algo=loha", "dropout=0.1",
    "dora_wd=True", "down_lr_weight=sine+0.5", "block_dims=2,4,...")."""
    types = {**field_types(NetworkArgs), **field_types(BlockwiseConfig), **{k: float | None for k in LORA_PLUS}}
    out: dict[str, dict[str, Any]] = {"args": {}, "blockwise": {}, "loraplus": {}, "raw": {}}
    for written, value in _key_values(items, "network_args"):
        key = algo_args.ALIASES.get(written, written)
        if key not in types:
            raise ConfigError(f"network_args.{key}", value, f"unknown network argument{suggest(key, types)}")
        typed = coerce(value, types[key], name=f"network_args.{key}")
        if key == "use_tucker":  # LyCORIS ORs it with its old names (the GUI writes use_tucker and use_cp for LoKr)
            typed = typed or out["args"].get(key, False)
        part = "loraplus" if key in LORA_PLUS else "blockwise" if key in field_types(BlockwiseConfig) else "args"
        out[part][key] = typed
        out["raw"][written] = value if isinstance(value, str) else str(value)
    return out


def parse_optimizer_args(items: Sequence[str] | Mapping[str, Any],
                         option: str = "optimizer_args") -> tuple[tuple[str, Any], ...]:
    """`optimizer_args` -> typed pairs, literal-eval style: "weight_decay=0.1" -> 0.1, "betas=0.9,0.99" ->
    (0.9, 0.99), "relative_step=False" -> False (lower-case true/false/none too); other text stays text."""
    words = {"true": True, "false": False, "none": None}
    pairs = []
    for key, value in _key_values(items, option):
        if not key.isidentifier():
            raise ConfigError(f"{option}.{key}", value, "not a keyword argument name")
        if isinstance(value, str):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                value = words.get(value.lower(), value)
        pairs.append((key, value))
    return tuple(pairs)


# ---------------------------------------------------------------------------------------------------- building


def _merge_network_extras(opts: dict[str, Any], parsed: dict[str, dict[str, Any]]) -> None:
    """Block-wise and LoRA+ options may be top-level or in network_args (sd-scripts' place); both must agree."""
    for part in ("blockwise", "loraplus"):
        for key, value in parsed[part].items():
            if key in opts and opts[key] != value:
                raise ConfigError(key, opts[key], f"also given in network_args as {value!r}")
            opts[key] = value


def _legacy_optimizer_flags(opts: dict[str, Any]) -> None:
    for flag, name in (("use_8bit_adam", "AdamW8bit"), ("use_lion_optimizer", "Lion")):
        if opts.pop(flag, False):
            if opts.get("optimizer_type", name).lower() != name.lower():
                raise ConfigError(flag, True, f"conflicts with optimizer_type = {opts['optimizer_type']!r}")
            opts["optimizer_type"] = name


def _datasets(opts: dict[str, Any], dataset_doc: Mapping[str, Any] | None, dataset_base: Path | None,
              source: str, notes: list[str]) -> tuple:
    fallback = {k: v for k, v in opts.items() if OPTIONS[k].section == "dataset"}
    if "train_batch_size" in opts:
        fallback["batch_size"] = opts["train_batch_size"]
    if "dataset_repeats" in opts:  # sd-scripts: the run's num_repeats for subsets that set none
        fallback["num_repeats"] = opts["dataset_repeats"]
    if dataset_doc is None:
        datasets, extra = datasets_from_run(opts, fallback=fallback)
    else:
        if opts.get("train_data_dir") or opts.get("reg_data_dir") or opts.get("in_json"):
            notes.append("train_data_dir / reg_data_dir / in_json ignored: the dataset config is used (as in "
                         "sd-scripts)")
        datasets, extra = resolve_datasets(dataset_doc, base_dir=dataset_base or Path.cwd(), fallback=fallback,
                                           source=source)
    notes.extend(extra)
    notes.extend(dict.fromkeys(note for ds in datasets for note in ds.adjustments))
    return datasets


def build_config(options: Mapping[str, Any], *, dataset_doc: Mapping[str, Any] | None = None,
                 dataset_base: Path | None = None, notes: Sequence[str] = (), source: Path | None = None,
                 dataset_source: str = "dataset_config") -> TrainConfig:
    """A TrainConfig from typed options with sd-scripts' names (the output of `convert_options`).

    Args:
        options: {name: typed value}; the UI can pass its values here directly.
        dataset_doc: a parsed dataset TOML, if any (else train_data_dir's kohya folders are used).
        dataset_base: folder that the dataset TOML's relative image_dir paths are relative to.
        notes: notes gathered so far (no-effect options); more are added.
    """
    opts, notes = dict(options), list(notes)
    gui_keys.apply_epoch(opts, notes)
    gui_keys.check_noise_offset_type(opts, notes)
    if opts.get("caption_extension") == gui_keys.NO_CAPTION_EXTENSION:
        notes.append(f"caption_extension = {gui_keys.NO_CAPTION_EXTENSION!r} (kohya_ss GUI): no caption files; "
                     "each image's caption is its folder's class token")
    _legacy_optimizer_flags(opts)
    parsed = parse_network_args(opts.pop("network_args", ()))
    _merge_network_extras(opts, parsed)
    optimizer_args = parse_optimizer_args(opts.pop("optimizer_args", ()))
    scheduler_args = parse_optimizer_args(opts.pop("lr_scheduler_args", ()), option="lr_scheduler_args")
    if opts.get("lr_scheduler_type"):
        notes.append(f"lr_scheduler_type = {opts['lr_scheduler_type']}: this torch scheduler sets the lr; "
                     "lr_scheduler and lr_warmup_steps do not apply (as in sd-scripts)")
    if opts.get("masked_loss") and "alpha_mask" not in opts:
        opts["alpha_mask"] = True  # sd-scripts' masked loss reads the alpha channel
    datasets = _datasets(opts, dataset_doc, dataset_base, dataset_source, notes)
    if opts.get("lr_scheduler_min_lr_ratio") is not None and str(opts.get("lr_scheduler", "constant")).lower() \
            not in ("cosine_with_restarts", "cosine_with_min_lr"):
        notes.append("lr_scheduler_min_lr_ratio: no effect with this lr_scheduler (it is the floor of "
                     "cosine_with_restarts and cosine_with_min_lr)")
    kwargs: dict[str, dict[str, Any]] = {name: {} for name in (*SECTIONS, "blockwise")}
    for name, value in opts.items():
        section = OPTIONS[name].section
        if section in kwargs and value is not None:
            kwargs[section][name] = value
    kwargs["network"].update(network_args=NetworkArgs(**parsed["args"]), network_args_raw=tuple(parsed["raw"].items()),
                             blockwise=BlockwiseConfig(**kwargs["blockwise"]))
    kwargs["optimizer"].update(optimizer_args=optimizer_args, lr_scheduler_args=scheduler_args)
    kwargs["data"]["datasets"] = datasets
    sections = {name: cls(**kwargs[name]) for name, cls in SECTIONS.items()}
    notes.extend(algo_args.network_notes(sections["network"]))
    return TrainConfig(**sections, notes=tuple(notes), source=source)


def load_config(path: str | Path | None, dataset_config: str | Path | None = None,
                overrides: Sequence[str] = ()) -> TrainConfig:
    """Load a run TOML (sd-scripts names), an optional dataset TOML, and command-line overrides.

    Args:
        path: the run TOML, or None to build from overrides alone.
        dataset_config: a dataset TOML (wins over the run's `dataset_config` key), relative to the working dir.
        overrides: command-line tokens, e.g. ["--learning_rate", "1e-4", "--flip_aug", "--network_args", "conv_dim=4"].

    Raises:
        ConfigError: unknown option (with the closest name), bad value (naming the option), missing data.
        FileFormatError: a TOML that does not parse.
    """
    notes: list[str] = []
    raw, inline, source = {}, None, None
    if path is not None:
        source = Path(path).resolve()
        raw, inline = flatten_run_toml(read_toml(source), str(source))
    opts = convert_options(raw, base_dir=source.parent if source else None, notes=notes)
    opts.update(convert_options(dict(parse_overrides(overrides)), base_dir=Path.cwd(), notes=notes))
    if dataset_config is not None:
        opts["dataset_config"] = Path(dataset_config).resolve()
    dataset_doc, dataset_base, dataset_source = inline, source.parent if source else None, str(source)
    if opts.get("dataset_config") is not None:
        ds_path = Path(opts["dataset_config"]).resolve()
        dataset_doc, dataset_base, dataset_source = read_toml(ds_path), ds_path.parent, str(ds_path)
    return build_config(opts, dataset_doc=dataset_doc, dataset_base=dataset_base, notes=notes, source=source,
                        dataset_source=dataset_source)


def options_from_command_line(command: str) -> list[str]:
    """The option tokens of an sd-scripts command line (`accelerate launch ... train_network.py --a=1 ...`)."""
    import shlex

    tokens = shlex.split(command.replace("\\\n", " "))
    start = next((i + 1 for i, t in enumerate(tokens) if t.endswith(".py")), 0)
    return tokens[start:]


# ---------------------------------------------------------------------------------------------------- docs


def no_effect_table() -> str:
    """Markdown table of sd-scripts options accepted without effect, and why (for docs and --help)."""
    rows = [f"| `{name}` | {reason} |" for name, reason in sorted(NO_EFFECT.items())]
    return "\n".join(["| option | why it has no effect here |", "|---|---|", *rows])
