"""Review DP (session 20): tests that kill the mutants of session 19's look and backstop that survived
the suite (tests/test_review_fixes.py, tests/test_batch.py).

Most of session 19's refusal tests have the stop-gradient (or hook, or op) bite in every task and at every
inner step, where the numeric backstop (one HVP of step 1 of task 0, and each per-task sweep's first HVP,
its latest exact step) catches whatever a broken look misses. Here it bites where the backstop does not
look: at the middle inner step of three (per-step batches, flag in the batch), or in the tasks of a
meta-batch other than task 0; so only the look (the probe) can refuse, and each refusal is matched on the
look's own reason, not on text the backstop's message shares. Then the other way round: the backstop with
the look blinded (monkeypatched), its tolerance, the reverse HVP it compares with, and inputs on which a
broken look crashes or refuses falsely.

Each test names the mutant(s) of /work/review_dp it kills (REPORT.md, "Test gaps"). Everything is float64
(tests/conftest.py) and compared with a brute-force unroll (``tests/oracle.py``).
"""
import contextlib
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_ufom
from helpers import rel_err
from oracle import brute_force
from test_review_fixes import B, LR, STEPS, data, guard, layernorm_mlp, mlp, mse, task  # the same problems

STOP = "Invalid hvp: 'fwdrev' cannot run a loss with a stop-gradient made under torch.no_grad"
HOOK = "Invalid hvp: 'fwdrev' cannot run a loss that registers a gradient hook"
BACKSTOP = "Invalid hvp: 'fwdrev' gives another Hessian-vector product than reverse mode at inner step"


def oracle(model, inner, outer, support, query, lr=LR):
    """Exact G_r by one unrolled graph (plain SGD); ``support`` is a batch or StepBatches."""
    per_step = isinstance(support, torch_ufom.StepBatches)
    batches = list(support.batches) if per_step else None
    return brute_force(model, inner, outer, lambda j: batches[j] if per_step else support, query, STEPS, lr,
                       list(model.parameters()), STEPS)


def middle_step(make, lr=LR):
    """Per-step batches ``(x, y, make(j))`` and a query: what ``make`` sets bites at step 2 of 3 only."""
    (x, y), (xq, yq) = data(1), data(2)
    return torch_ufom.StepBatches([(x, y, make(j)) for j in range(STEPS)]), (xq, yq, make(0))


def refused_at_the_middle_step(loss, match, model=None, lr=LR, make=None):
    """revrev is exact; fwdrev per task is refused with ``match`` (the look's reason): the backstop, which
    looks at steps 1 and 3, cannot see what ``loss`` does at step 2 only."""
    model = mlp() if model is None else model
    s, q = middle_step(make or (lambda j: torch.tensor([0.5 if j == 1 else 1.0])))
    kw = dict(steps=STEPS, inner_lr=lr, mode="exact")
    got = torch_ufom.hypergrad(model, loss, mse, s, q, hvp="revrev", **kw)
    assert rel_err(got, oracle(model, loss, mse, s, q, lr)) < 1e-10
    with pytest.raises(ValueError, match=match):
        torch_ufom.hypergrad(model, loss, mse, s, q, hvp="fwdrev", **kw)


def looped_for_tasks_after_the_first(loss, match):
    """A default exact meta-batch on a LayerNorm MLP, ``loss``'s stop biting in tasks 1 and 2 only (the
    plan's backstop checks task 0): the per-task loop with a warning naming the look's reason, and exact."""
    model, (x, y), (xq, yq) = layernorm_mlp(), data(3, B), data(4, B)
    scale = torch.tensor([[1.0], [0.5], [0.5]])
    S, Qs = (x, y, scale), (xq, yq, scale)
    with pytest.warns(UserWarning, match=match):
        got = torch_ufom.hypergrad_batch(model, loss, mse, S, Qs, steps=STEPS, inner_lr=LR, mode="exact")
    want = [sum(t) for t in zip(*[oracle(model, loss, mse, task(S, i), task(Qs, i)) for i in range(B)])]
    assert rel_err(got, want) < 1e-10


@contextlib.contextmanager
def warnings_as_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# -- stop-gradients the look must see: through views of a .data alias, a fresh buffer's view, _foreach --

