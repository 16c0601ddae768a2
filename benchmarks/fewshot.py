"""Equal-compute study of UFOM's q on 1-shot 5-way digits (issue 15; the authors' few-shot sweep).

``python -m benchmarks.fewshot [--quick | --tiny]``; the report states the data, model, sizes, cost
formulas and rows (:data:`ROWS`). Equal compute two ways: *evals* (inner-gradient evaluations, a
truncation at ``K`` charged ``K(K+1)/2`` reverse work) and *time* (process CPU time per ``K``, measured
once by :func:`calibrate`); each row trains until both of ``fom``'s budgets are spent.
"""
from __future__ import annotations

import copy
import itertools
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

import torch_ufom
from torch_ufom.truncation import Geometric
from benchmarks import problems
from benchmarks.problems import xent
from benchmarks.harness import (choose, markdown_table, mean_ci, parse, parser, plot_panels, positive_float,
                                positive_int, progress, torch_threads, write_report)
from benchmarks.maml import meta_kwargs

NAME = "fewshot"
STEPS = 10                      # r
WAYS, SHOTS = 5, 1
ROTATIONS = 4                   # 0, 90, 180, 270 degrees
TEST_DIGITS = (3, 4, 7)         # meta-test base digits; 6 and 9 both train
TRAIN_DIGITS = tuple(d for d in range(10) if d not in TEST_DIGITS)
TEST_SEED = 20_210_615          # the held-out tasks: fixed, independent of --seed
CURVE_TASKS = 100               # the intermediate checkpoints use the first this many test tasks
MEASURES = ("evals", "time")
# (seeds, fom outer steps, test tasks, budget fractions) per size
SIZES = {"full": (5, 100, 500, (0.5, 1.0)), "quick": (1, 10, 40, (1.0,)),
         "tiny": (2, 2, 6, (1.0,))}


# -- data ----------------------------------------------------------------------------------
def rotated_digits(size: int = 28) -> Dict[int, Tensor]:
    """The 40 classes ``4 * digit + rotation``: ``{class: (n, 1, size, size) images}``.

    Each 8x8 digit is turned by ``rotation * 90`` degrees (``torch.rot90``)
    and then resized to ``size x size`` (bilinear interpolation).
    """
    out = {}
    for digit, flat in problems.load_digits_by_class().items():
        images = flat.reshape(-1, 1, 8, 8)
        for rot in range(ROTATIONS):
            turned = torch.rot90(images, rot, dims=(2, 3))
            out[ROTATIONS * digit + rot] = nn.functional.interpolate(
                turned, size=(size, size), mode="bilinear", align_corners=False)
    return out


def classes_of(digits: Sequence[int]) -> Tuple[int, ...]:
    """Every rotation class of ``digits``."""
    return tuple(ROTATIONS * d + r for d in digits for r in range(ROTATIONS))


# -- rows and costs ------------------------------------------------------------------------
def authors_costs(r: int = STEPS) -> Tuple[int, int]:
    """``(c_f, c_x)``: inner-gradient evaluations of a first-order and an exact task."""
    return r + 1, r * (r - 1) // 2 + r


def evals_cost(K: int, r: int = STEPS) -> float:
    """The authors' count for a task truncated at ``K``: ``K(K+1)/2`` of the exact reverse work."""
    c_f, c_x = authors_costs(r)
    return c_f + (c_x - c_f) * K * (K + 1) / (r * (r + 1))


def geometric_cost(rho: float, cost: Sequence[float], q: float = 1.0) -> float:
    """Expected cost of ``Geometric(q, rho)`` when a truncation at ``K`` costs ``cost[K]``."""
    probs = Geometric(q, rho).probs(len(cost) - 1)
    return sum(p * c for p, c in zip(probs, cost))


def match_geometric(cost: Sequence[float], target: float) -> Geometric:
    """A :class:`Geometric` law whose expected cost under ``cost`` is ``target``.

    ``P(K >= 1) = 1`` and ``rho`` by bisection; where even ``rho -> 0`` (always
    ``K = 1``) costs more, ``rho = 0.5`` and ``P(K >= 1)`` solved instead (the
    expected cost is linear in it).
    """
    lo, hi = 1e-6, 1 - 1e-9
    if geometric_cost(lo, cost) > target:
        rho, base = 0.5, cost[0]
        q = (target - base) / (geometric_cost(rho, cost) - base)
        return Geometric(min(1.0, max(q, 1e-6)), rho)
    if geometric_cost(hi, cost) < target:
        return Geometric(1.0, hi)
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if geometric_cost(mid, cost) < target else (lo, mid)
    return Geometric(1.0, (lo + hi) / 2)


