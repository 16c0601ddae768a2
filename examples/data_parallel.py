"""Data-parallel meta-training with torchrun: each rank runs its share of the meta-batch.

``MetaOptimizer(..., process_group=True)`` all-reduces the meta-gradients in
``step()``; with ``reduction="mean"`` they are averaged over every rank's
tasks, as one process would average the whole meta-batch. Every rank builds
the same seeded model and draws the same global meta-batch, takes its own
slice of it and runs it with ``backward_batch`` (vectorised where that pays); the ranks draw their
ufom coins from their own streams, yet apply the same averaged meta-gradient,
so their parameters stay identical. Rank 0 prints each rank's parameter
checksum and whether they agree; the exit status is 1 if not. The problem is
MAML on sinusoid regression, with the gloo backend on CPU.

    torchrun --standalone --nproc_per_node 2 examples/data_parallel.py
    torchrun --standalone --nproc_per_node 2 examples/data_parallel.py --tiny
"""
import argparse
import hashlib
import math
import sys

import torch
import torch.distributed as dist
from torch import nn

import torch_ufom

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--tiny", action="store_true", help="a few outer steps (for the tests)")
args = parser.parse_args()
OUTER_STEPS, META_BATCH, STEPS, SHOTS = (3, 4, 3, 10) if args.tiny else (200, 16, 5, 10)
torch.set_num_threads(1)


def sinusoid_tasks(outer_step, n):
    """The global meta-batch of ``outer_step`` (the same on every rank), stacked over tasks."""
    gen = torch.Generator().manual_seed(outer_step)
    a = 0.1 + 4.9 * torch.rand(n, 1, 1, generator=gen)
    b = math.pi * torch.rand(n, 1, 1, generator=gen)
    xs, xq = (10 * torch.rand(n, SHOTS, 1, generator=gen) - 5 for _ in range(2))
    return (xs, a * torch.sin(xs - b)), (xq, a * torch.sin(xq - b))


def mse(fmodel, batch):
    x, y = batch
    return nn.functional.mse_loss(fmodel(x), y)


def train(model, outer, rank, world):
    """Meta-train on this rank; whether every rank ends with the same parameters."""
    meta = torch_ufom.MetaOptimizer(model, outer, inner_lr=0.01, steps=STEPS, mode="ufom", q=0.2,
                                    generator=torch.Generator().manual_seed(0),  # each rank derives its own
                                    process_group=True, reduction="mean")

    for k in range(OUTER_STEPS):
        (xs, ys), (xq, yq) = sinusoid_tasks(k, META_BATCH)
        mine = slice(rank, META_BATCH, world)  # rank r takes tasks r, r + world, ...
        meta.zero_grad()
        results = meta.backward_batch(mse, mse, (xs[mine], ys[mine]), (xq[mine], yq[mine]))
        meta.step()  # all-reduce: the mean over every rank's tasks, then Adam
        total = torch.tensor([sum(float(r.outer_loss) for r in results), len(results)],
                             dtype=torch.float64)
        dist.all_reduce(total)
        if rank == 0 and (k % max(1, OUTER_STEPS // 5) == 0 or k == OUTER_STEPS - 1):
            print(f"outer step {k}: query MSE {float(total[0] / total[1]):.4f} "
                  f"(mean over {int(total[1])} tasks on {world} ranks)", flush=True)

    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    checksums = [None] * world
    dist.all_gather_object(checksums, hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    same = all(torch.equal(gathered[0], g) for g in gathered)
    if rank == 0:  # one process prints, so that lines do not interleave
        for r, c in enumerate(checksums):
            print(f"rank {r}: final parameters sha256 {c}")
        print(f"identical parameters on all {world} ranks: {'yes' if same else 'NO'}", flush=True)
    return same


if __name__ == "__main__":
    torch.manual_seed(0)  # the same initial parameters on every rank
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    # The first torch.optim optimizer of a process imports torch._dynamo; under torch 2.13,
    # done after init_process_group, that keeps the group alive past destroy_process_group
    # and the exit then aborts now and then. So the outer optimizer comes first.
    outer = torch.optim.Adam(model.parameters(), lr=1e-3)
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    try:
        same = train(model, outer, dist.get_rank(), dist.get_world_size())
    finally:
        dist.destroy_process_group()
    sys.exit(0 if same else 1)
