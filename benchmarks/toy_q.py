"""The toy's optimal-q experiment (the authors' T3): which q reaches a gradient threshold cheapest?

``python -m benchmarks.toy_q [--quick | --tiny]``; the report defines *reached*, the costs and the
predictions. :func:`simulate` runs every (rate, q, seed) of :mod:`benchmarks.toy`'s tasks at once in
float64 torch, the ufom estimator with plain SGD; :func:`cross_check` replays one trajectory through
``MetaOptimizer``.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from torch_ufom import adaptive
from benchmarks import toy
from benchmarks.harness import (fmt, markdown_table, parse, parser, plot_panels, positive_float,
                                positive_int, torch_threads, write_report)

NAME = "toy_q"
STEPS = 10
CURVATURES = (0.5, 1.5)
OFFSETS = (0.0, 10.0)                       # b, the authors' T2 / T3 constants
A_QUAD = abs(OFFSETS[1] / CURVATURES[1]) + 1.0
TASKS = tuple(zip(CURVATURES, OFFSETS))
C_F, C_X = STEPS + 1, STEPS * (STEPS - 1) // 2 + STEPS   # the authors' count per task
Q_GRID = tuple(round(0.05 * i, 2) for i in range(1, 21))
THRESHOLD = 0.1
# (rates, seeds, outer steps) per size
SIZES = {"full": (8, 40, 10_000), "quick": (8, 10, 3_000), "tiny": (3, 3, 60)}


def rates(n: int) -> List[float]:
    """``n`` inner learning rates log-spaced in ``[0.001, 0.05]``."""
    return torch.logspace(math.log10(0.001), math.log10(0.05), n, dtype=torch.float64).tolist()


def derivatives(x: Tensor, a: Tensor, b: Tensor, A: float = A_QUAD) -> Tuple[Tensor, Tensor]:
    """``(L'(x), L''(x))`` of :func:`benchmarks.toy.piecewise_loss`, elementwise."""
    u = x - b / a
    z, s = u.abs(), torch.sign(u)
    w = z - A
    cubic, linear = z > A, z > A + 1
    d1 = torch.where(linear, s * (a / 2 + a * A),
                     torch.where(cubic, s * (-a * w * w / 2 + a * w + a * A), a * u))
    d2 = torch.where(linear, torch.zeros_like(x), torch.where(cubic, a - a * w, a.expand_as(x)))
    return d1, d2


def unroll(x: Tensor, alpha: Tensor, steps: int = STEPS) -> Tuple[Tensor, Tensor, Tensor]:
    """Both tasks' inner loops from ``x`` (any shape, broadcast with ``alpha``).

    Returns ``(L'(x_r), J)`` of shape ``(2, *x.shape)``, where ``J = prod_j (1 - alpha
    L''(x_{j-1}))`` is ``dx_r/dx``: ``G_0 = L'(x_r)``, ``G_r = L'(x_r) J``; and the
    true gradient of the average ABLO objective, ``mean_i L_i'(x_r^i) J_i``.
    """
    shape = (2,) + (1,) * x.dim()
    a = torch.tensor(CURVATURES, dtype=torch.float64).reshape(shape)
    b = torch.tensor(OFFSETS, dtype=torch.float64).reshape(shape)
    xi = x.unsqueeze(0).expand((2,) + tuple(torch.broadcast_shapes(x.shape, alpha.shape)))
    jac = torch.ones_like(xi)
    for _ in range(steps):
        d1, d2 = derivatives(xi, a, b)
        jac = jac * (1 - alpha * d2)
        xi = xi - alpha * d1
    g0, _ = derivatives(xi, a, b)
    return g0, jac, (g0 * jac).mean(0)


def draws(iters: int, seeds: int, seed: int) -> Tuple[Tensor, Tensor, Tensor]:
    """``(x_0 (seeds,), task index (iters, seeds), uniform u (iters, seeds))``; ``xi = u < q``."""
    g = torch.Generator().manual_seed(seed)
    x0 = -10.0 + 40.0 * torch.rand(seeds, generator=g, dtype=torch.float64)
    return x0, torch.randint(0, 2, (iters, seeds), generator=g), torch.rand(iters, seeds, generator=g,
                                                                             dtype=torch.float64)


def simulate(alphas: Sequence[float], qs: Sequence[float], seeds: int, iters: int, seed: int = 0,
             stride: int = 1, keep: Optional[Tuple[int, int, int]] = None) -> Dict[str, Any]:
    """Every (rate, q, seed) run at once; tensors indexed ``[..., rate, q, seed]``.

    Returns ``sq_grad``: ``f'(x_k)^2`` (float32) at ``steps = 0, stride, 2 stride, ..., iters``
    and, for ``keep = (rate, q, seed)`` indices, that run's iterates ``x`` and its draws ``xi``.
    """
    x0, task, u = draws(iters, seeds, seed)
    alpha = torch.tensor(alphas, dtype=torch.float64).reshape(-1, 1, 1)
    q = torch.tensor(qs, dtype=torch.float64).reshape(1, -1, 1)
    q_safe = torch.where(q > 0, q, torch.ones_like(q))   # q = 0 is FOM: xi = (u < 0) is always 0
    x = x0.reshape(1, 1, -1).expand(len(alphas), len(qs), seeds).clone()
    kept_x, kept_xi, sq, steps = [], [], [], []
    for k in range(iters + 1):
        g0, jac, true = unroll(x, alpha)
        if k % stride == 0 or k == iters:
            sq.append((true * true).float())
            steps.append(k)
        if k == iters:
            break
        xi = (u[k].reshape(1, 1, -1) < q).to(torch.float64)
        pick = task[k].reshape(1, 1, -1).expand_as(x).unsqueeze(0)
        G0, Gr = g0.gather(0, pick)[0], (g0 * jac).gather(0, pick)[0]
        est = G0 + xi / q_safe * (Gr - G0)     # UFOM: G_0 + (xi / q) (G_r - G_0)
        if keep is not None:
            kept_x.append(float(x[keep]))
            kept_xi.append(int(xi[0, keep[1], keep[2]]))
        x = x - 10.0 / (k + 1) * est
    out: Dict[str, Any] = {"sq_grad": torch.stack(sq), "steps": steps}
    if keep is not None:
        out.update(x=kept_x + [float(x[keep])], xi=kept_xi)
    return out


def steps_to_stay_below(rms: Tensor, steps: Sequence[int], threshold: float) -> Tensor:
    """Per ``[..., rate, q]``: the first recorded step from which ``rms[t, ...]`` stays below
    ``threshold`` (``inf``: the last one is above it)."""
    bad = rms >= threshold
    t = torch.arange(rms.shape[0]).reshape(-1, *([1] * (rms.dim() - 1)))
    last_bad = torch.where(bad, t, torch.full_like(t, -1)).amax(0)
    at = torch.as_tensor(steps, dtype=torch.float64)[(last_bad + 1).clamp(max=len(steps) - 1)]
    return torch.where(last_bad == len(steps) - 1, torch.full_like(at, math.inf), at)


def exact_stats(alpha: float) -> Tuple[float, float]:
    """``(A, D)`` of the toy at the ABLO minimiser: the means over the two tasks of ``G_r^2``
    and ``(G_r - G_0)^2``."""
    p, x_star = [(1 - alpha * a) ** STEPS for a in CURVATURES], toy.ablo_minimiser(TASKS, alpha)
    gr = [a * pi ** 2 * (x_star - b / a) for (a, b), pi in zip(TASKS, p)]
    g0 = [a * pi * (x_star - b / a) for (a, b), pi in zip(TASKS, p)]
    return sum(g * g for g in gr) / 2, sum((g - h) ** 2 for g, h in zip(gr, g0)) / 2


def fom_stall(alpha: float) -> float:
    """``|f'(x_F)|``: the true gradient at FOM's fixed point (both tasks on their quadratic pieces)."""
    p, x_f = [(1 - alpha * a) ** STEPS for a in CURVATURES], toy.fom_fixed_point(TASKS, alpha)
    return abs(sum(a * pi ** 2 * (x_f - b / a) for (a, b), pi in zip(TASKS, p)) / 2)


def predictions(alpha: float) -> Dict[str, float]:
    """``A``, ``D`` and the q of each formula at rate ``alpha``."""
    A, D = exact_stats(alpha)
    return {"A": A, "D": D, "q_ufom": adaptive.optimal_q(A, D, C_F, C_X - C_F, 0.01),
            "q_authors": adaptive.authors_q(A, D / 10, STEPS + 1, STEPS * (STEPS + 1) / 2, 0.05),
            "q_authors_unshrunk": adaptive.authors_q(A, D, STEPS + 1, STEPS * (STEPS + 1) / 2, 0.05)}


def t3_loss(fmodel, task) -> Tensor:
    """The T3 task loss for ``torch_ufom``: ``(fmodel, (a, b)) -> scalar`` (``A = |b_2/a_2| + 1``)."""
    a, b = task
    return toy.piecewise_loss(fmodel(), a, b, A_QUAD)


def cross_check(alpha: float, q: float, iters: int, seed: int, sim_x: Sequence[float],
                sim_xi: Sequence[int], seed_index: int, seeds: int) -> float:
    """Replay the first ``iters`` steps of one simulated run through ``torch_ufom.MetaOptimizer``;
    return the largest ``|x_lib - x_sim| / max(1, |x_sim|)`` over its iterates."""
    x0, task, _ = draws(iters, seeds, seed)
    replay = toy.Method("replay", "ufom", q)
    run = toy.train(replay, float(x0[seed_index]), task[:, seed_index].tolist(), seed, show_progress=False,
                    problem=(TASKS, alpha, t3_loss), forced=[STEPS * k for k in sim_xi])
    return max(abs(x - s) / max(1.0, abs(s)) for x, s in zip(run.xs, sim_x[:iters + 1], strict=True))


def best_q(sq_grad: Tensor, steps: Sequence[int], qs: Sequence[float], threshold: float,
           resamples: int, seed: int) -> Dict[str, Any]:
    """Per rate: the q of the fewest expected evaluations to an RMS gradient below ``threshold``.

    ``sq_grad[t, rate, q, seed]``; the RMS is over the seeds. The spread: the
    quartiles of the best q and of its cost over ``resamples`` bootstrap
    resamples of the seeds.
    """
    q = torch.tensor(qs, dtype=torch.float64)

    def costs(sq):  # evaluations to the threshold: steps times the expected c_f + q (c_x - c_f) per step
        return steps_to_stay_below(sq.mean(-1).sqrt(), steps, threshold) * (C_F + q * (C_X - C_F))

    cost = costs(sq_grad)                                    # [rate, q]
    g = torch.Generator().manual_seed(seed)
    boot_q, boot_cost = [], []
    for _ in range(resamples):
        idx = torch.randint(0, sq_grad.shape[-1], (sq_grad.shape[-1],), generator=g)
        c = costs(sq_grad.index_select(-1, idx))
        best = c.min(1)
        boot_q.append([qs[int(j)] if math.isfinite(v) else math.nan
                       for v, j in zip(best.values.tolist(), best.indices.tolist())])
        boot_cost.append(best.values.tolist())
    out = []
    for r in range(cost.shape[0]):
        best = int(torch.argmin(cost[r]))
        bq = sorted(b[r] for b in boot_q if not math.isnan(b[r]))
        bc = sorted(b[r] for b in boot_cost)
        out.append({"q_best": qs[best] if math.isfinite(float(cost[r, best])) else None,
                    "cost_best": float(cost[r, best]), "cost_per_q": cost[r].tolist(),
                    "boot_q_quartiles": _quartiles(bq), "boot_cost_quartiles": _quartiles(bc),
                    "boot_reached": len(bq) / resamples})
    return {"per_rate": out, "rms_final": sq_grad[-1].mean(-1).sqrt().tolist()}


def _count(x: float) -> str:
    """An evaluation count, or ``never`` for ``inf`` (not reached)."""
    return f"{x:.0f}" if math.isfinite(x) else "never"


def _quartiles(xs: Sequence[float]) -> List[float]:
    """The lower and upper quartiles of ``xs`` (``nan`` for no values)."""
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else (list(xs) or [math.nan]) * 3
    return [q[0], q[2]]


TEMPLATE = """# The toy's optimal q (the authors' T3; benchmarks/toy_q.py)

Command: `{command}`

Tasks (a, b) = {tasks}, A = {A:.4f}; r = {steps} inner SGD steps; outer SGD 10/(k+1) from x0 ~ U(-10, 30), one
random task per step, {iters} outer steps, {seeds} seeds (x0, task sequence and the uniforms behind the
draws, xi = u < q, shared across rates and q), float64. Costs: {c_f} evaluations per first-order step,
{c_x} per exact one. q grid {qmin}..{qmax} ({nq} values).

*Reached*: the RMS over the seeds of the true gradient |f'(x_k)| of the average ABLO objective stays below
{threshold} from step k to the end of the run (recorded every {stride} steps); its cost is k times the
expected evaluations per step, {c_f} + q ({c_x} - {c_f}). *best q*: the grid value of the fewest evaluations
(`-`: none reached); the spread: quartiles over {resamples} bootstrap resamples of the seeds (*bootstrap
reached*: the share of resamples in which some q reached). *q-star* and *authors*: the formulas fed with the
toy's exact A and D at the ABLO minimiser (authors: D / 10, as `q_rule="authors"` and `diagnose` apply
it; *unshrunk*: D). *evaluations fom*: the same runs with q = 0 (G_0 only,
{c_f} per step); *fom's floor*: the true gradient at FOM's fixed point x_F, which FOM cannot go below.

{table}

Cross-check: the simulation replayed through `torch_ufom.MetaOptimizer(mode="ufom")` (rate {cc_rate:.4g},
q = {cc_q}, the first seed, {cc_iters} outer steps, the simulation's draws forced with
`force_truncation`): largest relative difference of the iterates {cc_diff:.2e}.
"""


def main(argv=None) -> Dict[str, Any]:
    """Run the study; write ``toy_q.md``, ``toy_q.json`` and ``toy_q.png`` into ``--out``."""
    p = parser(NAME, __doc__, {"quick": "8 rates x 20 q x 10 seeds, 3000 outer steps",
                               "tiny": "3 rates x 20 q x 2 seeds, 50 outer steps"})
    p.add_argument("--rates", type=positive_int, help="inner rates (default 8)")
    p.add_argument("--seeds", type=positive_int, help="seeds (default 40; --quick 10)")
    p.add_argument("--iters", type=positive_int, help="outer steps (default 10000; --quick 3000)")
    p.add_argument("--threshold", type=positive_float, default=THRESHOLD,
                   help=f"|true gradient| threshold (default {THRESHOLD})")
    p.add_argument("--resamples", type=positive_int, default=200,
                   help="bootstrap resamples of the seeds (default 200)")
    p.add_argument("--check-iters", type=positive_int, default=300,
                   help="outer steps of the MetaOptimizer cross-check (default 300)")
    args = parse(p, argv)
    for name, default in zip(("rates", "seeds", "iters"), SIZES[args.size]):
        setattr(args, name, getattr(args, name) or default)
    with torch_threads(1):
        return run(args)


def run(args) -> Dict[str, Any]:
    """The study for parsed ``args``."""
    alphas = rates(args.rates)
    keep = (len(alphas) // 2, 1 + Q_GRID.index(0.2), 0)   # index 0 of the simulated q is FOM (q = 0)
    stride = max(1, args.iters // 500)
    sim = simulate(alphas, (0.0,) + Q_GRID, args.seeds, args.iters, args.seed, stride, keep)
    check_iters = min(args.check_iters, args.iters)
    diff = cross_check(alphas[keep[0]], Q_GRID[keep[1] - 1], check_iters, args.seed, sim["x"], sim["xi"], 0,
                       args.seeds)
    found = best_q(sim["sq_grad"][:, :, 1:], sim["steps"], Q_GRID, args.threshold, args.resamples, args.seed)
    fom_rms = sim["sq_grad"][:, :, 0].mean(-1).sqrt()                     # [t, rate]
    fom_cost = (steps_to_stay_below(fom_rms, sim["steps"], args.threshold) * C_F).tolist()
    per_rate, rows = [], []
    for i, (alpha, best, rms) in enumerate(zip(alphas, found["per_rate"], found["rms_final"])):
        pred = predictions(alpha)
        per_rate.append({"alpha": alpha, **best, **pred, "rms_final_per_q": rms, "fom_cost": fom_cost[i],
                         "fom_rms_final": float(fom_rms[-1, i]), "fom_stall": fom_stall(alpha)})
        rows.append([f"{alpha:.4f}", f"{pred['A']:.3f}", f"{pred['D']:.4f}", fmt(best["q_best"], ".2f"),
                     "{:.2f}-{:.2f}".format(*best["boot_q_quartiles"]),
                     f"{pred['q_ufom']:.3f}", f"{pred['q_authors']:.3f}", f"{pred['q_authors_unshrunk']:.3f}",
                     _count(best["cost_best"]) + " ({}-{})".format(*map(_count, best["boot_cost_quartiles"])),
                     _count(best["cost_per_q"][-1]), _count(fom_cost[i]),
                     f"{per_rate[-1]['fom_stall']:.3f}", f"{100 * best['boot_reached']:.0f}%"])
    table = markdown_table(["inner lr", "A", "D", "best q", "bootstrap best q (quartiles)", "q* (ufom rule)",
                            "authors", "authors, D unshrunk", "evaluations at best q (bootstrap quartiles)",
                            "evaluations at q=1", "evaluations fom", "fom's floor |f'(x_F)|",
                            "bootstrap reached"], rows, "rrrrrrrrrrrrr")
    series = {"empirical best q": (alphas, [r["q_best"] for r in per_rate]),
              "q* (ufom rule)": (alphas, [r["q_ufom"] for r in per_rate]),
              "authors (D/10)": (alphas, [r["q_authors"] for r in per_rate]),
              "authors, D unshrunk": (alphas, [r["q_authors_unshrunk"] for r in per_rate]),
              "best q, bootstrap lower quartile": (alphas, [r["boot_q_quartiles"][0] for r in per_rate]),
              "best q, bootstrap upper quartile": (alphas, [r["boot_q_quartiles"][1] for r in per_rate])}
    styles = {"best q, bootstrap lower quartile": ":", "best q, bootstrap upper quartile": ":"}
    cost_series = {f"lr {r['alpha']:.4f}": ([0.0] + list(Q_GRID), [min(c, 1e7) for c in
                                                                  [r["fom_cost"]] + r["cost_per_q"]])
                   for r in per_rate}
    figure = plot_panels(f"{args.out}/{NAME}.png", [
        {"series": series, "styles": styles, "logx": True, "logy": True, "xlabel": "inner learning rate",
         "ylabel": "q", "title": f"best q vs the formulas (RMS |f'| < {args.threshold}, {args.seeds} seeds)"},
        {"series": cost_series, "logy": True, "xlabel": "q", "ylabel": "evaluations to the threshold",
         "title": "cost against q per inner rate (q = 0: fom; 1e7: not reached)"}], ncols=2)
    fields = dict(vars(args), tasks=TASKS, A=A_QUAD, steps=STEPS, c_f=C_F, c_x=C_X, qmin=Q_GRID[0],
                  qmax=Q_GRID[-1], nq=len(Q_GRID), table=table, cc_rate=alphas[keep[0]],
                  cc_q=Q_GRID[keep[1] - 1], cc_iters=check_iters, cc_diff=diff, stride=stride)
    data = {"rates": per_rate, "q_grid": list(Q_GRID), "threshold": args.threshold, "iters": args.iters,
            "seeds": args.seeds, "stride": stride, "resamples": args.resamples,
            "cross_check": {"alpha": alphas[keep[0]], "q": Q_GRID[keep[1] - 1], "iters": check_iters,
                            "max_rel_diff": diff}}
    return write_report(args, NAME, TEMPLATE, fields, data, (), [figure])


if __name__ == "__main__":
    main()
