"""The conformance matrix (issue 10): every zoo kind x every path against brute force.

Each cell runs one entry point of the library on one kind of model (``zoo.py``)
with forced truncation points ``K = 0``, ``K = 2`` (a middle ``K``) and
``K = r`` under a :class:`~torch_ufom.truncation.Geometric` law, and with
``mode="exact"``; batched cells run ``TASKS`` stacked tasks with mixed ``K``.
Every estimate must equal the oracle's randomized telescope

    G_0 + sum_{k=1..K} (G_k - G_{k-1}) / P_k,     P_k = P(K >= k)

built from brute-force ``G_k`` (``oracle.py``, float64), to ``TOL`` relative.
The only cells allowed to refuse (an error whose message says why) or to fall
back to the per-task loop (a warning "per-task loop: <why>", and the result
still exact) are those the kind's flags name (``zoo.Kind``). With dropout the
oracle cannot replay the library's random streams: there store, recompute and
checkpoint must agree bit for bit (store records what ran), and the dropout
must be live (another seed gives another result).

Each cell's outcome and worst relative error go to ``RESULTS``; with the
environment variable ``UFOM_CONFORMANCE_JSON`` set, the module writes them to
that file at the end, and ``tools/conformance_table.py`` renders
``docs/conformance.md`` from it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import time
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import torch_ufom
from oracle import brute_force, ref_adam, ref_sgd, telescope
from torch_ufom import inner
from torch_ufom.truncation import Geometric
from zoo import KIND, KINDS, TASKS, Kind

STEPS, MID, SLOTS = 3, 2, 1  # one checkpoint slot: K = 2 and K = 3 really replay
Q, RHO = 0.7, 0.6  # the Geometric law: P(K >= k) = Q RHO^(k-1)
SURVIVAL = [1.0] + [Q * RHO ** (k - 1) for k in range(1, STEPS + 1)]
LR, ADAM_LR = 0.1, 0.05
TOL = 1e-9
FORCED = [0, MID, STEPS]  # per task: one cell each; batched: one task each
assert len(FORCED) == TASKS

RULES = {  # the library's inner rule and the oracle's reference step
    "sgd": (lambda: inner.SGD(LR), ref_sgd(LR)),
    "momentum": (lambda: inner.SGD(LR, momentum=0.9), ref_sgd(LR, momentum=0.9)),
    "adam": (lambda: inner.Adam(ADAM_LR), ref_adam(ADAM_LR)),
    # Weight decay makes the momentum buffer read phi: not first_order_identity, so the
    # first-order steps are swept backwards (momentum and Adam alone pass them unchanged).
    "momentum_wd": (lambda: inner.SGD(LR, momentum=0.9, weight_decay=0.01),
                    ref_sgd(LR, momentum=0.9, weight_decay=0.01)),
}


@dataclass(frozen=True)
class Path:
    """One column of the matrix: an entry point and its settings."""

    name: str
    entry: str  # "hypergrad", "hypergrad_batch", "backward" or "backward_batch"
    memory: str = "checkpoint"
    hvp: str = "revrev"
    rule: str = "sgd"

    @property
    def batched(self) -> bool:
        return self.entry.endswith("_batch")


PATHS = [
    Path("hypergrad store", "hypergrad", memory="store"),
    Path("hypergrad recompute", "hypergrad", memory="recompute"),
    Path("hypergrad checkpoint", "hypergrad"),
    Path("hypergrad fwdrev", "hypergrad", hvp="fwdrev"),
    Path("hypergrad momentum", "hypergrad", rule="momentum"),
    Path("hypergrad adam", "hypergrad", rule="adam"),
    Path("hypergrad momentum+wd", "hypergrad", rule="momentum_wd"),
    Path("backward", "backward"),
    Path("backward momentum", "backward", rule="momentum"),
    Path("backward adam", "backward", rule="adam"),
    Path("hypergrad_batch revrev", "hypergrad_batch"),
    Path("hypergrad_batch fwdrev", "hypergrad_batch", hvp="fwdrev"),
    Path("backward_batch revrev", "backward_batch"),
    Path("backward_batch momentum", "backward_batch", rule="momentum"),
    Path("hypergrad_batch adam", "hypergrad_batch", rule="adam"),
    Path("backward_batch fwdrev", "backward_batch", hvp="fwdrev"),
]

# -- recording -------------------------------------------------------------------------------

RESULTS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    """Write the cells' outcomes to ``$UFOM_CONFORMANCE_JSON`` when the module ends."""
    start = time.perf_counter()
    yield
    target = os.environ.get("UFOM_CONFORMANCE_JSON")
    if target:
        data = {"torch": torch.__version__, "tolerance": TOL, "steps": STEPS, "tasks": TASKS,
                "seconds": round(time.perf_counter() - start, 1),
                "kinds": [{"name": k.name, "about": k.about} for k in KINDS],
                "paths": [p.name for p in PATHS], "cells": RESULTS}
        with open(target, "w") as fh:
            json.dump(data, fh, indent=1)