def data_view_scaled(f, b):
    out = f(b[0]) * 1.0
    out.data[:, 0].mul_(b[2])  # a view of a .data alias, written in place (a no-op where b[2] == 1)
    return ((out - b[1]) ** 2).mean()


def copy_into_a_fresh_view(f, b):
    out = f(b[0]) * 1.0
    buf = torch.zeros_like(out)
    with torch.no_grad():
        v = buf[:, 0]
        v.copy_(out[:, 0])  # a view of a fresh buffer filled under no_grad: its base carries the stop
    out = out + (b[2] - 1.0) * buf
    return ((out - b[1]) ** 2).mean()


def foreach_scaled(f, b):
    out = f(b[0]) * 1.0
    torch._foreach_mul_([out.data], b[2].reshape(()))  # the target is a list holding a .data alias
    return ((out - b[1]) ** 2).mean()


@pytest.mark.parametrize("loss", [data_view_scaled, copy_into_a_fresh_view], ids=lambda f: f.__name__)
def test_a_stop_gradient_through_a_view_at_a_middle_step_is_refused(loss):
    # data_view_scaled: V09 (_aliased without its storage check), V35 (alias storages never recorded);
    # copy_into_a_fresh_view: V15 (_written holds the written view, not its base). fwdrev 7.4e-2 off.
    refused_at_the_middle_step(loss, STOP)


@pytest.mark.parametrize("loss", [data_view_scaled, copy_into_a_fresh_view], ids=lambda f: f.__name__)
def test_a_stop_gradient_through_a_view_in_later_tasks_sends_a_meta_batch_to_the_loop(loss):
    # The same mutants: a default LayerNorm meta-batch ran vectorised fwdrev, 1.3e-1 off, silently.
    looped_for_tasks_after_the_first(loss, "per-task loop.*cannot run a loss with a stop-gradient")


def test_a_foreach_write_into_a_data_alias_at_a_middle_step_is_seen():
    # V18 (_targets drops _foreach lists): fwdrev 7.3e-2 off. (Its meta-batch fails under vmap and loops.)
    refused_at_the_middle_step(foreach_scaled, STOP)


def test_an_in_place_write_with_gradients_sharing_a_logged_data_storage_is_no_stop_gradient():
    # V10 (_aliased without 'not t.requires_grad'): a .data read for logging shares the storage of a tensor
    # then written in place with gradients enabled (autograd differentiates that write): fwdrev was refused
    # and the LayerNorm meta-batch ran the per-task loop.
    # (Session 25: a log kept in a list outside the module sends a meta-batch to the loop, whose
    # log holds plain tensors; under vmap it held tensors of the transform's, which torch.stack
    # then failed on with an internal assert. The look at the .data alias runs on the value read.)
    log = []

    def loss(f, b, keep=True):
        out = f(b[0]) * 1.0
        largest = out.data.abs().max()
        if keep:
            log.append(largest)
        out.mul_(2.0)
        return ((out - b[1]) ** 2).mean()
    model, s, q = mlp(), data(1), data(2)
    got = torch_ufom.hypergrad(model, loss, mse, s, q, steps=STEPS, inner_lr=LR, mode="exact", hvp="fwdrev")
    assert rel_err(got, oracle(model, loss, mse, s, q)) < 1e-10
    model, S, Qs = layernorm_mlp(), data(3, B), data(4, B)
    want = [sum(t) for t in zip(*[oracle(model, loss, mse, task(S, i), task(Qs, i)) for i in range(B)])]
    with warnings_as_errors():
        got = torch_ufom.hypergrad_batch(model, functools.partial(loss, keep=False), mse, S, Qs, steps=STEPS,
                                         inner_lr=LR, mode="exact")
    assert rel_err(got, want) < 1e-10
    log.clear()
    with pytest.warns(UserWarning, match="per-task loop: a loss keeps a tensor computed from a task's"):
        got = torch_ufom.hypergrad_batch(model, loss, mse, S, Qs, steps=STEPS, inner_lr=LR, mode="exact")
    assert rel_err(got, want) < 1e-10
    assert torch.stack(log).shape == (len(log),) and len(log) >= B * STEPS


