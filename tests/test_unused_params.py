"""Parameters that no loss reads, frozen integer parameters, float32 inner Adam, refused loads.

What this file covers:

1. A parameter that neither the inner nor the outer loss reads (a submodule never called, the idle
   head of a two-head model) gets no gradient, as with ``loss.backward()``: after
   ``MetaOptimizer.backward`` / ``backward_batch`` its ``.grad`` stays ``None`` in modes fom, exact
   and ufom (both branches), under memory store, recompute and checkpoint; every parameter a loss
   reads gets the float64 brute-force oracle. The oracle here is ``tests/oracle.py``'s
   ``brute_force`` extended to parameters the inner loss does not read (``brute_force`` refuses
   them, and writes zeros where autograd gives ``None``); a first test checks the two agree.
2. A head read only by the inner loss still gets its exact hypergradient (through the other
   parameters' updates).
3. An outer ``torch.optim.Adam`` then steps a multi-head model as a plain loop does whose ``.grad``
   is ``None`` for the idle head: the idle head does not move and has no Adam state before its use.
4. The functional ``hypergrad`` keeps one tensor per parameter, zeros for an unread one.
5. ``hypergrad`` / ``hypergrad_batch`` with the default ``params`` on a module holding a frozen
   integer parameter: one tensor per floating-point parameter, equal to the oracle.
6. Inner Adam on a float32 model: ``adapt`` matches a float64 unroll of ``torch.optim.Adam``'s
   formulas about as closely as ``torch.optim.Adam`` in float32 does.
7. ``MetaOptimizer.load_state_dict`` refuses a NaN, negative or complex learned inner rate in
   ``meta_tensors`` and changes nothing.
"""
import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import torch_ufom
from helpers import TwoHeads, rel_err
from oracle import brute_force, ref_adam

STEPS, LR, Q, TASKS = 2, 0.1, 0.5, 3

# (mode, force_truncation): fom, exact, and ufom's two branches (K = 0: G_0; K = r: the reweighted G_r)
MODES = [("fom", None), ("exact", None), ("ufom", 0), ("ufom", STEPS)]
MODE_IDS = ["fom", "exact", "ufom-K0", "ufom-Kr"]
MEMORY = [dict(memory="store"), dict(memory="recompute"), dict(memory="checkpoint", slots=1)]
MEMORY_IDS = ["store", "recompute", "checkpoint-slots1"]


class WithUnused(nn.Module):
    """A small MLP plus a submodule that ``forward`` never calls."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        self.unused = nn.Linear(3, 2)

    def forward(self, x, head=0):
        return self.net(x)


class WithTable(nn.Module):
    """A small MLP whose input columns are picked by a frozen integer parameter."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        self.table = nn.Parameter(torch.arange(3), requires_grad=False)

    def forward(self, x):
        return self.net(x.index_select(-1, self.table))


def loss_on(head):
    """An MSE loss through head ``head`` (ignored by the single-head models)."""
    def loss(f, batch):
        x, y = batch
        return ((f(x, head) - y) ** 2).mean()
    return loss


def plain_mse(f, batch):
    x, y = batch
    return ((f(x) - y) ** 2).mean()


# name: (model class, names of the parameters that no loss reads) when both losses use head 0
MODELS = {"unused_submodule": (WithUnused, {"unused.weight", "unused.bias"}),
          "idle_head": (TwoHeads, {"heads.1.weight", "heads.1.bias"})}


def tasks(seed, n=TASKS):
    """``n`` tasks of (support, query), each a batch (x, y)."""
    g = torch.Generator().manual_seed(100 + seed)
    return [((torch.randn(5, 3, generator=g), torch.randn(5, 2, generator=g)),
             (torch.randn(5, 3, generator=g), torch.randn(5, 2, generator=g))) for _ in range(n)]


def stacked(ts):
    """The tasks as stacked supports and queries for the batched entry points."""
    return tuple(tuple(torch.stack([t[part][i] for t in ts]) for i in range(2)) for part in range(2))


def unroll(model, inner, outer, support, query, k):
    """``G_k`` by one unrolled float64 graph, plain SGD, as ``tests/oracle.py``'s ``brute_force``,
    except that a parameter the inner loss does not read keeps its value (``brute_force`` refuses
    it) and that the result is ``None`` for a parameter the estimate does not reach, as
    ``loss.backward()`` leaves it: a dict name -> tensor or ``None``."""
    named = dict(model.named_parameters())
    phi = dict(named)
    for j in range(STEPS):
        exact = j >= STEPS - k
        loss = inner(lambda *a: functional_call(model, phi, a), support)
        gs = torch.autograd.grad(loss, list(phi.values()), create_graph=exact, allow_unused=True)
        phi = {n: p if g is None else p - LR * (g if exact else g.detach())
               for (n, p), g in zip(phi.items(), gs)}
    loss = outer(lambda *a: functional_call(model, phi, a), query)
    return dict(zip(named, torch.autograd.grad(loss, list(named.values()), allow_unused=True)))


