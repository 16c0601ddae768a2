"""The paper's one-dimensional counter-example: FOM stalls, UFOM and exact do not.

``python -m benchmarks.toy [--quick | --tiny]``; the problem is defined in
``docs/maths.md#the-papers-counter-example`` and the report defines its columns and targets. A usage
example of :class:`torch_ufom.MetaOptimizer` (one random task per outer step, SGD with step size
``10 / (k + 1)``); the outer loss and true gradient at every iterate come from a float64 unroll
(:func:`true_objective`) checked against ``hypergrad(mode="exact")``. The adaptive ``"ufom"`` rule
measures costs by wall clock, so its trajectory varies between runs.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

import torch_ufom
from benchmarks.harness import (Target, choose, first_below, fmt, markdown_table, parse, parser, plot_panels,
                                positive_int, progress, torch_threads, write_report)
from benchmarks.maml import meta_kwargs

# -- the problem (docs/maths.md#the-papers-counter-example) --------------------------------
ALPHA = 0.1                 # inner SGD step size
STEPS = 10                  # inner steps r
CURVATURES = (0.5, 1.5)     # a_1, a_2
D_BIAS = 0.06               # D: FOM's fixed point has |true gradient| = sqrt(2 D)
TARGET = 0.1                # "reached": |true gradient| below this
LOSS_TOL = 0.1              # outer-loss target: f* + LOSS_TOL (f(x_F) - f*), see loss_target()
X0_RANGE = (-10.0, 30.0)    # x_0 ~ U(-10, 30)


def contraction(a: float, alpha: float = ALPHA, steps: int = STEPS) -> float:
    """``p = (1 - alpha a)^r``: the factor by which the inner loop shrinks ``x - b/a``."""
    return (1.0 - alpha * a) ** steps


def problem_constants(a: Sequence[float] = CURVATURES, D: float = D_BIAS,
                      alpha: float = ALPHA, steps: int = STEPS) -> Tuple[Tuple[float, float], float]:
    """``((b_1, b_2), A)`` from the formulas of ``docs/maths.md#the-papers-counter-example``.

    ``b_1 = 0``, ``b_2 = 2 sqrt(2D) / |(a_1 p_1^2 + a_2 p_2^2) p_2 / (a_1 p_1 + a_2 p_2) - p_2^2|``
    and ``A = |b_2 / a_2| + 1`` (the quadratic piece of each task covers both minima).
    """
    a1, a2 = a
    p1, p2 = contraction(a1, alpha, steps), contraction(a2, alpha, steps)
    b2 = 2.0 * math.sqrt(2.0 * D) / abs((a1 * p1 ** 2 + a2 * p2 ** 2) * p2 / (a1 * p1 + a2 * p2)
                                        - p2 ** 2)
    return (0.0, b2), abs(b2 / a2) + 1.0


B, A_QUAD = problem_constants()
TASKS: Tuple[Tuple[float, float], ...] = tuple(zip(CURVATURES, B))  # (a_i, b_i)


def piecewise_loss(x: Tensor, a: float, b: float, A: float = A_QUAD) -> Tensor:
    """One task's loss at ``x`` (elementwise), ``z = |x - b/a|``::

        a z^2/2                                          if z <= A
        -a (z-A)^3/6 + a (z-A)^2/2 + a A z - a A^2/2     if A < z <= A+1
        (a/2 + a A) z - a/6 - a A^2/2 - a A/2            otherwise

    Twice continuously differentiable. The quadratic piece is written with
    ``u = x - b/a`` rather than ``|u|`` so that autograd's second derivative
    is also right at ``u = 0`` (``abs`` has a zero second derivative there).
    A 0-dim ``x`` evaluates only its own piece (fewer tensor operations per
    inner step); any other shape selects the pieces with ``torch.where``.
    """
    u = x - b / a
    if u.dim() == 0:  # one point (the training loop): evaluate only its own piece
        z0 = abs(float(u.detach()))
        if z0 <= A:
            return a * u * u / 2
        z = u.abs()
        if z0 <= A + 1:
            return -a * (z - A) ** 3 / 6 + a * (z - A) ** 2 / 2 + a * A * z - a * A ** 2 / 2
        return (a / 2 + a * A) * z - a / 6 - a * A ** 2 / 2 - a * A / 2
    z = u.abs()
    quad = a * u * u / 2
    cubic = -a * (z - A) ** 3 / 6 + a * (z - A) ** 2 / 2 + a * A * z - a * A ** 2 / 2
    linear = (a / 2 + a * A) * z - a / 6 - a * A ** 2 / 2 - a * A / 2
    return torch.where(z <= A, quad, torch.where(z <= A + 1, cubic, linear))


class Scalar(nn.Module):
    """The model: one float64 parameter ``x``; ``forward()`` returns it."""

    def __init__(self, x0: float = 0.0):
        super().__init__()
        self.x = nn.Parameter(torch.tensor(float(x0), dtype=torch.float64))

    def forward(self) -> Tensor:
        """The parameter ``x``."""
        return self.x


def task_loss(fmodel, task: Tuple[float, float]) -> Tensor:
    """The inner and outer loss of ``MetaOptimizer``: ``(fmodel, (a, b)) -> scalar``."""
    a, b = task
    return piecewise_loss(fmodel(), a, b)


def true_objective(xs, tasks: Sequence[Tuple[float, float]] = TASKS,
                   alpha: float = ALPHA, steps: int = STEPS) -> Tuple[Tensor, Tensor]:
    """The average ABLO objective and its exact gradient at every entry of ``xs``.

    Returns ``(f, g)`` with ``f(x) = (1/|tasks|) sum_i L_i(x_r^i(x))`` (the outer
    loss) and ``g = df/dx``, by a plain float64 unroll of the inner SGD loop with
    ``create_graph=True``, vectorised over the entries of ``xs`` (the problem is
    elementwise, so ``grad(sum)`` is the per-entry gradient). Independent of
    ``torch_ufom``.
    """
    x0 = torch.as_tensor(xs, dtype=torch.float64).detach().clone().requires_grad_(True)
    value = torch.zeros_like(x0)
    total = torch.zeros_like(x0)
    for a, b in tasks:
        x = x0
        for _ in range(steps):
            (g,) = torch.autograd.grad(piecewise_loss(x, a, b).sum(), x, create_graph=True)
            x = x - alpha * g
        out = piecewise_loss(x, a, b)
        (d,) = torch.autograd.grad(out.sum(), x0)
        value = value + out.detach()
        total = total + d
    return value / len(tasks), total / len(tasks)


def true_gradient(xs, tasks: Sequence[Tuple[float, float]] = TASKS,
                  alpha: float = ALPHA, steps: int = STEPS) -> Tensor:
    """The exact gradient of the average ABLO objective at every entry of ``xs``
    (the second output of :func:`true_objective`)."""
    return true_objective(xs, tasks, alpha, steps)[1]


def library_true_gradient(x: float, tasks: Sequence[Tuple[float, float]] = TASKS,
                          memory: str = "checkpoint") -> float:
    """The same quantity at one point through ``torch_ufom.hypergrad(mode="exact")``."""
    model = Scalar(x)
    total = 0.0
    for task in tasks:
        (g,) = torch_ufom.hypergrad(model, task_loss, task_loss, task, task, steps=STEPS,
                                    inner_lr=ALPHA, mode="exact", memory=memory)
        total += float(g)
    return total / len(tasks)


def fom_fixed_point(tasks: Sequence[Tuple[float, float]] = TASKS, alpha: float = ALPHA,
                    power: int = 1) -> float:
    """Where FOM's expected update vanishes (inside the quadratic pieces):
    ``x_F = sum a_i p_i (b_i/a_i) / sum a_i p_i``; with ``power=2``, :func:`ablo_minimiser`."""
    w = [a * contraction(a, alpha) ** power for a, _ in tasks]
    return sum(wi * (b / a) for wi, (a, b) in zip(w, tasks)) / sum(w)


def ablo_minimiser(tasks: Sequence[Tuple[float, float]] = TASKS, alpha: float = ALPHA) -> float:
    """The stationary point of the average ABLO objective:
    ``x* = sum a_i p_i^2 (b_i/a_i) / sum a_i p_i^2``."""
    return fom_fixed_point(tasks, alpha, power=2)


def loss_target(fraction: float = LOSS_TOL) -> Tuple[float, float, float]:
    """``(f*, f(x_F), target)``: the minimum of the average ABLO objective (at
    :func:`ablo_minimiser`), its value at FOM's fixed point, and the outer-loss
    target ``f* + fraction (f(x_F) - f*)``.

    Both points lie on the quadratic pieces, where ``f - f* = g^2 / (2 H)`` with
    ``H = sum a_i p_i^2 / 2``: an excess of a tenth of FOM's is a true gradient of
    ``sqrt(2D) / sqrt(10) = 0.11``, the outer-loss counterpart of ``TARGET``.
    """
    f, _ = true_objective(torch.tensor([ablo_minimiser(), fom_fixed_point()], dtype=torch.float64))
    f_star, f_fom = float(f[0]), float(f[1])
    return f_star, f_fom, f_star + fraction * (f_fom - f_star)


# -- training ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """One configuration of ``MetaOptimizer``: ``label``, ``mode``, ``q`` and the adaptive ``q_rule``."""

    label: str
    mode: str
    q: object = 0.1
    q_rule: str = "ufom"

    def kwargs(self) -> Dict[str, object]:
        """The keywords of ``MetaOptimizer`` for this configuration."""
        return meta_kwargs(self.mode, self.q, self.q_rule)


METHODS = (
    Method("fom", "fom"),
    Method("ufom q=0.1", "ufom", 0.1),
    Method("exact", "exact"),
    Method("ufom q=0.05", "ufom", 0.05),
    Method("ufom q=0.2", "ufom", 0.2),
    Method("ufom q=1", "ufom", 1.0),
    Method("ufom q=auto (ufom rule)", "ufom", "auto", "ufom"),
    Method("ufom q=auto (authors rule)", "ufom", "auto", "authors"),
)

ALIASES = {"fom": "fom", "ufom": "ufom q=0.1", "exact": "exact",
           "ufom-0.05": "ufom q=0.05", "ufom-0.2": "ufom q=0.2", "ufom-1": "ufom q=1",
           "auto": "ufom q=auto (ufom rule)", "auto-authors": "ufom q=auto (authors rule)"}
# --quick (part of the main job) and --tiny (a smoke test) run fewer modes. --quick runs
# the q values of the project's issue (0.05, 0.2, 1) and both adaptive rules; q=0.1 and
# exact (the same estimator as q=1) are left to the full run, to keep the main job's time.
QUICK_MODES = "fom,ufom-0.05,ufom-0.2,ufom-1,auto,auto-authors"
TINY_MODES = "fom,exact"


@dataclass
class Run:
    """The trajectory of one method."""

    method: Method
    xs: List[float] = field(default_factory=list)        # x before outer step k (k = 0..iters)
    clock: List[float] = field(default_factory=list)     # cumulative seconds after step k
    cpu_clock: List[float] = field(default_factory=list)  # cumulative CPU seconds after step k
    qs: List[Optional[float]] = field(default_factory=list)  # q used at step k (ufom)
    exact_branches: int = 0
    q_end: Optional[float] = None
    q_min: Optional[float] = None                        # the adaptive rule's floor (auto)
    grad: Optional[Tensor] = None                        # |true gradient| at xs
    loss: Optional[Tensor] = None                        # outer loss (ABLO objective) at xs


def draws(iters: int, seed: int) -> Tuple[float, List[int]]:
    """The starting point and the task sequence, shared by every method."""
    rng = random.Random(seed)
    x0 = rng.uniform(*X0_RANGE)
    return x0, [rng.randrange(len(TASKS)) for _ in range(iters)]


def train(method: Method, x0: float, task_ids: Sequence[int], seed: int, memory: str = "checkpoint",
          show_progress: bool = True, problem: Tuple = (TASKS, ALPHA, task_loss),
          forced: Optional[Sequence[int]] = None) -> Run:
    """Outer SGD with step size ``10 / (k + 1)`` from ``x0``, one task per step.

    ``problem``: ``(tasks, inner rate, task loss)``; ``forced``: each step's truncation
    (``force_truncation``) instead of draws.
    """
    tasks, alpha, loss = problem
    model = Scalar(x0)
    opt = torch.optim.SGD(model.parameters(), lr=10.0)
    meta = torch_ufom.MetaOptimizer(model, opt, inner_lr=alpha, steps=STEPS, memory=memory,
                                    generator=torch.Generator().manual_seed(seed), **method.kwargs())
    run = Run(method, xs=[float(model.x.detach())], q_min=method.kwargs().get("q_min"))
    elapsed = cpu = 0.0
    for k, i in progress(list(enumerate(task_ids)), method.label, show_progress):
        start, cpu_start = time.perf_counter(), time.process_time()
        meta.zero_grad()
        K = None if forced is None else forced[k]
        res = meta.backward(loss, loss, tasks[i], tasks[i], force_truncation=K)
        for group in meta.param_groups:
            group["lr"] = 10.0 / (k + 1)
        meta.step()
        elapsed += time.perf_counter() - start
        cpu += time.process_time() - cpu_start
        run.clock.append(elapsed)
        run.cpu_clock.append(cpu)
        run.qs.append(res.q)
        run.exact_branches += int(res.truncation == STEPS)
        run.xs.append(float(model.x.detach()))
    if method.mode == "ufom":  # q="auto": the q the next task would use
        run.q_end = float(meta.q_stats["q"] if method.q == "auto" else method.q)
    return run


def evaluate(run: Run, check_every: int = 50, tol: float = 1e-9) -> None:
    """The outer loss and ``|true gradient|`` at every iterate; the gradient is
    cross-checked against the library's exact mode every ``check_every`` iterates."""
    xs = torch.tensor(run.xs, dtype=torch.float64)
    f, g = true_objective(xs)
    for k in range(0, len(run.xs), check_every):
        ref = library_true_gradient(run.xs[k])
        if abs(ref - float(g[k])) > tol * max(1.0, abs(ref)):
            raise AssertionError(f"{run.method.label}: true gradient at iterate {k} (x={run.xs[k]!r}): "
                                 f"unroll {float(g[k])!r} vs torch_ufom exact {ref!r}")
    run.grad = g.abs()
    run.loss = f