def test_targets_made_under_inference_mode_are_watched_without_error():
    # V12 (_watch keeps inference tensors): targets from a data pipeline under torch.inference_mode have
    # no version counter: "RuntimeError: Inference tensors do not track version counter" in the probe.
    def inference(b):
        with torch.inference_mode():
            return b[0], b[1].clone()  # the targets only (Linear saves the inputs for backward)
    model, s, q = mlp(), inference(data(1)), inference(data(2))
    got = torch_ufom.hypergrad(model, mse, mse, s, q, steps=STEPS, inner_lr=LR, mode="exact", hvp="fwdrev")
    assert rel_err(got, oracle(model, mse, mse, s, q)) < 1e-10
    model, S, Qs = layernorm_mlp(), inference(data(3, B)), inference(data(4, B))
    got = torch_ufom.hypergrad_batch(model, mse, mse, S, Qs, steps=STEPS, inner_lr=LR, mode="exact")
    want = [sum(t) for t in zip(*[oracle(model, mse, mse, task(S, i), task(Qs, i)) for i in range(B)])]
    assert rel_err(got, want) < 1e-10


# -- what decides fwdrev, done at the middle inner step only (probe_steps must look at every batch) -------

def at_middle_step(body):
    """An inner loss that is plain MSE but at the step whose batch carries a true flag ``b[2]``."""
    def loss(f, b):
        x, y, flag = b
        if not bool(flag):
            return ((f(x) - y) ** 2).mean()
        return body(f, x, y)
    return loss


def flag(j):
    return torch.tensor(float(j == 1))


def node_prehook(f, x, y):
    out = f(x) * 1.0
    out.grad_fn.register_prehook(lambda grad_outputs: tuple(g * 0.5 for g in grad_outputs))
    return ((out - y) ** 2).mean()


def cox(f, x, y):
    risk = 100.0 * f(x).sum(-1)  # a wide range: torch's forward-mode derivative drops early prefixes
    return (torch.logcumsumexp(risk, 0) - risk).mean() / 100.0


def layer_norm_penalty(ln):
    """An input-gradient penalty by the loss's own torch.func through ``ln`` (a layer norm)."""
    def body(f, x, y):
        def g(xi):
            return torch.tanh(ln(torch.cat([f(xi[None]), xi[None]], -1), (6,))).sum()
        dx = torch.func.vmap(torch.func.grad(g))(x)
        return ((f(x) - y) ** 2).mean() + 0.1 * (dx ** 2).mean()
    return body


def test_a_graph_node_hook_at_a_middle_step_is_refused():
    # V25 (the inner loss's node hooks not merged into the probe's hooks): per-task fwdrev 9.3e-2 off.
    refused_at_the_middle_step(at_middle_step(node_prehook), HOOK, lr=0.3, make=flag)


def test_logcumsumexp_at_a_middle_step_is_refused():
    # V29 (probe_steps drops later batches' forward_wrong): per-task fwdrev 64x off.
    refused_at_the_middle_step(at_middle_step(cox), "Invalid hvp: 'fwdrev' cannot run torch.logcumsumexp",
                               lr=0.3, make=flag)


@pytest.mark.parametrize("ln", [F.layer_norm, torch.layer_norm], ids=["F.layer_norm", "torch.layer_norm"])
def test_a_torch_func_loss_through_a_layer_norm_at_a_middle_step_is_refused(ln):
    # V28 (probe_steps drops later batches' third), and for torch.layer_norm, which the look sees at the
    # ATen level only, V05 (native_layer_norm dropped from _ATEN_THIRD_ORDER) and V32 (the ATen table
    # ignored): per-task fwdrev 2.8e-2 off.
    refused_at_the_middle_step(at_middle_step(layer_norm_penalty(ln)),
                               r"Invalid hvp: 'fwdrev' cannot run a loss that differentiates itself "
                               r"\(torch.func\) through LayerNorm", lr=0.3, make=flag)


# -- the numeric backstop: with the look blinded, its tolerance, the reverse HVP it compares with ---------

def blind_to_node_hooks(monkeypatch):
    """The look does not see graph-node hooks (as under a profiler, or for a registration it cannot
    follow), leaving the numeric backstop."""
    monkeypatch.setattr(torch_ufom.vectorised, "_watching_node_hooks", lambda found: contextlib.nullcontext())


def hooked(f, b):
    out = f(b[0]) * 1.0
    if out.grad_fn is not None:
        out.grad_fn.register_prehook(lambda grad_outputs: tuple(g * 0.5 for g in grad_outputs))
    return ((out - b[1]) ** 2).mean()


