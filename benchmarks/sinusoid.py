"""MAML on sinusoid regression: torch_ufom (fom, ufom, exact) against higher and torchopt.

The few-shot regression of Finn et al. (2017) (:func:`benchmarks.problems.sinusoid_tasks`,
1-40-40-1 ReLU regressor), methods trained round-robin (:mod:`benchmarks.maml`);
the report states the sizes and defines its columns. ``--q-study`` (and the full
run) adds q = 0.05, 0.2, 1 and the authors' adaptive rule. float64 by default,
so that exact and higher follow the same trajectory to many digits and the 5%
target tests the library, not float32 rounding amplified by Adam.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

import torch_ufom
from benchmarks import maml, problems
from benchmarks.harness import (Target, first_below, fmt, markdown_table, mean_ci, parse, parser, plot_panels,
                                positive_float, positive_int, torch_threads, write_report)

NAME = "sinusoid"
TEST_SEED, GRAD_SEED = 20_170_703, 20_210_602  # the held-out and gradient tasks: fixed, independent of --seed
TARGET_VS_EXACT, EXACT_VS_HIGHER, UFOM_VS_EXACT = 0.10, 0.05, 0.10
# (iters, meta-batch, test tasks, eval every, gradient tasks) per size
SIZES = {"full": (10_000, 10, 500, 250, 500), "quick": (160, 10, 200, 20, 100), "tiny": (4, 2, 8, 2, 4)}
DTYPES = {"float64": torch.float64, "float32": torch.float32}

TEMPLATE = """# MAML on sinusoid regression (benchmarks/sinusoid.py)

Command: `{command}`

y = A sin(x - phi), A ~ U[0.1, 5], phi ~ U[0, pi], x ~ U[-5, 5]; {shots} support and {query} query points
per training task. MLP 1-40-40-1 (ReLU), {dtype}, device {device}, {threads} thread(s). Inner: {steps} SGD
steps at lr {inner_lr}. Outer: Adam lr {outer_lr}{decay} on the mean query MSE of {meta_batch} tasks,
{iters} outer steps; seed {seed} (the same weights and meta-batches for every method); torch_ufom's memory
schedule `{memory}`.

*meta-test MSE*: mean over {test_tasks} fixed held-out tasks (+- a 95% interval) of the MSE on
{test_query} query points after the same inner loop (plain torch.func). *Times*: training only, methods
round-robin; *time / higher*: {basis} time. *gap*: (MSE - reference) / reference. *exact branches*:
the share of tasks whose meta-gradient had second-order terms.

{table}

*|true grad|*: norm of the exact meta-gradient of the mean query MSE over {grad_tasks} fixed tasks
(plain torch.func), at every evaluation; *its floor*: the standard error of that mean over the tasks at
the last evaluation. *steps / time to target*: the first evaluation from which the meta-test MSE stays
below {target} until the end. The true gradient agrees with `torch_ufom.hypergrad(mode="exact")` over
{check_tasks} of its tasks at {check_method}'s final weights to {check_diff:.1e} (relative).

{q_table}
{skipped}"""


def summarise(hist: Sequence[maml.History], basis: str, target: Optional[float] = None) -> Dict[str, Dict]:
    """Per method: final numbers, ratios and gaps, q, the true-gradient norms and the time to ``target``."""
    out = {}
    for h in hist:
        norms, qs = [e[1] for e in h.extra], h.trainer.q_trace
        tail = qs[-max(1, len(qs) // 10):]
        n4 = max(1, len(norms) // 4)
        out[h.label] = {"final_mse": h.score[-1], "ci95": mean_ci(h.extra[-1][0].tolist())[1],
                        "best_mse": min(h.score), **maml.timing(h), "q_min": h.trainer.q_min,
                        "q_end": h.q_end,
                        "q_mean_tail": sum(tail) / len(tail) if tail else None,
                        "grad_start": norms[0], "grad_end": norms[-1], "grad_min": min(norms),
                        "grad_tail": sum(norms[-n4:]) / n4, "grad_se_end": h.extra[-1][2],
                        "grad_ratio": norms[-1] / norms[0] if norms[0] > 0 else None}
    ref = next((k for k in ("exact", "higher") if k in out), None)
    if target is None and ref is not None:
        target = (1 + TARGET_VS_EXACT) * out[ref]["final_mse"]
    for h in hist:
        r = out[h.label]
        for ref, key in (("higher", "vs_higher"), ("exact", "vs_exact")):
            r[key] = maml.relative_gap(r["final_mse"], out[ref]["final_mse"]) if ref in out else None
        r["time_ratio"] = r[f"{basis}_s"] / out["higher"][f"{basis}_s"] if "higher" in out else None
        i = None if target is None else first_below(h.score, target)
        r.update(target_mse=target, target_step=None if i is None else h.steps[i],
                 target_cpu_s=None if i is None else h.cpu[i], target_wall_s=None if i is None else h.wall[i])
    return out


def targets(summary: Dict[str, Dict]) -> List[Target]:
    """The project's targets for the rows that ran."""
    out = []
    if "exact" in summary and "higher" in summary:
        out.append(Target("|exact - higher| / higher, final meta-test MSE",
                          abs(summary["exact"]["vs_higher"]), EXACT_VS_HIGHER))
    for label, r in summary.items():
        if label.startswith("ufom q=") and "exact" in summary:
            out.append(Target(f"({label} - exact) / exact, final meta-test MSE", r["vs_exact"],
                              UFOM_VS_EXACT))
        if r["q_min"] is not None:
            out.append(Target(f"{label}: q at end", r["q_end"], (r["q_min"], 1.0), "in"))
    return out


