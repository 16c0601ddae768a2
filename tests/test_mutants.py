"""Tests that kill mutants a mutation review found uncaught: the q="auto" statistics, the
per-step random streams, per-parameter Adam betas, the replay finiteness check, the adaptive
rule's bias correction, track_buffers over several tasks and a functional batch_norm's buffers;
then (review AD) padded embeddings reached through ATen aliases, forward-over-reverse with a learned
view, tasks discarded through the outer optimizer, resumes, diagnose's keywords and vmap's failures;
then (review DE) losses that differentiate through backward() or at some steps of a callable batch,
buffers reassigned with a graph or on functional_call's path, fom's warning per tensor, bound-method
losses, a replaced submodule freed, and a loss that calls the library.
Every expected value comes from an oracle written here or in oracle.py, never from the library."""
import io
import functools
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._C._functorch import get_unwrapped, is_batchedtensor
from torch.func import functional_call

import torch_ufom
from helpers import flagged_pinn, flagged_pinn_outer, mlp_problem, mse, rel_err
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
    # support's mean and unbiased variance, whatever the parameters; the outer loss's forward
    # then towards the query's (review KB F1).
    means, variances = [], []
    for (x, _), (xq, _) in tasks:
        rm, rv = torch.zeros(3), torch.ones(3)
        for batch in [x] * steps + [xq]:
            rm = 0.7 * rm + 0.3 * batch.mean(0)
            rv = 0.7 * rv + 0.3 * batch.var(0, unbiased=True)
        means.append(rm)
        variances.append(rv)
    bn = model[0]
    assert torch.allclose(bn.running_mean, (means[0] + means[1]) / 2, rtol=1e-12, atol=1e-12)
    assert torch.allclose(bn.running_var, (variances[0] + variances[1]) / 2, rtol=1e-12, atol=1e-12)
    assert int(bn.num_batches_tracked) == steps + 1


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


# == Review AD: survivors of the mutation audit of session 11 ======================================


def _task_stack(data, first, n=3):
    """Tasks ``first .. first + n - 1`` of ``mlp_problem``'s data stacked along dimension 0."""
    return tuple(torch.stack([data[first + i][k] for i in range(n)]) for k in range(2))


def _oracle_sum_of_tasks(model, inner, outer, supports, queries, steps, lr, params, k=None):
    """The sum over the stacked tasks of the brute-force ``G_k`` (``k = steps``: exact)."""
    k = steps if k is None else k
    n = len(supports[0])
    per_task = [brute_force(model, inner, outer, lambda j, i=i: tuple(t[i] for t in supports),
                            tuple(t[i] for t in queries), steps, lr, params, k) for i in range(n)]
    return [sum(g) for g in zip(*per_task)]


def _updated(model, before):
    return [p.detach() - b for p, b in zip(model.parameters(), before)]


# -- an embedding with padding_idx reached through torch.embedding / aten.embedding ----------------

class _AliasedLookup(nn.Module):
    """Token ids through a padding row, read by ``torch.embedding`` or ``torch.ops.aten.embedding``
    on a plain parameter (no nn.Embedding, no F.embedding): only the ATen-level probe sees it."""

    def __init__(self, lookup):
        super().__init__()
        self.table = nn.Parameter(torch.randn(5, 3))
        self.head = nn.Linear(3, 1)
        self.lookup = lookup

    def forward(self, ids, padded):
        rows = self.lookup(self.table, ids, 0) if padded else torch.embedding(self.table, ids)
        return self.head(torch.tanh(rows)).mean(1)


_LOOKUPS = pytest.mark.parametrize("lookup", [
    lambda table, ids, pad: torch.embedding(table, ids, pad),
    lambda table, ids, pad: torch.ops.aten.embedding(table, ids, pad),
], ids=["torch.embedding", "aten.embedding"])


def _padded_lookup_case(lookup, where):
    torch.manual_seed(0)
    model = _AliasedLookup(lookup)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 5, (2, 3, 4, 6), generator=g)
    ids[..., 0] = 0  # every sequence holds the padding token
    ys = torch.randn(2, 3, 4, 1, generator=g)
    supports, queries = (ids[0], ys[0]), (ids[1], ys[1])

    def inner(f, b):
        return ((f(b[0], where == "inner") - b[1]) ** 2).mean()

    def outer(f, b):
        return ((f(b[0], where == "outer") - b[1]) ** 2).mean()
    params = list(model.parameters())
    want = _oracle_sum_of_tasks(model, inner, outer, supports, queries, 2, 0.3, params)
    with pytest.warns(UserWarning, match="per-task loop: torch.func.vmap differentiates Embedding "
                                         "with padding_idx wrongly"):
        got = torch_ufom.hypergrad_batch(model, inner, outer, supports, queries, steps=2, inner_lr=0.3,
                                         mode="exact", vectorise=True)
    assert rel_err(got, want) < 1e-10
    assert rel_err([got[0][0]], [want[0][0]]) < 1e-10  # the padding row itself


@_LOOKUPS
def test_a_padded_embedding_reached_through_torch_embedding_in_the_inner_loss_falls_back(lookup):
    # Guards the ATen probe's embedding(padding_idx) entry (V6): an inner loss reading a table
    # through torch.embedding(table, ids, 0) went under vmap, whose padding row got a gradient
    # (1.2% off the oracle), silently, without the per-task-loop warning.
    _padded_lookup_case(lookup, "inner")


@_LOOKUPS
def test_a_padded_embedding_reached_through_torch_embedding_in_the_outer_loss_falls_back(lookup):
    # Guards the outer loss's ATen probe (V8): the same lookup read by the outer loss only went
    # under vmap, 11% off the oracle, silently.
    _padded_lookup_case(lookup, "outer")


# -- forward-over-reverse and a learned rate given as a view that the inner loss reads ------------

def test_fwdrev_refuses_an_inner_loss_reading_a_learned_rate_given_as_a_view():
    # Guards reads_meta_directly's check of a view's base (V9): lr = lrs[0], learned and read by
    # the inner loss (a rate-scaled L2 term), ran forward-over-reverse and returned d/dlr 21% off
    # the oracle, silently, instead of refusing.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    lrs = torch.tensor([0.3, 0.7], requires_grad=True)
    lr = lrs[0]  # a view of a learned leaf, as the inner rules accept
    x, y = torch.randn(6, 3), torch.randn(6, 1)

    def inner(f, b):
        return mse(f, b) + lr * sum((p ** 2).sum() for p in f.parameters())
    params = list(model.parameters()) + [lr]
    kw = dict(steps=3, inner_lr=lr, mode="exact", params=params)
    with pytest.raises(ValueError, match="Invalid hvp: 'fwdrev' .*reads a meta-parameter directly"):
        torch_ufom.hypergrad(model, inner, mse, (x, y), (x, y), hvp="fwdrev", **kw)
    assert lrs.grad is None and all(p.grad is None for p in model.parameters())
    want = brute_force(model, inner, mse, lambda j: (x, y), (x, y), 3, lr, params, 3)
    got = torch_ufom.hypergrad(model, inner, mse, (x, y), (x, y), hvp="revrev", **kw)
    assert rel_err(got, want) < 1e-10


# -- state_dict / load_state_dict ------------------------------------------------------------------

def _two_layer(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


def _exact_mean_run(lr):
    """A two-layer model and an exact MetaOptimizer averaging its tasks, outer SGD at ``lr``."""
    model = _two_layer()
    return model, torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=lr),
                                           inner_lr=0.3, steps=2, mode="exact", reduction="mean")


def test_a_resumed_run_whose_pending_task_is_discarded_steps_by_the_new_task_alone():
    # Guards load_state_dict marking the loaded tasks as held by .grad (MO7): resumed between
    # tasks, the pending task discarded with the outer optimizer's zero_grad(), one new task:
    # reduction="mean" still counted the discarded task and halved the step.
    g = torch.Generator().manual_seed(1)
    t0, t1 = [(torch.randn(6, 3, generator=g), torch.randn(6, 1, generator=g)) for _ in range(2)]

    build = functools.partial(_exact_mean_run, 0.5)
    model, meta = build()
    meta.backward(mse, mse, t0, t0)
    saved, grads = meta.state_dict(), [p.grad.clone() for p in model.parameters()]
    assert saved["tasks"] == 1
    model2, meta2 = build()
    for p, gr in zip(model2.parameters(), grads):  # the gradients live on the parameters
        p.grad = gr.clone()
    meta2.load_state_dict(saved)
    meta2.optimizer.zero_grad()  # the pending task is discarded (set_to_none)
    before = [p.detach().clone() for p in model2.parameters()]
    params = list(model2.parameters())
    want = [-0.5 * gk for gk in brute_force(model2, mse, mse, lambda j: t1, t1, 2, 0.3, params, 2)]
    meta2.backward(mse, mse, t1, t1)
    meta2.step()
    assert rel_err(_updated(model2, before), want) < 1e-10


def test_numpy_numbers_in_the_settings_are_saved_as_floats_that_torch_load_reads_back():
    # Guards _plain's float() of numpy numbers (MO17): inner_lr=np.float32(0.1) or a numpy
    # momentum went into the state_dict as numpy scalars, and torch.load (weights_only=True, its
    # default) refused the checkpoint: the run could not be resumed.
    model = nn.Linear(3, 1)
    for kw, name, value in ((dict(inner_lr=np.float32(0.1)), "lr", float(np.float32(0.1))),
                            (dict(inner=torch_ufom.inner.SGD(0.1, momentum=np.float64(0.9))),
                             "momentum", 0.9)):
        meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2, **kw)
        buf = io.BytesIO()
        torch.save(meta.state_dict(), buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=True)
        got = loaded["settings"]["inner"][name]
        assert type(got) is float and got == value, (kw, got)


def test_meta_load_state_dict_leaves_the_module_s_parameters_alone():
    # Guards _extra_meta excluding the module's own parameters (MO29): meta_tensors saved every
    # parameter of the module, and meta.load_state_dict wrote them back over the module's
    # (e.g. over a model.load_state_dict(best) done before).
    model = _two_layer()
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), inner_lr=0.3,
                                    steps=2)
    saved = meta.state_dict()
    assert saved["meta_tensors"] == []  # no meta-parameter other than the module's
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # as model.load_state_dict(other) would
    now = [p.detach().clone() for p in model.parameters()]
    meta.load_state_dict(saved)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), now, strict=True))


# -- tasks discarded through the outer optimizer ---------------------------------------------------

