"""Throughput: vectorised meta-batches and the two Hessian-vector products.

Two measurements that :mod:`benchmarks.speed` runs after its per-step table and
prints in the same report (they can also run alone, see below):

* **Meta-batch** (sinusoid MAML, ``--tasks`` tasks of 10 shots, ``--inner-steps``
  inner SGD steps with lr 0.01, the 1-40-40-1 ReLU regressor, float32): the
  time of one meta-batch's meta-gradient by

  - ``higher``: a per-task loop of ``higher.innerloop_ctx`` unrolls (exact MAML),
  - ``torch_ufom`` per-task: ``MetaOptimizer.backward`` once per task,
  - ``torch_ufom`` batch: one ``MetaOptimizer.backward_batch`` (``torch.func.vmap``),

  for ``fom``, ``ufom`` (q = 0.1; the same seeded draws for both loops) and
  ``exact``, all round-robin in one process (medians of process CPU time on the
  CPU, wall time on CUDA). The issue's targets: ``backward_batch`` at least 3x
  faster than ``higher``'s loop and at least 2x faster than our own loop.
* **Hessian-vector products**: one HVP of the inner loss by reverse-over-reverse
  (double backward) and by forward-over-reverse (``torch.func.jvp`` of
  ``torch.func.grad``), on the MLP and the sinusoid model of ``speed.py``;
  their agreement in float64 (relative error), and one exact outer step
  (``steps=10``) with ``hvp="revrev"`` and ``hvp="fwdrev"``.

Usage (from the repository root)::

    python -m benchmarks.throughput              # both, prints Markdown
    python -m benchmarks.throughput --tiny       # seconds: a smoke test
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

try:  # ``python benchmarks/throughput.py`` as well as ``python -m benchmarks.throughput``
    import torch_ufom
    from benchmarks.harness import interleaved_times, markdown_table, median, positive_int
    from benchmarks.memory import BATCH as MLP_BATCH, WIDTHS
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch_ufom
    from benchmarks.harness import interleaved_times, markdown_table, median, positive_int
    from benchmarks.memory import BATCH as MLP_BATCH, WIDTHS

TASKS, INNER_STEPS, SHOTS, INNER_LR, Q = 25, 5, 10, 0.01, 0.1
BATCH_VS_HIGHER, BATCH_VS_LOOP = 3.0, 2.0  # targets: backward_batch's speed-up
SIZES = {"full": dict(rounds=15, tasks=TASKS), "quick": dict(rounds=5, tasks=TASKS),
         "tiny": dict(rounds=1, tasks=3)}


def sinusoid_model() -> nn.Module:
    """The MAML sinusoid regressor 1-40-40-1 with ReLU."""
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


def mlp_model() -> nn.Module:
    """The MLP of :mod:`benchmarks.memory` (ReLU between the layers)."""
    layers: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(WIDTHS) - 2 else [])
    return nn.Sequential(*layers)


def mse(fmodel: Callable, batch) -> torch.Tensor:
    """Mean squared error on ``batch = (x, y)`` (written out: ``F.mse_loss`` has no
    forward-over-reverse formula in torch 2.13)."""
    x, y = batch
    return ((fmodel(x) - y) ** 2).mean()


def xent(fmodel: Callable, batch) -> torch.Tensor:
    """Cross-entropy on ``batch = (x, y)``."""
    x, y = batch
    return nn.functional.cross_entropy(fmodel(x), y)


def sinusoid_tasks(n: int, seed: int, dtype=torch.float32, device: str = "cpu"):
    """``n`` tasks ``y = A sin(x - phi)`` stacked: ``((xs, ys), (xq, yq))``, each ``(n, SHOTS, 1)``."""
    g = torch.Generator().manual_seed(seed)
    amp = 0.1 + 4.9 * torch.rand(n, 1, 1, generator=g, dtype=dtype)
    phase = math.pi * torch.rand(n, 1, 1, generator=g, dtype=dtype)
    xs = -5 + 10 * torch.rand(n, SHOTS, 1, generator=g, dtype=dtype)
    xq = -5 + 10 * torch.rand(n, SHOTS, 1, generator=g, dtype=dtype)
    out = ((xs, amp * torch.sin(xs - phase)), (xq, amp * torch.sin(xq - phase)))
    return tuple(tuple(t.to(device) for t in pair) for pair in out)


# -- meta-batch ---------------------------------------------------------------------------
def meta_batch_rows(tasks: int, seed: int, device: str) -> Dict[str, Callable[[], Any]]:
    """One callable per row, each computing one meta-batch's meta-gradient."""
    torch.manual_seed(seed)
    model = sinusoid_model().to(device=device, dtype=torch.float32)
    (xs, ys), (xq, yq) = sinusoid_tasks(tasks, seed, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    rows: Dict[str, Callable[[], Any]] = {}
    for mode in ("fom", "ufom", "exact"):
        for how in ("loop", "batch"):
            meta = torch_ufom.MetaOptimizer(model, opt, inner_lr=INNER_LR, steps=INNER_STEPS,
                                            mode=mode, q=Q,
                                            generator=torch.Generator(device=device).manual_seed(seed))

            def run(meta=meta, how=how):
                meta.zero_grad()
                if how == "batch":
                    meta.backward_batch(mse, mse, (xs, ys), (xq, yq))
                else:
                    for i in range(tasks):
                        meta.backward(mse, mse, (xs[i], ys[i]), (xq[i], yq[i]))
            rows[f"{mode}/{how}"] = run
    if importlib.util.find_spec("higher") is not None:
        import higher
        inner = torch.optim.SGD(model.parameters(), lr=INNER_LR)
        params = list(model.parameters())

        def run_higher():
            total = None
            for i in range(tasks):
                with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fm, diffopt):
                    for _ in range(INNER_STEPS):
                        diffopt.step(mse(fm, (xs[i], ys[i])))
                    g = torch.autograd.grad(mse(fm, (xq[i], yq[i])), params)
                total = g if total is None else [a + b for a, b in zip(total, g)]
            return total
        rows["exact/higher"] = run_higher
    return rows


