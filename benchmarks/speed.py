"""Time per outer step against the number of inner steps, for every mode and memory setting.

``python -m benchmarks.speed [--quick | --tiny]``; the report defines the rows, columns and targets
(issue 13's items 1 and 2). The rows of :mod:`benchmarks.memory` (whose timing worker this reuses) on
the ``mlp``, ``sinusoid`` and ``conv4`` models, each (model, steps) in a fresh (forked) process, plus
the micro-benchmarks ``t_grad`` and ``t_hvp``; the report then adds :mod:`benchmarks.throughput`'s
sections, measured in a process of their own.
"""
from __future__ import annotations

from typing import Any, Dict

from benchmarks import memory, throughput
from benchmarks.harness import (Target, fmt, markdown_table, paired_ratio, parse, parser, plot_panels,
                                positive_int, run_fresh, spread, stats, worker_args, write_report)

NAME = "speed"
MODELS = ("mlp", "sinusoid")
# Issue 13's targets: item 1, fom / inplace at (model, steps) ("conv4": its own steps, below);
# item 2, exact/store / higher at these steps on both models.
FOM_VS_INPLACE = {("sinusoid", 100): 1.15, ("sinusoid", 5): 1.6, ("mlp", 100): 1.10, ("conv4", None): 1.05}
EXACT_VS_HIGHER, EXACT_STEPS = 0.90, (20, 100)
CONV4_TARGET_STEPS = (100, 20)  # conv4's item 1 is evaluated at the full and --quick sizes only
# (steps per model, rounds, min seconds per steps value, max replay, conv4 steps) per size; the mlp
# skips steps 5, which no target needs
STEPS = {"mlp": [20, 100], "sinusoid": [5, 20, 100]}
SIZES = {"full": (STEPS, 7, 5.0, 50_000, 100), "quick": (STEPS, 5, 1.0, 1_000, 20),
         "tiny": ({"sinusoid": [2, 4]}, 1, 0.0, 1_000, 1)}

TEMPLATE = """# Time per outer step against inner steps (benchmarks/speed.py)

Command: `{command}`

Device {device}, torch {torch}, {threads} thread(s); seed {seed}; inner SGD lr {lr}; float32. Medians over
at least {rounds} round-robin rounds (more until {min_seconds} s had passed for each number of steps;
the rows' `n` in speed.json counts the calls), each calling the rows call by call in alternating order
(A B, B A, ...; spread: half the inter-quartile range); ratios use {basis} time: the median of the two
rows' ratios call by call (calls that ran next to each other share their moment's load; rows with different
calls per round: the rounds' medians), except for (E): ufom's expectation (1-q) x median
first-order draw + q x median exact draw, a ratio of medians (its first-order draws those of the
rounds, its exact draws those of the rounds and of extra rounds interleaving `ufom` with `fom` until
it drew {min_exact}; the spread: its first-order draws'). `exact/store` and `higher` run 3
calls per round; `inplace`, `fom` and `ufom` {draws}. The timing processes keep
freed memory (glibc: no heap trimming), so that no row pays page
faults for memory an earlier call gave back. *inplace*: issue 13's hand-written
first-order loop (deep copy, autograd.grad, p.add_ under no_grad); *unroll*: a hand-written exact unroll
(functional_call, autograd.grad with create_graph, p.add(g, alpha=-lr), one backward at the end: the
exact rows' floor); *floor*: the micro-benchmarks' arithmetic per outer step, each inner step one
t_grad (first-order) or one t_hvp (an exact step: its forward, the gradient with a graph and, in the
sweep, the backward through it), then t_grad for the query: (steps + 1) x t_grad (fom, inplace),
steps x t_hvp + t_grad (exact, higher, unroll), the expectation over ufom's draws (1 - q) x steps x t_grad
+ q x steps x t_hvp + t_grad (ufom); *inner fwd / rev*: inner steps run without /
with a graph in one outer step (ufom: first-order draw or exact draw).

{tables}
{notes}"""


def floor(method: str, steps: int, t_grad: float, t_hvp: float) -> float:
    """The arithmetic of one outer step of ``method`` from the micro-benchmarks: each inner step one
    ``t_grad`` (first-order) or one ``t_hvp`` (exact: ``t_hvp`` times a forward, a gradient with a graph
    and a backward through it, what an exact step costs in the forward and the reverse sweep
    together), then one ``t_grad`` for the query's gradient; ``ufom``: the expectation over its draws."""
    exact = {"fom": 0.0, "inplace": 0.0, "ufom": memory.Q}.get(method, 1.0)
    return steps * ((1 - exact) * t_grad + exact * t_hvp) + t_grad