def stays_below(values: Tensor, threshold: float) -> Optional[int]:
    """The first iterate ``k`` from which ``values[k:]`` all lie below ``threshold`` (``None``: never)."""
    return first_below(values.tolist(), threshold)


def _at(clock: Sequence[float], k: Optional[int]) -> Optional[float]:
    """Training seconds after ``k`` outer steps (``clock[k - 1]``; 0 at ``k = 0``)."""
    return None if k is None else (clock[k - 1] if k > 0 else 0.0)


def summary(run: Run, last: int, loss_goal: Optional[float] = None) -> Dict[str, object]:
    """Final |true gradient| and outer loss, and the time to stay below their targets
    (``TARGET`` for the gradient, ``loss_goal`` (default :func:`loss_target`) for the loss)."""
    g = run.grad
    iters = len(run.clock)
    f_star, _, goal = loss_target()
    goal = goal if loss_goal is None else loss_goal
    first = stays_below(g, TARGET)
    first_loss = stays_below(run.loss, goal)
    qs = [q for q in run.qs[-last:] if q is not None]
    return {
        "final_mean": float(g[-last:].mean()), "final_end": float(g[-1]), "q_end": run.q_end,
        "q_min": run.q_min, "q_mean_last": sum(qs) / len(qs) if qs else None,
        "exact_frac": run.exact_branches / max(1, iters), "seconds": _at(run.clock, iters),
        "cpu_seconds": _at(run.cpu_clock, iters), "per_step_ms": 1e3 * _at(run.clock, iters) / max(1, iters),
        "target_iter": first, "target_s": _at(run.clock, first),
        "excess_mean": float((run.loss[-last:] - f_star).mean()),
        "excess_end": float(run.loss[-1] - f_star),
        "loss_target_iter": first_loss, "loss_target_s": _at(run.clock, first_loss),
        "loss_target_cpu_s": _at(run.cpu_clock, first_loss),
    }


