"""Few-shot classification on scikit-learn's digits: MAML with torch_ufom fom / ufom / exact.

N-way K-shot tasks (:func:`benchmarks.problems.digit_tasks`), meta-train
classes 0-6 and meta-test classes 7-9, an MLP or
:class:`benchmarks.problems.SmallCNN` (``--model``); ``fom``, ``ufom q=0.1``,
``exact`` and ``higher`` (``--methods`` adds ``ufom q=auto`` or ``torchopt``)
trained round-robin (:mod:`benchmarks.maml`). The report states the sizes.
"""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from benchmarks import maml, problems
from benchmarks.harness import (markdown_table, mean_ci, parse, parser, plot_panels, positive_int,
                                torch_threads, write_report)

NAME = "digits"
TRAIN_CLASSES, TEST_CLASSES = tuple(range(7)), (7, 8, 9)
TEST_SEED = 20_210_718  # the held-out tasks: fixed, independent of --seed
DEFAULT_METHODS = ("fom", "ufom q=0.1", "exact", "higher")
MODELS = ("mlp", "cnn")
# (iters, meta-batch, test tasks, eval every) per size
SIZES = {"full": (2000, 8, 500, 100), "quick": (120, 8, 200, 15), "tiny": (3, 2, 6, 3)}

TEMPLATE = """# Few-shot classification on scikit-learn's digits (benchmarks/digits.py)

Command: `{command}`

Meta-train classes 0-6, meta-test classes 7-9; {ways}-way tasks with {query} query images per class.
{model}, float32, device {device}, {threads} thread(s). Inner: {steps} SGD steps at lr {inner_lr}. Outer:
Adam lr {outer_lr} on the mean query cross-entropy of {meta_batch} tasks, {iters} outer steps per
setting; seed {seed} (the same weights and meta-batches for every method); torch_ufom's memory
schedule `{memory}`.

*meta-test accuracy*: mean over {test_tasks} fixed held-out tasks (+- a 95% interval) after the same inner
loop (plain torch.func); *best*: the highest evaluation. *Times*: training only, methods round-robin;
the ratio uses {basis} time against {ref}. *exact branches*: the share of tasks with second-order terms.

{tables}
{skipped}"""


def summarise(hist, basis: str) -> Dict[str, Dict[str, Any]]:
    """Per method: final accuracy with its 95% interval, best accuracy, times and the time ratio."""
    out = {}
    for h in hist:
        mean, ci = mean_ci(h.extra[-1].tolist())
        out[h.label] = {"final_acc": mean, "ci95": ci, "best_acc": max(h.score), **maml.timing(h)}
    ref = next((k for k in ("higher", "exact") if k in out), next(iter(out)))
    for r in out.values():
        r.update(time_ratio=r[f"{basis}_s"] / out[ref][f"{basis}_s"], ratio_ref=ref)
    return out


def main(argv=None) -> Dict[str, Any]:
    """Run every N-way K-shot setting; write ``digits.md``, ``digits.json`` and ``digits.png`` into ``--out``.

    Returns the JSON data: ``settings`` (per ``"3-way 1-shot"`` etc.: ``summary``
    per method and the evaluation ``histories``) and ``skipped``.
    """
    p = parser(NAME, __doc__, {"quick": "120 outer steps per setting, 200 test tasks",
                               "tiny": "a few outer steps: a smoke test"})
    p.add_argument("--shots", type=positive_int, nargs="+", default=[1, 5], help="K values (default 1 5)")
    p.add_argument("--ways", type=positive_int, default=3, help="N (default 3; at most 3)")
    p.add_argument("--model", choices=MODELS, default="mlp", help="default mlp")
    maml.add_args(p, SIZES, inner_lr=0.4, query=15)
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated: " + ", ".join(m.label for m in maml.METHODS))
    args = parse(p, argv)
    if args.ways > len(TEST_CLASSES):
        p.error(f"argument --ways: at most {len(TEST_CLASSES)} (the meta-test classes are {TEST_CLASSES})")
    maml.sized(args, SIZES, evals=10)
    methods, skipped = maml.split_available(maml.parse_methods(args.methods, p, args.q))
    with torch_threads(args.threads):
        return run(args, methods, skipped)


def run(args, methods, skipped) -> Dict[str, Any]:
    """Every setting for parsed ``args``."""
    by_class = problems.load_digits_by_class()
    settings, panels, tables = {}, [], []
    for shots in dict.fromkeys(args.shots):
        name = f"{args.ways}-way {shots}-shot"
        test = problems.digit_tasks(by_class, TEST_CLASSES, args.test_tasks, args.ways, shots, args.query,
                                    torch.Generator().manual_seed(TEST_SEED + shots), args.device)

        def evaluate(model, test=test):
            per_task = maml.adapt_and_score(model, nn.functional.cross_entropy, problems.accuracy, *test,
                                            steps=args.steps, lr=args.inner_lr)
            return float(per_task.mean()), per_task.cpu()

        def batch(k, shots=shots):
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + 7919 * shots + k)
            return problems.task_pairs(problems.digit_tasks(
                by_class, TRAIN_CLASSES, args.meta_batch, args.ways, shots, args.query, g, args.device))

        base = problems.seeded(args.seed, lambda: (problems.mlp(64, 64, 64, args.ways) if args.model == "mlp"
                                                   else problems.SmallCNN(args.ways)), device=args.device)
        _, hist = maml.train(args, methods, base, problems.xent, batch, evaluate)
        summary = summarise(hist, args.basis)
        settings[name] = {"summary": summary, "histories": {h.label: {
            "steps": h.steps, "wall_s": h.wall, "cpu_s": h.cpu, "accuracy": h.score} for h in hist}}
        chance = {f"chance (1/{args.ways})": 100.0 / args.ways}
        for key, xlabel in (("steps", "outer steps"), ("wall", "training wall time (s)")):
            panels.append({"series": {h.label: (getattr(h, key), [100 * s for s in h.score]) for h in hist},
                           "title": f"{name}: accuracy vs {xlabel}", "xlabel": xlabel,
                           "ylabel": "meta-test accuracy (%)", "hlines": chance})
        tables += [f"## {name}", "", markdown_table(
            ["method", f"meta-test accuracy after {args.iters} steps", "best accuracy", "wall time",
             "CPU time", "ms / outer step", f"{args.basis} time / {summary[methods[0].label]['ratio_ref']}",
             "exact branches"],
            [[label, f"{100 * r['final_acc']:.1f}% +- {100 * r['ci95']:.1f}", f"{100 * r['best_acc']:.1f}%",
              f"{r['wall_s']:.1f} s", f"{r['cpu_s']:.1f} s", f"{r['ms_per_step']:.1f}",
              f"{r['time_ratio']:.2f}", f"{100 * r['exact_share']:.0f}%"] for label, r in summary.items()],
            "lrrrrrrr"), ""]
    figure = plot_panels(f"{args.out}/{NAME}.png", panels, ncols=2, title=f"digits few-shot MAML "
                         f"({args.model}, {args.steps} inner steps, seed {args.seed})")
    model = ("MLP 64-64-64-N (ReLU)" if args.model == "mlp"
             else "CNN (2 x [conv 3x3, 16 channels, ReLU, max-pool 2x2], linear)")
    fields = dict(vars(args), model=model, tables="\n".join(tables),
                  ref=next(iter(settings.values()))["summary"][methods[0].label]["ratio_ref"],
                  skipped="".join(f"\nNote: {s}" for s in skipped))
    return write_report(args, NAME, TEMPLATE, fields, {"settings": settings, "skipped": skipped}, (),
                        [figure])


if __name__ == "__main__":
    main()
