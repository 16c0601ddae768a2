"""Functional entry point: one task's hypergradient estimate, as a tuple of tensors."""
from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .estimators import Estimate, estimate
from .inner import SGD, InnerRule
from .schedules import MEMORY_CHOICES, check_slots, make_schedule
from .truncation import Bernoulli, Fixed, TruncationLaw
from .unroll import InnerLoop, _tensors
from .vectorised import BatchedInnerLoop, group_by_truncation, meta_batch_size, select_tasks

__all__ = ["hypergrad", "hypergrad_batch", "hypergrad_estimate", "batch_estimates", "BatchRun",
           "resolve_law", "resolve_hvp", "MODES", "HVP_CHOICES"]

MODES = ("fom", "ufom", "exact", "truncated")
HVP_CHOICES = ("auto", "fwdrev", "revrev")
# What hvp="auto" picks where forward-over-reverse applies (benchmarks/speed.py measures both).
DEFAULT_HVP = "revrev"


def check_hvp(hvp: str) -> str:
    """Validate ``hvp`` (one of ``HVP_CHOICES``)."""
    if hvp not in HVP_CHOICES:
        raise ValueError(f"Invalid hvp: {hvp!r} (expected one of {', '.join(HVP_CHOICES)})")
    return hvp


def resolve_hvp(hvp: str, model: nn.Module, rule: InnerRule, meta: Sequence[Tensor]) -> str:
    """The Hessian-vector product actually used: ``"fwdrev"`` or ``"revrev"``.

    Forward-over-reverse differentiates the inner loss with ``torch.func`` as a
    function of the adapted parameters alone, so it applies when the module has
    no buffers (BatchNorm's running statistics are written in place) and every
    meta-parameter is a module parameter or a tensor of the inner rule's
    hyperparameters (a tensor the losses use directly needs the mixed second
    derivative, which only reverse-over-reverse gives). ``"auto"`` picks the
    faster of the two where both apply (``DEFAULT_HVP``), else ``"revrev"``;
    ``"fwdrev"`` where it does not apply is a ``ValueError``.
    """
    check_hvp(hvp)
    if hvp == "revrev":
        return hvp
    known = {id(p) for p in model.parameters()} | {id(t) for t in _tensors(rule.hyper)}
    extra = [t for t in meta if t.requires_grad and id(t) not in known]
    buffers = next(model.buffers(), None) is not None
    if hvp == "auto":
        return "revrev" if extra or buffers else DEFAULT_HVP
    if buffers:
        raise ValueError("Invalid hvp: 'fwdrev' needs a module without buffers (its running "
                         "statistics would be written inside torch.func.jvp); use 'revrev' or 'auto'")
    if extra:
        raise ValueError(f"Invalid hvp: 'fwdrev' differentiates only through module parameters "
                         f"and inner-rule hyperparameters, but {len(extra)} meta-parameter(s) are "
                         "neither; use 'revrev' or 'auto'")
    return hvp


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
                       K: Optional[int] = None, diagnostics: bool = False,
                       hvp: str = "revrev") -> Estimate:
    """Draw ``K`` (unless given) and return the full :class:`~torch_ufom.estimators.Estimate`.

    Validated arguments only; :func:`hypergrad` and
    :class:`~torch_ufom.MetaOptimizer` check user input before calling it.
    """
    with restore_rng_on_error(generator):
        drawn, seed = draw(law, steps, generator)
        K = drawn if K is None else K
        if law.survival(steps)[K] <= 0.0:
            raise ValueError(f"Invalid force_truncation: K={K} has probability 0 under {law!r}")
        loop = InnerLoop(model, inner_loss, outer_loss, support, query, steps, rule, params, seed,
                         hvp)
        return estimate(loop, K, law.survival(steps), make_schedule(memory, slots), params,
                        diagnostics)


def check_force_truncation(force, size: int, steps: int) -> Optional[List[int]]:
    """Validate ``force_truncation`` of a meta-batch: ``None``, one int for every
    task, or a sequence of ``size`` ints, each in ``0..steps``."""
    if force is None:
        return None
    values = [force] * size if isinstance(force, int) and not isinstance(force, bool) else force
    if not isinstance(values, (list, tuple)) or len(values) != size:
        raise ValueError(f"Invalid force_truncation: {force!r} (expected an int or a sequence of "
                         f"{size} ints, one per task)")
    for i, k in enumerate(values):
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= steps:
            raise ValueError(f"Invalid force_truncation[{i}]: {k!r} (expected an int in 0..{steps})")
    return list(values)


