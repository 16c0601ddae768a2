"""UFOM (Bernoulli law): exact unbiasedness by enumeration, and the sampling path."""
import pytest
import torch

import torch_ufom
from helpers import mlp_problem, rel_err
from oracle import brute_force

STEPS = 4


@pytest.fixture
def problem():
    model, loss, data = mlp_problem(5)
    lr = torch.tensor(0.2, requires_grad=True)
    params = list(model.parameters()) + [lr]
    support, query = data.__getitem__, data[-1]
    oracle = {k: brute_force(model, loss, loss, support, query, STEPS, lr, params, k)
              for k in (0, STEPS)}
    return model, loss, lr, params, support, query, oracle


def meta_for(model, params, lr, q, memory="store", generator=None):
    return torch_ufom.MetaOptimizer(model, torch.optim.SGD(params, lr=0.1), inner_lr=lr,
                                    steps=STEPS, mode="ufom", q=q, memory=memory,
                                    generator=generator)


def draw(meta, params, loss, support, query, K=None):
    meta.zero_grad()
    out = meta.backward(loss, loss, support, query, force_truncation=K)
    return [p.grad.clone() for p in params], out


@pytest.mark.parametrize("q", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("memory", ["recompute", "store"])
def test_enumerating_the_bernoulli_law_gives_the_exact_hypergradient(problem, q, memory):
    model, loss, lr, params, support, query, oracle = problem
    meta = meta_for(model, params, lr, q, memory)
    law = torch_ufom.truncation.Bernoulli(q).probs(STEPS)
    mean = [torch.zeros_like(p) for p in params]
    for K, pk in enumerate(law):
        if pk == 0:
            continue
        g, out = draw(meta, params, loss, support, query, K)
        assert out.truncation == K
        mean = [m + pk * gi for m, gi in zip(mean, g)]
    assert rel_err(mean, oracle[STEPS]) < 1e-12
    assert rel_err(oracle[0], oracle[STEPS]) > 1e-3  # FOM is biased here


def test_each_seeded_draw_is_fom_or_the_reweighted_correction(problem):
    model, loss, lr, params, support, query, oracle = problem
    q = 0.3
    g0, gr = oracle[0], oracle[STEPS]
    corrected = [a + (b - a) / q for a, b in zip(g0, gr)]
    meta = meta_for(model, params, lr, q, generator=torch.Generator().manual_seed(7))
    seen = []
    for _ in range(20):
        g, out = draw(meta, params, loss, support, query)
        expected = corrected if out.truncation == STEPS else g0
        assert out.truncation in (0, STEPS)
        assert rel_err(g, expected) < 1e-12
        seen.append(out.truncation)
    assert 0 in seen and STEPS in seen
    again = meta_for(model, params, lr, q, generator=torch.Generator().manual_seed(7))
    assert [draw(again, params, loss, support, query)[1].truncation for _ in range(20)] == seen

# The sampling path's mean over 2,000 draws is tested for every mode of drawing in test_laws.py.