# -- report --------------------------------------------------------------------------------
TEMPLATE = """# The paper's 1-D counter-example (benchmarks/toy.py)

Command: `{command}`

Two tasks (a, b) = {tasks}, A = {A:.6f}, r = {steps} inner SGD steps with alpha = {alpha}, D = {D}; the same
piecewise loss inside and outside. Outer SGD with step size 10/(k+1) from x0 = {x0:.4f}, one random task
per step, {iters} outer steps, float64, seed {seed} (task sequence and x0 shared by all modes; each
MetaOptimizer has its own generator seeded with the same seed). Memory schedule: `{memory}`.

FOM's fixed point x_F = {x_f:.4f} has |true gradient| = {g_f:.4f} (sqrt(2D) = {sqrt2d:.4f}); the ABLO
minimiser is x* = {x_star:.4f}.

*final |true grad|*: the mean over the last {last} iterates of the exact gradient of the average ABLO
objective (float64 unroll, checked against `torch_ufom.hypergrad(mode="exact")` every {check_every}
iterates to 1e-9); *wall / CPU time*: the training loop only (one torch thread); *iters / time to stay <
{target}*: the first iterate after which the true gradient stays below {target}, and the training time to it.

{table}

**Time to a target outer loss.** f(x) = (1/2) sum_i L_i(x_r^i(x)) at every iterate; minimum f* =
{f_star:.6f}, f(x_F) = {f_fom:.6f}; target f* + {tol:g} (f(x_F) - f*) = {goal:.6f}, an excess of
{excess:.4f} (on the quadratic pieces a true gradient of sqrt(2D / 10) = {g_goal:.3f}). *mean q*: over
the last iterates.

{loss_table}
"""


