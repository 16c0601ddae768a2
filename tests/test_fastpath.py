"""The first-order fast path is the general path run faster: bit for bit.

``InnerLoop`` swaps the module's entries through a cached
:class:`~torch_ufom.functional_model.Reparametrization` instead of calling
``torch.func.functional_call``, and applies plain SGD at a plain-number rate
with one foreach kernel instead of ``rule.update``. Each test runs the same
call twice, once as shipped and once with both shortcuts switched off (the
general path: ``functional_call`` and ``rule.update``), and requires equal
tensors, on every kind of the conformance zoo.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import torch_ufom
from torch_ufom import functional_model, inner, records, unroll
from helpers import mse, rel_err, unit_rows
from oracle import brute_force
from zoo import KINDS

STEPS = 3


@contextlib.contextmanager
def general_path(monkeypatch):
    """Switch the fast path off: ``functional_call`` and ``rule.update`` every step."""
    layout = functional_model.Reparametrization.layout
    with monkeypatch.context() as m:
        m.setattr(functional_model.Reparametrization, "layout",
                  classmethod(lambda cls, module: layout(module)[:2] + (None,)))  # no swap
        m.setattr(inner.SGD, "plain_rate", property(lambda self: None))
        yield


def run(kind, mode, memory, monkeypatch=None, **kw):
    prob = kind.build()
    support, query = prob.task(0)
    params = [p for p in prob.model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(3)
    ctx = general_path(monkeypatch) if monkeypatch is not None else contextlib.nullcontext()
    with ctx:
        return torch_ufom.hypergrad(prob.model, prob.inner_loss, prob.outer_loss, support, query,
                                    steps=STEPS, inner_lr=0.1, mode=mode, memory=memory, slots=1,
                                    params=params, generator=gen, **kw)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
@pytest.mark.parametrize("mode, memory", [("fom", "checkpoint"), ("exact", "store"),
                                          ("exact", "checkpoint"), ("exact", "recompute")])
def test_fast_path_is_bit_identical(kind, mode, memory, monkeypatch):
    hvp = "revrev" if kind.buffers or kind.no_forward_ad or kind.random else "auto"
    fast = run(kind, mode, memory, hvp=hvp)
    slow = run(kind, mode, memory, monkeypatch, hvp=hvp)
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


def test_the_general_path_is_what_the_fast_path_replaces(monkeypatch):
    """The switch really changes the path taken (else the test above proves nothing)."""
    calls = []
    real = torch.func.functional_call
    monkeypatch.setattr(functional_model, "functional_call", lambda *a, **k: calls.append(1) or real(*a, **k))
    kind = next(k for k in KINDS if k.name == "mlp")
    run(kind, "fom", "checkpoint")
    assert calls == []
    run(kind, "fom", "checkpoint", monkeypatch)
    assert len(calls) == STEPS + 1


def test_the_module_is_restored_after_a_failing_loss():
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 1)).double()
    before = {n: t for n, t in list(model.named_parameters()) + list(model.named_buffers())}

    def inner_loss(f, batch):
        out = f(batch).sum()
        if torch.is_grad_enabled():
            raise KeyError("boom")
        return out

    with pytest.raises(KeyError, match="boom"):
        torch_ufom.hypergrad(model, inner_loss, inner_loss, torch.randn(4, 2, dtype=torch.float64),
                             torch.randn(4, 2, dtype=torch.float64), steps=2, inner_lr=0.1)
    after = {n: t for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    assert after.keys() == before.keys()
    assert all(after[n] is before[n] for n in before)


def test_tied_weights_are_swapped_at_every_alias():
    lin = nn.Linear(3, 3, bias=False).double()
    model = nn.Sequential(lin, nn.Tanh(), lin)
    swap = functional_model.Reparametrization.of(model)
    new = torch.zeros(3, 3, dtype=torch.float64)
    saved = swap.put({"0.weight": new}, {})
    assert model[0].weight is new and model[2].weight is new
    swap.undo(saved, note=False)
    assert model[0].weight is lin.weight and isinstance(model[2].weight, nn.Parameter)


def close(a, b, tol=1e-12):
    scale = max(float(b.abs().max()), 1e-300)
    return float((a - b).abs().max()) <= tol * scale


RULES = {"sgd": lambda: {"inner_lr": 0.1},  # momentum and Adam: first_order_identity, stateful
         "momentum": lambda: {"inner": torch_ufom.inner.SGD(0.1, momentum=0.9)},
         "adam": lambda: {"inner": torch_ufom.inner.Adam(0.05)}}


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
@pytest.mark.parametrize("mode, memory", [("exact", "store"), ("exact", "checkpoint"),
                                          ("exact", "budget"), ("exact", "tight budget"),
                                          ("ufom", "store"), ("truncated", "store")])
def test_connected_sweep_equals_the_per_step_sweep(kind, mode, memory, rule, monkeypatch):
    """One backward through the chained exact steps equals one VJP per step (float64)."""
    from torch_ufom import estimators, schedules
    chained = []
    real = estimators.chain_vjp
    monkeypatch.setattr(estimators, "chain_vjp", lambda r, e: chained.append(1) or real(r, e))
    # "budget": the default byte budget keeps every graph; "tight budget": one byte,
    # so the sweep runs Revolve and its records are not linked.
    kw = dict(hvp="revrev")
    linked = [] if memory == "tight budget" else [1]  # Revolve's records are not linked
    if memory == "checkpoint":
        kw["slots"] = STEPS
    if memory.endswith("budget"):
        kw["max_memory"] = 1 if memory == "tight budget" else None
        memory = "checkpoint"
    if mode == "ufom":
        kw["force_truncation"] = STEPS
    if mode == "truncated":
        kw["k"] = 2

    def call():
        prob = kind.build()
        support, query = prob.task(0)
        params = [p for p in prob.model.parameters() if p.requires_grad]
        return torch_ufom.hypergrad(prob.model, prob.inner_loss, prob.outer_loss, support, query,
                                    steps=STEPS, mode=mode, memory=memory, params=params,
                                    generator=torch.Generator().manual_seed(3), **RULES[rule](), **kw)

    connected = call()
    assert chained == linked
    with monkeypatch.context() as m:
        m.setattr(schedules.Store, "keeps_every_graph", lambda self, steps: False)
        m.setattr(schedules.Checkpoint, "keeps_every_graph", lambda self, steps: False)
        per_step = call()
    assert chained == linked
    for a, b in zip(connected, per_step):
        assert close(a, b)


def test_a_checkpointed_sweep_keeps_few_records_alive(monkeypatch):
    """Under a byte budget that runs Revolve, the exact sweep (offered the connected
    plan) consumes its records one at a time: memory stays flat in ``steps``."""
    import weakref

    alive, most = weakref.WeakSet(), []
    init, vjp = records.StepRecord.__init__, records.StepRecord.vjp_exact

    def counted_init(self, *args):
        init(self, *args)
        alive.add(self)

    def counted_vjp(self, e, log):
        most.append(len(alive))
        return vjp(self, e, log)

    monkeypatch.setattr(records.StepRecord, "__init__", counted_init)
    monkeypatch.setattr(records.StepRecord, "vjp_exact", counted_vjp)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(5, 3, dtype=torch.float64)

    def loss(f, b):
        return (f(b) ** 2).mean()

    torch_ufom.hypergrad(model, loss, loss, x, x, steps=30, inner_lr=0.1, mode="exact",
                         max_memory=1, hvp="revrev")
    assert len(most) == 30 and max(most) <= 3


def test_the_connected_backward_holds_no_record(monkeypatch):
    """``chain_vjp`` consumes its records before the backward, which then frees each
    step's tensors as it passes them (no StepRecord is alive during it)."""
    import weakref

    alive, seen = weakref.WeakSet(), []
    init, vjp = records.StepRecord.__init__, records._vjp

    def counted_init(self, *args):
        init(self, *args)
        alive.add(self)

    def counted_vjp(*args, **kw):
        seen.append(len(alive))
        return vjp(*args, **kw)

    monkeypatch.setattr(records.StepRecord, "__init__", counted_init)
    monkeypatch.setattr(records, "_vjp", counted_vjp)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(5, 3, dtype=torch.float64)

    def loss(f, b):
        return (f(b) ** 2).mean()

    torch_ufom.hypergrad(model, loss, loss, x, x, steps=6, inner_lr=0.1, mode="exact",
                         memory="store", hvp="revrev")
    assert seen == [0]


