"""The inner steps' batches: one for every step, one per step, or ``j -> batch``.

A ``support`` is one batch reused at every step (a tensor, a tuple or list as a
``DataLoader`` yields it, a dict), a :class:`StepBatches` of one batch per step,
or a callable ``j -> batch``. :func:`batch_getter` turns any of them into
``j -> batch`` once per call, checking what it can before the first step;
:func:`probe_batches` fetches the batches the looks at the losses evaluate,
leaving the program's random streams alone.
"""
from __future__ import annotations

import inspect
import types
from collections.abc import Iterator, Mapping
from typing import Any, Callable, List, Sequence

from torch import Tensor, nn

from .randomness import random_states_kept

__all__ = ["StepBatches", "batch_getter", "per_step_batches", "probe_batches", "check_step_function",
           "positional_obstacle", "SAMPLES_ANEW"]


class StepBatches:
    """One batch per inner step: ``StepBatches([b_0, ..., b_{steps-1}])``.

    A plain list or tuple passed as ``support`` is one batch (``[x, y]``, as a
    ``DataLoader`` yields it) reused at every step; wrap a sequence of
    per-step batches in ``StepBatches`` (or pass a callable ``j -> batch``)
    to give each step its own. In a meta-batch, each entry is a stacked batch
    (tasks along dimension 0).

    Args:
        batches: a sequence of exactly ``steps`` batches.
    """

    def __init__(self, batches: Sequence[Any]):
        if isinstance(batches, (Tensor, Mapping, str)) or not hasattr(batches, "__len__") or \
                not hasattr(batches, "__getitem__"):
            raise TypeError(f"Invalid batches: expected a sequence of per-step batches, got "
                            f"{type(batches).__name__}")
        self.batches = list(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, j: int):
        return self.batches[j]

    def __repr__(self) -> str:
        return f"StepBatches({len(self.batches)} batches)"


def positional_obstacle(fn, n: int) -> str:
    """Why a plain function or bound method ``fn`` cannot be called with ``n`` positional
    arguments (``""``: it can, or its code does not say: a builtin, a callable object). Read
    from its code object, not ``inspect.signature`` (10 us per loss per call)."""
    bound = isinstance(fn, types.MethodType)
    func = fn.__func__ if bound else fn
    if not isinstance(func, types.FunctionType) or func.__code__.co_flags & inspect.CO_VARARGS:
        return ""
    code = func.__code__
    takes = code.co_argcount - bound
    required = takes - len(func.__defaults__ or ())
    keywords = code.co_varnames[code.co_argcount:code.co_argcount + code.co_kwonlyargcount]
    if takes < n or required > n:
        return f"{func.__qualname__} takes {takes} positional argument{'s' * (takes != 1)}"
    missing = [k for k in keywords if k not in (func.__kwdefaults__ or {})]
    if missing:
        return f"{func.__qualname__} needs the keyword argument {missing[0]!r}"
    return ""


def check_step_function(support, arg: str = "support") -> None:
    """A ``TypeError`` naming ``arg`` unless the callable of per-step batches ``support``
    can be called with the step index ``j`` (review GA: ``lambda: batch`` raised its own
    ``TypeError`` at the first step)."""
    why = positional_obstacle(support, 1)
    if why:
        raise TypeError(f"Invalid {arg}: {why}, but the library calls {arg}(j) for step j's batch "
                        "(j = 0..steps-1; pass the batch itself to use it at every step)")


SAMPLES_ANEW = (
    "support is a callable j -> batch, which the library calls again for step j wherever it evaluates "
    "the step again: it must return the same batch each time (a function of j drawing only from "
    "torch's global generator, which each step's random stream reseeds; not next() of an iterator, "
    "NumPy, Python's random or a generator of your own), else pass StepBatches([...]) of the batches")


def batch_getter(support: Any, steps: int, arg: str = "support") -> Callable[[int], Any]:
    """Return ``j -> batch`` (``j = 0..steps-1``) for the three kinds of support.

    A callable is used as is, a :class:`StepBatches` must hold exactly
    ``steps`` batches, and anything else (a tensor, a tuple or list of
    tensors, a dict) is one batch reused at every step.
    """
    if isinstance(support, StepBatches):
        if len(support) != steps:
            raise ValueError(
                f"Invalid {arg}: StepBatches must hold exactly steps={steps} batches, got "
                f"{len(support)}")
        return support.__getitem__
    if callable(support) and not isinstance(support, (Tensor, nn.Module)):
        check_step_function(support, arg)
        return support
    if isinstance(support, Iterator):  # a generator: used up at the first step
        raise TypeError(f"Invalid {arg}: an iterator ({type(support).__name__}) would be used up by the "
                        "first step (expected one batch, StepBatches([...]) of every step's batch, or "
                        "a callable j -> batch)")
    return lambda j: support


def per_step_batches(support: Any) -> bool:
    """Whether ``support`` gives a batch per step (:class:`StepBatches`, a callable
    ``j -> batch``) rather than one batch for every step."""
    return isinstance(support, StepBatches) or (
        callable(support) and not isinstance(support, (Tensor, nn.Module)))


def probe_batches(support: Any, steps: int, arg: str = "support") -> List[Any]:
    """The batches a look at a task evaluates: every step's with per-step batches
    (:class:`StepBatches`, a callable; a loss may act differently at some steps), else
    the one batch."""
    get = batch_getter(support, steps, arg)
    if not per_step_batches(support):
        return [get(0)]
    batches, seen = [], set()
    with random_states_kept():  # a callable may draw: the look leaves the program's streams alone
        for j in range(steps):  # each batch once (StepBatches([b] * steps) is one batch)
            batch = get(j)
            if id(batch) not in seen:
                seen.add(id(batch))
                batches.append(batch)
    return batches