@dataclass(frozen=True)
class Row:
    """One configuration: ``mode`` with ``q`` / ``q_rule``, or a Geometric law matched under ``measure``."""

    label: str
    mode: str = "ufom"
    q: Any = None
    q_rule: Optional[str] = None
    geometric: Optional[str] = None   # the cost measure its law matches q=0.2's under

    def kwargs(self, laws: Dict[str, Geometric]) -> Dict[str, Any]:
        """The keywords of :class:`torch_ufom.MetaOptimizer` for this row."""
        if self.geometric:
            return {"truncation": laws[self.geometric]}
        return meta_kwargs(self.mode, self.q, self.q_rule)


ROWS = (Row("fom", "fom"),) + tuple(Row(f"ufom q={q:g}", "ufom", q) for q in (0.2, 0.4, 0.6, 0.8)) + (
    Row("exact", "exact"), Row("ufom q=auto (ufom rule)", "ufom", "auto", "ufom"),
    Row("ufom q=auto (authors rule)", "ufom", "auto", "authors"),
    Row("geometric (evals)", geometric="evals"), Row("geometric (time)", geometric="time"))


# -- tasks ---------------------------------------------------------------------------------
def tasks(by_class, classes, n: int, query: int, generator: torch.Generator):
    """``n`` 1-shot 5-way tasks, stacked: ``(xs, ys, xq, yq)``."""
    return problems.digit_tasks(by_class, classes, n, WAYS, SHOTS, query, generator)


# -- calibration of the time measure -------------------------------------------------------
def calibrate(model: nn.Module, sample: Sequence, inner_lr: float, repeats: int) -> Dict[str, List[float]]:
    """Median process CPU seconds of one task, per cost curve: ``fom`` ``[t]``, ``exact`` ``[t]`` and
    ``ufom`` ``[t(K) for K = 0..r]`` (ufom forced to ``K``; the cost does not depend on the law's weights),
    made non-decreasing in ``K``.

    The configurations run round-robin ``repeats`` times on the tasks of ``sample``.
    """
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    configs = {"fom": ("fom", None), "exact": ("exact", None)}
    configs.update({f"ufom:{K}": ("ufom", K) for K in range(STEPS + 1)})
    metas = {key: torch_ufom.MetaOptimizer(model, opt, inner_lr=inner_lr, steps=STEPS, mode=mode, q=0.5)
             for key, (mode, _) in configs.items()}
    times: Dict[str, List[float]] = {key: [] for key in configs}
    for i in range(repeats + 1):
        support, query = sample[i % len(sample)]
        for key, (_, K) in configs.items():
            metas[key].zero_grad()
            start = time.process_time()
            metas[key].backward(xent, xent, support, query, force_truncation=K)
            if i:  # the first round warms up
                times[key].append(time.process_time() - start)
    med = {key: statistics.median(v) for key, v in times.items()}
    model.zero_grad(set_to_none=True)
    # A deeper truncation never costs less (it runs more exact steps); timing noise can say
    # otherwise for neighbouring K, which would leave no Geometric law at the target cost.
    ufom = list(itertools.accumulate((med[f"ufom:{K}"] for K in range(STEPS + 1)), max))
    return {"fom": [med["fom"]], "exact": [med["exact"]], "ufom": ufom}


# -- training to a budget ------------------------------------------------------------------
@dataclass
class Checkpoint:
    """An evaluation: when ``measure``'s charge first reached ``fraction`` of its budget."""

    measure: str
    fraction: float
    outer_steps: int
    charge: float
    cpu_s: float
    accuracy: List[float]   # per test task (the first CURVE_TASKS unless fraction is 1)


