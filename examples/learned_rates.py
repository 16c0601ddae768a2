"""Learned inner learning rates over a long inner loop: Meta-SGD and MAML++'s per-step rates.

Meta-SGD learns one inner rate per weight: ``inner.SGD(lr={name: tensor of
that parameter's shape})``. MAML++'s LSLR learns one
rate per layer and per inner step: ``inner.SGD(lr={name: PerStep(tensor of
length steps)})``. In both, the rate tensors are handed to the outer optimizer,
which makes them meta-parameters: they get their hypergradient like the
weights. The problem is MAML on sinusoid regression with a long inner loop
(100 SGD steps); ``mode="exact"`` with ``memory="checkpoint", slots=8``
keeps 8 inner states whatever the number of steps, and replays the others
during the reverse sweep (the replay counts are printed; the default, a byte
budget, would keep every step of this small model instead).

    python examples/learned_rates.py           # under a minute on one CPU core
    python examples/learned_rates.py --tiny    # a few seconds
"""
import argparse
import math

import torch
from torch import nn

import torch_ufom
from torch_ufom.inner import SGD, PerStep

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--tiny", action="store_true", help="a short inner loop, few outer steps")
args = parser.parse_args()
STEPS, OUTER_STEPS, META_BATCH, SHOTS = (20, 3, 4, 10) if args.tiny else (100, 30, 8, 10)
INIT_RATE = 0.01
gen = torch.Generator().manual_seed(0)


def sinusoid_tasks(n):
    """``n`` stacked tasks ``y = a sin(x - b)``: support ``(xs, ys)`` and query ``(xq, yq)``."""
    a = 0.1 + 4.9 * torch.rand(n, 1, 1, generator=gen)
    b = math.pi * torch.rand(n, 1, 1, generator=gen)
    xs, xq = (10 * torch.rand(n, SHOTS, 1, generator=gen) - 5 for _ in range(2))
    return (xs, a * torch.sin(xs - b)), (xq, a * torch.sin(xq - b))


def mse(fmodel, batch):
    x, y = batch
    return nn.functional.mse_loss(fmodel(x), y)


VAL_SUPPORT, VAL_QUERY = sinusoid_tasks(16)  # fixed validation tasks


def validation_mse(model, rule):
    """Mean query MSE over the validation tasks after adapting to each (no meta-gradient)."""
    adapted = torch_ufom.adapt_batch(model, mse, VAL_SUPPORT, steps=STEPS, inner=rule)
    with torch.no_grad():
        return float(nn.functional.mse_loss(adapted(VAL_QUERY[0]), VAL_QUERY[1]))


def train(name, make_rates):
    """Meta-train a fresh model with the inner rates ``make_rates(model)`` builds; return them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    rates, rule = make_rates(model)
    outer = torch.optim.Adam([{"params": model.parameters()},
                              {"params": list(rates.values()), "lr": 1e-4}], lr=1e-3)
    meta = torch_ufom.MetaOptimizer(model, outer, inner=rule, steps=STEPS, mode="exact",
                                    memory="checkpoint", slots=8, reduction="mean")
    before = validation_mse(model, rule)
    for k in range(OUTER_STEPS):
        supports, queries = sinusoid_tasks(META_BATCH)
        meta.zero_grad()
        results = meta.backward_batch(mse, mse, supports, queries)
        meta.step()
        with torch.no_grad():  # rates must stay >= 0: project after each outer step
            for r in rates.values():
                r.clamp_(min=0.0)
    print(f"{name}: validation query MSE after {STEPS} inner steps {before:.4f} before, "
          f"{validation_mse(model, rule):.4f} after {OUTER_STEPS} outer steps")
    r = results[0]
    print(f"{name}: {STEPS} inner steps per task, {r.forward_steps} run forward (first pass and "
          f"replays), {r.reverse_steps} rebuilt in reverse, at most 8 states stored")
    return rates


def meta_sgd_rates(model):
    """Meta-SGD: a learned rate per weight, as a per-parameter dict of ``SGD``'s ``lr``."""
    rates = {n: torch.full_like(p, INIT_RATE, requires_grad=True) for n, p in model.named_parameters()}
    return rates, SGD(lr=rates)


def lslr_rates(model):
    """MAML++'s LSLR: per layer (here: per parameter tensor) and per inner step."""
    rates = {n: torch.full((STEPS,), INIT_RATE, requires_grad=True) for n, _ in model.named_parameters()}
    return rates, SGD(lr={n: PerStep(r) for n, r in rates.items()})


rates = train("meta-sgd", meta_sgd_rates)
for n, r in ((n, r.detach()) for n, r in rates.items()):
    print(f"meta-sgd rate {n}: mean {float(r.mean()):.5f}, min {float(r.min()):.5f}, "
          f"max {float(r.max()):.5f} (initial {INIT_RATE})")
rates = train("lslr", lslr_rates)
shown = sorted({0, STEPS // 2, STEPS - 1})
for n, r in ((n, r.detach()) for n, r in rates.items()):
    print(f"lslr rate {n}: " + ", ".join(f"step {j} {float(r[j]):.5f}" for j in shown)
          + f" (initial {INIT_RATE})")