@pytest.mark.parametrize("bad, error", [(lambda out: out.detach(), ValueError),
                                        (lambda out: out.reshape(1), ValueError),
                                        (lambda out: out.to(torch.complex128), TypeError)])
def test_a_loss_that_goes_bad_after_the_first_step_is_caught_there(bad, error):
    """Every step's loss is checked (the cheap check on the first-order fast path defers
    to the full one), so a loss that changes what it returns gets the named error."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    calls = []

    def loss(f, b):
        calls.append(1)
        out = (f(b) ** 2).mean()
        return bad(out) if len(calls) == 3 else out

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(error, match="inner_loss"):
        torch_ufom.hypergrad(model, loss, loss, x, x, steps=5, inner_lr=0.1, mode="fom")
    assert len(calls) == 3
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_one_walk_gives_the_module_s_own_names():
    """``Reparametrization.layout`` (one walk per inner loop) lists the parameters and
    buffers as ``named_parameters()`` / ``named_buffers()`` do, tied and parametrized
    modules included, and has no swap for a parametrized module."""
    from torch.nn.utils import parametrizations, parametrize

    class Symmetric(nn.Module):
        def forward(self, x):
            return x.triu() + x.triu(1).T

    lin = nn.Linear(3, 3)
    parametrize.register_parametrization(lin, "weight", Symmetric())
    shared = nn.Linear(2, 2)
    emb, dec = nn.Embedding(5, 4), nn.Linear(4, 5, bias=False)
    dec.weight = emb.weight
    modules = [k.build().model for k in KINDS] + [
        lin, nn.Sequential(shared, nn.ReLU(), shared, nn.BatchNorm1d(2)), nn.Sequential(emb, dec),
        parametrizations.weight_norm(nn.Linear(3, 2))]
    for m in modules:
        params, buffers, swap = functional_model.Reparametrization.layout(m)
        assert [(n, id(t)) for n, t in params] == [(n, id(t)) for n, t in m.named_parameters()]
        assert [(n, id(t)) for n, t in buffers] == [(n, id(t)) for n, t in m.named_buffers()]
    assert functional_model.Reparametrization.of(lin).parametrized
    assert not functional_model.Reparametrization.of(shared).parametrized


def test_a_parametrized_submodule_used_twice_is_put_back():
    # Parametrized modules ran through functional_call, which does not put back the entries of
    # a submodule reached by two paths (torch 2.13): the module kept the inner loop's tensors,
    # a second call was 50-70 % off, and a MetaOptimizer's step moved tensors it no longer held.
    torch.manual_seed(0)
    shared = unit_rows(nn.Linear(3, 3))
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(3, 1))
    g = torch.Generator().manual_seed(1)
    support = (torch.randn(5, 3, generator=g), torch.randn(5, 1, generator=g))
    query = (torch.randn(5, 3, generator=g), torch.randn(5, 1, generator=g))
    twin = copy.deepcopy(model)  # the oracle's own copy (functional_call leaves it changed)
    want = brute_force(twin, mse, mse, lambda j: support, query, 2, 0.1, list(twin.parameters()), 2)

    def entries():
        return [(n, id(t)) for n, t in list(model.named_parameters()) + list(model.named_buffers())]
    before = entries()
    for _ in range(2):
        got = torch_ufom.hypergrad(model, mse, mse, support, query, steps=2, inner_lr=0.1, mode="exact")
        assert rel_err(got, want) < 1e-10
        assert entries() == before


def _seeded_steps(monkeypatch, loss, support, steps=6, **kw):
    """Run ``fom`` and return the result and the steps whose stream was seeded."""
    seeded = []
    real = unroll.InnerLoop._seed
    monkeypatch.setattr(unroll.InnerLoop, "_seed", lambda self, j: seeded.append(j) or real(self, j))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    out = torch_ufom.hypergrad(model, loss, loss, support, support[0] if isinstance(
        support, torch_ufom.StepBatches) else support, steps=steps, inner_lr=0.1, mode="fom",
        generator=torch.Generator().manual_seed(3), **kw)
    return out, sorted(set(seeded))


def _flagged(f, b):
    """A loss that draws a random number only in the batches flagged ``True``."""
    x, draw = b
    return (F.dropout(f(x), 0.5) ** 2).mean() if draw else (f(x) ** 2).mean()


def test_a_loss_that_draws_nothing_is_seeded_at_every_step_too(monkeypatch):
    # Whether a loss draws was judged by whether step 1 moved the global generator: a loss
    # drawing inside torch.random.fork_rng() moves nothing, and its steps 2.. reused step 1's
    # numbers (tests/test_side_effects.py). Every step is seeded now.
    x = torch.randn(5, 3, dtype=torch.float64)
    _, seeded = _seeded_steps(monkeypatch, lambda f, b: (f(b) ** 2).mean(), x)
    assert seeded == list(range(1, 8))


def test_a_loss_that_draws_from_the_first_step_seeds_every_step(monkeypatch):
    x = torch.randn(5, 3, dtype=torch.float64)
    _, seeded = _seeded_steps(monkeypatch, lambda f, b: (F.dropout(f(b), 0.5) ** 2).mean(), x)
    assert seeded == list(range(1, 8))


def test_a_loss_that_draws_only_after_the_first_step_gets_each_step_s_stream(monkeypatch):
    """Step 1 draws nothing and step 3 does: every step runs under its own stream, and the
    result is the general path's bit for bit."""
    x = torch.randn(5, 3, dtype=torch.float64)
    support = torch_ufom.StepBatches([(x, j >= 2) for j in range(6)])
    fast, seeded = _seeded_steps(monkeypatch, _flagged, support)
    assert seeded == list(range(1, 8))
    with general_path(monkeypatch):
        slow, _ = _seeded_steps(monkeypatch, _flagged, support)
    assert all(torch.equal(a, b) for a, b in zip(fast, slow, strict=True))


