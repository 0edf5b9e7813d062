"""Schedulers: curves equal transformers' (which sd-scripts uses) at sample points, the restart floor, warmup."""
from __future__ import annotations

import io
import math

import pytest
import torch

from lib_lora.errors import ConfigError
from lib_lora.train.schedulers import (
    ScheduleSpec,
    build_scheduler,
    get_entry,
    multiplier,
    resolve_warmup,
    scheduler_names,
)

TOTAL, WARMUP = 100, 10
POINTS = [0, 1, 5, 9, 10, 11, 25, 33, 34, 50, 66, 67, 80, 99, 100, 101, 120]


def _optimizer(lr: float = 1e-3) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _curve(scheduler, steps) -> list[float]:
    """lr at each step index in `steps`, stepping the scheduler as a loop would."""
    out, current = {}, 0
    for target in sorted(steps):
        while current < target:
            scheduler.optimizer.step()
            scheduler.step()
            current += 1
        out[target] = scheduler.get_last_lr()[0]
    return [out[s] for s in steps]


@pytest.mark.parametrize(("name", "kwargs", "tf_kwargs"), [
    ("constant", {}, {}),
    ("constant_with_warmup", {}, {}),
    ("linear", {}, {}),
    ("cosine", {}, {}),
    ("cosine_with_restarts", {"num_cycles": 3}, {"num_cycles": 3}),
    ("polynomial", {"power": 2.0}, {"power": 2.0}),
    ("cosine_with_min_lr", {"num_cycles": 1, "min_lr_ratio": 0.3}, {"num_cycles": 0.5, "min_lr_rate": 0.3}),
])
def test_curves_match_transformers(name, kwargs, tf_kwargs):
    from transformers.optimization import get_scheduler

    warmup = 0 if name == "constant" else WARMUP
    ours = build_scheduler(_optimizer(), ScheduleSpec(name=name, total_steps=TOTAL, warmup_steps=warmup, **kwargs))
    theirs = get_scheduler(name, _optimizer(), num_warmup_steps=warmup, num_training_steps=TOTAL,
                           scheduler_specific_kwargs=tf_kwargs or None)
    assert _curve(ours, POINTS) == pytest.approx(_curve(theirs, POINTS), abs=1e-12)


def test_diffusers_agrees_on_restarts():
    from diffusers.optimization import get_scheduler

    theirs = get_scheduler("cosine_with_restarts", _optimizer(), num_warmup_steps=WARMUP, num_training_steps=TOTAL,
                           num_cycles=2)
    ours = build_scheduler(_optimizer(), ScheduleSpec(name="cosine_with_restarts", total_steps=TOTAL,
                                                      warmup_steps=WARMUP, num_cycles=2))
    assert _curve(ours, POINTS) == pytest.approx(_curve(theirs, POINTS), abs=1e-12)


def test_restart_floor_formula():
    spec = ScheduleSpec(name="cosine_with_restarts", total_steps=TOTAL, warmup_steps=WARMUP, num_cycles=3,
                        min_lr_ratio=0.5)
    for step in POINTS:
        if step < WARMUP:
            expected = step / WARMUP
        else:
            progress = (step - WARMUP) / (TOTAL - WARMUP)
            expected = 0.0 if progress >= 1 else 0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * ((3 * progress) % 1)))
        assert multiplier(spec, step) == pytest.approx(expected, abs=1e-12)
    after_warmup = [multiplier(spec, s) for s in range(WARMUP, TOTAL)]
    assert min(after_warmup) >= 0.5 and max(after_warmup) == 1.0
    assert multiplier(spec, WARMUP + 30) == 1.0  # each of the 3 cycles restarts at the full lr


@pytest.mark.parametrize("name", scheduler_names())
def test_every_registered_scheduler_runs_three_steps(name):
    opt = _optimizer()
    scheduler = build_scheduler(opt, ScheduleSpec(name=name, total_steps=10, warmup_steps=2))
    lrs = []
    for _ in range(3):
        opt.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    assert all(math.isfinite(lr) and lr >= 0 for lr in lrs)
    assert scheduler.multiplier(3) == multiplier(scheduler.spec, 3)


def test_warmup_as_ratio_and_names():
    assert resolve_warmup(0.1, 250) == 25 and resolve_warmup(7, 250) == 7
    with pytest.raises(ConfigError, match="ratio"):
        resolve_warmup(1.5, 10)
    assert get_entry("COSINE").name == "cosine"
    with pytest.raises(ConfigError, match="unknown scheduler; known: constant") as err:
        get_entry("cosine_restarts")
    assert err.value.field == "lr_scheduler"


def test_state_dict_resumes_and_is_weights_only_safe():
    spec = ScheduleSpec(name="cosine", total_steps=50, warmup_steps=5)
    first = build_scheduler(_optimizer(), spec)
    _curve(first, [17])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = build_scheduler(_optimizer(), spec)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    assert second.last_epoch == 17 and second.get_last_lr() == first.get_last_lr()
    first.optimizer.step()
    first.step()
    second.optimizer.step()
    second.step()
    assert second.get_last_lr() == first.get_last_lr()


def test_scale_cuts_the_lr_for_the_rest_of_the_run():
    scheduler = build_scheduler(_optimizer(1e-2), ScheduleSpec(name="linear", total_steps=10))
    _curve(scheduler, [2])
    scheduler.scale(0.5)
    assert scheduler.get_last_lr()[0] == pytest.approx(0.5 * 1e-2 * 0.8)
    scheduler.optimizer.step()
    scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(0.5 * 1e-2 * 0.7)


def test_polynomial_needs_lr_above_lr_end():
    with pytest.raises(ConfigError, match="learning rate > lr_end"):
        build_scheduler(_optimizer(1e-8), ScheduleSpec(name="polynomial", total_steps=10))


def test_torch_scheduler_classes_by_name_as_sd_scripts_lr_scheduler_type():
    import torch

    from lib_lora.errors import ConfigError
    from lib_lora.train.schedulers import ScheduleSpec, build_scheduler, check_torch_scheduler

    spec = ScheduleSpec(name="constant", total_steps=10, torch_class="CosineAnnealingLR",
                        torch_args=(("T_max", 10), ("eta_min", 0.0)))
    ours = build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5), spec)
    reference_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(reference_opt, T_max=10, eta_min=0.0)
    for _ in range(10):
        assert abs(ours.get_last_lr()[0] - reference.get_last_lr()[0]) < 1e-12
        ours.optimizer.step()
        reference_opt.step()
        ours.step()
        reference.step()
    ours.scale(0.5)  # the divergence guard's cut still works on a torch class
    assert abs(ours.get_last_lr()[0] - 0.5 * reference.get_last_lr()[0]) < 1e-12
    check_torch_scheduler("torch.optim.lr_scheduler.StepLR", (("step_size", 2),))
    for name, args, reason in (("os.system", (), "only classes of"), ("NoSuchLR", (), "not a scheduler class"),
                               ("ReduceLROnPlateau", (), "validation metric"),
                               ("StepLR", (("stepsize", 2),), "unexpected keyword")):
        with pytest.raises(ConfigError, match=reason):
            check_torch_scheduler(name, args)
