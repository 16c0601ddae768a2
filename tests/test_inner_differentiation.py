"""Inner losses that call ``torch.autograd.grad`` themselves: a PINN residual (du/dx, d2u/dx2) and
a gradient-norm penalty over ``f.parameters()`` (ANIL: that includes the frozen body).

Semantics: the inner loss is a function of the adapted parameters phi_t and the batch; each inner
step evaluates it at phi_t as an independent input. So the loss's own ``autograd.grad`` is a
*partial* derivative at the current point: the batch tensors (the PINN's collocation leaf ``x``)
and the frozen parameters enter it as fresh, independent leaves at every step, never through the
unrolled history of the earlier steps. The hypergradient is the derivative through phi_r of the
``create_graph=True`` unroll. The user's ``x`` is made a leaf once, outside the loss (the usual
PINN style), so nothing in the loss itself cuts that history.
"""
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import torch_ufom
from helpers import flagged_pinn, flagged_pinn_outer, mse, rel_err

STEPS, LR, B, Q = 2, 0.1, 3, 0.5
HEAD = ["4.weight", "4.bias"]


def tiny_mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))


def pinn(f, x):
    """u'' + u = sin(3x), u(0) = 0; ``x`` is the caller's leaf, differentiated inside the loss."""
    u = f(x)
    du, = torch.autograd.grad(u.sum(), x, create_graph=True)
    d2u, = torch.autograd.grad(du.sum(), x, create_graph=True)
    return ((d2u + u - torch.sin(3 * x)) ** 2).mean() + (f(torch.zeros(1, 1)) ** 2).sum()


def pinn_unused(f, x):
    """The same PINN with ``allow_unused`` / ``materialize_grads`` (a lost du/dx silently gives 0)
    and a guard that lets a no-grad evaluation through."""
    u = f(x)
    if not u.requires_grad:
        return (u ** 2).mean()
    kw = dict(create_graph=True, allow_unused=True, materialize_grads=True)
    du, = torch.autograd.grad(u.sum(), x, **kw)
    d2u, = torch.autograd.grad(du.sum(), x, **kw)
    return ((d2u + u - torch.sin(3 * x)) ** 2).mean() + (f(torch.zeros(1, 1)) ** 2).sum()


def gradnorm(f, b):
    """mse + 0.1 * ||d mse / d f.parameters()||^2 (every parameter, frozen ones included)."""
    v = mse(f, b)
    gs = torch.autograd.grad(v, list(f.parameters()), create_graph=True)
    return v + 0.1 * sum((g ** 2).sum() for g in gs)


def gradnorm_unused(f, b):
    """The same penalty with ``allow_unused=True`` (a ``None`` drops its term) and a guard."""
    v = mse(f, b)
    if not v.requires_grad:
        return v
    gs = torch.autograd.grad(v, list(f.parameters()), create_graph=True, allow_unused=True)
    return v + 0.1 * sum((g ** 2).sum() for g in gs if g is not None)


def fresh(batch):
    """The batch as new leaves (same requires_grad), cut from anything computed before."""
    if isinstance(batch, (tuple, list)):
        return tuple(fresh(t) for t in batch)
    return batch.detach().requires_grad_(batch.requires_grad)


def oracle(model, inner, outer, support, query, adapted=None, k=STEPS):
    """(G_k, phi_r): float64 brute force with partial-derivative semantics at every loss call."""
    phi = {n: p for n, p in model.named_parameters() if adapted is None or n in adapted}
    frozen = {n: p for n, p in model.named_parameters() if n not in phi}

    class F:
        def __init__(self, phi):  # frozen parameters: an independent alias per loss call
            self.all = {**phi, **{n: p * 1 for n, p in frozen.items()}}

        def __call__(self, *a):
            return functional_call(model, self.all, a)

        def parameters(self):
            return iter(self.all.values())

    for j in range(STEPS):
        exact = j >= STEPS - k
        gs = torch.autograd.grad(inner(F(phi), fresh(support)), list(phi.values()), create_graph=exact)
        phi = {n: p - LR * (g if exact else g.detach()) for (n, p), g in zip(phi.items(), gs)}
    return torch.autograd.grad(outer(F(phi), fresh(query)), list(model.parameters())), phi


