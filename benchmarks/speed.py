"""Time per outer step against the number of inner steps, for every mode and memory setting.

One *outer step* is one task's meta-gradient, as in :mod:`benchmarks.memory`:
``steps`` inner SGD steps (scalar lr, no weight decay) from the model's
parameters on one support batch, then the hypergradient of the outer loss
w.r.t. the initial parameters (MAML). No outer update is timed. Models:

* ``mlp``: the MLP of :mod:`benchmarks.memory`, Linear(64,320)-ReLU-Linear(320,320)-ReLU-
  Linear(320,10) (126,730 parameters), random inputs and labels, batch 64,
  cross-entropy, inner lr 0.01;
* ``sinusoid``: the MAML sinusoid regressor 1-40-40-1 with ReLU (1,761
  parameters), 10 support and 10 query points of one task
  ``y = A sin(x - phi)``, MSE, inner lr 0.01.

Both float32, seeded with ``--seed``.

Rows, for each model and ``steps``:

* ``fom`` (``MetaOptimizer(mode="fom")``; with a plain SGD rule its first-order
  steps never enter a memory schedule, so ``memory`` does not matter and one
  row is timed, with the default);
* ``ufom`` (q = 0.1) and ``exact`` with ``memory="checkpoint"`` (the default),
  ``"store"`` and ``"recompute"`` (``recompute`` is skipped where its exact
  sweep replays more than ``--max-replay`` inner steps, ``steps (steps - 1) / 2``);
* ``higher``: ``higher.innerloop_ctx(model, SGD, copy_initial_weights=False)``
  unrolled ``steps`` times, then ``torch.autograd.grad`` of the outer loss;
* two micro-benchmarks on the same model and support batch, for the floor:
  ``t_grad``, one inner gradient (``autograd.grad`` of the loss), and
  ``t_hvp``, one Hessian-vector product by double backward (``autograd.grad``
  with ``create_graph=True``, then ``autograd.grad`` of the gradient against a
  fixed random vector).

Ratios, all measured in the same run: against ``fom``, against ``higher``, and
against the floor ``r * t_grad + K * t_hvp`` (``K = steps`` for ``exact`` and
``higher``, ``E[K] = q * steps`` for ``ufom``, ``0`` for ``fom``): the time of
the inner gradients plus one HVP per exactly differentiated step, with no
overhead and no recomputation.

How it measures: one fresh process per model (``--worker``), one CPU
thread (``--threads``). For each ``steps``, every row gets a warm-up at
``steps=1``, then all rows and micro-benchmarks run round-robin
(:func:`benchmarks.harness.interleaved_times`) for at least ``--rounds``
rounds (and a minimum time), so background load hits them alike; each
deterministic row's time is its median. ``ufom`` draws its truncation point
from a ``torch.Generator`` seeded ``--seed``: ``ceil(UFOM_DRAWS / rounds)``
draws per round (``fom`` gets as many calls per round), then more draws, alone,
until ``MIN_EXACT`` took the exact branch (at most ``MAX_DRAWS``); its time is
the expectation ``(1 - q) * median(first-order draws) + q * median(exact
draws)`` (the raw mean of the draws is reported too). Ratios and the target
use process CPU time on the CPU (single-threaded rows: time spent descheduled
by other processes does not count) and wall time on CUDA.

The project's target: ``ufom`` (q = 0.1, default memory) takes at most 1.6x
``fom``'s time per outer step at ``steps = 100`` (model ``mlp``).

After the table, the report adds the sections of :mod:`benchmarks.throughput`
(measured in their own fresh process): a meta-batch of 25 sinusoid tasks by
``backward_batch`` (``torch.func.vmap``) against our per-task loop and
``higher``'s, and reverse-over-reverse against forward-over-reverse
Hessian-vector products.

Usage (from the repository root)::

    python -m benchmarks.speed                    # steps 10 30 100, both models
    python -m benchmarks.speed --quick            # mlp only; about 2 minutes on 2 quiet cores
    python -m benchmarks.speed --models mlp --steps 100 --rounds 7
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

try:  # ``python benchmarks/speed.py`` as well as ``python -m benchmarks.speed``
    import torch_ufom  # noqa: F401 - the library under test (public API only)
    from benchmarks.harness import (interleaved_times, markdown_table, mean, median,
                                    positive_int, progress, run_fresh, time_calls)
    from benchmarks import memory as memory_bench, throughput
    from benchmarks.memory import BATCH as MLP_BATCH, INNER_LR, WIDTHS
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch_ufom  # noqa: F401 - the library under test (public API only)
    from benchmarks.harness import (interleaved_times, markdown_table, mean, median,
                                    positive_int, progress, run_fresh, time_calls)
    from benchmarks import memory as memory_bench, throughput
    from benchmarks.memory import BATCH as MLP_BATCH, INNER_LR, WIDTHS

NAME = "speed"
MODELS = ("mlp", "sinusoid")
MODES = ("fom", "ufom", "exact")
MEMORIES = ("checkpoint", "store", "recompute")
Q = 0.1
SHOTS = 10          # sinusoid support / query points
UFOM_DRAWS = 20     # ufom draws timed per row in the round-robin, at least
MIN_EXACT = 3       # then more ufom draws, alone, until this many took the exact branch
MAX_DRAWS = 200     # ufom draws at most, while waiting for the exact branch
MICRO_PER_ROUND = 5  # t_grad / t_hvp calls per round
TARGET_STEPS = 100
TARGET_MODEL = "mlp"
UFOM_VS_FOM = 1.6   # target: ufom (default memory) <= 1.6 x fom at steps=100
SIZES = {  # (steps, rounds, min seconds per steps value, max replay, models)
    "full": ([10, 30, 100], 5, 5.0, 50_000, list(MODELS)),
    "quick": ([10, 30, 100], 3, 1.0, 1_000, ["mlp"]),
    "tiny": ([2, 4], 1, 0.0, 1_000, ["sinusoid"]),
}


# -- problems -------------------------------------------------------------------------
def build_problem(model_name: str, seed: int, device: str):
    """Return ``(model, loss, support, query)`` for ``mlp`` or ``sinusoid`` (float32, seeded)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    f32 = dict(dtype=torch.float32)
    if model_name == "mlp":
        layers: List[nn.Module] = []
        for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
            layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(WIDTHS) - 2 else [])
        model = nn.Sequential(*layers)

        def batch():
            return (torch.randn(MLP_BATCH, WIDTHS[0], generator=gen, **f32).to(device),
                    torch.randint(0, WIDTHS[-1], (MLP_BATCH,), generator=gen).to(device))
        loss = xent
    elif model_name == "sinusoid":
        model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                              nn.Linear(40, 1))
        amp = 0.1 + 4.9 * torch.rand((), generator=gen, **f32)
        phase = math.pi * torch.rand((), generator=gen, **f32)

        def batch():
            x = -5.0 + 10.0 * torch.rand(SHOTS, 1, generator=gen, **f32)
            return x.to(device), (amp * torch.sin(x - phase)).to(device)
        loss = mse
    else:
        raise ValueError(f"Invalid model: {model_name!r} (expected one of {', '.join(MODELS)})")
    return model.to(device=device, dtype=torch.float32), loss, batch(), batch()


