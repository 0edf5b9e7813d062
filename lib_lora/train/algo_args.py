"""`network_args` that act on some algorithms only: what each means, which algorithms it acts on, LyCORIS' aliases.

The kohya_ss GUI writes the LyCORIS arguments of the chosen algorithm at their defaults (`bypass_mode=False`,
`use_cp=False`, `use_scalar=False`, `rank_dropout_scale=False`, `constraint=0.0`, `rescaled=False`,
`train_on_input=False`, `block_size=...`, `train_norm=False`): a default means "not set" and is accepted for every
algorithm. A value that changes something is accepted for the algorithms it acts on and refused, naming them, for
the others (LyCORIS would ignore it silently: a user who set it expects it to act).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lib_lora.errors import ConfigError

# LyCORIS' older spellings -> the field they set (LyCORIS `deprecated_arg_dict`)
ALIASES = {"use_cp": "use_tucker", "use_conv_cp": "use_tucker", "constrain": "constraint"}

_LORA_TYPES = ("lora", "locon", "dylora", "lora_fa")
_LYCORIS_DELTAS = ("lora", "locon", "loha", "lokr")
# every algorithm lycoris.kohya trains here (LyCORIS adds its norm modules beside any of them)
_LYCORIS_ALGOS = ("lora", "locon", "loha", "lokr", "ia3", "dylora", "full", "diag-oft")


@dataclass(frozen=True)
class AlgoArg:
    """One algorithm-specific network argument."""

    algorithms: tuple[str, ...]  # the trained algorithms (`NetworkConfig.algo`) it acts on; () = none yet
    meaning: str


ALGO_ARGS: dict[str, AlgoArg] = {
    "constraint": AlgoArg(("diag-oft",), "COFT: the rotation's skew part is bounded, ‖Q‖ <= constraint x output "
                                         "size (0 = unconstrained); stored as the file's alpha"),
    "rescaled": AlgoArg(("diag-oft",), "rescaled OFT: a learned factor per output row (`rescale`)"),
    "train_on_input": AlgoArg(("ia3",), "IA3 scales the weight's input columns instead of its output rows"),
    "factor": AlgoArg(("lokr",), "LoKr: the size of the first Kronecker factor (-1 = most balanced)"),
    "decompose_both": AlgoArg(("lokr",), "LoKr: the first Kronecker factor is low rank too when the rank is small"),
    "use_tucker": AlgoArg(("locon", "loha", "lokr"), "Tucker decomposition of k x k convolutions (LyCORIS' use_cp "
                                                      "/ use_conv_cp)"),
    "dora_wd": AlgoArg(_LYCORIS_DELTAS, "DoRA: the merged weight's norms are trained separately from its direction"),
    "wd_on_output": AlgoArg(_LYCORIS_DELTAS, "DoRA: one norm per output row (true) or per input column (false)"),
    "unit": AlgoArg(("dylora",), "DyLoRA: ranks trained together per step"),
    "block_size": AlgoArg(("dylora",), "LyCORIS' name of DyLoRA's unit"),
    "rank_dropout_scale": AlgoArg(_LORA_TYPES, "LyCORIS rank dropout: rescale the kept ranks by 1 / their share "
                                               "(without it LyCORIS keeps them as they are)"),
    "use_scalar": AlgoArg((), "a trained scalar in front of ΔW (LyCORIS use_scalar) is not implemented"),
    "train_norm": AlgoArg(_LYCORIS_ALGOS, "LyCORIS: the GroupNorm/LayerNorm layers inside the trained blocks get a "
                                          "learned change of their weight and bias too (`w_norm`, `b_norm`)"),
}


# algorithms whose training applies dropout: LoRA types (sd-scripts and LyCORIS); IA3 has none in LyCORIS either
_DROPOUT = (*_LORA_TYPES, "ia3")


def check_algorithm_args(network: Any) -> None:
    """Refuse a non-default algorithm-specific argument that the trained algorithm (`network`, a NetworkConfig)
    would not use.

    Raises:
        ConfigError: naming `network_args.<name>` (or the dropout option), the value, and the algorithms it acts on.
    """
    algo, network_module, args = network.algo, network.network_module, network.network_args
    dropout = {"network_dropout": network.network_dropout, "network_args.dropout": args.dropout,
               "network_args.rank_dropout": args.rank_dropout}
    for name, value in dropout.items():
        if value and algo not in _DROPOUT:
            raise ConfigError(name, value, f"neuron/rank dropout is implemented for LoRA-type networks, not {algo}")
    defaults = {f.name: f.default for f in dataclasses.fields(args)}
    for name, spec in ALGO_ARGS.items():
        value = getattr(args, name)
        if value == defaults[name] or (name == "wd_on_output" and not args.dora_wd):
            continue
        if not spec.algorithms:
            raise ConfigError(f"network_args.{name}", value, f"{spec.meaning}; set it to {defaults[name]}")
        if algo not in spec.algorithms:
            raise ConfigError(f"network_args.{name}", value, f"acts on algo {', '.join(spec.algorithms)}, not on "
                                                             f"{algo} ({spec.meaning})")
    if args.rank_dropout_scale and network_module != "lycoris.kohya":
        raise ConfigError("network_args.rank_dropout_scale", True, "is a lycoris.kohya option (sd-scripts' rank "
                                                                   "dropout always rescales by 1 / (1 - rate))")
    if args.train_norm:
        _check_train_norm(network)


# LyCORIS presets whose target modules hold no normalization layer (attn-only targets the attention modules)
_PRESETS_WITHOUT_NORMS = ("attn-only",)


def _check_train_norm(network: Any) -> None:
    if network.network_module != "lycoris.kohya":
        raise ConfigError("network_args.train_norm", True, f"is a lycoris.kohya option ({network.network_module} "
                                                           "trains no normalization layers); set network_module = "
                                                           "'lycoris.kohya' or drop train_norm")
    preset = network.network_args.preset or "full"
    if preset in _PRESETS_WITHOUT_NORMS or network.network_train_text_encoder_only:
        where = "the text encoder's attention and MLP layers" if network.network_train_text_encoder_only else \
            f"preset {preset}"
        raise ConfigError("network_args.train_norm", True, f"{where} hold no normalization layer to train "
                                                           "(LyCORIS trains the norms inside the U-Net's transformer "
                                                           "and ResNet blocks); set train_norm = False")


def network_notes(network: Any) -> list[str]:
    """Notes for the start-of-run report: network options that the trained algorithm accepts without effect."""
    algo, notes = network.algo, []
    if network.scale_weight_norms is not None and algo in ("ia3", "full"):
        notes.append(f"scale_weight_norms: no effect for {algo} (LyCORIS bounds no norm for it)")
    dropouts = [n for n, v in (("network_dropout", network.network_dropout), ("dropout", network.network_args.dropout),
                               ("rank_dropout", network.network_args.rank_dropout)) if v]
    if algo == "ia3" and dropouts:
        notes.append(f"{', '.join(dropouts)}: no effect for ia3 (LyCORIS' IA3 applies no dropout)")
    if algo == "diag-oft":
        notes.append(f"network_alpha = {network.network_alpha:g}: no effect for diag-oft (OFT has no scale; the "
                     f"file's alpha holds the constraint, here {network.network_args.constraint:g})")
    elif algo == "ia3":
        notes.append("network_dim / network_alpha: no effect for ia3 (one factor per channel, no scale)")
    if network.network_args.train_norm:
        notes.extend(_norm_notes(network))
    return notes


def _norm_notes(network: Any) -> list[str]:
    """What acts on the normalization layers' modules (train_norm) and what does not."""
    notes = []
    if network.network_args.rank_dropout:
        notes.append("rank_dropout: no effect on the normalization layers' modules (train_norm; they have no ranks)")
    if network.scale_weight_norms is not None:
        notes.append("scale_weight_norms: the normalization layers' modules (train_norm) are not bounded (LyCORIS "
                     "bounds none)")
    return notes
