"""Peak memory and time per outer step of torch_ufom against ``higher`` and a plain loop.

One *outer step* is the meta-gradient of one task: ``steps`` inner SGD steps
(lr 0.01) from the model's parameters on a support batch, then the gradient of
the outer loss at the adapted parameters w.r.t. the initial parameters. No
outer optimizer update is timed. The task is fixed: an MLP
Linear(64,320)-ReLU-Linear(320,320)-ReLU-Linear(320,10) (126,730 parameters,
float32), one support and one query batch of 64 random inputs with random
labels (seed 0), cross-entropy for both losses.

Rows:

* ``fom``, ``ufom`` (q = 0.1) and ``exact`` through :class:`torch_ufom.MetaOptimizer`
  (``zero_grad`` + ``backward``), with ``memory="checkpoint"`` (the default,
  8 slots), ``"recompute"`` and ``"store"``;
* ``higher``: ``higher.innerloop_ctx(model, SGD, copy_initial_weights=False)``
  unrolled ``steps`` times, then ``torch.autograd.grad`` of the outer loss;
* ``plain FO``: a hand-written first-order loop (detached parameters,
  ``autograd.grad`` per step, ``p - lr * g`` under ``no_grad``, the outer
  gradient at the end), the floor that ``fom`` is measured against.

How it measures:

* Peak memory: every row in a fresh Python process, two at a time
  (``python -m benchmarks.memory --worker ...``): build the problem, one
  warm-up outer step at ``steps=1``, then one outer step under
  :class:`benchmarks.harness.PeakMemory` (on CPU the peak RSS above the RSS
  just before it, on CUDA ``torch.cuda.max_memory_allocated`` above the memory
  allocated just before it). ``ufom`` draws from a ``torch.Generator`` seeded
  0 until one draw takes the exact branch, so its peak is the exact branch's.
* Time: all rows with the same ``steps`` in one fresh process, round-robin
  (:func:`benchmarks.harness.interleaved_times`), so background load on a
  shared machine hits them alike; the median over at least ``--repeats``
  rounds, of wall-clock and of process CPU time. The ratio columns and the
  targets use CPU time on the CPU (each row runs one thread, so CPU time
  leaves out the time spent descheduled while other processes run, though
  shared caches still couple them) and wall time on CUDA.
* ``ufom``'s truncation point is random: it is timed over at least 20
  draws from a ``torch.Generator`` seeded 0, and its time is the expectation
  ``(1 - q) * median(first-order draws) + q * median(exact-branch draws)``
  (the raw mean of the draws is printed too).
* ``exact``/``ufom`` with ``recompute`` replay ``steps (steps - 1) / 2`` inner
  steps per exact sweep; rows above ``--max-replay`` (50,000; ``--quick``:
  1,000) are skipped with a note.

Rows use one CPU thread by default (``--threads``): this model's operations
are too small to gain much from more, and with more threads than idle cores
(another process running) each operation waits on descheduled threads, which
made single rows 10-40x slower on a shared 2-core machine.

Usage (from the repository root)::

    python -m benchmarks.memory --quick
    python -m benchmarks.memory --steps 100 --repeats 5 --out results/memory.md
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from torch.func import functional_call

from torch_ufom import MetaOptimizer

from .harness import (MB, PeakMemory, interleaved_times, markdown_table, mean, median, positive_int, progress,
                      run_fresh, run_fresh_many, seed_everything, time_calls)

SEED = 0
WIDTHS = (64, 320, 320, 10)
BATCH = 64
INNER_LR = 0.01
Q = 0.1
N_PARAMS = sum(a * b + b for a, b in zip(WIDTHS[:-1], WIDTHS[1:]))  # 126,730
UFOM_DRAWS = 20  # ufom draws timed per row, at least
MAX_DRAWS = 200  # ufom draws at most, while waiting for both branches to appear
MEMORY_WORKERS = 2  # memory processes run two at a time (a process's peak is its own)
MIN_SECONDS = 5.0  # fast steps values get more timing rounds, until this much time has passed
MODES = ("fom", "ufom", "exact")
MEMORIES = ("checkpoint", "recompute", "store")
UFOM_VS_FOM = 1.6  # ufom (q=0.1) with the default memory setting against fom, at TARGETS_AT
TARGETS_AT = 100  # the project's targets are stated for CPU at steps=100
EXACT_VS_HIGHER = 1.2
FOM_VS_PLAIN = 1.1


# -- the problem ---------------------------------------------------------------
def build_problem(device: str):
    """Return ``(model, support, query)``: the seeded MLP and two ``(x, y)`` batches."""
    gen = seed_everything(SEED)
    layers: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(WIDTHS) - 2 else [])
    model = nn.Sequential(*layers).to(device)

    def batch():
        x = torch.randn(BATCH, WIDTHS[0], generator=gen)
        y = torch.randint(0, WIDTHS[-1], (BATCH,), generator=gen)
        return x.to(device), y.to(device)

    return model, batch(), batch()


def xent(fmodel: Callable, batch) -> torch.Tensor:
    """Cross-entropy of ``fmodel`` on ``batch = (x, y)``: the inner and the outer loss."""
    x, y = batch
    return nn.functional.cross_entropy(fmodel(x), y)


# -- one outer step per method ---------------------------------------------------
def make_outer_step(method: str, memory: str, steps: int, problem,
                    generator: Optional[torch.Generator] = None,
                    loss: Callable = xent) -> Callable[[], object]:
    """Return a function running one outer step of ``method`` on ``problem``.

    For the torch_ufom modes it returns the :class:`~torch_ufom.MetaResult`
    of ``MetaOptimizer.backward`` (the hypergradient is in ``.grad``); for the
    baselines the tuple of gradients.
    """
    model, support, query = problem
    if method in MODES:
        outer = torch.optim.SGD(model.parameters(), lr=0.1)  # never stepped here
        meta = MetaOptimizer(model, outer, inner_lr=INNER_LR, steps=steps, mode=method, q=Q,
                             memory=memory, generator=generator)

        def step():
            meta.zero_grad()
            return meta.backward(loss, loss, support, query)
        return step

    params = list(model.parameters())
    if method == "higher":
        import higher
        inner = torch.optim.SGD(params, lr=INNER_LR)

        def step():
            with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmod, dopt):
                for _ in range(steps):
                    dopt.step(loss(fmod, support))
                return torch.autograd.grad(loss(fmod, query), params)
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


def measure_memory(method: str, memory: str, steps: int, device: str, threads: int = 1) -> Dict:
    """Peak memory of one row's outer step, measured in this (fresh) process.

    After one warm-up outer step at ``steps=1``, runs one outer step under a
    :class:`~benchmarks.harness.PeakMemory` (``ufom``: draws from a generator
    seeded ``SEED`` until one takes the exact branch, at most ``MAX_DRAWS``).
    Returns a JSON-able dict: ``peak_mb``, ``peak_exact`` (``False`` if the
    peak is an upper bound), ``draws``, and for torch_ufom ``fwd``/``rev``, the
    inner steps run without / with a graph in the last outer step.
    """
    torch.set_num_threads(threads)
    problem = build_problem(device)
    make_outer_step(method, memory, 1, problem)()  # lazy initialisation of the code paths
    gen = seed_everything(SEED, device) if method == "ufom" else None
    step = make_outer_step(method, memory, steps, problem, generator=gen)
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


def _recording(step: Callable, truncations: List) -> Callable[[], None]:
    """``step``, appending its truncation point (``None``: a baseline) to ``truncations``."""
    def run():
        truncations.append(getattr(step(), "truncation", None))
    return run


def measure_times(rows: List[List[str]], steps: int, device: str, repeats: int,
                  threads: int = 1) -> Dict:
    """Time the ``(method, memory)`` rows at ``steps`` round-robin in this process.

    Every row gets one warm-up outer step at ``steps=1``, then ``repeats``
    rounds (more until ``MIN_SECONDS`` have passed) each run every row once;
    ``ufom`` runs ``ceil(UFOM_DRAWS / repeats)`` draws per round from a
    generator seeded ``SEED`` and then more, alone, until both branches were
    drawn (at most ``MAX_DRAWS``). Returns ``{"method/memory": {"times": [[wall,
    cpu], ...], "truncations": [...]}}`` (``{"error": ...}`` for a row that raised).
    """
    torch.set_num_threads(threads)
    problem = build_problem(device)
    fns, out = {}, {}
    for method, memory in rows:
        key = f"{method}/{memory}"
        try:
            make_outer_step(method, memory, 1, problem)()
        except Exception as exc:  # e.g. an incompatible higher: report it, time the rest
            out[key] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        gen = seed_everything(SEED, device) if method == "ufom" else None
        step = make_outer_step(method, memory, steps, problem, generator=gen)
        out[key] = {"truncations": []}
        fns[key] = _recording(step, out[key]["truncations"])
    per_round = {k: -(-UFOM_DRAWS // repeats) for k in fns if k.startswith("ufom/")}
    times = interleaved_times(fns, repeats, device, per_round, MIN_SECONDS)
    for key, ts in times.items():
        ks = out[key]["truncations"]
        while key in per_round and len(ks) < MAX_DRAWS and not {0, steps} <= set(ks):
            ts += time_calls(fns[key], 1, device)
        out[key]["times"] = [list(sample) for sample in ts]
    return out


# -- the driver ------------------------------------------------------------------
def plan(steps_list: List[int], max_replay: int, have_higher: bool):
    """Return ``(rows, notes)``: the ``(method, memory, steps)`` rows to run and the skip notes."""
    rows, notes = [], []
    for steps in steps_list:
        rows.append(("plain", "-", steps))
        if have_higher:
            rows.append(("higher", "-", steps))
        for mode in MODES:
            for memory in MEMORIES:
                replay = steps * (steps - 1) // 2
                if mode != "fom" and memory == "recompute" and replay > max_replay:
                    notes.append(f"Skipped {mode}/recompute at steps={steps}: its exact sweep "
                                 f"replays steps(steps-1)/2 = {replay:,} inner steps (over "
                                 f"--max-replay {max_replay:,}).")
                else:
                    rows.append((mode, memory, steps))
    if not have_higher:
        notes.insert(0, "higher is not installed: its rows are skipped (pip install higher).")
    return rows, notes


def summarize_times(method: str, steps: int, samples: List, ks: List) -> Dict:
    """A row's time per outer step, wall-clock (``wall``) and CPU (``cpu``), from its samples.

    Deterministic rows: the medians. ``ufom``: the expected time
    ``(1 - q) * median(first-order draws) + q * median(exact-branch draws)``,
    the mean under the law with far less variance than the raw mean of a few
    draws (returned too, as ``raw_wall``), and the draw counts ``n``/``n_exact``.
    """
    out = {}
    for i, clock in enumerate(("wall", "cpu")):
        ts = [sample[i] for sample in samples]
        fo = [t for t, k in zip(ts, ks) if k == 0]
        ex = [t for t, k in zip(ts, ks) if k == steps]
        if method != "ufom":
            out[clock] = median(ts)
        else:
            out[clock] = (1 - Q) * median(fo) + Q * median(ex) if fo and ex else mean(ts)
    if method == "ufom":
        out.update(raw_wall=mean([sample[0] for sample in samples]), n=len(samples),
                   n_exact=sum(k == steps for k in ks))
    return out


def label(method: str) -> str:
    """The table's name for a method."""
    names = {"plain": "plain FO loop", "ufom": f"ufom (q={Q})"}
    return names.get(method, method)


