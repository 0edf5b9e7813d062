"""Optimizer registry: every entry trains 3 steps on CPU; sd-scripts' defaults, names and errors."""
from __future__ import annotations

import sys

import pytest
import torch

from lib_lora.errors import ConfigError
from lib_lora.train import optimizers
from lib_lora.train.optimizers import OPTIMIZERS, build_optimizer, get_entry, optimizer_names
from lib_lora.train.schedulers import ScheduleSpec, build_scheduler

# lr per optimizer for a quick, stable descent on the toy problem (adaptive ones take ~1.0, as users set them)
LR = {"AdamW": 1e-2, "AdamW8bit": 1e-2, "Lion8bit": 3e-3, "Lion": 3e-3, "SGDNesterov": 1e-2, "Adafactor": 1e-2,
      "Prodigy": 1.0, "DAdaptAdam": 1.0, "AdamWScheduleFree": 1e-2}


def _problem(seed: int = 0) -> tuple[list[dict], torch.nn.Linear, torch.nn.Linear]:
    """Two parameter groups (as TE and U-Net) fitting a fixed linear map; 64x64 so bitsandbytes' 8-bit path runs."""
    torch.manual_seed(seed)
    te, unet = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
    return [{"params": list(te.parameters()), "lr": 1.0}, {"params": list(unet.parameters()), "lr": 1.0}], te, unet


def _loss(te: torch.nn.Linear, unet: torch.nn.Linear) -> torch.Tensor:
    x = torch.linspace(-1, 1, 8 * 64).reshape(8, 64)
    return ((unet(te(x)) - x.flip(-1)) ** 2).mean()


@pytest.mark.parametrize("name", optimizer_names())
def test_every_registered_optimizer_runs_three_steps(name):
    groups, te, unet = _problem()
    lr = LR[name]
    for g in groups:
        g["lr"] = lr
    built = build_optimizer(name, groups, lr, {})
    spec = ScheduleSpec(name=built.scheduler_override or "constant", total_steps=3)
    scheduler = build_scheduler(built.optimizer, spec)
    before = [p.detach().clone() for p in unet.parameters()]
    start = _loss(te, unet).item()
    for _ in range(3):
        built.train_mode()
        built.optimizer.zero_grad()
        _loss(te, unet).backward()
        built.optimizer.step()
        scheduler.step()
    built.eval_mode()
    assert all(torch.isfinite(p).all() for p in unet.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, unet.parameters()))
    assert _loss(te, unet).item() < start
    assert all(lr is not None and lr > 0 for lr in scheduler.get_last_lr())


def test_names_are_case_insensitive_and_unknown_lists_known():
    assert get_entry("adamw8BIT").name == "AdamW8bit" and get_entry("").name == "AdamW"
    with pytest.raises(ConfigError, match="unknown optimizer; known: AdamW, AdamW8bit, Lion8bit, Lion") as err:
        get_entry("Adam9")
    assert err.value.field == "optimizer_type"
    assert set(optimizer_names()) == {e.name for e in OPTIMIZERS.values()}


def test_ss_optimizer_strings_and_sd_scripts_defaults():
    groups, _, _ = _problem()
    built = build_optimizer("AdamW8bit", groups, 1e-4, {"weight_decay": 0.1})
    assert built.ss_optimizer == "bitsandbytes.optim.adamw.AdamW8bit(weight_decay=0.1)"
    sgd = build_optimizer("sgdnesterov", _problem()[0], 1e-2, {})
    assert sgd.kwargs == {"momentum": 0.9} and sgd.optimizer.param_groups[0]["nesterov"] is True
    assert sgd.ss_optimizer == "torch.optim.sgd.SGD(momentum=0.9)"
    assert build_optimizer("AdamW", _problem()[0], 1e-3).ss_optimizer == "torch.optim.adamw.AdamW"


def test_adafactor_relative_step_uses_its_own_lr():
    groups, te, unet = _problem()
    groups[0]["lr"], groups[1]["lr"] = 1e-4, 1e-3
    built = build_optimizer("Adafactor", groups, 1e-3, {})
    assert built.scheduler_override == "adafactor" and built.kwargs["relative_step"] is True
    assert any("ignored" in n for n in built.notes)
    assert all(g["lr"] is None for g in built.optimizer.param_groups)
    with pytest.raises(ConfigError, match="lr_scheduler = 'adafactor'"):
        build_scheduler(built.optimizer, ScheduleSpec(name="cosine", total_steps=10))
    scheduler = build_scheduler(built.optimizer, ScheduleSpec(name="adafactor", total_steps=10))
    _loss(te, unet).backward()
    built.optimizer.step()
    scheduler.step()
    lrs = scheduler.get_last_lr()
    assert len(lrs) == 2 and all(0 < lr < 1 for lr in lrs)  # the relative-step lr Adafactor computed
    fixed = build_optimizer("Adafactor", _problem()[0], 1e-3, {"relative_step": False, "scale_parameter": False})
    assert fixed.scheduler_override is None and fixed.optimizer.param_groups[0]["lr"] == 1.0


def test_schedule_free_switches_modes():
    groups, _, unet = _problem()
    built = build_optimizer("AdamWScheduleFree", groups, 1e-2, {"warmup_steps": 2})
    assert built.entry.schedule_free and built.optimizer.param_groups[0]["train_mode"] is True
    built.eval_mode()
    assert built.optimizer.param_groups[0]["train_mode"] is False
    built.train_mode()
    assert built.optimizer.param_groups[0]["train_mode"] is True


def test_bad_args_missing_package_and_cpu_refusal(monkeypatch):
    with pytest.raises(ConfigError, match="AdamW.*refused them.*it accepts: .*weight_decay") as err:
        build_optimizer("AdamW", _problem()[0], 1e-3, {"weight_decya": 0.1})
    assert err.value.field == "optimizer_args"
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)  # as if not installed
    with pytest.raises(ConfigError, match="needs the Python package 'lion-pytorch'"):
        build_optimizer("Lion", _problem()[0], 1e-4)
    monkeypatch.setattr(optimizers, "_bitsandbytes_cpu_error", lambda module, name: "RuntimeError: no CPU kernels")
    with pytest.raises(ConfigError, match="cannot run its 8-bit optimizers on CPU.*pick AdamW"):
        build_optimizer("Lion8bit", _problem()[0], 1e-4)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer("AdamW", [{"params": []}], 1e-4)


def test_adaptive_optimizers_note_low_lr():
    groups = _problem()[0]
    for g in groups:
        g.pop("lr")  # groups without an lr take the base lr
    built = build_optimizer("Prodigy", groups, 1e-4)
    assert any("around 1.0" in n for n in built.notes)
    assert not build_optimizer("Prodigy", _problem()[0], 1.0).notes
