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
