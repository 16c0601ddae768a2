"""``exact`` and ``fom`` against brute-force unrolled autograd in float64."""
import pytest
import torch

import torch_ufom
from helpers import cnn_problem, mlp_problem, rel_err
from devices import DEVICES, to
from oracle import brute_force

PROBLEMS = {"mlp": mlp_problem, "cnn": cnn_problem}


def support_of(kind, data, steps):
    """The same per-step batches as one batch, StepBatches, or a callable."""
    if kind == "one":
        return data[0], (lambda j: data[0])
    if kind == "list":
        return torch_ufom.StepBatches(data[:steps]), data.__getitem__
    return data.__getitem__, data.__getitem__


def meta_problem(problem, device="cpu"):
    """A problem whose meta-parameters are the model, a learned inner rate and an outer weight."""
    model, loss, data = PROBLEMS[problem]()
    model, data = model.to(device), to(device, data)
    lr = torch.tensor(0.1, requires_grad=True, device=device)
    w = torch.tensor(0.8, requires_grad=True, device=device)

    def outer(f, batch):
        return w * loss(f, batch)

    params = list(model.parameters()) + [lr, w]
    return model, loss, outer, data, lr, params


@pytest.mark.parametrize("steps", [1, 5, 25])
@pytest.mark.parametrize("kind", ["one", "list", "callable"])
@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("device", DEVICES)
def test_meta_optimizer_matches_brute_force(problem, kind, steps, device):
    model, loss, outer, data, lr, params = meta_problem(problem, device)
    support, batch = support_of(kind, data, steps)
    query = data[-1]
    before = [p.detach().clone() for p in model.parameters()]
    grads = {}
    for mode, k in (("fom", 0), ("exact", steps)):
        ref = brute_force(model, loss, outer, batch, query, steps, lr, params, k)
        for memory in ("checkpoint", "recompute", "store"):
            outer_opt = torch.optim.SGD(params, lr=0.1)
            meta = torch_ufom.MetaOptimizer(model, outer_opt, inner_lr=lr, steps=steps,
                                            mode=mode, memory=memory)
            meta.zero_grad()
            out = meta.backward(loss, outer, support, query)
            got = [p.grad.clone() for p in params]
            assert rel_err(got, ref) < 1e-9, (mode, memory)
            assert out.truncation == k and out.inner_losses.shape == (steps,)
            grads[mode, memory] = got
        for memory in ("checkpoint", "recompute"):
            assert rel_err(grads[mode, "store"], grads[mode, memory]) < 1e-12
    # FOM really differs from the exact hypergradient here (the test can fail).
    assert rel_err(grads["fom", "store"], grads["exact", "store"]) > 1e-3
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("memory", ["recompute", "store"])
@pytest.mark.parametrize("device", DEVICES)
def test_hypergrad_per_parameter_rates_and_float_rate(memory, device):
    model, loss, data = mlp_problem(1)
    model, data = model.to(device), to(device, data)
    steps = 5
    rates = {n: torch.full_like(p, 0.05).requires_grad_() for n, p in model.named_parameters()}
    params = list(model.parameters()) + list(rates.values())
    ref = brute_force(model, loss, loss, data.__getitem__, data[-1], steps, rates, params, steps)
    got = torch_ufom.hypergrad(model, loss, loss, data.__getitem__, data[-1], steps=steps,
                               inner_lr=rates, mode="exact", memory=memory, params=params)
    assert rel_err(got, ref) < 1e-9
    ref = brute_force(model, loss, loss, data.__getitem__, data[-1], steps, 0.05,
                      list(model.parameters()), 0)
    got = torch_ufom.hypergrad(model, loss, loss, data.__getitem__, data[-1], steps=steps,
                               inner_lr=0.05, mode="fom", memory=memory)
    assert rel_err(got, ref) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_backward_accumulates_like_loss_backward(device):
    model, loss, data = mlp_problem(2)
    model, data = model.to(device), to(device, data)
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                    inner_lr=0.1, steps=3, mode="exact")
    meta.zero_grad()
    meta.backward(loss, loss, data[0], data[1])
    first = [p.grad.clone() for p in model.parameters()]
    meta.backward(loss, loss, data[2], data[3])
    second = torch_ufom.hypergrad(model, loss, loss, data[2], data[3], steps=3, inner_lr=0.1,
                                  mode="exact")
    assert rel_err([p.grad for p in model.parameters()],
                   [a + b for a, b in zip(first, second)]) < 1e-12
    before = [p.detach().clone() for p in model.parameters()]
    meta.step()
    assert all(torch.allclose(p, b - 0.1 * p.grad) for p, b in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("device", DEVICES)
def test_unused_meta_parameter_keeps_grad_none(device):
    model, loss, data = mlp_problem(3)
    model, data = model.to(device), to(device, data)
    unused = torch.zeros(2, requires_grad=True, device=device)
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(list(model.parameters()) + [unused], lr=0.1),
                                    inner_lr=0.1, steps=2, mode="exact")
    meta.backward(loss, loss, data[0], data[1])
    assert unused.grad is None
    assert all(p.grad is not None for p in model.parameters())
