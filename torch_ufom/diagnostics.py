"""Before training: measure what decides ``q`` on the user's own model and tasks.

:func:`diagnose` runs a few tasks twice, once first-order (``K = 0``) and once
with the exact branch (``K = r``, which also yields ``G_0``), and returns the
statistics of ``docs/maths.md#the-two-q-rules``: ``A = E||G_r||^2``,
``D = E||G_r - G_0||^2``, the two branches' costs (seconds and inner steps),
and the ``q`` each rule would pick from them. A ``q`` near 1 says ``ufom``
would spend nearly what ``exact`` spends; a small ``q`` says the bias of
``fom`` is small next to the gradient and the exact branch is costly.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import adaptive
from .batches import batch_getter
from .config import Settings, resolve
from .functional import estimate_task, functional_problem
from .inner import InnerRule
from .process import one_call_at_a_time
from .randomness import host_random_states_kept, restore_rng_on_error

__all__ = ["Diagnosis", "diagnose"]


@dataclass(frozen=True)
class Diagnosis:
    """What :func:`diagnose` measured.

    Attributes:
        A: mean squared norm of the exact hypergradient ``G_r`` over the tasks.
        D: mean squared norm of ``G_r - G_0`` (the first-order bias).
        seconds_fom: mean wall-clock time of a first-order task.
        seconds_exact: mean wall-clock time of an exact-branch task.
        steps_fom: inner-step units of a first-order task (``r + 1``).
        steps_exact: the exact branch's extra inner-step units over a
            first-order task under the configured memory setting (steps run
            again plus one per reverse VJP: ``forward + 2 reverse - r``, as
            :mod:`~torch_ufom.adaptive` counts ``c_x``); with every step kept
            (``K <= slots`` or ``memory="store"``) it is ``r``.
        q_ufom: ``q*`` of the ufom rule at these statistics, measured times.
        q_authors: the authors' rule at these statistics (``D / 10`` and their
            recomputation step counts; their running rule reweights ``D`` by
            ``(1/q - 1)^2`` at each draw's ``q``, which a one-off measurement
            with forced exact branches does not have).
        tasks: the number of tasks measured.
    """

    A: float
    D: float
    seconds_fom: float
    seconds_exact: float
    steps_fom: float
    steps_exact: float
    q_ufom: float
    q_authors: float
    tasks: int


def _sq(grads: Sequence[Optional[Tensor]]) -> float:
    return float(sum((g.detach().double() ** 2).sum() for g in grads if g is not None))


@one_call_at_a_time  # (review s39H F1: it wrapped a context manager, so it held the lock for nothing)
def diagnose(model: nn.Module, inner_loss: Callable, outer_loss: Callable,
             tasks: Sequence[Tuple[Any, Any]], *, steps: int, inner_lr=None,
             inner: Optional[InnerRule] = None, memory: str = "checkpoint", slots: Optional[int] = None,
             max_memory: Optional[int] = None, hvp: str = "auto", inner_params=None,
             params: Optional[Sequence[Tensor]] = None,
             generator: Optional[torch.Generator] = None) -> Diagnosis:
    """Measure ``A``, ``D`` and the branch costs on ``tasks`` and the ``q`` each rule picks.

    Args:
        model, inner_loss, outer_loss, steps, inner_lr, inner, memory, slots,
            max_memory, hvp, inner_params, params, generator: as for
            :func:`~torch_ufom.hypergrad`.
        tasks: a sequence of ``(support, query)`` pairs (a few are enough; the
            statistics are means over them). The first is also run once
            beforehand to warm up, so the times are steady.

    Returns:
        A :class:`Diagnosis`. Nothing is written to ``.grad``; the module, the
        generator and the global random state are left as they were (the
        draws of a training run that calls it in between do not move).

    Raises:
        TypeError, ValueError: an invalid argument, named as given (``tasks``, a task's
            support as ``tasks[i][0]``, the keywords as :func:`~torch_ufom.hypergrad`'s).
        FloatingPointError, RuntimeError: as :func:`~torch_ufom.hypergrad` raises them.
    """
    if isinstance(tasks, (str, bytes, Mapping)) or not hasattr(tasks, "__iter__"):
        raise TypeError(f"Invalid tasks: {type(tasks).__name__} (expected a non-empty sequence of "
                        "(support, query) pairs)")
    tasks = list(tasks)
    wrong = next((t for t in tasks if not isinstance(t, (tuple, list))), None)
    if wrong is not None:  # (review IA F5: a wrong type is a TypeError)
        raise TypeError(f"Invalid tasks: an entry is a {type(wrong).__name__} (expected a non-empty "
                        "sequence of (support, query) pairs)")
    if not tasks or not all(len(t) == 2 for t in tasks):
        raise ValueError("Invalid tasks: expected a non-empty sequence of (support, query) pairs")
    config = resolve(Settings(steps, inner_lr, inner, "exact", memory=memory, slots=slots,
                              max_memory=max_memory, hvp=hvp, inner_params=inner_params), model,
                     "diagnose")
    for i, (support, _) in enumerate(tasks):  # (named as given: it said "support", review s32E F4)
        batch_getter(support, config.steps, f"tasks[{i}][0]")
    problem = functional_problem(model, (inner_loss, outer_loss), config, params, generator)
    A = D = t_f = t_x = c_x = 0.0
    with restore_rng_on_error(generator, always=True), host_random_states_kept():
        estimate_task(problem, *tasks[0], force=steps, hooks=False)  # warm-up
        for support, query in tasks:
            start = time.perf_counter()
            estimate_task(problem, support, query, force=0, hooks=False)
            t_f += time.perf_counter() - start
            start = time.perf_counter()
            est = estimate_task(problem, support, query, force=steps, diagnostics=True, hooks=False)
            t_x += time.perf_counter() - start
            A += _sq(est.gk)
            D += _sq(adaptive.difference(est.gk, est.g0))
            c_x += est.forward_steps + 2 * est.reverse_steps - steps
    n = len(tasks)
    A, D, t_f, t_x, c_x = A / n, D / n, t_f / n, t_x / n, c_x / n
    q_ufom = adaptive.optimal_q(A, D, t_f, max(t_x - t_f, 1e-12 * t_f), 0.01)
    q_authors = adaptive.authors_q(A, D / 10.0, steps + 1, steps * (steps + 1) / 2, 0.05)
    return Diagnosis(A, D, t_f, t_x, float(steps + 1), c_x, q_ufom, q_authors, n)
