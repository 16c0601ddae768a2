"""Tests that kill mutants a mutation review found uncaught: the q="auto" statistics, the
per-step random streams, per-parameter Adam betas, the replay finiteness check, the adaptive
rule's bias correction, track_buffers over several tasks and a functional batch_norm's buffers.
Every expected value comes from an oracle written here or in oracle.py, never from the library."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import torch_ufom
from helpers import mlp_problem, mse, rel_err
from oracle import brute_force, ref_adam
from torch_ufom.adaptive import AdaptiveQ, init_stats, observe, update
from torch_ufom.inner import Adam


def sq_norm(tensors):
    return float(sum((t ** 2).sum() for t in tensors))


# -- q="auto": the A and D an exact draw records (G_r, G_0 of the oracle) -------------------------

@pytest.mark.parametrize("outer_reads_w", [False, True])
def test_auto_q_records_A_and_D_of_the_oracle_on_an_exact_draw(outer_reads_w):
    # Guards G_K (unweighted by 1/P_m, M06) and G_0 (with the outer loss's direct terms, M07).
    model, loss, data = mlp_problem(4)
    lr = torch.tensor(0.2, requires_grad=True)  # a learned rate: its terms come from every step
    w = torch.tensor(1.7, requires_grad=True)

    def outer(f, batch):
        return (w if outer_reads_w else 1.0) * loss(f, batch)

    params = list(model.parameters()) + [lr] + ([w] if outer_reads_w else [])
    steps, support, query = 3, data[0], data[1]
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(params, lr=0.0), inner_lr=lr, steps=steps,
                                    q="auto", memory="recompute",
                                    generator=torch.Generator().manual_seed(0))
    q = meta.q_stats["q"]
    assert q < 1  # the exact branch's weights 1/P_m = 1/q differ from 1
    out = meta.backward(loss, outer, support, query, force_truncation=steps)
    assert out.truncation == steps
    obs = meta.state_dict()["q_observations"]
    assert len(obs) == 1 and obs[0]["exact"]
    g0 = brute_force(model, loss, outer, lambda j: support, query, steps, lr, params, 0)
    gr = brute_force(model, loss, outer, lambda j: support, query, steps, lr, params, steps)
    A, D = sq_norm(gr), sq_norm([a - b for a, b in zip(gr, g0)])
    assert obs[0]["A"] == pytest.approx(A, rel=1e-9)
    assert obs[0]["D"] == pytest.approx(D, rel=1e-9)
    # The estimate itself is G_0 + (G_r - G_0) / q.
    want = [a + (b - a) / q for a, b in zip(g0, gr)]
    assert rel_err([p.grad for p in params], want) < 1e-10


def test_diagnose_with_a_meta_parameter_the_outer_loss_reads():
    # Guards G_0's direct meta-gradient terms in diagnose's D (M07).
    model, loss, data = mlp_problem(5)
    w = torch.tensor(0.6, requires_grad=True)

    def outer(f, batch):
        return w * loss(f, batch)

    params = list(model.parameters()) + [w]
    steps, lr = 3, 0.1
    tasks = [(data[i], data[10 + i]) for i in range(2)]
    d = torch_ufom.diagnose(model, loss, outer, tasks, steps=steps, inner_lr=lr, memory="recompute",
                            params=params)
    A = D = 0.0
    for s, q in tasks:
        g0 = brute_force(model, loss, outer, lambda j, s=s: s, q, steps, lr, params, 0)
        gr = brute_force(model, loss, outer, lambda j, s=s: s, q, steps, lr, params, steps)
        A += sq_norm(gr) / len(tasks)
        D += sq_norm([a - b for a, b in zip(gr, g0)]) / len(tasks)
    assert d.A == pytest.approx(A, rel=1e-9) and d.D == pytest.approx(D, rel=1e-9)


# -- the adaptive rule's moving averages are bias-corrected ----------------------------------------

def test_adaptive_q_debiases_averages_with_unequal_counts():
    # Guards the bias correction 1 / (1 - beta^n) with n_f != n_x (M21).
    cfg = AdaptiveQ("ufom")  # beta = 0.9
    g0, gr = [torch.tensor([1.0, 0.0])], [torch.tensor([1.0, 2.0])]  # A = 5, D = 4
    s = update(cfg, init_stats(cfg), observe(exact=True, seconds=1.0, steps=10, forward_steps=55,
                                             reverse_steps=10, g0=g0, gr=gr, q=0.2))
    for _ in range(3):
        s = update(cfg, s, observe(exact=False, seconds=0.1, steps=10, forward_steps=10,
                                   reverse_steps=0))
    # By hand: debiased A = 5, D = 4, t_x = 1.0, t_f = 0.1 (three equal draws), so
    # c_f = 0.1, c_x = 1.0 - 0.1 = 0.9 and q = sqrt(c_f D / (c_x (A - D))) = sqrt(0.4 / 0.9) = 2/3.
    assert s["n_x"] == 1 and s["n_f"] == 3
    assert s["q"] == pytest.approx(2 / 3, rel=1e-12)


# -- per-step random streams ------------------------------------------------------------------------

class Dropped(nn.Module):
    """A linear regressor whose input goes through dropout when called with ``drop=True``;
    it records every mask it draws."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.masks = []

    def forward(self, x, drop=False):
        if drop:
            mask = F.dropout(torch.ones_like(x), 0.5, training=True)
            self.masks.append(mask.detach().clone())
            x = x * mask
        return self.lin(x)


