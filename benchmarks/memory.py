"""Peak memory and time per outer step of torch_ufom against ``higher`` and a plain loop.

One *outer step* is one task's meta-gradient: ``steps`` inner SGD steps (lr
0.01) from the model's parameters on a support batch, then the gradient of the
outer loss at the adapted parameters w.r.t. the initial parameters; no outer
update is timed. The model is the MLP 64-320-320-10 of
:mod:`benchmarks.problems` (float32), with one support and one query batch of
64 random inputs and labels, cross-entropy for both losses.

Rows: ``fom``, ``ufom`` (q = 0.1) and ``exact`` through
:class:`torch_ufom.MetaOptimizer` with ``memory="checkpoint"`` (the default),
``"recompute"`` and ``"store"``; ``higher``'s exact unroll
(``innerloop_ctx``); ``plain``, a hand-written first-order loop, the floor of
``fom``. ``recompute`` rows whose exact sweep replays more than
``--max-replay`` inner steps (``steps (steps - 1) / 2``) are skipped.

How it measures: the times of all rows with the same ``steps`` come from one
fresh process, round-robin (:func:`benchmarks.harness.interleave`), medians
over the rounds. ``ufom`` draws its truncation point from a generator seeded
``--seed``, several draws per round and more until ``MIN_EXACT`` took the exact
branch; its time is the expectation ``(1 - q) median(first-order draws) + q
median(exact draws)``. The peak memory of every row comes from its own fresh
process (two at a time: each peak is its own process's), one outer step under
:class:`benchmarks.harness.PeakMemory` after a warm-up at ``steps=1``; ``ufom``
draws until the exact branch, so its peak is that branch's.

The module's :func:`outer_step` and :func:`time_rows` also serve :mod:`benchmarks.speed`.
"""
from __future__ import annotations

import importlib.util
import json
import statistics
from typing import Any, Callable, Dict, List, Sequence

import torch
from torch.func import functional_call

import torch_ufom
from benchmarks import problems
from benchmarks.harness import (MB, PeakMemory, Target, fmt, interleave, markdown_table, parse, parser,
                                positive_int, run_fresh, run_fresh_many, spread, stats, torch_threads,
                                worker_args, write_report, clock)

NAME = "memory"
INNER_LR, Q = 0.01, 0.1
MODES, MEMORIES = ("fom", "ufom", "exact"), ("checkpoint", "recompute", "store")
UFOM_DRAWS, MAX_DRAWS = 20, 200  # ufom draws per row in the rounds, at least; in all, at most
TARGETS_AT = 100
# (steps, rounds, max replay) per size
SIZES = {"full": ([10, 100, 1000], 7, 50_000), "quick": ([10, 100], 5, 1_000), "tiny": ([2], 1, 1_000)}

TEMPLATE = """# Peak memory and time per outer step (benchmarks/memory.py)

Command: `{command}`

Device {device}, torch {torch}, {threads} thread(s). MLP {widths} ({params:,} parameters), batch 64,
inner SGD lr {lr}, float32, seed {seed}. Times: medians over {rounds} round-robin rounds of all rows
with the same steps in one process (spread: half the inter-quartile range); `ufom`: the expectation
(1-q) x median first-order draw + q x median exact draw (E). Ratios use {basis} time. Peak memory: one
outer step per row in a fresh process, above the memory in use just before it. *inner steps fwd /
rev*: inner steps run without / with a graph in that outer step.

{table}
{notes}"""


# -- one outer step per row ----------------------------------------------------------------
def problem(name: str, seed: int, device: str):
    """``(model, loss, support, query)``: ``"mlp"`` (64-320-320-10, random batches of 64, cross-entropy)
    or ``"sinusoid"`` (1-40-40-1, one task of 10 + 10 points, MSE); float32, seeded."""
    gen = torch.Generator().manual_seed(seed)
    if name == "mlp":
        model = problems.seeded(seed, lambda: problems.mlp(*problems.MLP_WIDTHS), device=device)
        return (model, problems.xent, problems.random_batch(gen, device=device),
                problems.random_batch(gen, device=device))
    if name == "sinusoid":
        model = problems.seeded(seed, problems.sinusoid_mlp, device=device)
        xs, ys, xq, yq = problems.sinusoid_tasks(1, 10, 10, gen, torch.float32, device)
        return model, problems.mse, (xs[0], ys[0]), (xq[0], yq[0])
    raise ValueError(f"Invalid model: {name!r} (expected 'mlp' or 'sinusoid')")


