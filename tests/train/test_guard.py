"""The divergence guard's judgement on loss sequences (no model): baseline, patience, snapshots, rollbacks."""
from __future__ import annotations

import torch

from lib_lora.train.config import GuardConfig
from lib_lora.train.guard import DivergenceGuard


def _guard(**kw) -> DivergenceGuard:
    g = DivergenceGuard(GuardConfig(**{"guard_patience": 3, "guard_max_rollbacks": 1, **kw}))
    g.take(0, {"w": torch.zeros(1)}, {}, trusted=True)
    return g


def _run(g: DivergenceGuard, losses) -> list[str]:
    return [g.check(step, loss).action for step, loss in enumerate(losses, start=1)]


def test_a_blow_up_at_the_third_step_is_judged_against_the_first_two():
    # lr 1e-1 on the embedded model: 0.15, 0.18, then ~1.2 for good; the blow-up must not become the baseline
    actions = _run(_guard(), [0.15, 0.18, 0.78, 1.27, 1.26, 1.85])
    assert actions[:4] == ["ok"] * 4 and actions[4] == "rollback"
    g = _guard()
    _run(g, [0.15, 0.18, 0.78, 1.27, 1.26])
    assert g.rollbacks == 1 and "rollback 1" in g.report() and "back to step 0" in g.report()


def test_noise_below_patience_is_not_divergence_and_nan_is_at_once():
    g = _guard()
    assert set(_run(g, [0.1, 0.3, 0.05, 0.5, 0.1, 0.9, 0.08, 0.6, 0.6, 0.1])) == {"ok"}
    assert g.check(11, float("nan")).action == "rollback"
    assert g.check(12, float("inf")).action == "stop"  # rollbacks exhausted
    assert "stop" in g.report()


def test_the_baseline_is_not_relearned_from_a_diverged_stretch():
    # lr 10 on the embedded model: a healthy first loss, a blow-up at once, NaN, and after the lr is lowered the
    # loss settles at a broken ~1.1. The baseline stays the healthy one, so that level counts as divergence and,
    # rollbacks exhausted, the run stops with the last good state.
    g = _guard(guard_max_rollbacks=2)
    assert _run(g, [0.15, 1.1, float("nan")]) == ["ok", "ok", "rollback"]
    g.after_rollback()
    # the loss of step 1 was computed on the snapshot's weights: kept; step 2's, on diverging ones: forgotten
    assert [loss for _, loss in g.recent] == [0.15] and g.baseline == 0.15
    later = [g.check(step, 1.1).action for step in range(4, 10)]
    assert later[:2] == ["ok", "ok"] and later[2] == "rollback"
    g.after_rollback()
    assert g.baseline == 0.15
    assert [g.check(step, 1.1).action for step in range(10, 13)] == ["ok", "ok", "stop"]
    assert "stop" in g.report()


def test_rollback_keeps_the_good_losses_before_the_snapshot():
    g = _guard(guard_snapshot_every_n_steps=4)
    losses = [0.2, 0.1, 0.15, 0.12, 0.18, 0.11, 0.14]
    for step, loss in enumerate(losses, start=1):
        assert g.check(step, loss).action == "ok"
        if g.wants_snapshot(step):
            g.take(step, {"w": torch.zeros(1)}, {})
    assert g.snapshot is not None and g.snapshot.step == 4  # taken at 4, confirmed after 3 good steps
    assert g.check(8, float("nan")).action == "rollback"
    g.after_rollback()
    assert [step for step, _ in g.recent] == [1, 2, 3, 4, 5]
