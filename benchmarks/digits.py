"""Few-shot classification on scikit-learn's digits: MAML with torch_ufom fom / ufom / exact.

Data: ``sklearn.datasets.load_digits`` (1,797 images of 8x8 pixels, 10
classes, bundled with scikit-learn: nothing is downloaded), pixels scaled to
``[0, 1]``. Meta-training tasks use classes 0-6 only, meta-test tasks classes
7-9 only (disjoint). A task is N-way K-shot (default 3-way, 1-shot and
5-shot): N classes drawn from the split, labelled ``0..N-1`` in random order,
K support and ``--query`` (default 15) query images per class.

Model: an MLP 64-64-64-N with ReLU (``--model mlp``, default) or a small CNN
(``--model cnn``: two 3x3 convolutions with 16 channels, ReLU and 2x2 max
pooling, then a linear layer). Inner loop: ``--steps`` (default 5) SGD steps at
``--inner-lr`` (default 0.4) on the support cross-entropy; outer loop: Adam (lr
1e-3) on the mean query cross-entropy of ``--meta-batch`` (default 8) tasks.
float32.

Methods: ``fom``, ``ufom q=0.1``, ``exact`` (torch_ufom's MetaOptimizer) and
``higher``'s MAML (if installed); ``--methods`` adds ``ufom q=auto`` or
``torchopt``. Every method starts from the same initial weights and sees the
same meta-batches; they train round-robin and each one's clock counts only its
own training steps.

Metric: *meta-test accuracy* on a fixed set of held-out 7-9 tasks (the same
for every method and every ``--seed``): from the meta-learned initialisation,
``--steps`` SGD steps on the support images, then the accuracy on the query
images, averaged over tasks (adapted with plain ``torch.func``).

Run from the repository root::

    python -m benchmarks.digits --quick        # ~2 minutes on 2 quiet cores
    python -m benchmarks.digits                # 2,000 outer steps per setting
    python -m benchmarks.digits --tiny         # seconds: smoke test
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from typing import Any, Dict, Sequence, Tuple

import torch
from torch import Tensor, nn

try:  # ``python benchmarks/digits.py`` as well as ``python -m benchmarks.digits``
    import benchmarks.maml_common as mc
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import benchmarks.maml_common as mc
from benchmarks.harness import markdown_table, plot_panels, write_text

NAME = "digits"
TRAIN_CLASSES = tuple(range(7))
TEST_CLASSES = (7, 8, 9)
TEST_SEED = 20_210_718  # the held-out tasks: fixed, independent of --seed
DEFAULT_METHODS = ("fom", "ufom q=0.1", "exact", "higher")
MODELS = ("mlp", "cnn")

# (iters, meta-batch, test tasks, eval every) for each size
SIZES = {"full": (2000, 8, 500, 100), "quick": (120, 8, 200, 15), "tiny": (3, 2, 6, 3)}


# ---------------------------------------------------------------------------
# Data and tasks
# ---------------------------------------------------------------------------

def load_data(dtype: torch.dtype = torch.float32) -> Dict[int, Tensor]:
    """The digits as ``{class: images}``, each ``(n, 64)`` with pixels in ``[0, 1]``."""
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.as_tensor(data.data, dtype=dtype) / 16.0
    y = torch.as_tensor(data.target)
    return {c: x[y == c] for c in range(10)}


def sample_tasks(by_class: Dict[int, Tensor], classes: Sequence[int], n: int, ways: int,
                 shots: int, query: int, generator: torch.Generator, device: str = "cpu"
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``n`` N-way K-shot tasks from ``classes``: ``(xs, ys, xq, yq)`` stacked over tasks.

    ``xs``: ``(n, ways * shots, 64)``, ``ys``: ``(n, ways * shots)`` labels in
    ``0..ways-1`` (a random assignment of the drawn classes per task);
    ``xq, yq`` likewise with ``query`` images per class. Drawn from
    ``generator`` on the CPU, without replacement within a task.
    """
    if ways > len(classes):
        raise ValueError(f"Invalid ways: {ways} (the split has {len(classes)} classes)")
    out = ([], [], [], [])
    for _ in range(n):
        chosen = [classes[int(i)] for i in torch.randperm(len(classes), generator=generator)[:ways]]
        parts = ([], [], [], [])
        for label, c in enumerate(chosen):
            pool = by_class[c]
            if shots + query > len(pool):
                raise ValueError(f"Invalid shots + query: {shots + query} > {len(pool)} images "
                                 f"of class {c}")
            idx = torch.randperm(len(pool), generator=generator)[:shots + query]
            parts[0].append(pool[idx[:shots]])
            parts[1].append(torch.full((shots,), label))
            parts[2].append(pool[idx[shots:]])
            parts[3].append(torch.full((query,), label))
        for acc, part in zip(out, parts):
            acc.append(torch.cat(part))
    return tuple(torch.stack(t).to(device) for t in out)


