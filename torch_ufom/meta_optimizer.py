"""``MetaOptimizer``: a ``torch.optim``-style shell around the estimators."""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from . import adaptive, distributed
from .config import Settings, check_generator, check_losses, resolve
from .estimators import Estimate, NonFiniteHypergradient
from .functional import Problem, estimate_batch, estimate_task, resolve_hvp, sum_grads
from .inner import InnerRule
from .truncation import Bernoulli, TruncationLaw

__all__ = ["MetaOptimizer", "MetaResult"]


@dataclass
class MetaResult:
    """What :meth:`MetaOptimizer.backward` returns for one task.

    Attributes:
        outer_loss: the detached outer loss after the inner loop.
        inner_losses: the detached inner losses of steps ``1..steps`` (1-D tensor).
        truncation: the sampled truncation point ``K`` (``0``: first-order only,
            ``steps``: the exact branch ran).
        weights: ``1 / P(K >= m)`` for ``m = 0..K``.
        q: the probability of the exact branch used for this task (``ufom``),
            else ``None``; with ``q="auto"``, :meth:`MetaOptimizer.step` sets the
            next outer step's in ``MetaOptimizer.q_stats["q"]``.
        forward_steps: inner steps run without a graph (forward pass and replays).
        reverse_steps: inner steps rebuilt with a graph by the exact sweep.
    """

    outer_loss: Tensor
    inner_losses: Tensor
    truncation: int
    weights: List[float]
    q: Optional[float]
    forward_steps: int
    reverse_steps: int


