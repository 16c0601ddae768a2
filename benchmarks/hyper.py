"""Learned per-parameter inner learning rates on digits: a long inner loop where memory matters.

The problem (hyperparameter learning, not MAML): an MLP
``Linear(64, H)-ReLU-Linear(H, H)-ReLU-Linear(H, 10)`` (``H = --hidden``,
default 128: 26,122 parameters, float32) is trained from one fixed, seeded
initialisation by ``steps`` inner SGD steps on minibatches of 64 from the
train split of scikit-learn's bundled ``load_digits`` (pixels / 16; the batch
sequence is fixed by the seed and shared by every method). The
meta-parameters are

* per-parameter inner learning rates: a dict from parameter name to a tensor
  of the parameter's shape (every weight and bias has its own rate), started
  at ``RATE0``;
* one scalar weight decay tensor, started at ``WD0``;

both held by the outer optimizer and passed to torch_ufom as
``inner=torch_ufom.inner.SGD(lr=rates, weight_decay=wd)``. The inner update is
``phi <- phi - rate * (g + wd * phi)``. The outer loss is the cross-entropy on
the validation split (500 images) after the inner loop. Outer optimizer: Adam
with three groups: the model's parameters (lr 0: the initialisation stays
fixed, but torch_ufom needs every adapted parameter held by the outer
optimizer), the rates (lr ``OUTER_LR``) and the weight decay (lr ``WD_LR``);
after each outer step the rates and the weight decay are clipped at 0.

Methods (each trains its own copy of the same hyperparameters):

* ``ufom``: ``MetaOptimizer(mode="ufom", q=0.1, memory="checkpoint")``;
* ``exact``: ``MetaOptimizer(mode="exact", memory="store")``;
* ``fom``: ``MetaOptimizer(mode="fom", memory="checkpoint")`` (the biased
  first-order reference; not a target);
* ``higher``: ``higher.innerloop_ctx(model, SGD, copy_initial_weights=False,
  override={"lr": [rate per parameter], "weight_decay": [wd] * n})``, one SGD
  parameter group per parameter, the exact unrolled graph, then
  ``backward`` of the validation loss;
* ``torch_maml``: ``torch_maml.GradientCheckpointMAML`` (``torch.utils.checkpoint``
  every ``ceil(sqrt(steps))`` steps) with an in-graph optimizer
  (:class:`PerParameterSGD`, a subclass of ``torch_maml.IngraphGradientDescent``)
  whose *optimizer state* carries the rates and the weight decay. torch_maml's
  built-in optimizers only take one learning rate; its optimizer state is
  passed through the checkpoints as differentiable input, which is what lets
  this subclass learn per-parameter rates (checked: the same hypergradient as
  ``exact`` to float64 round-off).

How it measures: every (method, steps) run is a fresh Python process
(``python -m benchmarks.hyper --worker ...``), one at a time, one CPU thread
(``--threads``). The process loads the data, builds the problem, makes one
warm-up outer gradient at ``steps=1`` (not stepped), then trains
``--outer-steps`` outer steps under :class:`benchmarks.harness.PeakMemory`
(CPU: the process's own peak RSS, ``VmHWM`` on Linux, above the RSS before training; CUDA:
``torch.cuda.max_memory_allocated`` above the memory allocated before). Each
outer step's wall-clock and process CPU time are recorded. ``ufom`` draws from
a ``torch.Generator`` seeded ``--seed``; if no draw took the exact branch
during training, one more outer gradient with the exact branch forced
(``force_truncation=steps``, not timed, not stepped) is measured for the
peak, so that ``ufom``'s peak memory is always its exact branch's. The
validation loss after the last update is computed by a plain ``torch.func``
loop, independent of every library compared.

The first outer step's hypergradient (rates and weight decay) of every
method is compared with ``exact``'s: ``higher`` and ``torch_maml`` must agree
to round-off, ``fom``'s difference is its bias, ``ufom``'s depends on its draw.

Usage (from the repository root)::

    python -m benchmarks.hyper                  # steps 100 and 1000, 10 outer steps
    python -m benchmarks.hyper --quick          # about 1 minute on 2 quiet cores
    python -m benchmarks.hyper --steps 300 --outer-steps 5 --methods ufom exact
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections import namedtuple
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

try:  # ``python benchmarks/hyper.py`` as well as ``python -m benchmarks.hyper``
    import torch_ufom
    from benchmarks.harness import (MB, PeakMemory, markdown_table, positive_int, progress,
                                    run_fresh_many, seed_everything, sync)
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch_ufom
    from benchmarks.harness import (MB, PeakMemory, markdown_table, positive_int, progress,
                                    run_fresh_many, seed_everything, sync)

NAME = "hyper"
METHODS = ("ufom", "exact", "fom", "higher", "torch_maml")
PEERS = {"higher": "higher", "torch_maml": "torch_maml"}  # method -> module it needs
LABELS = {"ufom": "ufom (q=0.1, checkpoint)", "exact": "exact (store)",
          "fom": "fom (checkpoint)", "higher": "higher (exact unroll)",
          "torch_maml": "torch_maml (checkpointed)"}
Q = 0.1
BATCH = 64
VAL_SIZE = 500
RATE0 = 0.05      # initial per-parameter inner learning rate
WD0 = 1e-3        # initial weight decay
OUTER_LR = 0.01   # Adam's step size on the rates
WD_LR = 1e-4      # Adam's step size on the weight decay
TARGET_STEPS = 1000
MEMORY_TARGET = 0.1  # ufom/checkpoint peak <= this x exact/store peak at TARGET_STEPS
SIZES = {  # (steps, outer steps, hidden width, default methods)
    "full": ([100, 1000], 10, 128, METHODS),
    "quick": ([100, 1000], 2, 128, ("ufom", "exact", "higher", "torch_maml")),
    "tiny": ([8], 2, 16, METHODS),
}


# -- the problem ---------------------------------------------------------------
def load_digits_split(seed: int, path: str) -> None:
    """Save ``(x_train, y_train, x_val, y_val)`` of sklearn's digits to ``path`` (``torch.save``).

    Pixels are divided by 16; a permutation seeded with ``seed`` puts
    ``VAL_SIZE`` images in the validation split and the rest (1,297) in the
    train split. Done once by the driver so the workers need not import sklearn.
    """
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    val, train = perm[:VAL_SIZE], perm[VAL_SIZE:]
    torch.save((x[train], y[train], x[val], y[val]), path)


def make_model(hidden: int, seed: int, device: str) -> nn.Module:
    """The seeded float32 MLP ``64-hidden-hidden-10`` with ReLU."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10)).to(device=device, dtype=torch.float32)