def outer_step(method: str, memory: str, steps: int, prob, generator=None) -> Callable[[], Any]:
    """A function running one outer step of ``method`` (a mode, ``"higher"`` or ``"plain"``) on ``prob``.

    torch_ufom modes return the :class:`~torch_ufom.MetaResult` of ``MetaOptimizer.backward``.
    """
    model, loss, support, query = prob
    params = list(model.parameters())
    if method in MODES:
        meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(params, lr=0.1), inner_lr=INNER_LR,
                                        steps=steps, mode=method, q=Q, memory=memory, generator=generator)

        def step():
            meta.zero_grad()
            return meta.backward(loss, loss, support, query)
        return step
    if method == "higher":
        import higher
        inner = torch.optim.SGD(params, lr=INNER_LR)

        def step():
            with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(loss(fmodel, support))
                return torch.autograd.grad(loss(fmodel, query), params)
        return step
    if method == "plain":
        names = [n for n, _ in model.named_parameters()]

        def step():
            phi = [p.detach().requires_grad_() for p in params]

            def fmodel(x):
                return functional_call(model, dict(zip(names, phi)), (x,))
            for _ in range(steps):
                grads = torch.autograd.grad(loss(fmodel, support), phi)
                with torch.no_grad():
                    phi = [p - INNER_LR * g for p, g in zip(phi, grads)]
                phi = [p.requires_grad_() for p in phi]
            return torch.autograd.grad(loss(fmodel, query), phi)
        return step
    raise ValueError(f"Invalid method: {method!r}")


def micro_rows(prob, seed: int) -> Dict[str, Callable[[], Any]]:
    """``t_grad`` (one inner gradient) and ``t_hvp`` (one double-backward HVP) on ``prob``'s support batch."""
    model, loss, support, _ = prob
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(seed + 1)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params]

    def t_grad():
        return torch.autograd.grad(loss(model, support), params)

    def t_hvp():
        return torch.autograd.grad(torch.autograd.grad(loss(model, support), params, create_graph=True),
                                   params, v)
    return {"t_grad": t_grad, "t_hvp": t_hvp}


