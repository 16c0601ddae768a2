"""The configuration: resolved once, read-only, changed between outer steps by reconfigure;
batches: a plain list is one batch; the vectorised path re-raises the user's errors."""
import copy
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import torch_ufom
from helpers import mlp_problem, mse, rel_err
from oracle import brute_force
from torch_ufom.adaptive import authors_q
from torch_ufom.config import adapted_parameters
from torch_ufom.truncation import Bernoulli, Geometric


def build(**kw):
    model, loss, data = mlp_problem(3)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    kw = {"inner_lr": 0.1, "steps": 3, **kw}
    return model, loss, data, opt, torch_ufom.MetaOptimizer(model, opt, **kw)


@pytest.mark.parametrize("name", ["steps", "mode", "q", "law", "memory", "slots", "hvp", "inner"])
def test_the_resolved_configuration_is_read_only(name):
    *_, meta = build(mode="exact")
    with pytest.raises(AttributeError, match=f"{name}.*reconfigure"):
        setattr(meta, name, 6 if name in ("steps", "slots") else "fom")


def test_steps_is_required():
    model, _, _ = mlp_problem(0)
    with pytest.raises(TypeError, match="steps"):
        torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), inner_lr=0.1)


def run_outer_steps(meta, loss, data, start, n=2):
    """``n`` outer steps of two tasks each, from the data's ``start``; the losses seen."""
    losses = []
    for t in range(n):
        meta.zero_grad()
        for i in range(2):
            res = meta.backward(loss, loss, data[start + 4 * t + i], data[start + 4 * t + 2 + i])
            losses.append(float(res.outer_loss))
        meta.step()
    return losses


@pytest.mark.parametrize("changes, fresh", [
    (dict(mode="exact"), dict(mode="exact")),
    (dict(mode="fom"), dict(mode="fom")),
    (dict(q=0.7), dict(mode="ufom", q=0.7)),
    (dict(truncation=Geometric(0.5, 0.5)), dict(truncation=Geometric(0.5, 0.5))),
    (dict(mode="truncated", k=2), dict(mode="truncated", k=2)),
])
def test_reconfigure_equals_a_fresh_optimizer_with_the_same_state(changes, fresh):
    model, loss, data, opt, meta = build(mode="ufom", q=0.3, generator=torch.Generator().manual_seed(1))
    run_outer_steps(meta, loss, data, 0)
    # A fresh optimizer on a copy of the model, with the same outer state and generator.
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=0.01)
    fresh_meta = torch_ufom.MetaOptimizer(twin, twin_opt, inner_lr=0.1, steps=3,
                                          generator=torch.Generator(), **fresh)
    fresh_meta.load_state_dict(copy.deepcopy(meta.state_dict()))  # torch.optim shares tensors
    meta.reconfigure(**changes)
    assert meta.law.probs(3) == fresh_meta.law.probs(3)
    got, want = run_outer_steps(meta, loss, data, 8), run_outer_steps(fresh_meta, loss, data, 8)
    assert got == want
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))


def test_reconfigure_checks_like_the_constructor_and_changes_nothing_on_error():
    model, loss, data, opt, meta = build(mode="ufom", q=0.3)
    before = meta.config
    for changes, arg in [(dict(mode="second"), "mode"), (dict(q=1.5), "q"), (dict(k=2), "k"),
                         (dict(mode="fom", q="auto"), "q"), (dict(slots=0), "slots")]:
        with pytest.raises(ValueError, match=arg):
            meta.reconfigure(**changes)
        assert meta.config is before
    with pytest.raises(TypeError, match="lr"):
        meta.reconfigure(lr=0.1)
    # Review DZ (session 21): q chosen again from statistics that cannot give one raised after
    # the new configuration was installed (fails on 1af941a).
    model, loss, data, opt, meta = build(mode="ufom", q="auto", q_rule="authors")
    meta.q_stats = {**meta.q_stats, "n_x": 1, "A": 0.01, "D": 1e-4, "c_f_steps": 0.0}
    before, stats = meta.config, dict(meta.q_stats)
    with pytest.raises(ValueError, match=r"Invalid c_x"):  # (review s32F F7: any ValueError passed)
        meta.reconfigure(q_min=0.1)
    assert meta.config is before and meta.q_stats == stats


