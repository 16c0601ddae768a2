"""MAML training loops shared by :mod:`benchmarks.sinusoid` and :mod:`benchmarks.digits`.

Every method (:class:`Trainer`: ``MetaOptimizer``, ``higher``, ``torchopt``) trains its own copy of one
model on the same meta-batches, round-robin (:func:`train_round_robin`); :func:`adapt_and_score` and
:func:`meta_gradient` evaluate with plain ``torch.func``, independent of every library compared.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from torch_ufom import MetaOptimizer
from benchmarks.harness import choose, clock, positive_float, positive_int, probability, progress


@dataclass(frozen=True)
class Method:
    """One MAML implementation: ``kind`` is ``"torch_ufom"``, ``"higher"`` or ``"torchopt"``."""

    label: str
    kind: str
    mode: Optional[str] = None
    q: Any = None
    q_rule: Optional[str] = None  # with q="auto": "ufom" (default) or "authors"


METHODS: Tuple[Method, ...] = (
    Method("fom", "torch_ufom", "fom"),
    Method("ufom q=0.1", "torch_ufom", "ufom", 0.1),
    Method("ufom q=auto", "torch_ufom", "ufom", "auto"),
    Method("exact", "torch_ufom", "exact"),
    Method("higher", "higher"),
    Method("torchopt", "torchopt"),
)
# The q study: more fixed q and the authors' adaptive rule (not in the default lists).
Q_STUDY: Tuple[Method, ...] = (
    Method("ufom q=0.05", "torch_ufom", "ufom", 0.05),
    Method("ufom q=0.2", "torch_ufom", "ufom", 0.2),
    Method("ufom q=1", "torch_ufom", "ufom", 1.0),
    Method("ufom q=auto (authors)", "torch_ufom", "ufom", "auto", "authors"),
)
Q_MIN = {"ufom": 0.01, "authors": 0.05}  # the floor of q="auto" per rule, passed explicitly
BY_LABEL = {m.label: m for m in METHODS + Q_STUDY}
ALIASES = {"ufom": "ufom q=0.1", "ufom-auto": "ufom q=auto", "auto": "ufom q=auto",
           "ufom-0.05": "ufom q=0.05", "ufom-0.2": "ufom q=0.2", "ufom-1": "ufom q=1",
           "auto-authors": "ufom q=auto (authors)"}


def meta_kwargs(mode: str, q: Any = None, q_rule: Optional[str] = None) -> Dict[str, Any]:
    """The keywords of :class:`torch_ufom.MetaOptimizer` for ``mode`` (with ``q`` for ufom, and
    ``q_rule`` with its floor :data:`Q_MIN` for ``q="auto"``)."""
    if mode != "ufom":
        return {"mode": mode}
    return {"mode": mode, "q": q, **({"q_rule": q_rule, "q_min": Q_MIN[q_rule]} if q == "auto" else {})}


def add_args(p: argparse.ArgumentParser, sizes: Dict[str, Tuple], inner_lr: float, query: int) -> None:
    """A MAML benchmark's options; ``sizes[size]`` starts ``(iters, meta-batch, test tasks, eval every)``."""
    full, quick = sizes["full"], sizes["quick"]
    p.add_argument("--iters", type=positive_int, help=f"outer steps (default {full[0]}; --quick {quick[0]})")
    p.add_argument("--meta-batch", type=positive_int, help=f"tasks per outer step (default {full[1]})")
    p.add_argument("--steps", type=positive_int, default=5, help="inner SGD steps (default 5)")
    p.add_argument("--inner-lr", type=positive_float, default=inner_lr, help=f"default {inner_lr}")
    p.add_argument("--outer-lr", type=positive_float, default=1e-3, help="Adam, default 1e-3")
    p.add_argument("--query", type=positive_int, default=query,
                   help=f"query examples per training task or class (default {query})")
    p.add_argument("--test-tasks", type=positive_int,
                   help=f"held-out tasks (default {full[2]}; --quick {quick[2]})")
    p.add_argument("--eval-every", type=positive_int, help="evaluate every N outer steps")
    p.add_argument("--q", type=probability, default=0.1,
                   help="exact-branch probability of the fixed-q ufom row (default 0.1)")
    p.add_argument("--memory", choices=("checkpoint", "recompute", "store"), default="checkpoint",
                   help="torch_ufom's memory schedule (default checkpoint)")