def report(results: Dict, args, notes: List[str]) -> str:
    """Build the Markdown report: a table, the notes and the target checks.

    Ratios and targets use CPU time on the CPU (robust to other processes on a
    shared machine, as every row runs one thread) and wall time on CUDA.
    """
    basis = "cpu" if args.device == "cpu" else "wall"

    def t(key, clock=basis):
        return results.get(key, {}).get(clock)

    table = []
    for (method, memory, steps), r in results.items():
        for err in ("time_error", "memory_error"):
            if err in r:
                notes.append(f"{label(method)}/{memory} at steps={steps}: {err.split('_')[0]} "
                             f"measurement failed: {r[err]}")
        mark = " (expected)" if r.get("n_exact") else ""
        times = [f"{r[c]:.4g}{mark}" if c in r else "error" for c in ("wall", "cpu")]
        ratios = [f"{r[basis] / ref:.2f}x" if ref and basis in r else "n/a"
                  for ref in (t(("higher", "-", steps)), t(("plain", "-", steps)))]
        peak = "error" if "peak_mb" not in r else f"{r['peak_mb']:.1f}" + (
            "" if r["peak_exact"] else " (upper bound)")
        inner = f"{r['fwd']} / {r['rev']}" if "fwd" in r else "n/a"
        table.append([label(method), memory, steps, *times, peak, *ratios, inner])
        if "n_exact" in r:
            notes.append(
                f"ufom/{memory} at steps={steps}: {r['n']} timed draws from a torch.Generator "
                f"seeded {SEED}, {r['n_exact']} of them the exact branch; time = (1-q) x median "
                f"first-order draw + q x median exact draw (raw mean wall time of the draws "
                f"{r['raw_wall']:.4g} s); peak memory of draws 1-{r.get('draws', '?')}, up to "
                "the first exact branch.")
    headers = ["method", "memory", "steps", "wall time / outer step (s)",
               "CPU time / outer step (s)", "peak memory (MB)", f"{basis.upper()} time / higher",
               f"{basis.upper()} time / plain FO", "inner steps fwd / rev"]
    notes.append(
        f"Times: medians over at least {args.repeats} round-robin rounds (and {MIN_SECONDS:g} s) "
        "of all rows with the same steps, in one process; CPU time is the process's (user + "
        f"system). Ratios use {basis.upper()} time. Peak memory: one outer step per row in a "
        "fresh process, above the memory in use just before it. 'inner steps fwd / rev': inner "
        "steps run without / with a graph in that outer step.")
    header = (f"Device {args.device}, torch {torch.__version__}, {args.threads} CPU thread(s). "
              f"MLP {'-'.join(map(str, WIDTHS))} ({N_PARAMS:,} params), batch {BATCH}, inner SGD "
              f"lr {INNER_LR}, float32, seed {SEED}.")
    lines = [header, "", markdown_table(headers, table, "llrrrrrrr"), ""]
    lines += [f"- {n}" for n in notes] + [""]
    checks = [(("exact", "store", TARGETS_AT), "higher", EXACT_VS_HIGHER)]
    checks += [(("fom", m, TARGETS_AT), "plain", FOM_VS_PLAIN) for m in MEMORIES]
    checks.append((("ufom", "checkpoint", TARGETS_AT), "fom", UFOM_VS_FOM))
    for key, ref, limit in checks:
        ref_key = (ref, key[1] if ref == "fom" else "-", TARGETS_AT)
        if t(key) and t(ref_key):
            ratio = t(key) / t(ref_key)
            verdict = (f"{ratio:.3f}x {basis.upper()} time "
                       f"({t(key, 'wall') / t(ref_key, 'wall'):.3f}x wall): "
                       f"{'holds' if ratio <= limit else 'MISSED'}")
        else:
            verdict = "not evaluated (row not run)"
        lines.append(f"Target: {key[0]}/{key[1]} time <= {limit}x {label(ref)} at "
                     f"steps={TARGETS_AT}: {verdict}")
    return "\n".join(lines)