def oracle(model, inner, outer, support, query, mode="exact", K=None):
    """The estimate ``mode`` gives for draw ``K``, by brute force (``None`` where it reaches nothing)."""
    if mode == "fom" or (mode == "ufom" and K == 0):
        return unroll(model, inner, outer, support, query, 0)
    if mode == "exact":
        return unroll(model, inner, outer, support, query, STEPS)
    g0, gr = (unroll(model, inner, outer, support, query, k) for k in (0, STEPS))
    out = {}  # ufom's exact branch at K = r: G_0 + (G_r - G_0) / q; None where neither reaches
    for n in g0:
        if gr[n] is None:
            out[n] = None if g0[n] is None else g0[n] * (1 - 1 / Q)
        else:
            out[n] = gr[n] / Q + (0 if g0[n] is None else g0[n] * (1 - 1 / Q))
    return out


def zero_if_none(g, like):
    return torch.zeros_like(like) if g is None else g


def add(a, b):
    """Sum of gradients where ``None`` is an absent term (``None`` if both are)."""
    return b if a is None else a if b is None else a + b


def summed(per_task):
    """The sum over tasks of per-task oracle dicts."""
    out = dict.fromkeys(per_task[0])
    for w in per_task:
        out = {n: add(out[n], w[n]) for n in out}
    return out


def check_grads(model, unread, want):
    """Unread parameters: ``.grad`` is None; read ones: ``.grad`` equals ``want``."""
    assert {n for n, g in want.items() if g is None} == unread  # the oracle agrees on what is read
    names = [n for n, _ in model.named_parameters() if n not in unread]
    for n, p in model.named_parameters():
        if n in unread:
            assert p.grad is None, f"{n}: no loss reads it, yet .grad = {p.grad}"
        else:
            assert p.grad is not None, f"{n}: a loss reads it, yet .grad is None"
    params = dict(model.named_parameters())
    assert rel_err([params[n].grad for n in names], [want[n] for n in names]) < 1e-10


def meta_optimizer(model, mode, **kw):
    outer = torch.optim.SGD(model.parameters(), lr=0.1)
    return torch_ufom.MetaOptimizer(model, outer, inner_lr=LR, steps=STEPS, mode=mode, q=Q, **kw)


def test_the_local_oracle_agrees_with_brute_force():
    # unroll() is tests/oracle.py's brute_force plus unread parameters: on the part of the model
    # the losses read (here the whole of model.net) the two must agree; unroll leaves the rest None.
    model = WithUnused()
    (support, query), = tasks(5, 1)
    for k in (0, STEPS):
        got = unroll(model, loss_on(0), loss_on(0), support, query, k)
        want = brute_force(model.net, plain_mse, plain_mse, lambda j: support, query, STEPS, LR,
                           list(model.net.parameters()), k)
        assert rel_err([got["net." + n] for n, _ in model.net.named_parameters()], want) < 1e-14
        assert got["unused.weight"] is None and got["unused.bias"] is None


# -- 1. parameters no loss reads get no gradient ------------------------------------------------

