"""Data-parallel meta-training with ``MetaOptimizer(..., process_group=...)``: a usage example.

Launch from the repository root with ``torchrun`` (``--device cuda`` uses nccl, else gloo)::

    torchrun --standalone --nproc_per_node 2 -m benchmarks.distributed [--outer-steps 50 --meta-batch 16]

MAML (ufom) on the sinusoid tasks; each outer step's tasks are seeded by ``(--seed, outer step)`` and
rank ``r`` of ``W`` takes tasks ``r, r + W, ...``: ``meta.backward`` per local task without
communication, then ``meta.step()`` all-reduces. Rank 0 prints every rank's checksum, whether the
all-gathered parameters are bit-identical (exit status 1 if not) and each step's outer loss.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import os
import sys
import time
from typing import List, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

import torch_ufom
from benchmarks import problems
from benchmarks.harness import parse, positive_float, positive_int, probability

LAUNCH = "torchrun --standalone --nproc_per_node 2 -m benchmarks.distributed"


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line (see ``--help``); refuse to run outside torchrun."""
    p = argparse.ArgumentParser(prog=LAUNCH, description=__doc__.splitlines()[0])
    for flag, default, text in (("--outer-steps", 20, "outer steps"),
                                ("--meta-batch", 8, "tasks per outer step over all ranks"),
                                ("--steps", 5, "inner SGD steps per task"),
                                ("--shots", 10, "support and query points per task"),
                                ("--hidden", 40, "hidden width of the MLP"),
                                ("--threads", 1, "torch CPU threads")):
        p.add_argument(flag, type=positive_int, default=default, help=f"{text} (default {default})")
    p.add_argument("--inner-lr", type=positive_float, default=0.01)
    p.add_argument("--outer-lr", type=positive_float, default=1e-3)
    p.add_argument("--q", type=probability, default=0.1, help="ufom's probability of the exact branch")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, the tasks and the draws")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--backend", choices=("gloo", "nccl"), help="default: gloo on cpu, nccl on cuda")
    p.add_argument("--perturb-rank", type=int, default=None, metavar="R",
                   help="after training, nudge rank R's parameters: checks that the comparison "
                        "catches a difference (exit status 1)")
    args = parse(p, argv)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        p.error(f"not launched by torchrun (RANK / WORLD_SIZE unset); run: {LAUNCH}")
    args.backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    return args


def meta_batch(seed: int, outer_step: int, size: int, shots: int,
               device: torch.device) -> List[Tuple[Tuple[Tensor, Tensor], Tuple[Tensor, Tensor]]]:
    """The ``size`` tasks of ``outer_step`` (the same on every rank): ``[(support, query), ...]``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + outer_step)
    return problems.task_pairs(problems.sinusoid_tasks(size, shots, shots, g, torch.float32, device))


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
    # The first torch.optim optimizer a process builds imports torch._dynamo; done after
    # init_process_group, gloo's threads sometimes outlive destroy_process_group and the
    # process aborts at exit. Build one first.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    dist.init_process_group(args.backend)
    try:
        return train(args, device)
    finally:
        gc.collect()  # free what still refers to the group (reference cycles) before tearing it down
        dist.destroy_process_group()


def train(args, device: torch.device) -> int:
    """Meta-train on this rank's share of the tasks; rank 0 reports; 0 if every rank ends identical."""
    rank, world = dist.get_rank(), dist.get_world_size()
    # Collectives of this script's own bookkeeping run where the backend wants them.
    coll = device if args.backend == "nccl" else torch.device("cpu")
    model = problems.seeded(args.seed, lambda: problems.sinusoid_mlp(args.hidden), device=device)
    outer = torch.optim.Adam(model.parameters(), lr=args.outer_lr)
    meta = torch_ufom.MetaOptimizer(model, outer, inner_lr=args.inner_lr, steps=args.steps,
                                    mode="ufom", q=args.q,
                                    generator=torch.Generator().manual_seed(args.seed),
                                    process_group=True, reduction="mean")
    losses, exact_branches = [], 0
    start = time.perf_counter()
    for k in range(args.outer_steps):
        tasks = meta_batch(args.seed, k, args.meta_batch, args.shots, device)[rank::world]
        meta.zero_grad()
        total = torch.zeros(2, dtype=torch.float64, device=coll)  # [sum of outer losses, tasks]
        for support, query in tasks:
            res = meta.backward(problems.mse, problems.mse, support, query)
            total += torch.tensor([float(res.outer_loss), 1.0], dtype=torch.float64, device=coll)
            exact_branches += int(res.truncation == args.steps)
        meta.step()  # all-reduces the meta-gradients over every rank's tasks, then steps Adam
        dist.all_reduce(total)
        losses.append(float(total[0] / total[1].clamp_min(1)))
    seconds = time.perf_counter() - start

    if args.perturb_rank == rank:
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] += 1e-3
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
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