def train_row(row: Row, model: nn.Module, laws: Dict[str, Geometric], costs: Dict[str, List[float]],
              budgets: Dict[str, float], fractions: Sequence[float], batch: Callable[[int], Sequence],
              evaluate: Callable[[nn.Module, int], List[float]], args) -> Dict[str, Any]:
    """Train one row from ``model`` until both budgets are spent; evaluate at every checkpoint."""
    opt = torch.optim.Adam(model.parameters(), lr=args.outer_lr)
    meta = torch_ufom.MetaOptimizer(model, opt, inner_lr=args.inner_lr, steps=STEPS, reduction="mean",
                                    generator=torch.Generator().manual_seed(args.row_seed),
                                    **row.kwargs(laws))
    curve = costs[row.mode if row.mode in ("fom", "exact") and not row.geometric else "ufom"]
    charge = {m: 0.0 for m in MEASURES}
    pending = sorted((f * budgets[m], m, f) for m in MEASURES for f in fractions)
    points: List[Checkpoint] = []
    cache: Dict[Tuple[int, int], List[float]] = {}
    cpu, k, draws, qs = 0.0, 0, [], []
    while pending:
        start = time.process_time()
        meta.zero_grad()
        for support, query in batch(k):
            res = meta.backward(xent, xent, support, query)
            K = res.truncation
            draws.append(K)
            charge["evals"] += evals_cost(K)
            charge["time"] += curve[K] if len(curve) > 1 else curve[0]
        qs.append(res.q)
        meta.step()
        cpu += time.process_time() - start
        k += 1
        reached = [p for p in pending if charge[p[1]] >= p[0] * (1 - 1e-12)]
        for limit, measure, fraction in reached:
            n = args.test_tasks if fraction == 1.0 else min(CURVE_TASKS, args.test_tasks)
            if (k, n) not in cache:
                cache[(k, n)] = evaluate(model, n)
            points.append(Checkpoint(measure, fraction, k, charge[measure], cpu, cache[(k, n)]))
        pending = [p for p in pending if p not in reached]
    exact = sum(K == STEPS for K in draws)
    return {"checkpoints": [c.__dict__ for c in points], "outer_steps": k, "cpu_s": cpu,
            "tasks": len(draws), "exact_share": exact / max(1, len(draws)),
            "mean_K": sum(draws) / max(1, len(draws)),
            "q_end": float(meta.q_stats["q"]) if meta.q_stats is not None else row.q,
            "q_mean": (sum(qs) / len(qs)) if qs and qs[0] is not None else None}


# -- statistics ----------------------------------------------------------------------------
def interval(per_seed: Sequence[float], per_task: Sequence[float]) -> Tuple[float, float, str]:
    """``(mean, half-width, method)`` of a 95 % interval: Student's t over seeds, or normal over tasks."""
    if len(per_seed) >= 2:
        return (*mean_ci(per_seed, student=True), f"t over {len(per_seed)} seeds")
    return (*mean_ci(per_task), f"normal over {len(per_task)} tasks")


# -- diagnostics ---------------------------------------------------------------------------
def diagnoses(model: nn.Module, sample: Sequence, inner_lr: float, seed: int) -> Dict[str, Dict[str, float]]:
    """``torch_ufom.diagnose`` on the few-shot tasks (at ``model``) and on MAML's sinusoid tasks."""
    out = {}
    d = torch_ufom.diagnose(model, xent, xent, sample, steps=STEPS, inner_lr=inner_lr)
    out["fewshot (conv4, init)"] = dict(d.__dict__, steps=STEPS, inner_lr=inner_lr)
    g = torch.Generator().manual_seed(seed)
    sin = problems.task_pairs(problems.sinusoid_tasks(len(sample), 10, 10, g))
    net = problems.seeded(seed, problems.sinusoid_mlp, dtype=torch.float64)
    for steps, lr in ((5, 0.01), (10, 0.01)):
        d = torch_ufom.diagnose(net, problems.mse, problems.mse, sin, steps=steps, inner_lr=lr)
        out[f"sinusoid (1-40-40-1, init, r={steps})"] = dict(d.__dict__, steps=steps, inner_lr=lr)
    return out