def sized(args: argparse.Namespace, sizes: Dict[str, Tuple], evals: int) -> None:
    """Fill the options :func:`add_args` left unset from ``sizes[args.size]``; a non-default
    ``--iters`` is evaluated ``evals`` times unless ``--eval-every`` says otherwise."""
    iters, batch, tests, every = sizes[args.size][:4]
    default = every if args.iters in (None, iters) else max(1, args.iters // evals)
    args.eval_every = args.eval_every or default
    args.iters, args.meta_batch = args.iters or iters, args.meta_batch or batch
    args.test_tasks = args.test_tasks or tests


def available(kind: str) -> bool:
    """Whether the package behind ``kind`` can be imported (``torch_ufom`` always can)."""
    return kind == "torch_ufom" or importlib.util.find_spec(kind) is not None


def parse_methods(text: str, p: argparse.ArgumentParser, q: float = 0.1) -> List[Method]:
    """Methods from a comma-separated list of labels or aliases; a usage error of ``p`` on a bad one.

    The fixed-``q`` row (``"ufom q=0.1"`` or ``"ufom"``) uses ``q`` and is labelled ``"ufom q=<q>"``.
    """
    label = f"ufom q={q:g}"
    known = {**BY_LABEL, **{k: BY_LABEL[v] for k, v in ALIASES.items()}, label: BY_LABEL["ufom q=0.1"]}
    fixed = Method(label, "torch_ufom", "ufom", q)
    chosen = choose(p, "--methods", text, known)
    return list(dict.fromkeys(fixed if m.label == "ufom q=0.1" else m for m in chosen))


def split_available(methods: Sequence[Method]) -> Tuple[List[Method], List[str]]:
    """``(methods whose package is installed, a note per skipped method)``."""
    notes = [f"{m.label}: skipped ({m.kind} is not installed)" for m in methods if not available(m.kind)]
    return [m for m in methods if available(m.kind)], notes


# -- trainers: one outer step on a list of (support, query) tasks --------------------------

Loss = Callable[[Any, Any], Tensor]  # (model or functional model, batch) -> scalar


class Trainer:
    """One method's own copy of the model, its Adam outer optimizer and its counters.

    :meth:`step`: the meta-gradient of the mean query loss of ``tasks`` (``(support, query)`` pairs)
    after ``steps`` inner SGD steps at ``inner_lr``, then one Adam step; ``seed`` seeds the ufom draws.
    """

    def __init__(self, method: Method, model: nn.Module, loss: Loss, inner_lr: float, steps: int,
                 outer_lr: float, seed: int, memory: str):
        self.method, self.model, self.loss, self.steps = method, model, loss, steps
        self.outer = torch.optim.Adam(model.parameters(), lr=outer_lr)
        self.exact_branches = self.tasks_seen = 0  # tasks whose meta-gradient had second-order terms
        self.q_last: Optional[float] = None
        self.q_trace: List[float] = []  # the q of each outer step (ufom)
        self.q_min: Optional[float] = None  # the adaptive rule's floor (q="auto")
        if method.kind == "torch_ufom":
            kw = meta_kwargs(method.mode, method.q, method.q_rule or "ufom")
            self.q_min = kw.get("q_min")
            self.meta = MetaOptimizer(model, self.outer, inner_lr=inner_lr, steps=steps, memory=memory,
                                      generator=torch.Generator().manual_seed(seed), **kw)
        elif method.kind == "higher":
            import higher
            self.higher, self.inner = higher, torch.optim.SGD(model.parameters(), lr=inner_lr)
        elif method.kind == "torchopt":
            import torchopt
            self.torchopt, self.inner = torchopt, torchopt.MetaSGD(model, lr=inner_lr)
        else:
            raise ValueError(f"Invalid method kind: {method.kind!r}")

    def step(self, tasks: Sequence[Tuple[Any, Any]]) -> None:
        """One outer step on ``tasks``."""
        n, loss = len(tasks), self.loss
        opt = self.meta if self.method.kind == "torch_ufom" else self.outer  # meta.step() also updates q
        opt.zero_grad()
        if self.method.kind == "torch_ufom":
            for support, query in tasks:  # the outer loss is the mean over the meta-batch, like the peers'
                res = self.meta.backward(loss, lambda f, batch: loss(f, batch) / n, support, query)
                self.exact_branches += int(res.truncation == self.steps)
                self.q_last = res.q
            if self.method.mode == "ufom":
                self.q_trace.append(float(self.q_last))
        elif self.method.kind == "higher":
            for support, query in tasks:
                with self.higher.innerloop_ctx(self.model, self.inner,
                                               copy_initial_weights=False) as (fmodel, diffopt):
                    for _ in range(self.steps):
                        diffopt.step(loss(fmodel, support))
                    (loss(fmodel, query) / n).backward()
            self.exact_branches += n
        else:
            to, losses = self.torchopt, []
            net_state, opt_state = to.extract_state_dict(self.model), to.extract_state_dict(self.inner)
            for support, query in tasks:
                for _ in range(self.steps):
                    self.inner.step(loss(self.model, support))
                losses.append(loss(self.model, query))
                to.recover_state_dict(self.model, net_state)
                to.recover_state_dict(self.inner, opt_state)
            torch.stack(losses).mean().backward()
            self.exact_branches += n
        self.tasks_seen += n
        opt.step()


def make_trainer(method: Method, model: nn.Module, loss: Loss, *, inner_lr: float, steps: int,
                 outer_lr: float, seed: int, memory: str = "checkpoint") -> Trainer:
    """A :class:`Trainer` for ``method`` that owns ``model`` (pass a fresh copy per method)."""
    return Trainer(method, model, loss, inner_lr, steps, outer_lr, seed, memory)


# -- round-robin training with periodic evaluation -----------------------------------------

@dataclass
class History:
    """One method's evaluations: after ``steps[i]`` outer steps, ``wall[i]`` / ``cpu[i]``
    training seconds so far, ``score[i]`` (the evaluation's mean) and ``extra[i]``; its ``trainer``."""

    label: str
    trainer: Trainer
    steps: List[int] = field(default_factory=list)
    wall: List[float] = field(default_factory=list)
    cpu: List[float] = field(default_factory=list)
    score: List[float] = field(default_factory=list)
    extra: List[Any] = field(default_factory=list)

    @property
    def q_end(self) -> Optional[float]:
        """The q of the last outer step, or with ``q="auto"`` the q the next one would use."""
        t = self.trainer
        return t.q_last if t.q_min is None else float(t.meta.q_stats["q"])


def train_round_robin(trainers: Sequence[Trainer], batch: Callable[[int], Sequence], iters: int,
                      evaluate: Callable[[nn.Module], Tuple[float, Any]], eval_every: int,
                      device: str = "cpu", show_progress: bool = True,
                      lr_factor: Optional[Callable[[int], float]] = None) -> List[History]:
    """Train every trainer for ``iters`` outer steps, round-robin; evaluate every ``eval_every``.

    ``batch(k)``: outer step ``k``'s meta-batch, shared by all; ``evaluate(model)``: ``(score, extra)``,
    outside the clocks; ``lr_factor(k)``, if given, scales every initial outer learning rate at step ``k``.
    """
    hist = [History(t.method.label, t) for t in trainers]
    wall, cpu = [0.0] * len(trainers), [0.0] * len(trainers)
    points = set(range(0, iters + 1, max(1, eval_every))) | {iters}
    base_lr = [[g["lr"] for g in t.outer.param_groups] for t in trainers]

    def record(k):
        for i, t in enumerate(trainers):
            score, extra = evaluate(t.model)
            for xs, x in zip((hist[i].steps, hist[i].wall, hist[i].cpu, hist[i].score, hist[i].extra),
                             (k, wall[i], cpu[i], score, extra)):
                xs.append(x)

    record(0)
    for k in progress(range(iters), "outer steps", show_progress):
        tasks = batch(k)
        for t, lrs in zip(trainers, base_lr):
            for g, lr in zip(t.outer.param_groups, lrs):
                g["lr"] = lr * (1.0 if lr_factor is None else lr_factor(k))
        for i, t in enumerate(trainers):
            took = clock(lambda: t.step(tasks), device)
            wall[i] += took.wall
            cpu[i] += took.cpu
        if k + 1 in points:
            record(k + 1)
    return hist


def train(args: argparse.Namespace, methods: Sequence[Method], base: nn.Module, loss: Loss,
          batch: Callable[[int], Sequence], evaluate: Callable[[nn.Module], Tuple[float, Any]],
          lr_factor: Optional[Callable[[int], float]] = None) -> Tuple[List[Trainer], List[History]]:
    """A trainer per method on its own copy of ``base``, trained by :func:`train_round_robin` with
    the options of :func:`add_args`; returns the trainers and their histories."""
    trainers = [make_trainer(m, copy.deepcopy(base), loss, inner_lr=args.inner_lr, steps=args.steps,
                             outer_lr=args.outer_lr, seed=args.seed, memory=args.memory) for m in methods]
    return trainers, train_round_robin(trainers, batch, args.iters, evaluate, args.eval_every, args.device,
                                       not args.no_progress, lr_factor)


def timing(h: History) -> Dict[str, float]:
    """Training wall and CPU seconds, milliseconds per outer step and the share of exact branches."""
    return {"wall_s": h.wall[-1], "cpu_s": h.cpu[-1], "ms_per_step": 1e3 * h.wall[-1] / max(1, h.steps[-1]),
            "exact_share": h.trainer.exact_branches / max(1, h.trainer.tasks_seen)}


def cosine_decay(iters: int) -> Callable[[int], float]:
    """``k -> (1 + cos(pi k / iters)) / 2``: the learning-rate factor of a cosine decay to 0."""
    return lambda k: 0.5 * (1.0 + math.cos(math.pi * k / max(1, iters)))


# -- evaluation on held-out tasks (plain torch.func, no library under test) ----------------

def _query_metric(model: nn.Module, pred_loss, metric, steps: int, lr: float):
    """``(params, xs, ys, xq, yq) -> metric(model(xq), yq)`` after ``steps`` SGD steps on the support loss."""
    from torch.func import functional_call, grad
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def support_loss(p, x, y):
        return pred_loss(functional_call(model, (p, buffers), (x,)), y)

    def run(p, x, y, x_q, y_q):
        for _ in range(steps):
            g = grad(support_loss)(p, x, y)
            p = {n: p[n] - lr * g[n] for n in p}
        return metric(functional_call(model, (p, buffers), (x_q,)), y_q)
    return run


def adapt_and_score(model: nn.Module, pred_loss: Callable[[Tensor, Tensor], Tensor],
                    metric: Callable[[Tensor, Tensor], Tensor], xs: Tensor, ys: Tensor,
                    xq: Tensor, yq: Tensor, steps: int, lr: float, chunk: Optional[int] = 64) -> Tensor:
    """Adapt ``model`` to each task (stacked along dimension 0) by ``steps`` plain SGD steps on
    ``pred_loss(model(xs), ys)``; return ``metric(model(xq), yq)`` per task (vmap, ``chunk`` at a time)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    run = _query_metric(model, pred_loss, metric, steps, lr)
    return torch.func.vmap(lambda *batch: run(params, *batch), chunk_size=chunk)(xs, ys, xq, yq)


def meta_gradient(model: nn.Module, pred_loss: Callable[[Tensor, Tensor], Tensor], xs: Tensor,
                  ys: Tensor, xq: Tensor, yq: Tensor, steps: int, lr: float,
                  chunk: int = 64, return_se: bool = False):
    """The exact MAML meta-gradient of the mean query loss over fixed tasks, by plain ``torch.func``
    (``grad`` through the unrolled inner SGD loop, ``vmap`` over ``chunk`` tasks at a time).

    Returns ``{name: gradient}``; with ``return_se``, ``(gradient, se)``, ``se = sqrt(tr Cov / n)`` the
    standard error of the mean over the tasks (the norm ``n`` tasks show where the expectation is 0).
    """
    params = {n: p.detach() for n, p in model.named_parameters()}
    per_task = torch.func.vmap(torch.func.grad(_query_metric(model, pred_loss, pred_loss, steps, lr)),
                               in_dims=(None, 0, 0, 0, 0))
    n = xs.shape[0]
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    sq = torch.zeros((), dtype=torch.float64)
    for i in range(0, n, chunk):
        g = per_task(params, xs[i:i + chunk], ys[i:i + chunk], xq[i:i + chunk], yq[i:i + chunk])
        total = {k: total[k] + g[k].sum(0) for k in total}
        sq = sq + sum((g[k].double() ** 2).sum() for k in g)
    mean = {k: v / n for k, v in total.items()}
    if return_se:  # sqrt(tr Cov / n), with the unbiased variance
        var = (sq - n * sum((m.double() ** 2).sum() for m in mean.values())) / max(1, n - 1)
        return mean, float(var.clamp_min(0) / n) ** 0.5
    return mean


def grad_norm(grads: Dict[str, Tensor]) -> float:
    """The Euclidean norm of a gradient given as ``{name: tensor}``."""
    return float(sum((g.double() ** 2).sum() for g in grads.values()) ** 0.5)


def relative_gap(value: float, reference: float) -> float:
    """``(value - reference) / |reference|`` (``inf`` where the reference is 0 and they differ)."""
    if reference == 0:
        return 0.0 if value == 0 else float("inf")
    return (value - reference) / abs(reference)

