"""Peak memory and time per outer step of torch_ufom against ``higher`` and a hand-written loop.

``python -m benchmarks.memory [--quick | --tiny]``; the report defines the rows and columns. One outer
step: ``steps`` inner SGD steps of the MLP 64-320-320-10 on a random support batch, then the gradient
of the query loss w.r.t. the initial parameters. Rows ``method[+rule]/memory``: ``fom``, ``ufom``,
``exact``, ``ufomK`` (ufom, ``force_truncation=steps``), ``higher``, ``inplace`` (issue 13's
hand-written first-order loop), ``unroll`` (a hand-written exact unroll: ``functional_call``, one
graph, one backward); rules ``+momentum``, ``+adam``, ``+lr`` (a learned rate per tensor);
memory ``checkpoint``, ``store``, ``recompute``, ``maxNMiB`` (``max_memory=N MiB``), ``slotsN``
(``memory="checkpoint", slots=N``) or ``-``.
Every measurement runs in a child forked from one worker (:func:`run_jobs`); :func:`outer_step`,
:func:`time_rows` and :func:`run_jobs` also serve :mod:`benchmarks.speed`.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import importlib.util
import inspect
import json
import os
import statistics
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

import torch_ufom
from benchmarks import problems
from benchmarks.harness import (MB, PeakMemory, Target, clock, fmt, interleave, keep_freed_memory,
                                markdown_table, paired_ratio, parse, parser, positive_int, run_fresh, spread,
                                stats, torch_threads, worker_args, write_report)

NAME = "memory"
INNER_LR, Q = 0.01, 0.1
MODES, MEMORIES = ("fom", "ufom", "exact"), ("checkpoint", "recompute", "store")
RULES = ("momentum", "adam", "lr")
FOM_RULES = ("momentum", "adam")  # fom+rule against inplace+rule (torch.optim's rule)
MOMENTUM, ADAM_LR = 0.9, 1e-3  # the +momentum and +adam rows' rules, torch_ufom's and torch.optim's
DEFAULT_MEMORY = inspect.signature(torch_ufom.MetaOptimizer).parameters["memory"].default
OTHER_BUDGETS = ("max16MiB", "max128MiB")  # the steps=1000 table's byte budgets beside the default
UFOM_DRAWS, MAX_DRAWS = 20, 200  # ufom draws per row in the rounds, at least; in all, at most
MIN_EXACT = 3  # ufom's exact draws per row, at least (extra rounds of ufom and fom until drawn)
REPEAT = 3  # calls per round of a target's two rows (alternated call by call and paired)
AT, LONG = 100, 1000  # the steps of issue 13's rows
# Item 3 compares ufom's exact branch with exact under store and under checkpointing. At steps=100 the
# default byte budget keeps every graph (checkpoint runs what store runs), so the checkpointing pair
# fixes 8 slots, the default when issue 13 was filed: 245 replayed inner steps per sweep.
ITEM_3_MEMORIES = ("store", "slots8")
ITEM_3_ROWS = tuple(f"{m}/{x}" for x in ITEM_3_MEMORIES for m in ("exact", "ufomK"))
UFOM_K_VS_EXACT, UFOM_K_PEAK, UFOM_VS_FOM = 1.03, 1.05, 1.30
LONG_PEAK_VS_STORE, LONG_TIME_VS_STORE = 0.25, 2.0
# (steps, rounds, max replay, the other budgets timed in the rounds) per size; the last steps value
# gets the budget table. --quick leaves out steps=10 (speed.py times short unrolls) to fit its budget.
SIZES = {"full": ([10, AT, LONG], 7, 50_000, True), "quick": ([AT, LONG], 5, 1_000, False),
         "tiny": ([2, 3], 1, 1_000, False)}

TEMPLATE = """# Peak memory and time per outer step (benchmarks/memory.py)

Command: `{command}`