def record(kind: str, path: str, **cell) -> None:
    RESULTS.setdefault(kind, {})[path] = cell


# -- the oracle ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def oracle(kind_name: str, rule: str, task: int):
    """``[G_0, ..., G_r]`` of one task, over ``model.parameters()``."""
    kind = KIND[kind_name]
    prob = kind.build()
    support, query = prob.task(task)
    params = list(prob.model.parameters())
    kernel = sdpa_kernel(SDPBackend.MATH) if kind.attention else contextlib.nullcontext()
    with kernel:
        return [brute_force(prob.model, prob.inner_loss, prob.outer_loss, lambda j: support, query,
                            STEPS, None, params, k, rule=RULES[rule][1]) for k in range(STEPS + 1)]


def expected(kind: Kind, path: Path, case, trainable):
    """The oracle's estimate for a case (``None``: mode="exact"; else the forced ``K``s)."""
    def one(task, K):  # mode="exact" is G_r itself; a forced K the telescope under the law
        G = oracle(kind.name, path.rule, task)
        return G[STEPS] if K is None else telescope(G, SURVIVAL, K)

    if path.batched:
        forced = [None] * TASKS if case is None else case
        want = tuple(sum(ts) for ts in zip(*[one(i, k) for i, k in enumerate(forced)]))
    else:
        want = one(0, case)
    if path.entry.startswith("backward"):  # the outer optimizer holds the trainable parameters
        want = tuple(w for w, t in zip(want, trainable) if t)
    return want


def rel_err(got, want) -> float:
    """Worst relative error over the tensors. A reference tensor below 1e-6 of the whole
    reference's norm (a conv bias just before a normalisation has an exact gradient of 0)
    is measured against that 1e-6 fraction: its rounding noise reads as about 1e-11."""
    got, want = tuple(got), tuple(want)
    if len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want)):
        return math.inf
    total = math.sqrt(sum(float(b.norm()) ** 2 for b in want)) or 1.0
    worst = 0.0
    for a, b in zip(got, want):
        err = float((a - b).norm())
        if not math.isfinite(err):
            return math.inf
        worst = max(worst, err / max(float(b.norm()), 1e-6 * total))
    return worst


# -- running the library ---------------------------------------------------------------------

def call(prob, path: Path, case, memory=None, seed=1):
    """Run the library for one case; returns the hypergradient tuple."""
    memory = memory or path.memory
    law = dict(mode="exact") if case is None else dict(truncation=Geometric(Q, RHO))
    force = {} if case is None else dict(force_truncation=case)
    common = dict(steps=STEPS, memory=memory, slots=SLOTS, hvp=path.hvp,
                  generator=torch.Generator().manual_seed(seed), inner=RULES[path.rule][0](), **law)
    support, query = (prob.supports, prob.queries) if path.batched else prob.task(0)
    model, fi, fo = prob.model, prob.inner_loss, prob.outer_loss
    if path.entry == "hypergrad":
        return torch_ufom.hypergrad(model, fi, fo, support, query, **common, **force)
    if path.batched:  # the vectorised path is under test: a per-task loop is a fallback that warns
        common["vectorise"] = True
    if path.entry == "hypergrad_batch":
        return torch_ufom.hypergrad_batch(model, fi, fo, support, query, **common, **force)
    trainable = [p for p in model.parameters() if p.requires_grad]
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(trainable, lr=0.0), **common)
    meta.zero_grad()
    try:
        getattr(meta, path.entry)(fi, fo, support, query, **force)
    except Exception as err:
        if any(p.grad is not None for p in trainable):  # a failed call changes nothing
            raise AssertionError(f"the failed call wrote .grad: {err}") from err
        raise
    return tuple(torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in trainable)


def cases(path: Path):
    """``(label, case)``: the forced truncations, then mode="exact" (``None``)."""
    forced = [(f"K={FORCED}", FORCED)] if path.batched else [(f"K={k}", k) for k in FORCED]
    return forced + [("exact", None)]