def test_a_connected_sweep_frees_the_states_its_graph_does_not_save(monkeypatch):
    """Linked records keep only the newest record's outputs and the oldest one's inputs: a
    momentum buffer, which no backward formula saves, is freed step by step instead of kept
    for every step of a stored sweep."""
    import gc
    import weakref

    from torch_ufom import estimators

    bufs, alive = [], []
    update, chain = torch_ufom.inner.SGD.update, estimators.chain_vjp

    def counted_update(self, grads, state, params, hyper):
        new_p, new_s = update(self, grads, state, params, hyper)
        bufs.extend(weakref.ref(t) for t in new_s[1:])
        return new_p, new_s

    def counted_chain(records, e):
        gc.collect()
        alive.append(sum(ref() is not None for ref in bufs))
        return chain(records, e)

    monkeypatch.setattr(torch_ufom.inner.SGD, "update", counted_update)
    monkeypatch.setattr(estimators, "chain_vjp", counted_chain)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(5, 3, dtype=torch.float64)

    def loss(f, b):
        return (f(b) ** 2).mean()

    torch_ufom.hypergrad(model, loss, loss, x, x, steps=20, mode="exact", memory="store",
                         inner=torch_ufom.inner.SGD(0.1, momentum=0.9))
    assert len(bufs) == 20 * 4 and alive == [4]  # the last step's buffers, the sweep's output