def support_batches(x: Tensor, y: Tensor, steps: int, seed: int) -> List[Tuple[Tensor, Tensor]]:
    """``steps`` minibatches of ``BATCH`` train images: epochs of seeded permutations."""
    gen = torch.Generator().manual_seed(seed + 1)
    per_epoch = len(y) // BATCH
    out: List[Tuple[Tensor, Tensor]] = []
    while len(out) < steps:
        perm = torch.randperm(len(y), generator=gen).to(x.device)
        for k in range(min(per_epoch, steps - len(out))):
            idx = perm[k * BATCH:(k + 1) * BATCH]
            out.append((x[idx], y[idx]))
    return out


def xent(fmodel, batch) -> Tensor:
    """Cross-entropy of ``fmodel`` on ``batch = (x, y)``: the inner and the outer loss."""
    x, y = batch
    return nn.functional.cross_entropy(fmodel(x), y)


def init_hyper(model: nn.Module) -> Tuple[Dict[str, Tensor], Tensor]:
    """Fresh meta-parameters: per-parameter rates (``RATE0``) and a scalar weight decay (``WD0``)."""
    rates = {n: torch.full_like(p, RATE0).requires_grad_() for n, p in model.named_parameters()}
    wd = torch.tensor(WD0, dtype=torch.float32, device=next(model.parameters()).device,
                      requires_grad=True)
    return rates, wd


def make_outer(model: nn.Module, rates: Dict[str, Tensor], wd: Tensor) -> torch.optim.Adam:
    """Adam over the (fixed, lr 0) model parameters, the rates and the weight decay."""
    return torch.optim.Adam([{"params": list(model.parameters()), "lr": 0.0},
                             {"params": list(rates.values()), "lr": OUTER_LR},
                             {"params": [wd], "lr": WD_LR}])


