"""Data-parallel meta-training with ``MetaOptimizer(..., process_group=...)``: a usage example.

Launch from the repository root with ``torchrun`` (2 processes, gloo on CPU)::

    torchrun --standalone --nproc_per_node 2 -m benchmarks.distributed
    torchrun --standalone --nproc_per_node 2 -m benchmarks.distributed --outer-steps 50 --meta-batch 16
    torchrun --standalone --nproc_per_node 2 -m benchmarks.distributed --device cuda   # nccl

(``python -m torch.distributed.run`` is the same launcher as ``torchrun``.)

The problem is MAML on sinusoid regression: ``y = A sin(x - phase)`` with
``A ~ U[0.1, 5]``, ``phase ~ U[0, pi]``, inputs ``U[-5, 5]``, ``--shots``
support and ``--shots`` query points per task, an MLP ``1-H-H-1`` (ReLU, ``H =
--hidden``), MSE for the inner and the outer loss, ``--steps`` inner SGD steps
and an Adam outer optimizer. Every outer step has ``--meta-batch`` tasks
drawn from a generator seeded by ``(--seed, outer step)``, so the global set
of tasks does not depend on the number of processes; rank ``r`` of ``W``
takes tasks ``r, r + W, r + 2W, ...``.

Each rank builds the same seeded model and the same outer optimizer and wraps
it in ``torch_ufom.MetaOptimizer(..., mode="ufom", process_group=True)``
(``True``: the default group; any ``torch.distributed`` process group works).
Then, as in a one-process loop::

    meta.zero_grad()
    for support, query in my_tasks:
        meta.backward(mse, mse, support, query)   # local tasks, no communication
    meta.step()   # all-reduce: average over every rank's tasks, then the Adam step

Each rank draws its ufom coins from its own stream (derived from one seed and
its rank), yet every rank applies the same averaged meta-gradient, so the
parameters stay identical. At the end rank 0 prints every rank's checksum of
its parameters; the ranks all-gather their parameters and rank 0 prints whether
they are bit-identical, with the outer loss (mean over all ranks' tasks) of
each outer step. The exit status is 1 if the parameters differ.

Backends: ``gloo`` with ``--device cpu`` (default), ``nccl`` with ``--device
cuda`` (one GPU per process: rank ``LOCAL_RANK`` uses ``cuda:LOCAL_RANK``);
``--backend`` overrides the choice.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time
from typing import List, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

try:  # ``python benchmarks/distributed.py`` under torchrun as well as ``-m benchmarks.distributed``
    import torch_ufom
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch_ufom

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)
LAUNCH = "torchrun --standalone --nproc_per_node 2 -m benchmarks.distributed"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=LAUNCH, description=__doc__.splitlines()[0])
    p.add_argument("--outer-steps", type=int, default=20, help="outer steps (default 20)")
    p.add_argument("--meta-batch", type=int, default=8,
                   help="tasks per outer step over all ranks (default 8)")
    p.add_argument("--steps", type=int, default=5, help="inner SGD steps per task (default 5)")
    p.add_argument("--shots", type=int, default=10, help="support and query points per task")
    p.add_argument("--hidden", type=int, default=40, help="hidden width of the MLP (default 40)")
    p.add_argument("--inner-lr", type=float, default=0.01)
    p.add_argument("--outer-lr", type=float, default=1e-3)
    p.add_argument("--q", type=float, default=0.1, help="ufom's probability of the exact branch")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, the tasks and the draws")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--backend", choices=("gloo", "nccl"),
                   help="default: gloo with --device cpu, nccl with --device cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    p.add_argument("--perturb-rank", type=int, default=None, metavar="R",
                   help="after training, nudge rank R's parameters: checks that the comparison "
                        "catches a difference (exit status 1)")
    args = p.parse_args(argv)
    for name in ("outer_steps", "meta_batch", "steps", "shots", "hidden", "threads"):
        if getattr(args, name) < 1:
            p.error(f"argument --{name.replace('_', '-')}: expected an integer >= 1")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        p.error(f"not launched by torchrun (RANK / WORLD_SIZE unset); run: {LAUNCH}")
    args.backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("argument --device: cuda is not available in this torch build / machine")
    return args


def make_model(hidden: int, seed: int, device: torch.device) -> nn.Module:
    """The seeded MLP ``1-hidden-hidden-1``: the same initial parameters on every rank."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 1)).to(device)


