"""What the kohya_ss GUI writes into the run TOML it saves, read as the GUI meant it.

The GUI (bmaltais/kohya_ss, `lora_gui.py`) writes every field of its form into the TOML it hands to sd-scripts:
GUI-only keys that sd-scripts ignores (`epoch`, `noise_offset_type`), and, in older versions, fields the user
left alone as placeholders (`reg_data_dir = ""`, `resume = false`, `max_train_epochs = 0`, `lr_scheduler_args =
[]`). A user pointing us at that TOML expects what the GUI shows: a placeholder means "not set", and `epoch` is
the number of epochs the GUI trains for when no step or epoch budget is written beside it.
"""
from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Any

# The GUI's own list of numeric fields it writes as 0 when the user left them unset (`x if x != 0 else None` in
# lora_gui.py). `seed` and `unet_lr` are not here: 0 is a real value for sd-scripts (seed 0; no U-Net lr).
ZERO_MEANS_UNSET = frozenset({
    "adaptive_noise_scale", "clip_skip", "ip_noise_gamma", "max_timestep", "max_train_epochs", "max_train_steps",
    "min_snr_gamma", "min_timestep", "multires_noise_iterations", "noise_offset", "sample_every_n_epochs",
    "sample_every_n_steps", "save_every_n_epochs", "save_every_n_steps", "save_last_n_epochs",
    "save_last_n_epochs_state", "save_last_n_steps", "save_last_n_steps_state", "stop_text_encoder_training",
    "v_pred_like_loss", "vae_batch_size", "max_token_length", "scale_weight_norms",
})

# GUI-only keys: name -> what it means (shown in --help and the docs).
GUI_ONLY: dict[str, str] = {
    "epoch": "the GUI's epoch count: trains that many epochs when neither max_train_steps nor max_train_epochs is "
             "given (the GUI turns it into max_train_steps itself); otherwise those win",
    "noise_offset_type": "the GUI's choice between 'Original' (noise_offset) and 'Multires' (multires_noise_*); "
                         "the GUI writes only the chosen options, and those are what apply",
}
NOISE_OFFSET_TYPES = ("Original", "Multires")

# The GUI's "no caption files" choice: sd-scripts finds no such files and uses the folder's class token.
NO_CAPTION_EXTENSION = ".none-use-foldername"


def is_placeholder(name: str, value: Any, hint: Any) -> bool:
    """True when `value` is how the GUI writes "not set" for option `name` of declared type `hint`."""
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, (list, tuple, Mapping)):
        return len(value) == 0
    if isinstance(value, bool):
        return value is False and not _is_bool(hint)
    if isinstance(value, (int, float)):
        return value == 0 and name in ZERO_MEANS_UNSET
    return False


def _is_bool(hint: Any) -> bool:
    return hint is bool or bool in typing.get_args(hint)


def apply_epoch(opts: dict[str, Any], notes: list[str]) -> None:
    """Turn the GUI's `epoch` into `max_train_epochs` when no budget is given; otherwise only note it."""
    epoch = opts.pop("epoch", None)
    if epoch is None:
        return
    if opts.get("max_train_steps") is None and opts.get("max_train_epochs") is None:
        opts["max_train_epochs"] = epoch
        notes.append(f"epoch = {epoch} (kohya_ss GUI): training {epoch} epochs (max_train_epochs)")
    else:
        given = "max_train_epochs" if opts.get("max_train_epochs") is not None else "max_train_steps"
        notes.append(f"epoch = {epoch} (kohya_ss GUI): {given} = {opts[given]} is given and wins, as in the GUI")


def check_noise_offset_type(opts: dict[str, Any], notes: list[str]) -> None:
    """The GUI's noise type: informational, but an option of the other type beside it is worth a note."""
    kind = opts.pop("noise_offset_type", None)
    if kind is None:
        return
    from lib_lora.train.coerce import check_choice

    check_choice("noise_offset_type", kind, NOISE_OFFSET_TYPES)
    other = ("multires_noise_iterations",) if kind == "Original" else ("noise_offset", "adaptive_noise_scale")
    both = [k for k in other if opts.get(k)]
    if both:
        notes.append(f"noise_offset_type = {kind!r} (kohya_ss GUI) but {', '.join(both)} is also set: both apply, "
                     "as in sd-scripts")
