"""Time per outer step against the number of inner steps, for every mode and memory setting.

One *outer step* is one task's meta-gradient, as in :mod:`benchmarks.memory`
(whose rows and timing worker this benchmark reuses), on two models: ``mlp``
(64-320-320-10, random batches of 64, cross-entropy) and ``sinusoid``
(1-40-40-1, one task of 10 + 10 points, MSE); inner lr 0.01, float32.

Rows, for each model and ``steps``: ``fom`` (its first-order steps bypass the
memory schedule, so one row), ``ufom`` (q = 0.1) and ``exact`` with
``memory="checkpoint"``, ``"store"`` and ``"recompute"`` (skipped beyond
``--max-replay`` replayed steps), ``higher``'s exact unroll, and two
micro-benchmarks for the floor: ``t_grad`` (one inner gradient) and ``t_hvp``
(one double-backward HVP). Ratios against ``fom``, against ``higher`` and
against the floor ``steps t_grad + K t_hvp`` (``K = steps`` for exact and
higher, ``q steps`` for ufom, 0 for fom).

Every (model, steps) is timed in a fresh process, all rows round-robin;
``fom`` and ``ufom`` run several calls per round and ``ufom`` draws until three
draws took the exact branch (its time is the expectation, see
:mod:`benchmarks.memory`). Target: ``ufom`` (q = 0.1, checkpoint) at most 1.6x
``fom`` at ``steps = 100`` on the mlp. The report then adds the sections of
:mod:`benchmarks.throughput` (sinusoid and conv4 meta-batches, HVPs), measured
in a fresh process of their own.
"""
from __future__ import annotations

from typing import Any, Dict

from benchmarks import memory, throughput
from benchmarks.harness import (Target, fmt, markdown_table, parse, parser, plot_panels, positive_int,
                                progress, run_fresh, spread, stats, worker_args, write_report)

NAME = "speed"
MODELS = ("mlp", "sinusoid")
TARGET_STEPS, UFOM_VS_FOM = 100, 1.6
# (steps, rounds, min seconds per steps value, max replay, models) per size
SIZES = {"full": ([10, 30, 100], 7, 5.0, 50_000, list(MODELS)),
         "quick": ([10, 30, 100], 5, 1.0, 1_000, ["mlp"]),
         "tiny": ([2, 4], 1, 0.0, 1_000, ["sinusoid"])}

TEMPLATE = """# Time per outer step against inner steps (benchmarks/speed.py)

Command: `{command}`

Device {device}, torch {torch}, {threads} thread(s); seed {seed}; inner SGD lr {lr}; float32. Medians over
{rounds} round-robin rounds (spread: half the inter-quartile range); ratios use {basis} time. (E): ufom's
expectation (1-q) x median first-order draw + q x median exact draw. *floor* = steps x t_grad + K x t_hvp
with K = steps (exact, higher), q x steps (ufom), 0 (fom); *inner fwd / rev*: inner steps run without /
with a graph in one outer step (ufom: first-order draw or exact draw).

{tables}
{notes}"""


def analyse(raw: Dict[str, Dict], basis: str) -> Dict[str, Any]:
    """Per ``"model/steps"``: the micro-benchmarks and every row's times and ratios."""
    out = {}
    for key, got in raw.items():
        steps = int(key.split("/")[1])
        micro = {k: stats(got[k]["times"])[basis] for k in ("t_grad", "t_hvp")}
        rows = {r: memory.summarise(r, steps, v) for r, v in got.items() if r not in micro}
        fom, hig = rows["fom/checkpoint"][basis], rows.get("higher/-", {}).get(basis)
        for r, s in rows.items():
            k = {"fom": 0.0, "ufom": memory.Q * steps}.get(r.split("/")[0], float(steps))
            s["floor"] = steps * micro["t_grad"] + k * micro["t_hvp"]
            s.update(vs_floor=s[basis] / s["floor"], vs_fom=s[basis] / fom, vs_higher=hig and s[basis] / hig)
        out[key] = {"micro": micro, "rows": rows}
    return out


