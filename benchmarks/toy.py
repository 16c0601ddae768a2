"""The paper's one-dimensional counter-example: FOM stalls, UFOM and exact do not.

From "Debiasing a First-order Heuristic for Approximate Bi-level Optimization"
(Likhosherstov et al., ICML 2021); the problem is defined in ``docs/maths.md#the-papers-counter-example``
("The paper's counter-example"). Two tasks ``(a_i, b_i)`` share one
piecewise loss (quadratic near the task's minimum ``b_i / a_i``, a cubic
blend, then linear), used as both the inner and the outer loss; ``r = 10``
inner SGD steps with ``alpha = 0.1``. ``b_2`` is chosen so that at FOM's fixed
point the true ABLO gradient is exactly ``sqrt(2 D)`` (~0.35 for ``D = 0.06``).

The script is also a usage example of :class:`torch_ufom.MetaOptimizer`: a
one-parameter ``nn.Module``, ``torch.optim.SGD`` as the outer optimizer with
a ``10 / (k + 1)`` step size, one random task per outer step::

    meta = MetaOptimizer(model, opt, inner_lr=0.1, steps=10, mode="ufom", q=0.1,
                         generator=torch.Generator().manual_seed(1))
    for k in range(iters):
        meta.zero_grad()
        meta.backward(task_loss, task_loss, task, task)   # support = query = (a_i, b_i)
        for group in meta.param_groups:
            group["lr"] = 10 / (k + 1)
        meta.step()

"True ABLO gradient": ``d/dx (1/2) sum_i L_i(x_r^i(x))`` where ``x_r^i(x)`` is
task ``i``'s inner loop started at ``x``. After each run it is evaluated at
every outer iterate by a vectorised float64 unroll (:func:`true_gradient`,
``torch.autograd`` through the 10 inner steps of a whole batch of starting
points) and cross-checked against ``torch_ufom.hypergrad(mode="exact")`` at
every ``--check-every``-th iterate. Its evaluation is not part of the timed
training loop.

What to expect (seeds 0..9, final = mean |true gradient| over the last 5% of
the iterates): FOM stays at 0.32-0.37 (sqrt(2D) = 0.346) from a few hundred
steps on; exact SGD stays below 0.1 from step 10-132 on and ends near
0.002 at 10,000 (seed 0; an independent script gave about 0.005). UFOM with
``q = 0.1`` is unbiased but noisy (near the optimum its true gradient spreads
about ``4.6 / sqrt(k)``, exact's ``0.5 / sqrt(k)``): its final value is below
0.1 for 10/10 seeds at 10,000 steps (0.007-0.096), 9/10 at 5,000, 6/10 at
3,000 and 5/10 at 2,500 (seed 0 fails at 2,000: 0.169). ``ufom q=1`` is exact's
estimator: seed 0's trajectories are bit-identical.

The outer-loss target (:func:`loss_target`) is ``f* + (f(x_F) - f*) / 10``, a
tenth of the excess outer loss FOM settles at; on the quadratic pieces it is
the loss-level counterpart of the gradient target (``|g| = sqrt(2D/10) = 0.11``).
Seed 0, 10,000 steps: FOM never reaches it (excess 0.48 for 0.05 needed);
q = 0.05 / 0.1 / 0.2 stay below it from step 4,416 / 2,672 / 1,903, exact and
q = 1 from step 10.

``q="auto"``: our rule ends at ``q = 1`` (inside ``(q_min, 1]``): at the optimum
``D = E|G_r - G_0|^2 = 2.21`` exceeds ``A = E|G_r|^2 = 0.26``, so ``q* = 1``.
The authors' rule (as in their code, ``D`` is measured on the reweighted
estimate, ``(1/q - 1)^2 |G_r - G_0|^2``, and shrunk by 10) settles near
``q = 0.62-0.65``: with ``c_f = r + 1 = 11`` and ``c_x = r (r + 1) / 2 = 55``
it chooses ``q = 1`` while ``D >= c_x A / (2 (c_f + c_x)) = 0.11``, i.e. while
roughly ``q <= 0.59``, and a root below 1 above it, so ``q`` hovers about that
point (it stays below the outer-loss target from step 1,166). The ``"ufom"``
rule measures costs by wall clock, so its trajectory can differ between runs
with the same seed (the ``"authors"`` rule counts steps).

Run from the repository root::

    python -m benchmarks.toy                 # 10,000 outer steps, results/toy/
    python -m benchmarks.toy --quick         # 2,000 outer steps: fom, q 0.05/0.2/1, both auto rules
    python -m benchmarks.toy --iters 20000 --seed 3 --out /tmp/toy
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

try:  # run as ``python benchmarks/toy.py`` as well as ``python -m benchmarks.toy``
    import torch_ufom
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch_ufom
from torch_ufom import MetaOptimizer

# ---------------------------------------------------------------------------
# The problem (docs/maths.md#the-papers-counter-example)
# ---------------------------------------------------------------------------

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


def fom_fixed_point(tasks: Sequence[Tuple[float, float]] = TASKS) -> float:
    """Where FOM's expected update vanishes (inside the quadratic pieces):
    ``x_F = sum a_i p_i (b_i/a_i) / sum a_i p_i``."""
    num = sum(a * contraction(a) * (b / a) for a, b in tasks)
    return num / sum(a * contraction(a) for a, _ in tasks)


def ablo_minimiser(tasks: Sequence[Tuple[float, float]] = TASKS) -> float:
    """The stationary point of the average ABLO objective:
    ``x* = sum a_i p_i^2 (b_i/a_i) / sum a_i p_i^2``."""
    num = sum(a * contraction(a) ** 2 * (b / a) for a, b in tasks)
    return num / sum(a * contraction(a) ** 2 for a, _ in tasks)


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


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

@dataclass
class Method:
    """One configuration of ``MetaOptimizer``."""

    label: str
    mode: str
    q: object = 0.1
    q_rule: str = "ufom"

    def kwargs(self) -> Dict[str, object]:
        kw: Dict[str, object] = {"mode": self.mode}
        if self.mode == "ufom":
            kw["q"] = self.q
            if self.q == "auto":
                kw["q_rule"] = self.q_rule
        return kw


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
    seconds: float = 0.0                                 # wall-clock time of the training loop
    cpu_seconds: float = 0.0                             # CPU time of this process over it
    grad: Optional[Tensor] = None                        # |true gradient| at xs
    loss: Optional[Tensor] = None                        # outer loss (ABLO objective) at xs


def draws(iters: int, seed: int) -> Tuple[float, List[int]]:
    """The starting point and the task sequence, shared by every method."""
    rng = random.Random(seed)
    x0 = rng.uniform(*X0_RANGE)
    return x0, [rng.randrange(len(TASKS)) for _ in range(iters)]


def train(method: Method, x0: float, task_ids: Sequence[int], seed: int,
          memory: str = "checkpoint", show_progress: bool = True) -> Run:
    """Outer SGD with step size ``10 / (k + 1)`` from ``x0``, one task per step."""
    model = Scalar(x0)
    opt = torch.optim.SGD(model.parameters(), lr=10.0)
    meta = MetaOptimizer(model, opt, inner_lr=ALPHA, steps=STEPS, memory=memory,
                         generator=torch.Generator().manual_seed(seed), **method.kwargs())
    run = Run(method)
    run.xs.append(float(model.x.detach()))
    bar = _progress(len(task_ids), method.label, show_progress)
    elapsed = cpu = 0.0
    for k, i in enumerate(task_ids):
        start, cpu_start = time.perf_counter(), time.process_time()
        meta.zero_grad()
        res = meta.backward(task_loss, task_loss, TASKS[i], TASKS[i])
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
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    run.seconds = elapsed
    run.cpu_seconds = cpu
    if method.q == "auto":
        run.q_end = float(meta.q_stats["q"])  # the q the next task would use
        run.q_min = float(getattr(meta.adaptive, "q_min", float("nan")))
    elif method.mode == "ufom":
        run.q_end = float(method.q)
    return run


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=f"{desc:>27}", file=sys.stderr, leave=False, mininterval=0.5)


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
    """The first iterate ``k`` (outer steps done) from which ``values[k:]`` all lie
    below ``threshold``; ``None`` if the last one does not."""
    above = (values >= threshold).nonzero()
    if len(above) and int(above[-1]) == len(values) - 1:
        return None
    return 0 if len(above) == 0 else int(above[-1]) + 1


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
        "exact_frac": run.exact_branches / max(1, iters), "seconds": run.seconds,
        "cpu_seconds": run.cpu_seconds,
        "per_step_ms": 1e3 * run.seconds / max(1, iters),
        "target_iter": first, "target_s": _at(run.clock, first),
        "excess_mean": float((run.loss[-last:] - f_star).mean()),
        "excess_end": float(run.loss[-1] - f_star),
        "loss_target_iter": first_loss, "loss_target_s": _at(run.clock, first_loss),
        "loss_target_cpu_s": _at(run.cpu_clock, first_loss),
    }


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str) -> str:
    try:
        from benchmarks.harness import markdown_table
        return markdown_table(headers, rows, align)
    except ImportError:  # pragma: no cover
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def table(runs: Sequence[Run], last: int) -> str:
    headers = ["mode", f"final |true grad| (mean, last {last})", "|true grad| at end",
               "q at end", "exact branches", "wall time", "CPU time", "ms / step",
               f"iters to stay < {TARGET}", f"time to stay < {TARGET}"]
    rows = []
    for run in runs:
        s = summary(run, last)
        rows.append([
            run.method.label, f"{s['final_mean']:.4f}", f"{s['final_end']:.4f}",
            "-" if s["q_end"] is None else f"{s['q_end']:.3f}",
            f"{100 * s['exact_frac']:.1f}%", f"{s['seconds']:.1f} s", f"{s['cpu_seconds']:.1f} s",
            f"{s['per_step_ms']:.2f}",
            "not reached" if s["target_iter"] is None else str(s["target_iter"]),
            "-" if s["target_s"] is None else f"{s['target_s']:.1f} s",
        ])
    return _table(headers, rows, "lrrrrrrrrr")


def loss_table(runs: Sequence[Run], last: int) -> str:
    """Time to reach, and stay below, the target outer loss."""
    headers = ["mode", f"excess outer loss (mean, last {last})", "excess at end",
               "q at end", f"mean q (last {last})", "iters to stay < target",
               "wall time to target", "CPU time to target"]
    rows = []
    for run in runs:
        s = summary(run, last)
        rows.append([
            run.method.label, f"{s['excess_mean']:.2e}", f"{s['excess_end']:.2e}",
            "-" if s["q_end"] is None else f"{s['q_end']:.3f}",
            "-" if s["q_mean_last"] is None else f"{s['q_mean_last']:.3f}",
            "not reached" if s["loss_target_iter"] is None else str(s["loss_target_iter"]),
            "-" if s["loss_target_s"] is None else f"{s['loss_target_s']:.1f} s",
            "-" if s["loss_target_cpu_s"] is None else f"{s['loss_target_cpu_s']:.1f} s",
        ])
    return _table(headers, rows, "lrrrrrrr")


def checks(runs: Sequence[Run], last: int) -> List[Tuple[str, bool]]:
    """The project's acceptance criteria on this run (for the modes it ran)."""
    sums = {r.method.label: summary(r, last) for r in runs}
    final = {k: v["final_mean"] for k, v in sums.items()}
    out = []
    if "fom" in final:
        out.append((f"fom final |true grad| {final['fom']:.4f} > 0.25", final["fom"] > 0.25))
        out.append(("fom never stays below the target outer loss "
                    f"(excess at end {sums['fom']['excess_end']:.3f})",
                    sums["fom"]["loss_target_iter"] is None))
    for label in ("ufom q=0.1", "exact", "ufom q=1"):
        if label in final:
            out.append((f"{label} final |true grad| {final[label]:.4f} < 0.1", final[label] < 0.1))
    for label, s in sums.items():
        if s["q_min"] is None:
            continue
        q_end, q_min = s["q_end"], s["q_min"]
        out.append((f"{label}: q at end {q_end:.3f} in (q_min = {q_min:g}, 1]", q_min < q_end <= 1))
        out.append((f"{label} final |true grad| {final[label]:.4f} < 0.1", final[label] < 0.1))
        it = s["loss_target_iter"]
        out.append((f"{label} stays below the target outer loss "
                    + ("(never)" if it is None else f"from iteration {it}"), it is not None))
    return out