class _InWorker(nn.Module):
    """linear -> tanh -> linear, the first layer run in a worker thread of ``pool``."""

    def __init__(self, pool):
        super().__init__()
        self.pool, self.a, self.b = pool, nn.Linear(3, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.pool.submit(self.a, x).result().float()))


@pytest.mark.parametrize("mode", ["fom", "ufom"])
@pytest.mark.parametrize("where", ["around the call", "in the loss, inside a disabled region",
                                   "toggled in the loss", "in a worker thread"])
def test_under_autocast_every_step_sees_its_own_parameters(mode, where):
    # torch.autocast caches one bfloat16 copy of each leaf until the outermost region exits:
    # leaves updated in place kept serving step 2's copy, so steps 3.. repeated step 2. A region
    # the loss opens inside a disabled outer one (a trainer's autocast(enabled=use_amp)) too;
    # and (review s34C F1: 17 % and 2.5 % off) a loss that turns autocast on and off with
    # torch.set_autocast_enabled, which no region's exit clears, or a forward that runs a layer
    # in a worker thread whose region stays open (torch's cache is one for the process).
    pool = concurrent.futures.ThreadPoolExecutor(
        1, initializer=lambda: torch.autocast("cpu", dtype=torch.bfloat16).__enter__())
    torch.manual_seed(0)
    # (float32: the dtype autocast casts)
    model = (_InWorker(pool) if where == "in a worker thread"
             else nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))).float()
    x, y, xq, yq = (torch.randn(6, n, dtype=torch.float32) for n in (3, 1, 3, 1))
    inside = where.startswith("in the loss")

    def loss(f, b):
        if where == "toggled in the loss":
            before = torch.is_autocast_enabled("cpu")
            torch.set_autocast_enabled("cpu", True)
            try:
                out = f(b[0])
            finally:
                torch.set_autocast_enabled("cpu", before)
            return F.mse_loss(out.float(), b[1])
        if where == "in a worker thread":  # (no region here: its exit would clear the cache)
            return F.mse_loss(f(b[0]).float(), b[1])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=inside):
            return F.mse_loss(f(b[0]).float(), b[1])
    steps, lr = 4, 0.3
    try:
        with (torch.autocast("cpu", dtype=torch.bfloat16, enabled=not inside) if where in (
                "around the call", "in the loss, inside a disabled region") else contextlib.nullcontext()):
            phi, losses = [p.detach() for p in model.parameters()], []  # first-order loop by hand
            for _ in range(steps):
                leaves = [p.requires_grad_() for p in phi]
                value = loss(lambda a: torch.func.functional_call(
                    model, dict(zip([n for n, _ in model.named_parameters()], leaves)), (a,)), (x, y))
                losses.append(value.detach())
                phi = [p.detach().add(g, alpha=-lr) for p, g in
                       zip(leaves, torch.autograd.grad(value, leaves))]
            leaves = [p.requires_grad_() for p in phi]
            want = torch.autograd.grad(loss(lambda a: torch.func.functional_call(
                model, dict(zip([n for n, _ in model.named_parameters()], leaves)), (a,)), (xq, yq)), leaves)
            got = torch_ufom.hypergrad(model, loss, loss, (x, y), (xq, yq), steps=steps, inner_lr=lr,
                                       mode=mode, q=0.5, force_truncation=0)
            result = torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                              inner_lr=lr, steps=steps, mode=mode, q=0.5).backward(
                loss, loss, (x, y), (xq, yq), force_truncation=0)
    finally:
        pool.shutdown()
        torch.clear_autocast_cache()  # (what the toggled loss and the worker's region left)
    assert torch.equal(result.inner_losses, torch.stack(losses))
    assert len(set(torch.stack(losses).tolist())) == steps  # the loop moved at every step
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_an_inner_loss_that_is_a_view_of_a_parameter_is_logged_before_the_update():
    # Review s34C F2: the fast path logged each step's loss after updating the parameters in
    # place, so a loss that is a view of one (here t[0]) was reported at the next step's value.
    class Scalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.t = nn.Parameter(torch.tensor([2.0, -1.0], dtype=torch.float64))

        def forward(self, x):
            return self.t

    def inner_loss(f, x):
        return f(x)[0]

    def outer_loss(f, x):
        return (f(x) ** 2).sum()
    model, x = Scalar(), torch.ones((), dtype=torch.float64)
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.0), inner_lr=0.5,
                                    steps=4, mode="fom")
    result = meta.backward(inner_loss, outer_loss, x, x)
    assert result.inner_losses.tolist() == [2.0, 1.5, 1.0, 0.5]


