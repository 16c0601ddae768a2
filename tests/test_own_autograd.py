"""Models whose forward brings its own autograd machinery: custom ``torch.autograd.Function``
activations (a ``@once_differentiable`` backward, new style with ``setup_context`` and old style; a
backward that computes under ``torch.no_grad()``; a plain twice-differentiable one), a stop-gradient
section under ``torch.no_grad()`` in ``forward``, and a gradient hook registered on an activation.

Every model is Linear(3, 4) -> [affine LayerNorm(4)] -> activation -> Linear(4, 1) in float64 with
mse losses, 3 inner steps of SGD at lr 0.1. The reference is ``tests/oracle.py``'s brute-force
unroll of the same model code (autograd's own answer), or the per-task loop where the contract is
"a meta-batch equals its tasks run one by one".

Contract:
1. ``@once_differentiable``: every exact reverse-over-reverse path raises a RuntimeError naming
   ``once_differentiable`` (autograd.grad with explicit inputs silently skips torch's error node,
   dropping the Function's second-order term), and ``MetaOptimizer`` writes nothing; ``fom`` runs
   and equals the first-order oracle.
2. ``hvp="fwdrev"`` is refused ("Invalid hvp") for a ``no_grad`` section or any custom Function:
   forward-mode AD pushes tangents through ``no_grad`` where the reverse-mode gradient it
   differentiates does not, so the HVP mixes two functions.
3. Default settings on a meta-batch with an affine LayerNorm (which makes the vectorised sweep switch
   to forward-over-reverse by itself) plus such a construct: the result equals the per-task loop,
   with a warning.
4. A hook registered on an activation inside ``forward``: meta-batches equal the per-task loop (the
   vectorised outer gradient dropped the hook), with a warning; ``fwdrev`` is refused.
"""
import pytest
import torch
from torch import nn
from torch.autograd.function import once_differentiable

import torch_ufom
from helpers import mse, rel_err
from oracle import brute_force

STEPS, LR, Q, TASKS = 3, 0.1, 0.5, 3


# --- activations: tanh written as custom autograd Functions ------------------------------------