class SmallCNN(nn.Module):
    """Two 3x3 convolutions (16 channels, ReLU, 2x2 max pooling) and a linear layer, on 8x8."""

    def __init__(self, ways: int, channels: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(channels * 2 * 2, ways)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x.reshape(-1, 1, 8, 8)).flatten(1))


def make_model(kind: str, ways: int, seed: int, dtype: torch.dtype = torch.float32,
               device: str = "cpu", hidden: int = 64) -> nn.Module:
    """``"mlp"`` (64-hidden-hidden-ways, ReLU) or ``"cnn"`` (:class:`SmallCNN`), initialised from ``seed``."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                              nn.ReLU(), nn.Linear(hidden, ways))
    elif kind == "cnn":
        model = SmallCNN(ways)
    else:
        raise ValueError(f"Invalid model: {kind!r} (expected one of {', '.join(MODELS)})")
    torch.random.set_rng_state(state)
    return model.to(device=device, dtype=dtype)


def xent(f, batch) -> Tensor:
    """The inner and outer loss: ``(model or functional model, (x, y)) -> cross-entropy``."""
    x, y = batch
    return nn.functional.cross_entropy(f(x), y)


def _accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.argmax(-1) == y).to(logits.dtype).mean()


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def summarise(hist: Sequence[mc.History], device: str) -> Dict[str, Dict[str, Any]]:
    """Per-method final accuracy (with a 95% interval over test tasks), times and ratios."""
    out: Dict[str, Dict[str, Any]] = {}
    for h in hist:
        if h.error is not None:
            out[h.label] = {"error": h.error}
            continue
        mean, ci = mc.mean_ci(h.extra[-1])
        out[h.label] = {"final_acc": mean, "ci95": ci, "best_acc": max(h.score),
                        "wall_s": h.wall[-1], "cpu_s": h.cpu[-1],
                        "ms_per_step": 1e3 * h.wall[-1] / max(1, h.steps[-1]),
                        "exact_share": h.exact_branches / max(1, h.tasks_seen)}
    clock = "cpu_s" if device == "cpu" else "wall_s"
    ok = {k: v for k, v in out.items() if "error" not in v}
    ref = "higher" if "higher" in ok else "exact" if "exact" in ok else next(iter(ok), None)
    for r in ok.values():
        r["time_ratio"] = r[clock] / ok[ref][clock] if ref else None
        r["ratio_ref"] = ref
    return out


def table(summary: Dict[str, Dict[str, Any]], iters: int, device: str) -> str:
    """The Markdown table of one N-way K-shot setting."""
    refs = [r["ratio_ref"] for r in summary.values() if r.get("ratio_ref")]
    clock = "CPU" if device == "cpu" else "wall"
    headers = ["method", f"meta-test accuracy after {iters} steps", "best accuracy", "wall time",
               "CPU time", "ms / outer step", f"{clock} time / {refs[0] if refs else '-'}",
               "exact branches"]
    rows = []
    for label, r in summary.items():
        if "error" in r:
            rows.append([label, f"failed: {r['error']}"] + ["-"] * (len(headers) - 2))
            continue
        rows.append([label, f"{100 * r['final_acc']:.1f}% ± {100 * r['ci95']:.1f}",
                     f"{100 * r['best_acc']:.1f}%", f"{r['wall_s']:.1f} s", f"{r['cpu_s']:.1f} s",
                     f"{r['ms_per_step']:.1f}",
                     "-" if r["time_ratio"] is None else f"{r['time_ratio']:.2f}",
                     f"{100 * r['exact_share']:.0f}%"])
    return markdown_table(headers, rows, "lrrrrrrr")


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line (see ``--help``)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.digits",
                                description=__doc__.split("\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="120 outer steps per setting, 200 test tasks (~2 minutes)")
    size.add_argument("--tiny", action="store_true", help="a few outer steps: a smoke test")
    p.add_argument("--shots", type=mc.positive_int, nargs="+", default=[1, 5],
                   help="K of the N-way K-shot settings to run (default 1 5)")
    p.add_argument("--ways", type=mc.positive_int, default=3, help="N (default 3; at most 3)")
    p.add_argument("--query", type=mc.positive_int, default=15,
                   help="query images per class (default 15)")
    p.add_argument("--model", choices=MODELS, default="mlp", help="default mlp")
    p.add_argument("--iters", type=mc.positive_int,
                   help="outer steps per setting (default 2000; --quick 120)")
    p.add_argument("--meta-batch", type=mc.positive_int, help="tasks per outer step (default 8)")
    p.add_argument("--steps", type=mc.positive_int, default=5, help="inner SGD steps (default 5)")
    p.add_argument("--inner-lr", type=mc.positive_float, default=0.4, help="default 0.4")
    p.add_argument("--outer-lr", type=mc.positive_float, default=1e-3, help="Adam, default 1e-3")
    p.add_argument("--test-tasks", type=mc.positive_int,
                   help="held-out tasks (default 500; --quick 200)")
    p.add_argument("--eval-every", type=mc.positive_int,
                   help="evaluate every N outer steps (default iters / 10 or so)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated: " + ", ".join(m.label for m in mc.METHODS)
                        + f" (default {','.join(DEFAULT_METHODS)})")
    mc.add_run_args(p, NAME)
    args = mc.parse_run_args(p, argv)
    if args.ways > len(TEST_CLASSES):
        p.error(f"argument --ways: at most {len(TEST_CLASSES)} (the meta-test split has classes "
                f"{TEST_CLASSES})")
    args.shots = list(dict.fromkeys(args.shots))
    args.size = "tiny" if args.tiny else "quick" if args.quick else "full"
    iters, batch, tests, every = SIZES[args.size]
    args.iters = args.iters or iters
    args.meta_batch = args.meta_batch or batch
    args.test_tasks = args.test_tasks or tests
    args.eval_every = args.eval_every or (every if args.iters == iters else max(1, args.iters // 10))
    args.method_list = mc.parse_methods(args.methods, p.error, args.q)
    return args


def main(argv=None) -> Dict[str, Any]:
    """Run every N-way K-shot setting; write ``digits.md``, ``digits.png`` and a CSV into ``--out``.

    Returns a dict with ``settings`` (per ``"3-way 1-shot"`` etc.: per method
    the final accuracy, its 95% interval, times and ratios, and the
    evaluation histories), ``skipped`` (notes on missing peers) and ``files``.
    """
    args = parse_args(argv)
    return mc.with_threads(args.threads, _run, args, time.perf_counter())


def _run(args, t0: float) -> Dict[str, Any]:
    dtype = torch.float32
    os.makedirs(args.out, exist_ok=True)
    skipped, methods = [], []
    for m in args.method_list:
        if mc.available(m.kind):
            methods.append(m)
        else:
            skipped.append(f"{m.label}: skipped ({m.kind} is not installed)")
            print(f"note: {skipped[-1]}", file=sys.stderr)
    by_class = load_data(dtype)
    settings: Dict[str, Dict[str, Any]] = {}
    panels, tables, rows_csv = [], [], []
    for shots in args.shots:
        name = f"{args.ways}-way {shots}-shot"
        base = make_model(args.model, args.ways, args.seed, dtype, args.device)
        trainers = [mc.make_trainer(m, mc.clone_model(base), xent, inner_lr=args.inner_lr,
                                    steps=args.steps, outer_lr=args.outer_lr, seed=args.seed,
                                    memory=args.memory) for m in methods]
        test = sample_tasks(by_class, TEST_CLASSES, args.test_tasks, args.ways, shots, args.query,
                            torch.Generator().manual_seed(TEST_SEED + shots), args.device)

        def evaluate(model, test=test):
            per_task = mc.adapt_and_score(model, nn.functional.cross_entropy, _accuracy, *test,
                                          steps=args.steps, lr=args.inner_lr)
            return float(per_task.mean()), per_task.cpu()

        def batch(k, shots=shots):
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + 7919 * shots + k)
            xs, ys, xq, yq = sample_tasks(by_class, TRAIN_CLASSES, args.meta_batch, args.ways,
                                          shots, args.query, g, args.device)
            return [((xs[i], ys[i]), (xq[i], yq[i])) for i in range(args.meta_batch)]

        hist = mc.train_round_robin(trainers, batch, args.iters, evaluate, args.eval_every,
                                    args.device, desc=f"{NAME} {name}",
                                    show_progress=not args.no_progress)
        summary = summarise(hist, args.device)
        settings[name] = {"summary": summary,
                          "histories": {h.label: {"steps": h.steps, "wall_s": h.wall,
                                                  "cpu_s": h.cpu, "accuracy": h.score,
                                                  "error": h.error} for h in hist}}
        ok = [h for h in hist if h.error is None]
        chance = {f"chance (1/{args.ways})": 1.0 / args.ways}
        panels.append({"series": {h.label: (h.steps, [100 * s for s in h.score]) for h in ok},
                       "title": f"{name}: accuracy vs outer steps", "xlabel": "outer steps",
                       "ylabel": "meta-test accuracy (%)",
                       "hlines": {k: 100 * v for k, v in chance.items()}})
        panels.append({"series": {h.label: (h.wall, [100 * s for s in h.score]) for h in ok},
                       "title": f"{name}: accuracy vs training time",
                       "xlabel": "training wall time (s)", "ylabel": "meta-test accuracy (%)",
                       "hlines": {k: 100 * v for k, v in chance.items()}})
        tables.append((name, table(summary, args.iters, args.device)))
        for h in hist:
            for k, wall, cpu, s in zip(h.steps, h.wall, h.cpu, h.score):
                rows_csv.append([name, h.label, k, f"{wall:.4f}", f"{cpu:.4f}", repr(s)])
    total = time.perf_counter() - t0
    files = [plot_panels(os.path.join(args.out, f"{NAME}.png"), panels, ncols=2,
                         title=f"digits few-shot MAML ({args.model}, {args.steps} inner steps, "
                               f"seed {args.seed}): meta-train 0-6, meta-test 7-9")]
    csv_path = os.path.join(args.out, f"{NAME}.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["setting", "method", "outer_step", "wall_s", "cpu_s", "meta_test_accuracy"])
        w.writerows(rows_csv)
    files.append(csv_path)
    text = report(args, tables, skipped, total, files)
    files.insert(0, write_text(os.path.join(args.out, f"{NAME}.md"), text))
    for name, t in tables:
        print(f"{name}:\n{t}\n")
    for line in skipped:
        print(f"note: {line}")
    print(f"wrote {', '.join(files)} ({total:.1f} s)")
    return {"settings": settings, "skipped": skipped, "files": files, "seconds": total,
            "args": {k: v for k, v in vars(args).items() if k != "method_list"}}


def report(args, tables: Sequence[Tuple[str, str]], skipped: Sequence[str], total: float,
           files: Sequence[str]) -> str:
    """The Markdown report."""
    clock = "process CPU time" if args.device == "cpu" else "wall-clock time"
    model = ("MLP 64-64-64-N (ReLU)" if args.model == "mlp"
             else "CNN (2 x [conv 3x3, 16 channels, ReLU, max-pool 2x2], linear)")
    lines = [
        "# Few-shot classification on scikit-learn's digits (benchmarks/digits.py)",
        "",
        f"Command: `{' '.join(['python -m benchmarks.digits'] + args.argv)}`",
        "",
        f"Meta-train classes {TRAIN_CLASSES[0]}-{TRAIN_CLASSES[-1]}, meta-test classes "
        f"{TEST_CLASSES[0]}-{TEST_CLASSES[-1]} (disjoint); {args.ways}-way tasks with "
        f"{args.query} query images per class. {model}, float32, device {args.device}, "
        f"{args.threads} thread(s). Inner loop: {args.steps} SGD steps at lr {args.inner_lr} on "
        f"the support cross-entropy. Outer: Adam lr {args.outer_lr} on the mean query "
        f"cross-entropy of {args.meta_batch} tasks, {args.iters} outer steps per setting. Seed "
        f"{args.seed}: the same initial weights and meta-batches for every method. torch_ufom's "
        f"memory schedule: `{args.memory}`.",
        "",
        f"*Meta-test accuracy*: mean over {args.test_tasks} fixed held-out tasks (± a 95% "
        "interval over the tasks) of the query accuracy after the same inner loop, adapted "
        "with plain torch.func. *best*: the highest over all evaluations. *Times*: training "
        f"only, methods run round-robin; the ratio column uses {clock}. *exact branches*: the "
        "share of tasks whose meta-gradient included second-order terms.",
        "",
    ]
    for name, t in tables:
        lines += [f"## {name}", "", t, ""]
    if skipped:
        lines += [f"Note: {s}" for s in skipped] + [""]
    lines += [f"Total time (training and evaluation): {total:.1f} s.", ""]
    lines += [f"![{os.path.basename(f)}]({os.path.basename(f)})" for f in files
              if f.endswith(".png")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
