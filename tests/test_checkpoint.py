"""``memory="checkpoint"`` (Revolve) against ``"store"``, and its replay count."""
import checkpoint_schedules as cs
import pytest
import torch
from torch import nn

import torch_ufom
from helpers import mlp_problem, mse, rel_err


def schedule_forward_steps(n, slots):
    """Inner steps the schedule advances (first forward plus replays): Revolve's count, or
    ``n`` when the ``n <= slots`` steps keep their graphs without replay."""
    if n <= slots:
        return n
    total = 0
    for action in cs.Revolve(n, slots):
        if isinstance(action, cs.Forward):
            total += action.n1 - action.n0
        if isinstance(action, cs.EndReverse):
            return total


def run(model, loss, data, steps, memory, slots=8, K=None, mode="exact", q=0.5):
    lr = torch.tensor(0.05, requires_grad=True)
    params = list(model.parameters()) + [lr]
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(params, lr=0.1), inner_lr=lr,
                                    steps=steps, mode=mode, q=q, memory=memory, slots=slots)
    support = lambda j: data[j % len(data)]  # noqa: E731
    out = meta.backward(loss, loss, support, data[-1], force_truncation=K)
    return [p.grad for p in params], out


@pytest.mark.parametrize("slots", [1, 2, 5])
@pytest.mark.parametrize("steps", [1, 2, 7, 100])
def test_checkpoint_equals_store(steps, slots):
    model, loss, data = mlp_problem(7)
    ref, _ = run(model, loss, data, steps, "store")
    got, out = run(model, loss, data, steps, "checkpoint", slots)
    assert rel_err(got, ref) < 1e-12
    assert out.reverse_steps == steps
    assert out.forward_steps + out.reverse_steps == schedule_forward_steps(steps, slots)
    if steps <= slots:
        assert out.forward_steps == 0  # no replay: every graph kept


def test_revolve_would_replay_what_keeping_the_graphs_saves():
    # Within the slots, Revolve stores every state, then rebuilds each step's graph.
    revolve = 0
    for action in cs.Revolve(5, 8):
        if isinstance(action, cs.Forward):
            revolve += action.n1 - action.n0
        if isinstance(action, cs.EndReverse):
            break
    assert revolve > 5 == schedule_forward_steps(5, 8)


def test_checkpoint_inside_a_truncated_sweep():
    # UFOM's exact branch over the last K steps only: the schedule covers K steps.
    model, loss, data = mlp_problem(8)
    law = torch_ufom.truncation.Geometric(0.5, 0.8)
    lr = torch.tensor(0.05, requires_grad=True)
    params = list(model.parameters()) + [lr]
    grads = {}
    for memory in ("store", "checkpoint"):
        for p in params:
            p.grad = None
        meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(params, lr=0.1), inner_lr=lr,
                                        steps=9, truncation=law, memory=memory, slots=2)
        out = meta.backward(loss, loss, lambda j: data[j], data[-1], force_truncation=4)
        grads[memory] = [p.grad.clone() for p in params]
        assert out.reverse_steps == 4
    assert out.forward_steps + out.reverse_steps == 5 + schedule_forward_steps(4, 2)
    assert rel_err(grads["checkpoint"], grads["store"]) < 1e-12


@pytest.mark.slow
def test_replays_per_step_at_1000_steps_and_8_slots():
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    data = [(torch.randn(3, 2), torch.randn(3, 1))]
    _, out = run(model, mse, data, 1000, "checkpoint", slots=8)
    replays = out.forward_steps + out.reverse_steps - 1000
    assert out.forward_steps + out.reverse_steps == schedule_forward_steps(1000, 8)
    assert replays / 1000 < 7
    assert replays < 999 * 1000 // 2 / 50  # the paper's recomputation replays 499,500