# -- report --------------------------------------------------------------------------------
TEMPLATE = """# When does UFOM pay? Equal compute on 1-shot 5-way digits (benchmarks/fewshot.py)

Command: `{command}`

scikit-learn digits resized to 28x28 (bilinear), 40 classes (10 digits x rotations by 0/90/180/270
degrees); meta-train digits {train}, meta-test digits {test} (all four rotations of a digit on one side;
6 and 9 together). 1-shot 5-way, {query} query images per class. conv4 ({channels} channels, BatchNorm on
batch statistics), float32, device {device}, {threads} thread(s). Inner: r = {steps} SGD steps at lr
{inner_lr}. Outer: Adam lr {outer_lr} on the mean query loss of {meta_batch} tasks. Memory setting:
`checkpoint` (the default). Seeds {seeds} (initial weights, task stream and draws per seed; the
{test_tasks} held-out tasks are the same for every seed and row).

**Budgets.** fom's cost of {fom_steps} outer steps under each measure: *evals* {budget_evals:.0f}
inner-gradient evaluations (authors' count: c_f = {c_f}, c_x = {c_x} per task; a truncation at K costs
c_f + (c_x - c_f) K(K+1)/(r(r+1))); *time* {budget_time:.1f} s of calibrated process CPU time
(per task: fom {t_fom:.1f} ms, exact {t_exact:.1f} ms, ufom's first-order branch {t_u0:.1f} ms and exact
branch {t_ur:.1f} ms; every K in the JSON). Geometric laws P(K >= k) = q rho^(k-1) matched to q = 0.2's
expected cost: evals {geo_evals}; time {geo_time}.

**Accuracy at equal compute** (meta-test accuracy on {test_tasks} tasks, mean over seeds; 95 %
interval: {ci_method}; *- fom*, *- exact*: the difference to that row, seed by seed, with a t interval
over the seeds (the rows share each seed's weights and tasks); *steps*: outer steps the budget bought,
mean over seeds; *exact*: share of
tasks with K = r; *CPU*: the measured training CPU time at the time budget).

{table}

**Diagnostic** (`torch_ufom.diagnose` before training on {diag_tasks} tasks: A = E||G_r||^2,
D = E||G_r - G_0||^2, seconds per task (wall), inner-step units, and the q each rule would pick):

{diag_table}
"""


def paired(per_seed: Sequence[float], reference: Sequence[float]) -> Tuple[float, float]:
    """Mean and 95 % half-width (Student's t over seeds) of ``per_seed - reference``, seed by seed
    (the rows share each seed's initial weights and task stream); half-width 0 with one seed."""
    return mean_ci([a - b for a, b in zip(per_seed, reference)], student=True)


def checkpoint(run: Dict[str, Any], measure: str, fraction: float) -> Dict[str, Any]:
    """The evaluation of ``run`` at ``fraction`` of ``measure``'s budget."""
    return next(c for c in run["checkpoints"] if c["measure"] == measure and c["fraction"] == fraction)


def summarise(results: Dict[str, List[Dict[str, Any]]], test_tasks: int) -> Dict[str, Dict[str, Any]]:
    """Per row and measure: the final accuracy's mean and interval, outer steps and CPU time, and
    the paired difference to ``fom`` and to ``exact`` where those rows ran."""
    out: Dict[str, Dict[str, Any]] = {}
    for label, runs in results.items():
        out[label] = {}
        for m in MEASURES:
            finals = [checkpoint(run, m, 1.0) for run in runs]
            per_seed = [statistics.fmean(c["accuracy"]) for c in finals]
            mean, half, method = interval(per_seed, finals[0]["accuracy"])
            out[label][m] = {"accuracy": mean, "ci95": half, "ci_method": method, "per_seed": per_seed,
                             "outer_steps": statistics.fmean(c["outer_steps"] for c in finals),
                             "cpu_s": statistics.fmean(c["cpu_s"] for c in finals),
                             "charge": statistics.fmean(c["charge"] for c in finals)}
        out[label]["exact_share"] = statistics.fmean(r["exact_share"] for r in runs)
        out[label]["q_end"] = [r["q_end"] for r in runs]
    for label, s in out.items():
        for m in MEASURES:
            for ref in ("fom", "exact"):
                if ref in out:
                    s[m][f"vs_{ref}"] = paired(s[m]["per_seed"], out[ref][m]["per_seed"])
    return out