def project(rates: Dict[str, Tensor], wd: Tensor) -> None:
    """Clip the rates and the weight decay at 0 after an outer step."""
    with torch.no_grad():
        for r in rates.values():
            r.clamp_(min=0.0)
        wd.clamp_(min=0.0)


def plain_val_loss(model: nn.Module, rates: Dict[str, Tensor], wd: Tensor, batches, val) -> float:
    """The validation loss after the inner loop, by a plain ``torch.func`` loop (no library)."""
    phi = {n: p.detach() for n, p in model.named_parameters()}
    r = {n: t.detach() for n, t in rates.items()}
    w = wd.detach()
    for batch in batches:
        phi = {n: p.requires_grad_() for n, p in phi.items()}
        loss = xent(lambda x: functional_call(model, phi, (x,)), batch)
        grads = torch.autograd.grad(loss, list(phi.values()))
        with torch.no_grad():
            phi = {n: p - r[n] * (g + w * p) for (n, p), g in zip(phi.items(), grads)}
    with torch.no_grad():
        return float(xent(lambda x: functional_call(model, phi, (x,)), val))


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
    names = list(rates)
    if method in ("ufom", "exact", "fom"):
        memory = "store" if method == "exact" else "checkpoint"
        meta = torch_ufom.MetaOptimizer(
            model, outer, inner=torch_ufom.inner.SGD(lr=rates, weight_decay=wd), steps=steps,
            mode=method, q=Q, memory=memory, generator=generator)

        def step(force=None):
            res = meta.backward(xent, xent, batches, val, force_truncation=force)
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
            return {"val": float(loss)}
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
            return {"val": float(loss)}
        return step

    raise ValueError(f"Invalid method: {method!r} (expected one of {', '.join(METHODS)})")


def flat_hypergrad(rates: Dict[str, Tensor], wd: Tensor) -> Tensor:
    """The current ``.grad`` of the rates and the weight decay, flattened (zeros where unset)."""
    parts = [torch.zeros_like(t) if t.grad is None else t.grad for t in list(rates.values()) + [wd]]
    return torch.cat([p.detach().flatten() for p in parts]).cpu()


def run_method(method: str, steps: int, outer_steps: int, hidden: int, device: str, seed: int,
               data: str, grad_path: str, threads: int = 1) -> Dict[str, Any]:
    """Train one method in this (fresh) process; return a JSON-able dict (see the module docstring)."""
    warnings.filterwarnings("ignore")  # torch.utils.checkpoint's use_reentrant notice (torch_maml)
    torch.set_num_threads(threads)
    x_tr, y_tr, x_val, y_val = (t.to(device) for t in torch.load(data))
    val = (x_val, y_val)
    model = make_model(hidden, seed, device)
    # Warm-up: one outer gradient at steps=1 on throwaway meta-parameters.
    rates, wd = init_hyper(model)
    outer = make_outer(model, rates, wd)
    make_trainer(method, model, rates, wd, outer, 1, support_batches(x_tr, y_tr, 1, seed), val,
                 None)()
    del rates, wd, outer

    batches = support_batches(x_tr, y_tr, steps, seed)
    rates, wd = init_hyper(model)
    outer = make_outer(model, rates, wd)
    gen = seed_everything(seed, device)
    step = make_trainer(method, model, rates, wd, outer, steps, batches, val, gen)
    vals, wall, cpu, ks, fwd, rev = [], [0.0], [0.0], [], [], []
    first_grad = None
    with PeakMemory(device) as mem:
        for k in range(outer_steps):
            sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            outer.zero_grad()
            info = step()
            sync(device)
            w1, c1 = time.perf_counter(), time.process_time()
            if k == 0:  # a small copy, kept out of the clock
                first_grad = flat_hypergrad(rates, wd)
            w2, c2 = time.perf_counter(), time.process_time()
            outer.step()
            project(rates, wd)
            sync(device)
            w3, c3 = time.perf_counter(), time.process_time()
            wall.append(wall[-1] + (w1 - w0) + (w3 - w2))
            cpu.append(cpu[-1] + (c1 - c0) + (c3 - c2))
            vals.append(info["val"])
            if "K" in info:
                ks.append(info["K"])
                fwd.append(info["fwd"])
                rev.append(info["rev"])
    peak, exact_peak, probe = mem.peak_bytes, mem.exact, False
    if method == "ufom" and steps not in ks:  # no exact branch drawn: measure one for the peak
        outer.zero_grad()
        with PeakMemory(device) as mem2:
            info = step(force=steps)
        outer.zero_grad()
        peak, exact_peak, probe = max(peak, mem2.peak_bytes), exact_peak and mem2.exact, True
        fwd_probe, rev_probe = info["fwd"], info["rev"]
    final = plain_val_loss(model, rates, wd, batches, val)
    torch.save(first_grad, grad_path)
    out = {"method": method, "steps": steps, "val": vals + [final], "wall": wall, "cpu": cpu,
           "peak_mb": peak / MB, "peak_exact": exact_peak, "probe": probe,
           "rate_mean": float(torch.cat([r.detach().flatten() for r in rates.values()]).mean()),
           "wd": float(wd)}
    if ks:
        out.update(truncations=ks, fwd=fwd, rev=rev)
        if probe:
            out.update(fwd_probe=fwd_probe, rev_probe=rev_probe)
    if method == "torch_maml":
        out["checkpoint_steps"] = checkpoint_every(steps)
    return out