class OnceOld(torch.autograd.Function):
    """tanh, old style (``ctx`` in ``forward``), backward marked ``@once_differentiable``."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.tanh()

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (1 - x.tanh() ** 2)


class NoGradBackward(torch.autograd.Function):
    """tanh whose backward computes under ``no_grad``: silently not twice differentiable (its
    second-order term is 0 for reverse mode); vmap rule and jvp, so every path can run it."""
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.tanh()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        with torch.no_grad():
            return g * (1 - x.tanh() ** 2)

    @staticmethod
    def jvp(ctx, xt):
        (x,) = ctx.saved_tensors
        return xt * (1 - x.tanh() ** 2)


class DiffTanh(torch.autograd.Function):
    """tanh with a twice-differentiable backward, vmap rule and jvp: a correct custom Function."""
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.tanh()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (1 - x.tanh() ** 2)

    @staticmethod
    def jvp(ctx, xt):
        (x,) = ctx.saved_tensors
        return xt * (1 - x.tanh() ** 2)


class OnceNew(DiffTanh):
    """tanh, new style (``setup_context``), backward marked ``@once_differentiable``."""

    backward = staticmethod(once_differentiable(DiffTanh.backward))


FUNCTIONS = {"once_new": OnceNew, "once_old": OnceOld, "nograd_backward": NoGradBackward,
             "diff_function": DiffTanh}


class Net(nn.Module):
    """Linear(3, 4) -> [affine LayerNorm(4)] -> activation -> Linear(4, 1), float64.

    ``kind``: a key of FUNCTIONS (the activation), ``"no_grad_section"`` (tanh, then a stop-gradient
    target computed under ``torch.no_grad()`` from tensors that require grad), ``"hook"`` (tanh with
    ``h.register_hook(lambda g: 2 * g)`` while ``h`` requires grad) or ``"plain"`` (tanh).
    """

    def __init__(self, kind, layernorm=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(4, 1)
        self.ln = nn.LayerNorm(4) if layernorm else nn.Identity()
        if layernorm:
            with torch.no_grad():  # an affine LayerNorm away from its (1, 0) initialisation
                self.ln.weight.add_(0.3 * torch.randn(4))
                self.ln.bias.add_(0.2 * torch.randn(4))
        self.kind = kind
        self.double()

    def forward(self, x):
        h = self.ln(self.l1(x))
        h = FUNCTIONS[self.kind].apply(h) if self.kind in FUNCTIONS else torch.tanh(h)
        if self.kind == "hook" and h.requires_grad:
            h.register_hook(lambda g: 2 * g)
        out = self.l2(h)
        if self.kind == "no_grad_section":
            with torch.no_grad():
                target = self.l2(h)
            out = out + 0.5 * target * out
        return out


def tasks(seed=0):
    """(supports, queries): TASKS stacked regression tasks of 5 points each."""
    g = torch.Generator().manual_seed(seed)
    xs, ys, xq, yq = (torch.randn(TASKS, 5, d, generator=g, dtype=torch.float64) for d in (3, 1, 3, 1))
    return (xs, ys), (xq, yq)


def task(batch, i):
    return tuple(t[i] for t in batch)


def oracle(model, support, query, k):
    """G_k of one task by the brute-force unroll (tests/oracle.py) of the same model code."""
    return brute_force(model, mse, mse, lambda j: support, query, STEPS, LR, list(model.parameters()), k)


def summed(per_task):
    return [sum(ts) for ts in zip(*per_task)]


def loop_hypergrad(make, sups, qrys, **kw):
    """The per-task loop: the sum of ``hypergrad`` over the tasks."""
    return summed([torch_ufom.hypergrad(make(), mse, mse, task(sups, i), task(qrys, i), steps=STEPS,
                                        inner_lr=LR, **kw) for i in range(TASKS)])


def meta_for(model, **kw):
    return torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.0), LR, steps=STEPS,
                                    **kw)


def grads(model):
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


def loop_backward(make, sups, qrys, **kw):
    """The per-task loop: one ``MetaOptimizer.backward`` per task, accumulated into ``.grad``."""
    model = make()
    meta = meta_for(model, **kw)
    meta.zero_grad()
    for i in range(TASKS):
        meta.backward(mse, mse, task(sups, i), task(qrys, i))
    return grads(model)


# --- 1. @once_differentiable -------------------------------------------------------------------

ONCE = ["once_new", "once_old"]
MEMORY = [dict(memory="store"), dict(memory="recompute"), dict(memory="checkpoint"),
          dict(memory="checkpoint", slots=1)]
MEMORY_IDS = ["store", "recompute", "checkpoint", "checkpoint_slots1"]


@pytest.mark.parametrize("mem", MEMORY, ids=MEMORY_IDS)
@pytest.mark.parametrize("kind", ONCE)
def test_exact_hypergrad_through_once_differentiable_raises(kind, mem):
    # Was: no error, the Function's second-order term silently dropped (30 % off the exact number).
    sups, qrys = tasks()
    with pytest.raises(RuntimeError, match="once_differentiable"):
        torch_ufom.hypergrad(Net(kind), mse, mse, task(sups, 0), task(qrys, 0), steps=STEPS, inner_lr=LR,
                             mode="exact", hvp="revrev", **mem)


@pytest.mark.parametrize("kind", ONCE)
def test_meta_optimizer_ufom_exact_branch_through_once_differentiable_raises_and_writes_nothing(kind):
    sups, qrys = tasks()
    model = Net(kind)
    before = [p.detach().clone() for p in model.parameters()]
    meta = meta_for(model, mode="ufom", q=Q, hvp="revrev")
    meta.zero_grad()
    with pytest.raises(RuntimeError, match="once_differentiable"):
        meta.backward(mse, mse, task(sups, 0), task(qrys, 0), force_truncation=STEPS)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("kind", ONCE)
def test_fom_through_once_differentiable_equals_the_first_order_oracle(kind):
    # Already holds: G_0 needs no second derivative.
    sups, qrys = tasks()
    s, q = task(sups, 0), task(qrys, 0)
    want = oracle(Net(kind), s, q, 0)
    got = torch_ufom.hypergrad(Net(kind), mse, mse, s, q, steps=STEPS, inner_lr=LR, mode="fom")
    assert rel_err(got, want) < 1e-10
    model = Net(kind)
    meta = meta_for(model, mode="fom")
    meta.zero_grad()
    meta.backward(mse, mse, s, q)
    assert rel_err(grads(model), want) < 1e-10


# --- 2. fwdrev refused for no_grad sections and custom Functions -------------------------------

FWDREV_REFUSED = ["no_grad_section", "nograd_backward", "diff_function"]


@pytest.mark.parametrize("kind", FWDREV_REFUSED)
def test_fwdrev_hypergrad_refuses_no_grad_and_custom_functions(kind):
    # Was: a silent wrong number (no_grad section 75 %, no_grad backward 33 % off brute force).
    sups, qrys = tasks()
    with pytest.raises(ValueError, match="Invalid hvp"):
        torch_ufom.hypergrad(Net(kind), mse, mse, task(sups, 0), task(qrys, 0), steps=STEPS, inner_lr=LR,
                             mode="exact", hvp="fwdrev")


@pytest.mark.parametrize("vectorise", [True, False])
@pytest.mark.parametrize("kind", FWDREV_REFUSED)
def test_fwdrev_hypergrad_batch_refuses_no_grad_and_custom_functions(kind, vectorise):
    sups, qrys = tasks()
    with pytest.raises(ValueError, match="Invalid hvp"):
        torch_ufom.hypergrad_batch(Net(kind), mse, mse, sups, qrys, steps=STEPS, inner_lr=LR, mode="exact",
                                   hvp="fwdrev", vectorise=vectorise)


# --- 3. default settings, affine LayerNorm + no_grad section / no_grad backward ----------------

LAYERNORM_KINDS = ["no_grad_section", "nograd_backward"]


def layernorm_net(kind):
    return lambda: Net(kind, layernorm=True)


@pytest.mark.parametrize("kind", LAYERNORM_KINDS)
def test_layernorm_hypergrad_batch_defaults_equal_the_per_task_loop(kind):
    # Was: the vectorised plan switched to forward-over-reverse by itself: 17 % / 91 % off, silently.
    make = layernorm_net(kind)
    sups, qrys = tasks()
    loop = loop_hypergrad(make, sups, qrys, mode="exact")
    want = summed([oracle(make(), task(sups, i), task(qrys, i), STEPS) for i in range(TASKS)])
    assert rel_err(loop, want) < 1e-10  # the per-task (revrev) loop is autograd's own answer
    with pytest.warns(UserWarning, match="per-task loop"):  # (review s32F F8: any UserWarning passed)
        got = torch_ufom.hypergrad_batch(make(), mse, mse, sups, qrys, steps=STEPS, inner_lr=LR,
                                         mode="exact")
        assert rel_err(got, loop) < 1e-10  # inside: a wrong number is reported before a missing warning


@pytest.mark.parametrize("kind", LAYERNORM_KINDS)
def test_layernorm_backward_batch_defaults_equal_the_per_task_loop(kind):
    make = layernorm_net(kind)
    sups, qrys = tasks()
    loop = loop_backward(make, sups, qrys, mode="exact")
    model = make()
    meta = meta_for(model, mode="exact")
    meta.zero_grad()
    with pytest.warns(UserWarning, match="per-task loop"):  # (review s32F F8: any UserWarning passed)
        meta.backward_batch(mse, mse, sups, qrys)
        assert rel_err(grads(model), loop) < 1e-10


# --- 4. a gradient hook on an activation -------------------------------------------------------

MODES = ["fom", "exact"]


def hook_net():
    return Net("hook")


@pytest.mark.parametrize("mode", MODES)
def test_activation_hook_per_task_revrev_equals_the_brute_force_unroll(mode):
    # Already holds: the hook fires in the inner steps and in the outer gradient alike.
    sups, qrys = tasks()
    k = 0 if mode == "fom" else STEPS
    want = summed([oracle(hook_net(), task(sups, i), task(qrys, i), k) for i in range(TASKS)])
    got = loop_hypergrad(hook_net, sups, qrys, mode=mode, hvp="revrev")
    assert rel_err(got, want) < 1e-10
    without = summed([oracle(Net("plain"), task(sups, i), task(qrys, i), k) for i in range(TASKS)])
    assert rel_err(want, without) > 1e-2  # the hook matters


@pytest.mark.parametrize("mode", MODES)
def test_activation_hook_hypergrad_batch_defaults_equal_the_per_task_loop(mode):
    # Was: 33 % (fom) / 43 % (exact) off: a hook registered on a batched tensor under vmap does not
    # fire in the outer gradient at level 0.
    sups, qrys = tasks()
    loop = loop_hypergrad(hook_net, sups, qrys, mode=mode)
    with pytest.warns(UserWarning, match="per-task loop"):  # (review s32F F8: any UserWarning passed)
        got = torch_ufom.hypergrad_batch(hook_net(), mse, mse, sups, qrys, steps=STEPS, inner_lr=LR,
                                         mode=mode)
        assert rel_err(got, loop) < 1e-10


@pytest.mark.parametrize("mode", MODES)
def test_activation_hook_backward_batch_defaults_equal_the_per_task_loop(mode):
    sups, qrys = tasks()
    loop = loop_backward(hook_net, sups, qrys, mode=mode)
    model = hook_net()
    meta = meta_for(model, mode=mode)
    meta.zero_grad()
    with pytest.warns(UserWarning, match="per-task loop"):  # (review s32F F8: any UserWarning passed)
        meta.backward_batch(mse, mse, sups, qrys)
        assert rel_err(grads(model), loop) < 1e-10


def test_activation_hook_fwdrev_is_refused():
    # Was: 23 % off brute force, silently.
    sups, qrys = tasks()
    with pytest.raises(ValueError, match="Invalid hvp"):
        torch_ufom.hypergrad(hook_net(), mse, mse, task(sups, 0), task(qrys, 0), steps=STEPS, inner_lr=LR,
                             mode="exact", hvp="fwdrev")