def xent(fmodel: Callable, batch) -> Tensor:
    """Cross-entropy of ``fmodel`` on ``batch = (x, y)``."""
    x, y = batch
    return nn.functional.cross_entropy(fmodel(x), y)


def mse(fmodel: Callable, batch) -> Tensor:
    """Mean squared error of ``fmodel`` on ``batch = (x, y)``."""
    x, y = batch
    return ((fmodel(x) - y) ** 2).mean()


def make_outer_step(method: str, memory: str, steps: int, problem,
                    generator: Optional[torch.Generator] = None) -> Callable[[], Any]:
    """Return a function running one outer step (one task's meta-gradient) of a row."""
    model, loss, support, query = problem
    return memory_bench.make_outer_step(method, memory, steps, (model, support, query),
                                        generator, loss=loss)


def make_micro(problem, seed: int) -> Dict[str, Callable[[], Any]]:
    """``t_grad`` (one inner gradient) and ``t_hvp`` (one double-backward HVP) on ``problem``."""
    model, loss, support, _ = problem
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(seed + 1)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params]

    def t_grad():
        return torch.autograd.grad(loss(model, support), params)

    def t_hvp():
        g = torch.autograd.grad(loss(model, support), params, create_graph=True)
        return torch.autograd.grad(g, params, v)
    return {"t_grad": t_grad, "t_hvp": t_hvp}