def curves(results, fractions, budgets) -> List[Dict[str, Any]]:
    """Accuracy against compute, one panel per measure (mean over seeds; the first CURVE_TASKS tasks)."""
    panels = []
    for m, unit in (("evals", "inner-gradient evaluations"), ("time", "calibrated CPU seconds")):
        series = {}
        for label, runs in results.items():
            xs, ys = [], []
            for f in fractions:
                cs = [checkpoint(run, m, f) for run in runs]
                xs.append(f * budgets[m])
                ys.append(100 * statistics.fmean(statistics.fmean(c["accuracy"][:CURVE_TASKS]) for c in cs))
            series[label] = (xs, ys)
        panels.append({"series": series, "title": f"accuracy vs {unit}", "xlabel": unit,
                       "ylabel": f"meta-test accuracy (%), first {CURVE_TASKS} tasks"})
    return panels


def main(argv=None) -> Dict[str, Any]:
    """Run the study; write ``fewshot.md``, ``fewshot.json`` and ``fewshot.png`` into ``--out``."""
    p = parser(NAME, __doc__, {"quick": "1 seed, 10 fom outer steps of budget, 40 test tasks, no curve",
                               "tiny": "a smoke test"})
    p.add_argument("--seeds", type=positive_int, help="training seeds (default 5; --quick 1)")
    p.add_argument("--fom-steps", type=positive_int, help="the budget: fom's outer steps (default 100)")
    p.add_argument("--test-tasks", type=positive_int, help="held-out tasks (default 500; --quick 40)")
    p.add_argument("--meta-batch", type=positive_int, default=2, help="tasks per outer step (default 2)")
    p.add_argument("--query", type=positive_int, default=5, help="query images per class (default 5)")
    p.add_argument("--channels", type=positive_int, default=8, help="conv4 width (default 8)")
    p.add_argument("--inner-lr", type=positive_float, default=0.1, help="default 0.1")
    p.add_argument("--outer-lr", type=positive_float, default=3e-3, help="Adam, default 3e-3")
    p.add_argument("--calibration", type=positive_int, default=5, help="timed repeats per truncation point")
    p.add_argument("--rows", help="comma-separated subset of: " + ", ".join(r.label for r in ROWS))
    args = parse(p, argv)
    for name, default in zip(("seeds", "fom_steps", "test_tasks", "fractions"), SIZES[args.size]):
        setattr(args, name, getattr(args, name, None) or default)
    rows = choose(p, "--rows", args.rows, {r.label: r for r in ROWS}) if args.rows else ROWS
    with torch_threads(args.threads):
        return run(args, rows)


