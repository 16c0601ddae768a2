"""The q diagnostic against the oracle's G_0 and G_r and the two rules' formulas."""
import pytest

import torch_ufom
from helpers import mlp_problem
from oracle import brute_force, q_authors_rule, q_ufom_rule


def test_diagnose_measures_A_and_D_and_applies_both_rules():
    model, loss, data = mlp_problem(2)
    tasks = [(data[i], data[10 + i]) for i in range(3)]
    steps, lr = 4, 0.01
    d = torch_ufom.diagnose(model, loss, loss, tasks, steps=steps, inner_lr=lr, memory="recompute")
    params = list(model.parameters())
    A = D = 0.0
    for s, q in tasks:
        g0 = brute_force(model, loss, loss, lambda j, s=s: s, q, steps, lr, params, 0)
        gr = brute_force(model, loss, loss, lambda j, s=s: s, q, steps, lr, params, steps)
        A += float(sum((g ** 2).sum() for g in gr)) / 3
        D += float(sum(((a - b) ** 2).sum() for a, b in zip(gr, g0))) / 3
    assert d.A == pytest.approx(A, rel=1e-9) and d.D == pytest.approx(D, rel=1e-9)
    assert 0 < d.D < d.A and d.tasks == 3
    # Recomputation replays K (K - 1) / 2 steps: r + r(r-1)/2 + 2r - r units per exact task.
    assert d.steps_fom == steps + 1 and d.steps_exact == steps * (steps - 1) / 2 + 2 * steps
    # (the rules written out in the oracle, not the library's: review s32F F6)
    assert d.q_ufom == pytest.approx(q_ufom_rule(d.A, d.D, d.seconds_fom, max(d.seconds_exact - d.seconds_fom,
                                                                              1e-12 * d.seconds_fom), 0.01),
                                     rel=1e-12)
    c_f, c_x = steps + 1, steps * (steps + 1) / 2
    assert d.q_authors == pytest.approx(q_authors_rule(d.A, d.D / 10, c_f, c_x, 0.05), rel=1e-12)
    assert all(p.grad is None for p in model.parameters())


def test_diagnose_rejects_bad_tasks():
    model, loss, data = mlp_problem(2)
    with pytest.raises(ValueError, match="tasks"):
        torch_ufom.diagnose(model, loss, loss, [], steps=2, inner_lr=0.1)
    with pytest.raises(ValueError, match="tasks"):
        torch_ufom.diagnose(model, loss, loss, [(data[0][0], data[0][1], data[1])], steps=2,
                            inner_lr=0.1)
