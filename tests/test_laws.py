"""Every truncation law through the library's own sweep: exact unbiasedness by
enumerating the law, truncated back-propagation, and the sampling path."""
import pytest
import torch

import torch_ufom
from helpers import mlp_problem, rel_err
from oracle import brute_force
from torch_ufom.truncation import Bernoulli, Custom, Fixed, Geometric

STEPS = 5
LAWS = [Bernoulli(0.2), Bernoulli(1.0), Geometric(0.5, 0.8), Geometric(1.0, 0.3),
        Custom([0.3, 0.1, 0.0, 0.2, 0.15, 0.25]), Fixed()]


@pytest.fixture(scope="module")
def problem():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    model, loss, data = mlp_problem(9)
    lr = torch.tensor(0.15, requires_grad=True)
    w = torch.tensor(1.3, requires_grad=True)

    def outer(f, batch):
        return w * loss(f, batch)

    params = list(model.parameters()) + [lr, w]
    support, query = data.__getitem__, data[-1]
    G = [brute_force(model, loss, outer, support, query, STEPS, lr, params, k)
         for k in range(STEPS + 1)]
    torch.set_default_dtype(old)
    return model, loss, outer, lr, params, support, query, G


def g_of(problem, memory="checkpoint", **kw):
    model, loss, outer, lr, params, support, query, _ = problem
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(params, lr=0.1), inner_lr=lr,
                                    steps=STEPS, memory=memory, slots=2, **kw)

    def at(K=None):
        meta.zero_grad()
        out = meta.backward(loss, outer, support, query, force_truncation=K)
        return [p.grad.clone() for p in params], out
    return at


@pytest.mark.parametrize("memory", ["checkpoint", "store", "recompute"])
@pytest.mark.parametrize("law", LAWS, ids=repr)
def test_enumerating_each_law_gives_G_r(problem, law, memory):
    G = problem[-1]
    at = g_of(problem, memory, truncation=law)
    probs = law.probs(STEPS)
    mean = [torch.zeros_like(g) for g in G[0]]
    for K, pk in enumerate(probs):
        if pk > 0:
            g, out = at(K)
            assert out.truncation == K and out.reverse_steps == K
            mean = [m + pk * gi for m, gi in zip(mean, g)]
    assert rel_err(mean, G[STEPS]) < 1e-10



def test_a_law_summing_above_one_within_the_tolerance_weighs_what_it_draws(problem):
    """``Custom`` of float32 probabilities that sum to 1 + 3e-8 with ``P(K = 0) = 0`` (review HC
    F1): ``P(K >= 1)`` read as 1 + 3e-8 weighted draws that are never 0 by its reciprocal, so
    the estimate's expectation was 1e-7 off ``G_r``. Both now read it as 1: enumerated with the
    probabilities the draws follow (the survival function's differences), the estimate is
    ``G_r``."""
    law = Custom(torch.tensor([0.0, 0.3, 0.3, 0.2, 0.1, 0.1], dtype=torch.float32))
    assert sum(law.probs(STEPS)) > 1.0
    survival = law.survival(STEPS)
    assert survival[1] == 1.0 and max(survival) == 1.0
    G = problem[-1]
    at = g_of(problem, truncation=law)
    mean = [torch.zeros_like(g) for g in G[0]]
    for K in range(1, STEPS + 1):
        g, _ = at(K)
        mean = [m + (survival[K] - survival[K + 1]) * gi for m, gi in zip(mean, g)]
    assert rel_err(mean, G[STEPS]) < 1e-12

@pytest.mark.parametrize("k", range(STEPS + 1))
def test_fixed_truncation_is_G_k(problem, k):
    G = problem[-1]
    assert rel_err(g_of(problem, mode="truncated", k=k)()[0], G[k]) < 1e-10
    assert rel_err(g_of(problem, truncation=Fixed(k))()[0], G[k]) < 1e-10
    if 0 < k < STEPS:
        assert rel_err(G[k], G[STEPS]) > 1e-4  # truncation is biased here


@pytest.mark.slow
@pytest.mark.parametrize("law", [Bernoulli(0.2), Geometric(0.5, 0.8)], ids=repr)
def test_mean_of_2000_seeded_draws_is_within_4_standard_errors(problem, law):
    model, loss, outer, lr, params, support, query, G = problem
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(params, lr=0.1), inner_lr=lr,
                                    steps=STEPS, truncation=law, memory="store",
                                    generator=torch.Generator().manual_seed(3))
    draws, ks = [], []
    for _ in range(2000):
        meta.zero_grad()
        ks.append(meta.backward(loss, outer, support, query).truncation)
        draws.append(torch.cat([p.grad.flatten() for p in params]))
    draws = torch.stack(draws)
    target = torch.cat([g.flatten() for g in G[STEPS]])
    se = draws.std(dim=0) / 2000 ** 0.5
    moving = se > 0  # the outer weight w has G_k = G_0 for every k
    assert int(moving.sum()) >= len(target) - 1
    assert bool(((draws.mean(0) - target).abs()[moving] < 4 * se[moving]).all())
    assert torch.allclose(draws.mean(0)[~moving], target[~moving], rtol=1e-10, atol=0)
    assert len(set(ks)) == sum(p > 0 for p in law.probs(STEPS))  # every K with mass was drawn