def _bn_first(seed=0):
    """BatchNorm on the inputs: its running statistics depend on the support alone."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.BatchNorm1d(3, momentum=0.3), nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


def test_a_task_discarded_after_synchronize_leaves_q_stats_and_buffers_alone_at_step():
    # Guards step()'s own check for gradients cleared by the outer optimizer (MO4): backward,
    # synchronize(), optimizer.zero_grad(), step() folded the discarded task's q="auto"
    # observation into q_stats and wrote its running statistics into the module.
    model = _bn_first()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, generator=g), torch.randn(6, 1, generator=g)
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), inner_lr=0.3,
                                    steps=2, q="auto", track_buffers=True)
    stats = dict(meta.q_stats)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    params = [p.detach().clone() for p in model.parameters()]
    meta.backward(mse, mse, (x, y), (x, y))
    meta.synchronize()
    meta.optimizer.zero_grad()  # the task is discarded (set_to_none)
    meta.step()
    assert meta.q_stats == stats
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), params, strict=True))
    assert meta.state_dict()["q_observations"] == []


def test_synchronize_counts_no_task_after_the_outer_optimizer_discarded_it():
    # Guards synchronize()'s own check for cleared gradients (MO5): backward, then
    # optimizer.zero_grad(), then synchronize() returned 1 instead of 0; under a process_group
    # that stale count goes into the total every rank divides the mean by.
    model = _two_layer()
    x, y = torch.randn(6, 3), torch.randn(6, 1)
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), inner_lr=0.3,
                                    steps=2, mode="exact")
    meta.backward(mse, mse, (x, y), (x, y))
    meta.optimizer.zero_grad()
    assert meta.synchronize() == 0
    assert all(p.grad is None for p in model.parameters())


def test_a_closure_that_fails_at_once_keeps_the_pending_observation_and_buffers():
    # Guards the restore after a closure that raises before running a task (MO25): step(closure)
    # dropped the pending task's q="auto" observation and its track_buffers statistics, so the
    # next step() neither updated q nor wrote the running statistics.
    model = _bn_first(2)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(7, 3, generator=g) * 2 + 1, torch.randn(7, 1, generator=g)
    steps = 2
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), inner_lr=0.3,
                                    steps=steps, q="auto", track_buffers=True, reduction="mean",
                                    generator=torch.Generator().manual_seed(5))
    n_before = meta.q_stats["n_x"] + meta.q_stats["n_f"]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    meta.backward(mse, mse, (x, y), (x, y))

    def closure():
        raise KeyError("the data loader failed")
    with pytest.raises(KeyError, match="the data loader failed"):
        meta.step(closure)
    assert len(meta.state_dict()["q_observations"]) == 1
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    meta.step()
    assert meta.q_stats["n_x"] + meta.q_stats["n_f"] == n_before + 1
    # By hand: each inner step, and the outer loss's forward (on the same x), moves the statistics
    # towards the batch's mean and unbiased variance, whatever the parameters (BatchNorm reads the
    # inputs).
    rm, rv = torch.zeros(3), torch.ones(3)
    for _ in range(steps + 1):
        rm = 0.7 * rm + 0.3 * x.mean(0)
        rv = 0.7 * rv + 0.3 * x.var(0, unbiased=True)
    bn = model[0]
    assert torch.allclose(bn.running_mean, rm, rtol=1e-12, atol=1e-12)
    assert torch.allclose(bn.running_var, rv, rtol=1e-12, atol=1e-12)
    assert int(bn.num_batches_tracked) == steps + 1


def test_fom_mean_counts_tasks_that_leave_a_meta_parameter_without_a_hypergradient():
    # Guards _check_cleared's "every meta-gradient is None" (MO30): under fom a learned L2 weight
    # gets no hypergradient (.grad stays None); the tasks were then taken as discarded and
    # reduction="mean" over the same task twice gave twice the step of the task alone.
    model = _two_layer()
    lam = torch.tensor(0.01, requires_grad=True)
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(list(model.parameters()) + [lam], lr=0.5),
                                    inner_lr=0.3, steps=2, mode="fom", reduction="mean")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, generator=g), torch.randn(6, 1, generator=g)

    def inner(f, b):
        return mse(f, b) + lam * sum((p ** 2).sum() for p in f.parameters())
    params = list(model.parameters())
    want = [-0.5 * gk for gk in brute_force(model, inner, mse, lambda j: (x, y), (x, y), 2, 0.3, params, 0)]
    before = [p.detach().clone() for p in params]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "mode='fom' gives no hypergradient")
        for _ in range(2):  # the same task twice: the mean equals the task alone
            meta.backward(inner, mse, (x, y), (x, y))
    assert lam.grad is None
    meta.step()
    assert rel_err(_updated(model, before), want) < 1e-10
    assert float(lam.detach()) == 0.01


# -- diagnose(max_memory=, hvp=) -------------------------------------------------------------------

def _diagnose_case():
    model = _two_layer()
    x, y = torch.randn(6, 3), torch.randn(6, 1)
    return model, [((x, y), (x, y))]


def test_diagnose_uses_and_checks_max_memory():
    # Guards diagnose passing max_memory on (D2): the keyword was dropped, so invalid budgets were
    # accepted and a tight budget measured the default configuration (every step kept) instead.
    model, tasks = _diagnose_case()
    for bad, error in ((True, TypeError), (0, ValueError)):
        with pytest.raises(error, match="Invalid max_memory"):
            torch_ufom.diagnose(model, mse, mse, tasks, steps=4, inner_lr=0.3, max_memory=bad)
    assert torch_ufom.diagnose(model, mse, mse, tasks, steps=4, inner_lr=0.3).steps_exact == 4
    with pytest.warns(UserWarning, match="max_memory=1 is below the least a sweep of this model is "
                                         "estimated to need"):
        d = torch_ufom.diagnose(model, mse, mse, tasks, steps=4, inner_lr=0.3, max_memory=1)
    # By hand: one slot (the start) keeps no step's graph, so the reverse sweep runs steps
    # 3 + 2 + 1 + 0 = 6 again, plus one VJP per step: 6 + 4 (docs: Diagnosis.steps_exact).
    assert d.steps_exact == 10


def test_diagnose_uses_and_checks_hvp():
    # Guards diagnose passing hvp on (D3): the keyword was dropped, so hvp="bogus" and
    # forward-over-reverse on a BatchNorm model were accepted and measured revrev instead.
    model, tasks = _diagnose_case()
    with pytest.raises(ValueError, match="Invalid hvp: 'bogus'"):
        torch_ufom.diagnose(model, mse, mse, tasks, steps=2, inner_lr=0.3, hvp="bogus")
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    with pytest.raises(ValueError, match="Invalid hvp: 'fwdrev' needs a module whose losses write no buf"):
        torch_ufom.diagnose(bn, mse, mse, tasks, steps=2, inner_lr=0.3, hvp="fwdrev")
    d = torch_ufom.diagnose(model, mse, mse, tasks, steps=2, inner_lr=0.3, hvp="fwdrev")
    params = list(model.parameters())
    (s, q), = tasks
    gr = brute_force(model, mse, mse, lambda j: s, q, 2, 0.3, params, 2)
    g0 = brute_force(model, mse, mse, lambda j: s, q, 2, 0.3, params, 0)
    assert d.A == pytest.approx(sq_norm(gr), rel=1e-9)
    assert d.D == pytest.approx(sq_norm([a - b for a, b in zip(gr, g0)]), rel=1e-9)


# -- where vmap failed is remembered across calls that probe again ----------------------------------

def test_a_meta_optimizer_remembers_a_failed_exact_sweep_across_first_order_calls():
    # Guards the vmap failure memory carried through the probe (F10): an exact sweep failed under
    # vmap; a later first-order meta-batch probes again and rebuilt the memory without it, so
    # the next exact meta-batch tried vmap again (and failed again) before looping: ~15% a call.
    model, _, data = mlp_problem(9)
    supports, queries = _task_stack(data, 0), _task_stack(data, 10)
    attempts = []

    def outer(f, b):
        out = f(b[0])
        if is_batchedtensor(out):
            attempts.append(get_unwrapped(out).shape[0])
            if get_unwrapped(out).shape[0] == 2:  # the exact group of [0, 2, 2]
                raise RuntimeError("simulated failure under vmap")
        return ((out - b[1]) ** 2).mean()
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.0), inner_lr=0.3,
                                    steps=2, mode="ufom", q=0.5, vectorise=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta.backward_batch(mse, outer, supports, queries, force_truncation=[0, 2, 2])
        assert 2 in attempts  # the exact group was tried under vmap and failed
        attempts.clear()
        # First-order only: the memory of the exact failure does not apply, so this call probes
        # the losses again (every call does) and runs under vmap.
        first = meta.backward_batch(mse, outer, supports, queries, force_truncation=[0, 0, 0])
        assert attempts == [3] and first[0].batch_path.startswith("vectorised")  # probed, vmap ran
        attempts.clear()
        meta.zero_grad()
        again = meta.backward_batch(mse, outer, supports, queries, force_truncation=[0, 2, 2])
    assert attempts == []  # the loop at once
    assert all(r.batch_path.startswith("per-task loop: an error under torch.func.vmap") for r in again)


# -- adapt_batch: a non-finite inner loss is raised at once ----------------------------------------

def test_adapt_batch_raises_a_non_finite_inner_loss_without_running_the_tasks_again():
    # Guards adapt_batch's re-raise of FloatingPointError under vmap (A2): a NaN in one task's
    # support ran every task again one by one before raising (9 inner-loss calls instead of 3).
    model = _two_layer()
    supports = (torch.randn(3, 5, 3), torch.randn(3, 5, 1))
    supports[0][-1, 0, 0] = float("nan")
    calls = []

    def counted(f, b):
        calls.append(1)
        return mse(f, b)
    with pytest.raises(FloatingPointError, match="inner_loss is not finite"):
        torch_ufom.adapt_batch(model, counted, supports, steps=2, inner_lr=0.3)
    assert len(calls) <= 3  # the probe and the two vectorised steps


# -- review AI: q="auto" before and after reconfigure, the rules' edges, resumes, Nesterov, checks ---

def _tiny_task(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(5, 3, generator=g), torch.randn(5, 1, generator=g)


def test_reconfigure_of_q_min_before_any_exact_draw_starts_at_the_new_q_init():
    # Guards rebound() resetting q to the new q_init (A9): reconfigure(q_min=0.5) before any exact
    # draw left q at the old 0.2, below the new q_min, and the optimizer refused its own state_dict.
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), inner_lr=0.1,
                                    steps=2, q="auto")  # the ufom rule: q_min 0.01, q_init 0.2
    assert meta.q_stats["n_x"] == 0 and meta.q == 0.2
    meta.reconfigure(q_min=0.5)
    assert meta.q == 0.5 and meta.q_stats["q"] == 0.5  # documented q_init = max(q_min, 0.2)
    meta.load_state_dict(meta.state_dict())
    assert meta.q == 0.5


def test_reconfigure_of_q_min_chooses_the_authors_root_again_from_the_kept_statistics():
    # Guards rebound() choosing q again from the statistics (R4): lowering q_min below the root
    # the statistics give must move q to that root; it was only reset to q_init (0.05). The
    # expected root: A and D from the brute-force oracle, the authors' quadratic solved by numpy.
    model, loss, data = mlp_problem(3)
    steps, lr, q0 = 3, 0.01, 0.6
    meta = torch_ufom.MetaOptimizer(model, torch.optim.Adam(model.parameters(), lr=0.01), inner_lr=lr,
                                    steps=steps, mode="ufom", q="auto", q_rule="authors", q_min=q0,
                                    generator=torch.Generator().manual_seed(0))
    params = list(model.parameters())
    gr = brute_force(model, loss, loss, lambda j: data[0], data[1], steps, lr, params, steps)
    g0 = brute_force(model, loss, loss, lambda j: data[0], data[1], steps, lr, params, 0)
    meta.backward(loss, loss, data[0], data[1], force_truncation=steps)  # exact, drawn at q = 0.6
    meta.backward(loss, loss, data[2], data[3], force_truncation=0)
    meta.step()
    assert meta.q == q0
    # The authors' A, and their D: the reweighted estimate's distance (1/q - 1)^2 ||G_r - G_0||^2,
    # divided by 10; costs in inner steps c_f = r + 1, c_x = r(r - 1)/2 + r.
    A = sq_norm(gr)
    D = sq_norm([a - b for a, b in zip(gr, g0)]) * (1 / q0 - 1) ** 2 / 10
    c_f, c_x = steps + 1, steps * (steps - 1) / 2 + steps
    root = max(r.real for r in np.roots([(A - D) * c_x, -D * c_x, -2 * D * c_f]))
    assert 0.01 < root < 0.05  # below the authors' q_init: "chosen again" and "reset" differ
    meta.reconfigure(q_min=0.01)
    assert meta.q == pytest.approx(root, rel=1e-8)


@pytest.mark.parametrize("rule", ["ufom", "authors"])
def test_q_stays_at_q_init_after_a_step_of_first_order_tasks_only(rule):
    # Guards _choose leaving q alone before the first exact observation (A15): with A = D = 0 the
    # rules return q_min, so one first-order task moved q from q_init down to q_min.
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), inner_lr=0.1,
                                    steps=2, q="auto", q_rule=rule, q_min=0.01)
    want = {"ufom": 0.2, "authors": 0.05}[rule]  # the documented q_init, above q_min
    meta.backward(mse, mse, _tiny_task(), _tiny_task(1), force_truncation=0)
    meta.step()
    assert meta.q_stats["n_x"] == 0 and meta.q_stats["n_f"] == 1
    assert meta.q == want


def test_the_authors_root_just_below_its_threshold_is_at_most_1():
    # Guards authors_q's final min(1, .) (A4): just below D = c_x A / (2 (c_f + c_x)) the root rounds
    # to 1.0000000000000002 and Bernoulli(q) then refuses it at every later backward.
    for A, D, c_f, c_x in ((74.16634409849911, 22.24990322954973, 4, 6),  # r = 3: the authors' costs
                           (12.645996618480835, 5.947036247609906, 11, 174)):
        # Exactly (integer arithmetic on the floats' ratios): the quadratic at q = 1,
        # c_x A - 2 D (c_f + c_x), is > 0: D is below the threshold and the positive root below 1.
        (an, ad), (dn, dd) = A.as_integer_ratio(), D.as_integer_ratio()
        assert c_x * an * dd - 2 * (c_f + c_x) * dn * ad > 0
        root = max(r.real for r in np.roots([(A - D) * c_x, -D * c_x, -2 * D * c_f]))
        q = torch_ufom.adaptive.authors_q(A, D, float(c_f), float(c_x), 0.05)
        assert q <= 1.0 and q == pytest.approx(min(root, 1.0), abs=1e-12)
        torch_ufom.truncation.Bernoulli(q)  # a valid law


@pytest.mark.parametrize("q_min", [1e-6, None])
def test_a_huge_hypergradient_only_the_exact_branch_sees_keeps_the_authors_statistics_finite(q_min):
    # Guards the cap after the authors' (1/q - 1)^2 reweighting (bug 1 of review AI): at q = 1e-6 a
    # capped ||G_r - G_0||^2 became inf, q stayed at 1 for good and the own state_dict was refused.
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    scale = torch.ones(2, requires_grad=True)  # read by the outer loss only (G_0 has it too)
    lam = torch.tensor(0.0, requires_grad=True)  # read by the inner loss only (the exact branch)
    x, y = _tiny_task()
    kw = {} if q_min is None else {"q_min": q_min}
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD([*model.parameters(), scale, lam], lr=0.0),
                                    inner_lr=0.1, steps=2, q="auto", q_rule="authors", **kw)
    outer1 = lambda f, b: mse(f, b) + 1e160 * scale.sum()  # noqa: E731 - A huge, D small: q to q_min
    meta.backward(mse, outer1, (x, y), (x, y), force_truncation=2)
    meta.step()
    meta.zero_grad()
    assert meta.q == meta.adaptive.q_min
    inner2 = lambda f, b: mse(f, b) + 1e156 * lam * f(b[0]).sum()  # noqa: E731 - ||G_r - G_0|| ~ 1e156
    meta.backward(inner2, mse, (x, y), (x, y), force_truncation=2)
    meta.step()
    meta.zero_grad()
    assert all(math.isfinite(v) for v in meta.q_stats.values())
    assert meta.q < 1.0
    meta.load_state_dict(meta.state_dict())


def test_a_reduced_state_dict_whose_gradients_are_discarded_holds_no_task():
    # Guards load_state_dict marking a reduced dict's gradients as held (S4): saved after
    # synchronize(), loaded, then the outer optimizer's zero_grad(): synchronize() still returned
    # 2 and a new task was refused as "a task after synchronize()".
    t = _tiny_task(1)

    build = functools.partial(_exact_mean_run, 0.1)
    model, meta = build()
    meta.backward(mse, mse, t, t)
    meta.backward(mse, mse, t, t)
    assert meta.synchronize() == 2
    saved, grads = meta.state_dict(), [p.grad.clone() for p in model.parameters()]

    def resumed():
        model2, meta2 = build()
        for p, g in zip(model2.parameters(), grads):
            p.grad = g.clone()
        meta2.load_state_dict(saved)
        meta2.optimizer.zero_grad()  # discards the reduced gradients (set_to_none)
        return meta2
    assert resumed().synchronize() == 0
    meta2 = resumed()
    meta2.backward(mse, mse, t, t)
    assert meta2.synchronize() == 1


def _resumed_state(monkeypatch, state, saved_rank, here, history=0):
    monkeypatch.setattr(torch_ufom.distributed, "rank", lambda group: here)
    g = torch.Generator().manual_seed(99)
    torch.rand(history, generator=g)  # what this process drew before loading
    torch_ufom.distributed.resume_generator(g, state, saved_rank, None)
    return g.get_state()


def test_resume_generator_gives_every_other_rank_its_own_stream(monkeypatch):
    # Guards the rank mixed into the seed of a resumed stream (D2): rank 0's dict loaded on
    # ranks 1, 2, 3 gave them all one stream (the same truncations and dropout masks).
    state = torch.Generator().manual_seed(1234).get_state()
    states = [_resumed_state(monkeypatch, state, 0, r) for r in (0, 1, 2, 3)]
    assert torch.equal(states[0], state)  # the saver resumes its own stream
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(states[i], states[j]), (i, j)


def test_resume_generator_does_not_depend_on_what_the_loader_drew_before(monkeypatch):
    # Guards set_state before the seed of a resumed stream is drawn (D8): rank 1 loading the same
    # dict after 0 or 5 earlier draws got two different streams: a resumed run not reproducible.
    state = torch.Generator().manual_seed(1234).get_state()
    fresh = _resumed_state(monkeypatch, state, 0, 1, history=0)
    drawn = _resumed_state(monkeypatch, state, 0, 1, history=5)
    assert torch.equal(fresh, drawn) and not torch.equal(fresh, state)


def test_resume_generator_takes_a_dict_saved_without_a_group_as_rank_0_s(monkeypatch):
    # Guards "saved_rank None is rank 0's" (D3): a dict saved without a process group, loaded on
    # rank 0, reseeded the stream instead of resuming it exactly.
    state = torch.Generator().manual_seed(1234).get_state()
    assert torch.equal(_resumed_state(monkeypatch, state, None, 0, history=3), state)
    assert not torch.equal(_resumed_state(monkeypatch, state, None, 1), state)


_PerStep = torch_ufom.inner.PerStep
_NESTEROV_CASES = {
    "dampening-tensor-per-element": (dict(momentum=0.9, dampening=torch.tensor([0.0, 0.1])), False),
    "dampening-dict-one-nonzero": (dict(momentum=0.9, dampening={"w": 0.0, "b": 0.1}), False),
    "dampening-perstep-tensor-one-nonzero": (dict(momentum=0.9, dampening=_PerStep(torch.tensor([0.0, 0.1]))),
                                             False),
    "momentum-perstep-tensor-zero": (dict(momentum=_PerStep(torch.tensor([0.0, 0.0]))), False),
    "dampening-perstep-tensor-zero": (dict(momentum=0.9, dampening=_PerStep(torch.tensor([0.0, 0.0]))), True),
    "momentum-perstep-floats-zero": (dict(momentum=_PerStep([0.0, 0.0])), False),
    "dampening-perstep-floats-zero": (dict(momentum=0.9, dampening=_PerStep([0.0, 0.0])), True),
    "momentum-tensor-per-element": (dict(momentum=torch.tensor([0.0, 0.9])), True),
}


@pytest.mark.parametrize("case", list(_NESTEROV_CASES))
def test_nesterov_follows_torch_optim_for_every_form_of_momentum_and_dampening(case):
    # Guards _zero_everywhere (N1, N2, N3): torch.optim refuses Nesterov when the momentum is zero
    # everywhere or the dampening nonzero anywhere; per-element tensors, dicts and PerStep values
    # were read by their first or any entry, or not at all (Nesterov then ran with dampening).
    kw, accepted = _NESTEROV_CASES[case]
    if accepted:
        torch_ufom.inner.SGD(0.1, nesterov=True, **kw)
    else:
        with pytest.raises(ValueError, match="nesterov"):
            torch_ufom.inner.SGD(0.1, nesterov=True, **kw)


@pytest.mark.parametrize("entry", ["backward", "backward_batch"])
def test_a_learned_inner_lr_is_range_checked_at_most_once_per_outer_step(entry, monkeypatch):
    # Guards the remembered versions of the checked hyperparameters (H3): once an outer step had
    # moved a learned inner_lr, every later task checked its range again (a device sync each).
    calls = []
    rule_cls = torch_ufom.inner.InnerRule
    in_range, check = rule_cls.tensors_in_range, rule_cls._check_values
    monkeypatch.setattr(rule_cls, "tensors_in_range", lambda self: (calls.append(1), in_range(self))[1])
    monkeypatch.setattr(rule_cls, "_check_values", lambda self: (calls.append(1), check(self))[1])
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    lr = torch.tensor(0.1, requires_grad=True)
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD([*model.parameters(), lr], lr=0.01),
                                    inner_lr=lr, steps=2, mode="exact")
    tasks = [_tiny_task(i) for i in range(2)]
    stacked = tuple(torch.stack(t) for t in zip(*tasks))
    per_step = []
    for _ in range(3):
        calls.clear()
        before = lr.detach().clone()
        for _ in range(3):
            if entry == "backward":
                meta.backward(mse, mse, tasks[0], tasks[1])
            else:
                meta.backward_batch(mse, mse, stacked, stacked)
        meta.step()
        meta.zero_grad()
        assert not torch.equal(lr.detach(), before)  # the outer step moved it
        per_step.append(len(calls))
    # Checked once after each change (the constructor checked the first values), not once per call.
    assert max(per_step) <= 1 and per_step[1:] == [1, 1]


@pytest.mark.parametrize("rule", ["optimal_q", "authors_q"])
def test_the_rules_name_a_negative_c_x(rule):
    # Guards the c_x range check (A7): c_x = -1 returned q = 1 instead of an error naming it.
    with pytest.raises(ValueError, match="Invalid c_x: "):
        getattr(torch_ufom.adaptive, rule)(1.0, 0.1, 4.0, -1.0, 0.05)


def test_the_authors_rule_names_a_zero_c_x():
    # Guards authors_q's c_x > 0 check (A8): c_x = 0 returned q = 1 instead of an error.
    with pytest.raises(ValueError, match=r"Invalid c_x: 0\.0 \(expected a float > 0\)"):
        torch_ufom.adaptive.authors_q(1.0, 0.1, 4.0, 0.0, 0.05)


def test_adaptive_q_repr_shows_q_init():
    # Guards AdaptiveQ's repr (A12): two configurations that differ in q_init printed the same.
    assert "q_init=0.3" in repr(AdaptiveQ(q_min=0.1, q_init=0.3))


@pytest.mark.parametrize("mode", ["fom", "exact"])
def test_a_non_finite_inner_loss_with_a_finite_gradient_is_reported(mode):
    # Guards the forward pass's inner losses in the finiteness check (AO E14): a loss of -inf
    # whose gradient is finite returned finite hypergradients with the check dropped.
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(5, 3), torch.randn(5, 1)

    def outer(f, b):
        return ((f(b[0]) - b[1]) ** 2).mean()

    def inner(f, b):
        return outer(f, b) + torch.tensor(-math.inf)
    with pytest.raises(FloatingPointError, match="inner_loss is not finite at inner step 1"):
        torch_ufom.hypergrad(model, inner, outer, (x, y), (x, y), steps=3, inner_lr=0.1, mode=mode)


def test_a_seeded_rerun_of_the_sgd_fast_path_counts_each_step_once():
    # AO E13: the fast path ran again, seeded, when a later step drew random numbers that step 1
    # did not (SweepLog.rewind, gone since the random streams are kept from the first step:
    # review s36C); a flipped sign there reported 12 forward steps for 4, which q="auto"'s cost
    # model reads.
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(5, 3), torch.randn(5, 1)

    def inner(f, b):
        out = f(b[0])
        if b[2]:
            out = out + 1e-3 * torch.randn_like(out)
        return ((out - b[1]) ** 2).mean()

    def outer(f, b):
        return ((f(b[0]) - b[1]) ** 2).mean()
    support = torch_ufom.StepBatches([(x, y, j > 0) for j in range(4)])
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.0), inner_lr=0.1,
                                    steps=4, mode="fom")
    res = meta.backward(inner, outer, support, (x, y))
    assert (res.forward_steps, res.reverse_steps) == (4, 0)


@pytest.mark.parametrize("law, survival", [
    (torch_ufom.truncation.Bernoulli(0.3), [1.0, 0.3, 0.3, 0.3]),
    (torch_ufom.truncation.Geometric(0.8, 0.6), [1.0, 0.8, 0.8 * 0.6, 0.8 * 0.6 ** 2]),
])
def test_a_truncation_draw_is_decided_by_one_float64_uniform(law, survival):
    # Guards the dtype of TruncationLaw.sample's uniform (AO T07): float32 uniforms (a 2**-24
    # grid, P(K >= k) rounded up to it) drew other K than the float64 uniform of the same state.
    steps = len(survival) - 1
    for seed in range(100):
        g = torch.Generator().manual_seed(seed)
        ref = torch.Generator()
        ref.set_state(g.get_state())
        u = torch.rand((), generator=ref, dtype=torch.float64).item()
        want = max(k for k in range(steps + 1) if u >= 1.0 - survival[k])  # P(K >= k) = survival[k]
        assert law.sample(steps, g) == want, seed
        assert torch.equal(g.get_state(), ref.get_state()), seed  # exactly that one uniform drawn


def test_a_budget_sized_mixed_sweep_is_sized_by_its_exact_records(monkeypatch):
    # Guards _probe's exact measurement of a sweep whose first steps are first-order (AO S10): with
    # the probe measured as a first-order record, a budget that holds first-order records but not
    # exact ones kept every exact graph (forward_steps 3), silently above max_memory.
    seen = []
    sized = torch_ufom.schedules.budget_slots

    def spy(steps, state_bytes, record_bytes, max_memory=None, node_bytes=0, hvp_bytes=0):
        seen.append((steps, state_bytes, record_bytes, node_bytes))
        return sized(steps, state_bytes, record_bytes, max_memory, node_bytes, hvp_bytes)
    monkeypatch.setattr(torch_ufom.schedules, "budget_slots", spy)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1))
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    steps, K = 6, 3

    def run(mode, **kw):  # weight decay: neither additive nor first-order identity, so n = steps
        meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.0),
                                        inner=torch_ufom.inner.SGD(lr=0.1, weight_decay=0.1), steps=steps,
                                        mode=mode, memory="checkpoint", **kw)
        return meta.backward(mse, mse, (x, y), (x, y))
    run("fom", max_memory=1 << 40)  # (a budget given: the default measures nothing up to 128 steps)
    run("exact", max_memory=1 << 40)
    (_, S, G_fo, N_fo), (_, S_exact, G, N) = seen
    assert S_exact == S and G > 2 * G_fo  # an exact record keeps its graph
    # The probe of a mixed sweep: an exact record that keeps its gradient for the first-order VJP too.
    G += sum(p.numel() * p.element_size() for p in model.parameters())
    sched = torch_ufom.schedules
    W = sched.WORK_RECORDS * G + sched.WORK_NODES * N + sched.WORK_STATES * S
    budget = steps * (G_fo + N_fo + S) + int(sched.WORK_RECORDS * G_fo + sched.WORK_NODES * N_fo
                                             + sched.WORK_STATES * S) + 1
    assert budget < steps * (G + N + S) + W  # first-order records fit, exact ones do not
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # below the least memory: one slot, said by a warning
        res = run("truncated", k=K, max_memory=budget)
    assert seen[-1] == (steps, S, G, N)  # sized by the exact records' bytes
    # docs/maths.md's count for n = steps > slots = c: t n - C(c+t, c+1) + (n - K).
    c = min(steps - 1, max(1, math.floor((budget - W) / (sched.SLOT_STATES * S))))
    t = next(t for t in range(1, steps + 1) if math.comb(c + t, c) >= steps)
    assert (res.forward_steps, res.reverse_steps) == (t * steps - math.comb(c + t, c + 1) + steps - K, K)


@pytest.mark.parametrize("memory, slots", [("store", None), ("recompute", None), ("checkpoint", 4),
                                           ("checkpoint", 2)])
def test_a_rule_with_weight_decay_rebuilds_only_the_last_K_steps(memory, slots):
    # Guards InnerLoop.record's `j > exact_after` (AO U01): a rule that sweeps all r steps (weight
    # decay) rebuilt step r - K with a graph too: K + 1 exact records, one forward step fewer.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    r, K = 4, 2
    kw = {} if slots is None else {"slots": slots}
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.0),
                                    inner=torch_ufom.inner.SGD(lr=0.1, weight_decay=0.1), steps=r,
                                    mode="truncated", k=K, memory=memory, **kw)
    res = meta.backward(mse, mse, (x, y), (x, y))
    n = r  # docs/maths.md's count table: the schedule covers all r steps
    if memory == "recompute":
        forward = r + n * (n - 1) // 2 + (n - K)
    elif memory == "checkpoint" and n > slots:
        c = slots
        t = next(t for t in range(1, n + 1) if math.comb(c + t, c) >= n)
        forward = (r - n) + t * n - math.comb(c + t, c + 1) + (n - K)
    else:  # store, and checkpoint with n <= slots
        forward = r - K
    assert (res.forward_steps, res.reverse_steps) == (forward, K)


def test_each_vectorised_truncation_group_runs_under_its_own_tasks_stream():
    # Guards the seed of a vectorised group (AO F06): every group ran under task 0's seed, so
    # tasks of different groups got the same random numbers (dropout masks), not their own.
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)

    def outer(f, b):
        noise = torch.rand(3)
        return mse(f, b) + 1e-3 * noise.sum(), noise

    def meta(**kw):
        return torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.0), inner_lr=0.1,
                                        steps=2, mode="ufom", q=0.5,
                                        generator=torch.Generator().manual_seed(1), **kw)
    forced = [0, 2]  # two groups of one task each
    stacked = (x.expand(2, 8, 3), y.expand(2, 8, 1))
    res = meta(vectorise=True).backward_batch(mse, outer, stacked, stacked, force_truncation=forced)
    assert [r.batch_path for r in res] == ["vectorised"] * 2
    # The reference: a loop of single-task calls, which draws the same (K, seed) in task order.
    single = meta(vectorise=False)
    want = [single.backward(mse, outer, (x, y), (x, y), force_truncation=k).aux for k in forced]
    assert not torch.equal(want[0], want[1])
    for got, ref in zip(res, want):
        assert torch.equal(got.aux, ref)


def test_the_vectorised_path_names_every_normalisation_vmap_differentiates_wrongly():
    # Guards F.layer_norm's entry in the probe's table (AO V04): with it dropped, a LayerNorm beside
    # a BatchNorm was found only at the ATen level, whose names are read only when the F.* table
    # finds none, and the reason for forward-over-reverse named the BatchNorm alone.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.LayerNorm(6),
                          nn.Tanh(), nn.Linear(6, 1))
    tasks = (torch.randn(2, 5, 3), torch.randn(2, 5, 1))
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.0), inner_lr=0.1,
                                    steps=2, mode="exact", vectorise=True)
    for res in meta.backward_batch(mse, mse, tasks, tasks):
        assert res.batch_path.startswith("vectorised: forward-over-reverse"), res.batch_path
        assert "BatchNorm with batch statistics, LayerNorm with weights twice wrongly" in res.batch_path


# -- review DE (session 18): backward() in a loss, callable batches, buffers with a graph, ---------
# -- functional_call's read-back, fom's warning per tensor, bound-method losses, weak submodules, --
# -- a loss that calls the library -------------------------------------------------------------------

_DE_LR = 0.1


def _de_mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))


def _de_sq(f, b):
    return (f(b) ** 2).mean()


def _de_fresh(batch):
    """The batch as new leaves (same requires_grad): a loss's own derivative is a partial one."""
    if isinstance(batch, (tuple, list)):
        return tuple(_de_fresh(t) for t in batch)
    return batch.detach().requires_grad_(batch.requires_grad)


