"""Learned per-parameter inner learning rates on digits: a long inner loop where memory matters.

``python -m benchmarks.hyper [--quick | --tiny]``; the report states the problem, sizes and methods
(:data:`LABELS`: torch_ufom's modes, ``higher`` and ``torch_maml``). Every (method, steps) run is a
fresh process: a warm-up at ``steps=1``, then timed outer steps under
:class:`benchmarks.harness.PeakMemory`.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
import warnings
from collections import namedtuple
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

import torch_ufom
from benchmarks import problems
from benchmarks.harness import (MB, PeakMemory, Target, fmt, markdown_table, parse, parser, plot_panels,
                                positive_int, progress, run_fresh_many, sync, torch_threads, worker_args,
                                write_report)
from benchmarks.maml import available

NAME = "hyper"
METHODS = ("ufom", "exact", "fom", "higher", "torch_maml")
PEERS = ("higher", "torch_maml")  # methods of the module of that name
LABELS = {"ufom": "ufom (q=0.1, checkpoint)", "exact": "exact (store)", "fom": "fom (checkpoint)",
          "higher": "higher (exact unroll)", "torch_maml": "torch_maml (checkpointed)"}
Q, BATCH, VAL_SIZE = 0.1, 64, 500
RATE0, WD0 = 0.05, 1e-3  # initial per-parameter inner learning rate and weight decay
OUTER_LR, WD_LR = 0.01, 1e-4  # Adam's step sizes on the rates and on the weight decay
TARGET_STEPS, MEMORY_TARGET = 1000, 0.1
# (steps, outer steps, hidden width, default methods) per size
SIZES = {"full": ([100, 1000], 10, 128, METHODS),
         "quick": ([100, 1000], 2, 128, ("ufom", "exact", "higher", "torch_maml")),
         "tiny": ([8], 2, 16, METHODS)}

TEMPLATE = """# Learned per-parameter inner learning rates on digits (benchmarks/hyper.py)

Command: `{command}`

Device {device}, torch {torch}, {threads} thread(s) per run. MLP 64-{hidden}-{hidden}-10 ({params:,}
parameters, ReLU, float32) trained from a fixed initialisation by r inner SGD steps (batches of {batch}
from the digits train split) with learned per-parameter rates (start {rate0}) and a learned weight decay
(start {wd0}); outer loss: cross-entropy on {val} validation images; outer Adam (rates lr {outer_lr},
weight decay lr {wd_lr}), {outer_steps} outer steps, seed {seed}.

*val loss start -> end*: at the initial hyperparameters and after the last update (plain torch.func);
times: the training loop (all outer steps); peak memory above the memory in use before training, in a
fresh process per run; *1st hypergrad vs exact*: ||g - g_exact|| / ||g_exact|| at the first outer step.

{table}
{notes}"""


# -- the problem ---------------------------------------------------------------------------
def digits_split(seed: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_val, y_val)``: sklearn's digits / 16, ``VAL_SIZE`` images for validation."""
    x, y = problems.load_digits()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    val, train = perm[:VAL_SIZE], perm[VAL_SIZE:]
    return x[train], y[train], x[val], y[val]


