"""Data-parallel meta-training on ``torch.distributed``: the few collectives it needs.

Each rank runs its own tasks with :meth:`~torch_ufom.MetaOptimizer.backward`
(second-order meta-gradients need no collective inside the inner loop, which
is why this works where DDP's double backward does not). Before the outer
step, :func:`sum_gradients` all-reduces the accumulated meta-gradients and the
task counts (the optimizer then applies its ``reduction``); :func:`gather` exchanges the adaptive-q
observations, so that every rank applies the same ones in the same order.
Works with ``gloo`` (CPU) and ``nccl`` (CUDA) process groups.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["check_group", "rank_generator", "rank", "resume_generator", "check_alike", "sum_gradients",
           "average_buffers", "gather"]


def check_group(group) -> None:
    """Raise ``ValueError`` unless ``group`` is a process group (``None``: the default
    one) and ``torch.distributed`` is initialised.

    The type is checked first, so that ``process_group=False`` (or any other
    value that is not a group) is reported as such, not as "not initialised".
    """
    import torch.distributed as dist
    if dist.is_available() and type(group) is int and group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError("Invalid process_group: this rank is not a member of it (torch.distributed."
                         "new_group returns that value on the ranks it leaves out); build the "
                         "MetaOptimizer with the group on its member ranks only")
    is_group = dist.is_available() and (group is dist.group.WORLD or
                                        isinstance(group, dist.ProcessGroup))
    if group is not None and not is_group:  # (False: the right type, a wrong value)
        raise (ValueError if isinstance(group, bool) else TypeError)(
            f"Invalid process_group: {group!r} (expected None for no data parallelism, True or "
            "torch.distributed.group.WORLD for the default group, or a torch.distributed.ProcessGroup)")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("Invalid process_group: torch.distributed is not initialised; call "
                         "torch.distributed.init_process_group first (e.g. under torchrun)")


def _device(group) -> torch.device:
    import torch.distributed as dist
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _on(device: Optional[torch.device]):
    """Make ``device`` the current CUDA device for the body (nccl's collectives and
    ``all_gather_object`` use the current one): a rank whose model is on ``cuda:k``
    talks from ``cuda:k`` even where ``torch.cuda.set_device`` was not called."""
    if device is not None and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def rank_generator(generator: Optional[torch.Generator], group,
                   device: Optional[torch.device] = None) -> torch.Generator:
    """A generator for this rank, seeded from one seed: ``generator``'s initial seed,
    or rank 0's global seed, mixed with the rank so that streams differ. ``device``:
    the model's, where the collective runs under nccl. A collective on every rank, with
    or without ``generator``: ranks that pass one and ranks that do not get the same
    ``ValueError`` (a broadcast that only some ranks ran waited for the group's timeout)."""
    import torch.distributed as dist
    given = generator is not None
    first = rank(group) == 0
    with _on(device):
        own = 0 if given or not first else torch.initial_seed() % (1 << 62)
        t = torch.tensor([int(given), -int(given), own], dtype=torch.int64, device=_device(group))
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)  # rank 0's seed: the others give 0
        some, all_negated, seed0 = t.tolist()  # all_negated: 0 where some rank passes none
    if some == 1 and all_negated == 0:
        raise ValueError("Invalid generator: some ranks of the process group pass one and others "
                         "do not; pass generator= on every rank or on none")
    if given:
        seed, device = generator.initial_seed(), generator.device
    else:
        seed, device = seed0, torch.device("cpu")
    return torch.Generator(device=device).manual_seed(_mixed(seed, rank(group)))


def _mixed(seed: int, rank: int) -> int:
    return (seed + rank * 0x9E3779B97F4A7C15) % (1 << 63)


def rank(group) -> int:
    """This process's rank in ``group`` (``None``: the default group)."""
    import torch.distributed as dist
    return dist.get_rank(group)


def resume_generator(generator: torch.Generator, state: Tensor, saved_rank: Optional[int], group) -> None:
    """Set ``generator`` to ``state``, which rank ``saved_rank`` saved (``None``: a process
    without a group, taken as rank 0's). A state saved by another rank (a dict saved on
    rank 0 and loaded on every rank) seeds a stream of this rank's own from it instead:
    every rank would otherwise draw the same truncation points and dropout masks."""
    generator.set_state(state.cpu())  # (a CPU tensor whatever the device: map_location may move it)
    here = rank(group)
    if (saved_rank or 0) != here:
        seed = int(torch.randint(0, 1 << 62, (1,), generator=generator, device=generator.device))
        generator.manual_seed(_mixed(seed, here))