class MetaOptimizer:
    """Drop-in outer optimizer for bi-level problems (MAML, learned inner rates, ...).

    Wraps the user's outer optimizer. :meth:`backward` runs one task's inner
    loop from the module's parameters and accumulates the hypergradient
    estimate into the ``.grad`` of every tensor the outer optimizer holds;
    :meth:`step` steps the outer optimizer.

    Args:
        model: any ``nn.Module``; its parameters with ``requires_grad`` are the
            inner loop's starting point and must all be held by ``optimizer``.
        optimizer: the outer ``torch.optim.Optimizer``. Every tensor it holds is
            a meta-parameter (e.g. ``inner_lr`` as a tensor, a loss weight).
        inner_lr: the inner SGD learning rate: a float, a scalar tensor or a
            dict from parameter name to tensor (per-parameter rates).
        steps: number of inner steps ``r >= 1``.
        mode: ``"fom"``, ``"ufom"`` (unbiased, exact branch with probability
            ``q``), ``"exact"`` or ``"truncated"`` (exact through the last
            ``k`` steps only: biased).
        q: exact-branch probability for ``"ufom"``, in ``(0, 1]``, or ``"auto"``
            to adapt it to the measured bias, variance and costs
            (:mod:`torch_ufom.adaptive`).
        q_rule, q_min, q_beta: with ``q="auto"``: the rule (``"ufom"`` or the
            authors' ``"authors"``), the smallest ``q`` and the averaging factor.
        k: the truncation point of ``mode="truncated"``.
        track_buffers: if ``True``, :meth:`step` writes the inner loop's final
            buffers (BatchNorm running statistics) into the module: the mean
            over the tasks since the last step for floating-point buffers, the
            last task's for integer ones (``num_batches_tracked``). Default
            ``False``: the module's buffers are never changed, and every task
            starts from them. :meth:`backward` never writes buffers.
        memory: ``"checkpoint"`` (default: binomial checkpointing, ``slots``
            stored states, about ``K log K`` replayed steps), ``"recompute"``
            (one stored state, ``K (K - 1) / 2`` replayed steps) or ``"store"``
            (every step's graph: ``O(steps)`` memory, no replay).
        slots: stored states for ``memory="checkpoint"``.
        generator: optional ``torch.Generator`` making the draws reproducible.
        inner: an inner rule from :mod:`torch_ufom.inner` instead of ``inner_lr``.
        truncation: a law from :mod:`torch_ufom.truncation`, overriding ``mode``.
        process_group: data parallelism over ``torch.distributed`` (``None``:
            off; ``torch.distributed.group.WORLD`` or any process group: on).
            Each rank runs its own tasks; :meth:`step` first averages the
            meta-gradients over the global number of tasks (without a group,
            ``backward`` accumulates sums like ``loss.backward()``). Each rank
            draws from its own generator, seeded from one seed (``generator``'s,
            or rank 0's global seed) and its rank; ``q="auto"`` statistics stay
            identical on every rank.
        hvp: Hessian-vector products of the exact sweep: ``"auto"`` (default:
            the faster where it applies), ``"fwdrev"`` (forward-over-reverse,
            ``torch.func.jvp`` of the inner gradient) or ``"revrev"``
            (reverse-over-reverse); see :func:`torch_ufom.functional.resolve_hvp`.

    Example:
        >>> meta = MetaOptimizer(model, torch.optim.Adam(model.parameters()),
        ...                      inner_lr=0.01, steps=20, mode="ufom", q=0.1)
        >>> meta.zero_grad()
        >>> for support, query in tasks:
        ...     meta.backward(inner_loss, outer_loss, support, query)
        >>> meta.step()
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, inner_lr=None, *,
                 steps: int, mode: Optional[str] = None, q: float = 0.1, memory: str = "checkpoint",
                 slots: int = 8,
                 generator: Optional[torch.Generator] = None, inner: Optional[InnerRule] = None,
                 truncation: Optional[TruncationLaw] = None, k: Optional[int] = None,
                 q_rule: str = "ufom", q_min: Optional[float] = None,
                 q_beta: Optional[float] = None, track_buffers: bool = False,
                 process_group: Any = None, hvp: str = "auto"):
        settings = Settings(steps, inner_lr, inner, mode, q, k, truncation, q_rule, q_min, q_beta,
                            memory, slots, hvp)
        config = resolve(settings, model)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"Invalid optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        check_generator(generator)
        if not isinstance(track_buffers, bool):
            raise TypeError(f"Invalid track_buffers: {track_buffers!r} (expected True or False)")
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
        if missing:
            raise ValueError(
                f"Invalid optimizer: it does not hold the model parameters {missing}; pass all of "
                "model.parameters() to it (or set requires_grad=False on frozen ones)")
        self.process_group, self.distributed = process_group, process_group is not None
        if self.distributed:
            distributed.check_group(None if process_group is True else process_group)
            if process_group is True:
                self.process_group = None  # the default group
            generator = distributed.rank_generator(generator, self.process_group)
        self.model, self.optimizer, self.generator = model, optimizer, generator
        self._config = config
        self.q_stats = None if config.adaptive is None else adaptive.init_stats(config.adaptive)
        self.track_buffers = track_buffers
        self._buffers: List[List[Tensor]] = []  # final buffers of the tasks since the last step
        self._observations: List[Dict[str, float]] = []  # q="auto" observations since the last step
        self._tasks = 0  # tasks since the last step
        self._warned_per_task = False  # backward_batch fell back to the per-task loop

    # -- the resolved configuration: read-only; reconfigure() changes it --------------------
    config = property(lambda self: self._config,
                      doc="The resolved :class:`~torch_ufom.config.Config` (read-only).")
    steps = property(lambda self: self._config.steps, doc="The number of inner steps (read-only).")
    mode = property(lambda self: self._config.mode,
                    doc="The mode (``'law'`` for an explicit ``truncation=``; read-only).")
    memory = property(lambda self: self._config.memory, doc="The memory setting (read-only).")
    slots = property(lambda self: self._config.slots, doc="Checkpoint slots (read-only).")
    hvp = property(lambda self: self._config.hvp, doc="The requested HVP (read-only).")
    inner = property(lambda self: self._config.rule, doc="The inner rule (read-only).")
    adaptive = property(lambda self: self._config.adaptive,
                        doc="The adaptive rule of ``q='auto'``, else ``None`` (read-only).")

    @property
    def law(self) -> TruncationLaw:
        """The truncation law of the next task (under ``q="auto"``, ``Bernoulli`` of the current ``q``)."""
        if self.q_stats is not None:
            return Bernoulli(self.q_stats["q"])
        return self._config.law

    @property
    def q(self) -> Optional[float]:
        """The exact-branch probability of the next task (``ufom``), else ``None``."""
        law = self.law
        return law.q if isinstance(law, Bernoulli) else None

    def reconfigure(self, **changes) -> None:
        """Change the configuration between outer steps, keeping every other state.

        Takes the constructor's configuration keywords (``mode``, ``q``, ``k``,
        ``truncation``, ``steps``, ``inner_lr``, ``inner``, ``memory``,
        ``slots``, ``hvp``, ``q_rule``, ``q_min``, ``q_beta``) and resolves the
        result exactly as the constructor would; the outer optimizer's state,
        the generator, pending gradients and ``track_buffers`` are kept. A new
        ``mode`` drops an earlier ``truncation=`` (and ``k`` unless
        ``"truncated"``), a new ``truncation=`` drops ``mode``. The ``q="auto"``
        statistics are kept while the adaptive rule stays the same. For
        curricula such as MAML++'s derivative-order annealing
        (``meta.reconfigure(mode="exact")`` after some outer steps) or a ``q``
        schedule (``meta.reconfigure(q=0.2)``).

        Raises:
            TypeError, ValueError: as the constructor; nothing is changed.
        """
        config = resolve(self._config.settings.replace(**changes), self.model)
        old = self._config.adaptive
        keep = (config.adaptive is not None and old is not None and
                vars(config.adaptive) == vars(old))
        self._config = config
        if not keep:
            self.q_stats = None if config.adaptive is None else adaptive.init_stats(config.adaptive)
            self._observations = []

    def __setattr__(self, name, value):
        if isinstance(getattr(type(self), name, None), property):
            raise AttributeError(f"MetaOptimizer.{name} is read-only: the configuration is resolved "
                                 f"once; use meta.reconfigure({name}=...) between outer steps")
        super().__setattr__(name, value)

    @contextlib.contextmanager
    def _named_errors(self, meta: List[Tensor]):
        """Name a meta-parameter with a non-finite hypergradient as the optimizer holds it."""
        try:
            yield
        except NonFiniteHypergradient as err:
            raise NonFiniteHypergradient(err.index, f"meta-parameter {self._name(meta[err.index])}") \
                from None

    def _problem(self, inner_loss: Callable, outer_loss: Callable) -> Problem:
        """This call's :class:`~torch_ufom.functional.Problem`."""
        check_losses(inner_loss, outer_loss)
        meta = tuple(self.meta_parameters())
        c = self._config
        hvp = resolve_hvp(c.hvp, self.model, c.rule, meta)
        return Problem(self.model, inner_loss, outer_loss, c, self.law, meta, hvp, self.generator)

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        """The outer optimizer's parameter groups."""
        return self.optimizer.param_groups

    def meta_parameters(self) -> List[Tensor]:
        """Every tensor the outer optimizer holds, in its order."""
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the meta-parameters' gradients (see ``Optimizer.zero_grad``)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def backward(self, inner_loss: Callable, outer_loss: Callable, support: Any, query: Any,
                 *, force_truncation: Optional[int] = None) -> MetaResult:
        """Run one task and accumulate its hypergradient estimate into ``.grad``.

        Args:
            inner_loss, outer_loss: ``(fmodel, batch) -> scalar tensor``;
                ``fmodel`` is called like the module but runs at the current
                inner parameters.
            support: one batch reused at every step, a ``list`` of ``steps``
                batches, or a callable ``j -> batch`` (``j = 0..steps-1``).
            query: the outer loss's batch.
            force_truncation: use this truncation point ``K`` instead of drawing it
                (for tests and diagnostics; the weights stay those of the law).

        Returns:
            A :class:`MetaResult`. Nothing is written if an error is raised.
        """
        problem = self._problem(inner_loss, outer_loss)
        meta = list(problem.params)
        start = time.perf_counter()
        with self._named_errors(meta):
            est: Estimate = estimate_task(problem, support, query, force_truncation,
                                          diagnostics=self.q_stats is not None)
        seconds = time.perf_counter() - start
        self._write(meta, est.grads)
        q = self.q
        if self.track_buffers:
            self._buffers.append(list(est.buffers))
        self._observe(est, seconds)
        self._tasks += 1
        return MetaResult(est.outer_loss, est.inner_losses, est.truncation, est.weights, q,
                          est.forward_steps, est.reverse_steps)

    def backward_batch(self, inner_loss: Callable, outer_loss: Callable, supports: Any, queries: Any,
                       *, force_truncation=None) -> List[MetaResult]:
        """Run a meta-batch of tasks at once and accumulate the sum of their estimates.

        The vectorised twin of calling :meth:`backward` once per task: the
        result (and every draw) is the same, but the tasks run through
        ``torch.func.vmap``, one vectorised sweep per drawn truncation point,
        so tasks that drew ``K = 0`` skip the exact sweep of the others. A
        model ``vmap`` cannot run (one with buffers, such as BatchNorm's
        running statistics, or operations ``vmap`` rejects) and ``q="auto"``
        (which keeps per-task statistics) use the per-task loop instead, with a
        warning the first time.

        Args:
            inner_loss, outer_loss: as for :meth:`backward`; they see one task's batch.
            supports, queries: a tensor, a tuple/list or a dict of tensors whose
                first dimension indexes the tasks (one support batch per task,
                reused at every inner step).
            force_truncation: ``None`` (draw), one ``K`` for every task, or a
                sequence with one ``K`` per task.

        Returns:
            One :class:`MetaResult` per task. In a vectorised run the step
            counts are those of the task's group (one vectorised step counts once).

        Raises:
            ValueError: tensors whose leading sizes differ (the message names
                the entry), or another invalid argument; nothing is written.
        """
        problem = self._problem(inner_loss, outer_loss)
        meta = list(problem.params)
        with self._named_errors(meta):
            run = estimate_batch(problem, supports, queries, force_truncation,
                                 diagnostics=self.q_stats is not None)
        if not run.vectorised and not self._warned_per_task:
            warnings.warn(f"MetaOptimizer.backward_batch runs the per-task loop: {run.reason}",
                          stacklevel=2)
            self._warned_per_task = True
        self._write(meta, sum_grads(run, len(meta)))
        q = self.q
        results: List[Optional[MetaResult]] = [None] * len(run.truncations)
        for index, est, seconds in run.groups:
            for col, i in enumerate(index):
                batched = run.vectorised
                results[i] = MetaResult(
                    est.outer_loss[col] if batched else est.outer_loss,
                    est.inner_losses[:, col] if batched else est.inner_losses,
                    est.truncation, est.weights, q, est.forward_steps, est.reverse_steps)
            if self.track_buffers and not run.vectorised:
                self._buffers.append(list(est.buffers))
            self._observe(est, seconds)
        self._tasks += len(run.truncations)
        return results

    def _observe(self, est: Estimate, seconds: float) -> None:
        """With ``q="auto"``, keep a task's observation for :meth:`step`."""
        if self.q_stats is not None:
            self._observations.append(adaptive.observe(
                exact=est.truncation == self.steps, seconds=seconds, steps=self.steps,
                forward_steps=est.forward_steps, reverse_steps=est.reverse_steps,
                g0=est.g0, gr=est.gk, q=self.q))

    def _write(self, meta: List[Tensor], grads) -> None:
        """Accumulate ``grads`` into the meta-parameters' ``.grad``, all or nothing."""
        present = [(p, g) for p, g in zip(meta, grads) if g is not None]
        if present and not bool(torch.stack([torch.isfinite(g).all() for _, g in present]).all()):
            p = next(p for p, g in present if not bool(torch.isfinite(g).all()))
            raise FloatingPointError(
                f"non-finite hypergradient for meta-parameter {self._name(p)}; nothing was written")
        for p, g in present:
            g = g.detach().to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.add_(g)

    def _name(self, p: Tensor) -> str:
        for n, t in self.model.named_parameters():
            if t is p:
                return repr(n)
        for gi, group in enumerate(self.optimizer.param_groups):
            for i, t in enumerate(group["params"]):
                if t is p:
                    return f"param_groups[{gi}]['params'][{i}] (shape {tuple(p.shape)})"
        return f"of shape {tuple(p.shape)}"

    def step(self, closure: Optional[Callable[[], Any]] = None):
        """Step the outer optimizer; returns what ``optimizer.step(closure)`` returns.

        With a ``process_group``, first averages the meta-gradients over all
        ranks' tasks (:meth:`synchronize`). Then, with ``q="auto"``, updates
        ``q`` from the tasks since the last step, and with ``track_buffers``
        writes the tasks' final buffers into the module.
        """
        if self.distributed:
            self.synchronize()
        result = self.optimizer.step(closure)
        self._tasks = 0
        if self.q_stats is not None:
            observations = self._observations
            if self.distributed:
                observations = [o for rank in distributed.gather(observations, self.process_group)
                                for o in rank]
            for obs in observations:
                self.q_stats = adaptive.update(self._config.adaptive, self.q_stats, obs)
            self._observations = []
        if self._buffers:
            with torch.no_grad():
                for i, (_, buf) in enumerate(self.model.named_buffers()):
                    values = [task[i] for task in self._buffers]
                    if buf.is_floating_point():
                        buf.copy_(torch.stack(values).mean(0))
                    else:
                        buf.copy_(values[-1])
            self._buffers = []
        return result

    def synchronize(self) -> int:
        """All-reduce the meta-gradients over the process group and divide by the
        global number of tasks since the last step; returns that number.

        Called by :meth:`step`; call it yourself to inspect the averaged
        gradients (then call it only once per outer step).
        """
        if not self.distributed:
            raise ValueError("Invalid call: synchronize needs a process_group")
        return distributed.average_gradients(self.meta_parameters(), self._tasks, self.process_group)

    def state_dict(self) -> Dict[str, Any]:
        """The outer optimizer's state and the generator's state."""
        return {"optimizer": self.optimizer.state_dict(),
                "generator": None if self.generator is None else self.generator.get_state(),
                "q_stats": None if self.adaptive is None else dict(self.q_stats),
                "q_observations": [dict(o) for o in self._observations]}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.optimizer.load_state_dict(state_dict["optimizer"])
        if state_dict.get("generator") is not None:
            if self.generator is None:
                raise ValueError("Invalid state_dict: it holds a generator state but this "
                                 "MetaOptimizer has no generator")
            self.generator.set_state(state_dict["generator"])
        if state_dict.get("q_stats") is not None:
            if self.adaptive is None:
                raise ValueError("Invalid state_dict: it holds q='auto' statistics but this "
                                 "MetaOptimizer has a fixed q")
            self.q_stats = dict(state_dict["q_stats"])
            self._observations = [dict(o) for o in state_dict.get("q_observations", [])]

    def __repr__(self) -> str:
        return (f"MetaOptimizer(mode={self.mode!r}, steps={self.steps}, law={self.law!r}, "
                f"memory={self.memory!r}, inner={self.inner!r}, optimizer={type(self.optimizer).__name__})")