# The refusals a fwdrev cell may give, each pinned to the library's own sentence or torch's own error
# (review s32F F1: "buffer" or "forward" matched any FwdRevError, whose message always says "forward",
# so any crash of the transformer's sweep passed as a refusal, and a regression refusing bn_eval too).
WRITES_BUFFERS = r"Invalid hvp: 'fwdrev' needs a module whose losses write no buffers"
NO_FORWARD_FORMULA = (r"hvp='fwdrev' failed inside torch\.func\.jvp\(torch\.func\.grad\(inner_loss\)\) "
                      r"at inner step \d+: (ZeroTensors are immutable|Trying to use forward AD with \S+ that "
                      r"does not support it|derivative for \S+ is not implemented)")
DROPOUT_PER_TASK = r"Invalid hvp: 'fwdrev' cannot run attention with dropout per task"


def refusal_pattern(kind, path: Path):
    """The reasons a cell may refuse for, as a regex over the error message (or None)."""
    if path.hvp != "fwdrev":
        return None
    reasons = ([WRITES_BUFFERS] if kind.writes_buffers else []) + \
        ([NO_FORWARD_FORMULA] if kind.no_forward_ad else [])
    if kind.attention and kind.random and path.entry in ("hypergrad", "backward"):
        reasons.append(DROPOUT_PER_TASK)
    return "|".join(f"(?:{r})" for r in reasons) or None


def fallback_pattern(kind):
    """The reasons a batched cell may fall back for (or None: it must run vectorised)."""
    if kind.running_stats:
        return r"running stat|buffer"
    if kind.rnn:
        return r"vmap|batching rule|not supported|rnn|lstm|gru"
    if kind.wrong_under_vmap:
        return r"vmap differentiates Embedding with padding_idx wrongly"
    return None


class Outcome:
    """What a cell saw: failures, refusals, fallbacks and the worst error."""

    def __init__(self, kind, path):
        self.kind, self.path = kind, path
        self.failures, self.refused, self.fallbacks = [], [], []
        self.worst = None  # over the runs compared with the oracle (None: none was)

    def run(self, label, prob, case, memory=None, seed=1, path=None):
        """One library call (on this cell's path unless ``path`` is given); returns its
        result, or None if it raised (recorded)."""
        with warnings.catch_warnings(record=True) as log:
            warnings.simplefilter("always")
            try:
                got = call(prob, path or self.path, case, memory, seed)
            except Exception as err:  # noqa: BLE001 - every error is judged below
                self._judge_error(label, case, err)
                return None
        fell = [str(w.message) for w in log if "per-task loop" in str(w.message)]
        if fell and self.path.batched:
            allowed = fallback_pattern(self.kind)
            if allowed is None:
                self.failures.append(f"{label}: fell back to the per-task loop: {fell[0]}")
            elif not re.search(r"per-task loop: .*(" + allowed + ")", fell[0], re.I):
                self.failures.append(f"{label}: fallback warning does not say why: {fell[0]}")
            else:
                self.fallbacks.append(fell[0])
        if self._must_refuse(case):
            self.failures.append(f"{label}: computed where torch has no forward-mode formula "
                                 f"({self.kind.no_forward_ad}); expected a clear refusal")
        return got

    def _must_refuse(self, case) -> bool:
        exact_sweep = case is None or (max(case) if isinstance(case, list) else case) > 0
        return self.path.hvp == "fwdrev" and exact_sweep and self.kind.must_refuse_fwdrev()

    def _judge_error(self, label, case, err):
        msg = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        allowed = refusal_pattern(self.kind, self.path)
        if (allowed and isinstance(err, (ValueError, RuntimeError))
                and re.search(allowed, str(err), re.I)):
            self.refused.append(msg)
        else:
            self.failures.append(f"{label}: {msg[:300]}")

    def compare(self, label, got, want, against="the oracle"):
        err = rel_err(got, want)
        self.worst = err if self.worst is None else max(self.worst, err)
        if not err <= TOL:
            self.failures.append(f"{label}: relative error {err:.2e} against {against}")

    def finish(self, bitwise=False):
        """Record the cell and fail with every problem it saw."""
        if self.failures:
            cell = dict(outcome="FAILED", why="; ".join(self.failures))
        elif self.refused:
            cell = dict(outcome="refused", why=self.refused[0])
        elif self.fallbacks:
            cell = dict(outcome="fallback", why=self.fallbacks[0].split("per-task loop: ", 1)[-1])
        else:
            cell = dict(outcome="bitwise" if bitwise else "exact", why="")
        cell["worst"] = self.worst
        record(self.kind.name, self.path.name, **cell)
        assert not self.failures, "\n".join(self.failures)


# -- the matrix ------------------------------------------------------------------------------