def _de_oracle(model, inner, outer, batch, query, steps):
    """The exact hypergradient by one float64 unrolled graph, every loss call on fresh batch leaves
    (``batch(j)`` gives step ``j``'s batch, 0-based), as in test_inner_differentiation.py."""
    phi = dict(model.named_parameters())

    def at(phi):
        return lambda *a: functional_call(model, phi, a)

    for j in range(steps):
        gs = torch.autograd.grad(inner(at(phi), _de_fresh(batch(j))), list(phi.values()), create_graph=True)
        phi = {n: p - _DE_LR * g for (n, p), g in zip(phi.items(), gs)}
    return torch.autograd.grad(outer(at(phi), _de_fresh(query)), list(model.parameters()))


def _pinn_tensor_backward(f, x):
    """du/dx by ``Tensor.backward(inputs=..., create_graph=True)`` instead of autograd.grad."""
    u = f(x)
    x.grad = None
    u.sum().backward(inputs=[x], create_graph=True)
    du, x.grad = x.grad, None
    return ((du - torch.cos(3 * x)) ** 2).mean() + (u ** 2).mean()


def _pinn_autograd_backward(f, x):
    """du/dx by ``torch.autograd.backward(..., inputs=..., create_graph=True)``."""
    u = f(x)
    x.grad = None
    torch.autograd.backward(u.sum(), inputs=[x], create_graph=True)
    du, x.grad = x.grad, None
    return ((du - torch.cos(3 * x)) ** 2).mean() + (u ** 2).mean()


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("memory", ["store", "checkpoint"])
@pytest.mark.parametrize("loss", [_pinn_tensor_backward, _pinn_autograd_backward],
                         ids=["Tensor.backward", "autograd.backward"])