def table(runs: Sequence[Run], last: int) -> str:
    """The true-gradient table."""
    rows = []
    for run in runs:
        s = summary(run, last)
        rows.append([run.method.label, f"{s['final_mean']:.4f}", f"{s['final_end']:.4f}",
                     fmt(s["q_end"], ".3f"), f"{100 * s['exact_frac']:.1f}%", f"{s['seconds']:.1f} s",
                     f"{s['cpu_seconds']:.1f} s", f"{s['per_step_ms']:.2f}",
                     fmt(s["target_iter"], "d", none="not reached"), fmt(s["target_s"], ".1f", " s")])
    return markdown_table(["mode", f"final |true grad| (mean, last {last})", "|true grad| at end",
                           "q at end", "exact branches", "wall time", "CPU time", "ms / step",
                           f"iters to stay < {TARGET}", f"time to stay < {TARGET}"], rows, "lrrrrrrrrr")


def loss_table(runs: Sequence[Run], last: int) -> str:
    """Time to reach, and stay below, the target outer loss."""
    rows = []
    for run in runs:
        s = summary(run, last)
        rows.append([run.method.label, f"{s['excess_mean']:.2e}", f"{s['excess_end']:.2e}",
                     fmt(s["q_end"], ".3f"), fmt(s["q_mean_last"], ".3f"),
                     fmt(s["loss_target_iter"], "d", none="not reached"),
                     fmt(s["loss_target_s"], ".1f", " s"),
                     fmt(s["loss_target_cpu_s"], ".1f", " s")])
    return markdown_table(["mode", f"excess outer loss (mean, last {last})", "excess at end", "q at end",
                           f"mean q (last {last})", "iters to stay < target", "wall time to target",
                           "CPU time to target"], rows, "lrrrrrrr")