def check_gradient(model, grad_set, steps: int, lr: float, tasks: int = 4) -> Dict[str, Any]:
    """The true outer gradient (plain torch.func) against ``torch_ufom.hypergrad(mode="exact")``
    averaged over the first ``tasks`` tasks of the gradient set, at ``model``'s weights."""
    k = min(tasks, grad_set[0].shape[0])
    xs, ys, xq, yq = (t[:k] for t in grad_set)
    ref = maml.meta_gradient(model, problems.pred_mse, xs, ys, xq, yq, steps=steps, lr=lr)
    per_task = [torch_ufom.hypergrad(model, problems.mse, problems.mse, (xs[i], ys[i]), (xq[i], yq[i]),
                                     steps=steps, inner_lr=lr, mode="exact") for i in range(k)]
    lib = {n: sum(g[j] for g in per_task) / k for j, (n, _) in enumerate(model.named_parameters())}
    diff = maml.grad_norm({n: lib[n] - ref[n] for n in ref})
    return {"tasks": k, "norm": maml.grad_norm(ref), "rel_diff": diff / max(maml.grad_norm(ref), 1e-300)}


def tables(summary: Dict[str, Dict], iters: int, basis: str):
    """The results table and the q / true-gradient / time-to-target table."""
    rows, qrows = [], []
    for label, r in summary.items():
        rows.append([label, f"{r['final_mse']:.4f} +- {r['ci95']:.4f}", f"{r['best_mse']:.4f}",
                     f"{r['wall_s']:.1f} s", f"{r['cpu_s']:.1f} s", f"{r['ms_per_step']:.1f}",
                     fmt(r["time_ratio"], ".2f"), fmt(r["vs_higher"], "+.2%"), fmt(r["vs_exact"], "+.2%"),
                     f"{100 * r['exact_share']:.0f}%"])
        qrows.append([label, fmt(r["q_end"], ".3f"), fmt(r["q_mean_tail"], ".3f"), f"{r['grad_start']:.4f}",
                      f"{r['grad_end']:.4f}", fmt(r["grad_ratio"], ".3f"), f"{r['grad_tail']:.4f}",
                      f"{r['grad_min']:.4f}", f"{r['grad_se_end']:.4f}",
                      fmt(r["target_step"], "d", "", "not reached"),
                      fmt(r[f"target_{basis}_s"], ".1f", " s")])
    return (markdown_table(["method", f"meta-test MSE after {iters} steps", "best MSE", "wall time",
                            "CPU time", "ms / outer step", f"{basis} time / higher", "gap vs higher",
                            "gap vs exact", "exact branches"], rows, "lrrrrrrrrr"),
            markdown_table(["method", "q at end", "mean q (last 10%)", "|true grad| at start",
                            "|true grad| at end", "end / start", "mean |true grad| (last 25% of evals)",
                            "lowest |true grad|", "its floor at end", "steps to target",
                            f"{basis} time to target"], qrows, "lrrrrrrrrrr"))


def plots(hist: Sequence[maml.History], out: str, title: str) -> List[str]:
    """Meta-test MSE against outer steps and training time; true-gradient norm and q against outer steps."""
    mse = {"ylabel": "meta-test MSE (after adaptation)", "logy": True}
    traces = {h.label: h.trainer.q_trace for h in hist if h.trainer.q_trace}
    qs = {label: (list(range(1, len(q) + 1)), q) for label, q in traces.items()}
    return [plot_panels(f"{out}/{NAME}.png", [
        {"series": {h.label: (h.steps, h.score) for h in hist}, "title": title, "xlabel": "outer steps",
         **mse},
        {"series": {h.label: (h.wall, h.score) for h in hist}, "title": title,
         "xlabel": "training wall time (s)", **mse},
        {"series": {h.label: (h.steps, [e[1] for e in h.extra]) for h in hist}, "logy": True,
         "title": "true outer-gradient norm (fixed tasks, exact)", "xlabel": "outer steps",
         "ylabel": "|true grad|"},
        {"series": qs, "title": "q of the ufom rows", "xlabel": "outer steps", "ylabel": "q used",
         "logy": True},
    ][:4 if qs else 3], ncols=2, panel_size=(7.0, 4.5))]