@pytest.mark.parametrize("mem", MEMORY, ids=MEMORY_IDS)
@pytest.mark.parametrize("mode,K", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("case", list(MODELS))
def test_backward_leaves_unread_parameters_without_grad(case, mode, K, mem):
    make, unread = MODELS[case]
    model = make()
    (support, query), = tasks(0, 1)
    want = oracle(model, loss_on(0), loss_on(0), support, query, mode, K)
    meta = meta_optimizer(model, mode, **mem)
    meta.backward(loss_on(0), loss_on(0), support, query, force_truncation=K)
    check_grads(model, unread, want)


@pytest.mark.parametrize("vectorise", [True, False], ids=["vmap", "loop"])
@pytest.mark.parametrize("mode,K", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("case", list(MODELS))
def test_backward_batch_leaves_unread_parameters_without_grad(case, mode, K, vectorise):
    make, unread = MODELS[case]
    model = make()
    ts = tasks(1)
    per_task = [oracle(model, loss_on(0), loss_on(0), s, q, mode, K) for s, q in ts]
    want = summed(per_task)
    meta = meta_optimizer(model, mode, memory="checkpoint", slots=1, vectorise=vectorise)
    supports, queries = stacked(ts)
    results = meta.backward_batch(loss_on(0), loss_on(0), supports, queries, force_truncation=K)
    assert len(results) == TASKS
    assert results[0].batch_path.startswith("vectorised" if vectorise else "per-task loop")
    check_grads(model, unread, want)


# -- 2. a head read only by the inner loss -------------------------------------------------------

@pytest.mark.parametrize("how", ["store", "recompute", "checkpoint-slots1", "batch-vmap", "batch-loop"])
def test_head_read_only_by_the_inner_loss_gets_its_exact_hypergradient(how):
    # Head 1 shapes the inner updates of the body; the outer loss reads head 0 only.
    model = TwoHeads()
    inner, outer = loss_on(1), loss_on(0)
    if how.startswith("batch"):
        ts = tasks(2)
        per_task = [oracle(model, inner, outer, s, q) for s, q in ts]
        want = summed(per_task)
        meta = meta_optimizer(model, "exact", vectorise=how == "batch-vmap")
        meta.backward_batch(inner, outer, *stacked(ts))
    else:
        (support, query), = tasks(2, 1)
        want = oracle(model, inner, outer, support, query)
        mem = MEMORY[MEMORY_IDS.index(how)]
        meta = meta_optimizer(model, "exact", **mem)
        meta.backward(inner, outer, support, query)
    assert float(want["heads.1.weight"].norm()) > 1e-3  # the oracle itself gives head 1 a gradient
    check_grads(model, set(), want)


# -- 3. an outer Adam over a multi-head model ---------------------------------------------------

def test_outer_adam_skips_the_idle_head_like_a_plain_loop():
    # Head 0 in outer steps 0-1, head 1 in steps 2-3 (2 tasks a step, mode exact). The plain loop
    # fills .grad from the oracle, None for the idle head, and steps the same torch.optim.Adam.
    lib, ref = TwoHeads(seed=4), TwoHeads(seed=4)
    meta = torch_ufom.MetaOptimizer(lib, torch.optim.Adam(lib.parameters(), lr=0.05), inner_lr=LR,
                                    steps=STEPS, mode="exact")
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.05)
    head_names = [[f"heads.{h}.weight", f"heads.{h}.bias"] for h in range(2)]
    before = {n: p.detach().clone() for n, p in lib.named_parameters()}
    for t in range(4):
        head = 0 if t < 2 else 1
        idle = set(head_names[1 - head])
        meta.zero_grad()
        ref_opt.zero_grad()
        for support, query in tasks(10 + t, 2):
            meta.backward(loss_on(head), loss_on(head), support, query)
            grads = oracle(ref, loss_on(head), loss_on(head), support, query)
            assert {n for n, g in grads.items() if g is None} == idle
            for n, p in ref.named_parameters():
                if grads[n] is not None:
                    p.grad = grads[n].clone() if p.grad is None else p.grad + grads[n]
        meta.step()
        ref_opt.step()
        got, want = dict(lib.named_parameters()), dict(ref.named_parameters())
        assert rel_err([got[n].detach() for n in want], [w.detach() for w in want.values()]) < 1e-12, t
        for n in idle:
            assert torch.equal(got[n].detach(), before[n]), f"step {t}: the idle {n} moved"
        if t < 2:
            for n in head_names[1]:
                assert got[n] not in meta.optimizer.state or not meta.optimizer.state[got[n]], \
                    f"step {t}: Adam keeps state for {n}, which no loss has read yet"
        before = {n: p.detach().clone() for n, p in lib.named_parameters()}


# -- 4. the functional hypergrad: one tensor per parameter (already holds) ----------------------

@pytest.mark.parametrize("mode,K", [MODES[0], MODES[1], MODES[3]], ids=["fom", "exact", "ufom-Kr"])
@pytest.mark.parametrize("case", list(MODELS))
def test_hypergrad_returns_zeros_for_an_unread_parameter(case, mode, K):
    make, unread = MODELS[case]
    model = make()
    (support, query), = tasks(3, 1)
    params = dict(model.named_parameters())
    want = {n: zero_if_none(g, params[n]) for n, g in
            oracle(model, loss_on(0), loss_on(0), support, query, mode, K).items()}
    got = torch_ufom.hypergrad(model, loss_on(0), loss_on(0), support, query, steps=STEPS, inner_lr=LR,
                               mode=mode, q=Q, force_truncation=K)
    names = [n for n, _ in model.named_parameters()]
    assert len(got) == len(names)
    for n, g in zip(names, got):
        assert isinstance(g, torch.Tensor) and g.shape == want[n].shape, n
        if n in unread:
            assert torch.equal(g, torch.zeros_like(want[n])), n
    assert rel_err(got, [want[n] for n in names]) < 1e-10


# -- 5. a frozen integer parameter and the default params ---------------------------------------

def brute(model, support, query, params):
    """The exact hypergradient w.r.t. ``params`` (a dict) by ``tests/oracle.py``'s brute force."""
    return dict(zip(params, brute_force(model, plain_mse, plain_mse, lambda j: support, query, STEPS, LR,
                                        list(params.values()), STEPS)))


@pytest.mark.parametrize("how", ["hypergrad", "batch-vmap", "batch-loop"])
def test_default_params_leave_out_a_frozen_integer_parameter(how):
    model = WithTable()
    floats = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
    assert len(floats) == len(list(model.parameters())) - 1
    kw = dict(steps=STEPS, inner_lr=LR, mode="exact")
    if how == "hypergrad":
        (support, query), = tasks(4, 1)
        want = brute(model, support, query, floats)
        got = torch_ufom.hypergrad(model, plain_mse, plain_mse, support, query, **kw)
    else:
        ts = tasks(4)
        per_task = [brute(model, s, q, floats) for s, q in ts]
        want = {n: sum(w[n] for w in per_task) for n in floats}
        got = torch_ufom.hypergrad_batch(model, plain_mse, plain_mse, *stacked(ts),
                                         vectorise=how == "batch-vmap", **kw)
    assert len(got) == len(floats)
    assert rel_err(got, list(want.values())) < 1e-10


# -- 6. inner Adam in float32 -------------------------------------------------------------------

def test_adapt_with_inner_adam_in_float32_matches_a_float64_unroll():
    # 1 - float32(0.9999) is 1.7e-4 off 1e-4: bias corrections computed in float32 leave the
    # adapted parameters 7e-5 off, where torch.optim.Adam in float32 stays near 1e-7.
    lr, betas, steps = 0.05, (0.9, 0.9999), 20
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).float()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(6, 3, generator=g).float(), torch.randn(6, 2, generator=g).float())
    got = torch_ufom.adapt(model, plain_mse, batch, steps=steps,
                           inner=torch_ufom.inner.Adam(lr, betas=betas)).params

    # The float64 reference: the same initial values, torch.optim.Adam's formulas (tests/oracle.py).
    model64 = copy.deepcopy(model).double()
    batch64 = tuple(t.double() for t in batch)
    rule = ref_adam(lr, betas=betas)
    phi = {n: p.detach().clone() for n, p in model64.named_parameters()}
    state = {n: None for n in phi}
    for t in range(steps):
        leaves = {n: p.requires_grad_() for n, p in phi.items()}
        loss = plain_mse(lambda x: functional_call(model64, leaves, (x,)), batch64)
        grads = torch.autograd.grad(loss, list(leaves.values()))
        for (n, p), gr in zip(leaves.items(), grads):
            phi[n], state[n] = rule(n, t, p.detach(), gr, state[n])
    names = list(phi)
    want = [phi[n] for n in names]

    # The bound is reachable in float32: torch.optim.Adam itself.
    ref32 = copy.deepcopy(model)
    opt = torch.optim.Adam(ref32.parameters(), lr=lr, betas=betas)
    for _ in range(steps):
        opt.zero_grad()
        plain_mse(ref32, batch).backward()
        opt.step()
    torch32 = dict(ref32.named_parameters())
    assert rel_err([torch32[n].detach().double() for n in names], want) < 1e-6

    assert all(got[n].dtype == torch.float32 for n in names)
    err = rel_err([got[n].double() for n in names], want)
    assert math.isfinite(err) and err < 1e-6, err