Device {device}, torch {torch}, {threads} thread(s). MLP {widths} ({params:,} parameters), batch 64,
inner SGD lr {lr} (rows `+momentum`: SGD momentum 0.9; `+adam`: Adam lr 1e-3; `+lr`: a learned rate
per parameter tensor; `inplace+momentum`, `inplace+adam`: the hand-written loop stepping
`torch.optim.SGD(momentum=0.9)` or `torch.optim.Adam(lr=1e-3)`, and `higher+momentum`,
`higher+adam`: higher's exact unroll of those optimizers, the `/ inplace` and `/ higher` bases of the
rows with that rule; higher's Adam adds eps before the bias correction, another update whose
hypergradient differs from torch.optim's Adam's, so the `+adam` rows' `/ higher` is n/a (its row is
timed all the same); the `+lr` rows have no peer that learns the rates: `/ higher` and `/ inplace`
n/a), float32, seed {seed}.
Times: medians over {rounds} round-robin rounds of all rows with the same steps in one process
(spread: half the inter-quartile range); `ufom`: the expectation
(1-q) x median first-order draw + q x median exact draw (E), its first-order draws those of the
rounds (the spread is theirs), its exact draws those of the rounds and of extra rounds run until it
drew {min_exact}, each extra round interleaving `ufom` with `fom`; `ufomK`: ufom with its exact branch
forced (K = steps); (1 call): one call timed after the peak-measuring one, in its process, not in the
rounds; item 3's four rows (store, and checkpointing with 8 fixed slots, `slots8`: at steps {at} the
default budget keeps every graph, so `checkpoint` runs what `store` runs) run 3 calls per round. A
round calls the rows call by call, alternating their order (A B, B A, ...; rows with one call per
round: A B in even rounds, B A in odd ones). Ratios
use {basis} time; the targets' time ratios pair calls that ran next to each other (the median of the
two rows' per-call ratios; for `ufom`, (1-q) x that median for its first-order draws against `fom` +
q x median exact call / median fom, the exact calls being ufom's exact draws and the calls of `ufomK`
under the same memory setting, the same work forced), the tables' are ratios of medians. The timing
process keeps freed memory (no heap trimming).
Peak memory: one outer step per row in a fresh (forked) process, above the memory in use just before
it (blocks of 32 KiB and more mapped one by one: RSS follows live memory). *inner fwd / rev*: inner
steps run without / with a graph in that outer step. Default memory setting: `{default}`; other
budgets: {budgets}.

## Every row at steps {short}

{table}

## Memory budgets at steps {long}

{long_table}
{notes}"""


# -- one outer step per row ----------------------------------------------------------------
def problem(name: str, seed: int, device: str):
    """``(model, loss, support, query)``: ``"mlp"`` (64-320-320-10, random batches of 64, cross-entropy),
    ``"sinusoid"`` (1-40-40-1, one task of 10 + 10 points, MSE) or ``"conv4"`` (BatchNorm without
    running statistics, 5 random 28x28 images per batch, cross-entropy); float32, seeded."""
    gen = torch.Generator().manual_seed(seed)
    if name == "mlp":
        model = problems.seeded(seed, lambda: problems.mlp(*problems.MLP_WIDTHS), device=device)
        return (model, problems.xent, problems.random_batch(gen, device=device),
                problems.random_batch(gen, device=device))
    if name == "sinusoid":
        model = problems.seeded(seed, problems.sinusoid_mlp, device=device)
        xs, ys, xq, yq = problems.sinusoid_tasks(1, 10, 10, gen, torch.float32, device)
        return model, problems.mse, (xs[0], ys[0]), (xq[0], yq[0])
    if name == "conv4":
        model = problems.seeded(seed, lambda: problems.conv4(5, track_running_stats=False), device=device)
        (xs, ys), (xq, yq) = (problems.image_tasks(1, 5, 1, gen, device=device) for _ in range(2))
        return model, problems.xent, (xs[0], ys[0]), (xq[0], yq[0])
    raise ValueError(f"Invalid model: {name!r} (expected 'mlp', 'sinusoid' or 'conv4')")


def inner_rule(rule: str, model) -> tuple:
    """``(rule, learned tensors)`` of a ``+rule`` row."""
    if rule == "momentum":
        return torch_ufom.inner.SGD(INNER_LR, momentum=MOMENTUM), []
    if rule == "adam":
        return torch_ufom.inner.Adam(ADAM_LR), []
    if rule == "lr":
        rates = {n: torch.tensor(INNER_LR, dtype=p.dtype, device=p.device, requires_grad=True)
                 for n, p in model.named_parameters()}
        return torch_ufom.inner.SGD(rates), list(rates.values())
    raise ValueError(f"Invalid rule: {rule!r} (expected one of {', '.join(RULES)})")


def optim_rule(rule: str, params) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer of an ``inplace+rule`` row: :func:`inner_rule`'s rule."""
    if rule == "momentum":
        return torch.optim.SGD(params, lr=INNER_LR, momentum=MOMENTUM)
    if rule == "adam":
        return torch.optim.Adam(params, lr=ADAM_LR)
    raise ValueError(f"Invalid rule for inplace: {rule!r} (expected momentum or adam)")