def dropped_loss(f, batch):
    x, y = batch
    return ((f(x, drop=True) - y) ** 2).mean()


def test_each_inner_step_draws_its_own_dropout_mask_and_replays_it():
    # Guards the per-step streams: distinct masks per step, identical on replay (M09).
    torch.manual_seed(0)
    model = Dropped()
    _, _, data = mlp_problem(6)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    support, query = (x, data[0][1][:1].expand(8, 2)), data[1]
    steps, lr = 3, 0.2
    grads = torch_ufom.hypergrad(model, dropped_loss, mse, support, query, steps=steps, inner_lr=lr,
                                 mode="exact", memory="recompute",
                                 generator=torch.Generator().manual_seed(3))
    masks = model.masks
    assert len(masks) > steps  # the forward pass, then the recomputation's replays
    first = masks[:steps]  # the forward pass: steps 1..r, same batch at every step
    for i in range(steps):
        for j in range(i):
            assert not torch.equal(first[i], first[j]), f"steps {j + 1} and {i + 1} share a mask"
    assert all(any(torch.equal(m, f) for f in first) for m in masks[steps:])
    # Oracle: the unrolled SGD graph with step j's recorded mask.
    params = list(model.parameters())
    phi = dict(model.named_parameters())
    for j in range(steps):
        out = functional_call(model, phi, (x * first[j],))
        loss = ((out - support[1]) ** 2).mean()
        g = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
        phi = {n: p - lr * gi for (n, p), gi in zip(phi.items(), g)}
    want = torch.autograd.grad(mse(lambda z: functional_call(model, phi, (z,)), query), params)
    assert rel_err(grads, want) < 1e-10


def test_a_successful_call_with_a_generator_leaves_the_global_random_state_as_it_was():
    # Guards the restore of torch's global RNG after a successful run (M10).
    torch.manual_seed(0)
    model = Dropped()
    _, _, data = mlp_problem(7)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    torch_ufom.hypergrad(model, dropped_loss, mse, data[0], data[1], steps=3, inner_lr=0.1,
                         mode="exact", generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), before)
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), inner_lr=0.1,
                                    steps=3, mode="ufom", q=0.5,
                                    generator=torch.Generator().manual_seed(1))
    meta.backward(dropped_loss, mse, data[0], data[1], force_truncation=3)
    meta.step()
    assert torch.equal(torch.get_rng_state(), before)
    drawn = torch.rand(4)
    torch.manual_seed(123)
    assert torch.equal(drawn, torch.rand(4))  # the next draw is the one the seed alone gives


# -- Adam with per-parameter betas ------------------------------------------------------------------

def test_adam_with_per_parameter_betas_matches_the_reference_unroll():
    # Guards the per-parameter bias corrections of Adam (M17).
    model, loss, data = mlp_problem(8)
    names = [n for n, _ in model.named_parameters()]
    b1 = {n: (0.9, 0.5, 0.7)[i % 3] for i, n in enumerate(names)}
    b2 = {n: (0.999, 0.9, 0.99)[i % 3] for i, n in enumerate(names)}
    steps, lr = 4, 0.02
    params = list(model.parameters())
    got = torch_ufom.hypergrad(model, loss, loss, data.__getitem__, data[-1], steps=steps,
                               inner=Adam(lr, betas=(b1, b2)), mode="exact", memory="store")
    want = brute_force(model, loss, loss, data.__getitem__, data[-1], steps, None, params, steps,
                       rule=ref_adam(lr, betas=(b1, b2)))
    assert rel_err(got, want) < 1e-9


# -- a loss that is not finite only when a step is evaluated again ---------------------------------