def pinn_problem(seed=3, tasks=None):
    g = torch.Generator().manual_seed(seed)
    shape = (6, 1) if tasks is None else (tasks, 6, 1)
    x = (torch.rand(*shape, generator=g) * 2 - 1).requires_grad_()  # made a leaf once, outside
    xq = (torch.rand(*shape, generator=g) * 2 - 1).requires_grad_()
    return tiny_mlp(seed), x, xq


def anil_problem(seed=13, tasks=None):
    g = torch.Generator().manual_seed(seed)
    shape = (6, 1) if tasks is None else (tasks, 6, 1)
    data = []
    for _ in range(2):
        x = torch.rand(*shape, generator=g) * 2 - 1
        data.append((x, torch.sin(2 * x) + 0.1 * torch.randn(*shape, generator=g)))
    return tiny_mlp(seed), data[0], data[1]


# name: (problem, inner loss, outer loss, adapted parameters; None = all)
CASES = {
    "pinn": (pinn_problem, pinn, pinn, None),
    "pinn_unused": (pinn_problem, pinn_unused, pinn, None),
    "anil_gradnorm": (anil_problem, gradnorm, mse, HEAD),
    "anil_gradnorm_unused": (anil_problem, gradnorm_unused, mse, HEAD),
    "gradnorm": (anil_problem, gradnorm, mse, None),  # full adaptation (fwdrev refuses ANIL's body)
}
MEMORY = [dict(memory="store"), dict(memory="recompute"), dict()]  # dict(): the default
MEMORY_IDS = ["store", "recompute", "default"]


def task(t, i):
    return tuple(task(u, i) for u in t) if isinstance(t, (tuple, list)) else t[i]


@pytest.mark.parametrize("mem", MEMORY, ids=MEMORY_IDS)
@pytest.mark.parametrize("case", ["pinn", "anil_gradnorm"])
def test_exact_hypergrad_uses_partial_derivatives(case, mem):
    make, inner, outer, adapted = CASES[case]
    model, s, q = make()
    want, _ = oracle(model, inner, outer, s, q, adapted)
    got = torch_ufom.hypergrad(model, inner, outer, s, q, steps=STEPS, inner_lr=LR, mode="exact",
                               inner_params=adapted, **mem)
    assert rel_err(got, want) < 1e-10


@pytest.mark.parametrize("mem", MEMORY, ids=MEMORY_IDS)
@pytest.mark.parametrize("case", ["pinn", "anil_gradnorm"])
def test_ufom_exact_branch_uses_partial_derivatives(case, mem):
    make, inner, outer, adapted = CASES[case]
    model, s, q = make()
    g0, _ = oracle(model, inner, outer, s, q, adapted, k=0)
    gr, _ = oracle(model, inner, outer, s, q, adapted)
    want = [a + (b - a) / Q for a, b in zip(g0, gr)]  # the telescope at K = r: P_r = q
    got = torch_ufom.hypergrad(model, inner, outer, s, q, steps=STEPS, inner_lr=LR, mode="ufom", q=Q,
                               force_truncation=STEPS, inner_params=adapted, **mem)
    assert rel_err(got, want) < 1e-10