# -- the driver ----------------------------------------------------------------------
def run_inline(spec: Dict[str, Any]) -> Dict[str, Any]:
    """:func:`run_method` in this process (``--in-process``), restoring the thread count and RNG.

    Peak memory is then not isolated from earlier runs: only indicative.
    A failure gives ``{"error": ...}`` like :func:`benchmarks.harness.run_fresh`.
    """
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    try:
        with warnings.catch_warnings():
            return run_method(**spec)
    except Exception as exc:  # report it in the row, run the others
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line (see ``--help``)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.hyper",
                                description=__doc__.split("\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="steps 100 1000, 2 outer steps, no fom (about 1 minute on 2 quiet "
                           "cores)")
    size.add_argument("--tiny", action="store_true",
                      help="steps 8, 2 outer steps, hidden 16 (seconds; a smoke test)")
    p.add_argument("--steps", type=positive_int, nargs="+",
                   help="inner steps (default 100 1000)")
    p.add_argument("--outer-steps", type=positive_int, help="outer steps per run (default 10)")
    p.add_argument("--hidden", type=positive_int, help="hidden width of the MLP (default 128)")
    p.add_argument("--methods", nargs="+", choices=METHODS, metavar="METHOD",
                   help=f"methods to run, from {{{', '.join(METHODS)}}} (default all; "
                        "--quick: all but fom)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where to run (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, data and draws")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads per run (default 1: stable on a shared machine)")
    p.add_argument("--workers", type=positive_int, default=2,
                   help="runs (fresh processes) at a time (default 2: each peak memory is its own "
                        "process's; times then share the cores, so use 1 for timings)")
    p.add_argument("--in-process", action="store_true",
                   help="run every method in this process instead of a fresh one each (faster "
                        "start; peak memory is then only indicative); implied by --tiny")
    p.add_argument("--out", help=f"output directory (default results/{NAME}, or "
                                 f"results/{NAME}_quick / _tiny)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one run, print JSON
    args = p.parse_args(argv)
    args.command = " ".join(sys.argv[1:] if argv is None else argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("argument --device: cuda is not available in this torch build / machine")
    size_name = "tiny" if args.tiny else "quick" if args.quick else "full"
    steps, outer_steps, hidden, methods = SIZES[size_name]
    args.size = size_name
    args.in_process = args.in_process or args.tiny
    args.steps = list(dict.fromkeys(args.steps or steps))
    args.outer_steps = args.outer_steps or outer_steps
    args.hidden = args.hidden or hidden
    args.methods = list(dict.fromkeys(args.methods or methods))
    args.out = args.out or os.path.join(
        "results", NAME if size_name == "full" else f"{NAME}_{size_name}")
    return args


def main(argv=None) -> Dict[str, Any]:
    """Run every (method, steps) in its own process; write ``hyper.md``, ``.png``, ``.json`` to ``--out``.

    Returns a dict: ``runs`` (``"method/steps"`` -> the worker's results plus
    ``hypergrad_vs_exact``), ``target`` (the memory target's ratio and
    verdict), ``notes``, ``report`` and ``plot`` (paths) and ``seconds``.
    """
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(run_method(**spec)))
        return {}
    start = time.perf_counter()
    notes: List[str] = []
    methods = []
    for m in args.methods:
        if m in PEERS and importlib.util.find_spec(PEERS[m]) is None:
            notes.append(f"{m} is not installed: its rows are skipped (pip install {PEERS[m]}).")
        else:
            methods.append(m)
    if not args.in_process and args.workers > 1:
        notes.append(f"Runs went {args.workers} processes at a time (--workers): peak memory is "
                     "each process's own, but wall and CPU times were taken while sharing the "
                     "cores (--workers 1 for timings).")
    if args.in_process:
        notes.append("All runs in this one process (--in-process, implied by --tiny): peak "
                     "memory is not isolated between runs and only indicative.")
    os.makedirs(args.out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="hyper_")
    runs: Dict[str, Dict[str, Any]] = {}
    try:
        data = os.path.join(tmp, "digits.pt")
        load_digits_split(args.seed, data)
        jobs = [(m, s) for s in args.steps for m in methods]
        specs = [dict(method=m, steps=s, outer_steps=args.outer_steps, hidden=args.hidden,
                      device=args.device, seed=args.seed, data=data,
                      grad_path=os.path.join(tmp, f"{m}_{s}.pt"), threads=args.threads)
                 for m, s in jobs]
        if args.in_process:
            got = [run_inline(spec) for spec in progress(specs, desc="hyper runs")]
        else:  # each run's peak memory is its own process's, so runs may share the machine
            got = run_fresh_many("benchmarks.hyper", [["--worker", json.dumps(spec)] for spec in specs],
                                 workers=args.workers, desc="hyper runs")
        runs.update({f"{m}/{s}": r for (m, s), r in zip(jobs, got)})
        for s in args.steps:
            ref_path = os.path.join(tmp, f"exact_{s}.pt")
            ref = torch.load(ref_path) if os.path.exists(ref_path) else None
            for m in methods:
                r, path = runs[f"{m}/{s}"], os.path.join(tmp, f"{m}_{s}.pt")
                if "error" in r or ref is None or not os.path.exists(path):
                    continue
                g = torch.load(path)
                r["hypergrad_vs_exact"] = float((g - ref).norm() / ref.norm().clamp_min(1e-30))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    target = evaluate_target(runs)
    seconds = time.perf_counter() - start
    report_path = os.path.join(args.out, f"{NAME}.md")
    plot_path = os.path.join(args.out, f"{NAME}.png")
    plot(runs, args, plot_path)
    text = report(runs, args, notes, target, seconds)
    with open(report_path, "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, f"{NAME}.json"), "w") as f:  # every run's trajectories
        json.dump({"args": {k: v for k, v in vars(args).items() if k != "worker"},
                   "runs": runs, "target": target}, f)
    print(text)
    return {"runs": runs, "target": target, "notes": notes, "report": report_path,
            "plot": plot_path, "seconds": seconds}


def evaluate_target(runs: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """The project's memory target at ``TARGET_STEPS``: ufom/checkpoint peak <= 0.1 x exact/store peak."""
    u, e = runs.get(f"ufom/{TARGET_STEPS}", {}), runs.get(f"exact/{TARGET_STEPS}", {})
    text = (f"Target: ufom (q={Q}, memory=\"checkpoint\") peak memory <= {MEMORY_TARGET} x "
            f"exact (memory=\"store\") peak memory at steps={TARGET_STEPS}: ")
    if "peak_mb" not in u or "peak_mb" not in e:
        return {"ratio": None, "holds": None, "text": text + "not evaluated (row not run)"}
    ratio = u["peak_mb"] / e["peak_mb"] if e["peak_mb"] > 0 else float("inf")
    holds = ratio <= MEMORY_TARGET
    return {"ratio": ratio, "holds": holds,
            "text": text + f"{u['peak_mb']:.1f} MB / {e['peak_mb']:.1f} MB = {ratio:.4f}: "
                           f"{'holds' if holds else 'MISSED'}"}


def _fmt(x: Optional[float], spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def report(runs: Dict[str, Dict[str, Any]], args, notes: List[str], target: Dict[str, Any],
           seconds: float) -> str:
    """The Markdown report: setup, one table row per run, notes and the target."""
    headers = ["method", "steps", "val loss start -> end", "end vs exact", "wall (s)", "CPU (s)",
               "CPU s / outer step", "peak memory (MB)", "peak / exact", "exact branches",
               "inner steps fwd / rev per outer step", "1st hypergrad vs exact"]
    rows = []
    notes = list(notes)
    for key, r in runs.items():
        method, steps = key.split("/")
        if "error" in r:
            notes.append(f"{LABELS[method]} at steps={steps} failed: {r['error']}")
            rows.append([LABELS[method], steps] + ["error"] * (len(headers) - 2))
            continue
        ref = runs.get(f"exact/{steps}", {})
        end, ref_end = r["val"][-1], ref.get("val", [None])[-1]
        vs = "n/a" if ref_end is None else f"{end - ref_end:+.4f} ({(end / ref_end - 1) * 100:+.1f}%)"
        peak = f"{r['peak_mb']:.1f}" + ("" if r["peak_exact"] else " (upper bound)")
        ratio = (f"{r['peak_mb'] / ref['peak_mb']:.3f}" if ref.get("peak_mb") else "n/a")
        ks = r.get("truncations")
        branches = "-" if method != "ufom" else (
            f"{sum(k == int(steps) for k in ks)}/{len(ks)}" + (" (+1 probe)" if r["probe"] else ""))
        inner = "-"
        if ks:
            inner = f"{sum(r['fwd']) / len(ks):.0f} / {sum(r['rev']) / len(ks):.0f}"
        n = len(r["wall"]) - 1
        rows.append([LABELS[method], steps, f"{r['val'][0]:.4f} -> {end:.4f}", vs,
                     f"{r['wall'][-1]:.1f}", f"{r['cpu'][-1]:.1f}", f"{r['cpu'][-1] / n:.3f}",
                     peak, ratio, branches, inner,
                     _fmt(r.get("hypergrad_vs_exact"), ".2e")])
        if r.get("probe"):
            notes.append(f"ufom at steps={steps}: no training draw took the exact branch; the "
                         f"peak includes one forced exact-branch outer gradient (not timed; "
                         f"{r['fwd_probe']} / {r['rev_probe']} inner steps fwd / rev).")
        if method == "torch_maml":
            notes.append(f"torch_maml at steps={steps}: checkpoint every {r['checkpoint_steps']} "
                         "inner steps (GradientCheckpointMAML, reentrant torch.utils.checkpoint).")
    n_params = sum(a * b + b for a, b in zip((64, args.hidden, args.hidden),
                                             (args.hidden, args.hidden, 10)))
    try:
        load = " (load average %.1f %.1f %.1f at the end)" % os.getloadavg()
    except OSError:  # pragma: no cover
        load = ""
    lines = [
        "# Learned per-parameter inner learning rates on digits (benchmarks/hyper.py)", "",
        f"Command: `python -m benchmarks.hyper {args.command}`".rstrip(), "",
        f"Device {args.device}, torch {torch.__version__}, {args.threads} thread(s) per run, "
        f"{os.cpu_count()} CPU(s){load}. MLP 64-{args.hidden}-{args.hidden}-10 "
        f"({n_params:,} parameters, ReLU, float32) trained from a fixed seeded initialisation "
        f"by r inner SGD steps (batches of {BATCH} from the digits train split, 1,297 images) "
        f"with learned per-parameter rates (start {RATE0}) and a learned scalar weight decay "
        f"(start {WD0}); outer loss: cross-entropy on the validation split ({VAL_SIZE} images); "
        f"outer Adam (rates lr {OUTER_LR}, weight decay lr {WD_LR}), {args.outer_steps} outer "
        f"steps, seed {args.seed}. Total {seconds:.0f} s.", "",
        markdown_table(headers, rows, "lrlrrrrrrrrr"), "",
        "Columns: *val loss start -> end*: validation loss at the initial hyperparameters and "
        "after the last outer update (the latter by a plain torch.func loop); *end vs exact*: "
        "difference from exact's end loss; wall / CPU time of the training loop (all outer "
        "steps, process CPU time); peak memory above the memory in use before training, in a "
        "fresh process per run (CPU: the process's own peak RSS, VmHWM on Linux, which does not "
        "include the parent process's peak as ru_maxrss would; CUDA: max_memory_allocated); "
        "*1st hypergrad vs exact*: ||g - g_exact|| / ||g_exact|| of the first outer step's "
        "hypergradient (rates and weight decay), where the hyperparameters are equal for all "
        "methods.", "",
    ]
    lines += [f"- {n}" for n in notes]
    lines += [""] + compare_losses(runs, args.steps) + ["", target["text"], ""]
    return "\n".join(lines)


def compare_losses(runs: Dict[str, Dict[str, Any]], steps_list: Sequence[int]) -> List[str]:
    """One sentence per ``steps``: how each run's final validation loss compares with exact's."""
    out = []
    for s in steps_list:
        ref = runs.get(f"exact/{s}", {})
        if "val" not in ref:
            continue
        ref_end = ref["val"][-1]
        parts = []
        for m in METHODS:
            r = runs.get(f"{m}/{s}", {})
            if m == "exact" or "val" not in r:
                continue
            d = r["val"][-1] - ref_end
            how = "the same as" if abs(d) <= 1e-4 * max(1.0, abs(ref_end)) else (
                f"{abs(d):.4f} {'above' if d > 0 else 'below'}")
            extra = ""
            if m == "ufom":
                ks = r.get("truncations", [])
                extra = f" ({sum(k == s for k in ks)} of {len(ks)} draws took the exact branch)"
            parts.append(f"{m} ends {how} exact{extra}")
        out.append(f"Validation loss at steps={s}: exact ends at {ref_end:.4f} (from "
                   f"{ref['val'][0]:.4f}); " + "; ".join(parts) + ".")
    return out


def plot(runs: Dict[str, Dict[str, Any]], args, path: str) -> None:
    """Validation loss against wall time (one panel per ``steps``) and peak memory (bars)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps_list = args.steps
    fig, axes = plt.subplots(1, len(steps_list) + 1, figsize=(5 * (len(steps_list) + 1), 4.2),
                             squeeze=False)
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    for ax, s in zip(axes[0], steps_list):
        for m in METHODS:
            r = runs.get(f"{m}/{s}")
            if not r or "error" in r:
                continue
            ax.plot(r["wall"], r["val"], marker="o", ms=3, lw=1, color=colors[m], label=LABELS[m])
        ax.set_title(f"steps = {s}", fontsize=10)
        ax.set_xlabel("wall time of training (s)")
        ax.set_ylabel("validation loss")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[0, -1]
    width = 0.8 / max(1, len(steps_list))
    present = [m for m in METHODS if any("peak_mb" in runs.get(f"{m}/{s}", {}) for s in steps_list)]
    for i, s in enumerate(steps_list):
        xs, hs, cs = [], [], []
        for j, m in enumerate(present):
            r = runs.get(f"{m}/{s}")
            if r and "peak_mb" in r:
                xs.append(j + i * width)
                hs.append(max(r["peak_mb"], 1e-2))
                cs.append(colors[m])
        ax.bar(xs, hs, width=width, color=cs, alpha=0.5 + 0.5 * i / max(1, len(steps_list) - 1),
               edgecolor="k", label=f"steps={s}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(present))])
    ax.set_xticklabels(present, fontsize=8, rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("peak memory above baseline (MB)")
    ax.set_title("peak memory (darker: larger steps)", fontsize=10)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.suptitle(f"Learned per-parameter inner rates on digits, MLP hidden {args.hidden}, "
                 f"{args.outer_steps} outer steps, {args.device}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