def measure_meta_batch(rounds: int, tasks: int, seed: int, device: str) -> Dict[str, Any]:
    """Round-robin samples ``[[wall, cpu], ...]`` of every meta-batch row."""
    rows = meta_batch_rows(tasks, seed, device)
    for fn in rows.values():  # warm-up
        fn()
    times = interleaved_times(rows, rounds, device)
    return {k: [list(s) for s in v] for k, v in times.items()}


def analyse_meta_batch(raw: Dict[str, Any], basis: str) -> Dict[str, Any]:
    """Medians and the speed-ups of ``backward_batch``."""
    i = 1 if basis == "cpu" else 0
    med = {k: median([s[i] for s in v]) for k, v in raw.items()}
    out: Dict[str, Any] = {"median": med, "speedup": {}}
    for mode in ("fom", "ufom", "exact"):
        b = med.get(f"{mode}/batch")
        out["speedup"][mode] = {"vs_loop": med[f"{mode}/loop"] / b,
                                "vs_higher": med["exact/higher"] / b if "exact/higher" in med else None}
    e = out["speedup"]["exact"]
    out["holds"] = {"vs_loop": e["vs_loop"] >= BATCH_VS_LOOP,
                    "vs_higher": None if e["vs_higher"] is None else e["vs_higher"] >= BATCH_VS_HIGHER}
    return out