def memory_args(memory: str) -> Dict[str, Any]:
    """MetaOptimizer's keywords for a row's memory part (``-``, a memory setting, ``maxNMiB`` or
    ``slotsN``: checkpointing with ``N`` fixed slots)."""
    if memory == "-":
        return {}
    if memory.startswith("max") and memory.endswith("MiB"):
        return {"max_memory": int(memory[3:-3]) * MB}
    if memory.startswith("slots"):
        return {"memory": "checkpoint", "slots": int(memory[5:])}
    return {"memory": memory}


def outer_step(row_method: str, memory: str, steps: int, prob, generator=None) -> Callable[[], Any]:
    """A function running one outer step of ``row_method`` (``method[+rule]``, see the module
    docstring) under ``memory`` on ``prob``.

    torch_ufom modes return the :class:`~torch_ufom.MetaResult` of ``MetaOptimizer.backward``.
    """
    model, loss, support, query = prob
    params = list(model.parameters())
    method, _, rule = row_method.partition("+")
    if method in MODES or method == "ufomK":
        inner, learned = inner_rule(rule, model) if rule else (None, [])
        meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(params + learned, lr=0.1),
                                        inner_lr=None if inner else INNER_LR, inner=inner, steps=steps,
                                        mode="ufom" if method == "ufomK" else method, q=Q,
                                        generator=generator, **memory_args(memory))
        force = steps if method == "ufomK" else None

        def step():
            meta.zero_grad()
            return meta.backward(loss, loss, support, query, force_truncation=force)
        return step
    if method == "higher":
        import higher
        inner = optim_rule(rule, params) if rule else torch.optim.SGD(params, lr=INNER_LR)

        def step():
            with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(loss(fmodel, support))
                return torch.autograd.grad(loss(fmodel, query), params)
        return step
    if method == "unroll":
        names = [n for n, _ in model.named_parameters()]

        def at(phi):
            values = dict(zip(names, phi))
            return lambda *args: torch.func.functional_call(model, values, args)

        def step():  # the exact unroll as users write it: one graph of every step, one backward
            phi = params
            for _ in range(steps):
                grads = torch.autograd.grad(loss(at(phi), support), phi, create_graph=True)
                phi = [p.add(g, alpha=-INNER_LR) for p, g in zip(phi, grads)]
            return torch.autograd.grad(loss(at(phi), query), params)
        return step
    if method == "inplace" and rule:
        def step():  # the floor of fom+rule: the same loop stepping torch.optim's rule
            m = copy.deepcopy(model)
            ps = list(m.parameters())
            opt = optim_rule(rule, ps)
            for _ in range(steps):
                gs = torch.autograd.grad(loss(m, support), ps)
                for p, g in zip(ps, gs):
                    p.grad = g
                opt.step()
            return torch.autograd.grad(loss(m, query), ps)
        return step
    if method == "inplace":
        def step():  # issue 13's floor, as users write it
            m = copy.deepcopy(model)
            ps = list(m.parameters())
            for _ in range(steps):
                gs = torch.autograd.grad(loss(m, support), ps)
                with torch.no_grad():
                    for p, g in zip(ps, gs):
                        p.add_(g, alpha=-INNER_LR)
            return torch.autograd.grad(loss(m, query), ps)
        return step
    raise ValueError(f"Invalid method: {row_method!r}")


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
              threads: int, min_exact: int = 1, micro: bool = False, min_seconds: float = 0.0,
              repeat: Sequence[str] = ()) -> Dict:
    """Time ``rows`` (``"method/memory"``) at ``steps`` round-robin in this process, after a warm-up
    at ``steps=1``. ``ufom``, ``fom`` and ``inplace`` run ``ceil(UFOM_DRAWS / rounds)`` calls per round;
    ``ufom`` rows then run more rounds, interleaved with ``fom`` (whose extra calls are not kept), until
    ``min_exact`` draws took the exact branch and one did not (at most ``MAX_DRAWS``); the rows in
    ``repeat`` (a target's pair) run ``REPEAT`` calls per round. ``micro`` adds ``t_grad`` and ``t_hvp``
    to the rounds.
    Returns ``{row: {"times": [[wall, cpu], ...], "per_round", "in_rounds", "truncations", "fwd",
    "rev"}}``: the first ``in_rounds`` samples ran in the rounds with every row (``ufom`` rows: then
    the extra draws).
    """
    keep_freed_memory()
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
        per_round = {r: draws for r in fns if r.split("/")[0] in ("ufom", "fom", "inplace")}
        per_round.update({r: REPEAT for r in repeat if r in fns and r not in per_round})
        times = interleave({**fns, **tiny}, rounds, device, per_round, {k: 5 for k in tiny}, min_seconds)
        in_rounds = {row: len(ts) for row, ts in times.items()}

        def short(row):  # a ufom row still without its draws of both kinds
            ks = out[row]["truncations"]
            return len(ks) < MAX_DRAWS and (ks.count(steps) < min_exact or 0 not in ks)
        while lacking := [r for r in fns if r.startswith("ufom/") and short(r)]:
            more = {r: fns[r] for r in lacking + (["fom/-"] if "fom/-" in fns else [])}
            got = interleave(more, 1, device, {r: per_round.get(r, 1) for r in more})
            for row, ts in got.items():  # fom's extra calls ran beside ufom's but are not its samples
                if row.startswith("ufom/"):
                    times[row] += ts
        for row, ts in times.items():
            if row in tiny:
                out[row] = {"times": [list(s) for s in ts]}
                continue
            del out[row]["truncations"][len(ts):]  # fom's extra calls are logged too: drop them
            del out[row]["fwd"][len(ts):], out[row]["rev"][len(ts):]
            out[row]["times"] = [list(s) for s in ts]
            out[row]["per_round"] = per_round.get(row, 1)  # samples per round, in round order
            out[row]["in_rounds"] = in_rounds[row]  # the samples of the rounds; then ufom's extra draws
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
    """A row's time per outer step from its samples in the rounds: medians and spread; ``ufom``: the
    expectation ``(1 - q) median(first-order draws in the rounds) + q median(exact draws, in the
    rounds and after)``, the spread that of its first-order draws in the rounds, ``raw_wall`` /
    ``raw_cpu`` the plain means of its draws in the rounds; and the inner step counts."""
    n = r.get("in_rounds", len(r["times"]))
    ks = r.get("truncations", [])
    s = stats(r["times"][:n])
    if row.startswith("ufom/"):
        fo = [t for t, k in zip(r["times"][:n], ks) if k == 0]
        if fo:
            s = stats(fo)
        for i, c in enumerate(("wall", "cpu")):
            ex = [t[i] for t, k in zip(r["times"], ks) if k == steps]
            s[f"raw_{c}"] = statistics.fmean(t[i] for t in r["times"][:n])
            if fo and ex:
                s[c] = (1 - Q) * statistics.median(t[i] for t in fo) + Q * statistics.median(ex)
        s.update(expected=True, n_exact=ks.count(steps), n=n)
    if ks:
        by_k = {k: (f, b) for k, f, b in zip(ks, r["fwd"], r["rev"])}
        s["inner"] = " or ".join(f"{f} / {b}" for _, (f, b) in sorted(by_k.items()))
    return s