def meta_batch(seed: int, outer_step: int, size: int, shots: int,
               device: torch.device) -> List[Tuple[Tuple[Tensor, Tensor], Tuple[Tensor, Tensor]]]:
    """The ``size`` tasks of ``outer_step`` (the same on every rank): ``[(support, query), ...]``."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + outer_step)

    def uniform(shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=gen)

    amp, phase = uniform((size, 1, 1), *AMPLITUDE), uniform((size, 1, 1), *PHASE)
    xs, xq = uniform((size, shots, 1), *X_RANGE), uniform((size, shots, 1), *X_RANGE)
    ys, yq = amp * torch.sin(xs - phase), amp * torch.sin(xq - phase)
    return [((xs[i].to(device), ys[i].to(device)), (xq[i].to(device), yq[i].to(device)))
            for i in range(size)]


def mse(fmodel, batch) -> Tensor:
    """Mean squared error of ``fmodel`` on ``batch = (x, y)``: the inner and the outer loss."""
    x, y = batch
    return nn.functional.mse_loss(fmodel(x), y)


def flat_parameters(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def checksum(flat: Tensor) -> str:
    """The sum of the parameters and the first 16 hex digits of the SHA-256 of their bytes."""
    data = flat.cpu().contiguous()
    digest = hashlib.sha256(data.numpy().tobytes()).hexdigest()[:16]
    return f"sum {float(data.double().sum()):+.10e} sha256 {digest}"


def main(argv=None) -> int:
    """Train on this rank; return the exit status (0: identical parameters on every rank)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda":
        if args.backend == "nccl" and torch.cuda.device_count() <= local_rank:
            raise SystemExit(f"nccl needs one GPU per process: local rank {local_rank}, "
                             f"{torch.cuda.device_count()} GPU(s); use fewer processes or "
                             "--backend gloo")
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(args.backend)
    try:
        return train(args, device)
    finally:
        dist.destroy_process_group()


def train(args, device: torch.device) -> int:
    rank, world = dist.get_rank(), dist.get_world_size()
    # Collectives of this script's own bookkeeping run where the backend wants them.
    coll = device if args.backend == "nccl" else torch.device("cpu")
    model = make_model(args.hidden, args.seed, device)
    outer = torch.optim.Adam(model.parameters(), lr=args.outer_lr)
    meta = torch_ufom.MetaOptimizer(model, outer, inner_lr=args.inner_lr, steps=args.steps,
                                    mode="ufom", q=args.q,
                                    generator=torch.Generator().manual_seed(args.seed),
                                    process_group=True)
    losses, exact_branches = [], 0
    start = time.perf_counter()
    for k in range(args.outer_steps):
        tasks = meta_batch(args.seed, k, args.meta_batch, args.shots, device)[rank::world]
        meta.zero_grad()
        total = torch.zeros(2, dtype=torch.float64, device=coll)  # [sum of outer losses, tasks]
        for support, query in tasks:
            res = meta.backward(mse, mse, support, query)
            total += torch.tensor([float(res.outer_loss), 1.0], dtype=torch.float64, device=coll)
            exact_branches += int(res.truncation == args.steps)
        meta.step()  # all-reduces the meta-gradients over every rank's tasks, then steps Adam
        dist.all_reduce(total)
        losses.append(float(total[0] / total[1].clamp_min(1)))
    seconds = time.perf_counter() - start

    if args.perturb_rank == rank:
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] += 1e-3
    flat = flat_parameters(model)
    line = (f"rank {rank}/{world}: {len(range(rank, args.meta_batch, world))} tasks per outer "
            f"step, {exact_branches} exact branches, {seconds:.2f} s; final parameters: "
            f"{checksum(flat)}")
    # Rank 0 prints every rank's line: lines written by several processes to one
    # stream can interleave mid-line.
    lines = [None] * world
    dist.all_gather_object(lines, line)
    if rank == 0:
        print("\n".join(lines), flush=True)
    gathered = [torch.empty_like(flat, device=coll) for _ in range(world)]
    dist.all_gather(gathered, flat.to(coll))
    same = all(torch.equal(gathered[0], g) for g in gathered[1:])
    if rank == 0:
        every = max(1, args.outer_steps // 10)
        shown = [(k, v) for k, v in enumerate(losses) if k % every == 0 or k == len(losses) - 1]
        print(f"backend {args.backend}, device {args.device}, {world} ranks, "
              f"{args.meta_batch} tasks per outer step, {args.steps} inner steps, ufom q={args.q}, "
              f"{sum(p.numel() for p in model.parameters()):,} parameters")
        print("outer loss (mean over all ranks' tasks, before each update): "
              + ", ".join(f"step {k}: {v:.4f}" for k, v in shown))
        if same:
            print(f"identical parameters on all {world} ranks: yes")
        else:
            diffs = [float((g - gathered[0]).abs().max()) for g in gathered]
            print(f"identical parameters on all {world} ranks: NO (max |difference| from rank 0 "
                  f"per rank: {', '.join(f'{d:.3e}' for d in diffs)})")
        sys.stdout.flush()
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