def test_a_loss_that_differentiates_with_backward_is_exact_and_refused_by_fwdrev(loss, memory):
    # Guards Tensor.backward / torch.autograd.backward among the calls that say a loss differentiates
    # (M02): with autograd.grad alone such a loss was chained through the earlier steps, 17.5 % off
    # under store and checkpoint, and fwdrev failed inside the HVP instead of refusing.
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(6, 1, generator=g) * 2 - 1).requires_grad_()  # the caller's leaf, made once
    xq = (torch.rand(6, 1, generator=g) * 2 - 1).requires_grad_()
    model, steps = _de_mlp(3), 3
    want = _de_oracle(model, loss, loss, lambda j: x, xq, steps)
    got = torch_ufom.hypergrad(model, loss, loss, x, xq, steps=steps, inner_lr=_DE_LR, mode="exact",
                               memory=memory)
    assert rel_err(got, want) < 1e-10
    with pytest.raises(ValueError, match=r"'fwdrev' cannot run a loss that calls torch\.autograd"):
        torch_ufom.hypergrad(model, loss, loss, x, xq, steps=steps, inner_lr=_DE_LR, mode="exact",
                             hvp="fwdrev", memory=memory)


@pytest.mark.parametrize("memory", ["store", "checkpoint"])
def test_a_loss_that_differentiates_at_later_steps_only_with_a_callable_batch(memory):
    # Guards callables among the per-step batches whose every step is watched (M11): a callable
    # j -> batch was taken for one batch for every step, the data fit at step 1 stood for all, and
    # the PDE residual at steps 2 and 3 was chained through step 1: 19.4 % off.
    g = torch.Generator().manual_seed(3)
    model = _de_mlp(3)
    x = (torch.rand(6, 1, generator=g) * 2 - 1).requires_grad_()
    y = torch.sin(2 * x.detach())
    batches = [(torch.tensor(0), x, y), (torch.tensor(1), x, y), (torch.tensor(1), x, y)]
    q = (torch.tensor(0), torch.rand(5, 1, generator=g), torch.rand(5, 1, generator=g))

    inner, outer = flagged_pinn, flagged_pinn_outer

    want = _de_oracle(model, inner, outer, lambda j: batches[j], q, 3)
    got = torch_ufom.hypergrad(model, inner, outer, lambda j: batches[j], q, steps=3, inner_lr=_DE_LR,
                               mode="exact", memory=memory)
    assert rel_err(got, want) < 1e-10


