"""``exact`` against ``higher``'s differentiable SGD unroll (float64)."""
import pytest
import torch

import torch_ufom
from helpers import cnn_problem, mlp_problem, rel_err

import higher  # noqa: E402  (the test extra: a missing one fails, not skips)


def higher_grad(model, loss, data, steps, lr, params):
    opt = torch.optim.SGD(model.parameters(), lr=float(lr.detach()) if isinstance(lr, torch.Tensor) else lr)
    override = {"lr": [lr]} if isinstance(lr, torch.Tensor) else None
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, override=override) as (fm, dopt):
        for j in range(steps):
            dopt.step(loss(fm, data[j]))
        return torch.autograd.grad(loss(fm, data[-1]), params)


@pytest.mark.parametrize("problem", [mlp_problem, cnn_problem])
@pytest.mark.parametrize("learned_lr", [False, True])
def test_exact_matches_higher(problem, learned_lr):
    model, loss, data = problem(4)
    steps = 10
    lr = torch.tensor(0.1, requires_grad=True) if learned_lr else 0.1
    params = list(model.parameters()) + ([lr] if learned_lr else [])
    ref = higher_grad(model, loss, data, steps, lr, params)
    for memory in ("recompute", "store"):
        got = torch_ufom.hypergrad(model, loss, loss, data.__getitem__, data[-1], steps=steps,
                                   inner_lr=lr, mode="exact", memory=memory, params=params)
        assert rel_err(got, ref) < 1e-9