@pytest.mark.parametrize("vectorise", ["auto", True, False])
@pytest.mark.parametrize("case", ["pinn", "anil_gradnorm_unused"])
def test_hypergrad_batch_equals_the_per_task_oracle(case, vectorise):
    make, inner, outer, adapted = CASES[case]
    model, S, Qs = make(tasks=B)
    per_task = [oracle(model, inner, outer, task(S, i), task(Qs, i), adapted)[0] for i in range(B)]
    want = [sum(t) for t in zip(*per_task)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # falling back to the per-task loop is fine
        got = torch_ufom.hypergrad_batch(model, inner, outer, S, Qs, steps=STEPS, inner_lr=LR,
                                         mode="exact", inner_params=adapted, vectorise=vectorise)
    assert rel_err(got, want) < 1e-10


@pytest.mark.parametrize("case", ["pinn", "pinn_unused", "anil_gradnorm", "anil_gradnorm_unused"])
def test_adapt_batch_equals_adapt(case):
    make, inner, outer, adapted = CASES[case]
    model, S, _ = make(tasks=B)
    names = [n for n, _ in model.named_parameters() if adapted is None or n in adapted]
    single = [torch_ufom.adapt(model, inner, task(S, i), steps=STEPS, inner_lr=LR, inner_params=adapted)
              for i in range(B)]
    for i in range(B):  # adapt itself follows the partial-derivative trajectory
        _, phi = oracle(model, inner, outer, task(S, i), task(S, i), adapted)
        assert rel_err([single[i].params[n] for n in names], [phi[n].detach() for n in names]) < 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        batch = torch_ufom.adapt_batch(model, inner, S, steps=STEPS, inner_lr=LR, inner_params=adapted)
    got = [batch.params[n][i] for i in range(B) for n in names]
    assert rel_err(got, [single[i].params[n] for i in range(B) for n in names]) < 1e-10


@pytest.mark.parametrize("case", ["pinn", "gradnorm"])
def test_fwdrev_refuses_a_loss_that_differentiates(case):
    # The probe ran the inner loss under no_grad: torch's "does not require grad" came out of it.
    make, inner, outer, adapted = CASES[case]
    model, s, q = make()
    with pytest.raises(ValueError, match=r"'fwdrev' cannot run a loss that calls torch\.autograd\.grad"):
        torch_ufom.hypergrad(model, inner, outer, s, q, steps=STEPS, inner_lr=LR, mode="exact",
                             hvp="fwdrev", inner_params=adapted)


@pytest.mark.parametrize("mem", ["store", "recompute", "checkpoint"])
def test_a_loss_that_differentiates_at_some_steps_only(mem):
    # The first exact step decided whether the sweep chains the steps' graphs: a loss fitting
    # data at step 1 and a PDE residual at step 2 (on the same leaf x) was chained, 2.6 % off.
    model, x, _ = pinn_problem()
    y = torch.sin(2 * x.detach())
    steps = [(torch.tensor(0), x, y), (torch.tensor(1), x, y)]
    q = (torch.tensor(0), torch.rand(5, 1), torch.rand(5, 1))

    inner, outer = flagged_pinn, flagged_pinn_outer

    phi = dict(model.named_parameters())
    for batch in steps:
        gs = torch.autograd.grad(inner(lambda *a: functional_call(model, phi, a), fresh(batch)),
                                 list(phi.values()), create_graph=True)
        phi = {n: p - LR * g for (n, p), g in zip(phi.items(), gs)}
    want = torch.autograd.grad(outer(lambda *a: functional_call(model, phi, a), q), list(model.parameters()))
    got = torch_ufom.hypergrad(model, inner, outer, torch_ufom.StepBatches(steps), q, steps=2, inner_lr=LR,
                               mode="exact", memory=mem)
    assert rel_err(got, want) < 1e-10


def test_a_loss_written_with_torch_func_vectorises_and_runs_fwdrev():
    # torch.func.grad calls torch.autograd.grad inside its own transform, on its own inputs:
    # such a loss was taken for one that differentiates through the unroll (fwdrev refused,
    # meta-batches ran the loop). It differentiates only its own inputs.
    model = tiny_mlp(0)

    def loss(f, x):
        du = torch.func.vmap(torch.func.grad(lambda xi: f(xi.reshape(1, 1)).sum()))(x)
        return ((du - torch.cos(x)) ** 2).mean() + 0.1 * (f(x) ** 2).mean()

    g = torch.Generator().manual_seed(1)
    xs, xqs = torch.rand(3, 5, 1, generator=g), torch.rand(3, 5, 1, generator=g)
    kw = dict(steps=STEPS, inner_lr=LR, mode="exact")
    want = [oracle(model, loss, loss, xs[i], xqs[i])[0] for i in range(3)]
    for i in range(3):
        got = torch_ufom.hypergrad(model, loss, loss, xs[i], xqs[i], hvp="fwdrev", **kw)
        assert rel_err(got, want[i]) < 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the per-task loop
        got = torch_ufom.hypergrad_batch(model, loss, loss, xs, xqs, vectorise=True, **kw)
    assert rel_err(got, [sum(t) for t in zip(*want)]) < 1e-10


def test_meta_batches_see_a_loss_that_differentiates_at_a_later_step_only():
    # The look at a meta-batch saw the first step's batch only: a gradient penalty over every
    # parameter (a frozen body too) at step 2 ran vectorised (7 % off: vmap's autograd.grad
    # misses the body), fwdrev ran (22 % off) and adapt_batch vectorised (5 % off). Each step is
    # now watched inside the library's own transforms where the batches are per step.
    model, support, query = anil_problem(tasks=B)
    x, y = support

    def inner(f, b):  # step 1's batch is (x, y); step 2's (x, y, y) asks for the penalty
        v = mse(f, b[:2])
        if len(b) == 2 or not v.requires_grad:
            return v
        gs = torch.autograd.grad(v, list(f.parameters()), create_graph=True, allow_unused=True)
        return v + 0.1 * sum((g ** 2).sum() for g in gs if g is not None)

    def steps(i=None):
        xi, yi = (x, y) if i is None else (x[i], y[i])
        return [(xi, yi), (xi, yi, yi)]

    def oracle_task(i):
        phi = {n: p for n, p in model.named_parameters() if n in HEAD}
        frozen = {n: p for n, p in model.named_parameters() if n not in phi}
        for batch in steps(i):
            full = {**phi, **{n: p * 1 for n, p in frozen.items()}}  # an alias per loss call

            class F:
                def __call__(self, *a):
                    return functional_call(model, full, a)

                def parameters(self):
                    return iter(full.values())
            gs = torch.autograd.grad(inner(F(), batch), list(phi.values()), create_graph=True)
            phi = {n: p - LR * g for (n, p), g in zip(phi.items(), gs)}
        full = {**phi, **frozen}
        return torch.autograd.grad(mse(lambda *a: functional_call(model, full, a), task(query, i)),
                                   list(model.parameters()))

    want = [sum(t) for t in zip(*[oracle_task(i) for i in range(B)])]
    kw = dict(steps=STEPS, inner_lr=LR, mode="exact")
    with pytest.warns(UserWarning, match="per-task loop"):
        got = torch_ufom.hypergrad_batch(model, inner, mse, torch_ufom.StepBatches(steps()), query,
                                         vectorise=True, inner_params=HEAD, **kw)
    assert rel_err(got, want) < 1e-10
    with pytest.raises(ValueError, match="Invalid hvp: 'fwdrev'"):
        torch_ufom.hypergrad(model, inner, mse, torch_ufom.StepBatches(steps(0)), task(query, 0),
                             hvp="fwdrev", **kw)
    stacked = torch_ufom.adapt_batch(model, inner, torch_ufom.StepBatches(steps()), steps=STEPS, inner_lr=LR,
                                     inner_params=HEAD)
    for i in range(B):
        alone = torch_ufom.adapt(model, inner, torch_ufom.StepBatches(steps(i)), steps=STEPS, inner_lr=LR,
                                 inner_params=HEAD)
        assert rel_err([stacked.params[n][i] for n in HEAD], [alone.params[n] for n in HEAD]) < 1e-12