class _RunCenterWithGraph(nn.Module):
    """Centres by a running mean the forward reassigns from a value with a graph (no detach)."""

    def __init__(self, d):
        super().__init__()
        self.register_buffer("rm", torch.linspace(-0.4, 0.4, d))

    def forward(self, h):
        self.rm = 0.7 * self.rm + 0.3 * h.mean(0)  # the buffer now carries this step's graph
        return torch.tanh(h - self.rm)


@pytest.mark.parametrize("memory", ["store", "checkpoint"])
def test_a_buffer_reassigned_with_a_graph_reaches_the_next_step_detached(memory):
    # Guards the detach of the buffers a step hands to the next (M21): docs/porting.md says an
    # update made with a graph is differentiated within its own step and reaches the next one
    # detached; without the detach the next steps differentiated through it, 19.1 % off.
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), _RunCenterWithGraph(4), nn.Linear(4, 2))
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(6, 3, generator=g), torch.randn(6, 2, generator=g))
    q = (torch.randn(5, 3, generator=g), torch.randn(5, 2, generator=g))
    steps, lr = 3, 0.5
    # The oracle: a copy of the module called as a module, its parameter entries replaced by the
    # unrolled tensors, its buffer detached between steps.
    m = copy.deepcopy(model)
    slots = [(mod, n) for mod in m.modules() for n in mod._parameters]
    leaves = list(model.parameters())

    def put(phi):
        for (mod, n), t in zip(slots, phi, strict=True):
            mod._parameters[n] = t

    phi = leaves
    for _ in range(steps):
        put(phi)
        gs = torch.autograd.grad(mse(m, s), phi, create_graph=True)
        phi = [p - lr * gr for p, gr in zip(phi, gs)]
        m[1].rm = m[1].rm.detach()
    put(phi)
    want = torch.autograd.grad(mse(m, q), leaves)
    rm0 = model[1].rm.clone()
    got = torch_ufom.hypergrad(model, mse, mse, s, q, steps=steps, inner_lr=lr, mode="exact", memory=memory)
    assert rel_err(got, want) < 1e-10
    assert torch.equal(model[1].rm, rm0)


class _EMACentre(nn.Module):
    """A linear layer fed ``x`` minus a running mean the forward replaces (``self.rm = ...``)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.register_buffer("rm", torch.zeros(2))

    def forward(self, x):
        self.rm = 0.5 * self.rm + 0.5 * x.mean(0).detach()
        return self.lin(x - self.rm)


class _TwoPaths(nn.Module):
    """The same submodule reached by two paths (``a.*`` and ``b.*``)."""

    def __init__(self):
        super().__init__()
        self.a = _EMACentre()
        self.b = self.a

    def forward(self, x):
        return self.b(x)


@pytest.mark.parametrize("path", ["swap_none", "second_path"])
def test_a_functional_model_on_the_functional_call_path_keeps_the_buffers_the_forward_replaced(path):
    # Guards the read-back after the forward on FunctionalModel's functional_call path (M18): a
    # buffer the forward replaced never advanced there (the outputs stayed those of the first call).
    # That path runs for swap=None and for names the swap does not know (a second path's names).
    import copy

    torch.manual_seed(0)
    if path == "swap_none":
        model, prefix, swap = _EMACentre(), "", dict(swap=None)
    else:
        model, prefix, swap = _TwoPaths(), "b.", {}
    sub = model if path == "swap_none" else model.a
    x = torch.randn(4, 2)
    w, b = sub.lin.weight.detach() * 1.5, sub.lin.bias.detach() - 0.25  # not the module's own values
    fm = torch_ufom.FunctionalModel(model, {f"{prefix}lin.weight": w, f"{prefix}lin.bias": b},
                                    {f"{prefix}rm": torch.zeros(2)}, **swap)
    got = [fm(x).detach() for _ in range(3)]
    # The reference: a copy of the submodule with these entries, called as a module three times.
    ref = copy.deepcopy(sub)
    with torch.no_grad():
        ref.lin.weight.copy_(w)
        ref.lin.bias.copy_(b)
    ref.rm = torch.zeros(2)
    want = [ref(x).detach() for _ in range(3)]
    assert rel_err(got, want) < 1e-12
    assert rel_err([fm.buffers[f"{prefix}rm"]], [ref.rm]) < 1e-12
    assert not torch.equal(got[0], got[2])


def test_fom_names_a_second_meta_parameter_without_a_hypergradient_once():
    # Guards "once per tensor" of fom's warning (M35): with a single flag for the whole optimizer,
    # a tensor added after the first warning (add_param_group) was never named.
    model = _de_mlp(0)
    l2 = torch.tensor(0.1, requires_grad=True)
    l1 = torch.tensor(0.2, requires_grad=True)
    x, xq = torch.rand(5, 1), torch.rand(5, 1)

    def inner(f, b):
        return ((f(b) ** 2).mean() + l2 * sum((p ** 2).sum() for p in f.parameters())
                + l1 * sum(p.abs().sum() for p in f.parameters()))

    def outer(f, b):
        return (f(b) ** 2).mean()

    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(list(model.parameters()) + [l2], lr=0.01),
                                    steps=2, inner_lr=_DE_LR, mode="fom")

    def messages():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            meta.backward(inner, outer, x, xq)
        return [str(w.message) for w in caught if "gives no hypergradient" in str(w.message)]

    first = messages()
    assert len(first) == 1 and "param_groups[0]['params'][6]" in first[0]
    assert "param_groups[1]" not in first[0]
    meta.optimizer.add_param_group({"params": [l1]})
    second = messages()
    assert len(second) == 1 and "param_groups[1]['params'][0]" in second[0]
    assert "param_groups[0]" not in second[0]  # the first tensor is not named again
    assert messages() == []
    assert l2.grad is None and l1.grad is None


def test_bound_method_losses_are_recognised_on_the_next_call(monkeypatch):
    # Guards the bound-method equality of the remembered losses (M38): a bound method is a new
    # object at every attribute access, so with identity alone every call probed the losses again
    # and tried vmap again before the per-task loop.
    import torch_ufom.functional as functional
    from torch._C._functorch import is_batchedtensor

    probes = []
    real_probe = functional.probe_steps

    def counted(*a, **kw):
        probes.append(1)
        return real_probe(*a, **kw)

    monkeypatch.setattr(functional, "probe_steps", counted)

    class Task:
        def __init__(self):
            self.batched = []

        def inner(self, f, b):
            self.batched.append(is_batchedtensor(b))
            scale = 1 + 0 * b.sum().item()  # .item() fails under vmap
            return (f(b) ** 2).mean() * scale

        def outer(self, f, b):
            return (f(b) ** 2).mean()

    t = Task()
    model = _de_mlp(0)
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.01), steps=2,
                                    inner_lr=_DE_LR, mode="fom", vectorise=True)
    g = torch.Generator().manual_seed(0)
    supports, queries = torch.rand(3, 5, 1, generator=g), torch.rand(3, 5, 1, generator=g)
    with pytest.warns(UserWarning, match="per-task loop: an error under torch.func.vmap"):
        meta.backward_batch(t.inner, t.outer, supports, queries)
    assert len(probes) == 1 and any(t.batched)
    for _ in range(2):
        probes.clear()
        t.batched.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once per optimizer
            res = meta.backward_batch(t.inner, t.outer, supports, queries)
        assert probes == [] and not any(t.batched)  # neither a probe nor vmap again: the loop at once
        assert all(r.batch_path.startswith("per-task") for r in res), [r.batch_path for r in res]


def test_a_meta_optimizer_does_not_keep_a_replaced_submodule_alive():
    # Guards the weak references to the submodules the remembered findings are for (M40): held
    # strongly, a submodule the user replaced after a meta-batch stayed alive with the optimizer.
    import gc
    import weakref

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1))
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.01), steps=2,
                                    inner_lr=_DE_LR, mode="exact", vectorise=True)
    g = torch.Generator().manual_seed(0)
    supports, queries = torch.rand(3, 5, 1, generator=g), torch.rand(3, 5, 1, generator=g)
    meta.backward_batch(_de_sq, _de_sq, supports, queries)
    meta.step()
    old = weakref.ref(model[0])
    model[0] = nn.Linear(1, 4)
    gc.collect()
    assert old() is None


def test_a_loss_that_calls_the_library_returns():
    # Guards the reentrant process lock (M43): a sweep holds it while it runs the losses, so with a
    # plain Lock an inner loss that itself calls the library (here adapt of an auxiliary model)
    # waited for it forever.
    import threading

    aux = _de_mlp(7)
    g = torch.Generator().manual_seed(2)
    xa, x, xq = (torch.rand(n, 1, generator=g) for n in (4, 5, 5))

    def inner(f, b):
        fa = torch_ufom.adapt(aux, _de_sq, xa, steps=1, inner_lr=_DE_LR)  # a nested call
        c = fa(xa).detach().mean()
        return ((f(b) - c) ** 2).mean()

    model = _de_mlp(1)
    out = {}

    def run():
        out["got"] = torch_ufom.hypergrad(model, inner, _de_sq, x, xq, steps=2, inner_lr=_DE_LR,
                                          mode="exact")

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "hypergrad did not return: a loss that calls the library deadlocked"
    want = _de_oracle(model, inner, _de_sq, lambda j: x, xq, 2)
    assert rel_err(out["got"], want) < 1e-10


# -- review s36M: a mixin or __getattribute__ of the user's, track_buffers after a load, diagnose's ----
# -- derived buffers, stale None-buffer notes, hooks under "mean", a task's note added once -------------

class _S36Half(torch_ufom.inner.InnerRule):
    """A mixin of the user's: every hyperparameter the rule reads is halved."""

    def _get(self, hyper, key, name, count, like):
        return 0.5 * torch_ufom.inner.InnerRule._get(self, hyper, key, name, count, like)


class _S36Mixed(torch_ufom.inner.SGD, _S36Half):  # MRO: SGD before the mixin; SGD.update calls its _get
    pass


def _s36_halved_update(self, grads, state, params, hyper):
    return torch_ufom.inner.SGD.update(self, {n: 0.5 * g for n, g in grads.items()}, state, params, hyper)


class _S36Served(torch_ufom.inner.SGD):
    """An SGD whose __getattribute__ serves an update that halves the gradients."""

    def __getattribute__(self, name):
        if name == "update":
            return _s36_halved_update.__get__(self)
        return object.__getattribute__(self, name)


def _s36_rule_is_half_the_rate(rule_class, mode):
    from torch_ufom.inner import own_code, shortcut

    rule = rule_class(0.1)
    assert own_code(rule) and rule.plain_rate is None
    assert not shortcut(rule, "first_order_additive")
    model, loss, data = mlp_problem(3)
    got = torch_ufom.hypergrad(model, loss, loss, data[0], data[1], steps=3, inner=rule, mode=mode)
    want = torch_ufom.hypergrad(model, loss, loss, data[0], data[1], steps=3, inner_lr=0.05, mode=mode)
    assert rel_err(got, want) < 1e-10


