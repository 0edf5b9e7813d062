"""Writing LoRA outputs: module tensors in kohya's layout, and metadata that says what the file now is.

Metadata kept from the (first) input, then updated: `ss_network_module/dim/alpha/args` describe the new
tensors (sd-scripts' "Dynamic" where ranks or alphas differ per module), `ss_training_comment` is prefixed with
what the operation did (as sd-scripts' resize does), `modelspec.*` keeps the source's fields with `merged_from`
for merges, `lora_studio.operation` records the operation, its parameters and the inputs with their hashes,
and `sshs_model_hash`/`sshs_legacy_hash` are computed for the tensors written.
"""
from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lib_lora import __version__
from lib_lora.io import addnet_hash, model_hash, precalculate_hashes, save_file

OPERATION_KEY = "lora_studio.operation"
RANKS_KEY = "lora_studio.ranks"  # {module: [rank, Frobenius fraction of ΔW kept]}
# what a merged file keeps of its first input's metadata: facts of the base model, not of one training run
MERGE_KEEPS = ("ss_v2", "ss_base_model_version", "ss_sd_model_name", "ss_new_sd_model_hash", "ss_sd_model_hash",
               "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation",
               "modelspec.resolution", "modelspec.prediction_type")


@dataclass(frozen=True)
class Source:
    """An input file as the metadata records it: its name and a hash (a LoRA's sshs_model_hash, the data's
    sha256; a checkpoint's old A1111 model hash, which reads 64 KiB instead of gigabytes)."""

    path: str
    hash: str
    hash_kind: str = "sshs_model_hash"

    @classmethod
    def of(cls, path: str | os.PathLike) -> Source:
        return cls(str(path), addnet_hash(path))

    @classmethod
    def model(cls, path: str | os.PathLike) -> Source:
        return cls(str(path), model_hash(path), "model_hash")

    def as_dict(self) -> dict[str, str]:
        return {"name": Path(self.path).name, self.hash_kind: self.hash}


def lora_tensors(name: str, up: Tensor, down: Tensor, alpha: float, shape: Sequence[int],
                 dtype: torch.dtype) -> dict[str, Tensor]:
    """kohya tensors of one LoRA module for a weight of `shape` (convs: down [r, in, kh, kw], up [out, r, 1, 1])."""
    rank = down.shape[0]
    if len(shape) == 4:
        down = down.reshape(rank, *shape[1:])
        up = up.reshape(shape[0], rank, 1, 1)
    else:
        down, up = down.reshape(rank, -1), up.reshape(shape[0], rank)
    return {f"{name}.lora_down.weight": down.to("cpu", dtype).contiguous(),
            f"{name}.lora_up.weight": up.to("cpu", dtype).contiguous(),
            f"{name}.alpha": torch.tensor(float(alpha), dtype=dtype)}


def _uniform(values: Sequence[float], fmt) -> str:
    distinct = set(values)
    return fmt(next(iter(distinct))) if len(distinct) == 1 else "Dynamic"


def network_facts(ranks: Mapping[str, int], alphas: Mapping[str, float],
                  spatial: Mapping[str, bool]) -> dict[str, str]:
    """ss_network_* for plain LoRA modules with these ranks/alphas (k x k convs reported as conv_dim/alpha)."""
    lin = [n for n in ranks if not spatial.get(n)]
    conv = [n for n in ranks if spatial.get(n)]
    meta = {"ss_network_module": "networks.lora"}
    main = lin or conv
    meta["ss_network_dim"] = _uniform([ranks[n] for n in main], str) if main else "0"
    meta["ss_network_alpha"] = _uniform([alphas[n] for n in main], lambda a: f"{a:g}") if main else "0"
    args = {}
    if lin and conv:
        args = {"conv_dim": _uniform([ranks[n] for n in conv], str),
                "conv_alpha": _uniform([alphas[n] for n in conv], lambda a: f"{a:g}")}
    meta["ss_network_args"] = json.dumps(args)
    return meta


def build_metadata(base: Mapping[str, str], *, operation: str, comment: str, params: Mapping[str, object],
                   sources: Sequence[Source], network: Mapping[str, str], extra: Mapping[str, str] | None = None,
                   merged: bool = False) -> dict[str, str]:
    """The metadata of an output (see the module docstring); hashes are added by `save_lora`."""
    if merged:
        base = {k: v for k, v in base.items() if k in MERGE_KEEPS}
    meta = {k: v for k, v in base.items() if not k.startswith("sshs_") and k not in (OPERATION_KEY, RANKS_KEY)}
    meta.update(network)
    previous = base.get("ss_training_comment", "")
    meta["ss_training_comment"] = f"{comment}; {previous}" if previous else comment
    record = {"operation": operation, "params": params, "sources": [s.as_dict() for s in sources],
              "tool": f"lora-studio/{__version__}",
              "date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()}
    meta[OPERATION_KEY] = json.dumps(record, ensure_ascii=False, default=str)
    meta["modelspec.implementation_version"] = f"lora-studio/{__version__}"
    if merged:
        meta["modelspec.merged_from"] = ", ".join(Path(s.path).stem for s in sources)
    meta.update(extra or {})
    return meta


def rank_figures(results: Mapping[str, object]) -> str:
    """RANKS_KEY's value from records with `rank` and `fro_kept` (null where ΔW is zero or the figure unknown)."""
    return json.dumps({n: [r.rank, None if math.isnan(r.fro_kept) else round(r.fro_kept, 6)]
                       for n, r in sorted(results.items())}, separators=(",", ":"))


def save_lora(tensors: dict[str, Tensor], metadata: dict[str, str], path: str | os.PathLike) -> dict[str, str]:
    """Hash (sd-scripts' way) and write atomically; returns the metadata written."""
    meta = dict(metadata)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = precalculate_hashes(tensors, meta)
    save_file(tensors, path, meta)
    return meta