def test_reconfigure_keeps_auto_q_statistics_while_the_rule_stays():
    model, loss, data, opt, meta = build(mode="ufom", q="auto", generator=torch.Generator().manual_seed(0))
    meta.zero_grad()
    meta.backward(loss, loss, data[0], data[1], force_truncation=3)
    meta.step()
    stats = dict(meta.q_stats)
    meta.reconfigure(memory="store")
    assert meta.q_stats == stats
    meta.reconfigure(mode="exact", q=0.1)
    assert meta.q_stats is None and meta.law.probs(3) == [0, 0, 0, 1]
    meta.reconfigure(mode="ufom", q=0.25)
    assert isinstance(meta.law, Bernoulli) and meta.q == 0.25


def test_reconfigure_of_q_min_chooses_q_again_from_the_kept_statistics():
    # The authors' rule counts costs in inner steps, so q is a function of A and D alone.
    model, loss, data, opt, meta = build(mode="ufom", q="auto", q_rule="authors", q_min=0.6, inner_lr=0.01,
                                         generator=torch.Generator().manual_seed(0))
    meta.zero_grad()
    meta.backward(loss, loss, data[0], data[1], force_truncation=3)
    meta.backward(loss, loss, data[2], data[3], force_truncation=0)
    meta.step()
    stats = dict(meta.q_stats)
    beta, n = 0.99, stats["n_x"]
    A, D = stats["A"] / (1 - beta ** n), stats["D"] / (1 - beta ** n) / 10
    unclipped = authors_q(A, D, 4, 6, 1e-9)
    assert n == 1 and stats["n_f"] == 1 and unclipped < 0.6 and stats["q"] == 0.6
    meta.reconfigure(q_min=0.05)
    assert {k: v for k, v in meta.q_stats.items() if k != "q"} == {k: v for k, v in stats.items() if k != "q"}
    assert meta.q_stats["q"] == max(unclipped, 0.05)
    meta.reconfigure(q_beta=0.5)  # other moving averages: they start afresh
    assert meta.q_stats["n_x"] == 0 and meta.q_stats["q"] == 0.05  # the authors' q_init


def test_a_list_is_one_batch_in_every_entry_point():
    model, loss, data = mlp_problem(4)
    x, y = data[0]
    kw = dict(steps=2, inner_lr=0.1, mode="exact")
    want = torch_ufom.hypergrad(model, loss, loss, (x, y), data[1], **kw)
    assert rel_err(torch_ufom.hypergrad(model, loss, loss, [x, y], list(data[1]), **kw), want) == 0
    xs, ys = torch.stack([data[i][0] for i in range(3)]), torch.stack([data[i][1] for i in range(3)])
    qx, qy = torch.stack([data[5 + i][0] for i in range(3)]), torch.stack([data[5 + i][1] for i in range(3)])
    tup = torch_ufom.hypergrad_batch(model, loss, loss, (xs, ys), (qx, qy), **kw)
    lst = torch_ufom.hypergrad_batch(model, loss, loss, [xs, ys], [qx, qy], **kw)
    assert rel_err(lst, tup) == 0
    oracle = [brute_force(model, loss, loss, lambda j, i=i: data[i], data[5 + i], 2, 0.1,
                          list(model.parameters()), 2) for i in range(3)]
    assert rel_err(tup, [sum(g) for g in zip(*oracle)]) < 1e-9


