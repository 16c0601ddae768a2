"""Regressions for three side effects a module or a loss can have, against references that do
not use the library (float64, tiny models):

A. A forward that updates a buffer by *reassignment* (``self.rm = a * self.rm + ...``): every
   inner step must see the buffer the previous step left, as a plain loop calling the module
   does. The oracle unrolls by hand on a deep copy of the module itself (not ``functional_call``,
   which drops a reassigned buffer). The in-place twin is a control.
B. ``.grad`` layout: ``MetaOptimizer.backward`` / ``backward_batch`` write ``.grad`` with the
   parameter's strides, as ``loss.backward()`` does; CPU fused optimizers rely on it.
C. Per-step random streams for a loss that draws inside ``torch.random.fork_rng()`` (the global
   generator's state never moves): the forward pass must still seed every step.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_ufom
from helpers import mse, rel_err
from torch_ufom import inner as I

DTYPE = torch.float64
STEPS, LR = 3, 0.5
EMA = 0.7


def _data(seed, *shapes):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*s, generator=g, dtype=DTYPE) for s in shapes)


# -- A: a buffer reassigned inside forward ------------------------------------------------

class RunCenter(nn.Module):
    """Centres by a running mean that the same forward updates, then reads."""

    def __init__(self, d, reassign):
        super().__init__()
        self.reassign = reassign
        self.register_buffer("rm", torch.linspace(-0.4, 0.4, d, dtype=DTYPE))

    def forward(self, h):
        if self.reassign:
            self.rm = EMA * self.rm + (1 - EMA) * h.mean(0).detach()
        else:
            with torch.no_grad():
                self.rm.mul_(EMA).add_((1 - EMA) * h.mean(0))
        return torch.tanh(h - self.rm)


def _ema_model(reassign):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), RunCenter(4, reassign), nn.Linear(4, 2)).to(DTYPE)


SUPPORT = _data(1, (6, 3), (6, 2))
QUERY = _data(2, (5, 3), (5, 2))


def _hand_unroll(model, exact):
    """The plain loop: a deep copy of the module called as a module (its forward updates its
    own buffer once per call), its parameter entries replaced by the unrolled tensors.
    Returns (hypergradient, adapted parameters, buffers after the inner loop)."""
    m = copy.deepcopy(model)
    slots = [(mod, name) for mod in m.modules() for name in mod._parameters]
    leaves = list(model.parameters())

    def put(phi):
        for (mod, name), t in zip(slots, phi, strict=True):
            mod._parameters[name] = t

    phi = leaves
    for _ in range(STEPS):
        put(phi)
        gs = torch.autograd.grad(mse(m, SUPPORT), phi, create_graph=exact)
        phi = [p - LR * g for p, g in zip(phi, gs)]
    buffers = {n: b.clone() for n, b in m.named_buffers()}
    put(phi)
    hyper = torch.autograd.grad(mse(m, QUERY), leaves)
    return hyper, [p.detach() for p in phi], buffers


CASES = [("exact", "store"), ("exact", "recompute"), ("fom", "checkpoint")]


@pytest.mark.parametrize("reassign", [True, False], ids=["reassign", "inplace"])
@pytest.mark.parametrize("mode,memory", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_buffer_updated_in_forward_moves_with_the_inner_loop(reassign, mode, memory):
    model = _ema_model(reassign)
    rm0 = model[1].rm.clone()
    ref, _, _ = _hand_unroll(model, exact=(mode == "exact"))
    assert torch.equal(model[1].rm, rm0)
    got = torch_ufom.hypergrad(model, mse, mse, SUPPORT, QUERY, steps=STEPS, inner_lr=LR,
                               mode=mode, memory=memory)
    assert rel_err(got, ref) < 1e-10
    assert torch.equal(model[1].rm, rm0)  # the module's own buffer is never written


@pytest.mark.parametrize("reassign", [True, False], ids=["reassign", "inplace"])
def test_adapt_returns_the_buffers_the_loop_left(reassign):
    model = _ema_model(reassign)
    _, phi, buffers = _hand_unroll(model, exact=False)
    fm = torch_ufom.adapt(model, mse, SUPPORT, steps=STEPS, inner_lr=LR)
    assert rel_err([fm.buffers["1.rm"]], [buffers["1.rm"]]) < 1e-12
    assert rel_err([fm.params[n] for n, _ in model.named_parameters()], phi) < 1e-12


# -- B: .grad follows the parameter's layout ------------------------------------------------

class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 2, 3)
        self.fc = nn.Linear(2 * 3 * 3, 2)

    def forward(self, x):
        return self.fc(torch.tanh(self.c2(torch.tanh(self.c1(x)))).flatten(1))


class Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        w, e = _data(3, (3, 4), (2, 3))
        self.w = nn.Parameter(w.t())  # (4, 3), strides (1, 4)
        self.b = nn.Parameter(torch.zeros(3, dtype=DTYPE))
        self.e = nn.Parameter(e.t())  # (3, 2), strides (1, 3)

    def forward(self, x):
        # read through .mean() too: its per-task gradient comes out contiguous
        return torch.tanh(x @ self.w + self.b) @ self.e + self.w.mean()


def _conv(channels_last):
    with torch.random.fork_rng():
        torch.manual_seed(3)
        m = ConvNet().to(DTYPE)
    return m.to(memory_format=torch.channels_last) if channels_last else m


LAYOUTS = {  # name: (model, input shape, channels_last inputs)
    "conv_channels_last": (lambda: _conv(True), (2, 5, 5), False),
    "conv_channels_last_inputs": (lambda: _conv(False), (2, 5, 5), True),
    "transposed_param": (Transposed, (4,), False),
}
T = 2  # tasks in backward_batch


def _layout_tasks(shape, channels_last):
    xs, ys, xq, yq = _data(4, (T, 3) + shape, (T, 3, 2), (T, 3) + shape, (T, 3, 2))
    if channels_last:  # each task's (3, C, H, W) input in channels_last
        xs, xq = (x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3) for x in (xs, xq))
    return (xs, ys), (xq, yq)


@pytest.mark.parametrize("path", ["backward", "backward_batch_vectorised"])
@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_grad_has_the_parameter_layout_and_fused_adam_agrees(kind, path):
    make, shape, cl_inputs = LAYOUTS[kind]
    base = make()
    sup, qry = _layout_tasks(shape, cl_inputs)
    stepped, bad = [], {}
    for fused in (False, True):
        m = copy.deepcopy(base)
        opt = torch.optim.Adam(m.parameters(), lr=0.1, fused=fused)
        meta = torch_ufom.MetaOptimizer(m, opt, inner_lr=0.1, steps=2, mode="exact",
                                        vectorise=(path != "backward"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if path == "backward":
                meta.backward(mse, mse, tuple(t[0] for t in sup), tuple(t[0] for t in qry))
            else:
                meta.backward_batch(mse, mse, sup, qry)
        bad.update({n: (p.stride(), p.grad.stride()) for n, p in m.named_parameters()
                    if p.grad.stride() != p.stride()})
        opt.step()
        stepped.append([p.detach().clone() for p in m.parameters()])
    assert all(torch.allclose(a, b) for a, b in zip(*stepped, strict=True)), "fused Adam stepped otherwise"
    assert not bad, f".grad strides differ from the parameter's (param, grad): {bad}"


# -- C: per-step random streams for a loss that draws inside fork_rng ------------------------

RSTEPS, Q = 4, 0.5


def _noisy(f, batch):
    x, y = batch
    with torch.random.fork_rng():  # draws from per-step streams, leaves the global state as it was
        n = torch.randn_like(x)
    return F.mse_loss(f(x + 0.5 * n), y)


def _mlp():
    with torch.random.fork_rng():
        torch.manual_seed(5)
        return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DTYPE)


def _forked_hypergrad(rule, **kw):
    return torch_ufom.hypergrad(_mlp(), _noisy, mse, _data(6, (4, 3), (4, 2)), _data(7, (4, 3), (4, 2)),
                                steps=RSTEPS, generator=torch.Generator().manual_seed(0), **rule, **kw)


def test_fom_float_lr_equals_tensor_lr_sgd_rule_under_fork_rng():
    a = _forked_hypergrad(dict(inner_lr=0.1), mode="fom")
    b = _forked_hypergrad(dict(inner=I.SGD(lr=torch.tensor(0.1, dtype=DTYPE))), mode="fom")
    assert rel_err(a, b) < 1e-12


def test_ufom_branches_average_to_exact_under_fork_rng():
    rule = dict(inner_lr=0.1)
    exact = _forked_hypergrad(rule, mode="exact", memory="store")
    k0 = _forked_hypergrad(rule, mode="ufom", q=Q, force_truncation=0)
    kr = _forked_hypergrad(rule, mode="ufom", q=Q, force_truncation=RSTEPS)
    mean = [(1 - Q) * a + Q * b for a, b in zip(k0, kr, strict=True)]
    assert rel_err(mean, exact) < 1e-10


# -- D: calls in several threads ----------------------------------------------------------

def test_calls_in_two_threads_keep_their_own_random_streams():
    # Each step reseeds the process-wide generator: two threads' sweeps reseeded each other's
    # streams (replays drew other dropout masks, up to 0.57 off, or a false replay error) and
    # left the attention flags off. Sweeps now take turns; each thread's results must equal the
    # same calls run one after the other.
    import threading

    def loss(f, b):
        x, y = b
        return F.mse_loss(f(F.dropout(x, 0.3)), y)

    models = {}
    for seed in (1, 2):
        torch.manual_seed(seed)
        models[seed] = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).to(DTYPE)

    def calls(seed):
        model, gen = models[seed], torch.Generator().manual_seed(seed)
        support, query = _data(seed, (16, 3), (16, 1)), _data(seed + 1, (16, 3), (16, 1))
        return [torch_ufom.hypergrad(model, loss, loss, support, query, steps=8, inner_lr=0.1,
                                     mode="exact", memory="recompute", generator=gen) for _ in range(6)]

    want = {seed: calls(seed) for seed in (1, 2)}
    flags = (torch.backends.mha.get_fastpath_enabled(), torch.backends.cuda.flash_sdp_enabled())
    for _ in range(3):
        got, barrier = {}, threading.Barrier(2)

        def run(seed):
            barrier.wait()
            got[seed] = calls(seed)

        threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for seed in (1, 2):
            for a, b in zip(got[seed], want[seed]):
                assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert (torch.backends.mha.get_fastpath_enabled(), torch.backends.cuda.flash_sdp_enabled()) == flags


# -- E: what a MetaOptimizer keeps between meta-batches ------------------------------------

def test_a_meta_optimizer_keeps_neither_the_last_losses_nor_their_captures_and_pickles():
    # What the last probe found kept the losses themselves: a tensor a loss captured stayed
    # alive after the user dropped both, and torch.save(meta) failed on a lambda.
    import gc
    import io
    import weakref

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DTYPE)
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2,
                                    inner_lr=0.1, mode="exact", vectorise=True)
    supports, queries = _data(3, (2, 5, 3), (2, 5, 1)), _data(4, (2, 5, 3), (2, 5, 1))
    def make():
        captured = torch.ones(1000, dtype=DTYPE)
        return (lambda f, b: mse(f, b) + 0 * captured.sum()), weakref.ref(captured)

    loss, alive = make()
    meta.backward_batch(loss, mse, supports, queries)
    meta.step()
    del loss
    gc.collect()
    assert alive() is None
    torch.save(meta, io.BytesIO())
    copied = copy.deepcopy(meta)
    copied.backward_batch(mse, mse, supports, queries)


def test_a_replaced_buffer_equal_at_the_probe_s_batch_still_runs_the_loop():
    # The probe's model filled the probe's own dict with what the forward replaced, so its
    # identity check never fired: a running maximum unchanged at the first batch vectorised,
    # with the buffer held constant (0.26 off the per-task loop).
    class Observer(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1).to(DTYPE)
            self.register_buffer("mx", torch.ones((), dtype=DTYPE))

        def forward(self, x):
            self.mx = torch.maximum(self.mx, x.detach().abs().amax())
            return self.lin(x) / self.mx

    torch.manual_seed(0)
    model = Observer()

    def scaled(scale, seed):
        x = _data(seed, (2, 4, 2))[0]
        return scale * x / x.abs().amax(dim=(1, 2), keepdim=True)

    steps = [(scaled(s, i), _data(10 + i, (2, 4, 1))[0]) for i, s in enumerate((0.5, 2.0, 0.5))]
    query = _data(20, (2, 4, 2), (2, 4, 1))
    kw = dict(steps=3, inner_lr=0.1, mode="exact")
    with pytest.warns(UserWarning, match="buffers that the losses write"):
        got = torch_ufom.hypergrad_batch(model, mse, mse, torch_ufom.StepBatches(steps), query, **kw)
    per = [torch_ufom.hypergrad(model, mse, mse, torch_ufom.StepBatches([(a[i], b[i]) for a, b in steps]),
                                (query[0][i], query[1][i]), **kw) for i in range(2)]
    assert rel_err(got, [sum(t) for t in zip(*per)]) < 1e-12


def test_an_adapted_model_called_under_vmap_keeps_plain_buffers():
    # The read-back of a replaced buffer ran under the user's torch.func.vmap and kept vmap's
    # batched tensor: the next plain call raised torch's "tensor may have escaped". A
    # replacement under a transform is refused, and the model stays usable.
    class EMA(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1).to(DTYPE)
            self.register_buffer("rm", torch.zeros((), dtype=DTYPE))

        def forward(self, x):
            self.rm = 0.9 * self.rm + 0.1 * x.detach().mean()
            return self.lin(x) - self.rm

    torch.manual_seed(0)
    x, y = _data(1, (4, 2), (4, 1))
    fm = torch_ufom.adapt(EMA(), mse, (x, y), steps=2, inner_lr=0.1)
    before = fm.buffers["rm"]
    with pytest.raises(RuntimeError, match="replaced its buffer 'rm'"):
        torch.func.vmap(lambda xi: fm(xi.unsqueeze(0)))(x)
    assert fm.buffers["rm"] is before
    fm(x)
    assert not torch.equal(fm.buffers["rm"], before)  # a plain call carries it on


def test_a_buffer_replaced_at_a_later_step_only_runs_the_loop():
    # The probe saw the first step's batch: an observer switched on at step 2 replaced its
    # buffer under vmap, where the new value was dropped, silently (0.37 off the loop). Now the
    # look at the first task evaluates every step's batch, and a replacement under vmap raises
    # (which runs the loop) where the look misses one.
    class Observer(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(1, 4).to(DTYPE), nn.Linear(4, 1).to(DTYPE)
            self.register_buffer("m", torch.ones(4, dtype=DTYPE))

        def forward(self, x, observe=False):
            h = torch.tanh(self.a(x))
            if observe:
                self.m = torch.maximum(self.m, 2 * h.detach().abs().amax(0))
            return self.b(h / self.m)

    def inner(f, b):
        return ((f(b[0], observe=len(b) == 3) - b[1]) ** 2).mean()

    torch.manual_seed(3)
    model = Observer()
    x, y = _data(5, (3, 6, 1), (3, 6, 1))
    query = _data(6, (3, 5, 1), (3, 5, 1))
    kw = dict(steps=3, inner_lr=0.1, mode="exact")
    steps = torch_ufom.StepBatches([(x, y), (x, y, y), (x, y)])
    with pytest.warns(UserWarning, match="per-task loop: the module has buffers that the losses write"):
        got = torch_ufom.hypergrad_batch(model, inner, mse, steps, query, vectorise=True, **kw)
    per = [torch_ufom.hypergrad(model, inner, mse, torch_ufom.StepBatches([tuple(t[i] for t in b)
                                                                          for b in steps]),
                                (query[0][i], query[1][i]), **kw) for i in range(3)]
    assert rel_err(got, [sum(t) for t in zip(*per)]) < 1e-12
    assert torch.equal(model.m, torch.ones(4, dtype=DTYPE))