@pytest.mark.parametrize("mode", ["fom", "exact"])
def test_a_mixin_after_the_built_in_rule_in_the_mro_is_the_users_code(mode):
    # Guards own_code (review s36M, M07): stopping at the first built-in class of the MRO missed a
    # mixin after SGD (review KI F2), so SGD's shortcuts ran at lr 0.1 instead of the halved 0.05.
    _s36_rule_is_half_the_rate(_S36Mixed, mode)


@pytest.mark.parametrize("mode", ["fom", "exact"])
def test_a_getattribute_serving_another_update_is_the_users_code(mode):
    # Guards _has_code's _CODE_DUNDERS (review s36M, M05): a class whose __getattribute__ serves
    # another update (review KI F3) kept SGD's shortcuts and plain_rate without them.
    _s36_rule_is_half_the_rate(_S36Served, mode)


def test_a_load_drops_the_pending_buffer_statistics_of_the_optimizer_it_loads_into():
    # Guards load_state_dict's reset of the pending track_buffers statistics (review s36M, M52; review
    # s32L F4): kept, the replaced tasks' running statistics were averaged into the ones step() writes.
    import copy

    steps = 2

    def make():
        torch.manual_seed(1)
        model = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 1))
        meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.0), inner_lr=0.1,
                                        steps=steps, mode="fom", track_buffers=True)
        return model, meta

    g = torch.Generator().manual_seed(0)

    def batch(shift=0.0):
        return (torch.randn(8, 3, generator=g) + shift, torch.randn(8, 1, generator=g))

    saved_task, own, new = (batch(), batch()), batch(3.0), (batch(), batch())
    model, meta = make()
    meta.zero_grad()
    meta.backward(mse, mse, *saved_task)
    saved, grads = copy.deepcopy(meta.state_dict()), [p.grad.clone() for p in model.parameters()]
    model, meta = make()
    meta.zero_grad()
    for _ in range(2):
        meta.backward(mse, mse, own, own)  # this optimizer's own pending tasks, replaced by the load
    meta.load_state_dict(saved)
    for p, gr in zip(model.parameters(), grads):
        p.grad = gr.clone()
    meta.backward(mse, mse, *new)
    meta.step()
    # By hand: BatchNorm first, so its batches do not depend on the parameters; momentum 0.1 over the
    # new task's forwards (the support at each inner step, then the query) from the initial statistics.
    mean, var = torch.zeros(3), torch.ones(3)
    for x in [new[0][0]] * steps + [new[1][0]]:
        mean, var = 0.9 * mean + 0.1 * x.mean(0), 0.9 * var + 0.1 * x.var(0)
    assert rel_err([model[0].running_mean, model[0].running_var], [mean, var]) < 1e-12


def test_diagnose_refuses_a_buffer_computed_from_a_meta_parameter():
    # Guards diagnose's check_derived_buffers (review s36M, M42; review s34M F2): without it a buffer
    # computed from a learned tensor was read as a constant, and Diagnosis.A silently lost its terms.
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x) * self.scale

    torch.manual_seed(0)
    raw = torch.tensor(0.4, requires_grad=True)
    model = Scaled()
    model.register_buffer("scale", F.softplus(raw))
    sup = (torch.randn(6, 3), torch.randn(6, 2))
    with pytest.raises(ValueError, match=r"its buffer 'scale' was computed"):
        torch_ufom.diagnose(model, mse, mse, [(sup, sup)], steps=2, inner_lr=0.1,
                            params=list(model.parameters()) + [raw])


def test_a_none_buffer_an_adapted_models_call_set_does_not_refuse_the_next_call():
    # Guards InnerLoop's clear of the None-buffer notes (review s36M, M50; review LC F6): a cache a
    # user's call of adapt()'s model set left a note, and the next hypergrad, whose losses never set
    # it, was refused with a false "inner_loss assigns buffers registered as None".
    class Cached(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)
            self.register_buffer("cache", None)

        def forward(self, x, keep=False):
            if keep:
                self.cache = x  # a cache set on request only (at test time)
            return self.lin(x)

    torch.manual_seed(0)
    model = Cached()
    x, y = torch.randn(5, 3), torch.randn(5, 1)
    fm = torch_ufom.adapt(model, mse, (x, y), steps=2, inner_lr=0.1)
    fm(x, keep=True)
    got = torch_ufom.hypergrad(model, mse, mse, (x, y), (x, y), steps=2, inner_lr=0.1, mode="exact")
    params = list(model.parameters())
    want = brute_force(model, mse, mse, lambda j: (x, y), (x, y), 2, 0.1, params, 2)
    assert rel_err(got, want) < 1e-10


def test_a_post_accumulate_hook_under_mean_is_not_taken_for_an_edit_of_the_users():
    # Guards _post_accumulate's _record after the hooks ran (review s36M, M18): unrecorded, a hook's
    # clip in place (review LB F1's use) was taken at the next task for a change of the user's, and
    # reduction="mean" warned falsely that the gradients were edited before the mean.
    model, loss, data = mlp_problem(4)
    c, steps, lr = 0.05, 2, 0.1
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: p.grad.clamp_(-c, c))
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), inner_lr=lr,
                                    steps=steps, mode="exact", reduction="mean")
    params = list(model.parameters())
    want = [torch.zeros_like(p) for p in params]
    meta.zero_grad()
    tasks = [(data[i], data[10 + i]) for i in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for s, q in tasks:
            meta.backward(loss, loss, s, q)
            g = brute_force(model, loss, loss, lambda j, s=s: s, q, steps, lr, params, steps)
            want = [(w + t).clamp(-c, c) for w, t in zip(want, g)]  # the hook clamps each task's sum
        assert meta.synchronize() == len(tasks)
    assert rel_err([p.grad for p in params], [w / len(tasks) for w in want]) < 1e-10


_S36_ERROR = ValueError("a cached error of the user's")


def test_a_task_raising_the_same_error_object_again_gets_its_note_once():
    # Guards estimate_batch's check that the error has the note already (review s36M, M48): an error
    # object raised again (a cached one) got "(raised by task ...)" once more at every call.
    model, loss, data = mlp_problem(5)

    def outer(f, b):
        if float(b[1].sum()) > 1e3:  # task 1's query only
            raise _S36_ERROR
        return loss(f, b)

    supports = tuple(torch.stack([data[i][k] for i in range(2)]) for k in range(2))
    queries = tuple(torch.stack([data[10 + i][k] for i in range(2)]) for k in range(2))
    queries[1][1] += 1e4
    note = "(raised by task 1 of the meta-batch of 2, run per task)"
    for _ in range(2):
        with pytest.raises(ValueError) as caught:
            torch_ufom.hypergrad_batch(model, loss, outer, supports, queries, steps=2, inner_lr=0.1,
                                       mode="fom", vectorise=False)
        assert caught.value is _S36_ERROR
        assert _S36_ERROR.__notes__.count(note) == 1, _S36_ERROR.__notes__


# -- review s37D: dropout masks per task under vmap, a tensor listed twice over two tasks, a NumPy ----
# -- draw or an unread head at a later step only, adapt_batch with an in-place buffer write, the -------
# -- stacked model of a NumPy-drawing forward ------------------------------------------------------------

def test_identical_vectorised_tasks_draw_their_own_dropout_masks_and_both_hvps_agree():
    # review s37D T1 (mutant V09): a vmap of the inner gradients under randomness="same" gave every task
    # one dropout mask, and fwdrev's products (own masks) then differentiated another function (69 % off).
    torch.manual_seed(0)
    x, y = torch.randn(1, 8, 3).expand(2, 8, 3), torch.randn(1, 8, 1).expand(2, 8, 1)  # two identical tasks
    grads = {}
    for hvp in ("revrev", "fwdrev"):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 1))
        meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), inner_lr=0.3,
                                        steps=3, mode="exact", vectorise=True, hvp=hvp,
                                        generator=torch.Generator().manual_seed(5))
        meta.zero_grad()
        results = meta.backward_batch(mse, mse, (x, y), (x, y))
        assert all(r.batch_path.startswith("vectorised") for r in results), results[0].batch_path
        # Same parameters and batch at step 0: only independent masks make the two losses differ.
        assert results[0].inner_losses[0] != results[1].inner_losses[0]
        grads[hvp] = [p.grad.clone() for p in model.parameters()]
    assert rel_err(grads["fwdrev"], grads["revrev"]) < 1e-10


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_a_tensor_listed_twice_gets_each_of_two_tasks_gradients_once(reduction):
    # review s37D T2 (mutant M24): without the de-duplication of meta_parameters() the tensor's gradient
    # was added twice from the second task on (and divided twice under "mean"): 0.49 / 0.25 off.
    model, loss, data = mlp_problem(2)
    params = list(model.parameters())
    steps, lr = 3, 0.3
    tasks = [(data[i], data[10 + i]) for i in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.optim warns about the duplicate
        opt = torch.optim.SGD(params + [params[0]], lr=0.1)
    meta = torch_ufom.MetaOptimizer(model, opt, inner_lr=lr, steps=steps, mode="exact", reduction=reduction)
    meta.zero_grad()
    for s, q in tasks:
        meta.backward(loss, loss, s, q)
    assert meta.synchronize() == len(tasks)
    per = [brute_force(model, loss, loss, lambda j, s=s: s, q, steps, lr, params, steps) for s, q in tasks]
    want = [sum(t) / (len(tasks) if reduction == "mean" else 1) for t in zip(*per)]
    assert rel_err([p.grad for p in params], want) < 1e-10


def test_a_numpy_draw_at_a_later_step_only_runs_the_loop_and_draws_per_task():
    # review s37D T3 (mutant V20): the later steps' host_draws (and kept) were dropped when the steps'
    # looks were merged: vmap ran the step-1 np.random draw once for every task (0.35 off the loop).
    def inner(f, b):  # step 1's batch has a third entry: that step shifts the targets by NumPy noise
        return ((f(b[0]) - (b[1] + float(np.random.randn()) if len(b) == 3 else b[1])) ** 2).mean()

    torch.manual_seed(0)
    tasks, steps, lr = 3, 2, 0.5
    x, y = torch.randn(tasks, 6, 3), torch.randn(tasks, 6, 1)
    qx, qy = torch.randn(tasks, 6, 3), torch.randn(tasks, 6, 1)
    model = nn.Sequential(nn.Linear(3, 1), nn.Tanh())
    params = list(model.parameters())
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(params, lr=0.0), inner_lr=lr, steps=steps,
                                    mode="exact", vectorise=True)
    meta.zero_grad()
    np.random.seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = meta.backward_batch(inner, mse, torch_ufom.StepBatches([(x, y), (x, y, x)]), (qx, qy))
    assert all(r.batch_path.startswith("per-task loop") for r in results), results[0].batch_path
    np.random.seed(3)  # the loop's order: task by task, one draw at step 1 of each
    shifts = [float(np.random.randn()) for _ in range(tasks)]
    per = [brute_force(model, mse, mse, lambda j, t=t: (x[t], y[t] + shifts[t] if j == 1 else y[t]),
                       (qx[t], qy[t]), steps, lr, params, steps) for t in range(tasks)]
    assert rel_err([p.grad for p in params], [sum(t) for t in zip(*per)]) < 1e-10