def parse_args(argv=None):
    """Parse the command line (see ``--help``)."""
    p = parser(NAME, __doc__, {"quick": "160 outer steps, 200 test tasks",
                               "tiny": "4 outer steps: a smoke test"})
    maml.add_args(p, SIZES, inner_lr=0.01, query=10)
    p.add_argument("--lr-decay", choices=("none", "cosine"), default="none",
                   help="outer learning-rate schedule, the same for every method (default none)")
    p.add_argument("--shots", type=positive_int, default=10, help="support points per task (default 10)")
    p.add_argument("--test-query", type=positive_int, default=100, help="query points per held-out task")
    p.add_argument("--methods", help="comma-separated: " + ", ".join(maml.BY_LABEL) + " (aliases: "
                   + ", ".join(maml.ALIASES) + "; default the first six, plus the q study in the full run)")
    p.add_argument("--q-study", action="store_true", help="add " + ", ".join(m.label for m in maml.Q_STUDY))
    p.add_argument("--grad-tasks", type=positive_int, help="fixed tasks of the true outer-gradient norm")
    p.add_argument("--target-mse", type=positive_float, help="default 1.1 x exact's final MSE")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float64", help="default float64")
    args = parse(p, argv)
    maml.sized(args, SIZES, evals=40)
    args.grad_tasks = args.grad_tasks or SIZES[args.size][4]
    args.test_query = min(args.test_query, 20) if args.size == "tiny" else args.test_query
    methods = args.methods or ",".join(m.label for m in maml.METHODS)
    if args.q_study or (args.methods is None and args.size == "full"):
        methods += "," + ",".join(m.label for m in maml.Q_STUDY)
    args.method_list = maml.parse_methods(methods, p, args.q)
    return args


def main(argv=None) -> Dict[str, Any]:
    """Train every method; write ``sinusoid.md``, ``sinusoid.json`` and ``sinusoid.png`` into ``--out``.

    Returns the JSON data: ``summary`` (per method), ``histories``,
    ``gradient_check``, ``skipped`` and ``targets``.
    """
    args = parse_args(argv)
    with torch_threads(args.threads):
        return run(args)


def run(args) -> Dict[str, Any]:
    """The benchmark for parsed ``args``."""
    dtype = DTYPES[args.dtype]
    methods, skipped = maml.split_available(args.method_list)
    test = problems.sinusoid_tasks(args.test_tasks, args.shots, args.test_query,
                                   torch.Generator().manual_seed(TEST_SEED), dtype, args.device)
    grad_set = problems.sinusoid_tasks(args.grad_tasks, args.shots, args.query,
                                       torch.Generator().manual_seed(GRAD_SEED), dtype, args.device)

    def evaluate(model):
        per_task = maml.adapt_and_score(model, problems.pred_mse, problems.pred_mse, *test, steps=args.steps,
                                        lr=args.inner_lr)
        g, se = maml.meta_gradient(model, problems.pred_mse, *grad_set, steps=args.steps, lr=args.inner_lr,
                                   return_se=True)
        return float(per_task.mean()), (per_task.cpu(), maml.grad_norm(g), se)

    def batch(k):
        return problems.task_pairs(problems.sinusoid_tasks(
            args.meta_batch, args.shots, args.query, torch.Generator().manual_seed(args.seed * 1_000_003 + k),
            dtype, args.device))

    base = problems.seeded(args.seed, problems.sinusoid_mlp, dtype, args.device)
    trainers, hist = maml.train(args, methods, base, problems.mse, batch, evaluate,
                                maml.cosine_decay(args.iters) if args.lr_decay == "cosine" else None)
    check = check_gradient(trainers[0].model, grad_set, args.steps, args.inner_lr)
    summary = summarise(hist, args.basis, args.target_mse)
    title = (f"sinusoid MAML: {args.steps} inner steps, meta-batch {args.meta_batch}, {args.dtype}, "
             f"seed {args.seed}")
    table, q_table = tables(summary, args.iters, args.basis)
    target = next((r["target_mse"] for r in summary.values()), None)
    fields = dict(vars(args), decay=" (cosine decay to 0, every method)" if args.lr_decay == "cosine" else "",
                  table=table, q_table=q_table, target=fmt(target, ".4f"),
                  check_tasks=check["tasks"], check_method=trainers[0].method.label,
                  check_diff=check["rel_diff"], skipped="".join(f"\nNote: {s}" for s in skipped))
    histories = {h.label: {"steps": h.steps, "wall_s": h.wall, "cpu_s": h.cpu, "mse": h.score,
                           "grad_norm": [e[1] for e in h.extra], "grad_se": [e[2] for e in h.extra],
                           "q": h.trainer.q_trace} for h in hist}
    return write_report(args, NAME, TEMPLATE, fields, {"summary": summary, "histories": histories,
                                                       "gradient_check": check, "skipped": skipped,
                                                       "iters": args.iters},
                        targets(summary), plots(hist, args.out, title))


if __name__ == "__main__":
    main()