def parse_args(argv=None):
    """Parse the command line (see ``--help``)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory",
                                description=__doc__.split("\n")[0].replace("``", ""))
    p.add_argument("--steps", type=positive_int, nargs="+",
                   help="inner steps to run (default 10 100 1000; --quick: 10 100)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="smaller defaults: steps 10 100, 3 repeats, --max-replay 1000")
    size.add_argument("--tiny", action="store_true",
                      help="steps 2, 1 repeat: a smoke test of the whole pipeline")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where to run (default cpu); peak memory is RSS on cpu, allocated on cuda")
    p.add_argument("--repeats", type=positive_int,
                   help="timing rounds, at least (default 5; --quick: 3)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads per row (default 1: stable timings on a shared machine)")
    p.add_argument("--max-replay", type=positive_int,
                   help="skip exact/ufom with recompute when steps(steps-1)/2 exceeds this "
                        "(default 50000; --quick: 1000)")
    p.add_argument("--out", help="also write the Markdown report to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one measurement, print JSON
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("argument --device: cuda is not available in this torch build / machine")
    default_steps = [2] if args.tiny else [10, 100] if args.quick else [10, 100, 1000]
    args.steps = list(dict.fromkeys(args.steps or default_steps))
    args.repeats = args.repeats or (1 if args.tiny else 3 if args.quick else 5)
    args.max_replay = args.max_replay or (1000 if args.quick else 50_000)
    return args


def main(argv=None) -> None:
    """Measure every row (times: a process per steps value; memory: a process per row)."""
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        task = spec.pop("task")
        print(json.dumps((measure_memory if task == "memory" else measure_times)(**spec)))
        return
    rows, notes = plan(args.steps, args.max_replay, importlib.util.find_spec("higher") is not None)
    common = dict(device=args.device, threads=args.threads)
    results = {row: {} for row in rows}
    # Times: one process per steps value, one at a time (nothing else running).
    for steps in progress(args.steps, desc="timing"):
        these = [[m, mem] for m, mem, s in rows if s == steps]
        job = dict(task="times", rows=these, steps=steps, repeats=args.repeats, **common)
        got = run_fresh("benchmarks.memory", ["--worker", json.dumps(job)])
        for m, mem in these:
            r = got.get(f"{m}/{mem}", got)  # a failed process: its error for every row
            if "error" in r:
                results[(m, mem, steps)]["time_error"] = r["error"]
            else:
                results[(m, mem, steps)].update(summarize_times(m, steps, r["times"],
                                                                r["truncations"]))
    # Peak memory: one fresh process per row; per-process peaks allow running two at once.
    jobs = [dict(task="memory", method=m, memory=mem, steps=s, **common) for m, mem, s in rows]
    got = run_fresh_many("benchmarks.memory", [["--worker", json.dumps(j)] for j in jobs],
                         workers=MEMORY_WORKERS, desc="memory")
    for row, r in zip(rows, got):
        results[row].update({"memory_error": r["error"]} if "error" in r else r)
    text = report(results, args, notes)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