def test_a_plain_swap_is_a_token_until_another_call_looks():
    """A swap with nothing to join, watch or read back (no other swap active, no buffers) is
    registered as a token, the only entry of the registry; a call nested in it (or another
    thread's) turns it into the entry and group the general path makes, and nests over it."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1)).double()
    own = [p for p in net.parameters()]
    full = lambda v, *shape: torch.full(shape, v, dtype=torch.float64)  # noqa: E731
    outer = torch_ufom.FunctionalModel(net, {"0.weight": full(1.0, 2, 2)}, {})
    inner_ = torch_ufom.FunctionalModel(net, {"2.weight": full(2.0, 1, 2)}, {})
    x = torch.ones(1, 2, dtype=torch.float64)
    seen = {}

    def fn(m):
        seen["token"] = [type(entry) for entry in functional_model._SWAPS]
        y = inner_(x)  # nested: promotes the token, swaps 2.weight over it
        seen["after"] = [[e.model for e in group.stack] for group in functional_model._SWAPS]
        seen["weight"] = m[0].weight
        return y

    y = outer.run(fn)
    assert seen["token"] == [list]
    assert seen["after"] == [[outer]]  # the nested swap came off, the outer one is an entry now
    assert torch.equal(seen["weight"], full(1.0, 2, 2))
    with torch.no_grad():
        want = torch.tanh(x @ full(1.0, 2, 2).T + own[1]) @ full(2.0, 1, 2).T + own[3]
    assert torch.equal(y, want)
    assert [p for p in net.parameters()] == own and all(type(p) is nn.Parameter for p in own)
    assert not functional_model._SWAPS
    # The inner loop's own calls take the quick path: the module's forward sees the token.
    kinds = []
    handle = net.register_forward_hook(lambda *_: kinds.append([type(e) for e in functional_model._SWAPS]))
    try:
        torch_ufom.hypergrad(net, mse, mse, (x, x.sum(1, keepdim=True)), (x, x.sum(1, keepdim=True)),
                             steps=3, inner_lr=0.1, mode="fom")
    finally:
        handle.remove()
    assert len(kinds) == 4 and all(k == [list] for k in kinds)  # (3 inner steps, the outer loss)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_the_token_path_is_bit_identical_to_the_registered_one(kind, monkeypatch):
    """The quick registration is the general one run faster: with it switched off, every swap
    registered as an entry and a group, the same hypergradients bit for bit."""
    fast = run(kind, "exact", "store", hvp="revrev")
    init = functional_model.Reparametrization.__init__

    def general(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.plain = False
    monkeypatch.setattr(functional_model.Reparametrization, "__init__", general)
    calls = []
    register = functional_model._Group.__init__
    monkeypatch.setattr(functional_model._Group, "__init__",
                        lambda self, entry: calls.append(1) or register(self, entry))
    slow = run(kind, "exact", "store", hvp="revrev")
    assert calls  # (the general path ran)
    assert len(fast) == len(slow) and all(torch.equal(a, b) for a, b in zip(fast, slow, strict=True))