@dataclass
class BatchRun:
    """What :func:`batch_estimates` returns.

    Attributes:
        groups: ``(task indices, Estimate, seconds)`` per group of tasks run
            together: one group per drawn ``K`` when vectorised (its estimate's
            losses carry a task dimension), one task per group otherwise.
        vectorised: whether ``torch.func.vmap`` ran the meta-batch.
        reason: why not, when it did not.
        truncations: every task's ``K``.
    """

    groups: List[Tuple[List[int], Estimate, float]]
    vectorised: bool
    reason: str
    truncations: List[int]


def batch_estimates(model: nn.Module, inner_loss: Callable, outer_loss: Callable, supports: Any,
                    queries: Any, *, steps: int, rule: InnerRule, law: TruncationLaw, memory: str,
                    params: Sequence[Tensor], slots: int = 8,
                    generator: Optional[torch.Generator] = None, K=None, diagnostics: bool = False,
                    hvp: str = "revrev") -> BatchRun:
    """A meta-batch's estimates: vectorised with ``torch.func.vmap`` where possible.

    Each task draws its ``K`` and its random-stream seed from ``generator`` in
    task order, exactly as a loop of single-task calls would. Tasks are then
    grouped by ``K`` and each group runs one vectorised sweep
    (:class:`~torch_ufom.vectorised.BatchedInnerLoop`). The per-task loop runs
    instead when the module has buffers, when ``diagnostics`` are needed
    (``q="auto"`` keeps per-task statistics), or when ``vmap`` fails on the
    model (a ``RuntimeError`` on the first attempt); ``BatchRun.reason`` says
    which. Validated arguments only, except ``supports``, ``queries`` and ``K``.
    """
    size = meta_batch_size(supports, queries)
    forced = check_force_truncation(K, size, steps)
    survival = law.survival(steps)
    with restore_rng_on_error(generator):
        draws = [draw(law, steps, generator) for _ in range(size)]
        truncations = [d[0] for d in draws] if forced is None else forced
        for i, k in enumerate(truncations):
            if survival[k] <= 0.0:
                raise ValueError(f"Invalid force_truncation[{i}]: K={k} has probability 0 under {law!r}")
        reason = ""
        if next(model.buffers(), None) is not None:
            reason = "the module has buffers (running statistics cannot be vectorised)"
        elif diagnostics:
            reason = "q='auto' keeps per-task statistics"
        if not reason:
            try:
                groups = []
                for k, index in group_by_truncation(truncations).items():
                    start = time.perf_counter()
                    loop = BatchedInnerLoop(model, inner_loss, outer_loss,
                                            select_tasks(supports, index), select_tasks(queries, index),
                                            steps, rule, params, draws[index[0]][1], len(index), hvp)
                    est = estimate(loop, k, survival, make_schedule(memory, slots), params)
                    groups.append((index, est, time.perf_counter() - start))
                return BatchRun(groups, True, "", truncations)
            except RuntimeError as err:
                reason = f"torch.func.vmap failed on this model ({str(err).splitlines()[0]})"
        groups = []
        for i in range(size):
            start = time.perf_counter()
            loop = InnerLoop(model, inner_loss, outer_loss, task_of(supports, i), task_of(queries, i),
                             steps, rule, params, draws[i][1], hvp)
            est = estimate(loop, truncations[i], survival, make_schedule(memory, slots), params,
                           diagnostics)
            groups.append(([i], est, time.perf_counter() - start))
        return BatchRun(groups, False, reason, truncations)


def task_of(tree: Any, i: int) -> Any:
    """Task ``i`` of a meta-batch (a tensor, tuple/list or dict of them)."""
    if isinstance(tree, Mapping):
        return type(tree)((k, task_of(v, i)) for k, v in tree.items())
    if isinstance(tree, (tuple, list)):
        return type(tree)(task_of(v, i) for v in tree)
    return tree[i]


def sum_grads(run: BatchRun, count: int) -> List[Optional[Tensor]]:
    """The sum over a meta-batch's groups of their hypergradients (``count`` tensors)."""
    total: List[Optional[Tensor]] = [None] * count
    for _, est, _ in run.groups:
        for i, g in enumerate(est.grads):
            if g is not None:
                total[i] = g if total[i] is None else total[i] + g
    return total