def check_alike(marks: Dict[str, int], group, device: Optional[torch.device] = None,
                sums: Optional[Dict[str, Tensor]] = None) -> None:
    """Raise the same ``ValueError`` on every rank of ``group`` unless every rank passes
    the same ``marks`` (what must agree, by name, each as an int below ``2**52``) and the
    same ``sums`` (checksums of values, by name, each a float64 0-d tensor on the device):
    the collectives that follow pair up only between ranks set up alike (gloo aborts the
    process on tensors of other sizes, and a collective one rank alone runs waits for
    the group's timeout), and ranks that reduce, estimate or hold differently step apart.
    One all-reduce of ``2 (len(marks) + len(sums))`` numbers; ``device``: the model's, as
    for :func:`gather`."""
    import torch.distributed as dist
    sums = sums or {}
    names = list(marks) + list(sums)
    with _on(device):
        where = _device(group)
        t = torch.tensor([float(v) for v in marks.values()], dtype=torch.float64, device=where)
        if sums:
            t = torch.cat([t, torch.stack([v.to(where, torch.float64) for v in sums.values()])])
        t = torch.cat([t, -t])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        top = t.tolist()
    differ = [name for i, name in enumerate(names) if top[i] != -top[len(names) + i]]
    if differ:
        raise ValueError("Invalid process_group: the ranks' MetaOptimizers differ in "
                         f"{', '.join(differ)}; nothing was changed"
                         + ("; build it alike on every rank of the group (the same model and settings)"
                            if any(n in marks for n in differ) else ""))


def sum_gradients(params: Sequence[Tensor], n_tasks: int, group) -> int:
    """All-reduce (sum) the ``.grad`` of ``params`` and the task counts over ``group``.

    A tensor without ``.grad`` on this rank takes part with zeros, and gets a
    gradient if any rank has one. Every rank uses one layout per tensor, as the
    collective needs: sparse where every rank has a sparse gradient, dense
    otherwise and under nccl (a sparse gradient is made dense). Returns the
    global number of tasks.
    """
    import torch.distributed as dist
    with _on(params[0].device if params else None):
        device = _device(group)
        count = torch.tensor([float(n_tasks)], dtype=torch.float64, device=device)
        # Per tensor: how many ranks hold a dense gradient, and how many a sparse one.
        kinds = torch.tensor([[float(p.grad is not None and not p.grad.is_sparse) for p in params],
                              [float(p.grad is not None and p.grad.is_sparse) for p in params]],
                             device=device)
        dist.all_reduce(count, group=group)
        dist.all_reduce(kinds, group=group)
        total = int(count.item())
        # gloo pairs only like with like; nccl has no sparse all-reduce.
        every = dist.get_world_size(group) if dist.get_backend(group) != "nccl" else math.inf
        for p, dense, sparse in zip(params, *kinds.tolist()):
            if not dense and not sparse:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            elif p.grad.is_sparse and sparse < every:
                p.grad = p.grad.to_dense()
            dist.all_reduce(p.grad, group=group)
    return total


def average_buffers(tasks: Sequence[Sequence[Tensor]], buffers: Sequence[Tensor],
                    group) -> List[Optional[Tensor]]:
    """The final buffers of every rank's tasks (``tasks[t][i]``: task ``t``'s value of
    ``buffers[i]``) averaged over all ranks' tasks, for a floating-point buffer, as one
    process running all the tasks writes them; for an integer or bool buffer, the largest
    value (a counter such as ``num_batches_tracked``, which every task advances alike, as
    one process writes it; one process would write its last task's value of another).
    ``None`` where no rank ran a task. Every rank calls it, with or without tasks."""
    import torch.distributed as dist
    with _on(buffers[0].device if buffers else None):
        count = torch.tensor([float(len(tasks))], dtype=torch.float64, device=_device(group))
        dist.all_reduce(count, group=group)
        total = int(count.item())
        out: List[Optional[Tensor]] = []
        for i, buf in enumerate(buffers):
            values = [task[i] for task in tasks]
            if buf.is_floating_point():
                value = torch.stack(values).sum(0) if values else torch.zeros_like(buf)
                dist.all_reduce(value, group=group)
                value = value / max(total, 1)
            else:
                low = False if buf.dtype == torch.bool else torch.iinfo(buf.dtype).min
                value = values[-1].clone() if values else torch.full_like(buf, low)
                dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
            out.append(value if total else None)
    return out


def gather(obj: Any, group, device: Optional[torch.device] = None) -> List[Any]:
    """Every rank's ``obj``, in rank order (``all_gather_object``); ``device``: the
    model's, where the collective runs under nccl."""
    import torch.distributed as dist
    out: List[Any] = [None] * dist.get_world_size(group)
    with _on(device):
        dist.all_gather_object(out, obj, group=group)
    return out