def plot(runs: Sequence[Run], path: str, iters: int, seed: int) -> None:
    """|true gradient| against the outer iteration (log-log), and ``q`` of the auto modes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {m.label: f"C{i}" for i, m in enumerate(METHODS)}
    autos = [r for r in runs if r.method.q == "auto" and r.method.mode == "ufom"]
    ratios = [3, 3, 1] if autos else [3, 3]
    fig, axes = plt.subplots(len(ratios), 1, figsize=(8, 2.6 * sum(ratios) / 2.5), sharex=True,
                             squeeze=False, gridspec_kw={"height_ratios": ratios})
    f_star, _, goal = loss_target()
    axl = axes[1, 0]
    for run in runs:
        k = torch.arange(1, len(run.loss))
        axl.plot(k.numpy(), (run.loss[1:] - f_star).clamp_min(1e-12).numpy(), lw=0.8,
                 color=colors[run.method.label], label=run.method.label)
    axl.axhline(goal - f_star, color="gray", ls="--", lw=1, label="outer-loss target")
    axl.set_yscale("log")
    axl.set_ylabel("outer loss - minimum")
    axl.grid(True, which="both", alpha=0.3)
    ax = axes[0, 0]
    for run in runs:  # iterate k = 1..iters (after k outer steps); log x-axis
        k = torch.arange(1, len(run.grad))
        ax.plot(k.numpy(), run.grad[1:].clamp_min(1e-12).numpy(), lw=0.8,
                color=colors[run.method.label], label=run.method.label)
    ax.axhline(math.sqrt(2 * D_BIAS), color="k", ls=":", lw=1, label="sqrt(2D) (FOM's fixed point)")
    ax.axhline(TARGET, color="gray", ls="--", lw=1, label=f"target {TARGET}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylabel("|true ABLO gradient|")
    ax.set_title(f"1-D counter-example: r={STEPS}, alpha={ALPHA}, D={D_BIAS}, "
                 f"{iters} outer steps, seed {seed}", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(True, which="both", alpha=0.3)
    if autos:
        axq = axes[2, 0]
        for run in autos:
            axq.plot(range(1, len(run.qs) + 1), run.qs, lw=1, color=colors[run.method.label],
                     label=run.method.label)
        axq.set_yscale("log")
        axq.set_ylabel("q used")
        axq.legend(fontsize=8)
        axq.grid(True, which="both", alpha=0.3)
    axes[-1, 0].set_xlabel("outer iteration k")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_csv(runs: Sequence[Run], path: str) -> None:
    """Per-iterate trajectories: x, |true gradient|, outer loss, q and the training
    wall clock of every mode."""
    import csv
    cols = ("x", "|true grad|", "outer loss", "q", "wall s")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["k"] + [f"{r.method.label}: {c}" for r in runs for c in cols])
        for k in range(len(runs[0].xs)):
            row: List[object] = [k]
            for r in runs:
                q = r.qs[k - 1] if k > 0 else None
                row += [repr(r.xs[k]), f"{float(r.grad[k]):.6e}", f"{float(r.loss[k]):.12e}",
                        "" if q is None else f"{q:.6g}", f"{_at(r.clock, k):.6f}"]
            w.writerow(row)


def report(runs: Sequence[Run], args, last: int, total_s: float) -> str:
    x_f, x_star = fom_fixed_point(), ablo_minimiser()
    g_f = float(true_gradient([x_f]).abs())
    f_star, f_fom, goal = loss_target()
    lines = [
        "# The paper's 1-D counter-example (benchmarks/toy.py)",
        "",
        f"Command: `python -m benchmarks.toy {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"Problem: two tasks (a, b) = {[(a, round(b, 6)) for a, b in TASKS]}, A = {A_QUAD:.6f}, "
        f"r = {STEPS} inner SGD steps with alpha = {ALPHA}, D = {D_BIAS}; the same piecewise "
        "loss inside and outside. Outer SGD with step size 10/(k+1) from "
        f"x0 = {runs[0].xs[0]:.4f} (~U{X0_RANGE}), one random task per step, "
        f"{args.iters} outer steps, float64, seed {args.seed} (task sequence and x0 shared by "
        "all modes; each MetaOptimizer has its own torch.Generator seeded with the same seed).",
        "",
        f"FOM's fixed point x_F = {x_f:.4f} has |true gradient| = {g_f:.4f} (= sqrt(2D) = "
        f"{math.sqrt(2 * D_BIAS):.4f}); the ABLO minimiser is x* = {x_star:.4f}.",
        "",
        f"*final |true grad|*: the mean of |true ABLO gradient| over the last {last} outer "
        "iterates; *at end*: at the final iterate. The true gradient is the exact gradient of "
        "the average of both tasks' ABLO objectives, by a vectorised float64 unroll, "
        f"checked against `torch_ufom.hypergrad(mode=\"exact\")` at every {args.check_every}th "
        "iterate (agreement to 1e-9). *wall time*: the training loop only (MetaOptimizer "
        "backward + step), not the evaluation; *CPU time*: this process's CPU time over the same "
        "loop (less sensitive to other load on the machine; one torch thread); *ms / step*: "
        "wall time per outer step. *iters / time to stay < "
        f"{TARGET}*: the first outer iteration after which |true grad| stays below {TARGET} "
        "until the end, and the training wall time up to it. *exact branches*: the share of "
        f"steps on which the exact branch ran. Memory schedule: `{args.memory}`.",
        "",
        table(runs, last),
        "",
        "**Time to a target outer loss.** The outer loss is the average ABLO objective "
        "f(x) = (1/2) sum_i L_i(x_r^i(x)), evaluated at every iterate by the same float64 "
        f"unroll. Its minimum is f* = f(x*) = {f_star:.6f}; at FOM's fixed point "
        f"f(x_F) = {f_fom:.6f}. Target: f* + {LOSS_TOL:g} (f(x_F) - f*) = {goal:.6f}, an excess "
        f"of {goal - f_star:.4f}: a tenth of the excess FOM settles at. Both points lie on the "
        "quadratic pieces, where f - f* = g^2 / (2H) with H = sum_i a_i p_i^2 / 2, so this "
        f"excess is a true gradient of sqrt(2D / 10) = {math.sqrt(2 * D_BIAS / 10):.3f}, the "
        f"outer-loss counterpart of the gradient target {TARGET}. *excess*: f - f*; *iters / "
        "time to stay < target*: the first outer iteration after which f stays below the "
        "target until the end, and the training wall-clock / CPU time up to it; *mean q*: the "
        "mean of the q used over the last iterates (the adaptive modes).",
        "",
        loss_table(runs, last),
        "",
        "Checks (project requirements):",
        "",
    ]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in checks(runs, last)]
    lines += ["", f"Total time (training and evaluation): {total_s:.1f} s.", "",
              f"![true gradient]({os.path.basename(args.plot)})", ""]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--iters", type=int, default=None,
                   help="outer steps (default 10000; --quick 2000; --tiny 60)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help=f"2000 outer steps, modes {QUICK_MODES} (the main job)")
    size.add_argument("--tiny", action="store_true", help=f"60 outer steps, modes {TINY_MODES}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("results", "toy"))
    p.add_argument("--modes", default=None,
                   help="comma-separated subset of " + ", ".join(
                       f"{k} ({v})" for k, v in ALIASES.items()))
    p.add_argument("--memory", default="checkpoint", choices=["checkpoint", "recompute", "store"])
    p.add_argument("--last", type=int, default=None,
                   help="final |true grad| averages the last N iterates (default iters/20)")
    p.add_argument("--check-every", type=int, default=None,
                   help="cross-check the true gradient against torch_ufom every N iterates "
                        "(default 50; --quick 500)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.iters is None:
        args.iters = 60 if args.tiny else 2000 if args.quick else 10000
    if args.check_every is None:
        args.check_every = 500 if args.quick else 50
    if args.check_every < 1:
        p.error("--check-every must be >= 1")
    if args.modes is None:
        args.modes = TINY_MODES if args.tiny else QUICK_MODES if args.quick else ",".join(ALIASES)
    if args.iters < 1:
        p.error("--iters must be >= 1")
    labels = [s.strip() for s in args.modes.split(",") if s.strip()]
    known = {m.label: m for m in METHODS}
    known.update({alias: known[label] for alias, label in ALIASES.items()})
    unknown = [s for s in labels if s not in known]
    if unknown:
        p.error(f"unknown modes {unknown}; choose from {list(ALIASES)}")
    args.methods = [known[s] for s in labels]
    if args.last is None:
        args.last = max(1, args.iters // 20)
    args.last = min(args.last, args.iters + 1)
    args.plot = os.path.join(args.out, "toy.png")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # scalar problem: threads only add overhead
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    x0, task_ids = draws(args.iters, args.seed)
    runs = []
    for method in args.methods:
        run = train(method, x0, task_ids, args.seed, args.memory, not args.no_progress)
        evaluate(run, args.check_every)
        runs.append(run)
        s = summary(run, args.last)
        q = "" if s["q_end"] is None else f", q at end {s['q_end']:.3f}"
        reach = ("not reached" if s["loss_target_iter"] is None
                 else f"from iteration {s['loss_target_iter']}")
        print(f"{method.label:>27}: final |true grad| {s['final_mean']:.4f}, "
              f"{s['seconds']:.1f} s{q}, below the outer-loss target {reach}", file=sys.stderr)
    total = time.perf_counter() - t0
    plot(runs, args.plot, args.iters, args.seed)
    write_csv(runs, os.path.join(args.out, "toy.csv"))
    text = report(runs, args, args.last, total)
    with open(os.path.join(args.out, "toy.md"), "w") as f:
        f.write(text)
    print(table(runs, args.last))
    print()
    print(loss_table(runs, args.last))
    print()
    for text_, ok in checks(runs, args.last):
        print(f"{'PASS' if ok else 'FAIL'}: {text_}")
    print(f"wrote {os.path.join(args.out, 'toy.md')}, {args.plot} and toy.csv ({total:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