def hooked_when(f, b):
    return hooked(f, b) if bool(b[2]) else mse(f, b)


def test_per_task_fwdrev_checks_the_first_step_too(monkeypatch):
    # F04 (check_fwdrev_task without check_fwdrev_agrees): a hook the look misses, at step 1 only, where
    # the sweep's own check (its first HVP, step 3's) does not look: per-task fwdrev 3.3e-2 off.
    blind_to_node_hooks(monkeypatch)
    model, (x, y), q = mlp(), data(1), data(2)
    s = torch_ufom.StepBatches([(x, y, torch.tensor(float(j == 0))) for j in range(STEPS)])
    with pytest.raises(ValueError, match=BACKSTOP + " 1"):
        torch_ufom.hypergrad(model, hooked_when, mse, s, q, steps=STEPS, inner_lr=LR, mode="exact",
                             hvp="fwdrev")


def test_an_explicit_fwdrev_meta_batch_checks_task_0(monkeypatch):
    # F02 (no check_fwdrev_agrees on task 0 for an explicit hvp='fwdrev' meta-batch): a hook the look
    # misses ran vectorised fwdrev, which does not run it: 1.1e-1 off, silently.
    blind_to_node_hooks(monkeypatch)
    model, S, Qs = mlp(), data(3, B), data(4, B)  # (a branch on the batch would fail under vmap and loop)
    with pytest.raises(ValueError, match=BACKSTOP + " 1"):
        torch_ufom.hypergrad_batch(model, hooked, mse, S, Qs, steps=STEPS, inner_lr=LR, mode="exact",
                                   hvp="fwdrev")


def test_the_backstop_refuses_a_disagreement_of_1e_7():
    # U07 (tolerance sqrt(eps) x 100): an explosion guard whose no_grad rescale, by 1 - 1e-7, bites at
    # step 3 only (the look sees step 1's calls only): fwdrev ran, 6.1e-8 off.
    model, (x, y), (xq, yq) = mlp(), data(1), data(2)
    lr, s, q = 0.3, (x, 4 * y), (xq, 4 * yq)
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    peaks = []
    for _ in range(STEPS):  # the plain inner loop's largest output at steps 1..3
        out = torch.func.functional_call(model, dict(zip(names, params)), (x,))
        peaks.append(float(out.detach().abs().max()))
        grads = torch.autograd.grad(((out - s[1]) ** 2).mean(), params)
        params = [p - lr * g for p, g in zip(params, grads)]
    assert peaks[2] > max(peaks[:2])
    with pytest.raises(ValueError, match=BACKSTOP + " 3"):  # the guard bites at step 3 only, by 1e-7
        torch_ufom.hypergrad(model, guard(peaks[2] / (1 + 1e-7)), mse, s, q, steps=STEPS, inner_lr=lr,
                             mode="exact", hvp="fwdrev")


def test_fwdrev_runs_an_inner_loss_linear_in_the_parameters():
    # U09 (the reverse HVP keeps gradients that do not require grad): the inner gradient does not depend
    # on the parameters, so "element 0 of tensors does not require grad" in the sweep's check.
    def linear(f, b):
        return (f(b[0]) * b[1]).mean()
    torch.manual_seed(0)
    model, s, q = nn.Linear(4, 2), data(1), data(2)
    got = torch_ufom.hypergrad(model, linear, mse, s, q, steps=STEPS, inner_lr=LR, mode="exact", hvp="fwdrev")
    assert rel_err(got, oracle(model, linear, mse, s, q)) < 1e-10


def test_fwdrev_runs_a_model_with_dropout():
    # U10 (the reverse HVP outside step j's random stream): it drew other dropout masks than the step, so
    # the sweep's check refused fwdrev falsely ("3.5e-01 relative").
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Dropout(0.3), nn.Linear(5, 2))
    s, q = data(1), data(2)
    kw = dict(steps=STEPS, inner_lr=LR, mode="exact")
    seeded = dict(kw, generator=torch.Generator().manual_seed(0))
    got = torch_ufom.hypergrad(model, mse, mse, s, q, hvp="fwdrev", **seeded)
    seeded = dict(kw, generator=torch.Generator().manual_seed(0))
    want = torch_ufom.hypergrad(model, mse, mse, s, q, hvp="revrev", **seeded)
    assert rel_err(got, want) < 1e-10
