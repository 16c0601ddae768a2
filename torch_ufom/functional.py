"""Functional entry point: one task's hypergradient estimate, as a tuple of tensors."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .estimators import Estimate, estimate
from .inner import SGD, InnerRule
from .schedules import MEMORY_CHOICES, check_slots, make_schedule
from .truncation import Bernoulli, Fixed, TruncationLaw
from .unroll import InnerLoop

__all__ = ["hypergrad", "hypergrad_estimate", "resolve_law", "MODES"]

MODES = ("fom", "ufom", "exact", "truncated")


def resolve_law(mode: str, q: float, steps: int, truncation: Optional[TruncationLaw] = None,
                k: Optional[int] = None) -> TruncationLaw:
    """The truncation law for ``mode`` (or the explicit ``truncation``), validated for ``steps``.

    ``fom`` is ``Fixed(0)``, ``exact`` is ``Fixed(steps)``, ``ufom`` is
    ``Bernoulli(q)`` (the paper's estimator) and ``truncated`` is ``Fixed(k)``
    (truncated back-propagation through the last ``k`` steps: biased).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Invalid steps: {steps!r} (expected an int >= 1)")
    if truncation is not None:
        if not isinstance(truncation, TruncationLaw):
            raise ValueError(f"Invalid truncation: {truncation!r} (expected a TruncationLaw)")
        law = truncation
    elif mode == "fom":
        law = Fixed(0)
    elif mode == "exact":
        law = Fixed(steps)
    elif mode == "ufom":
        law = Bernoulli(q)
    elif mode == "truncated":
        if k is None:
            raise ValueError("Invalid k: None (mode='truncated' needs k, an int in 0..steps)")
        law = Fixed(k)
    else:
        raise ValueError(f"Invalid mode: {mode!r} (expected one of {', '.join(MODES)})")
    law.validate(steps)
    return law


def check_memory(memory: str) -> str:
    """Validate ``memory`` (one of ``MEMORY_CHOICES``)."""
    if memory not in MEMORY_CHOICES:
        raise ValueError(f"Invalid memory: {memory!r} (expected one of {', '.join(MEMORY_CHOICES)})")
    return memory


def make_rule(inner: Optional[InnerRule], inner_lr, names: Sequence[str]) -> InnerRule:
    """The inner rule: ``inner`` if given, else ``SGD(inner_lr)``; validated against ``names``."""
    if inner is None:
        if inner_lr is None:
            raise ValueError("Invalid inner_lr: None (give inner_lr, or an inner rule as inner=)")
        inner = SGD(inner_lr)
    elif inner_lr is not None:
        raise ValueError("Invalid inner_lr: give either inner_lr or inner=, not both")
    if not isinstance(inner, InnerRule):
        raise ValueError(f"Invalid inner: {inner!r} (expected a torch_ufom.inner rule)")
    inner.validate(names)
    return inner


@contextlib.contextmanager
def restore_rng_on_error(generator: Optional[torch.Generator]):
    """Put the generator (or the global RNG) back as it was if the body raises."""
    gen = generator if generator is not None else torch.default_generator
    saved = gen.get_state()
    try:
        yield
    except BaseException:
        gen.set_state(saved)
        raise


def draw(law: TruncationLaw, steps: int, generator: Optional[torch.Generator]) -> Tuple[int, int]:
    """Draw the truncation point and the base seed of the per-step random streams."""
    K = law.sample(steps, generator)
    device = generator.device if generator is not None else "cpu"
    seed = int(torch.randint(0, 1 << 62, (), generator=generator, device=device))
    return K, seed


def hypergrad_estimate(model: nn.Module, inner_loss: Callable, outer_loss: Callable,
                       support: Any, query: Any, *, steps: int, rule: InnerRule,
                       law: TruncationLaw, memory: str, params: Sequence[Tensor],
                       slots: int = 8, generator: Optional[torch.Generator] = None,
                       K: Optional[int] = None, diagnostics: bool = False) -> Estimate:
    """Draw ``K`` (unless given) and return the full :class:`~torch_ufom.estimators.Estimate`.

    Validated arguments only; :func:`hypergrad` and
    :class:`~torch_ufom.MetaOptimizer` check user input before calling it.
    """
    with restore_rng_on_error(generator):
        drawn, seed = draw(law, steps, generator)
        K = drawn if K is None else K
        if law.survival(steps)[K] <= 0.0:
            raise ValueError(f"Invalid force_truncation: K={K} has probability 0 under {law!r}")
        loop = InnerLoop(model, inner_loss, outer_loss, support, query, steps, rule, params, seed)
        return estimate(loop, K, law.survival(steps), make_schedule(memory, slots), params,
                        diagnostics)


def hypergrad(model: nn.Module, inner_loss: Callable, outer_loss: Callable, support: Any,
              query: Any, *, steps: int, inner_lr=None, mode: str = "ufom", q: float = 0.1,
              memory: str = "checkpoint", slots: int = 8,
              params: Optional[Sequence[Tensor]] = None,
              generator: Optional[torch.Generator] = None, inner: Optional[InnerRule] = None,
              truncation: Optional[TruncationLaw] = None, k: Optional[int] = None
              ) -> Tuple[Tensor, ...]:
    """Estimate the hypergradient of one task, like ``torch.autograd.grad``.

    Runs ``steps`` inner steps from the module's parameters and returns the
    estimate of ``d outer_loss(fmodel_r, query) / d params`` chosen by ``mode``.
    The module's parameters, buffers and ``.grad`` are left untouched.

    Args:
        model: any ``nn.Module``; its parameters with ``requires_grad`` are
            the inner loop's starting point.
        inner_loss: ``(fmodel, batch) -> scalar tensor``; ``fmodel`` is called
            like ``model`` but runs at the current inner parameters.
        outer_loss: ``(fmodel, query) -> scalar tensor`` at the final parameters.
        support: one batch reused at every step, a ``list`` of ``steps``
            batches, or a callable ``j -> batch`` for ``j = 0..steps-1``.
        query: the outer loss's batch.
        steps: number of inner steps ``r >= 1``.
        inner_lr: the inner SGD learning rate: a float, a scalar tensor, or a
            dict from parameter name to tensor. Tensors among ``params`` are learned.
        mode: ``"fom"`` (first-order, ``G_0``), ``"ufom"`` (``G_0 + (xi/q)(G_r - G_0)``,
            ``xi ~ Bernoulli(q)``: unbiased), ``"exact"`` (``G_r``) or
            ``"truncated"`` (``G_k``: exact through the last ``k`` steps; biased).
        q: probability of the exact branch for ``"ufom"``, in ``(0, 1]``.
        memory: how the exact sweep over the last ``K`` steps gets its states:
            ``"checkpoint"`` (default: binomial checkpointing with ``slots``
            stored states, about ``K log K`` replayed steps, constant memory),
            ``"recompute"`` (the paper's scheme: one stored state,
            ``K (K - 1) / 2`` replayed steps) or ``"store"`` (every step's
            graph: ``O(K)`` memory, no replay).
        slots: the number of stored states for ``memory="checkpoint"``.
        params: tensors to differentiate with respect to (default: the model's
            parameters). Any tensor the losses or ``inner_lr`` use may be included.
        generator: a ``torch.Generator`` for the truncation draw and the
            per-step random streams (default: the global generator).
        inner: an inner rule from :mod:`torch_ufom.inner` instead of ``inner_lr``.
        truncation: a law from :mod:`torch_ufom.truncation`, overriding ``mode``.
        k: the truncation point of ``mode="truncated"``.

    Returns:
        A tuple with one tensor per entry of ``params`` (zeros where a tensor
        does not influence the outer loss).

    Raises:
        ValueError: an invalid argument (nothing is changed).
        FloatingPointError: a non-finite inner or outer loss.
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    rule = make_rule(inner, inner_lr, names)
    if q == "auto":
        raise ValueError("Invalid q: 'auto' needs the statistics that MetaOptimizer keeps; "
                         "hypergrad takes a float in (0, 1]")
    law = resolve_law(mode, q, steps, truncation, k)
    check_memory(memory)
    check_slots(slots)
    params = list(model.parameters()) if params is None else list(params)
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise ValueError(f"Invalid params[{i}]: expected a tensor, got {type(p).__name__}")
    est = hypergrad_estimate(model, inner_loss, outer_loss, support, query, steps=steps,
                             rule=rule, law=law, memory=memory, slots=slots, params=params,
                             generator=generator)
    return tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, est.grads))