def analyse(raw: Dict[str, Dict], basis: str) -> Dict[str, Any]:
    """Per ``"model/steps"``: the micro-benchmarks (where run) and every row's times and ratios."""
    out = {}
    for key, got in raw.items():
        steps = int(key.split("/")[1])
        micro = {k: stats(got[k]["times"])[basis] for k in ("t_grad", "t_hvp") if k in got}
        rows = {r: memory.summarise(r, steps, v) for r, v in got.items() if r not in micro}
        bases = {"vs_fom": "fom/-", "vs_inplace": "inplace/-", "vs_higher": "higher/-",
                 "vs_unroll": "unroll/-"}
        for r, s in rows.items():
            if micro:
                s["floor"] = floor(r.split("/")[0], steps, micro["t_grad"], micro["t_hvp"])
                s["vs_floor"] = s[basis] / s["floor"]
            for name, base in bases.items():
                if base not in rows:
                    s[name] = None
                elif r.startswith("ufom/"):  # an expectation over draws: the ratio of medians
                    s[name] = s[basis] / rows[base][basis]
                else:  # rows timed in the same rounds: the median of the per-round ratios
                    s[name], *s[f"{name}_iqr"] = paired_ratio(got[r], got[base], basis)
        out[key] = {"micro": micro, "rows": rows}
    return out


def targets(results: Dict[str, Any], basis: str, conv4_steps: int) -> list:
    """Issue 13's items 1 and 2."""
    def target(name, key, row, vs, limit):
        s = results.get(key, {}).get("rows", {}).get(row, {})
        iqr = s.get(f"{vs}_iqr")
        rounds = f", pairs' quartiles {iqr[0]:.3f}-{iqr[1]:.3f}" if iqr else ""
        return Target(f"{name} ({key}{rounds})", s.get(vs), limit)
    out = []
    for (model, steps), limit in FOM_VS_INPLACE.items():
        if steps is None and conv4_steps not in CONV4_TARGET_STEPS:  # (review s32K F1: --tiny's r=1)
            out.append(Target(f"item 1: fom {basis} time / inplace (conv4 at r=100, --quick: 20; ran "
                              f"{conv4_steps})", None, limit))
            continue
        out.append(target(f"item 1: fom {basis} time / inplace", f"{model}/{steps or conv4_steps}", "fom/-",
                          "vs_inplace", limit))
    for model in ("sinusoid", "mlp"):
        for steps in EXACT_STEPS:
            out.append(target(f"item 2: exact/store {basis} time / higher", f"{model}/{steps}", "exact/store",
                              "vs_higher", EXACT_VS_HIGHER))
    return out


def table(results: Dict[str, Any], keys, basis: str) -> str:
    """One model's rows at every steps value."""
    out = []
    for k in keys:
        steps = k.split("/")[1]
        for r, s in results[k]["rows"].items():
            e = " (E)" if s.get("expected") else ""
            out.append([r, steps, f"{s['wall']:.4g}{e}", f"{s['cpu']:.4g}{e}", spread(s, basis),
                        fmt(s["vs_fom"], ".2f", "x"), fmt(s["vs_inplace"], ".2f", "x"),
                        fmt(s["vs_higher"], ".2f", "x", "n/a"), fmt(s.get("vs_unroll"), ".2f", "x", "n/a"),
                        fmt(s.get("floor"), ".4g"), fmt(s.get("vs_floor"), ".2f", "x"), s.get("inner", "-")])
    return markdown_table(["row", "steps", "wall (s)", "CPU (s)", "spread", "/ fom", "/ inplace", "/ higher",
                           "/ unroll", "floor (s)", "/ floor", "inner fwd / rev"], out, "lrrrrrrrrrrl")


def panels_for(model: str, results: Dict[str, Any], keys, basis: str) -> list:
    """Time and time / fom against steps for one model."""
    names = sorted({r for k in keys for r in results[k]["rows"]})

    def points(row, key):
        got = [(int(k.split("/")[1]), results[k]["rows"][row][key])
               for k in keys if row in results[k]["rows"]]
        return [x for x, _ in got], [y for _, y in got]
    xs = [int(k.split("/")[1]) for k in keys]
    series = {r: points(r, basis) for r in names}
    series["exact floor r t_hvp + t_grad"] = (xs, [floor("exact", x, *(results[k]["micro"][t] for t in
                                                                        ("t_grad", "t_hvp")))
                                                   for x, k in zip(xs, keys)])
    styles = {r: {"store": "--", "recompute": ":", "-": "-."}.get(r.split("/")[1], "-") for r in names}
    return [{"series": series, "title": model, "xlabel": "inner steps", "logx": True, "logy": True,
             "ylabel": f"{basis} time per outer step (s)", "styles": styles},
            {"series": {r: points(r, "vs_fom") for r in names}, "title": f"{model}: time / fom",
             "styles": styles, "xlabel": "inner steps", "ylabel": "time / fom", "logx": True, "logy": True}]


