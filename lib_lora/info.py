"""What a LoRA-family file holds: algorithms, rank/alpha, architecture, module counts, block ids,
metadata summary, hashes and unused keys (the `info` command and the metadata viewer)."""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field

from lib_lora import blocks
from lib_lora.io import addnet_hash, load_state_dict, short_hash
from lib_lora.networks import LoadedNetwork, load_network
from lib_lora.networks.norm import NormModule
from lib_lora.networks.oft import OFTModule
from lib_lora.types import Arch

TAG_FREQUENCY_TOP = 10


@dataclass
class NetworkInfo:
    path: str
    name: str
    algorithm: str
    algorithms: list[str]
    rank: int | dict[str, int] | None
    alpha: float | dict[str, float] | None
    arch: str
    arch_reason: str
    modules: dict[str, int]
    blocks: list[str]
    metadata: dict[str, str]
    trigger_words: list[str]
    tag_frequency: dict[str, dict[str, int]]
    sshs_model_hash: str | None
    computed_hash: str | None
    short_hash: str | None
    unmatched_keys: list[str] = field(default_factory=list)
    # OFT only (rank is then its number of blocks, alpha its constraint): rows per block, and the constraint
    block_size: int | dict[str, int] | None = None
    constraint: float | dict[str, float] | None = None
    # modules that change normalization layers (LyCORIS train_norm: `w_norm`/`b_norm`), counted in `modules` too;
    # they ride along the network's algorithm, which `algorithm` names
    norm_layers: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)


def _span(values: list[float], as_int: bool):
    if not values:
        return None
    lo, hi = min(values), max(values)
    cast = int if as_int else float
    return cast(lo) if lo == hi else {"min": cast(lo), "max": cast(hi)}


def tag_summary(metadata: dict[str, str], top: int = TAG_FREQUENCY_TOP) -> tuple[list[str], dict[str, dict[str, int]]]:
    """(most frequent tags over all folders, top tags per folder) from `ss_tag_frequency`."""
    raw = metadata.get("ss_tag_frequency")
    if not raw:
        return [], {}
    try:
        table = json.loads(raw)
    except json.JSONDecodeError:
        return [], {}
    if not isinstance(table, dict):
        return [], {}
    total: Counter = Counter()
    per_dir = {}
    for folder, tags in table.items():
        if not isinstance(tags, dict):
            continue
        counts = Counter({str(k).strip(): int(v) for k, v in tags.items() if isinstance(v, (int, float))})
        total.update(counts)
        per_dir[str(folder)] = dict(counts.most_common(top))
    return [t for t, _ in total.most_common(top)], per_dir


def describe(path: str | os.PathLike, network: LoadedNetwork | None = None) -> NetworkInfo:
    """Read a LoRA-family file and summarise it (see NetworkInfo)."""
    path = str(path)
    loaded = load_state_dict(path)
    net = network or load_network(loaded)
    arch = net.arch
    ranks = [float(m.rank) for m in net.modules.values() if m.rank]
    alphas = [float(m.alpha) for m in net.modules.values() if m.alpha is not None and m.alpha_is_scale]
    oft = [m for m in net.modules.values() if isinstance(m, OFTModule)]
    ids = {blocks.block_of(name, arch) for name in net.modules}
    order = blocks.arch_block_ids(arch) if arch is Arch.SDXL else blocks.BLOCK_IDS_26
    algos = net.algorithms()
    main = [a for a in algos if a != "norm"] or algos
    trigger, per_dir = tag_summary(net.metadata)
    shown = {k: v for k, v in net.metadata.items() if k != "ss_tag_frequency"}
    stored = net.metadata.get("sshs_model_hash")
    computed = addnet_hash(path) if path.lower().endswith(".safetensors") else None
    return NetworkInfo(
        path=path,
        name=net.metadata.get("ss_output_name") or net.name,
        algorithm=main[0] if len(main) == 1 else "mixed",
        algorithms=algos,
        rank=_span(ranks, True),
        alpha=_span(alphas, False),
        arch=arch.value,
        arch_reason=net.arch_reason,
        modules={c.value: n for c, n in sorted(net.components().items(), key=lambda kv: kv[0].value)},
        blocks=[b for b in order if b in ids],
        metadata=shown,
        trigger_words=trigger,
        tag_frequency=per_dir,
        sshs_model_hash=stored,
        computed_hash=computed,
        short_hash=short_hash(computed or stored) if (computed or stored) else None,
        unmatched_keys=net.unmatched_keys,
        block_size=_span([float(m.block_size) for m in oft], True),
        constraint=_span([m.constraint for m in oft], False),
        norm_layers=sum(isinstance(m, NormModule) for m in net.modules.values()),
    )


def format_span(value) -> str:
    """A rank/alpha figure of `NetworkInfo`: one number, '-' or 'min..max (mixed)'."""
    if value is None:
        return "-"
    if isinstance(value, dict):
        return f"{value['min']:g}..{value['max']:g} (mixed)"
    return f"{value:g}"


def format_text(info: NetworkInfo) -> str:
    """Human-readable report for the terminal."""
    lines = [
        f"file:        {info.path}",
        f"name:        {info.name}",
        f"algorithm:   {', '.join(info.algorithms)}",
        f"rank:        {format_span(info.rank)}" + (" (OFT: number of blocks)" if info.block_size is not None else ""),
        f"alpha:       {format_span(info.alpha)}",
        *([f"block size:  {format_span(info.block_size)}",
           f"constraint:  {format_span(info.constraint)}" + (" (none)" if info.constraint == 0 else "")]
          if info.block_size is not None else []),
        f"arch:        {info.arch} ({info.arch_reason})",
        "modules:     " + ", ".join(f"{k} {v}" for k, v in info.modules.items())
        + (f" (of which {info.norm_layers} normalization layers: w_norm, b_norm)" if info.norm_layers else ""),
        f"blocks:      {' '.join(info.blocks)}",
        f"hash:        {info.computed_hash or '-'} (short {info.short_hash or '-'})",
    ]
    if info.sshs_model_hash and info.sshs_model_hash != info.computed_hash:
        lines.append(f"stored hash: {info.sshs_model_hash}")
    if info.trigger_words:
        lines.append(f"top tags:    {', '.join(info.trigger_words)}")
    keep = ("ss_output_name", "ss_base_model_version", "ss_sd_model_name", "ss_network_module", "ss_network_dim",
            "ss_network_alpha", "ss_network_args", "ss_learning_rate", "ss_lr_scheduler", "ss_optimizer",
            "ss_num_train_images", "ss_num_epochs", "ss_steps", "ss_resolution", "ss_clip_skip",
            "ss_training_comment", "modelspec.architecture", "modelspec.title")
    meta = [(k, info.metadata[k]) for k in keep if k in info.metadata]
    if meta:
        lines.append("metadata:")
        lines += [f"  {k}: {v}" for k, v in meta]
        extra = len(info.metadata) - len(meta)
        if extra > 0:
            lines.append(f"  ... {extra} more keys (--json shows all)")
    if info.unmatched_keys:
        lines.append(f"unused keys ({len(info.unmatched_keys)}): {', '.join(info.unmatched_keys[:10])}"
                     + (" ..." if len(info.unmatched_keys) > 10 else ""))
    return "\n".join(lines)