class _S37Counted(nn.Module):
    """A forward that counts its calls in a buffer, in place (vmap can run it), and reads the count."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 1)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.seen.add_(1.0)
        return torch.tanh(self.a(x)) * (1 + 0.1 * self.seen)


def test_adapt_batch_with_an_in_place_buffer_write_equals_a_loop_of_adapt():
    # review s37D T4 (mutant A05): without found.written among adapt_batch's reasons to run per task, a
    # vmap-compatible in-place write went through vmap: each task's count came back 0, weights 12.5 % off.
    torch.manual_seed(0)
    tasks, steps, lr = 3, 3, 0.5
    x, y = torch.randn(tasks, 6, 3), torch.randn(tasks, 6, 1)
    torch.manual_seed(1)
    model = _S37Counted()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loop = [torch_ufom.adapt(model, mse, (x[i], y[i]), steps=steps, inner_lr=lr) for i in range(tasks)]
        stacked = torch_ufom.adapt_batch(model, mse, (x, y), steps=steps, inner_lr=lr)
    assert float(model.seen) == 0.0  # the module itself is not changed
    for i, fm in enumerate(loop):
        # Oracle: first-order SGD unrolled here, the count a buffer of the task's own.
        phi, buffers = {n: p.detach() for n, p in model.named_parameters()}, {"seen": torch.zeros(())}
        for _ in range(steps):
            phi = {n: p.requires_grad_() for n, p in phi.items()}
            out = functional_call(model, (phi, buffers), (x[i],))
            g = torch.autograd.grad(((out - y[i]) ** 2).mean(), list(phi.values()))
            phi = {n: (p - lr * gi).detach() for (n, p), gi in zip(phi.items(), g)}
        assert float(buffers["seen"]) == steps  # one forward per step
        names = list(phi)
        assert rel_err([fm.params[n] for n in names], [phi[n] for n in names]) < 1e-12
        assert torch.equal(fm.buffers["seen"], buffers["seen"])
        assert rel_err([stacked.params[n][i] for n in names], [fm.params[n] for n in names]) < 1e-12
        assert torch.equal(stacked.buffers["seen"][i], fm.buffers["seen"])


class _S37LateHead(nn.Module):
    """Head a always; head b only when called with ``use_b=True``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 1), nn.Linear(3, 1)

    def forward(self, x, use_b=False):
        out = torch.tanh(self.a(x))
        return out + torch.tanh(self.b(x)) * out if use_b else out


def test_a_head_the_inner_loss_reads_at_a_later_step_only_gets_its_vectorised_hypergradient():
    # review s37D T5 (mutant V12): the parameters no step reads were taken as the union of the steps'
    # unread sets, not their intersection: the vectorised exact run left that head's .grad None.
    def inner(f, b):  # step 0's batch (x, y): head a only; step 1's (x, y, x): heads a and b
        return ((f(b[0], use_b=len(b) == 3) - b[1]) ** 2).mean()

    torch.manual_seed(0)
    tasks, steps, lr = 2, 2, 0.5
    x, y = torch.randn(tasks, 6, 3), torch.randn(tasks, 6, 1)
    qx, qy = torch.randn(tasks, 6, 3), torch.randn(tasks, 6, 1)
    stacks = [(x, y), (x, y, x)]
    torch.manual_seed(1)
    model = _S37LateHead()
    params = list(model.parameters())
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(params, lr=0.1), inner_lr=lr, steps=steps,
                                    mode="exact", vectorise=True)
    meta.zero_grad()
    results = meta.backward_batch(inner, inner, torch_ufom.StepBatches(stacks), (qx, qy))
    assert all(r.batch_path.startswith("vectorised") for r in results), results[0].batch_path
    # Oracle: each task's SGD unrolled in one graph (oracle.py's brute_force needs every parameter read
    # at every step), summed over the tasks.
    names, want = [n for n, _ in model.named_parameters()], [torch.zeros_like(p) for p in params]
    for t in range(tasks):
        phi = params
        for j in range(steps):
            fm = functools.partial(functional_call, model, dict(zip(names, phi)))
            g = torch.autograd.grad(inner(lambda *a, **k: fm(a, k), tuple(s[t] for s in stacks[j])), phi,
                                    create_graph=True, allow_unused=True)
            phi = [p if gi is None else p - lr * gi for p, gi in zip(phi, g)]
        fm = functools.partial(functional_call, model, dict(zip(names, phi)))
        want = [w + gi for w, gi in zip(want, torch.autograd.grad(inner(lambda *a, **k: fm(a, k),
                                                                         (qx[t], qy[t])), params))]
    assert float(want[2].norm()) > 1e-3  # head b's weight: its hypergradient is not 0
    assert rel_err([p.grad for p in params], want) < 1e-10


def test_the_stacked_model_of_a_numpy_drawing_forward_calls_the_tasks_one_by_one():
    # review s37D T6 (mutant A21): with host draws left out of the stacked model's vectorised flag, its
    # call ran the forward once under vmap and every task got the same NumPy draw (2.16 off task by task).
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 1)

        def forward(self, x):
            return self.a(x) + float(np.random.randn())  # a NumPy-drawn offset per call

    torch.manual_seed(0)
    model = Noisy()
    x, y = torch.randn(3, 6, 3), torch.randn(3, 6, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stacked = torch_ufom.adapt_batch(model, mse, (x, y), steps=2, inner_lr=0.1)
    assert not stacked.vectorised
    np.random.seed(7)
    got = stacked(x)
    np.random.seed(7)  # oracle: each task's adapted linear map, then its own draw, in task order
    want = torch.stack([F.linear(x[i], stacked.params["a.weight"][i], stacked.params["a.bias"][i])
                        + float(np.random.randn()) for i in range(3)])
    assert rel_err([got], [want]) < 1e-12


# -- review s39T (session 39): an init anchoring some parameters only, a retried init's draws, the -----
# -- replay tolerance of fwdrev's products, cuDNN put back as the user had it, prune's recomputed ------
# -- weight put back by both looks, what the outer-aux walk opens (and that it ends), fwdrev refusals' --
# -- type and hints, the name of a written params argument, the CUDA storage rounding -------------------

class _S39PartialAnchor(torch_ufom.inner.InnerRule):
    """SGD pulled towards an anchor at phi_0 for the 2-D weights (``anchored="weights"``) or the
    biases only; the others' state is zeros, which the update does not read."""
    elementwise = True

    def __init__(self, lr, anchored):
        self.hyper, self.anchored = {"lr": lr}, anchored
        self._check_values()

    def _pulled(self, p):
        return (p.dim() == 2) == (self.anchored == "weights")

    def init(self, params):
        return tuple(p.clone() if self._pulled(p) else torch.zeros_like(p) for p in params.values())

    def update(self, grads, state, params, h):
        return {n: p - h["lr"] * (grads[n] + 0.5 * (p - a) * self._pulled(p))
                for (n, p), a in zip(params.items(), state)}, tuple(state)


@pytest.mark.parametrize("anchored", ["weights", "biases"])
def test_an_init_anchoring_some_parameters_only_is_refused(anchored):
    # review s39T G1 (m12): the init check refuses a state whose derivative with respect to ANY learned
    # parameter is nonzero; with `all` in place of `any`, an anchor p.clone() for some parameters only
    # (the others' state zeros) ran, its d(anchor)/d(phi_0) dropped: 1.1e-1 off a brute-force unroll.
    model, loss, data = mlp_problem(41)
    with pytest.raises(ValueError, match=r"Invalid inner: _S39PartialAnchor\.init returned a state whose "
                                         r"derivative"):
        torch_ufom.hypergrad(model, loss, loss, data[0], data[1], steps=3,
                             inner=_S39PartialAnchor(0.1, anchored), mode="exact")


class _S39DrawnScale(torch_ufom.inner.InnerRule):
    """SGD whose step is scaled per entry by ``1 + 0.5 U(0, 1)``, drawn in init from torch's global
    generator and read by the update; ``fails`` makes the init fail where the library runs it first
    (``"numpy"``: p.numpy() on a tensor that requires grad; ``"out"``: an out= write under autograd),
    after its draws. Each call's draws are kept in ``drawn``."""
    elementwise = True

    def __init__(self, lr, fails=None):
        self.hyper, self.fails, self.drawn = {"lr": lr}, fails, []
        self._check_values()

    def init(self, params):
        out = tuple(1 + 0.5 * torch.rand_like(p) for p in params.values())
        primal = torch.autograd.forward_ad.unpack_dual
        self.drawn.append(tuple(primal(s).primal.detach().clone() for s in out))
        for p in params.values():
            if self.fails == "numpy":
                p.numpy()
            elif self.fails == "out":
                torch.mul(p, 1.0, out=torch.empty_like(p))
        return out

    def update(self, grads, state, params, h):
        return {n: p - h["lr"] * s * grads[n] for (n, p), s in zip(params.items(), state)}, tuple(state)


@pytest.mark.parametrize("fails", ["numpy", "out"])
def test_a_retried_init_draws_the_numbers_of_its_first_attempt_and_the_update_reads_them(fails):
    # review s39T G3 (m03, m14, m60): the init check puts torch's generators back before it runs a failed
    # init again, and draws its own tangents from a generator of its own. Without the put_back (m03),
    # with the tangents from the global generator (m14) or with set_torch_random_states leaving the CPU
    # generator (m60), the retry drew other numbers than the first attempt, and than an init that does
    # not fail: another hypergradient. The earlier test's state was never read, so no draw showed.
    model, loss, data = mlp_problem(42)
    names = [n for n, _ in model.named_parameters()]
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    params = [*model.parameters(), lr] if fails == "numpy" else [lr]  # (out=: no parameter checkable)
    got, rules = {}, {}
    for kind in (None, fails):
        rules[kind] = _S39DrawnScale(lr, kind)
        torch.manual_seed(5)
        got[kind] = torch_ufom.hypergrad(model, loss, loss, data[0], data[1], steps=2, inner=rules[kind],
                                         mode="exact", params=params)
    first, = rules[None].drawn  # (an init that does not fail runs once)
    scale = dict(zip(names, first))

    def rule(name, t, p, g, buf):  # (oracle: SGD scaled by the numbers the init that does not fail drew)
        return p - lr * scale[name] * g, buf
    want = brute_force(model, loss, loss, lambda j: data[0], data[1], 2, None, params, 2, rule=rule)
    assert rel_err(got[None], want) < 1e-12
    assert rel_err(got[fails], want) < 1e-12
    assert all(torch.equal(a, b) for a, b in zip(got[fails], got[None], strict=True))
    assert len(rules[fails].drawn) == 2  # (failed once, then ran again: both attempts drew the same)
    assert all(torch.equal(a, b) for drawn in rules[fails].drawn for a, b in zip(drawn, first, strict=True))


@pytest.mark.parametrize("memory", ["store", "checkpoint"])
def test_a_fwdrev_product_whose_batch_moved_by_a_millionth_is_refused(memory):
    # review s39T G2 (m44): a fwdrev product's loss is compared with its step's to sqrt(eps) relative;
    # at eps ** 0.25 (1.2e-4 in float64) a j -> batch callable whose step-2 batch moves by 1e-6 at each
    # call ran, the product differentiating another batch than the step. A batch that does not move
    # runs, exact against a brute-force unroll.
    import collections
    model, loss, data = mlp_problem(43)
    params, query = list(model.parameters()), data[3]
    calls = collections.Counter()

    def moving(j):  # (not a function of j: step 2's batch moves at each call)
        calls[j] += 1
        x, y = data[j]
        return (x + 1e-6 * calls[j] * (j == 1), y)

    def shifted(j):  # (the same shift at every call: a function of j)
        x, y = data[j]
        return (x + 1e-6 * (j == 1), y)
    run = functools.partial(torch_ufom.hypergrad, model, loss, loss, query=query, steps=3, inner_lr=0.1,
                            mode="exact", memory=memory, hvp="fwdrev")
    with pytest.raises(RuntimeError, match="or a forward-over-reverse product"):
        run(support=moving)
    want = brute_force(model, loss, loss, shifted, query, 3, 0.1, params, 3)
    assert rel_err(run(support=shifted), want) < 1e-10


class _S39GRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("start", [False, True])
def test_an_exact_sweep_of_a_recurrent_module_leaves_cudnn_off_where_the_user_turned_it_off(start):
    # review s39T G4 (m54): an exact sweep of a module holding a recurrent layer runs with cuDNN off and
    # then puts the flag back as it was; putting back True instead of the user's value survived, since
    # the test started from enabled=True (and review s39TA F2: the flag inside the sweep is read too).
    # The hypergradient is exact against a brute-force unroll.
    torch.manual_seed(44)
    net = _S39GRU().double()
    support = (torch.randn(5, 6, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64))
    query = (torch.randn(5, 6, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64))
    inside = []
    net.register_forward_pre_hook(lambda module, args: inside.append(torch.backends.cudnn.enabled))
    was = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = start  # (the user's choice)
    try:
        got = torch_ufom.hypergrad(net, mse, mse, support, query, steps=2, inner_lr=0.1, mode="exact",
                                   memory="recompute")
        assert torch.backends.cudnn.enabled is start and inside and not any(inside)
    finally:
        torch.backends.cudnn.enabled = was
    want = brute_force(net, mse, mse, lambda j: support, query, 2, 0.1, list(net.parameters()), 2)
    assert rel_err(got, want) < 1e-10


@pytest.mark.parametrize("look", ["probe", "evaluated"])
def test_a_refused_fwdrev_call_puts_back_the_weight_prune_recomputes(look):
    # review s39T G5 (m52, m51): a call refused after its look puts back the attributes that forward
    # pre-hooks recompute. torch.nn.utils.prune names its attribute `_tensor_name`, not `name` (m52:
    # only `name` read), and a loss reading a meta-parameter directly goes through _evaluated (m51: no
    # put-back there): either left net[0].weight replaced by the look's tensor. The only test of this
    # (legacy spectral_norm) went through probe and `name`.
    from torch.nn.utils import prune
    torch.manual_seed(45)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    prune.l1_unstructured(net[0], "weight", amount=0.3)
    before = net[0].weight
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)

    def stopped(f, b):  # (a stop-gradient through .data: refused after probe's look)
        out = f(b[0])
        return ((out - b[1]) ** 2).mean() + (out.data * out).mean()

    def direct(f, b):  # (reads a meta-parameter directly: refused after _evaluated's look)
        return mse(f, b) + 0.1 * (net[2].weight ** 2).sum()
    loss, said = {"probe": (stopped, "'fwdrev' cannot run a loss with a stop-gradient made under"),
                  "evaluated": (direct, "'fwdrev' cannot differentiate an inner loss that reads a "
                                        "meta-parameter directly")}[look]
    with pytest.raises(ValueError, match=said):
        torch_ufom.hypergrad(net, loss, loss, (x, y), (x, y), steps=2, inner_lr=0.1, mode="exact",
                             hvp="fwdrev")
    assert net[0].weight is before