def _check_call(fn: str, model: nn.Module, inner, inner_lr, mode: str, q, steps: int,
                truncation, k, memory: str, slots: int, params, hvp: str):
    """Validate the arguments shared by :func:`hypergrad` and :func:`hypergrad_batch`;
    return ``(rule, law, params, hvp)``."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    rule = make_rule(inner, inner_lr, names)
    if q == "auto":
        raise ValueError("Invalid q: 'auto' needs the statistics that MetaOptimizer keeps; "
                         f"{fn} takes a float in (0, 1]")
    law = resolve_law(mode, q, steps, truncation, k)
    check_memory(memory)
    check_slots(slots)
    params = list(model.parameters()) if params is None else list(params)
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise ValueError(f"Invalid params[{i}]: expected a tensor, got {type(p).__name__}")
    return rule, law, params, resolve_hvp(hvp, model, rule, params)


def hypergrad_batch(model: nn.Module, inner_loss: Callable, outer_loss: Callable, supports: Any,
                    queries: Any, *, steps: int, inner_lr=None, mode: str = "ufom", q: float = 0.1,
                    memory: str = "checkpoint", slots: int = 8,
                    params: Optional[Sequence[Tensor]] = None,
                    generator: Optional[torch.Generator] = None, inner: Optional[InnerRule] = None,
                    truncation: Optional[TruncationLaw] = None, k: Optional[int] = None,
                    hvp: str = "auto", force_truncation=None) -> Tuple[Tensor, ...]:
    """The summed hypergradient estimates of a meta-batch of tasks, vectorised.

    The batched twin of :func:`hypergrad`: ``supports`` and ``queries`` are a
    tensor, a tuple/list or a dict of tensors whose first dimension indexes the
    tasks (one support batch per task, reused at every inner step). The result
    equals the sum of :func:`hypergrad` over the tasks with the same draws;
    it is computed by ``torch.func.vmap`` over the tasks, one group per drawn
    truncation point, or by the per-task loop (with a warning) where the model
    cannot be vectorised (see :func:`batch_estimates`). The losses see one
    task's batch, as in :func:`hypergrad`.

    Args:
        supports, queries: the stacked tasks.
        force_truncation: ``None`` (draw), an int for every task, or one int per task.
        The others: as for :func:`hypergrad`.

    Raises:
        ValueError: an invalid argument, e.g. tensors whose leading sizes differ
            (the message names the entry); nothing is changed.
    """
    rule, law, params, hvp = _check_call("hypergrad_batch", model, inner, inner_lr, mode, q, steps,
                                         truncation, k, memory, slots, params, hvp)
    run = batch_estimates(model, inner_loss, outer_loss, supports, queries, steps=steps, rule=rule,
                          law=law, memory=memory, slots=slots, params=params, generator=generator,
                          K=force_truncation, hvp=hvp)
    if not run.vectorised:
        warnings.warn(f"hypergrad_batch ran the per-task loop: {run.reason}", stacklevel=2)
    total = sum_grads(run, len(params))
    return tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, total))


def hypergrad(model: nn.Module, inner_loss: Callable, outer_loss: Callable, support: Any,
              query: Any, *, steps: int, inner_lr=None, mode: str = "ufom", q: float = 0.1,
              memory: str = "checkpoint", slots: int = 8,
              params: Optional[Sequence[Tensor]] = None,
              generator: Optional[torch.Generator] = None, inner: Optional[InnerRule] = None,
              truncation: Optional[TruncationLaw] = None, k: Optional[int] = None,
              hvp: str = "auto") -> Tuple[Tensor, ...]:
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
        hvp: Hessian-vector products of the exact sweep: ``"auto"`` (default),
            ``"fwdrev"`` (forward-over-reverse, ``torch.func.jvp`` of the
            gradient) or ``"revrev"`` (reverse-over-reverse, double backward);
            see :func:`resolve_hvp`.

    Returns:
        A tuple with one tensor per entry of ``params`` (zeros where a tensor
        does not influence the outer loss).

    Raises:
        ValueError: an invalid argument (nothing is changed).
        FloatingPointError: a non-finite inner or outer loss.
    """
    rule, law, params, hvp = _check_call("hypergrad", model, inner, inner_lr, mode, q, steps,
                                         truncation, k, memory, slots, params, hvp)
    est = hypergrad_estimate(model, inner_loss, outer_loss, support, query, steps=steps,
                             rule=rule, law=law, memory=memory, slots=slots, params=params,
                             generator=generator, hvp=hvp)
    return tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, est.grads))