def test_step_batches_give_each_step_its_batch_in_both_paths():
    model, loss, data = mlp_problem(5)
    steps = torch_ufom.StepBatches([data[0], data[1], data[2]])
    kw = dict(steps=3, inner_lr=0.1, mode="exact")
    got = torch_ufom.hypergrad(model, loss, loss, steps, data[3], **kw)
    want = brute_force(model, loss, loss, data.__getitem__, data[3], 3, 0.1, list(model.parameters()), 3)
    assert rel_err(got, want) < 1e-9
    stacked = torch_ufom.StepBatches([tuple(torch.stack([data[j][k], data[j + 4][k]]) for k in range(2))
                                      for j in range(3)])
    query = tuple(torch.stack([data[3][k], data[7][k]]) for k in range(2))
    got = torch_ufom.hypergrad_batch(model, loss, loss, stacked, query, **kw)
    want2 = brute_force(model, loss, loss, lambda j: data[j + 4], data[7], 3, 0.1,
                        list(model.parameters()), 3)
    assert rel_err(got, [a + b for a, b in zip(want, want2)]) < 1e-9
    with pytest.raises(ValueError, match="support.*steps=3"):
        torch_ufom.hypergrad(model, loss, loss, torch_ufom.StepBatches(data[:2]), data[3], **kw)


def test_the_vectorised_path_raises_the_users_errors_and_refuses_detached_losses():
    model, loss, data = mlp_problem(6)
    xs, ys = torch.stack([data[i][0] for i in range(3)]), torch.stack([data[i][1] for i in range(3)])

    def broken(f, b):
        raise RuntimeError("my loss is broken")

    kw = dict(steps=2, inner_lr=0.1, mode="exact")
    with pytest.raises(RuntimeError, match="my loss is broken"):
        torch_ufom.hypergrad_batch(model, broken, loss, (xs, ys), (xs, ys), **kw)
    with pytest.raises(ValueError, match="inner_loss"):
        torch_ufom.hypergrad_batch(model, lambda f, b: mse(f, b).detach(), loss, (xs, ys), (xs, ys), **kw)


class _SyncCounter(TorchDispatchMode):
    """Counts the operations that make the host wait for a device: reading a scalar
    (``.item()``, ``bool()``), ``nonzero`` and copies to the CPU."""

    def __init__(self, copies: bool = True):
        super().__init__()
        self.count, self.copies = 0, copies

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name.startswith(("aten._local_scalar_dense", "aten.nonzero")):
            self.count += 1
        elif self.copies and name.startswith("aten._to_copy") and str(kwargs.get("device", "")) == "cpu":
            self.count += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("memory", ["checkpoint", "store"])