def time_rows(model: str, rows: Sequence[str], steps: int, rounds: int, seed: int, device: str,
              threads: int, min_exact: int = 1, micro: bool = False, min_seconds: float = 0.0) -> Dict:
    """Time ``rows`` (``"method/memory"``) at ``steps`` round-robin in this process.

    Each row gets a warm-up at ``steps=1``. ``ufom`` rows and their reference
    ``fom/checkpoint`` run ``ceil(UFOM_DRAWS / rounds)`` calls per round (so the
    two sample the load over similar stretches); ``ufom`` then draws alone until
    ``min_exact`` draws took the exact branch and one did not (at most
    ``MAX_DRAWS``). With ``micro``, ``t_grad`` and ``t_hvp`` join the rounds.
    Returns ``{row: {"times": [[wall, cpu], ...], "truncations", "fwd", "rev"}}``.
    """
    with torch_threads(threads):
        prob = problem(model, seed, device)
        fns, out = {}, {}
        for row in rows:
            method, memory = row.split("/")
            outer_step(method, memory, 1, prob)()
            gen = torch.Generator(device=device).manual_seed(seed) if method == "ufom" else None
            out[row] = log = {"truncations": [], "fwd": [], "rev": []}
            fns[row] = _logged(outer_step(method, memory, steps, prob, gen), log)
        tiny = micro_rows(prob, seed) if micro else {}
        for fn in tiny.values():
            fn()
        draws = -(-UFOM_DRAWS // rounds)
        per_round = {r: draws for r in fns if r.startswith("ufom/") or r == "fom/checkpoint"}
        times = interleave({**fns, **tiny}, rounds, device, per_round, {k: 5 for k in tiny}, min_seconds)
        for row, ts in times.items():
            if row in tiny:
                out[row] = {"times": [list(s) for s in ts]}
                continue
            ks = out[row]["truncations"]
            while (row.startswith("ufom/") and len(ks) < MAX_DRAWS
                   and (ks.count(steps) < min_exact or 0 not in ks)):
                ts.append(clock(fns[row], device))
            out[row]["times"] = [list(s) for s in ts]
    return out


def _logged(step, log):
    def run():
        res = step()
        if isinstance(res, torch_ufom.MetaResult):
            log["truncations"].append(res.truncation)
            log["fwd"].append(res.forward_steps)
            log["rev"].append(res.reverse_steps)
    return run


def summarise(row: str, steps: int, r: Dict) -> Dict[str, Any]:
    """A row's time per outer step from its samples: medians (``ufom``: the expectation, see the
    module docstring, with ``raw_wall``/``raw_cpu`` the plain means) and the inner step counts."""
    s = stats(r["times"])
    ks = r.get("truncations", [])
    if row.startswith("ufom/"):
        for i, c in enumerate(("wall", "cpu")):
            fo = [t[i] for t, k in zip(r["times"], ks) if k == 0]
            ex = [t[i] for t, k in zip(r["times"], ks) if k == steps]
            s[f"raw_{c}"] = statistics.fmean(t[i] for t in r["times"])
            if fo and ex:
                s[c] = (1 - Q) * statistics.median(fo) + Q * statistics.median(ex)
        s.update(expected=True, n_exact=ks.count(steps))
    if ks:
        by_k = {k: (f, b) for k, f, b in zip(ks, r["fwd"], r["rev"])}
        s["inner"] = " or ".join(f"{f} / {b}" for _, (f, b) in sorted(by_k.items()))
    return s


def rows_for(steps: int, max_replay: int, methods: Sequence[str], memories=MEMORIES) -> tuple:
    """``(rows, notes)``: the ``"method/memory"`` rows at ``steps``, and why any were skipped."""
    rows, notes = [], []
    have_higher = importlib.util.find_spec("higher") is not None
    for m in methods:
        if m in ("plain", "higher"):
            if m == "plain" or have_higher:
                rows.append(f"{m}/-")
            continue
        for memory in memories:
            replay = steps * (steps - 1) // 2
            if m != "fom" and memory == "recompute" and replay > max_replay:
                notes.append(f"{m}/recompute skipped at steps={steps}: its exact sweep replays "
                             f"{replay:,} inner steps (over --max-replay {max_replay:,}).")
            else:
                rows.append(f"{m}/{memory}")
    if not have_higher and "higher" in methods:
        notes.append("higher is not installed: its rows are skipped (pip install higher).")
    return rows, notes


def measure_peak(row: str, steps: int, seed: int, device: str, threads: int) -> Dict[str, Any]:
    """The peak memory of one row's outer step, in this (fresh) process (see the module docstring)."""
    with torch_threads(threads):
        method, memory = row.split("/")
        prob = problem("mlp", seed, device)
        outer_step(method, memory, 1, prob)()
        gen = torch.Generator(device=device).manual_seed(seed) if method == "ufom" else None
        step = outer_step(method, memory, steps, prob, gen)
        draws = 0
        with PeakMemory(device) as mem:
            while True:
                res, draws = step(), draws + 1
                if method != "ufom" or res.truncation == steps or draws == MAX_DRAWS:
                    break
    out = {"peak_mb": mem.peak_bytes / MB, "peak_exact": mem.exact, "draws": draws}
    if method in MODES:
        out.update(fwd=res.forward_steps, rev=res.reverse_steps)
    return out


def targets(results: Dict[str, Dict], basis: str) -> List[Target]:
    """At steps 100: exact/store <= 1.2x higher, fom <= 1.1x plain, ufom/checkpoint <= 1.6x fom."""
    def ratio(a, b):
        ra, rb = results.get(f"{a}@{TARGETS_AT}", {}), results.get(f"{b}@{TARGETS_AT}", {})
        return ra[basis] / rb[basis] if basis in ra and basis in rb else None
    out = [Target(f"exact/store {basis} time / higher at steps={TARGETS_AT}",
                  ratio("exact/store", "higher/-"), 1.2)]
    out += [Target(f"fom/{m} {basis} time / plain FO loop at steps={TARGETS_AT}",
                   ratio(f"fom/{m}", "plain/-"), 1.1)
            for m in MEMORIES]
    out.append(Target(f"ufom/checkpoint {basis} time / fom at steps={TARGETS_AT}",
                      ratio("ufom/checkpoint", "fom/checkpoint"), 1.6))
    return out


def main(argv=None) -> Dict[str, Any]:
    """Measure every row (times: a fresh process per steps value; peaks: one per row); write the report."""
    p = parser(NAME, __doc__, {"quick": "steps 10 100, 5 rounds, --max-replay 1000",
                               "tiny": "steps 2, 1 round"})
    p.add_argument("--steps", type=positive_int, nargs="+", help="inner steps (default 10 100 1000)")
    p.add_argument("--rounds", type=positive_int, help="timing rounds, at least (default 7; --quick 5)")
    p.add_argument("--max-replay", type=positive_int, help="skip recompute rows replaying more inner steps")
    p.add_argument("--worker", help="internal: one measurement in this process, printed as JSON")
    args = parse(p, argv)
    if args.worker:
        spec = json.loads(args.worker)
        task = spec.pop("task")
        print(json.dumps((measure_peak if task == "peak" else time_rows)(**spec)))
        return {}
    steps_list, rounds, max_replay = SIZES[args.size]
    steps_list, rounds = list(dict.fromkeys(args.steps or steps_list)), args.rounds or rounds
    common = dict(seed=args.seed, device=args.device, threads=args.threads)
    results, notes, rows_all = {}, [], []
    for steps in steps_list:
        rows, skipped = rows_for(steps, args.max_replay or max_replay, ("plain", "higher") + MODES)
        notes += skipped
        got = run_fresh(f"benchmarks.{NAME}", worker_args(dict(task="times", model="mlp", rows=rows,
                                                                steps=steps, rounds=rounds, **common)))
        results.update({f"{r}@{steps}": summarise(r, steps, got[r]) for r in rows})
        rows_all += [(r, steps) for r in rows]
    peaks = run_fresh_many(f"benchmarks.{NAME}", [worker_args(dict(task="peak", row=r, steps=s, **common))
                                                  for r, s in rows_all], workers=2, desc="peaks",
                           show=not args.no_progress)
    for (r, s), peak in zip(rows_all, peaks):
        results[f"{r}@{s}"].update(peak)
    basis, table = args.basis, []
    for key, r in results.items():
        row, steps = key.split("@")
        ref = {m: results.get(f"{m}/-@{steps}", {}).get(basis) for m in ("higher", "plain")}
        e = " (E)" if r.get("expected") else ""
        table.append([row, steps, f"{r['wall']:.4g}{e}", f"{r['cpu']:.4g}{e}", spread(r, basis),
                      f"{r['peak_mb']:.1f}" + ("" if r["peak_exact"] else " (upper bound)"),
                      *(fmt(ref[m] and r[basis] / ref[m], ".2f", "x", "n/a") for m in ("higher", "plain")),
                      f"{r['fwd']} / {r['rev']}" if "fwd" in r else "-"])
    text = markdown_table(["row", "steps", "wall / outer step (s)", "CPU / outer step (s)", "spread",
                           "peak memory (MB)", f"{basis} / higher", f"{basis} / plain FO", "inner fwd / rev"],
                          table, "lrrrrrrrr")
    widths = "-".join(map(str, problems.MLP_WIDTHS))
    params = sum(a * b + b for a, b in zip(problems.MLP_WIDTHS[:-1], problems.MLP_WIDTHS[1:]))
    return write_report(args, NAME, TEMPLATE, dict(widths=widths, params=params, lr=INNER_LR, seed=args.seed,
                                                   rounds=rounds, basis=basis, table=text,
                                                   notes="".join(f"\n- {n}" for n in notes)),
                        {"rows": results, "notes": notes}, targets(results, basis))


if __name__ == "__main__":
    main()