def targets(runs: Sequence[Run], last: int) -> List[Target]:
    """The project's acceptance criteria for the modes that ran."""
    sums = {r.method.label: summary(r, last) for r in runs}
    out = []
    for label, s in sums.items():
        below = Target(f"{label}: stays below the target outer loss at the end (1 yes, 0 no)",
                       float(s["loss_target_iter"] is not None), 1.0, ">=")
        if label == "fom":
            out += [Target("fom: final |true grad|", s["final_mean"], 0.25, ">="),
                    Target(below.name, below.value, 0.0, "<=")]
        elif label in ("ufom q=0.1", "exact", "ufom q=1"):
            out.append(Target(f"{label}: final |true grad|", s["final_mean"], TARGET))
        elif s["q_min"] is not None:
            out += [Target(f"{label}: q at end", s["q_end"], (s["q_min"], 1.0), "in"),
                    Target(f"{label}: final |true grad|", s["final_mean"], TARGET), below]
    return out


def checks(runs: Sequence[Run], last: int) -> List[Tuple[str, bool]]:
    """:func:`targets` as ``(text, holds)`` pairs."""
    return [(t.text, bool(t.holds)) for t in targets(runs, last)]


def plot(runs: Sequence[Run], path: str, iters: int, seed: int) -> str:
    """|true gradient| and the excess outer loss against the outer iteration, and the q of the auto modes."""
    f_star, _, goal = loss_target()
    k = list(range(1, len(runs[0].xs)))
    panels = [{"series": {r.method.label: (k, r.grad[1:].clamp_min(1e-12).tolist()) for r in runs},
               "title": f"1-D counter-example: r={STEPS}, alpha={ALPHA}, D={D_BIAS}, {iters} outer steps, "
                        f"seed {seed}",
               "logx": True, "logy": True, "ylabel": "|true ABLO gradient|", "xlabel": "outer iteration k",
               "hlines": {"sqrt(2D) (FOM's fixed point)": math.sqrt(2 * D_BIAS), f"target {TARGET}": TARGET}},
              {"series": {r.method.label: (k, (r.loss[1:] - f_star).clamp_min(1e-12).tolist()) for r in runs},
               "logx": True, "logy": True, "ylabel": "outer loss - minimum", "xlabel": "outer iteration k",
               "hlines": {"outer-loss target": goal - f_star}}]
    autos = {r.method.label: (k, r.qs) for r in runs if r.method.q == "auto"}
    if autos:
        panels.append({"series": autos, "logy": True, "ylabel": "q used", "xlabel": "outer iteration k"})
    return plot_panels(path, panels, ncols=1, panel_size=(8.0, 3.6))