def rows_for(steps: int, max_replay: int, methods: Sequence[str], memories=MEMORIES) -> tuple:
    """``(rows, notes)``: the ``"method/memory"`` rows at ``steps``, and why any were skipped.

    ``fom``, ``higher``, ``inplace`` and ``unroll`` get one row each (memory ``-``).
    """
    rows, notes = [], []
    have_higher = importlib.util.find_spec("higher") is not None
    for m in methods:
        if m in ("inplace", "higher", "fom", "unroll"):
            if m != "higher" or have_higher:
                rows.append(f"{m}/-")
            continue
        for memory in memories:
            replay = steps * (steps - 1) // 2
            if memory == "recompute" and replay > max_replay:
                notes.append(f"{m}/recompute skipped at steps={steps}: its exact sweep replays "
                             f"{replay:,} inner steps (over --max-replay {max_replay:,}).")
            else:
                rows.append(f"{m}/{memory}")
    if not have_higher and "higher" in methods:
        notes.append("higher is not installed: its rows are skipped (pip install higher).")
    return rows, notes


def short_rows(steps: int, max_replay: int) -> tuple:
    """``(rows, notes)`` of the first table: the methods under every memory setting, ufom's forced
    exact branch under store and checkpoint, item 3's rows (``ITEM_3_ROWS``), and exact and ufomK
    with the other rules under store."""
    rows, notes = rows_for(steps, max_replay, ("inplace", "higher", "fom", "ufom", "exact"))
    rows += [f"ufomK/{m}" for m in ("store", "checkpoint")] + [r for r in ITEM_3_ROWS if r not in rows]
    rows += [f"{m}+{rule}/store" for rule in RULES for m in ("exact", "ufomK")]
    rows += [f"{m}+{rule}/-" for rule in FOM_RULES for m in ("inplace", "fom")]
    if any(r == "higher/-" for r in rows):  # the peer's exact unroll with the same rules
        rows += [f"higher+{rule}/-" for rule in FOM_RULES]
    return rows, notes