# -- 7. load_state_dict refuses an invalid learned inner rate -----------------------------------

def learned_rate_meta():
    """A MetaOptimizer with a learned inner rate in a second param group, after two outer steps."""
    model = WithUnused(seed=5).net
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    outer = torch.optim.Adam([{"params": list(model.parameters())}, {"params": [lr], "lr": 0.01}], lr=0.02)
    meta = torch_ufom.MetaOptimizer(model, outer, inner_lr=lr, steps=STEPS, mode="exact",
                                    generator=torch.Generator().manual_seed(0))
    for t in range(2):
        meta.zero_grad()
        for support, query in tasks(20 + t, 2):
            meta.backward(plain_mse, plain_mse, support, query)
        meta.step()
    return model, lr, meta


def same(a, b):
    """Deep equality of state dicts: tensors bit for bit (dtype and shape included)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


BAD_RATES = {"nan": torch.tensor(float("nan"), dtype=torch.float64),
             "negative": torch.tensor(-0.1, dtype=torch.float64),
             "complex": torch.tensor(0.1 + 0.2j, dtype=torch.complex128)}


@pytest.mark.parametrize("bad", list(BAD_RATES))
def test_load_state_dict_refuses_an_invalid_learned_rate(bad):
    model, lr, meta = learned_rate_meta()
    good = copy.deepcopy(meta.state_dict())
    assert same(good, meta.state_dict())
    rate, params = lr.detach().clone(), [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="meta_tensors"):
        meta.load_state_dict({**copy.deepcopy(good), "meta_tensors": [BAD_RATES[bad].clone()]})
    assert torch.equal(lr.detach(), rate) and lr.dtype == torch.float64
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    assert same(meta.state_dict(), good)