def main(argv=None) -> Dict[str, Any]:
    """Time every (model, steps) in a fresh process, then the throughput sections; write the report."""
    p = parser(NAME, __doc__, {"quick": "5 rounds, --max-replay 1000, conv4 at 20 steps",
                               "tiny": "sinusoid, steps 2 4, conv4 at 1 step, one round (a smoke test)"})
    p.add_argument("--steps", type=positive_int, nargs="+",
                   help="inner steps for every model (default: mlp 20 100, sinusoid 5 20 100)")
    p.add_argument("--models", nargs="+", choices=MODELS, help="default both; --tiny: sinusoid")
    p.add_argument("--rounds", type=positive_int, help="timing rounds, at least (default 7; --quick 5)")
    p.add_argument("--max-replay", type=positive_int, help="skip recompute rows replaying more inner steps")
    p.add_argument("--conv4-steps", type=positive_int, help="conv4's inner steps (default 100; --quick 20)")
    args = parse(p, argv)
    steps, rounds, min_seconds, max_replay, conv4_steps = SIZES[args.size]
    models = list(dict.fromkeys(args.models or steps))
    steps = {m: sorted(set(args.steps or steps.get(m, STEPS[m]))) for m in models}
    rounds = args.rounds or rounds
    conv4_steps = args.conv4_steps or conv4_steps
    common = dict(rounds=rounds, seed=args.seed, device=args.device, threads=args.threads,
                  min_exact=memory.MIN_EXACT,
                  min_seconds=min_seconds)
    notes, jobs = [], []
    for model, n in [(m, n) for m in models for n in steps[m]] + [("conv4", conv4_steps)]:
        rows, micro = ["inplace/-", "fom/-"], model != "conv4"
        if micro:
            more, skipped = memory.rows_for(n, args.max_replay or max_replay, ("ufom", "exact", "higher",
                                                                                "unroll"))
            rows += more
            notes += [f"{model}: {x}" for x in skipped]
        jobs.append(dict(task="times", model=model, rows=rows, steps=n, micro=micro,
                         repeat=("exact/store", "higher/-"), **common))
    # each (model, steps) in its own child of one worker process (memory.run_jobs), one after the other
    got = run_fresh("benchmarks.memory", worker_args({"jobs": jobs}))
    raw = {f"{j['model']}/{j['steps']}": g for j, g in zip(jobs, got)}
    tp = run_fresh("benchmarks.throughput", ["--json", "--seed", str(args.seed), "--device", args.device,
                                             "--threads", str(args.threads)]
                   + ([] if args.size == "full" else [f"--{args.size}"]))
    basis, results = args.basis, analyse(raw, args.basis)
    tables, panels = [], []
    for model in models + ["conv4"]:
        keys = [k for k in results if k.startswith(model + "/")]
        tables += [f"## {model}", "", table(results, keys, basis), ""]
        if model == "conv4":
            continue
        micro = [[k.split("/")[1], f"{results[k]['micro']['t_grad'] * 1e3:.3f}",
                  f"{results[k]['micro']['t_hvp'] * 1e3:.3f}"] for k in keys]
        tables += [f"Micro-benchmarks ({model}, {basis} time, medians):", "",
                   markdown_table(["steps (run)", "t_grad (ms)", "t_hvp (ms)"], micro, "rrr"), ""]
        panels += panels_for(model, results, keys, basis)
    figure = plot_panels(f"{args.out}/{NAME}.png", panels, ncols=2)
    tp_text, tp_data = throughput.report(tp, basis, args.threads), throughput.analyse(tp, basis)
    data = {"results": results, "notes": notes, "raw": raw, "throughput_raw": tp, "conv4_steps": conv4_steps,
            "throughput": {k: v for k, v in tp_data.items() if k != "targets"}}
    return write_report(args, NAME, TEMPLATE + "\n" + tp_text.replace("{", "{{").replace("}", "}}"),
                        dict(seed=args.seed, lr=memory.INNER_LR, rounds=rounds, basis=basis,
                             min_seconds=min_seconds,
                             draws=-(-memory.UFOM_DRAWS // rounds), min_exact=memory.MIN_EXACT,
                             tables="\n".join(tables), notes="".join(f"\n- {n}" for n in notes)),
                        data, targets(results, basis, conv4_steps) + tp_data["targets"], [figure])


if __name__ == "__main__":
    main()