def run(args, rows: Sequence[Row]) -> Dict[str, Any]:
    """The study for parsed ``args``."""
    by_class = rotated_digits()
    train_classes, test_classes = classes_of(TRAIN_DIGITS), classes_of(TEST_DIGITS)
    test = tasks(by_class, test_classes, args.test_tasks, args.query,
                 torch.Generator().manual_seed(TEST_SEED))

    def build():
        return problems.conv4(WAYS, track_running_stats=False, channels=args.channels)

    def evaluate(model: nn.Module, n: int) -> List[float]:
        accs = []
        for i in range(0, n, 100):
            xs, ys, xq, yq = (t[i:min(n, i + 100)] for t in test)
            with torch.no_grad():
                fmodel = torch_ufom.adapt_batch(model, xent, (xs, ys), steps=STEPS, inner_lr=args.inner_lr)
                accs += (fmodel(xq).argmax(-1) == yq).double().mean(1).tolist()
        return accs

    base0 = problems.seeded(args.seed, build)
    sample = problems.task_pairs(tasks(by_class, train_classes, {"full": 8, "quick": 3, "tiny": 2}[args.size],
                                       args.query, torch.Generator().manual_seed(args.seed + 1)))
    diag = diagnoses(base0, sample, args.inner_lr, args.seed)
    costs = calibrate(copy.deepcopy(base0), sample, args.inner_lr,
                      args.calibration if args.size == "full" else 1)
    c_f, c_x = authors_costs()
    budgets = {"evals": args.fom_steps * args.meta_batch * c_f,
               "time": args.fom_steps * args.meta_batch * costs["fom"][0]}
    u0, ur = costs["ufom"][0], costs["ufom"][STEPS]
    laws = {"evals": match_geometric([evals_cost(K) for K in range(STEPS + 1)],
                                     evals_cost(0) + 0.2 * (c_x - c_f)),
            "time": match_geometric(costs["ufom"], u0 + 0.2 * (ur - u0))}
    results: Dict[str, List[Dict[str, Any]]] = {r.label: [] for r in rows}
    jobs = [(s, r) for s in range(args.seed, args.seed + args.seeds) for r in rows]
    for seed, row in progress(jobs, "rows x seeds", not args.no_progress):
        model = problems.seeded(seed, build)

        def batch(k, seed=seed):
            g = torch.Generator().manual_seed(seed * 1_000_003 + k)
            return problems.task_pairs(tasks(by_class, train_classes, args.meta_batch, args.query, g))

        args.row_seed = seed
        results[row.label].append(train_row(row, model, laws, costs, budgets, args.fractions, batch,
                                            evaluate, args))
    summary = summarise(results, args.test_tasks)
    figure = plot_panels(f"{args.out}/{NAME}.png", curves(results, args.fractions, budgets), ncols=2,
                         title=f"1-shot 5-way rotated digits, conv4 ({args.channels} ch), r={STEPS}, "
                               f"{args.seeds} seed(s): equal compute")

    def cells(s, m):  # accuracy, paired differences to fom and exact, outer steps
        pairs = [s[m].get(f"vs_{ref}") for ref in ("fom", "exact")]
        return [f"{100 * s[m]['accuracy']:.1f}% +- {100 * s[m]['ci95']:.1f}",
                *("-" if p is None else "{:+.1f} +- {:.1f}".format(*(100 * v for v in p)) for p in pairs),
                f"{s[m]['outer_steps']:.0f}"]

    table = markdown_table(
        ["row", "accuracy @ evals budget", "- fom (paired)", "- exact (paired)", "steps", "exact",
         "accuracy @ time budget", "- fom (paired)", "- exact (paired)", "steps", "CPU at time budget",
         "q at end"],
        [[label, *cells(s, "evals"), f"{100 * s['exact_share']:.0f}%", *cells(s, "time"),
          f"{s['time']['cpu_s']:.1f} s", ", ".join("-" if q is None else f"{q:.2f}" for q in s["q_end"])]
         for label, s in summary.items()], "lrrrrrrrrrrl")
    diag_table = markdown_table(
        ["tasks", "r", "A", "D", "D / A", "s / fom task", "s / exact task", "steps fom", "steps exact",
         "q (ufom rule)", "q (authors rule)"],
        [[k, d["steps"], f"{d['A']:.4g}", f"{d['D']:.4g}", f"{d['D'] / d['A']:.3f}" if d["A"] else "-",
          f"{d['seconds_fom']:.4f}", f"{d['seconds_exact']:.4f}", f"{d['steps_fom']:.0f}",
          f"{d['steps_exact']:.0f}", f"{d['q_ufom']:.3f}", f"{d['q_authors']:.3f}"] for k, d in diag.items()],
        "lrrrrrrrrrr")
    fmt_law = lambda g: f"q = {g.q:.3f}, rho = {g.rho:.4f}"  # noqa: E731
    first = next(iter(summary.values()))
    fields = dict(vars(args), train=TRAIN_DIGITS, test=TEST_DIGITS, steps=STEPS, budget_time=budgets["time"],
                  seeds=list(range(args.seed, args.seed + args.seeds)), budget_evals=budgets["evals"],
                  c_f=c_f, c_x=c_x, t_fom=1e3 * costs["fom"][0], t_exact=1e3 * costs["exact"][0],
                  t_u0=1e3 * u0, t_ur=1e3 * ur, geo_evals=fmt_law(laws["evals"]),
                  geo_time=fmt_law(laws["time"]), ci_method=first["evals"]["ci_method"], table=table,
                  diag_tasks=len(sample), diag_table=diag_table)
    data = {"summary": summary, "runs": results, "budgets": budgets, "costs_cpu_s": costs,
            "evals_cost": [evals_cost(K) for K in range(STEPS + 1)],
            "geometric": {m: {"q": g.q, "rho": g.rho} for m, g in laws.items()},
            "diagnose": diag, "fractions": list(args.fractions),
            "config": {k: getattr(args, k) for k in ("seeds", "fom_steps", "test_tasks", "meta_batch",
                                                     "query", "channels", "inner_lr", "outer_lr", "seed")},
            "split": {"train_digits": TRAIN_DIGITS, "test_digits": TEST_DIGITS}}
    return write_report(args, NAME, TEMPLATE, fields, data, (), [figure])


if __name__ == "__main__":
    main()