def test_a_non_finite_replay_names_the_replay():
    # Guards the finiteness check of replayed and rebuilt steps (M20).
    model, loss, data = mlp_problem(6)
    calls = []

    def inner(f, b):
        calls.append(1)
        return loss(f, b) * (math.nan if len(calls) > 3 else 1.0)  # finite on the forward pass

    with pytest.raises(FloatingPointError, match="finite on the forward pass but not when a step "
                                                 "was evaluated again") as info:
        torch_ufom.hypergrad(model, inner, mse, data[0], data[1], steps=3, inner_lr=0.1,
                             mode="exact", memory="recompute")
    assert not isinstance(info.value, torch_ufom.NonFiniteHypergradient)
    assert all(p.grad is None for p in model.parameters())


# -- track_buffers: the mean over the step's tasks ---------------------------------------------------

def test_track_buffers_writes_the_mean_of_the_tasks_final_statistics():
    # Guards track_buffers' mean over tasks for float buffers, last task's for integer ones (M23).
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(3, momentum=0.3), nn.Linear(3, 2))  # stats of the inputs
    g = torch.Generator().manual_seed(2)
    tasks = [((torch.randn(7, 3, generator=g) * s + s, torch.randn(7, 2, generator=g)),
              (torch.randn(7, 3, generator=g), torch.randn(7, 2, generator=g))) for s in (1.0, 3.0)]
    steps = 2
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.0), inner_lr=0.1,
                                    steps=steps, mode="fom", track_buffers=True)
    for support, query in tasks:
        meta.backward(mse, mse, support, query)
    meta.step()
    # By hand: BatchNorm reads the inputs, so each step moves the statistics towards the
    # support's mean and unbiased variance, whatever the parameters.
    means, variances = [], []
    for (x, _), _ in tasks:
        rm, rv = torch.zeros(3), torch.ones(3)
        for _ in range(steps):
            rm = 0.7 * rm + 0.3 * x.mean(0)
            rv = 0.7 * rv + 0.3 * x.var(0, unbiased=True)
        means.append(rm)
        variances.append(rv)
    bn = model[0]
    assert torch.allclose(bn.running_mean, (means[0] + means[1]) / 2, rtol=1e-12, atol=1e-12)
    assert torch.allclose(bn.running_var, (variances[0] + variances[1]) / 2, rtol=1e-12, atol=1e-12)
    assert int(bn.num_batches_tracked) == steps


# -- a forward that calls F.batch_norm on its own buffers: the per-task loop -----------------------

class FunctionalNorm(nn.Module):
    """The MAML functional style: running statistics as plain buffers written by F.batch_norm,
    without num_batches_tracked."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)
        self.register_buffer("rm", torch.zeros(4))
        self.register_buffer("rv", torch.ones(4))

    def forward(self, x):
        return self.out(torch.tanh(F.batch_norm(self.lin(x), self.rm, self.rv, training=True)))


@pytest.mark.parametrize("entry", ["hypergrad_batch", "backward_batch"])
def test_functional_batch_norm_buffers_fall_back_to_the_per_task_loop(entry):
    # Guards the probe's detection of buffers written without a version bump (M28).
    torch.manual_seed(0)
    model = FunctionalNorm()
    _, _, data = mlp_problem(3)
    n, steps, lr = 3, 2, 0.3
    supports = tuple(torch.stack([data[i][k] for i in range(n)]) for k in range(2))
    queries = tuple(torch.stack([data[10 + i][k] for i in range(n)]) for k in range(2))
    params = list(model.parameters())
    with pytest.warns(UserWarning, match="per-task loop: the module has buffers that the losses write"):
        if entry == "hypergrad_batch":
            got = torch_ufom.hypergrad_batch(model, mse, mse, supports, queries, steps=steps,
                                             inner_lr=lr, mode="exact", vectorise=True)
        else:
            meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(params, lr=0.0), inner_lr=lr,
                                            steps=steps, mode="exact", vectorise=True)
            meta.backward_batch(mse, mse, supports, queries)
            got = [p.grad for p in params]
    want = [torch.zeros_like(p) for p in params]
    for i in range(n):
        g = brute_force(model, mse, mse, lambda j, i=i: data[i], data[10 + i], steps, lr, params, steps)
        want = [a + b for a, b in zip(want, g)]
    # lin.bias's gradient is zero up to rounding (batch_norm subtracts the mean): compare as one vector.
    got, want = torch.cat([g.flatten() for g in got]), torch.cat([g.flatten() for g in want])
    assert float((got - want).norm()) < 1e-10 * float(want.norm())
    assert torch.equal(model.rm, torch.zeros(4)) and torch.equal(model.rv, torch.ones(4))