def long_rows() -> List[str]:
    """The rows of the budget table: exact under store, the default setting and the other budgets."""
    return ["exact/store", f"exact/{DEFAULT_MEMORY}"] + [f"exact/{b}" for b in OTHER_BUDGETS]


def measure_peaks(rows: Sequence[str], steps: Sequence[int], seed: int, device: str, threads: int,
                  model: str = "mlp", time_call: Sequence[bool] = ()) -> List[Dict[str, Any]]:
    """The peak memory of each row's outer step at its ``steps``, in this (fresh) process (see the module
    docstring; ``--tiny`` measures every row in one process), with a call's ``[wall, cpu]`` seconds:
    for the rows flagged in ``time_call``, one more call under the timing processes' allocator
    settings (:func:`~benchmarks.harness.keep_freed_memory`), else the peak-measuring call's."""
    time_call = list(time_call) or [False] * len(rows)
    with torch_threads(threads):
        prob = problem(model, seed, device)
        return [_peak(row, n, prob, seed, device, t) for row, n, t in zip(rows, steps, time_call)]


def _map_large_blocks() -> None:
    """Map every block of 32 KiB or more on its own (glibc's ``M_MMAP_THRESHOLD``; a no-op elsewhere),
    so that the peak RSS follows live memory: at larger thresholds the MLP's 80 KB activations and
    gradients come from a fragmented heap, and identical calls peak apart (docs/benchmarks.md)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 32 * 1024)  # M_MMAP_THRESHOLD


def _peak(row: str, steps: int, prob, seed: int, device: str, time_call: bool = False) -> Dict[str, Any]:
    _map_large_blocks()
    method, memory = row.split("/")
    outer_step(method, memory, 1, prob)()
    gen = torch.Generator(device=device).manual_seed(seed) if method == "ufom" else None
    step = outer_step(method, memory, steps, prob, gen)
    draws = 0
    with PeakMemory(device) as mem:
        while True:
            wall, cpu = time.perf_counter(), time.process_time()
            res, draws = step(), draws + 1
            call = [time.perf_counter() - wall, time.process_time() - cpu]
            if method != "ufom" or res.truncation == steps or draws == MAX_DRAWS:
                break
    if time_call:  # mapping every block costs page faults: time a call as the timing processes would
        keep_freed_memory()
        call = list(clock(step, device))
    out = {"peak_mb": mem.peak_bytes / MB, "peak_exact": mem.exact, "draws": draws, "call": call}
    if isinstance(res, torch_ufom.MetaResult):
        out.update(fwd=res.forward_steps, rev=res.reverse_steps)
    return out


# -- fresh children: one import, a forked process per measurement --------------------------
JOBS = {"times": time_rows, "peaks": measure_peaks}


def run_jobs(jobs: Sequence[Dict[str, Any]], parallel: int = 1) -> List[Any]:
    """Run each job (``{"task": "times" | "peaks", **keywords}``) in a child forked from this process,
    at most ``parallel`` at a time (its own allocator and peak memory, without importing torch again);
    return their results in order. Without ``os.fork`` or on CUDA the jobs run here, one by one.
    """
    if not hasattr(os, "fork") or any(j.get("device", "cpu") != "cpu" for j in jobs):
        return [_run_job(j) for j in jobs]
    results: List[Any] = [None] * len(jobs)
    pending, running = list(enumerate(jobs)), {}
    with tempfile.TemporaryDirectory() as tmp:
        while pending or running:
            while pending and len(running) < parallel:
                i, job = pending.pop(0)
                path = os.path.join(tmp, f"{i}.json")
                pid = os.fork()
                if pid == 0:  # the child: write the result (or the traceback) and leave at once
                    code = 0
                    try:
                        text = json.dumps(_run_job(job))
                    except BaseException:  # noqa: BLE001 -- reported by the parent
                        text, code = json.dumps({"error": traceback.format_exc()}), 1
                    with open(path, "w") as f:
                        f.write(text)
                    os._exit(code)
                running[pid] = (i, path)
            pid, status = os.wait()
            i, path = running.pop(pid)
            with open(path) as f:
                results[i] = json.load(f)
            if os.waitstatus_to_exitcode(status) != 0:
                raise RuntimeError(f"measurement {jobs[i]} failed:\n{results[i].get('error', status)}")
    return results


def _run_job(job: Dict[str, Any]) -> Any:
    spec = dict(job)
    return JOBS[spec.pop("task")](**spec)


def expected_ratio(ufom: Dict, fom: Dict, steps: int, basis: str,
                   forced: Optional[Dict] = None) -> Optional[float]:
    """ufom's expected time over fom's from rows timed in the same rounds (:func:`time_rows`):
    ``(1 - Q)`` x the median of ufom's first-order draws over fom's calls (call by call where both
    ran as many calls per round, :func:`~benchmarks.harness.interleave` alternating them; else each
    the round's median) ``+ Q`` x median exact call / median fom call; ``None`` without both kinds
    of draws. The first-order draws are those of the rounds, the exact calls ufom's draws that took
    ``K = steps`` (in the rounds, and in the extra rounds that interleave ufom with fom) and, given
    ``forced`` (the ``ufomK`` row under the same memory setting, timed in the same rounds), its calls
    too: the same work, forced instead of drawn. At ``q = 0.1`` ufom draws one to three exact branches, and
    neighbouring calls differ on a loaded machine (docs/benchmarks.md); ``forced`` adds its calls from
    every round."""
    i = ("wall", "cpu").index(basis)
    n, m = ufom["per_round"], fom["per_round"]
    calls = [t[i] for t in fom["times"]]
    first = []
    if n == m:
        first = [t[i] / c for t, K, c in zip(ufom["times"], ufom["truncations"], calls) if K == 0]
    else:
        for k in range(len(calls) // m):
            xs = [t[i] for t, K in zip(ufom["times"][k * n:(k + 1) * n],
                                       ufom["truncations"][k * n:(k + 1) * n]) if K == 0]
            if xs:
                first.append(statistics.median(xs) / statistics.median(calls[k * m:(k + 1) * m]))
    exact = [t[i] for t, K in zip(ufom["times"], ufom["truncations"]) if K == steps]
    if not first or not exact:
        return None
    exact += [t[i] for t in forced["times"]] if forced else []
    return (1 - Q) * statistics.median(first) + Q * statistics.median(exact) / statistics.median(calls)


def targets(results: Dict[str, Dict], basis: str, samples: Optional[Dict[str, Dict]] = None) -> List[Target]:
    """Issue 13's items 3 and 4; with the rows' ``samples`` (:func:`time_rows`, by ``"row@steps"``)
    the time ratios pair the rows round by round, else they are ratios of medians."""
    samples = samples or {}

    def ratio(a, b, steps, key=basis):
        sa, sb = samples.get(f"{a}@{steps}"), samples.get(f"{b}@{steps}")
        if key == basis and sa and sb:
            if a.startswith("ufom/"):
                return expected_ratio(sa, sb, steps, basis, samples.get(f"ufomK/{a[5:]}@{steps}"))
            return paired_ratio(sa, sb, basis)[0]
        ra, rb = results.get(f"{a}@{steps}", {}), results.get(f"{b}@{steps}", {})
        return ra[key] / rb[key] if key in ra and key in rb and rb[key] > 0 else None
    out = []
    for m in ITEM_3_MEMORIES:
        out += [Target(f"item 3: ufomK/{m} {basis} time / exact/{m} at steps={AT}",
                       ratio(f"ufomK/{m}", f"exact/{m}", AT), UFOM_K_VS_EXACT),
                Target(f"item 3: ufomK/{m} peak memory / exact/{m} at steps={AT}",
                       ratio(f"ufomK/{m}", f"exact/{m}", AT, "peak_mb"), UFOM_K_PEAK)]
    d = DEFAULT_MEMORY
    out += [Target(f"item 4: ufom/{d} (default) {basis} time / fom at steps={AT}",
                   ratio(f"ufom/{d}", "fom/-", AT), UFOM_VS_FOM),
            Target(f"item 4: exact/{d} (default) peak memory / exact/store at steps={LONG}",
                   ratio(f"exact/{d}", "exact/store", LONG, "peak_mb"), LONG_PEAK_VS_STORE),
            Target(f"item 4: exact/{d} (default) {basis} time / exact/store at steps={LONG}",
                   ratio(f"exact/{d}", "exact/store", LONG), LONG_TIME_VS_STORE)]
    return out


def _cells(r: Dict[str, Any]) -> List[str]:
    e = " (E)" if r.get("expected") else " (1 call)" if r.get("one_call") else ""
    return [f"{r['wall']:.4g}{e}", f"{r['cpu']:.4g}{e}", spread(r, "cpu") if not r.get("one_call") else "-",
            f"{r['peak_mb']:.1f}" + ("" if r["peak_exact"] else " (upper bound)")]


def _inner(r: Dict[str, Any]) -> str:
    return r.get("inner") or (f"{r['fwd']} / {r['rev']}" if "fwd" in r else "-")


def tables(results: Dict[str, Dict], basis: str, long_steps) -> tuple:
    """The two Markdown tables (every row at the short steps; the budgets at ``long_steps``)."""
    short, long = [], []
    for key, r in results.items():
        row, steps = key.split("@")
        method = row.split("/")[0]
        if int(steps) == long_steps:
            st = results.get(f"exact/store@{steps}", {})
            long.append([row, steps, *_cells(r), fmt(st.get(basis) and r[basis] / st[basis], ".2f", "x"),
                         fmt(st.get("peak_mb") and r["peak_mb"] / st["peak_mb"], ".3f", "x"), _inner(r)])
            continue
        rule = row.split("/")[0].partition("+")[2]
        same = f"+{rule}" if rule in FOM_RULES else ""  # the hand-written loop and higher with that rule
        ref = {m: results.get(f"{m}{same}/-@{steps}", {}).get(basis) for m in ("higher", "inplace")}
        # (no peer computes what these rows compute: review s32K F2; higher's Adam is another update)
        if rule in ("lr", "adam"):
            ref["higher"] = None
        if rule == "lr":
            ref["inplace"] = None
        twin = f"{row.replace('ufomK', 'exact', 1)}@{steps}"
        exact = results.get(twin) if method.startswith("ufomK") else None
        vs_exact = (f"{r[basis] / exact[basis]:.3f}x / {r['peak_mb'] / exact['peak_mb']:.3f}x"
                    if exact and exact["peak_mb"] > 0 else "-")
        short.append([row, steps, *_cells(r),
                      *(fmt(ref[m] and r[basis] / ref[m], ".2f", "x", "n/a") for m in ("higher", "inplace")),
                      vs_exact, _inner(r)])
    head = ["row", "steps", "wall / outer step (s)", "CPU / outer step (s)", "spread", "peak memory (MiB)"]
    return (markdown_table(head + [f"{basis} / higher", f"{basis} / inplace", "ufomK / exact: time / peak",
                                   "inner fwd / rev"], short, "lrrrrrrrrr"),
            markdown_table(head + [f"{basis} / store", "peak / store", "inner fwd / rev"], long, "lrrrrrrrr"))


def main(argv=None) -> Dict[str, Any]:
    """Measure every row (times: a fresh process per steps value; peaks: one per row); write the report."""
    p = parser(NAME, __doc__, {"quick": f"steps {AT} {LONG}, 5 rounds, --max-replay 1000",
                               "tiny": "steps 2 3 (3 for the budget table), 1 round"})
    p.add_argument("--steps", type=positive_int, nargs="+",
                   help=f"inner steps (default 10 {AT} {LONG}); the last one gets the budget table")
    p.add_argument("--rounds", type=positive_int, help="timing rounds, at least (default 7; --quick 5)")
    p.add_argument("--max-replay", type=positive_int, help="skip recompute rows replaying more inner steps")
    p.add_argument("--worker", help="internal: one measurement in this process, printed as JSON")
    args = parse(p, argv)
    if args.worker:  # {"jobs": [...], "parallel": n}: see run_jobs
        spec = json.loads(args.worker)
        print(json.dumps(run_jobs(spec["jobs"], spec.get("parallel", 1))))
        return {}
    steps_list, rounds, max_replay, time_budgets = SIZES[args.size]
    steps_list, rounds = list(dict.fromkeys(args.steps or steps_list)), args.rounds or rounds
    max_replay = args.max_replay or max_replay
    common = dict(seed=args.seed, device=args.device, threads=args.threads)
    results, notes, timed, rows_all = {}, [], [], []
    long_steps = steps_list[-1] if len(steps_list) > 1 else None
    for steps in steps_list:
        if steps == long_steps:
            rows = long_rows() if time_budgets else long_rows()[:2]
            peak_rows = long_rows()
        else:
            rows, skipped = short_rows(steps, max_replay)
            notes += skipped
            peak_rows = rows
        timed.append((steps, rows))
        rows_all += [(r, steps) for r in peak_rows]
    # The timing child and the peak children run side by side on the two cores (the peaks take half
    # as long); the rounds interleave the rows, so a neighbour's load falls on all of them alike.
    groups = [rows_all] if args.size == "tiny" else sorted(([x] for x in rows_all), key=lambda g: -g[0][1])
    with ThreadPoolExecutor(max_workers=2) as pool:
        timing = pool.submit(run_fresh, f"benchmarks.{NAME}", worker_args({"jobs": [
            dict(task="times", model="mlp", rows=rows, steps=steps, rounds=rounds, min_exact=MIN_EXACT,
                 repeat=ITEM_3_ROWS if steps == AT else (), **common)
            for steps, rows in timed]}))
        timed_rows = {(r, n) for n, rs in timed for r in rs}
        peaking = pool.submit(run_fresh, f"benchmarks.{NAME}", worker_args({"jobs": [
            dict(task="peaks", rows=[r for r, _ in g], steps=[n for _, n in g],
                 time_call=[x not in timed_rows for x in g], **common) for g in groups]}))
        got, peaks = timing.result(), peaking.result()
    samples = {}
    for (steps, rows), times in zip(timed, got):
        results.update({f"{r}@{steps}": summarise(r, steps, times[r]) for r in rows})
        samples.update({f"{r}@{steps}": times[r] for r in rows})
    for (r, n), peak in zip([x for g in groups for x in g], [x for part in peaks for x in part]):
        one_call = {"one_call": True, "wall": peak["call"][0], "cpu": peak["call"][1]}
        results.setdefault(f"{r}@{n}", one_call).update(peak)
    basis = args.basis
    short, long = tables(results, basis, long_steps)
    widths = "-".join(map(str, problems.MLP_WIDTHS))
    params = sum(a * b + b for a, b in zip(problems.MLP_WIDTHS[:-1], problems.MLP_WIDTHS[1:]))
    budgets = ", ".join(f"`{b}`" for b in OTHER_BUDGETS) + " (`max_memory=` in bytes)"
    fields = dict(at=AT, widths=widths, params=params, lr=INNER_LR, seed=args.seed, rounds=rounds,
                  basis=basis, table=short, long_table=long,
                  short=", ".join(map(str, steps_list[:-1] or steps_list)),
                  long=long_steps or "-", default=DEFAULT_MEMORY, budgets=budgets, min_exact=MIN_EXACT,
                  notes="".join(f"\n- {n}" for n in notes))
    return write_report(args, NAME, TEMPLATE, fields, {"rows": results, "samples": samples, "notes": notes,
                                                       "default_memory": DEFAULT_MEMORY,
                                                       "other_budgets": list(OTHER_BUDGETS)},
                        targets(results, basis, samples))


if __name__ == "__main__":
    main()
