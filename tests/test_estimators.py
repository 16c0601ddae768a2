"""The estimator's plan of a sweep (``estimators._plan_sweep``): what it decides for a few
rules, truncation points and memory schedules, and that the sweep then runs that plan."""
from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import torch_ufom
from torch_ufom import estimators, records, schedules, unroll
from torch_ufom.inner import SGD, Adam
from torch_ufom.truncation import telescope_weights
from torch_ufom.protocols import SweepPlan
from helpers import mse

STEPS = 4
EXACT = [1.0] * (STEPS + 1) + [0.0]  # P(K >= m), m = 0..steps+1: the exact law (K = steps)
HALF = [1.0] + [0.5] * STEPS + [0.0]  # ufom with q = 0.5: K = 0 or K = steps
DECAYING = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]  # a law with K anywhere in 0..steps


@pytest.mark.parametrize("rule, learned, survival, K, memory, diagnostics, expected", [
    # SGD with no learned rate is additive and identity: the first r - K steps run forward only,
    # no first-order VJP runs, and equal weights with no injection before K chain the exact steps
    # where the schedule keeps every graph.
    (SGD(0.1), False, EXACT, 4, "store", False, (0, True, SweepPlan(0, 0, True))),
    (SGD(0.1), False, EXACT, 2, "store", False, (2, True, SweepPlan(2, 0, True))),
    (SGD(0.1), False, EXACT, 4, "recompute", False, (0, True, SweepPlan(0, 0, False))),
    (SGD(0.1), False, HALF, 4, "checkpoint", False, (0, True, SweepPlan(0, 0, True))),
    (SGD(0.1), False, HALF, 0, "checkpoint", False, (4, True, SweepPlan(4, 0, False))),
    (SGD(0.1), False, EXACT, 4, "store", True, (0, True, SweepPlan(0, 0, False))),  # G_0, G_K kept
    (SGD(0.1), False, DECAYING, 4, "store", False, (0, True, SweepPlan(0, 0, False))),  # weights differ
    # momentum, or Adam without weight decay: identity but not additive, the same shortcut
    (SGD(0.1, momentum=0.9), False, HALF, 0, "store", False, (4, True, SweepPlan(4, 0, False))),
    (Adam(0.01), False, EXACT, 2, "recompute", False, (2, True, SweepPlan(2, 0, False))),
    # a learned rate: additive but not identity, so the first-order stream runs from the first
    # depth with a nonzero injection (c = [0, 0, 1] for the exact law at K = 2)
    (SGD(0.1), True, EXACT, 2, "store", False, (2, False, SweepPlan(2, 2, False))),
    (SGD(0.1), True, HALF, 4, "store", False, (0, False, SweepPlan(0, 4, False))),
    # weight decay: neither additive nor identity, every step is swept by the schedule
    (Adam(0.01, weight_decay=0.1), False, EXACT, 2, "store", False, (0, False, SweepPlan(2, 2, False))),
    (Adam(0.01, weight_decay=0.1), False, EXACT, 2, "store", True, (0, False, SweepPlan(2, 4, False))),
])
def test_plan_sweep_alone(rule, learned, survival, K, memory, diagnostics, expected):
    """The plan from the loop's facts alone (its steps, rule, learned hyperparameter, HVP)."""
    loop = types.SimpleNamespace(steps=STEPS, rule=rule, learned_hyper=learned, hvp="revrev")
    inv_p, c = telescope_weights(survival, K)
    got = estimators._plan_sweep(loop, K, inv_p, c, schedules.make_schedule(memory), diagnostics)
    assert tuple(got) == expected


@pytest.mark.parametrize("mode, K, memory, rule", [
    ("exact", 4, "store", lambda: SGD(0.1)),
    ("exact", 4, "recompute", lambda: SGD(0.1)),
    ("exact", 2, "checkpoint", lambda: SGD(0.1)),
    ("ufom", 0, "checkpoint", lambda: SGD(0.1, momentum=0.9)),
    ("ufom", 4, "store", lambda: SGD(0.1, momentum=0.9)),
    ("fom", 0, "store", lambda: Adam(0.01)),
    ("exact", 2, "store", lambda: Adam(0.01, weight_decay=0.1)),
])
def test_the_sweep_runs_the_plan(monkeypatch, mode, K, memory, rule):
    """Through ``hypergrad``: ``loop.forward`` runs the ``swept`` steps, the schedule sweeps
    from there with the plan, and no first-order VJP runs where the plan says identity."""
    planned, forward, swept, first_order = [], [], [], []
    plan_sweep, loop_forward = estimators._plan_sweep, unroll.InnerLoop.forward
    vjp_first_order = records.StepRecord.vjp_first_order
    monkeypatch.setattr(estimators, "_plan_sweep", lambda *a: planned.append(plan_sweep(*a)) or planned[-1])
    monkeypatch.setattr(unroll.InnerLoop, "forward", lambda self, state, stop, log:
                        forward.append(stop) or loop_forward(self, state, stop, log))
    monkeypatch.setattr(records.StepRecord, "vjp_first_order",
                        lambda self, f: first_order.append(self.j) or vjp_first_order(self, f))
    for cls in (schedules.Store, schedules.Recompute, schedules.Checkpoint):
        def sweep(self, loop, state, start, stop, log, plan, _sweep=cls.sweep):
            swept.append((start, stop, plan))
            return _sweep(self, loop, state, start, stop, log, plan)
        monkeypatch.setattr(cls, "sweep", sweep)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    g = torch.Generator().manual_seed(0)
    support, query = [(torch.randn(6, 3, generator=g, dtype=torch.float64),
                       torch.randn(6, 2, generator=g, dtype=torch.float64)) for _ in range(2)]
    torch_ufom.hypergrad(model, mse, mse, support, query, steps=STEPS, inner=rule(), mode=mode, q=0.5,
                         memory=memory, force_truncation=K, hvp="revrev")
    [(shape_swept, identity, plan)] = planned
    assert forward == [shape_swept] and swept[0] == (shape_swept, STEPS, plan)
    assert plan.exact_after == STEPS - K
    assert (first_order == []) == identity
