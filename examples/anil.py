"""ANIL: the inner loop adapts only the head; the body is meta-learned but never adapted.

``inner_params`` names what the inner loop adapts (here a predicate on the
parameter name; a list of names or the parameters themselves work too). The
body keeps its values during the inner loop and still receives its full
hypergradient, through every inner step of the head and the outer loss. The
problem is 5-way 5-shot classification on scikit-learn's digits (images split
into a meta-training and a held-out pool); meta-test adapts a whole batch of
tasks at once with ``torch_ufom.adapt_batch``.

    python examples/anil.py           # under 15 s on one CPU core
    python examples/anil.py --tiny    # a few seconds
"""
import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import torch_ufom

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--tiny", action="store_true", help="a few outer steps (for the tests)")
parser.add_argument("--outer-steps", type=int, default=200)
args = parser.parse_args()
outer_steps, meta_batch, test_tasks = (4, 4, 20) if args.tiny else (args.outer_steps, 16, 200)
WAYS, SHOTS, QUERY, STEPS = 5, 5, 10, 5
torch.manual_seed(0)
gen = torch.Generator().manual_seed(0)

digits = load_digits()
images = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0
by_class = [images[torch.as_tensor(digits.target) == c] for c in range(10)]
train, test = [x[: 2 * len(x) // 3] for x in by_class], [x[2 * len(x) // 3:] for x in by_class]


def sample_tasks(pool, n):
    """``n`` stacked tasks: 5 random digits labelled 0..4, ``(xs, ys)`` and ``(xq, yq)``."""
    xs, xq = [], []
    for _ in range(n):
        picks = [(c, torch.randperm(len(pool[c]), generator=gen)[:SHOTS + QUERY])
                 for c in torch.randperm(10, generator=gen)[:WAYS].tolist()]
        xs.append(torch.cat([pool[c][i[:SHOTS]] for c, i in picks]))
        xq.append(torch.cat([pool[c][i[SHOTS:]] for c, i in picks]))
    ys = torch.arange(WAYS).repeat_interleave(SHOTS).expand(n, -1)
    yq = torch.arange(WAYS).repeat_interleave(QUERY).expand(n, -1)
    return (torch.stack(xs), ys), (torch.stack(xq), yq)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.head = nn.Linear(64, WAYS)

    def forward(self, x):
        return self.head(self.body(x))


def loss(fmodel, batch):
    x, y = batch
    return F.cross_entropy(fmodel(x), y)


def is_head(name):
    return name.startswith("head.")


model = Net()
meta = torch_ufom.MetaOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-3),
                                inner_lr=0.4, steps=STEPS, mode="exact", inner_params=is_head,
                                reduction="mean")
for k in range(outer_steps):
    supports, queries = sample_tasks(train, meta_batch)
    meta.zero_grad()
    results = meta.backward_batch(loss, loss, supports, queries)
    if k == 0:  # the body is not adapted, yet it gets a meta-gradient
        norms = {part: sum(float(p.grad.norm()) ** 2 for n, p in model.named_parameters()
                           if is_head(n) == (part == "head")) ** 0.5 for part in ("body", "head")}
        print(f"meta-gradient norm at step 0 (summed over the meta-batch; step() takes the mean): "
              f"body {norms['body']:.4f}, head {norms['head']:.4f}")
    meta.step()
    if k % max(1, outer_steps // 4) == 0 or k == outer_steps - 1:
        print(f"outer step {k}: query loss "
              f"{sum(float(r.outer_loss) for r in results) / len(results):.4f}")

# Meta-test: adapt 'test_tasks' tasks at once, the head only, with twice training's steps.
supports, (xq, yq) = sample_tasks(test, test_tasks)
adapted = torch_ufom.adapt_batch(model, loss, supports, steps=2 * STEPS, inner_lr=0.4,
                                 inner_params=is_head)
with torch.no_grad():
    accuracy = float((adapted(xq).argmax(-1) == yq).float().mean())
    change = {n: float((adapted.params[n] - p).abs().max()) for n, p in model.named_parameters()}
print("largest change by adaptation: " + ", ".join(f"{n} {v:.3g}" for n, v in change.items()))
print(f"meta-test on held-out images, {test_tasks} tasks, {WAYS}-way {SHOTS}-shot: accuracy "
      f"{accuracy:.3f} after {2 * STEPS} inner steps of the head")