# -- Hessian-vector products ------------------------------------------------------------
def hvp_problem(model_name: str, seed: int, dtype, device: str):
    """``(model, loss, batch)`` for ``mlp`` or ``sinusoid``."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if model_name == "mlp":
        model = mlp_model()
        batch = (torch.randn(MLP_BATCH, WIDTHS[0], generator=g, dtype=dtype),
                 torch.randint(0, WIDTHS[-1], (MLP_BATCH,), generator=g))
        loss = xent
    else:
        model = sinusoid_model()
        (xs, ys), _ = sinusoid_tasks(1, seed, dtype)
        batch, loss = (xs[0], ys[0]), mse
    model = model.to(device=device, dtype=dtype)
    return model, loss, tuple(t.to(device) for t in batch)


def hvp_functions(model, loss, batch, seed: int) -> Dict[str, Callable[[], Any]]:
    """``revrev`` and ``fwdrev``: one Hessian-vector product of ``loss`` at the model's parameters."""
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())
    g = torch.Generator().manual_seed(seed + 1)
    vec = tuple(torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) for p in params)

    def loss_of(ps):
        return loss(lambda x: torch.func.functional_call(model, dict(zip(names, ps)), (x,)), batch)

    def revrev():
        leaves = tuple(p.requires_grad_() for p in (q.clone() for q in params))
        with torch.enable_grad():
            gr = torch.autograd.grad(loss_of(leaves), leaves, create_graph=True)
            return torch.autograd.grad(gr, leaves, vec)

    def fwdrev():
        return torch.func.jvp(torch.func.grad(loss_of), (params,), (vec,))[1]
    return {"revrev": revrev, "fwdrev": fwdrev}


def outer_step(model, loss, batch, hvp: str) -> Callable[[], Any]:
    """One exact outer step (``steps=10``) of ``torch_ufom.hypergrad`` with ``hvp``."""
    def run():
        return torch_ufom.hypergrad(model, loss, loss, batch, batch, steps=10, inner_lr=INNER_LR,
                                    mode="exact", hvp=hvp)
    return run


def measure_hvp(rounds: int, seed: int, device: str) -> Dict[str, Any]:
    """Per model: the float64 agreement and the timings of both HVPs (float32)."""
    out: Dict[str, Any] = {}
    for name in ("mlp", "sinusoid"):
        model, loss, batch = hvp_problem(name, seed, torch.float64, device)
        fns = hvp_functions(model, loss, batch, seed)
        a, b = fns["revrev"](), fns["fwdrev"]()
        err = max(float((x - y).norm() / y.norm()) for x, y in zip(a, b))
        model, loss, batch = hvp_problem(name, seed, torch.float32, device)
        fns = {f"hvp/{k}": f for k, f in hvp_functions(model, loss, batch, seed).items()}
        fns.update({f"step/{h}": outer_step(model, loss, batch, h) for h in ("revrev", "fwdrev")})
        for fn in fns.values():
            fn()
        times = interleaved_times(fns, rounds, device, {k: 5 for k in fns if k.startswith("hvp/")})
        out[name] = {"rel_err_float64": err, "times": {k: [list(s) for s in v] for k, v in times.items()}}
    return out


