"""Small meta-batches: ``backward_batch`` with ``vectorise=True``, ``False`` and ``"auto"`` side by side.

``python -m benchmarks.small_batches [--quick | --tiny]`` times, in one process and round-robin, one
meta-batch of B sinusoid tasks by ``MetaOptimizer.backward_batch`` under each ``vectorise`` setting, on
MLPs 1-w-w-1 (10-point batches, float32), with one batch for every step and with per-step batches
(``StepBatches``), first-order and exact: where ``vmap`` pays on this machine, and whether ``"auto"``
picks the faster path (on a CPU it runs a group of tasks smaller than
``torch_ufom.vectorised.FEWEST_TASKS_ON_CPU`` per task).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List

import torch

import torch_ufom
from benchmarks.harness import (Target, interleave, keep_freed_memory, markdown_table, parse, parser, stats,
                                write_report)

# per size: rounds, MLP widths, meta-batch sizes, inner steps
SIZES = {"full": (7, (40, 160), (2, 4, 6, 8, 12, 16), 5), "quick": (5, (40,), (4, 8, 16), 5),
         "tiny": (1, (40,), (2,), 2)}
AUTO_VS_BEST = 1.10  # "auto"'s time / the faster of the two paths, at most (issue 13 item 5's spirit)

TEMPLATE = """# Small meta-batches on {device}: vectorise=True, False and "auto" (benchmarks/small_batches.py)

`{command}`; torch {torch}, {threads} thread(s). One meta-batch of B sinusoid tasks (10 support and 10
query points), MLPs 1-w-w-1, {steps} inner SGD steps, float32, by `MetaOptimizer.backward_batch`; median
{basis} time over {rounds} rounds, the three settings round-robin. *vmap / loop*: `vectorise=True`'s
time over `vectorise=False`'s; *auto*: what `"auto"` ran (its `batch_path`, shortened); *auto / best*:
its time over the faster of the other two.

{tables}
"""


def _mlp(width: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(1, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                               torch.nn.ReLU(), torch.nn.Linear(width, 1))


def _mse(f, batch):
    x, y = batch
    return ((f(x) - y) ** 2).mean()


def rows_for(width: int, tasks: int, steps: int, per_step: bool, mode: str, seed: int,
             device: str) -> Dict[str, Callable[[], Any]]:
    """``"True"``, ``"False"`` and ``"auto"``: one meta-batch's ``backward_batch`` under each setting."""
    torch.manual_seed(seed)
    model = _mlp(width).to(device)
    g = torch.Generator().manual_seed(seed + 1)

    def batch():
        return tuple(torch.randn(tasks, 10, 1, generator=g).to(device) for _ in range(2))
    batches = [batch() for _ in range(steps)]
    support = torch_ufom.StepBatches(batches) if per_step else batches[0]
    query = batch()
    rows = {}
    for vectorise in (True, False, "auto"):
        meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.0), inner_lr=0.01,
                                        steps=steps, mode=mode, vectorise=vectorise)

        def run(meta=meta):
            meta.zero_grad()
            return meta.backward_batch(_mse, _mse, support, query)
        rows[str(vectorise)] = run
    return rows


def _short(path: str) -> str:
    return "vmap" if path.startswith("vectorised") else "loop"


def measure(size: str, seed: int, device: str, basis: str) -> List[Dict[str, Any]]:
    """One record per (width, batches, mode, B): the three settings' times, ``"auto"``'s path."""
    rounds, widths, sizes, steps = SIZES[size]
    out = []
    for width in widths:
        for per_step in (False, True):
            for mode in ("fom", "exact"):
                for tasks in sizes:
                    rows = rows_for(width, tasks, steps, per_step, mode, seed, device)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # (a fallback's warning: its reason is in the path)
                        path = rows["auto"]()[0].batch_path
                        times = {k: stats(v)[basis] for k, v in interleave(rows, rounds, device).items()}
                    out.append({"width": width, "per_step": per_step, "mode": mode, "tasks": tasks,
                                "steps": steps, "times": times, "auto_path": path})
    return out


def analyse(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The tables and the target: ``"auto"``'s worst time over the faster path."""
    tables, worst = [], None
    for width in sorted({r["width"] for r in records}):
        for per_step in (False, True):
            cells = [r for r in records if r["width"] == width and r["per_step"] == per_step]
            if not cells:
                continue
            lines = []
            for r in cells:
                t = r["times"]
                ratio = t["auto"] / min(t["True"], t["False"])
                worst = ratio if worst is None else max(worst, ratio)
                lines.append([r["mode"], str(r["tasks"]), f"{t['True'] * 1e3:.2f}", f"{t['False'] * 1e3:.2f}",
                              f"{t['True'] / t['False']:.2f}", _short(r["auto_path"]), f"{ratio:.2f}"])
            head = f"## 1-{width}-{width}-1, {'per-step batches' if per_step else 'one batch for every step'}"
            columns = ["mode", "B", "vmap (ms)", "loop (ms)", "vmap / loop", "auto", "auto / best"]
            tables.append(head + "\n\n" + markdown_table(columns, lines, "lrrrrlr"))
    return {"tables": "\n\n".join(tables),
            "targets": [Target('vectorise="auto" time / the faster path, worst cell', worst, AUTO_VS_BEST)]}


def main(argv=None) -> Dict[str, Any]:
    """Measure, print and write the report."""
    p = parser("small_batches", __doc__, {"quick": "one width, meta-batches 4, 8 and 16, 5 rounds",
                                          "tiny": "one width, meta-batch 2, 2 steps, one round"})
    args = parse(p, argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    records = measure(args.size, args.seed, args.device, args.basis)
    a = analyse(records)
    rounds, _, _, steps = SIZES[args.size]
    return write_report(args, "small_batches", TEMPLATE,
                        {"tables": a["tables"], "basis": args.basis, "rounds": rounds, "steps": steps},
                        {"records": records}, a["targets"])


if __name__ == "__main__":
    main()
