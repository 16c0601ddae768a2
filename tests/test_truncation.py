"""Truncation laws: the contract, validation and the telescope weights."""
import pytest
import torch

from torch_ufom.truncation import Bernoulli, Custom, Fixed, Geometric, telescope_weights

LAWS = [Bernoulli(0.3), Bernoulli(1.0), Geometric(0.5, 0.8), Fixed(0), Fixed(2), Fixed(),
        Custom([0.1, 0.2, 0.3, 0.25, 0.15])]


@pytest.mark.parametrize("law", LAWS, ids=repr)
def test_probs_survival_and_sampling_agree(law):
    steps = 4
    p = law.probs(steps)
    assert len(p) == steps + 1 and abs(sum(p) - 1) < 1e-12 and min(p) >= 0
    surv = law.survival(steps)
    assert surv[0] == 1.0 and surv[-1] == 0.0
    for k in range(1, steps + 1):
        assert abs(surv[k] - sum(p[k:])) < 1e-12
    gen = torch.Generator().manual_seed(0)
    counts = [0] * (steps + 1)
    n = 4000
    for _ in range(n):
        counts[law.sample(steps, gen)] += 1
    for k in range(steps + 1):
        se = (p[k] * (1 - p[k]) / n) ** 0.5
        assert abs(counts[k] / n - p[k]) <= 4 * se + 1e-12


def test_geometric_survival_and_bias_flags():
    surv = Geometric(0.5, 0.8).survival(5)
    assert surv[1:6] == pytest.approx([0.5 * 0.8 ** (k - 1) for k in range(1, 6)])
    assert Fixed(2).biased(4) and not Fixed(4).biased(4) and not Fixed().biased(4)
    assert not Bernoulli(0.1).biased(4)


@pytest.mark.parametrize("law", LAWS, ids=repr)
def test_telescope_weights_reproduce_the_telescope(law):
    # sum_k c_k G_k must equal G_0 + sum_{k<=K} (G_k - G_{k-1}) / P_k for any G.
    steps = 4
    surv = law.survival(steps)
    G = torch.randn(steps + 1, dtype=torch.float64)
    for K in range(steps + 1):
        if surv[K] == 0:
            continue
        inv_p, c = telescope_weights(surv, K)
        telescope = G[0] + sum((G[k] - G[k - 1]) / surv[k] for k in range(1, K + 1))
        assert float(sum(c[k] * G[k] for k in range(K + 1))) == pytest.approx(float(telescope))
        assert inv_p == pytest.approx([1 / surv[m] for m in range(K + 1)])


@pytest.mark.parametrize("make, arg", [
    (lambda: Bernoulli(0.0), "q"), (lambda: Bernoulli(2), "q"), (lambda: Geometric(0.5, 1.0), "rho"),
    (lambda: Geometric(0.5, 0.0), "rho"), (lambda: Fixed(-1), "k"),
    (lambda: Custom([0.5, -0.1, 0.6]), "probs"), (lambda: Custom([0.5, 0.2]), "probs"),
])
def test_bad_laws_are_rejected(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


def test_validation_for_steps():
    with pytest.raises(ValueError, match="k"):
        Fixed(5).validate(4)
    with pytest.raises(ValueError, match="probs.*length"):
        Custom([0.5, 0.5]).validate(4)
    with pytest.raises(ValueError, match="biased"):
        Custom([0.5, 0.5, 0.0]).validate(2)
    Custom([0.5, 0.0, 0.5]).validate(2)