def rows_for(steps: int, max_replay: int, have_higher: bool) -> Tuple[List[Tuple[str, str]], List[str]]:
    """``((method, memory) rows, skip notes)`` for one ``steps`` value."""
    rows: List[Tuple[str, str]] = [("fom", "checkpoint")]
    notes: List[str] = []
    for mode in ("ufom", "exact"):
        for memory in MEMORIES:
            replay = steps * (steps - 1) // 2
            if memory == "recompute" and replay > max_replay:
                notes.append(f"{mode}/recompute skipped at steps={steps}: its exact sweep replays "
                             f"{replay:,} inner steps (over --max-replay {max_replay:,}).")
            else:
                rows.append((mode, memory))
    if have_higher:
        rows.append(("higher", "-"))
    return rows, notes


def _recording(step: Callable, log: Dict[str, List]) -> Callable[[], None]:
    """``step``, logging its truncation point and inner step counts (torch_ufom rows)."""
    def run():
        res = step()
        if hasattr(res, "truncation"):
            log["truncations"].append(res.truncation)
            log["fwd"].append(res.forward_steps)
            log["rev"].append(res.reverse_steps)
    return run


def measure(model: str, steps_list: Sequence[int], rounds: int, min_seconds: float,
            max_replay: int, seed: int, device: str, threads: int = 1) -> Dict[str, Any]:
    """Time every row of ``model`` for each ``steps`` in this process; return JSON-able samples.

    Returns ``{"<steps>": {"rows": {"method/memory": {"times": [[wall, cpu], ...],
    "truncations": [...], "fwd": [...], "rev": [...]}}, "notes": [...]}}``;
    a row that raised holds ``{"error": ...}``.
    """
    torch.set_num_threads(threads)
    have_higher = importlib.util.find_spec("higher") is not None
    problem = build_problem(model, seed, device)
    out: Dict[str, Any] = {}
    for steps in steps_list:
        rows, notes = rows_for(steps, max_replay, have_higher)
        fns, res = {}, {}
        for method, memory in rows:
            key = f"{method}/{memory}"
            try:
                make_outer_step(method, memory, 1, problem)()  # warm-up: lazy initialisation
            except Exception as exc:  # e.g. an incompatible peer: report it, time the rest
                res[key] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            gen = torch.Generator(device=device).manual_seed(seed) if method == "ufom" else None
            res[key] = {"truncations": [], "fwd": [], "rev": []}
            fns[key] = _recording(make_outer_step(method, memory, steps, problem, gen), res[key])
        micro = make_micro(problem, seed)
        for fn in micro.values():
            fn()
        # ufom: several draws per round; fom (cheap) as many calls per round, so that the
        # two rows of the target sample the background load over similar stretches of time.
        draws = -(-UFOM_DRAWS // rounds)
        per_round = {k: draws for k in fns if k.startswith("ufom/") or k.startswith("fom/")}
        per_round.update({k: MICRO_PER_ROUND for k in micro})
        times = interleaved_times({**fns, **micro}, rounds, device, per_round, min_seconds)
        for key, ts in times.items():
            if key in micro:
                res[key] = {"times": [list(s) for s in ts]}
                continue
            ks = res[key]["truncations"]
            while (key.startswith("ufom/") and len(ks) < MAX_DRAWS
                   and (ks.count(steps) < MIN_EXACT or 0 not in ks)):
                ts += time_calls(fns[key], 1, device)
            res[key]["times"] = [list(s) for s in ts]
        out[str(steps)] = {"rows": res, "notes": notes}
    return out


# -- summaries and report ------------------------------------------------------------
def summarize(key: str, steps: int, r: Dict[str, Any]) -> Dict[str, Any]:
    """One row's time per outer step (``wall``, ``cpu``) from its samples (see the module docstring)."""
    out: Dict[str, Any] = {}
    method = key.split("/")[0]
    ks = r.get("truncations", [])
    for i, clock in enumerate(("wall", "cpu")):
        ts = [s[i] for s in r["times"]]
        if method != "ufom":
            out[clock] = median(ts)
            continue
        fo = [t for t, k in zip(ts, ks) if k == 0]
        ex = [t for t, k in zip(ts, ks) if k == steps]
        out[clock] = (1 - Q) * median(fo) + Q * median(ex) if fo and ex else mean(ts)
        out[f"raw_{clock}"] = mean(ts)
    if method == "ufom":
        out.update(n=len(ks), n_exact=sum(k == steps for k in ks))
    if ks:  # inner steps per outer step: first-order draw / exact draw
        by_k = {k: (f, b) for k, f, b in zip(ks, r["fwd"], r["rev"])}
        out["inner"] = " or ".join(f"{f} / {b}" for _, (f, b) in sorted(by_k.items()))
    return out


def floor_k(method: str, steps: int) -> float:
    """The number of HVPs in the floor: ``K = steps`` (exact, higher), ``q * steps`` (ufom), 0 (fom)."""
    return {"fom": 0.0, "ufom": Q * steps}.get(method, float(steps))


def analyse(raw: Dict[str, Any], basis: str) -> Tuple[Dict[str, Any], List[str]]:
    """Per model and steps: every row's times and ratios; plus the notes of the workers."""
    results: Dict[str, Any] = {}
    notes: List[str] = []
    for model, by_steps in raw.items():
        if "error" in by_steps:
            notes.append(f"model {model}: the measurement failed: {by_steps['error']}")
            continue
        for steps_text, got in by_steps.items():
            steps = int(steps_text)
            notes += got["notes"]
            rows = got["rows"]
            micro = {k: median([s[1 if basis == "cpu" else 0] for s in rows[k]["times"]])
                     for k in ("t_grad", "t_hvp")}
            table: Dict[str, Any] = {}
            for key, r in rows.items():
                if key in micro:
                    continue
                table[key] = {"error": r["error"]} if "error" in r else summarize(key, steps, r)
            fom = table.get("fom/checkpoint", {}).get(basis)
            hig = table.get("higher/-", {}).get(basis)
            for key, s in table.items():
                if "error" in s:
                    continue
                method = key.split("/")[0]
                floor = steps * micro["t_grad"] + floor_k(method, steps) * micro["t_hvp"]
                s.update(floor=floor, vs_floor=s[basis] / floor,
                         vs_fom=s[basis] / fom if fom else None,
                         vs_higher=s[basis] / hig if hig else None)
            results[f"{model}/{steps}"] = {"model": model, "steps": steps, "micro": micro,
                                           "rows": table}
    return results, notes


def evaluate_target(results: Dict[str, Any], basis: str) -> Dict[str, Any]:
    """The UFOM target: ufom (q=0.1, default memory) <= 1.6 x fom at steps=100 (mlp)."""
    text = (f"Target: ufom (q={Q}, default memory=\"checkpoint\") time per outer step <= "
            f"{UFOM_VS_FOM}x fom at steps={TARGET_STEPS} ({TARGET_MODEL}): ")
    rows = results.get(f"{TARGET_MODEL}/{TARGET_STEPS}", {}).get("rows", {})
    u, f = rows.get("ufom/checkpoint", {}), rows.get("fom/checkpoint", {})
    if basis not in u or basis not in f:
        return {"ratio": None, "holds": None, "text": text + "not evaluated (row not run)"}
    ratio = u[basis] / f[basis]
    wall = u["wall"] / f["wall"]
    holds = ratio <= UFOM_VS_FOM
    return {"ratio": ratio, "wall_ratio": wall, "holds": holds,
            "text": text + f"{ratio:.3f}x {basis.upper()} time ({wall:.3f}x wall): "
                           f"{'holds' if holds else 'MISSED'}"}


def label(key: str) -> Tuple[str, str]:
    """``(method label, memory)`` of a row key."""
    method, memory = key.split("/")
    return {"ufom": f"ufom (q={Q})", "higher": "higher (exact unroll)"}.get(method, method), (
        "(any)" if method == "fom" else memory)


def report(results: Dict[str, Any], args, notes: List[str], target: Dict[str, Any],
           basis: str, seconds: float) -> str:
    """The Markdown report: one table per model, the micro-benchmarks, notes and the target."""
    try:
        load = " (load average %.1f %.1f %.1f at the end)" % os.getloadavg()
    except OSError:  # pragma: no cover
        load = ""
    B = basis.upper()
    lines = ["# Time per outer step against inner steps (benchmarks/speed.py)", "",
             f"Command: `python -m benchmarks.speed {args.command}`".rstrip(), "",
             f"Device {args.device}, torch {torch.__version__}, {args.threads} thread(s), "
             f"{os.cpu_count()} CPU(s){load}; seed {args.seed}; inner SGD lr {INNER_LR}; "
             f"float32. Ratios use {B} time. Total {seconds:.0f} s.", ""]
    headers = ["method", "memory", "steps", "wall (s)", "CPU (s)", "/ fom", "/ higher",
               "floor (s)", "/ floor", "inner steps fwd / rev"]
    notes = list(notes)
    for model in args.models:
        keys = [k for k in results if results[k]["model"] == model]
        if not keys:
            continue
        lines += [f"## {model}", ""]
        table, micro_rows = [], []
        for k in keys:
            res = results[k]
            steps = res["steps"]
            micro_rows.append([steps, f"{res['micro']['t_grad'] * 1e3:.3f}",
                               f"{res['micro']['t_hvp'] * 1e3:.3f}"])
            for key, s in res["rows"].items():
                name, memory = label(key)
                if "error" in s:
                    notes.append(f"{model} {key} at steps={steps}: {s['error']}")
                    table.append([name, memory, steps] + ["error"] * (len(headers) - 3))
                    continue
                mark = " (E)" if "n" in s else ""
                table.append([name, memory, steps, f"{s['wall']:.4g}{mark}", f"{s['cpu']:.4g}{mark}",
                              _ratio(s["vs_fom"]), _ratio(s["vs_higher"]), f"{s['floor']:.4g}",
                              _ratio(s["vs_floor"]), s.get("inner", "-")])
                if "n" in s:
                    notes.append(f"{model} {key} at steps={steps}: {s['n']} seeded draws, "
                                 f"{s['n_exact']} exact; raw mean of the draws {s['raw_wall']:.4g} s "
                                 f"wall, {s['raw_cpu']:.4g} s CPU.")
        lines += [markdown_table(headers, table, "llrrrrrrrl"), ""]
        lines += [f"Micro-benchmarks ({model}, same batch, {B} time, medians):", "",
                  markdown_table(["steps (run)", "t_grad (ms)", "t_hvp (ms)"], micro_rows, "rrr"), ""]
    lines += ["Columns: time per outer step (one task's meta-gradient; (E): ufom's expectation "
              "(1-q) x median first-order draw + q x median exact draw); *floor* = "
              "steps x t_grad + K x t_hvp with K = steps (exact, higher), q x steps (ufom), 0 "
              "(fom); *inner steps fwd / rev*: inner steps run without / with a graph in one "
              "outer step (ufom: first-order draw or exact draw). fom's memory setting does not "
              "matter for a plain SGD rule (its first-order steps bypass the schedule).", ""]
    lines += [f"- {n}" for n in dict.fromkeys(notes)]
    lines += ["", target["text"], ""]
    return "\n".join(lines)


def _ratio(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def plot(results: Dict[str, Any], args, basis: str, path: str) -> None:
    """Time per outer step against steps (log-log) and the ratio to fom, one column per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in args.models if any(r["model"] == m for r in results.values())]
    fig, axes = plt.subplots(2, max(1, len(models)), figsize=(6 * max(1, len(models)), 8),
                             squeeze=False, sharex=True)
    styles = {"checkpoint": "-", "store": "--", "recompute": ":", "-": "-."}
    colors = {"fom": "C0", "ufom": "C1", "exact": "C2", "higher": "C3"}
    for col, model in enumerate(models):
        series: Dict[str, List[Tuple[int, float, Optional[float]]]] = {}
        floors: Dict[str, List[Tuple[int, float]]] = {}
        for res in results.values():
            if res["model"] != model:
                continue
            for key, s in res["rows"].items():
                if basis in s:
                    series.setdefault(key, []).append((res["steps"], s[basis], s["vs_fom"]))
            floors.setdefault("exact", []).append(
                (res["steps"], res["steps"] * (res["micro"]["t_grad"] + res["micro"]["t_hvp"])))
        ax, axr = axes[0, col], axes[1, col]
        for key, pts in sorted(series.items()):
            method, memory = key.split("/")
            pts.sort()
            name = " / ".join(label(key))
            kw = dict(color=colors.get(method, "k"), ls=styles.get(memory, "-"), marker="o", ms=3)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, **kw)
            if all(p[2] is not None for p in pts):
                axr.plot([p[0] for p in pts], [p[2] for p in pts], label=name, **kw)
        fl = sorted(floors.get("exact", []))
        ax.plot([p[0] for p in fl], [p[1] for p in fl], color="gray", lw=3, alpha=0.4,
                label="floor r (t_grad + t_hvp)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylabel(f"{basis.upper()} time per outer step (s)")
        ax.set_title(model, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        axr.axhline(UFOM_VS_FOM, color="k", ls=":", lw=1, label=f"target ufom <= {UFOM_VS_FOM}x fom")
        axr.set_yscale("log")
        axr.set_xlabel("inner steps")
        axr.set_ylabel("time / fom")
        axr.grid(True, which="both", alpha=0.3)
        axr.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the driver ----------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line (see ``--help``)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed",
                                description=__doc__.split("\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="mlp only, 3 rounds, --max-replay 1000 (about 2 minutes on 2 quiet "
                           "cores)")
    size.add_argument("--tiny", action="store_true",
                      help="sinusoid, steps 2 4, one round, in this process (seconds; a smoke test)")
    p.add_argument("--steps", type=positive_int, nargs="+", help="inner steps (default 10 30 100)")
    p.add_argument("--models", nargs="+", choices=MODELS, metavar="MODEL",
                   help=f"models, from {{{', '.join(MODELS)}}} (default both; --quick: mlp)")
    p.add_argument("--rounds", type=positive_int, help="timing rounds, at least (default 5)")
    p.add_argument("--max-replay", type=positive_int,
                   help="skip recompute rows whose exact sweep replays more inner steps "
                        "(default 50000; --quick: 1000)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where to run (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the problems and the draws")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads (default 1: stable timings on a shared machine)")
    p.add_argument("--in-process", action="store_true",
                   help="measure in this process instead of a fresh one per model; implied by --tiny")
    p.add_argument("--out", help=f"output directory (default results/{NAME}, or "
                                 f"results/{NAME}_quick / _tiny)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one model, print JSON
    args = p.parse_args(argv)
    args.command = " ".join(sys.argv[1:] if argv is None else argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("argument --device: cuda is not available in this torch build / machine")
    size_name = "tiny" if args.tiny else "quick" if args.quick else "full"
    steps, rounds, min_seconds, max_replay, models = SIZES[size_name]
    args.size = size_name
    args.steps = sorted(set(args.steps or steps))
    args.rounds = args.rounds or rounds
    args.min_seconds = min_seconds
    args.max_replay = args.max_replay or max_replay
    args.models = list(dict.fromkeys(args.models or models))
    args.in_process = args.in_process or args.tiny
    args.out = args.out or os.path.join(
        "results", NAME if size_name == "full" else f"{NAME}_{size_name}")
    return args


def _measure_inline(spec: Dict[str, Any]) -> Dict[str, Any]:
    """:func:`measure` in this process, restoring the thread count and the default dtype."""
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float32)
        return measure(**spec)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)


def main(argv=None) -> Dict[str, Any]:
    """Measure every model (a fresh process each); write ``speed.md``, ``.png`` and ``.json`` to ``--out``.

    Returns a dict: ``results`` (``"model/steps"`` -> micro-benchmarks and rows
    with their times and ratios), ``target``, ``notes``, ``report`` and
    ``plot`` (paths) and ``seconds``.
    """
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(**json.loads(args.worker))))
        return {}
    start = time.perf_counter()
    notes: List[str] = []
    if importlib.util.find_spec("higher") is None:
        notes.append("higher is not installed: its rows and ratios are skipped (pip install higher).")
    if args.in_process:
        notes.append("Measured in the calling process (--in-process, implied by --tiny).")
    raw: Dict[str, Any] = {}
    for model in progress(args.models, desc="speed (per model)"):
        spec = dict(model=model, steps_list=args.steps, rounds=args.rounds,
                    min_seconds=args.min_seconds, max_replay=args.max_replay, seed=args.seed,
                    device=args.device, threads=args.threads)
        raw[model] = (_measure_inline(spec) if args.in_process else
                      run_fresh("benchmarks.speed", ["--worker", json.dumps(spec)]))
    # The meta-batch and HVP sections (benchmarks/throughput.py), in a fresh process too.
    tp_args = ["--json", "--seed", str(args.seed), "--device", args.device,
               "--threads", str(args.threads)] + ([] if args.size == "full" else [f"--{args.size}"])
    if args.in_process:
        threads = torch.get_num_threads()
        try:
            raw_tp = throughput.measure(args.size, args.seed, args.device, args.threads)
        except Exception as exc:
            raw_tp = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            torch.set_num_threads(threads)
    else:
        raw_tp = run_fresh("benchmarks.throughput", tp_args)
    basis = "cpu" if args.device == "cpu" else "wall"
    results, worker_notes = analyse(raw, basis)
    target = evaluate_target(results, basis)
    seconds = time.perf_counter() - start
    os.makedirs(args.out, exist_ok=True)
    report_path = os.path.join(args.out, f"{NAME}.md")
    plot_path = os.path.join(args.out, f"{NAME}.png")
    plot(results, args, basis, plot_path)
    text = report(results, args, notes + worker_notes, target, basis, seconds)
    text += "\n" + throughput.report(raw_tp, basis)
    with open(report_path, "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, f"{NAME}.json"), "w") as f:  # every timed sample
        json.dump({"args": {k: v for k, v in vars(args).items() if k != "worker"}, "raw": raw,
                   "results": results, "target": target, "throughput": raw_tp}, f)
    print(text)
    return {"results": results, "target": target, "notes": notes + worker_notes,
            "report": report_path, "plot": plot_path, "seconds": seconds, "throughput": raw_tp}


if __name__ == "__main__":
    main()
