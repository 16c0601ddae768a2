"""Few-shot classification on scikit-learn's digits with MAML (``mode="ufom"``).

A task is a 5-way K-shot problem: 5 of the 10 digits, labelled 0..4 in a
random order. Meta-training tasks draw their images from two thirds of the
data set, meta-test tasks from the held-out third (with 10 classes only, a
split by class would leave 5 training digits, which the network memorises).
The meta-batch runs vectorised (``backward_batch``; on a CPU fewer than 3 tasks
that draw an exact sweep run one by one beside the others); the outer loss returns
``(loss, aux)`` so that query accuracy comes back in ``MetaResult.aux``;
meta-test adapts with more inner steps than training (``meta.adapt``) and
reads the accuracy from the same loss.

    python examples/few_shot_digits.py           # under 20 s on one CPU core
    python examples/few_shot_digits.py --tiny    # a few seconds
"""
import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import torch_ufom

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--tiny", action="store_true", help="a few outer steps (for the tests)")
parser.add_argument("--shots", type=int, default=1)
parser.add_argument("--outer-steps", type=int, default=300)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
outer_steps, meta_batch, test_tasks = (5, 4, 20) if args.tiny else (args.outer_steps, 16, 200)
WAYS, QUERY, STEPS, TEST_STEPS = 5, 10, 5, 10
torch.manual_seed(args.seed)
gen = torch.Generator().manual_seed(args.seed)

digits = load_digits()  # 1,797 8x8 images, shipped with scikit-learn
images = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0
by_class = [images[torch.as_tensor(digits.target) == c] for c in range(10)]
train = [x[: 2 * len(x) // 3] for x in by_class]  # meta-training images
test = [x[2 * len(x) // 3:] for x in by_class]  # held-out images for meta-test


def sample_tasks(pool, n):
    """``n`` tasks from ``pool`` (images per digit): stacked support ``(xs, ys)``, query ``(xq, yq)``."""
    xs, ys, xq, yq = [], [], [], []
    for _ in range(n):
        s, q = [], []
        for c in torch.randperm(10, generator=gen)[:WAYS].tolist():  # label i is digit c
            pick = torch.randperm(len(pool[c]), generator=gen)[:args.shots + QUERY]
            s.append(pool[c][pick[:args.shots]])
            q.append(pool[c][pick[args.shots:]])
        xs.append(torch.cat(s))
        xq.append(torch.cat(q))
        ys.append(torch.arange(WAYS).repeat_interleave(args.shots))
        yq.append(torch.arange(WAYS).repeat_interleave(QUERY))
    return (torch.stack(xs), torch.stack(ys)), (torch.stack(xq), torch.stack(yq))


def inner_loss(fmodel, batch):
    x, y = batch
    return F.cross_entropy(fmodel(x), y)


def outer_loss(fmodel, batch):
    """The query loss, and its accuracy as ``aux`` (reported from the forward pass only)."""
    x, y = batch
    logits = fmodel(x)
    return F.cross_entropy(logits, y), {"accuracy": (logits.argmax(-1) == y).float().mean()}


model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, WAYS))
meta = torch_ufom.MetaOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-3),
                                inner_lr=0.4, steps=STEPS, mode="ufom", q=0.2,
                                reduction="mean", generator=gen)

for k in range(outer_steps):
    supports, queries = sample_tasks(train, meta_batch)
    meta.zero_grad()
    results = meta.backward_batch(inner_loss, outer_loss, supports, queries)
    meta.step()
    if k % max(1, outer_steps // 5) == 0 or k == outer_steps - 1:
        acc = sum(float(r.aux["accuracy"]) for r in results) / len(results)
        exact = sum(r.truncation == STEPS for r in results)
        print(f"outer step {k}: query accuracy after {STEPS} inner steps {acc:.3f} "
              f"({exact}/{len(results)} exact branches)")

# Meta-test on held-out images: adapt each task with more steps than training, no meta-gradient.
supports, queries = sample_tasks(test, test_tasks)
before, after = [], []
with torch.no_grad():
    for i in range(test_tasks):
        support, query = (supports[0][i], supports[1][i]), (queries[0][i], queries[1][i])
        fmodel = meta.adapt(inner_loss, support, steps=TEST_STEPS)
        before.append(float(outer_loss(model, query)[1]["accuracy"]))
        after.append(float(outer_loss(fmodel, query)[1]["accuracy"]))
print(f"meta-test on held-out images, {test_tasks} tasks, {WAYS}-way {args.shots}-shot: accuracy "
      f"{sum(before) / test_tasks:.3f} before adaptation, {sum(after) / test_tasks:.3f} after "
      f"{TEST_STEPS} inner steps")