# -- report --------------------------------------------------------------------------------
def measure(size: str, seed: int, device: str, threads: int) -> Dict[str, Any]:
    """Both measurements in this process; JSON-able."""
    torch.set_num_threads(threads)
    spec = SIZES[size]
    return {"meta_batch": measure_meta_batch(spec["rounds"], spec["tasks"], seed, device),
            "hvp": measure_hvp(max(3, spec["rounds"] // 2), seed, device),
            "tasks": spec["tasks"], "threads": threads}


def _x(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def report(raw: Dict[str, Any], basis: str) -> str:
    """The Markdown sections (meta-batch table and targets, HVP table)."""
    if "error" in raw:
        return f"## Meta-batch and HVP throughput\n\nThe measurement failed: {raw['error']}\n"
    mb = analyse_meta_batch(raw["meta_batch"], basis)
    B = basis.upper()
    lines = [f"## Meta-batch: {raw['tasks']} sinusoid tasks, {INNER_STEPS} inner steps "
             f"(benchmarks/throughput.py)", "",
             f"Median {B} time of one meta-batch's meta-gradient, all rows round-robin in one process "
             f"({raw['threads']} thread(s)); ufom q = {Q} with the same seeded draws in both loops.", ""]
    rows = []
    for mode in ("fom", "ufom", "exact"):
        med, sp = mb["median"], mb["speedup"][mode]
        rows.append([mode, f"{med[f'{mode}/loop'] * 1e3:.1f}", f"{med[f'{mode}/batch'] * 1e3:.1f}",
                     _x(sp["vs_loop"]),
                     f"{med['exact/higher'] * 1e3:.1f}" if "exact/higher" in med else "n/a",
                     _x(sp["vs_higher"])])
    lines += [markdown_table(["mode", "per-task backward (ms)", "backward_batch (ms)",
                              "speed-up vs loop", "higher loop, exact (ms)", "speed-up vs higher"],
                             rows, "lrrrrr"), ""]
    e, holds = mb["speedup"]["exact"], mb["holds"]

    def verdict(h):
        return "not evaluated (higher missing)" if h is None else ("holds" if h else "MISSED")
    lines += [f"Target: backward_batch (exact) >= {BATCH_VS_HIGHER:.0f}x faster than higher's per-task "
              f"loop: {_x(e['vs_higher'])}, {verdict(holds['vs_higher'])}.",
              f"Target: backward_batch (exact) >= {BATCH_VS_LOOP:.0f}x faster than our per-task loop: "
              f"{_x(e['vs_loop'])}, {verdict(holds['vs_loop'])}.", ""]
    lines += ["## Hessian-vector products: reverse-over-reverse against forward-over-reverse", "",
              f"Median {B} time; agreement of the two in float64 (max relative error over the "
              "parameters); `exact outer step`: `hypergrad(mode=\"exact\", steps=10, hvp=...)`.", ""]
    i = 1 if basis == "cpu" else 0
    rows = []
    for name, r in raw["hvp"].items():
        med = {k: median([s[i] for s in v]) for k, v in r["times"].items()}
        rows.append([name, f"{r['rel_err_float64']:.1e}", f"{med['hvp/revrev'] * 1e3:.3f}",
                     f"{med['hvp/fwdrev'] * 1e3:.3f}", f"{med['hvp/fwdrev'] / med['hvp/revrev']:.2f}",
                     f"{med['step/revrev'] * 1e3:.1f}", f"{med['step/fwdrev'] * 1e3:.1f}",
                     f"{med['step/fwdrev'] / med['step/revrev']:.2f}"])
    lines += [markdown_table(["model", "rel. error", "HVP revrev (ms)", "HVP fwdrev (ms)", "fwdrev / revrev",
                              "exact step revrev (ms)", "exact step fwdrev (ms)", "fwdrev / revrev"],
                             rows, "lrrrrrrr"), "",
              "`hvp=\"auto\"` (the default) uses reverse-over-reverse: it was the faster on this "
              "machine's CPU in every measurement so far, and forward-over-reverse fails on "
              "operators without a forward-mode formula (F.mse_loss in torch 2.13).", ""]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line (see ``--help``)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput",
                                description=__doc__.split("\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="5 rounds")
    size.add_argument("--tiny", action="store_true", help="3 tasks, one round: a smoke test")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--json", action="store_true", help="print the raw samples as one JSON line")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("argument --device: cuda is not available in this torch build / machine")
    args.size = "tiny" if args.tiny else "quick" if args.quick else "full"
    return args


def main(argv=None) -> Dict[str, Any]:
    """Measure and print; with ``--json`` print the raw samples (for :mod:`benchmarks.speed`)."""
    args = parse_args(argv)
    raw = measure(args.size, args.seed, args.device, args.threads)
    if args.json:
        print(json.dumps(raw))
    else:
        print(report(raw, "cpu" if args.device == "cpu" else "wall"))
    return raw


if __name__ == "__main__":
    main()