def _cells():
    """Every (kind, path) pair; the vectorised dropout-transformer cells (about 2.5 s each, three
    memory schedules under ``vmap``) run in the full suite, outside the quick loop."""
    for kind in KINDS:
        for path in PATHS:
            slow = kind.random and kind.attention and path.batched
            yield pytest.param(kind, path, id=f"{kind.name}-{path.name.replace(' ', '-')}",
                               marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize(("kind", "path"), list(_cells()))
def test_cell(kind, path):
    prob = kind.build()
    trainable = [p.requires_grad for p in prob.model.parameters()]
    out = Outcome(kind, path)
    if kind.random:
        return bitwise_cell(out, prob, path)
    for label, case in cases(path):
        got = out.run(label, prob, case)
        if got is not None:
            out.compare(label, got, expected(kind, path, case, trainable))
    out.finish()


MEMORIES = ("store", "recompute", "checkpoint")


def bitwise_cell(out: Outcome, prob, path: Path):
    """Dropout: the three memory schedules give identical bits, and the dropout is live."""
    for n, (label, case) in enumerate(cases(path)):
        runs = {m: out.run(f"{label} {m}", prob, case, memory=m) for m in MEMORIES}
        if runs["store"] is None:
            continue
        if not all(torch.isfinite(t).all() for t in runs["store"]):
            out.failures.append(f"{label}: non-finite hypergradient")
        for m in MEMORIES[1:]:
            got = runs[m]
            if got is not None and not all(torch.equal(a, b) for a, b in zip(got, runs["store"])):
                out.failures.append(f"{label}: memory={m!r} differs from 'store' "
                                    f"(relative {rel_err(got, runs['store']):.2e})")
        if path.hvp == "fwdrev":
            # Forward-over-reverse must differentiate the step that ran, with its masks: the
            # same function as reverse-over-reverse's recorded graph, up to rounding.
            ran = out.run(f"{label} revrev", prob, case, path=dataclasses.replace(path, hvp="revrev"),
                          memory="store")
            if ran is not None:
                out.compare(label, runs["store"], ran, "revrev (the recorded step)")
        if n == 0:  # another seed draws other masks
            other = out.run(f"{label} seed 2", prob, case, memory="store", seed=2)
            if other is not None and all(torch.equal(a, b) for a, b in zip(other, runs["store"])):
                out.failures.append(f"{label}: the dropout is not live (seeds 1 and 2 agree)")
    out.finish(bitwise=True)


@pytest.mark.parametrize("kind", [k for k in KINDS if not k.random], ids=lambda k: k.name)
def test_zoo_kinds_are_not_trivial(kind):
    # The exact corrections matter (G_r far from G_0, G_2 from G_1) and the oracle is finite:
    # otherwise a cell could pass without differentiating through the inner steps.
    G = oracle(kind.name, "sgd", 0)
    assert all(torch.isfinite(t).all() for g in G for t in g)
    assert rel_err(G[0], G[STEPS]) > 1e-4
    assert rel_err(G[1], G[2]) > 1e-6
    for rule in ("momentum", "adam"):
        Gr = oracle(kind.name, rule, 0)
        assert all(torch.isfinite(t).all() for g in Gr for t in g), rule
        assert rel_err(Gr[0], Gr[STEPS]) > 1e-6, rule


def test_zoo_tasks_differ():
    # The batched cells sum distinct tasks: a task-indexing bug cannot hide behind equal tasks.
    for kind in KINDS:
        if not kind.random:
            G = [oracle(kind.name, "sgd", i)[STEPS] for i in range(TASKS)]
            assert rel_err(G[0], G[1]) > 1e-4 and rel_err(G[1], G[2]) > 1e-4, kind.name


def test_table_renders_every_cell_and_its_notes():
    # tools/conformance_table.py turns this module's results into docs/conformance.md.
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "conformance_table", Path(__file__).resolve().parents[1] / "tools" / "conformance_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    data = {"torch": "x", "tolerance": TOL, "steps": STEPS, "tasks": TASKS, "seconds": 1.0,
            "kinds": [{"name": "a", "about": "kind a"}, {"name": "b", "about": "kind b"}],
            "paths": ["p", "q"],
            "cells": {"a": {"p": dict(outcome="exact", why="", worst=2e-16),
                            "q": dict(outcome="refused", why="no | reason", worst=None)},
                      "b": {"p": dict(outcome="FAILED", why="boom", worst=3.0)}}}
    text = table.render(data, "abc")
    assert "| `a` | exact 2e-16 | refused [1] |" in text
    assert "| `b` | **FAILED** 3e+00 [2] | not run |" in text
    assert "1. no \\| reason" in text and "2. boom" in text