def parse_args(argv=None):
    """Parse the command line (see ``--help``)."""
    p = parser("toy", __doc__, {"quick": f"2000 outer steps, modes {QUICK_MODES} (the main job)",
                                "tiny": f"60 outer steps, modes {TINY_MODES}"})
    p.add_argument("--iters", type=positive_int, help="outer steps (default 10000; --quick 2000; --tiny 60)")
    p.add_argument("--modes", help="comma-separated subset of "
                   + ", ".join(f"{k} ({v})" for k, v in ALIASES.items()))
    p.add_argument("--memory", default="checkpoint", choices=["checkpoint", "recompute", "store"])
    p.add_argument("--last", type=positive_int, help="final |true grad| averages the last N iterates")
    p.add_argument("--check-every", type=positive_int,
                   help="cross-check the true gradient against torch_ufom every N iterates (default 50; "
                        "--quick 500)")
    args = parse(p, argv)
    args.iters = args.iters or {"tiny": 60, "quick": 2000, "full": 10000}[args.size]
    args.check_every = args.check_every or (500 if args.size == "quick" else 50)
    args.modes = args.modes or {"tiny": TINY_MODES, "quick": QUICK_MODES,
                                "full": ",".join(ALIASES)}[args.size]
    known = {m.label: m for m in METHODS}
    args.methods = choose(p, "--modes", args.modes, {**known, **{k: known[v] for k, v in ALIASES.items()}})
    args.last = min(args.last or max(1, args.iters // 20), args.iters + 1)
    return args


def main(argv=None) -> Dict[str, object]:
    """Train every mode; write ``toy.md``, ``toy.json`` and ``toy.png`` into ``--out``; return the data."""
    args = parse_args(argv)
    with torch_threads(1):  # a scalar problem: threads only add overhead
        x0, task_ids = draws(args.iters, args.seed)
        runs = []
        for method in args.methods:
            runs.append(train(method, x0, task_ids, args.seed, args.memory, not args.no_progress))
            evaluate(runs[-1], args.check_every)
    x_f, (f_star, f_fom, goal) = fom_fixed_point(), loss_target()
    fields = dict(vars(args), tasks=[(a, round(b, 6)) for a, b in TASKS], A=A_QUAD, steps=STEPS, alpha=ALPHA,
                  D=D_BIAS, x0=x0, x_f=x_f, g_f=float(true_gradient([x_f]).abs()), x_star=ablo_minimiser(),
                  sqrt2d=math.sqrt(2 * D_BIAS), target=TARGET, table=table(runs, args.last),
                  f_star=f_star, f_fom=f_fom, tol=LOSS_TOL, goal=goal, excess=goal - f_star,
                  g_goal=math.sqrt(2 * D_BIAS / 10), loss_table=loss_table(runs, args.last))
    data = {"summary": {r.method.label: summary(r, args.last) for r in runs},
            "trajectories": {r.method.label: {"x": r.xs, "true_grad": r.grad.tolist(),
                                              "outer_loss": r.loss.tolist(), "q": r.qs, "wall_s": r.clock,
                                              "cpu_s": r.cpu_clock} for r in runs}}
    return write_report(args, "toy", TEMPLATE, fields, data, targets(runs, args.last),
                        [plot(runs, f"{args.out}/toy.png", args.iters, args.seed)])


if __name__ == "__main__":
    main()