class _S39Slotted:
    __slots__ = ("logits",)

    def __init__(self, z):
        self.logits = z


class _S39Box:
    def __init__(self, value):
        self.value = value


class _S39Cyclic:
    """An object that refers to itself and holds no tensor."""

    def __init__(self):
        self.me, self.note = self, "no tensor here"


def _s39_aux_run(wrap):
    """backward of an exact sweep whose outer loss returns ``(loss, wrap(logits))``; the model and
    the batch, for an oracle."""
    torch.manual_seed(46)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    batch = (torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64))

    def outer(f, b):
        z = f(b[0])
        return mse(f, b), wrap(z)
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), inner_lr=0.1,
                                    steps=2, mode="exact")
    return model, batch, functools.partial(meta.backward, mse, outer, batch, batch)


@pytest.mark.parametrize("wrap, name", [(_S39Slotted, "_S39Slotted"),
                                        (lambda z: _S39Box(_S39Box(z)), "_S39Box"),
                                        (lambda z: _S39Box([z]), "_S39Box")],
                         ids=["slots", "object_in_an_object", "list_in_an_object"])
def test_an_outer_aux_holding_a_tensor_in_slots_or_deeper_in_is_refused(wrap, name):
    # review s39T G7 (m36, m37, m39): the outer-aux walk opens __slots__, goes deeper than one object, and
    # opens a list inside an object. The earlier test's aux types held the tensor one attribute deep, so
    # not opening __slots__ (m36), stopping after 2 objects (m37) or not opening lists (m39) survived:
    # the aux kept its graph (review s39O F1 again).
    model, _, call = _s39_aux_run(wrap)
    with pytest.raises(ValueError, match=rf"outer_loss: its aux holds tensors in a value of type {name},"):
        call()
    assert all(p.grad is None for p in model.parameters())


def test_a_cyclic_outer_aux_holding_no_tensor_runs_and_the_walk_ends():
    # review s39T G6 (m38): the outer-aux walk skips an object it has seen; without that, an aux that
    # refers to itself made the walk loop forever. Its bound counts every object reached, seen ones
    # too (review s39H2 F6: the test relied on SIGALRM), so such a walk ends refusing the aux. The
    # call's hypergradient is exact against a brute-force unroll and its aux is the object returned.
    made = []

    def wrap(z):
        made.append(_S39Cyclic())
        return made[-1]
    model, batch, call = _s39_aux_run(wrap)
    result = call()
    assert result.aux is made[-1]
    params = list(model.parameters())
    want = brute_force(model, mse, mse, lambda j: batch, batch, 2, 0.1, params, 2)
    assert rel_err([p.grad for p in params], want) < 1e-10


def _s39_fwdrev(support, query):
    model, loss, _ = mlp_problem(47)
    return functools.partial(torch_ufom.hypergrad, model, loss, loss, support, query, steps=2, inner_lr=0.1,
                             mode="exact", memory="store", hvp="fwdrev")


@pytest.mark.parametrize("draws", ["at_step_1", "every_step", "late_calls"])
def test_a_numpy_draw_under_fwdrev_is_refused_as_such_not_as_a_failure_inside_torch_func(draws):
    # review s39T G8 (m26), G10 (m25): a draw from NumPy's global generator where fwdrev's product fetches
    # a step's batch again is refused as FwdRevCannot, raised as it is; wrapped as FwdRevError (m26) it
    # said "failed inside torch.func ... no forward-over-reverse formula", which the earlier test's match
    # still found. With per-step batches each step's first product is watched: watching only the first
    # product of the sweep (m25) ran a sampler that draws, only to log, from its 4th call for step 1 on
    # (its first calls are fwdrev's look, which is not watched for draws), and moved NumPy's stream.
    import collections
    _, _, data = mlp_problem(47)
    calls = collections.Counter()

    def support(j):
        calls[j] += 1
        x, y = data[j]
        if draws == "at_step_1" and j == 0:
            np.random.rand()  # (decides only what to log: the batch is the same)
        elif draws == "late_calls" and j == 0 and calls[j] > 3:
            np.random.rand()
        elif draws == "every_step":
            x = x + 0.1 * torch.from_numpy(np.random.randn(*x.shape))
        return x, y
    with pytest.raises(torch_ufom.fwdrev.FwdRevCannot) as raised:
        _s39_fwdrev(support, data[3])()
    assert type(raised.value) is torch_ufom.fwdrev.FwdRevCannot
    said = str(raised.value)
    assert said.startswith(torch_ufom.fwdrev.FWDREV_DRAWS) and "failed inside torch.func" not in said


def test_a_fwdrev_disagreement_of_a_batch_sampled_anew_at_each_call_names_the_sampler():
    # review s39T G9 (m29): a j -> batch callable returning another batch at each call makes fwdrev's
    # product disagree with reverse mode's; FwdRevDisagrees then names the callable (SAMPLES_ANEW). With
    # step_function=False passed (m29) the hint was gone, and nothing held it.
    import collections
    _, _, data = mlp_problem(47)
    calls = collections.Counter()

    def anew(j):
        calls[j] += 1
        x, y = data[j]
        return x + 0.01 * calls[j] * (j == 1), y
    with pytest.raises(torch_ufom.fwdrev.FwdRevDisagrees) as raised:
        _s39_fwdrev(anew, data[3])()
    assert type(raised.value) is torch_ufom.fwdrev.FwdRevDisagrees
    assert str(raised.value).startswith("Invalid hvp: 'fwdrev' gives another Hessian-vector product")
    assert torch_ufom.batches.SAMPLES_ANEW in str(raised.value)


class _S39WritesParams(torch_ufom.inner.InnerRule):
    """SGD written into its params argument in place (p.sub_)."""
    elementwise = True

    def __init__(self, lr):
        self.hyper = {"lr": lr}
        self._check_values()

    def init(self, params):
        return tuple(torch.zeros_like(p) for p in params.values())

    def update(self, grads, state, params, h):
        return {n: p.sub_(h["lr"] * grads[n]) for n, p in params.items()}, tuple(state)


@pytest.mark.parametrize("mode", ["fom", "exact"])
def test_an_update_writing_into_its_params_argument_is_refused_naming_that_parameter(mode):
    # review s39T G11 (m21): the refusal names the argument written: grads[...] for the first n, state[i]
    # for the next m, params[...] after. With i <= n + m (m21) a write into params' first entry was named
    # "(state[6])", a state that does not exist; the earlier test wrote into grads and state only.
    model, loss, data = mlp_problem(48)
    with pytest.raises(ValueError, match=r"Invalid inner: _S39WritesParams\.update modified an argument in "
                                         r"place \(params\['0\.weight'\]\)"):
        torch_ufom.hypergrad(model, loss, loss, data[0], data[1], steps=2, inner=_S39WritesParams(0.1),
                             mode=mode)


class _S39Storage:
    """A stand-in for a CUDA tensor's untyped storage of ``size`` bytes."""

    def __init__(self, size):
        self.size, self.device = size, torch.device("cuda")

    def nbytes(self):
        return self.size

    def data_ptr(self):
        return 4096


class _S39OnCuda:
    """A stand-in for a tensor on a CUDA device (what _storage reads of one)."""
    layout = torch.strided

    def __init__(self, size):
        self.storage = _S39Storage(size)

    def untyped_storage(self):
        return self.storage


def test_the_memory_of_a_cuda_storage_is_counted_in_whole_512_byte_blocks_rounded_up():
    # review s39T m58 (GPU-only otherwise): CUDA's caching allocator hands out blocks of whole 512-byte
    # units (kMinBlockSize), so a storage of n bytes holds ceil(n / 512) * 512; rounding down (m58) counted
    # a 513-byte storage as 512 bytes and a 1-byte one as none. A CPU storage is counted as it is.
    from torch_ufom.schedules import _storage
    for size in (1, 511, 512, 513, 1024, 1025):
        assert _storage(_S39OnCuda(size)) == (4096, math.ceil(size / 512) * 512)
    t = torch.zeros(3, dtype=torch.float64)
    assert _storage(t) == (t.untyped_storage().data_ptr(), 24)


class _S39WritesWhereDifferentiated(_S39WritesParams):
    """_S39WritesParams that also insists on running where its parameters are differentiated."""

    def update(self, grads, state, params, h):
        if not all(p.requires_grad for p in params.values()):
            raise RuntimeError("this rule runs only where its parameters require grad")
        return super().update(grads, state, params, h)


def test_an_in_place_update_that_fails_when_run_again_is_refused_unnamed():
    # review s39T m23: where autograd refuses the write (exact/store records a step at leaves that require
    # grad), the update runs again at detached copies to name the argument it wrote; an update that fails
    # there is refused without a name (review s38R8 F2), not with its own error (m23 let it through).
    model, loss, data = mlp_problem(49)
    with pytest.raises(ValueError, match=r"Invalid inner: _S39WritesWhereDifferentiated\.update modified an "
                                         r"argument in place \(one of them\)"):
        torch_ufom.hypergrad(model, loss, loss, data[0], data[1], steps=2, mode="exact", memory="store",
                             inner=_S39WritesWhereDifferentiated(0.1))