def support_batches(x: Tensor, y: Tensor, steps: int, seed: int) -> List[Tuple[Tensor, Tensor]]:
    """``steps`` minibatches of ``BATCH`` train images: epochs of seeded permutations."""
    gen, out = torch.Generator().manual_seed(seed + 1), []
    while len(out) < steps:
        perm = torch.randperm(len(y), generator=gen).to(x.device)
        for k in range(min(len(y) // BATCH, steps - len(out))):
            idx = perm[k * BATCH:(k + 1) * BATCH]
            out.append((x[idx], y[idx]))
    return out


def init_hyper(model: nn.Module) -> Tuple[Dict[str, Tensor], Tensor]:
    """Fresh meta-parameters: per-parameter rates (``RATE0``) and a scalar weight decay (``WD0``)."""
    rates = {n: torch.full_like(p, RATE0).requires_grad_() for n, p in model.named_parameters()}
    first = next(model.parameters())
    return rates, torch.tensor(WD0, dtype=first.dtype, device=first.device, requires_grad=True)


def make_outer(model: nn.Module, rates: Dict[str, Tensor], wd: Tensor) -> torch.optim.Adam:
    """Adam over the (fixed, lr 0) model parameters, the rates and the weight decay."""
    return torch.optim.Adam([{"params": list(model.parameters()), "lr": 0.0},
                             {"params": list(rates.values()), "lr": OUTER_LR}, {"params": [wd], "lr": WD_LR}])


def plain_val_loss(model: nn.Module, rates: Dict[str, Tensor], wd: Tensor, batches, val) -> float:
    """The validation loss after the inner loop, by a plain ``torch.func`` loop (no library)."""
    phi = {n: p.detach() for n, p in model.named_parameters()}
    for batch in batches:
        phi = {n: p.requires_grad_() for n, p in phi.items()}
        grads = torch.autograd.grad(problems.xent(lambda x: functional_call(model, phi, (x,)), batch),
                                    list(phi.values()))
        with torch.no_grad():
            phi = {n: p - rates[n].detach() * (g + wd.detach() * p) for (n, p), g in zip(phi.items(), grads)}
    with torch.no_grad():
        return float(problems.xent(lambda x: functional_call(model, phi, (x,)), val))


# -- torch_maml ----------------------------------------------------------------------
def make_torch_maml_optimizer(torch_maml_module):
    """The :class:`PerParameterSGD` class, built on the installed ``torch_maml``."""
    base = torch_maml_module.IngraphGradientDescent

    class PerParameterSGD(base):
        """torch_maml in-graph SGD with per-parameter rates and weight decay in its state.

        The state ``(lrs, weight_decay)`` is returned unchanged by every step;
        ``GradientCheckpointMAML`` passes it through its checkpoints as
        differentiable input, so the rates receive hypergradients.
        """

        OptimizerState = namedtuple("OptimizerState", ["lrs", "weight_decay"])

        def __init__(self, lrs: Sequence[Tensor], weight_decay: Tensor):
            nn.Module.__init__(self)
            self.lrs, self.wd = list(lrs), weight_decay

        def get_initial_state(self, module, *, parameters, **kwargs):
            return self.OptimizerState(list(self.lrs), self.wd)

        def step(self, state, module, loss, parameters=None, detach=False, **kwargs):
            params = list(parameters)
            grads = torch.autograd.grad(loss, params, create_graph=not detach)
            updates = {}
            for p, g, lr in zip(params, grads, state.lrs):
                u = p - lr * (g + state.weight_decay * p)
                updates[p] = u.detach().requires_grad_(p.requires_grad) if detach else u
            keep = [t for t in list(module.parameters()) + list(module.buffers())
                    if t not in updates]
            return state, torch_maml_module.copy_and_replace(module, updates, keep)

    return PerParameterSGD


def checkpoint_every(steps: int) -> int:
    """torch_maml's ``checkpoint_steps``: ``ceil(sqrt(steps))`` (minimises its peak memory)."""
    return max(1, math.ceil(math.sqrt(steps)))


# -- one method's training (worker) ------------------------------------------------------
def make_trainer(method: str, model: nn.Module, rates, wd, outer, steps: int, batches, val,
                 generator: Optional[torch.Generator]):
    """Return ``step(force=None) -> dict`` running one outer gradient (not the update) of ``method``.

    The dict holds the validation loss before the update (``val``) and, for
    torch_ufom, the truncation point and the inner step counts.
    """
    names, xent = list(rates), problems.xent
    if method in ("ufom", "exact", "fom"):
        memory = "store" if method == "exact" else "checkpoint"
        meta = torch_ufom.MetaOptimizer(
            model, outer, inner=torch_ufom.inner.SGD(lr=rates, weight_decay=wd), steps=steps,
            mode=method, q=Q, memory=memory, generator=generator)

        def step(force=None):
            res = meta.backward(xent, xent, lambda j: batches[j], val, force_truncation=force)
            return {"val": float(res.outer_loss), "K": res.truncation,
                    "fwd": res.forward_steps, "rev": res.reverse_steps}
        return step

    if method == "higher":
        import higher
        inner = torch.optim.SGD([{"params": [p]} for p in model.parameters()], lr=RATE0)
        override = {"lr": [rates[n] for n in names], "weight_decay": [wd] * len(names)}

        def step(force=None):
            with higher.innerloop_ctx(model, inner, copy_initial_weights=False,
                                      override=override) as (fmodel, diffopt):
                for batch in batches:
                    diffopt.step(xent(fmodel, batch))
                loss = xent(fmodel, val)
                loss.backward()
            return {"val": float(loss.detach())}
        return step

    if method == "torch_maml":
        import torch_maml
        opt = make_torch_maml_optimizer(torch_maml)([rates[n] for n in names], wd)
        maml = torch_maml.GradientCheckpointMAML(model, xent, optimizer=opt,
                                                 checkpoint_steps=checkpoint_every(steps))

        def step(force=None):
            result = maml(batches)
            loss = xent(result.model, val)
            loss.backward()
            return {"val": float(loss.detach())}
        return step

    raise ValueError(f"Invalid method: {method!r} (expected one of {', '.join(METHODS)})")


def run_method(method: str, steps: int, outer_steps: int, hidden: int, device: str, seed: int,
               grad_path: str, threads: int = 1) -> Dict[str, Any]:
    """Train one method in this process; return a JSON-able dict (warm-up, timed outer steps, peak memory)."""
    with torch_threads(threads), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*use_reentrant.*")  # torch.utils.checkpoint in torch_maml
        x_tr, y_tr, x_val, y_val = (t.to(device) for t in digits_split(seed))
        val = (x_val, y_val)
        model = problems.seeded(seed, lambda: problems.mlp(64, hidden, hidden, 10), device=device)
        rates, wd = init_hyper(model)  # warm-up: one outer gradient at steps=1, thrown away
        make_trainer(method, model, rates, wd, make_outer(model, rates, wd), 1,
                     support_batches(x_tr, y_tr, 1, seed), val, None)()
        batches = support_batches(x_tr, y_tr, steps, seed)
        rates, wd = init_hyper(model)
        outer = make_outer(model, rates, wd)
        step = make_trainer(method, model, rates, wd, outer, steps, batches, val,
                            torch.Generator(device=device).manual_seed(seed))
        out = {"val": [], "wall": [0.0], "cpu": [0.0], "truncations": [], "fwd": [], "rev": [],
               "probe": False}
        with PeakMemory(device) as mem:
            for k in range(outer_steps):
                sync(device)
                w0, c0 = time.perf_counter(), time.process_time()
                outer.zero_grad()
                info = step()
                sync(device)
                w1, c1 = time.perf_counter(), time.process_time()
                if k == 0:  # the hypergradient of the rates and weight decay, saved out of the clock
                    grads = [torch.zeros_like(t) if t.grad is None else t.grad for t in [*rates.values(), wd]]
                    torch.save(torch.cat([g.detach().flatten() for g in grads]).cpu(), grad_path)
                w2, c2 = time.perf_counter(), time.process_time()
                outer.step()
                with torch.no_grad():
                    for t in [*rates.values(), wd]:
                        t.clamp_(min=0.0)
                sync(device)
                out["wall"].append(out["wall"][-1] + (w1 - w0) + time.perf_counter() - w2)
                out["cpu"].append(out["cpu"][-1] + (c1 - c0) + time.process_time() - c2)
                out["val"].append(info["val"])
                for key, name in (("K", "truncations"), ("fwd", "fwd"), ("rev", "rev")):
                    if key in info:
                        out[name].append(info[key])
        peak, exact = mem.peak_bytes, mem.exact
        if method == "ufom" and steps not in out["truncations"]:  # no exact branch drawn: measure one
            outer.zero_grad()
            with PeakMemory(device) as probe:
                info = step(force=steps)
            outer.zero_grad()
            peak, exact = max(peak, probe.peak_bytes), exact and probe.exact
            out.update(probe=True, fwd_probe=info["fwd"], rev_probe=info["rev"])
        out["val"].append(plain_val_loss(model, rates, wd, batches, val))
    return {**out, "peak_mb": peak / MB, "peak_exact": exact, "checkpoint_steps": checkpoint_every(steps),
            "rate_mean": float(torch.cat([r.detach().flatten() for r in rates.values()]).mean()),
            "wd": float(wd.detach())}


# -- the driver ----------------------------------------------------------------------------
def target(runs: Dict[str, Dict[str, Any]]) -> Target:
    """ufom/checkpoint's peak memory over exact/store's at ``TARGET_STEPS``."""
    u, e = runs.get(f"ufom/{TARGET_STEPS}", {}), runs.get(f"exact/{TARGET_STEPS}", {})
    ratio = u["peak_mb"] / e["peak_mb"] if "peak_mb" in u and e.get("peak_mb") else None
    return Target(f"ufom (checkpoint) peak memory / exact (store) peak memory at steps={TARGET_STEPS}", ratio,
                  MEMORY_TARGET)


def table(runs: Dict[str, Dict[str, Any]]) -> Tuple[str, List[str]]:
    """The Markdown table and its notes."""
    rows, notes = [], []
    for key, r in runs.items():
        method, steps = key.split("/")
        ref = runs.get(f"exact/{steps}", {})
        end, ref_end = r["val"][-1], ref.get("val", [None])[-1]
        ks = r["truncations"]
        branches = "-" if method != "ufom" else (f"{ks.count(int(steps))}/{len(ks)}"
                                                 + (" (+1 probe)" if r["probe"] else ""))
        rows.append([LABELS[method], steps, f"{r['val'][0]:.4f} -> {end:.4f}",
                     "n/a" if ref_end is None else f"{end - ref_end:+.4f} ({end / ref_end - 1:+.1%})",
                     f"{r['wall'][-1]:.1f}", f"{r['cpu'][-1]:.1f}",
                     f"{r['cpu'][-1] / (len(r['wall']) - 1):.3f}",
                     f"{r['peak_mb']:.1f}" + ("" if r["peak_exact"] else " (upper bound)"),
                     f"{r['peak_mb'] / ref['peak_mb']:.3f}" if ref.get("peak_mb") else "n/a", branches,
                     f"{sum(r['fwd']) / len(ks):.0f} / {sum(r['rev']) / len(ks):.0f}" if ks else "-",
                     fmt(r.get("hypergrad_vs_exact"), ".2e", none="n/a")])
        if r["probe"]:
            notes.append(f"ufom at steps={steps}: no training draw took the exact branch; the peak includes "
                         f"one forced exact-branch outer gradient ({r['fwd_probe']} / {r['rev_probe']} "
                         "inner steps).")
        if method == "torch_maml":
            notes.append(f"torch_maml at steps={steps}: checkpoint every {r['checkpoint_steps']} steps.")
    return markdown_table(["method", "steps", "val loss start -> end", "end vs exact", "wall (s)",
                           "CPU (s)", "CPU s / outer step", "peak memory (MiB)", "peak / exact",
                           "exact branches", "inner fwd / rev per outer step", "1st hypergrad vs exact"],
                          rows, "lrlrrrrrrrrr"), notes


def main(argv=None) -> Dict[str, Any]:
    """Run every (method, steps) in its own process; write ``hyper.md``, ``hyper.json`` and ``hyper.png``.

    Returns the JSON data: ``runs`` (``"method/steps"`` -> trajectories, times,
    peak memory and ``hypergrad_vs_exact``) and ``notes``.
    """
    p = parser(NAME, __doc__, {"quick": "steps 100 1000, 2 outer steps, no fom",
                               "tiny": "steps 8, 2 outer steps, hidden 16, in this process"})
    p.add_argument("--steps", type=positive_int, nargs="+", help="inner steps (default 100 1000)")
    p.add_argument("--outer-steps", type=positive_int, help="outer steps per run (default 10)")
    p.add_argument("--hidden", type=positive_int, help="hidden width of the MLP (default 128)")
    p.add_argument("--methods", nargs="+", choices=METHODS, help="default all; --quick: all but fom")
    p.add_argument("--workers", type=positive_int, default=2, help="fresh processes at a time (default 2)")
    p.add_argument("--in-process", action="store_true", help="every run in this process (implied by --tiny; "
                   "peak memory is then only indicative)")
    p.add_argument("--worker", help="internal: one run in this process, printed as JSON")
    args = parse(p, argv)
    if args.worker:
        print(json.dumps(run_method(**json.loads(args.worker))))
        return {}
    steps_list, outer_steps, hidden, methods = SIZES[args.size]
    args.steps = list(dict.fromkeys(args.steps or steps_list))
    args.outer_steps = args.outer_steps or outer_steps
    args.hidden, args.in_process = args.hidden or hidden, args.in_process or args.size == "tiny"
    notes = [f"{m} is not installed: its rows are skipped (pip install {m})."
             for m in args.methods or methods if m in PEERS and not available(m)]
    methods = [m for m in args.methods or methods if m not in PEERS or available(m)]
    notes += ([f"Runs went {args.workers} processes at a time: each peak is its own process's, but the times "
               "were taken while sharing the cores (--workers 1 for timings)."] if not args.in_process
              and args.workers > 1 else [])
    if args.in_process:
        notes.append("All runs in this one process (--in-process): peak memory only indicative.")
    with tempfile.TemporaryDirectory(prefix="hyper_") as tmp:
        jobs = [(m, s) for s in args.steps for m in methods]
        specs = [dict(method=m, steps=s, outer_steps=args.outer_steps, hidden=args.hidden, device=args.device,
                      seed=args.seed, grad_path=os.path.join(tmp, f"{m}_{s}.pt"), threads=args.threads)
                 for m, s in jobs]
        got = ([run_method(**spec) for spec in progress(specs, NAME, not args.no_progress)] if args.in_process
               else run_fresh_many(f"benchmarks.{NAME}", [worker_args(s) for s in specs], args.workers, NAME,
                                   not args.no_progress))
        runs = {f"{m}/{s}": r for (m, s), r in zip(jobs, got)}
        for m, s in jobs:
            ref = os.path.join(tmp, f"exact_{s}.pt")
            if os.path.exists(ref):
                g, e = torch.load(os.path.join(tmp, f"{m}_{s}.pt")), torch.load(ref)
                runs[f"{m}/{s}"]["hypergrad_vs_exact"] = float((g - e).norm() / e.norm().clamp_min(1e-30))
    text, table_notes = table(runs)
    panels = [{"series": {LABELS[m]: (runs[f"{m}/{s}"]["wall"], runs[f"{m}/{s}"]["val"]) for m in methods},
               "title": f"steps = {s}", "xlabel": "wall time of training (s)", "ylabel": "validation loss"}
              for s in args.steps]
    panels.append({"series": {LABELS[m]: (args.steps, [max(runs[f"{m}/{s}"]["peak_mb"], 1e-2)
                                                       for s in args.steps]) for m in methods},
                   "title": "peak memory above baseline", "xlabel": "inner steps", "ylabel": "MiB",
                   "logx": True, "logy": True})
    figure = plot_panels(os.path.join(args.out, f"{NAME}.png"), panels, ncols=len(panels),
                         title=f"Learned per-parameter inner rates on digits, hidden {args.hidden}")
    params = sum(a * b + b for a, b in zip((64, args.hidden, args.hidden), (args.hidden, args.hidden, 10)))
    return write_report(args, NAME, TEMPLATE, dict(
        vars(args), params=params, batch=BATCH, rate0=RATE0, wd0=WD0, val=VAL_SIZE, outer_lr=OUTER_LR,
        wd_lr=WD_LR, table=text, notes="".join(f"\n- {n}" for n in notes + table_notes)),
        {"runs": runs, "notes": notes + table_notes},
        [target(runs)], [figure])


if __name__ == "__main__":
    main()