def test_backward_synchronises_with_the_host_at_most_once_per_task(memory):
    """Issue 13: ufom with a fixed q, dropout and checkpointing: one read per task (the
    finiteness flag), whichever branch the draws take."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    meta = torch_ufom.MetaOptimizer(model, opt, inner_lr=0.1, steps=12, mode="ufom", q=0.5,
                                    memory=memory, slots=3, generator=torch.Generator().manual_seed(3))
    _, loss, data = mlp_problem(0)
    tasks, truncations = 6, set()
    with _SyncCounter() as counter:
        for i in range(tasks):
            truncations.add(meta.backward(loss, loss, data[i], data[i + 6]).truncation)
    assert truncations == {0, 12}  # both branches ran
    assert 0 < counter.count <= tasks


def test_learned_rates_add_one_synchronisation_per_outer_step():
    # Their ranges are checked again when an outer step changed them: one read for all of them
    # (it was two per tensor: 12 more per outer step for Meta-SGD rates on this MLP).
    from torch_ufom.inner import SGD
    model, loss, data = mlp_problem(2)
    rates = {n: torch.full_like(p, 0.1, requires_grad=True) for n, p in model.named_parameters()}
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD([*model.parameters(), *rates.values()], lr=1e-3),
                                    inner=SGD(rates), steps=3, mode="exact")
    counts = []
    for step in range(3):
        with _SyncCounter() as counter:
            for i in range(4):
                meta.backward(loss, loss, data[i], data[i + 6])
        counts.append(counter.count)
        meta.step()
        meta.zero_grad()
    assert len(rates) == 6 and counts[1] == counts[2] == counts[0] + 1  # the first step checks nothing


@pytest.mark.parametrize("kind", ["inner_lr", "rates"])
def test_functional_calls_read_learned_rates_once(kind):
    # Review s35F F1: hypergrad / adapt built and validated the rule per call, reading a tensor
    # inner_lr twice (constructor and validate) and a dict of rates once per tensor: a host
    # synchronisation each on CUDA. Now one read for every range, plus the finiteness check.
    # (Reads only: exact's double backward of Softplus converts a bool mask with a copy "to the
    # CPU" that is none here and stays on the device on CUDA.)
    from torch_ufom.inner import SGD
    model, loss, data = mlp_problem(2)
    named = dict(model.named_parameters())
    if kind == "inner_lr":
        hyper = {"inner_lr": torch.tensor(0.1, dtype=torch.float64, requires_grad=True)}
    else:
        hyper = {"inner": SGD({n: torch.full_like(p, 0.1, requires_grad=True) for n, p in named.items()})}
    with _SyncCounter(copies=False) as counter:
        torch_ufom.hypergrad(model, loss, loss, data[0], data[1], steps=3, mode="exact", **hyper)
    assert counter.count == 2
    with _SyncCounter(copies=False) as counter:
        torch_ufom.adapt(model, loss, data[0], steps=3, **hyper)
    assert counter.count == 2
    # A value out of range is still named, and nothing is computed
    with torch.no_grad():
        (hyper["inner_lr"] if kind == "inner_lr" else hyper["inner"].hyper["lr"]["0.bias"]).fill_(-0.5)
    label = "inner_lr" if kind == "inner_lr" else "lr['0.bias']"
    with pytest.raises(ValueError, match=rf"Invalid {re.escape(label)}: values must be finite and >= 0"):
        torch_ufom.hypergrad(model, loss, loss, data[0], data[1], steps=3, mode="exact", **hyper)
    assert all(p.grad is None for p in model.parameters())


def test_a_rules_own_bounds_are_still_read_when_the_ranges_are_deferred():
    # Review s36R F1: the deferred checks (above) read only the declared ranges again, so a user's
    # validate bounding its rate through check_hyper(..., high=1) let 3.0 run; and a rule the user's
    # code builds during the check must still be refused there.
    from torch_ufom.inner import SGD, check_hyper

    class ClippedSGD(SGD):
        def validate(self, params, steps=None):
            super().validate(params, steps)
            check_hyper(self.hyper["lr"], "lr", params, low=0.0, high=1.0, closed=True, steps=steps)
    model, loss, data = mlp_problem(2)
    lr = torch.tensor(0.5, dtype=torch.float64)
    rule = ClippedSGD(lr)
    lr.fill_(3.0)
    for call in (lambda: torch_ufom.hypergrad(model, loss, loss, data[0], data[1], steps=2, inner=rule),
                 lambda: torch_ufom.adapt(model, loss, data[0], steps=2, inner=rule),
                 lambda: torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                                  inner=rule, steps=2)):
        with pytest.raises(ValueError, match=r"Invalid lr: values must be finite and in \[0.0, 1.0\]"):
            call()
    refused = []

    class Builds(SGD):
        def validate(self, params, steps=None):
            super().validate(params, steps)
            with pytest.raises(ValueError, match="Invalid lr"):
                SGD(torch.tensor(-1.0, dtype=torch.float64))
            refused.append(True)
    torch_ufom.hypergrad(model, loss, loss, data[0], data[1], steps=2, inner=Builds(0.1))
    assert refused == [True]


def test_declared_ranges_and_a_rules_own_bounds_hold_at_every_call():
    # Review s36Q F2: a rule of the user's whose validate checks nothing ran with a momentum moved
    # to -0.5 (its declared range) once only the validate's own checks were deferred; F3: a learned
    # rate moved past the bound of the user's validate by an outer step ran in MetaOptimizer.backward
    # (its per-call look read the declared ranges only).
    from torch_ufom.inner import SGD, check_hyper

    class Unchecked(SGD):
        def validate(self, params, steps=None):
            pass

    class Capped(SGD):
        def validate(self, params, steps=None):
            super().validate(params, steps)
            check_hyper(self.hyper["lr"], "lr", params, high=1.0)
    model, loss, data = mlp_problem(3)
    momentum = torch.tensor(0.5, dtype=torch.float64)
    rule = Unchecked(0.1, momentum=momentum)
    momentum.fill_(-0.5)
    for call in (lambda: torch_ufom.hypergrad(model, loss, loss, data[0], data[1], steps=2, inner=rule),
                 lambda: torch_ufom.adapt(model, loss, data[0], steps=2, inner=rule)):
        with pytest.raises(ValueError, match="Invalid momentum: values must be finite and >= 0.0"):
            call()
    lr = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD([*model.parameters(), lr], lr=0.1),
                                    inner=Capped(lr), steps=2, mode="exact")
    meta.backward(loss, loss, data[0], data[1])
    meta.step()
    with torch.no_grad():
        lr.fill_(3.0)
    meta.zero_grad()
    with pytest.raises(ValueError, match=r"Invalid lr: values must be finite and in \[0.0, 1.0\).*the values "
                                         "changed since they were checked"):
        meta.backward(loss, loss, data[0], data[1])
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("rule", ["adam", "amsgrad", "per-step"])
def test_inner_steps_build_no_tensors_from_host_data(rule, monkeypatch):
    # On CUDA, torch.tensor / torch.as_tensor of Python data is a blocking copy to the
    # device, which the dispatch counter above cannot see: Adam's float betas made two per
    # inner step, PerStep's float values one per parameter per step (review P).
    from torch_ufom.inner import SGD, Adam, PerStep
    model, loss, data = mlp_problem(1)
    inner = {"adam": Adam(0.01), "amsgrad": Adam(0.01, amsgrad=True),
             "per-step": SGD(PerStep([0.1, 0.05, 0.02, 0.01]))}[rule]
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), inner=inner,
                                    steps=4, mode="exact", memory="recompute")
    meta.backward(loss, loss, data[0], data[1])  # the first call may build its constants
    built = []
    for name in ("tensor", "as_tensor"):
        original = getattr(torch, name)

        def counted(data, *args, _original=original, **kwargs):
            if not isinstance(data, torch.Tensor):
                built.append(data)
            return _original(data, *args, **kwargs)
        monkeypatch.setattr(torch, name, counted)
    meta.backward(loss, loss, data[2], data[3])
    assert built == []


def test_a_float16_gradient_whose_norm_exceeds_65504_costs_no_extra_synchronisation():
    # The finiteness check's norms were float16: a finite gradient of norm above 65,504
    # overflowed, and the element-by-element recheck cost 7 host reads instead of 1 (review P).
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 1)).to(torch.float16)
    x, y = (30 * torch.randn(32, 256)).to(torch.float16), torch.zeros(32, 1, dtype=torch.float16)

    def inner(f, b):
        return ((f(b[0]) - b[1]) ** 2).mean()

    def outer(f, b):
        return 120.0 * inner(f, b)
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), inner_lr=1e-6,
                                    steps=1, mode="fom")
    with _SyncCounter() as counter:
        meta.backward(inner, outer, (x, y), (x, y))
    grads = [p.grad for p in model.parameters()]
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    assert max(float(g.float().norm()) for g in grads) > 65504
    assert counter.count == 1


def test_inner_params_knows_a_tied_parameter_by_each_of_its_names():
    # A tied weight is listed once by named_parameters() ("alias" here): its other name was "not a
    # parameter of the model", and a predicate true only for the other name left it out silently.
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            lin = torch.nn.Linear(3, 3)
            self.alias, self.l = lin.weight, lin

    model = Tied()
    assert [n for n, _ in model.named_parameters()] == ["alias", "l.bias"]
    for inner_params in (["l.weight"], ["alias"], "l.weight", lambda n: n == "l.weight"):
        assert list(adapted_parameters(model, inner_params)) == ["alias"]
    assert list(adapted_parameters(model, lambda n: n.startswith("l."))) == ["alias", "l.bias"]