def main(argv=None) -> Dict[str, Any]:
    """Time every (model, steps) in a fresh process, then the throughput sections; write the report."""
    p = parser(NAME, __doc__, {"quick": "mlp only, 5 rounds, --max-replay 1000",
                               "tiny": "sinusoid, steps 2 4, one round (a smoke test)"})
    p.add_argument("--steps", type=positive_int, nargs="+", help="inner steps (default 10 30 100)")
    p.add_argument("--models", nargs="+", choices=MODELS, help="default both; --quick: mlp")
    p.add_argument("--rounds", type=positive_int, help="timing rounds, at least (default 7; --quick 5)")
    p.add_argument("--max-replay", type=positive_int, help="skip recompute rows replaying more inner steps")
    args = parse(p, argv)
    steps_list, rounds, min_seconds, max_replay, models = SIZES[args.size]
    steps_list = sorted(set(args.steps or steps_list))
    rounds, models = args.rounds or rounds, list(dict.fromkeys(args.models or models))
    raw, notes = {}, []
    for model, steps in progress([(m, s) for m in models for s in steps_list], NAME, not args.no_progress):
        rows, skipped = memory.rows_for(steps, args.max_replay or max_replay, ("ufom", "exact", "higher"),
                                        ("checkpoint", "store", "recompute"))
        notes += [f"{model}: {n}" for n in skipped]
        raw[f"{model}/{steps}"] = run_fresh("benchmarks.memory", worker_args(dict(
            task="times", model=model, rows=["fom/checkpoint"] + rows, steps=steps, rounds=rounds,
            seed=args.seed, device=args.device, threads=args.threads, min_exact=3, micro=True,
            min_seconds=min_seconds)))
    tp = run_fresh("benchmarks.throughput", ["--json", "--seed", str(args.seed), "--device", args.device,
                                             "--threads", str(args.threads)]
                   + ([] if args.size == "full" else [f"--{args.size}"]))
    basis, results = args.basis, analyse(raw, args.basis)
    tables, panels = [], []
    for model in models:
        keys = [k for k in results if k.startswith(model + "/")]
        table = []
        for k in keys:
            steps, res = k.split("/")[1], results[k]
            for r, s in res["rows"].items():
                e = " (E)" if s.get("expected") else ""
                table.append([r, steps, f"{s['wall']:.4g}{e}", f"{s['cpu']:.4g}{e}", spread(s, basis),
                              fmt(s["vs_fom"], ".2f", "x"), fmt(s["vs_higher"], ".2f", "x", "n/a"),
                              f"{s['floor']:.4g}", fmt(s["vs_floor"], ".2f", "x"), s.get("inner", "-")])
        micro = [[k.split("/")[1], f"{results[k]['micro']['t_grad'] * 1e3:.3f}",
                  f"{results[k]['micro']['t_hvp'] * 1e3:.3f}"] for k in keys]
        tables += [f"## {model}", "", markdown_table(
            ["row", "steps", "wall (s)", "CPU (s)", "spread", "/ fom", "/ higher", "floor (s)", "/ floor",
             "inner fwd / rev"], table, "lrrrrrrrrl"), "",
            f"Micro-benchmarks ({model}, {basis} time, medians):", "",
            markdown_table(["steps (run)", "t_grad (ms)", "t_hvp (ms)"], micro, "rrr"), ""]
        names = sorted({r for k in keys for r in results[k]["rows"]})
        xs = [int(k.split("/")[1]) for k in keys]
        names = sorted({r for k in keys for r in results[k]["rows"]})

        def points(row, key):
            got = [(int(k.split("/")[1]), results[k]["rows"][row][key])
                   for k in keys if row in results[k]["rows"]]
            return [x for x, _ in got], [y for _, y in got]
        xs = [int(k.split("/")[1]) for k in keys]
        series = {r: points(r, basis) for r in names}
        series["floor r (t_grad + t_hvp)"] = (xs, [x * sum(results[k]["micro"].values())
                                                   for x, k in zip(xs, keys)])
        styles = {r: {"store": "--", "recompute": ":", "-": "-."}.get(r.split("/")[1], "-") for r in names}
        panels += [{"series": series, "title": model, "xlabel": "inner steps", "logx": True, "logy": True,
                    "ylabel": f"{basis} time per outer step (s)", "styles": styles},
                   {"series": {r: points(r, "vs_fom") for r in names}, "title": f"{model}: time / fom",
                    "styles": styles,
                    "xlabel": "inner steps", "ylabel": "time / fom", "logx": True, "logy": True,
                    "hlines": {f"target ufom <= {UFOM_VS_FOM}x fom": UFOM_VS_FOM}}]
    u = results.get(f"mlp/{TARGET_STEPS}", {}).get("rows", {}).get("ufom/checkpoint")
    target = Target(f"ufom/checkpoint {basis} time / fom at steps={TARGET_STEPS} (mlp)",
                    u and u["vs_fom"], UFOM_VS_FOM)
    figure = plot_panels(f"{args.out}/{NAME}.png", panels, ncols=2)
    tp_text, tp_data = throughput.report(tp, basis, args.threads), throughput.analyse(tp, basis)
    data = {"results": results, "notes": notes, "raw": raw, "throughput_raw": tp,
            "throughput": {k: v for k, v in tp_data.items() if k != "targets"}}
    return write_report(args, NAME, TEMPLATE + "\n" + tp_text.replace("{", "{{").replace("}", "}}"),
                        dict(seed=args.seed, lr=memory.INNER_LR, rounds=rounds, basis=basis,
                             tables="\n".join(tables), notes="".join(f"\n- {n}" for n in notes)),
                        data, [target] + tp_data["targets"], [figure])


if __name__ == "__main__":
    main()

