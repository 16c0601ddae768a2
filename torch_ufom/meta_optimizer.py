"""``MetaOptimizer``: a ``torch.optim``-style shell around the estimators.

:class:`MetaOptimizer` resolves its configuration once (``config.resolve``) and
keeps a cache of what it derives from the module (names, the swap plan, the
vectorisation decisions), checked cheaply at each call. ``backward`` and
``backward_batch`` run the engine (``functional.estimate_task`` /
``estimate_batch``) and add each task's estimate to ``.grad`` (as
:mod:`torch_ufom.grads` writes it), keeping a tally
of the tasks since ``zero_grad`` (their count, observations for an adaptive
``q``, buffers to average) that a refused call leaves as it was; ``step`` runs
the outer optimizer (with a closure, as ``torch.optim``'s ``step(closure)``)
after a process group's all-reduce, and the per-step bookkeeping (``q``'s
statistics, the tasks' buffers with ``track_buffers``). ``state_dict`` /
``load_state_dict`` carry the outer optimizer's state, the generator's, the
adaptive ``q``'s statistics, the tally and the settings it was saved with; the
format and its validation are in :mod:`torch_ufom.state_dicts`.
"""
from __future__ import annotations

import contextlib
import numbers
import time
import warnings
import weakref
import zlib
from collections.abc import Mapping
import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import adaptive, distributed
from .adapt import adapt
from .checks import invalid
from .config import (Config, InnerLR, InnerParams, Settings, Vectorise, check_generator, check_losses,
                     check_values, resolve, validate_rule)
from .estimators import NonFiniteHypergradient
from .functional import (BatchRun, bind_problem, buffer_names, estimate_batch, estimate_task,
                         learned_buffer_message, sum_grads, task_aux)
from .functional_model import FunctionalModel
from .grads import (accumulate_grads, any_nonzero, any_nonzero_each, grad_copies, grad_version, put_back,
                    refuse_inference_grads, replaced, takes_in_place)
from .graphs import root_of
from .inner import InnerRule, PerStep
from .process import caller_level, one_call_at_a_time
from .protocols import Problem
from .randomness import restore_rng_on_error
from .state_dicts import (canonical, check_meta_values, check_state_dict, plain, saved_law_differs,
                          settings_differ, settings_summary)
from .truncation import TruncationLaw, is_bernoulli
from .vectorised import EmptyMetaBatch

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
        reverse_steps: inner steps run with a graph for the exact sweep (recorded in the
            forward pass under ``memory="store"``, and under ``"checkpoint"`` when the
            sweep's graphs fit its budget or its slots; rebuilt otherwise).
        aux: what ``outer_loss`` returned beside the loss when it returns
            ``(loss, aux)`` (accuracy, logits, ...), from the forward pass,
            with every tensor detached; ``None`` for a plain loss. Replays and
            rebuilds call the losses again but never change it. The inner
            loss may return ``(loss, aux)`` too; its aux is not kept.
        batch_path: how :meth:`MetaOptimizer.backward_batch` ran the task:
            ``"vectorised"`` (``"vectorised: <how>"`` when it says how) or
            ``"per-task loop: <why>"``; ``None`` from :meth:`MetaOptimizer.backward`.
    """

    outer_loss: Tensor
    inner_losses: Tensor
    truncation: int
    weights: List[float]
    q: Optional[float]
    forward_steps: int
    reverse_steps: int
    aux: Any = None
    batch_path: Optional[str] = None

    def __repr__(self) -> str:
        # The weights summarised past eight (review s35J F3: 1,001 of them at steps=1000 made a
        # logged result 28 KB); the rest as the dataclass shows them.
        def shown(name, value):
            if name == "weights" and len(value) > 8:
                return f"[{', '.join(map(repr, value[:4]))}, ..., {value[-1]!r}] ({len(value)} weights)"
            return repr(value)
        parts = (f"{f.name}={shown(f.name, getattr(self, f.name))}" for f in fields(self))
        return f"MetaResult({', '.join(parts)})"


# The tally of the tasks since the last step that a refused call puts back (MetaOptimizer._tally):
# their count, whether synchronize() reduced them, their buffers and q="auto" observations, whether
# .grad holds them, what a reduction carried, the .grad versions the last write left, and whether a
# count load_state_dict restored came with zero gradients. One list for every save and restore
# (review s39H CQ-5: three lists, already different).
_TALLY = ("_tasks", "_reduced", "_buffers", "_observations", "_holding", "_carried", "_written",
          "_zero_saved")


class MetaOptimizer:
    """Drop-in outer optimizer for bi-level problems (MAML, learned inner rates, ...).

    Wraps the user's outer optimizer. :meth:`backward` runs one task's inner
    loop from the module's parameters and accumulates the hypergradient
    estimate into the ``.grad`` of every tensor the outer optimizer holds;
    :meth:`step` steps the outer optimizer. It is no ``torch.optim.Optimizer``
    itself: learning-rate schedulers, ``state``, ``defaults`` and the optimizer
    hooks are the outer optimizer's (``meta.optimizer``); ``param_groups``,
    ``zero_grad``, ``state_dict`` and ``load_state_dict`` are here as well.

    Args:
        model: any ``nn.Module``; its parameters with ``requires_grad`` are the
            inner loop's starting point and must all be held by ``optimizer``.
        optimizer: the outer ``torch.optim.Optimizer``. Every tensor it holds is
            a meta-parameter (e.g. ``inner_lr`` as a tensor, a loss weight); a
            tensor it holds twice counts once and gets its gradient once.
        inner_lr: the inner SGD learning rate: a float, a scalar tensor or a
            dict from parameter name to tensor (per-parameter rates; a tensor has
            its parameters' dtype and device), or a :class:`~torch_ufom.inner.PerStep`.
        steps: number of inner steps ``r >= 1`` (required).
        mode: ``"fom"``, ``"ufom"`` (the default: unbiased, exact branch with
            probability ``q``), ``"exact"`` or ``"truncated"`` (exact through
            the last ``k`` steps only: biased). Not together with ``truncation``;
            ``None`` (the default) is ``"ufom"``, or the law ``truncation`` gives.
        q: exact-branch probability for ``"ufom"``, in ``(0, 1]`` (default 0.1), or ``"auto"``
            to adapt it to the measured bias, variance and costs
            (:mod:`torch_ufom.adaptive`; ``"auto"`` is an error with another
            mode). Checked but unused by the other modes, so that flipping
            ``mode`` stays a one-word change.
        q_rule, q_min, q_beta: with ``q="auto"``: the rule (``"ufom"`` or the
            authors' ``"authors"``), the smallest ``q`` and the averaging factor
            (checked, unused with a fixed ``q``).
        k: the truncation point of ``mode="truncated"`` (an error with other modes).
        track_buffers: if ``True``, :meth:`step` writes each task's final
            buffers (BatchNorm running statistics as the task's last forward left
            them: its inner steps', then its outer loss's at the adapted parameters,
            as a hand-written loop in ``train()`` mode has them) into the module: the mean
            over the tasks since the last step for floating-point buffers, the
            last task's for integer ones (``num_batches_tracked``; with a
            ``process_group``, all ranks' tasks, and the largest). Default
            ``False``: the module's buffers are never changed, and every task
            starts from them. :meth:`backward` never writes buffers.
        memory: ``"checkpoint"`` (default: within the byte budget
            ``max_memory``, every step's graph when they fit, else binomial
            checkpointing with as many stored states as fit, about ``K log K``
            replayed steps; memory constant in ``steps``), ``"recompute"``
            (one stored state, ``K (K - 1) / 2`` replayed steps) or ``"store"``
            (every step's graph: ``O(steps)`` memory, no replay).
        slots: ``None`` (default: sized by ``max_memory``) or a fixed number of
            stored states for ``memory="checkpoint"`` (a sweep of at most
            ``slots`` steps then keeps every graph). Not with ``max_memory``.
            Accepted and unused under the other ``memory`` settings, as is ``max_memory``.
        max_memory: the byte budget of ``memory="checkpoint"`` with
            ``slots=None``: an int, or ``None`` (default) for
            ``128 (G + N + |s|) + W``, where each sweep's first step measures
            ``G`` (the bytes its graph keeps), ``N`` (1 KB per node of it, on a
            CPU) and ``|s|`` (one inner state), and ``W = 3.5 G + 2 N + 16 |s| + 4.5 H``
            (``H``: under ``hvp="fwdrev"`` with a ``max_memory`` given, the bytes of the
            step's gradient graph, measured by evaluating it once more):
            every graph is kept up to 128 steps (unmeasured), longer sweeps checkpoint with
            ``128 (G + N + |s|) / (1.35 |s|)``
            slots (see ``docs/maths.md#costs-and-memory-of-each-schedule``).
        generator: optional ``torch.Generator`` making the draws reproducible
            (under ``q="auto"`` with ``q_rule="ufom"``, ``q`` itself follows
            measured times, so the draws are reproducible only with
            ``q_rule="authors"`` or a fixed ``q``).
        inner: an inner rule from :mod:`torch_ufom.inner` instead of ``inner_lr``.
        truncation: a law from :mod:`torch_ufom.truncation`, instead of ``mode``.
        process_group: data parallelism over ``torch.distributed`` (``None``:
            off; ``True``, ``torch.distributed.group.WORLD`` or any process
            group: on). Each rank runs its own tasks; :meth:`step` first sums
            the meta-gradients over all ranks (then applies ``reduction``
            over the global number of tasks). Each rank
            draws from its own generator, seeded from one seed (``generator``'s,
            or rank 0's global seed) and its rank, also after loading a
            ``state_dict`` another rank saved; ``q="auto"`` statistics stay
            identical on every rank. Build the optimizer alike on every rank of
            the group: the constructor is itself a collective (it broadcasts rank
            0's seed with ``generator=None``, and refuses on every rank a
            ``generator`` some ranks pass and others do not), and each reduction
            first checks that the ranks agree on the meta-parameters' shapes,
            dtypes and values, ``reduction``, the estimator (``steps`` and the
            truncation law's probabilities), ``q="auto"``, ``track_buffers`` and
            the gradients carried from the last reduction, raising the same
            ``ValueError`` on every rank (nothing changed) where they do not.
            What ``.grad`` holds when the first gradient since the last
            reduction arrives (a pre-hook on each meta-parameter's gradient
            accumulator sees a ``backward()``) is carried, not summed.
        hvp: Hessian-vector products of the exact sweep: ``"auto"`` (default:
            reverse-over-reverse, the faster on every model measured, except where
            a meta-batch needs forward-over-reverse to stay exact), ``"fwdrev"`` (forward-over-reverse,
            ``torch.func.jvp`` of the inner gradient) or ``"revrev"``
            (reverse-over-reverse); see :func:`torch_ufom.functional.resolve_hvp`.
            A vectorised meta-batch of normalisation layers runs forward-over-reverse
            whatever this says (``vmap`` differentiates them twice wrongly; checked
            against the first task, ``MetaResult.batch_path`` says so);
            ``vectorise=False`` keeps reverse-over-reverse.
        reduction: how an outer step combines its tasks' estimates:
            ``"sum"`` (default: :meth:`backward` accumulates like
            ``loss.backward()``, and with a ``process_group`` the sums of every
            rank add up) or ``"mean"`` (:meth:`step` divides by the number of
            tasks since the last step, over all ranks with a ``process_group``),
            as most MAML programs average their meta-batch.
        inner_params: the parameters the inner loop adapts: names, a predicate
            on the name, or the parameters themselves (default: every parameter
            with ``requires_grad``). The others keep their module values during
            the inner loop; those the outer optimizer holds get their full
            hypergradient, through every inner step and the outer loss (ANIL's
            body, BatchNorm's affine parameters in pytorch-maml). Under
            ``fom`` (and on the first-order part of any estimate) the inner
            gradient is held constant, so they get the outer loss's direct
            gradient at the adapted parameters only. Per-parameter
            hyperparameter dicts name the adapted parameters only.
        vectorise: how :meth:`backward_batch` runs a meta-batch: ``"auto"``
            (default: ``torch.func.vmap``, except on a CPU for tasks with
            65,536 adapted parameters or more, or whose inner loss runs a
            convolution or ``batch_norm`` with that many output elements,
            where the per-task loop is faster, and there for groups of tasks
            that drew the same ``K`` too small to pay: every group when none
            reaches ``torch_ufom.vectorised.FEWEST_TASKS_ON_CPU``, else those
            below ``FEWEST_TASKS_BESIDE_ON_CPU``), ``True`` (``vmap`` wherever
            it is exact) or ``False`` (always the per-task loop).

    The configuration is resolved once (:mod:`torch_ufom.config`); ``steps``,
    ``mode``, ``q``, ``law``, ``memory``, ``slots``, ``max_memory``, ``hvp``,
    ``vectorise`` and ``inner`` are read-only properties, and :meth:`reconfigure`
    changes them between outer steps.

    Example:
        >>> meta = MetaOptimizer(model, torch.optim.Adam(model.parameters()),
        ...                      inner_lr=0.01, steps=20, mode="ufom", q=0.1)
        >>> meta.zero_grad()
        >>> for support, query in tasks:
        ...     result = meta.backward(inner_loss, outer_loss, support, query)
        >>> meta.step()
    """

    @one_call_at_a_time  # (it reads the module's entries, which another thread's call swaps)
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, inner_lr: InnerLR = None, *,
                 steps: int, mode: Optional[str] = None, q: Union[float, str] = 0.1,
                 memory: str = "checkpoint",
                 slots: Optional[int] = None, max_memory: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, inner: Optional[InnerRule] = None,
                 truncation: Optional[TruncationLaw] = None, k: Optional[int] = None,
                 q_rule: str = "ufom", q_min: Optional[float] = None,
                 q_beta: Optional[float] = None, track_buffers: bool = False,
                 process_group: Any = None, hvp: str = "auto", inner_params: InnerParams = None,
                 reduction: str = "sum", vectorise: Vectorise = "auto"):
        settings = Settings(steps, inner_lr, inner, mode, q, k, truncation, q_rule, q_min, q_beta,
                            memory, slots, hvp, inner_params, vectorise=vectorise,
                            max_memory=max_memory)
        config = resolve(settings, model)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"Invalid optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        check_generator(generator)
        if not isinstance(track_buffers, bool):
            raise TypeError(f"Invalid track_buffers: {track_buffers!r} (expected True or False)")
        if not isinstance(reduction, str) or reduction not in ("sum", "mean"):
            raise invalid("reduction", reduction, "one of sum, mean", isinstance(reduction, str))
        _check_holds(optimizer, model)
        _warn_unheld(optimizer, config.rule)
        self.process_group, self.distributed = process_group, process_group is not None
        self.model, self.optimizer = model, optimizer
        if self.distributed:
            distributed.check_group(None if process_group is True else process_group)
            if process_group is True:
                self.process_group = None  # the default group
            # Before the collective below: raised as an error (warnings.simplefilter("error")) on one
            # rank, a rebuild would run it again, out of step with the others (review s37DW F1).
            held = [self._name(p) for p in self.meta_parameters() if p.grad is not None]
            if held:
                warnings.warn(
                    f"process_group: .grad already holds gradients ({', '.join(held[:3])}"
                    f"{' and others' if len(held) > 3 else ''}), which the first step sums over the "
                    "ranks like new ones (a MetaOptimizer rebuilt on the reduced gradients of another "
                    "sums them again): call zero_grad() first unless each rank wrote its own",
                    stacklevel=caller_level())
            generator = distributed.rank_generator(generator, self.process_group,
                                                   next(model.parameters()).device)
        self.generator = generator
        self._adopt(config)
        self._hyper_versions = tuple((id(t), t._version) for t in config.rule.tensors())  # checked
        self.q_stats = None if config.adaptive is None else adaptive.init_stats(config.adaptive)
        self._track_buffers, self._reduction = track_buffers, reduction
        self._buffers: List[List[Tensor]] = []  # final buffers of the tasks since the last step
        self._observations: List[Dict[str, float]] = []  # q="auto" observations since the last step
        self._tasks = 0  # tasks whose estimates .grad holds, not yet reduced
        self._reduced = False  # synchronize() ran since the last step or zero_grad
        self._stepping = False  # step() is stepping the outer optimizer (its hook stays quiet)
        self._reduced_total = 0  # the number of tasks it reduced
        self._holding = False  # the tasks since then wrote some .grad
        # What .grad held before the first of those tasks wrote (a previous step's gradients,
        # not cleared): the reduction leaves it as it is (:meth:`_carry`).
        self._carried: Optional[List[Tuple[Tensor, Tensor]]] = None
        # The .grad tensors as the last write left them (weak reference, version): a later
        # change by other code shows (:meth:`_check_cleared`).
        self._written: Optional[List[Tuple[Tensor, Any, int, bool]]] = None
        # a loaded dict's tasks left .grad all zero (state_dict's "grad_zero"): zeros at the next
        # task are theirs, not a clear (review s32M F3)
        self._zero_saved = False
        # With a process_group: what .grad carries into the next reduction, neither summed nor
        # divided (the same on every rank): copies of what it held when the first gradient
        # since the last reduction arrived (:meth:`_take_kept`); None until then (all of it),
        # [] after zero_grad() and at first (nothing).
        self._kept: Optional[List[Tuple[Tensor, Tensor]]] = []
        self._kept_params: Dict[int, Tensor] = {}  # its parameters by id (:meth:`_set_kept`)
        # Pre-hooks on the meta-parameters' gradient accumulators (autograd's AccumulateGrad
        # nodes, held so that autograd keeps using them), by id: (parameter, node, handle); the
        # post-accumulate hooks on the parameters, by id; every handle, removed when this
        # optimizer is freed; each .grad as the last write known to it left it (weak reference,
        # version: an accumulation, a task, the copy), by id; the meta-parameters whose
        # carried gradient was changed by hand since the copy (not zeroed: refused at the reduction).
        self._accumulators: Dict[int, Tuple[Tensor, Any, Any]] = {}
        self._posts: Dict[int, Any] = {}
        self._handles: List[Any] = []
        self._seen: Dict[int, Tuple[Any, int]] = {}
        self._by_hand: List[str] = []
        self._warned_per_task: set = set()  # why backward_batch fell back to the per-task loop
        self._values_checked = None  # the signature at which check_values last passed
        self._warned_edited = False  # whether gradients changed before the mean was taken were named
        self._warned_fom_gaps: set = set()  # meta-parameters fom left without a hypergradient, named
        self._slow_ops = None  # what the probe found for the last pair of losses (SlowOps)
        self._hook_outer_step()
        if self.distributed:
            self._watch_accumulation(self.meta_parameters())

    # -- the resolved configuration: read-only; reconfigure() changes it --------------------
    config = property(lambda self: self._config,
                      doc="The resolved :class:`~torch_ufom.config.Config` (read-only).")
    steps = property(lambda self: self._config.steps, doc="The number of inner steps (read-only).")
    mode = property(lambda self: self._config.mode,
                    doc="The mode (``'law'`` for an explicit ``truncation=``; read-only).")
    memory = property(lambda self: self._config.memory, doc="The memory setting (read-only).")
    slots = property(lambda self: self._config.slots,
                     doc="Checkpoint slots (``None``: sized by ``max_memory``; read-only).")
    max_memory = property(lambda self: self._config.max_memory,
                          doc="The checkpoint byte budget (``None``: the default formula; read-only).")
    hvp = property(lambda self: self._config.hvp, doc="The requested HVP (read-only).")
    vectorise = property(lambda self: self._config.vectorise,
                         doc="How backward_batch runs: ``'auto'``, ``True`` or ``False`` (read-only).")
    inner = property(lambda self: self._config.rule, doc="The inner rule (read-only).")
    adaptive = property(lambda self: self._config.adaptive,
                        doc="The adaptive rule of ``q='auto'``, else ``None`` (read-only).")
    reduction = property(lambda self: self._reduction,
                         doc="How a step combines its tasks: ``'sum'`` or ``'mean'`` (read-only).")
    track_buffers = property(lambda self: self._track_buffers,
                             doc="Whether :meth:`step` writes the tasks' buffers back (read-only).")

    @property
    def law(self) -> TruncationLaw:
        """The truncation law of the next task (under ``q="auto"``, ``Bernoulli`` of the current ``q``)."""
        return self._config.law_at(self.q_stats)

    @property
    def q(self) -> Optional[float]:
        """The exact-branch probability of the next task (``ufom``), else ``None``."""
        law = self.law
        return law.q if is_bernoulli(law) else None

    def __getstate__(self):
        self._notice_clears()  # (review s35U F3: a copy kept the cleared tasks)
        # What the last meta-batch's probe found holds weak references to its losses, which
        # neither pickle nor deepcopy takes: a copy looks again at its first meta-batch.
        state = self.__dict__.copy()
        state["_slow_ops"] = None
        # The last task's .grad, by weak reference (reduction="mean" checks whether it was cleared):
        # __setstate__ records the copy's own from the pending gradients below.
        # With a process_group, what .grad carried from the last reduction (_kept) goes along: its index
        # by parameter id and the writes seen are rebuilt for the copy's parameters (review s35S F1: a
        # copy summed and divided the carried gradient again, 28 % off).
        state["_written"], state["_kept_params"], state["_accumulators"] = None, {}, {}
        state["_posts"], state["_handles"], state["_seen"], state["_by_hand"] = {}, [], {}, []
        # The pending tasks' gradients: a parameter's copy or pickle drops its .grad (torch's), a plain
        # tensor's deepcopy keeps it, and the task count would then divide what is left (review s35J F1).
        state["_pending_grads"] = [(p, p.grad) for p in self.meta_parameters() if p.grad is not None] \
            if self._tasks or self._reduced else []
        return state

    def __setstate__(self, state):
        state.setdefault("_zero_saved", False)  # (pickled before it existed)
        pending = state.pop("_pending_grads", [])
        self.__dict__.update(state)
        for p, grad in pending:
            if p.grad is None:
                p.grad = grad
        if pending:
            self._record([p for p, _ in pending])
        self._hook_outer_step()
        if self.distributed:  # a copy watches its own parameters' accumulators
            self._set_kept(self._kept)
            for p in self.meta_parameters():
                self._note(p)
            self._watch_accumulation(self.meta_parameters())

    @one_call_at_a_time
    def reconfigure(self, **changes) -> None:
        """Change the configuration between outer steps, keeping every other state.

        Takes the constructor's configuration keywords (``mode``, ``q``, ``k``,
        ``truncation``, ``steps``, ``inner_lr``, ``inner``, ``inner_params``, ``memory``,
        ``slots``, ``max_memory``, ``hvp``, ``vectorise``, ``q_rule``, ``q_min``, ``q_beta``)
        and resolves the result exactly as the constructor would; the outer
        optimizer's state, the generator, pending gradients and
        ``track_buffers`` are kept. A new ``mode`` drops an earlier
        ``truncation=`` (and ``k`` unless ``"truncated"``), a new
        ``truncation=`` drops ``mode``; a new ``slots`` drops ``max_memory``
        and a new ``max_memory`` drops ``slots``; a new ``inner_lr`` drops
        ``inner`` and a new ``inner`` drops ``inner_lr``. The ``q="auto"``
        statistics are kept while ``q_rule`` and ``q_beta`` stay the same (a new
        ``q_min`` chooses ``q`` again from them) and start afresh otherwise. For
        curricula such as MAML++'s derivative-order annealing
        (``meta.reconfigure(mode="exact")`` after some outer steps) or a ``q``
        schedule (``meta.reconfigure(q=0.2)``).

        Raises:
            TypeError, ValueError: as the constructor; nothing is changed.
        """
        config = resolve(self._config.settings.replace(**changes), self.model)
        _check_holds(self.optimizer, self.model)
        if config.rule is not self._config.rule:
            _warn_unheld(self.optimizer, config.rule)
        old = self._config.adaptive
        keep = (config.adaptive is not None and old is not None and
                (config.adaptive.rule, config.adaptive.beta) == (old.rule, old.beta))
        stats, observations = self.q_stats, self._observations
        if not keep:
            stats = None if config.adaptive is None else adaptive.init_stats(config.adaptive)
            observations = []
        elif vars(config.adaptive) != vars(old):  # another q_min or q_init: q chosen again
            stats = adaptive.rebound(config.adaptive, stats)
        self._adopt(config)
        self.q_stats, self._observations = stats, observations
        self._slow_ops = None  # what the probe found and where vmap failed: look again
        self._warned_fom_gaps = set()

    def __setattr__(self, name, value):
        keywords = _SETTINGS_KEYWORDS
        if name in keywords or isinstance(getattr(type(self), name, None), property):
            keyword = "truncation" if name == "law" else name
            if keyword in keywords:
                hint = (f"the configuration is resolved once; use meta.reconfigure({keyword}=...) "
                        "between outer steps")
            elif name in ("config", "adaptive"):
                hint = "it follows the configuration, which meta.reconfigure(...) changes"
            elif name == "param_groups":
                hint = "they are the outer optimizer's (meta.optimizer.param_groups, add_param_group)"
            else:
                hint = "it is set when the MetaOptimizer is built"
            raise AttributeError(f"MetaOptimizer.{name} is read-only: {hint}")
        super().__setattr__(name, value)

    @contextlib.contextmanager
    def _named_errors(self, meta: List[Tensor]):
        """Name a meta-parameter with a non-finite hypergradient as the optimizer holds it."""
        try:
            yield
        except NonFiniteHypergradient as err:
            raise NonFiniteHypergradient(err.index, f"meta-parameter {self._name(meta[err.index])}") \
                from None
        except EmptyMetaBatch as err:
            if not self.distributed:
                raise
            raise EmptyMetaBatch(f"{err}; a rank without tasks under a process_group skips backward_batch "
                                 "and still calls step()") from None

    def _current_signature(self) -> tuple:
        """What the configuration depends on: each module parameter's name, identity,
        ``requires_grad``, dtype, device and shape, the tensors the outer optimizer holds,
        and whether a buffer is one of those or uninitialised (registered after the
        constructor, which refuses both: review s34B F1). A buffer replaced by another
        tensor (``self.count = self.count + 1`` in a forward) changes nothing here, so
        such a module is not resolved again at every call (review s34E L1)."""
        model = self.model
        params = tuple((n, id(p), p.requires_grad, p.dtype, p.device, p.shape)
                       for n, p in model.named_parameters())
        held = tuple(id(p) for g in self.optimizer.param_groups for p in g["params"])
        buffers = [b for _, b in model.named_buffers()]
        clash = False
        if buffers:
            ids = {entry[1] for entry in params}.union(held)
            clash = any(id(b) in ids or isinstance(b, nn.parameter.UninitializedTensorMixin) for b in buffers)
        return params, held, clash

    def _adopt(self, config: Config) -> None:
        """Take ``config``, just resolved: what it was resolved for (the module's parameters
        and the outer optimizer's tensors) and what it validated of the inner rule but the
        tensor values (:meth:`_check_hyper_values` compares them at each call)."""
        self._config, self._signature = config, self._current_signature()
        self._hyper_layout = config.rule.layout()

    def _problem(self, inner_loss: Callable, outer_loss: Callable) -> Problem:
        """This call's :class:`~torch_ufom.functional.Problem`.

        If the module's parameters (which there are, ``requires_grad``, dtype,
        device, shape) or the tensors the outer optimizer holds changed since the
        configuration was resolved, or a buffer is now one of them or uninitialised,
        it is resolved again from the same settings and checked as the constructor
        would (an error then changes nothing).
        """
        meta = tuple(self.meta_parameters())
        self._check_cleared(meta, task=True)
        if self._reduced:
            raise ValueError("Invalid call: a task after synchronize(): .grad already holds the "
                             "reduced gradients (synchronize() ran, or, under a process_group, a step() "
                             "whose outer optimizer raised after the all-reduce); call "
                             "step() or zero_grad() first (a clear through the "
                             "outer optimizer followed by a backward() of yours is not seen: use "
                             "meta.zero_grad())")
        check_losses(inner_loss, outer_loss, self.model)
        signature = self._current_signature()
        if signature != self._signature:
            config = resolve(self._config.settings, self.model)
            _check_holds(self.optimizer, self.model)
            self._adopt(config)
            meta = tuple(self.meta_parameters())
        if signature != self._values_checked:  # (a meta-device module: held, not computed with)
            check_values(self.model)
            self._values_checked = signature
        c = self._config
        self._check_hyper_values(c)
        return bind_problem(self.model, (inner_loss, outer_loss), c, self.law, meta, self.generator,
                            "the outer optimizer's tensors", keeps_aux=True)

    def _check_hyper_values(self, config: Config) -> None:
        """Check the inner rule's hyperparameters again where they changed since the last
        check: validate the rule again when anything but tensor values changed (review EW: a
        ``PerStep`` given fewer values than steps ran the missing steps at rate 0, a rate in
        the user's per-parameter dict set below 0 ran as given), and check the tensor values'
        range when they changed (an outer step moved a learned Adam ``betas`` to 1, an
        ``inner_lr`` below 0; past the bound a validate of the user's checks: review s36Q F3):
        the rule's formulas would run outside their range. One host synchronisation per change
        of tensor values, seen through autograd's version counter, which in-place operations
        bump and writes through ``.data`` do not."""
        rule = config.rule
        versions = tuple((id(t), t._version) for t in rule.tensors())
        layout = rule.layout()
        if versions == self._hyper_versions and layout == self._hyper_layout:
            return
        named = dict(self.model.named_parameters())
        try:
            validate_rule(rule, {n: named[n] for n in config.adapted}, config.steps)
        except (ValueError, TypeError) as err:
            why = ("the inner rule's hyperparameters changed since the MetaOptimizer checked them"
                   if layout != self._hyper_layout else "the values changed since they were checked: keep "
                   "a learned hyperparameter in its range, e.g. clamp it in place after the outer step")
            raise type(err)(f"{err} ({why}); nothing was changed") from None
        self._hyper_versions, self._hyper_layout = versions, layout

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        """The outer optimizer's parameter groups."""
        return self.optimizer.param_groups

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a parameter group to the outer optimizer (``torch.optim.Optimizer.add_param_group``):
        its tensors become meta-parameters from the next task on, and get their
        hypergradients as the tensors already held do."""
        self.optimizer.add_param_group(param_group)

    def meta_parameters(self) -> List[Tensor]:
        """Every tensor the outer optimizer holds, in its order, each once.

        A tensor listed twice in a parameter group (``torch.optim`` warns but
        allows it) is a meta-parameter once: it receives its hypergradient
        once, as ``loss.backward()`` would give it.
        """
        seen, out = set(), []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the meta-parameters' gradients, and forget the tasks they held: their
        count, which ``reduction="mean"`` divides by, their ``q="auto"`` observations
        and the final buffers ``track_buffers`` kept of them.

        Args:
            set_to_none: as ``torch.optim.Optimizer.zero_grad``: set ``.grad`` to
                ``None`` (default) instead of zeroing it. The outer optimizer's or the
                module's own ``zero_grad()``, with or without ``set_to_none``, is noticed
                at the next task too when it clears every meta-gradient and no
                ``backward()`` of yours has written them again since (after a clear to
                ``None`` that is told apart from code that replaced ``.grad`` keeping its
                values by no look: it warns and the tasks still count); one that clears only some
                (``module.zero_grad()`` beside a learned rate) warns, or goes
                unnoticed if it zeroes them in place: use this one.
        """
        # (review IA F6: "x" was taken as True; JA F6: what torch.optim takes, a number, None, a tensor)
        if isinstance(set_to_none, (str, bytes)) or not (
                set_to_none is None or isinstance(set_to_none, (numbers.Number, Tensor))
                or type(set_to_none).__name__ == "bool_"):
            raise TypeError(f"Invalid set_to_none: {set_to_none!r} (expected True or False)")
        if not set_to_none:  # (review s36X F1: zero_() of an inference tensor raised part-way)
            for p in (p for group in self.optimizer.param_groups for p in group["params"]):
                if p.grad is not None and p.grad.is_inference():
                    with torch.inference_mode(False):
                        p.grad = torch.zeros_like(p.grad)
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._forget_tasks()
        self._set_kept([])
        self._by_hand = []
        if self.distributed:
            self._watch_accumulation(self.meta_parameters())

    def _forget_tasks(self) -> None:
        """Forget the tasks since the last step: their count, their ``q="auto"``
        observations and the buffers ``track_buffers`` kept of them."""
        self._set_tally((0, False, [], [], False, None, None, False))

    def _tally(self) -> tuple:
        """The tally of the tasks since the last step (:data:`_TALLY`'s fields), for
        :meth:`_set_tally` to put back after a refused call."""
        return tuple(getattr(self, n) for n in _TALLY)

    def _set_tally(self, values: tuple) -> None:
        """Set :data:`_TALLY`'s fields to ``values``."""
        for n, v in zip(_TALLY, values, strict=True):
            setattr(self, n, v)

    @contextlib.contextmanager
    def _task_state_kept(self):
        """Put back the count of tasks and what goes with it if the body raises: a task's
        :meth:`_check_cleared` may forget the earlier tasks before the task fails, and a
        refused call changes nothing (the clear it saw is seen again at the next one)."""
        saved = self._tally()
        try:
            # (the generators too: a warning raised as an error after the draw, under
            # warnings.simplefilter("error"), would leave them advanced: review s37B F1)
            with restore_rng_on_error(self.generator):
                yield
        except BaseException:
            self._set_tally(saved)
            raise

    def _check_cleared(self, meta: List[Tensor], task: bool = False) -> None:
        """Forget the earlier tasks if their gradients were cleared other than by
        :meth:`zero_grad`: ``optimizer.zero_grad()``, which sets them to ``None``, or a
        ``zero_grad(set_to_none=False)`` of the outer optimizer or the module, which
        zeroes them in place (found by the versions :meth:`_write` recorded, then one
        read of the values): ``reduction="mean"`` then divides by the tasks ``.grad``
        holds. First refuses a ``.grad`` that is an inference tensor, whose changes no
        version shows."""
        refuse_inference_grads(meta, self._name)
        if not ((self._tasks or self._reduced) and self._holding):
            return
        if all(p.grad is None for p in meta):
            self._forget_tasks()
            return
        mean = self._reduction == "mean"
        # Every .grad another tensor without a graph than the last write left: a clear to None then a
        # backward of the user's (a regulariser: review HA F1), or code that replaced them keeping
        # their values (p.grad = p.grad.clone(), p.grad = p.grad + g: review HF F1). Which, no look
        # can tell: the earlier tasks still count, with a warning where that matters.
        if self._written is not None and (mean or self._buffers or self._observations) and self._tasks and \
                all(replaced(p, ref, sparse) for p, ref, _, sparse in self._written):
            warnings.warn("every meta-gradient's .grad is another tensor than the last task left (a clear to "
                          "None followed by a backward() of yours, or p.grad = ...): the tasks since "
                          "meta.zero_grad() still count (reduction='mean' divides by them, track_buffers "
                          "averages their buffers); if you cleared them, clear through meta.zero_grad()",
                          stacklevel=caller_level())
        if not (mean or self._buffers or self._observations) or (self._reduced and not task):
            return  # (a sum needs no count, only the tasks' buffers and q="auto" observations
            # forgotten; after synchronize() the count is spent, unless a task follows: gradients
            # zeroed since then make it the first of a new count)
        if self._written is None:
            if self._tasks or self._reduced:
                # A count load_state_dict restored before .grad was put back (review s32H F3: an
                # in-place clear after that was not seen): .grad as it is now is the saved tasks',
                # unless every one is zero (cleared in place), one read for all of them.
                present = [p for p in meta if p.grad is not None]
                if not any(any_nonzero_each(present)) and not self._zero_saved:
                    self._forget_tasks()
                    return
                self._zero_saved = False
                self._record(meta)
            return
        changed = [p for p, ref, version, _ in self._written
                   if p.grad is None or p.grad is not ref() or grad_version(p.grad) != version]
        if not changed:
            return
        values = [p for p in changed if p.grad is not None]
        held = any_nonzero_each(values)  # one read for all of them
        if not any(held) and len(changed) == len(self._written):
            self._forget_tasks()  # every one zeroed in place or set to None (review s35U F2: a mix)
            return
        if not mean:
            self._record(meta)
            return
        dropped = [p for p in changed if p.grad is None]
        zeroed = {id(p) for p, h in zip(values, held) if not h}
        # The warnings come before the bookkeeping changes: raised as errors (warnings.simplefilter("error"))
        # they change nothing, and a retry warns again (review s37B F3).
        if dropped:
            warnings.warn(
                f"reduction='mean': the gradients of {', '.join(self._name(p) for p in dropped[:3])}"
                f"{' and others' if len(dropped) > 3 else ''} were cleared since the last task and "
                "others not (module.zero_grad() clears the module's only), so step() divides them "
                "all by the tasks since all were last cleared: clear them through meta.zero_grad()",
                stacklevel=caller_level())
        edited = [p for p, h in zip(values, held) if h]
        # (review s35K F1: a clip capped the mean at max_norm / tasks, silently; one task's mean is its
        # sum, review s35S F2)
        if edited and not task and not self._warned_edited and (self._tasks > 1 or self.distributed):
            warnings.warn(
                f"reduction='mean': the gradients of {', '.join(self._name(p) for p in edited[:3])}"
                f"{' and others' if len(edited) > 3 else ''} changed since the last task (a clip, a "
                f"scaling, a backward() of yours): step() divides what .grad holds by the {self._tasks} "
                "tasks, that change included (torch.nn.utils.clip_grad_norm_ then caps the mean at "
                "max_norm / tasks); to change the mean itself, call meta.synchronize() first (once per "
                "MetaOptimizer)", stacklevel=caller_level())
            self._warned_edited = True
        if self._carried is not None and zeroed:  # what they carried is gone
            self._carried = [(p, c) for p, c in self._carried if id(p) not in zeroed] or None
        if self._carried is not None and dropped:
            self._carried = [(p, c) for p, c in self._carried if p.grad is not None] or None
        self._record(meta)  # written by other code too (a clip, a loss of the user's)

    def _carry(self, meta: List[Tensor]) -> Optional[List[Tuple[Tensor, Tensor]]]:
        """Before the first task since the last step or :meth:`zero_grad` writes: copies
        of the dense gradients ``.grad`` already holds, which a reduction that changes
        ``.grad`` (``"mean"``, a ``process_group``) leaves as they are, as
        ``loss.mean().backward()`` adds the mean to whatever ``.grad`` held (a previous
        step's gradients, not cleared). ``None`` where there are none."""
        if self._tasks or self._reduced or self._carried is not None or not (
                self.distributed or self._reduction == "mean"):
            return None
        if self.distributed:  # what the last reduction left: _take_kept, at the first gradient
            return None
        with torch.no_grad():
            held = [(p, p.grad.clone()) for p in meta if p.grad is not None]
        return held or None

    def _take_kept(self) -> None:
        """With a ``process_group``, before the first gradient since the last reduction is
        added to ``.grad`` (by a ``backward()``, through the accumulators' pre-hooks
        (:meth:`_watch_accumulation`), or by a task): copy what ``.grad`` holds then,
        which the next reduction carries as it is, on every rank alike. Whatever was done
        to the reduced gradients until then (a clip, ``zero_grad``, in place or not) is in
        the copy; everything added after it is summed over the ranks."""
        if self._kept is None:  # (a parameter no hook watched since the reduction carries nothing)
            watched = {id(p) for p, _, _ in self._accumulators.values()}
            with torch.no_grad():
                self._set_kept([(p, p.grad.clone()) for p in self.meta_parameters()
                                if p.grad is not None and id(p) in watched])
            for p, _ in self._kept:
                self._note(p)

    def _set_kept(self, kept: Optional[List[Tuple[Tensor, Tensor]]]) -> None:
        """Set :attr:`_kept` and its index by parameter id."""
        self._kept = kept
        self._kept_params = {id(p): p for p, _ in kept or ()}

    def _note(self, p: Tensor) -> None:
        """Remember ``p.grad`` as a write known to this optimizer left it (:meth:`_check_kept`)."""
        if p.grad is not None:
            self._seen[id(p)] = (weakref.ref(p.grad), grad_version(p.grad))

    def _check_kept(self, params: Optional[Sequence[Tensor]] = None) -> None:
        """Before a write to the ``.grad`` of ``params`` (default: every carried one) and at
        the reduction: the carried copy of a gradient cleared since (set to ``None``, or zeroed
        in place: one read for those changed) is dropped, as that part is gone; one changed by
        hand otherwise (scaled, clipped, assigned) is noted, and refused at the reduction: which
        part of it the ranks would sum is ambiguous."""
        if not self._kept:
            return
        # every carried one in the copy's order (the same on every rank), or a hook's parameter
        looked = [p for p, _ in self._kept] if params is None else \
            [self._kept_params[id(p)] for p in params if id(p) in self._kept_params]
        changed = []
        for p in looked:
            seen = self._seen.get(id(p))
            if p.grad is None or seen is None or seen[0]() is not p.grad or grad_version(p.grad) != seen[1]:
                changed.append(p)
        if not changed:
            return
        values = [p for p in changed if p.grad is not None]
        held = {id(p) for p, h in zip(values, any_nonzero_each(values)) if h}  # one read for all
        for p in changed:
            if id(p) in held and self._name(p) not in self._by_hand:
                self._by_hand.append(self._name(p))
        gone = {id(p) for p in changed if id(p) not in held}
        if gone:  # (cleared: what it carried is gone, and so is a change by hand before)
            self._by_hand = [n for n in self._by_hand
                             if n not in {self._name(p) for p in changed if id(p) in gone}]
            self._set_kept([(p, c) for p, c in self._kept if id(p) not in gone])

    def _watch_accumulation(self, meta: List[Tensor]) -> None:
        """Register a pre-hook on the gradient accumulator of each of ``meta`` (a leaf that
        requires grad) not yet watched, or whose accumulator autograd made anew (after
        ``model.double()`` or ``.to()``): it runs :meth:`_take_kept` before autograd adds
        a gradient to ``.grad`` (not for ``torch.autograd.grad``, which adds none). Run at
        construction, at each task's write, at each reduction, ``zero_grad`` and ``step``:
        convert the model or add meta-parameters between outer steps."""
        me = weakref.ref(self)
        if not self._handles:  # (the hooks of an optimizer that is freed go with it)
            weakref.finalize(self, _remove_hooks, self._handles)

        def before(param):
            def hook(grads):
                owner, p = me(), param()
                if owner is not None and p is not None:
                    owner._check_kept([p])
                    owner._take_kept()
            return hook

        def after(p):
            owner = me()
            if owner is not None:
                owner._note(p)
        watched = {}
        for p in meta:
            if not p.requires_grad:
                continue
            with torch.inference_mode(False), torch.enable_grad():
                node = p.view_as(p).grad_fn.next_functions[0][0]
            old = self._accumulators.get(id(p))
            if id(p) not in self._posts:
                self._posts[id(p)] = p.register_post_accumulate_grad_hook(after)
                self._handles.append(self._posts[id(p)])
            if old is not None and old[1] is node:
                watched[id(p)] = old
                continue
            if old is not None:
                old[2].remove()
            watched[id(p)] = (p, node, node.register_prehook(before(weakref.ref(p))))
            self._handles.append(watched[id(p)][2])
        for key, (_, _, handle) in self._accumulators.items():
            if key not in watched:
                handle.remove()
        for key in [k for k in self._posts if k not in watched]:
            self._posts.pop(key).remove()
        for key in [k for k in self._seen if k not in watched]:
            del self._seen[key]  # (review EW: ids of meta-parameters gone, kept for ever)
        self._accumulators = watched
        # only the live handles (review EW: removed ones piled up, 2 per outer step that adds a
        # meta-parameter); the same list, which the finalizer holds
        self._handles[:] = list(self._posts.values()) + [handle for _, _, handle in watched.values()]

    def _record(self, meta: List[Tensor]) -> None:
        """Remember the ``.grad`` tensors and their versions (:meth:`_check_cleared`)."""
        self._written = [(p, weakref.ref(p.grad), grad_version(p.grad), p.grad.layout != torch.strided)
                         for p in meta if p.grad is not None]

    @one_call_at_a_time
    def backward(self, inner_loss: Callable, outer_loss: Callable, support: Any, query: Any,
                 *, force_truncation: Optional[int] = None) -> MetaResult:
        """Run one task and accumulate its hypergradient estimate into ``.grad``.

        As ``loss.backward()`` does, a parameter that no loss reads at any step (a
        head the task does not use) gets nothing: its ``.grad`` stays as it was
        (``None`` after ``zero_grad()``), so a stateful outer optimizer skips it.

        Args:
            inner_loss, outer_loss: ``(fmodel, batch) -> scalar tensor``;
                ``fmodel`` is called like the module but runs at the current
                inner parameters.
            support: one batch reused at every step (a tensor, a tuple or
                list such as ``[x, y]``, a dict), per-step batches as
                :class:`~torch_ufom.StepBatches`, or a callable ``j -> batch``
                (``j = 0..steps-1``).
            query: the outer loss's batch.
            force_truncation: use this truncation point ``K`` instead of drawing it
                (for tests and diagnostics; the weights stay those of the law):
                ``G_0 + sum_{k <= K} (G_k - G_{k-1}) / P(K >= k)``, which needs
                ``P(K >= K_forced) > 0`` only, so a ``K`` the law never draws
                itself is accepted (under ``mode="exact"``, ``force_truncation=2``
                returns ``G_2``, a truncated estimate, and ``0`` first-order's).

        Returns:
            A :class:`MetaResult`. If an error is raised, nothing is written, unless a
            hook registered with ``register_post_accumulate_grad_hook`` raised it: hooks run
            last, after the write and the task's count, as autograd runs them.

        Raises:
            TypeError, ValueError: an invalid argument or call (e.g. a task after
                :meth:`synchronize`).
            NonFiniteHypergradient: a non-finite hypergradient (a ``FloatingPointError``,
                as a non-finite loss is); the generator and torch's global generator are
                restored (not NumPy's or Python's, which only a loss of yours draws from).
            RuntimeError: the sweep cannot be exact (a ``@once_differentiable``
                Function, an embedding with ``scale_grad_by_freq=True``, a loss that
                gives another value when a step is evaluated again or draws from a
                ``torch.Generator`` of its own there, a failure inside
                forward-over-reverse).
        """
        def run_task(problem: Problem) -> BatchRun:  # one per-task group
            start = time.perf_counter()
            est = estimate_task(problem, support, query, force_truncation,
                                diagnostics=self.q_stats is not None)
            return BatchRun.one(est, time.perf_counter() - start)

        (result,) = self._accumulate(inner_loss, outer_loss, run_task)
        return result

    @one_call_at_a_time
    def backward_batch(self, inner_loss: Callable, outer_loss: Callable, supports: Any, queries: Any,
                       *, force_truncation: Union[int, Sequence[int], None] = None) -> List[MetaResult]:
        """Run a meta-batch of tasks at once and accumulate the sum of their estimates.

        The vectorised twin of calling :meth:`backward` once per task: the
        result (and every draw of ``K``) is the same, but the tasks run through
        ``torch.func.vmap``, one vectorised sweep per drawn truncation point,
        so tasks that drew ``K = 0`` skip the exact sweep of the others. Random
        operations inside the losses (dropout) draw other numbers under
        ``vmap`` than in the loop (``vectorise=False`` draws the loop's). The
        per-task loop runs instead where ``vectorise`` chooses it (``False``;
        under ``"auto"``, large tasks on a CPU), and, with a warning the first time, where ``vmap`` cannot
        run the model exactly (buffers the losses write, such as BatchNorm's
        running statistics, or operations ``vmap`` rejects) and under
        ``q="auto"`` (which keeps per-task statistics). Each result's
        ``batch_path`` says which ran and why.

        Args:
            inner_loss, outer_loss: as for :meth:`backward`; they see one task's batch.
            supports, queries: a tensor, a tuple/list or a dict of tensors whose
                first dimension indexes the tasks (one support batch per task,
                reused at every inner step; wrap per-step stacked batches in
                :class:`~torch_ufom.StepBatches`).
            force_truncation: ``None`` (draw), one ``K`` for every task, or a
                sequence with one ``K`` per task.

        Returns:
            One :class:`MetaResult` per task. In a vectorised run the step
            counts are those of the task's group (one vectorised step counts once).
            A parameter no loss reads gets no ``.grad``, as from :meth:`backward`
            (a vectorised run takes what the losses read from its look at the
            first task: every step's batch of it).

        Raises:
            TypeError: a meta-batch entry that is not a tensor (the message
                names it); nothing is written.
            ValueError: tensors whose leading sizes differ (the message names
                the entry), or another invalid argument; nothing is written.
            FloatingPointError: a non-finite loss, or (``NonFiniteHypergradient``,
                its subclass) hypergradient; nothing is written, and the generator and
                torch's global generator are restored (not NumPy's or Python's).
            RuntimeError: the sweep cannot be exact, as for :meth:`backward`;
                nothing is written.
        """
        def run_tasks(problem: Problem) -> BatchRun:
            run = estimate_batch(problem, supports, queries, force_truncation,
                                 diagnostics=self.q_stats is not None, known=self._slow_ops)
            if run.fallback and run.reason not in self._warned_per_task:  # once per reason
                warnings.warn(f"MetaOptimizer.backward_batch runs the per-task loop: {run.reason}",
                              stacklevel=caller_level())
                self._warned_per_task.add(run.reason)
            return run

        return self._accumulate(inner_loss, outer_loss, run_tasks)

    def _accumulate(self, inner_loss: Callable, outer_loss: Callable,
                    run_tasks: Callable[[Problem], BatchRun]) -> List[MetaResult]:
        """Run tasks and accumulate their estimates into ``.grad``: what :meth:`backward` (a
        one-task run) and :meth:`backward_batch` share, so that a task counts, writes and
        reports alike whichever runs it; returns one :class:`MetaResult` per task.

        ``run_tasks(problem)`` runs the engine on this call's problem. All or nothing up to
        the write: a refused problem, a failing run (a non-finite hypergradient named as the
        optimizer holds it), an observation or write that fails put the tally back
        (:meth:`_task_state_kept`). Then, in this order: a meta-batch keeps what the run's probe
        found (:attr:`BatchRun.slow_ops`; a per-task call looks at nothing), the results (with
        ``batch_path`` for a meta-batch's, else ``None``), the buffers of the tasks run one by one
        (``track_buffers``; a vectorised group's losses write none), the observations and the
        count; the post-accumulate hooks last, so that one that raises leaves the write
        counted (:meth:`_post_accumulate`)."""
        with self._task_state_kept():
            problem = self._problem(inner_loss, outer_loss)
            meta = list(problem.params)
            with self._named_errors(meta):
                run = run_tasks(problem)
            observations = self._observations_of([(est, seconds) for _, est, seconds in run.groups])
            written = self._write(meta, self._first_order_gaps(problem, meta, sum_grads(run, len(meta)),
                                                                 run.truncations))
        if run.meta_batch:
            self._slow_ops = run.slow_ops
        q = self.q
        results: List[Optional[MetaResult]] = [None] * len(run.truncations)
        path = ("vectorised" + (f": {run.reason}" if run.reason else "") if run.vectorised
                else f"per-task loop: {run.reason}") if run.meta_batch else None
        for g, (index, est, _) in enumerate(run.groups):
            batched = g < run.batched_groups
            for col, i in enumerate(index):
                results[i] = MetaResult(
                    # Copies: views would keep the whole group's stacked tensors alive.
                    est.outer_loss[col].clone() if batched else est.outer_loss,
                    est.inner_losses[:, col].clone() if batched else est.inner_losses,
                    est.truncation, est.weights, q, est.forward_steps, est.reverse_steps,
                    task_aux(est.aux, col) if batched else est.aux,
                    path if batched == run.vectorised else
                    f"per-task loop: {run.alone}" if run.vectorised else "vectorised, before " + path)
            if self._track_buffers and not batched:
                self._buffers.append(list(est.buffers))
        self._observations += observations
        self._tasks += len(run.truncations)
        self._post_accumulate(meta, written)
        return results

    @one_call_at_a_time
    def adapt(self, inner_loss: Callable, support: Any, steps: Optional[int] = None,
              generator: Optional[torch.Generator] = None) -> FunctionalModel:
        """Test-time adaptation with this optimizer's inner rule and ``inner_params``:
        :func:`torch_ufom.adapt` from the module's current parameters.

        Args:
            inner_loss: ``(fmodel, batch) -> scalar tensor``.
            support: one batch, :class:`~torch_ufom.StepBatches` or ``j -> batch``.
            steps: inner steps (default: the optimizer's ``steps``). A rule with
                :class:`~torch_ufom.inner.PerStep` values has one per trained step: any
                other number of steps is refused (``ValueError``); adapt longer or
                shorter with :func:`torch_ufom.adapt` and a rule of that many values.
            generator: the random streams' generator (default: the global one).
                Each call draws one seed from it, even for a model without random
                operations; the optimizer's own ``generator=`` is left alone, so
                an optimizer built with one keeps its training draws whatever
                meta-test runs, while one drawing from the global generator (the
                default) draws other numbers after a call that takes the default.

        Returns:
            The adapted :class:`~torch_ufom.FunctionalModel`. The parameters outside
            ``inner_params`` are the module's own tensors (not copies): the next
            :meth:`step` moves them under it; take ``.to_module()`` for a copy.

        Raises:
            TypeError, ValueError, FloatingPointError: as :func:`torch_ufom.adapt`.
        """
        s = self._config.settings
        return adapt(self.model, inner_loss, support, steps=self.steps if steps is None else steps,
                     inner_lr=s.inner_lr, inner=s.inner, inner_params=s.inner_params,
                     generator=generator)

    def _observations_of(self, runs) -> List[Dict[str, float]]:
        """With ``q="auto"``, the observations :meth:`step` will need of ``(estimate,
        seconds)`` pairs; else none."""
        if self.q_stats is None:
            return []
        return [adaptive.observe(exact=est.truncation == self.steps, seconds=seconds, steps=self.steps,
                                 forward_steps=est.forward_steps, reverse_steps=est.reverse_steps,
                                 g0=est.g0, gr=est.gk, q=self.q) for est, seconds in runs]

    def _first_order_gaps(self, problem: Problem, meta: List[Tensor], grads,
                          truncations: Sequence[int]) -> List[Optional[Tensor]]:
        """``grads`` with the first-order branch's gaps filled; ``truncations``: the tasks' ``K``.

        A meta-parameter that the inner loop does not adapt and that is read only
        through the inner loss's gradient (an L2 weight in the inner loss, a module
        parameter left out of ``inner_params`` that only the inner loss reads; not a
        learned rate, which scales the step itself) has no first-order term: a task
        that draws ``K = 0`` leaves it ``None``. Under a law that also draws exact
        branches, that ``None`` is the estimate's zero, written as zeros so that a
        stateful outer optimizer (momentum, Adam) steps on it as on every other
        draw. Under ``fom``, whose estimate never reaches such a tensor, it stays
        ``None`` and a warning (once per tensor and configuration) names it; so under
        ``truncated`` (``k < r``), for a tensor only the first ``r - k`` steps' losses read.
        A ``K`` forced below ``r`` under a law that draws only ``K = r`` (``exact``,
        ``q=1``) gets zeros too, as under ``ufom`` (review s36G F1: it was left ``None``).
        """
        if all(g is not None for g in grads):
            return grads
        adapted = {id(p) for n, p in self.model.named_parameters() if n in self._config.adapted}
        gaps = [i for i, (p, g) in enumerate(zip(meta, grads))
                if g is None and p.requires_grad and id(p) not in adapted]
        if not gaps:
            return grads
        steps = problem.config.steps
        survival = problem.law.survival(steps)
        if survival[steps] == 1.0:
            if all(k == steps for k in truncations):
                return grads  # every task exact: None means the losses do not read it
        elif all(s in (0.0, 1.0) for s in survival):  # fom, or a fixed truncation k < r (review s35A F1)
            new = [name for name in map(self._name, (meta[i] for i in gaps))
                   if name not in self._warned_fom_gaps]
            if new:
                names = ", ".join(new)
                k = sum(1 for s in survival[1:] if s == 1.0)
                which, why = ("mode='fom'", "the first-order estimate ignores how the inner loop depends "
                              "on it") if k == 0 else (
                    f"mode='truncated' (k={k})", f"no loss of the last {k} inner steps nor the outer loss "
                    f"reads it, and the truncated estimate ignores how the first {steps - k} depend on it")
                warnings.warn(f"{which} gives no hypergradient to {names}: {why}, so its .grad stays None "
                              "(use mode='ufom' or 'exact' to learn it)", stacklevel=caller_level())
                self._warned_fom_gaps.update(new)  # (after: raised as an error, it is not spent: s37B F3)
            return grads
        grads = list(grads)
        for i in gaps:
            grads[i] = torch.zeros_like(meta[i])
        return grads

    def _write(self, meta: List[Tensor], grads) -> Optional[List[Tensor]]:
        """Accumulate ``grads`` into the meta-parameters' ``.grad``, all or nothing
        (:func:`~torch_ufom.grads.accumulate_grads`), and record the write; returns the
        parameters written (for :meth:`_post_accumulate`). The engine has checked every
        hypergradient's finiteness (once per task). Before the write, what ``.grad`` holds
        that the next reduction leaves as it is is copied: with a ``process_group``, at the
        first gradient since the last reduction (:meth:`_take_kept`); else under ``"mean"``,
        at the first task since the last step (:meth:`_carry`)."""
        present = [(p, g) for p, g in zip(meta, grads) if g is not None]
        if not present:
            return None
        if self.distributed:
            self._check_kept()
            self._take_kept()
            self._watch_accumulation(meta)
        carried = self._carry(meta)
        accumulate_grads(present)
        self._holding = True
        if carried is not None:
            self._carried = carried
        self._record(meta)
        if self.distributed:
            for p in meta:
                self._note(p)
        return [p for p, _ in present]

    def _post_accumulate(self, meta: List[Tensor], written: Optional[List[Tensor]]) -> None:
        """Run the hooks registered with ``register_post_accumulate_grad_hook`` on the
        parameters :meth:`_write` wrote, as autograd runs them after it accumulates (review
        LB F1: a hook clipping ``.grad`` in place never ran, 0.46 off); not the optimizer's
        own (distributed bookkeeping). Last in the call, with the task counted: a hook that
        raises leaves the written ``.grad`` and the count that goes with it (review LD F6:
        the count was put back, and ``reduction="mean"`` divided the written sum wrongly).
        What the hooks change counts as written by this optimizer."""
        ran = False
        try:
            for p in written or ():
                hooks = getattr(p, "_post_accumulate_grad_hooks", None)
                if hooks:
                    own = self._posts.get(id(p))
                    for key, hook in list(hooks.items()):
                        if own is None or key != own.id:
                            ran = True
                            hook(p)
        finally:
            if ran:  # (otherwise what _write recorded stands)
                self._record(meta)
                if self.distributed:
                    for p in meta:
                        self._note(p)

    def _restore(self, saved: Sequence[Tuple[Tensor, Optional[Tensor]]]) -> None:
        """:func:`~torch_ufom.grads.put_back`, the restored gradients known as written by this optimizer."""
        put_back(saved)
        if self.distributed:
            for p, _ in saved:
                self._note(p)
        if saved:  # (review s36T F3, s37DW F3 under a process_group: copied back, their versions moved:
            self._record(self.meta_parameters())  # the retried step() named a change of the user's)

    def _name(self, p: Tensor) -> str:
        """How the user knows meta-parameter ``p``: its module name, else its place
        in the outer optimizer's parameter groups."""
        for n, t in self.model.named_parameters():
            if t is p:
                return repr(n)
        for gi, group in enumerate(self.optimizer.param_groups):
            for i, t in enumerate(group["params"]):
                if t is p:
                    return f"param_groups[{gi}]['params'][{i}] (shape {tuple(p.shape)})"
        return f"of shape {tuple(p.shape)}"

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Step the outer optimizer; returns what ``optimizer.step(closure)`` returns.

        First applies ``reduction``: with a ``process_group``, sums the
        meta-gradients over all ranks (:meth:`synchronize`); with ``"mean"``,
        divides by the number of tasks whose estimates ``.grad`` holds (all
        ranks'). A ``closure`` follows ``torch.optim``'s convention: it zeroes
        the gradients, runs the tasks (:meth:`backward`) and returns the loss;
        the reduction then applies after each call of the closure, to the
        tasks that call ran. With a ``process_group`` the loss the closure
        returns is this rank's own: an outer optimizer that reads it
        (``LBFGS``'s line search and stopping tests) needs the same value on
        every rank, so reduce it in the closure (``torch.distributed.all_reduce``),
        else the ranks step differently and their collectives stop pairing up.
        Then steps the outer optimizer and, with
        ``q="auto"``, updates ``q`` from the tasks since the last step, and
        with ``track_buffers`` writes the tasks' final buffers into the module.

        Without a closure, if the outer optimizer raises, ``.grad`` is put back
        as it was before the reduction and the tasks stay pending; with a
        ``process_group``, once the all-reduce has run, ``.grad`` keeps the reduced
        gradients, as after :meth:`synchronize` (the other ranks' steps may have
        run), and a retried ``step()`` runs no second reduction. A closure
        that raises after running tasks leaves ``.grad`` and the task count as
        that evaluation left them (its tasks replace the pending ones); one
        that raises before changing ``.grad`` leaves the pending tasks as they were.

        With a ``process_group`` every rank must reach ``step()`` (a
        collective) once per outer step, with or without tasks: if a rank's
        loss raises and that rank does not go on to ``step()``, the others wait
        in the all-reduce until it exits or the group's ``timeout`` passes.
        """
        if closure is not None and not callable(closure):  # (review IA F6: torch's error named no argument)
            raise TypeError(f"Invalid closure: {type(closure).__name__} (expected None or a callable that "
                            "re-evaluates the losses, as torch.optim's step(closure) takes)")
        self._check_cleared(self.meta_parameters())  # tasks discarded through the outer optimizer
        self._check_pending_buffers()
        result = self._step_now() if closure is None else self._step_with_closure(closure)
        self._after_step()
        return result

    def _step_now(self) -> Any:
        """:meth:`step` without a closure: the reduction (unless :meth:`synchronize` ran
        since the last task), then the outer optimizer's step; returns what it returns. If
        either raises, ``.grad``, the count and what ``.grad`` carries are put back as they
        were before the reduction, unless an all-reduce ran: then ``.grad`` keeps the reduced
        gradients, as after :meth:`synchronize`, so that a retried step reduces nothing again."""
        if self.distributed and self._reduced and self._kept is not None:
            raise RuntimeError("Invalid call: a backward() added to .grad after synchronize(), which "
                               "would stay this rank's (not summed over the ranks); nothing was "
                               "stepped on this rank: call meta.zero_grad() and run the outer step "
                               "again, with synchronize() after its last backward(), on every rank "
                               "(ranks whose step() ran have stepped: bring this rank's parameters and "
                               "outer optimizer state in line with theirs first, e.g. load their "
                               "state_dict)")
        tasks, reduced, kept = self._tasks, self._reduced, self._kept
        saved = [] if reduced or not self._changes() else grad_copies(self.meta_parameters())
        collective = False  # an all-reduce ran: every rank's .grad is now the reduced one
        try:
            if not reduced:
                self._synchronize(saved)
                collective = self.distributed
            with self._outer_step():
                result = self.optimizer.step()
        except BaseException:
            if collective:  # kept, as after synchronize(): a retried step() reduces nothing again,
                raise  # which this rank alone would (review s37DW F2: the ranks fell out of step)
            self._restore(saved)
            self._tasks, self._reduced = tasks, reduced
            if saved:  # .grad as before the reduction: so is what it carries
                self._set_kept(kept)
            raise
        return result

    def _step_with_closure(self, closure: Callable[[], Any]) -> Any:
        """:meth:`step` with a closure: the outer optimizer steps with ``closure`` wrapped so that
        each evaluation's tasks are counted afresh and reduced after it (:meth:`synchronize`);
        returns what the outer optimizer's step returns. A closure that raises before changing
        ``.grad`` leaves the pending tasks as they were; one that raises later leaves ``.grad``
        and the count as that evaluation left them."""
        def reduced():
            # The closure computes the gradients again (it zeroes them first, through
            # meta.zero_grad() or the outer optimizer's): the mean is over its tasks.
            pending, kept = self._tally(), self._kept
            meta = self.meta_parameters()
            # Weak references: a closure that sets .grad to None frees the old gradients.
            grads = [(None, None) if p.grad is None else (weakref.ref(p.grad), grad_version(p.grad))
                     for p in meta]
            had_values = any_nonzero(meta)  # on the device, read only if the closure fails
            self._forget_tasks()  # an earlier evaluation's tasks are run again
            try:
                out = closure()
            except BaseException:
                # .grad replaced, set to None or written in place (meta.zero_grad(), the
                # outer optimizer's), or zeroed through .data (which keeps the version):
                # the pending tasks are gone.
                untouched = all(p.grad is None if ref is None else
                                (p.grad is ref() and p.grad is not None and grad_version(p.grad) == v)
                                for p, (ref, v) in zip(meta, grads))
                if untouched and had_values is not None and bool(had_values):
                    untouched = bool(any_nonzero(meta))
                if untouched and not (self._tasks or self._reduced):
                    # it failed at once: the tasks stay pending
                    self._set_tally(pending)
                    self._set_kept(kept)
                # else .grad holds what this evaluation left (zeroed, its tasks), and so
                # does the count
                raise
            self.synchronize()
            return out
        with self._outer_step():
            return self.optimizer.step(reduced)

    def _after_step(self) -> None:
        """The bookkeeping after an outer step: the count and what goes with it reset, the
        accumulators watched again (with a ``process_group``), ``q``'s statistics updated
        (:meth:`_update_q_stats`) and the tasks' buffers written (:meth:`_apply_tracked_buffers`)."""
        self._tasks, self._reduced, self._carried, self._written = 0, False, None, None
        if self.distributed:  # (a model converted, a meta-parameter added since)
            self._watch_accumulation(self.meta_parameters())
        self._update_q_stats()
        self._apply_tracked_buffers()

    def _update_q_stats(self) -> None:
        """With ``q="auto"``, update ``q``'s statistics from the observations of the tasks since
        the last step (every rank's, in rank order, with a ``process_group``), and forget them."""
        if self.q_stats is None:
            return
        observations = self._observations
        if self.distributed:
            device = next(self.model.parameters()).device
            observations = [o for rank in distributed.gather(observations, self.process_group, device)
                            for o in rank]
        for obs in observations:
            self.q_stats = adaptive.update(self._config.adaptive, self.q_stats, obs)
        self._observations = []

    def _apply_tracked_buffers(self) -> None:
        """With ``track_buffers``, write the tasks' final buffers into the module (floating-point
        ones averaged over the tasks, every rank's with a ``process_group``; the others the last
        task's, or with a ``process_group`` the largest) and forget them."""
        if self._track_buffers and self.distributed:  # every rank: the mean over all ranks' tasks
            buffers = [b for _, b in self.model.named_buffers()]
            averaged = distributed.average_buffers(self._buffers, buffers, self.process_group)
            with torch.no_grad():
                for buf, value in zip(buffers, averaged):
                    if value is not None:
                        buf.copy_(value)
            self._buffers = []
        elif self._buffers:
            with torch.no_grad():
                for i, (_, buf) in enumerate(self.model.named_buffers()):
                    values = [task[i] for task in self._buffers]
                    if buf.is_floating_point():
                        buf.copy_(torch.stack(values).mean(0))
                    else:
                        buf.copy_(values[-1])
            self._buffers = []

    def _check_pending_buffers(self) -> None:
        """Raise, before anything is stepped, if the buffers ``track_buffers`` kept no longer
        fit the module's (a buffer added or resized since the tasks ran)."""
        if not self._buffers:
            return
        shapes = [b.shape for _, b in self.model.named_buffers()]
        if any(len(task) != len(shapes) or any(t.shape != s for t, s in zip(task, shapes))
               for task in self._buffers):
            raise ValueError("Invalid call: the module's buffers changed since this step's tasks ran "
                             "(track_buffers keeps each task's final buffers for step()); nothing was "
                             "changed: run the tasks again after zero_grad()")

    def synchronize(self) -> int:
        """Apply ``reduction`` to ``.grad`` now: with a ``process_group``, sum the
        meta-gradients over the ranks; with ``"mean"``, divide by the number of
        tasks they hold (all ranks'). Returns that number.

        :meth:`step` calls it unless it was called since the last
        :meth:`backward`; call it yourself after the outer step's last task to
        read, clip (``torch.nn.utils.clip_grad_norm_``) or log the gradients
        the outer optimizer will apply. A :meth:`backward` after it and before
        :meth:`step` or :meth:`zero_grad` is refused: it would mix reduced and
        unreduced gradients. A second call before then changes nothing (no
        collective runs) and returns the same number. If the all-reduce fails (a
        rank gone), ``.grad`` is put back as it was and the tasks stay pending.
        """
        return self._synchronize(None)

    def _synchronize(self, saved: Optional[List[Tuple[Tensor, Optional[Tensor]]]]) -> int:
        """:meth:`synchronize`; ``saved``: the gradients as they were (:func:`~torch_ufom.grads.grad_copies`),
        already copied by the caller, or ``None`` to copy them here where a collective runs."""
        meta = self.meta_parameters()
        self._check_cleared(meta)
        if self._reduced:
            return self._reduced_total  # summing or dividing again would scale .grad
        if self.distributed:
            self._watch_accumulation(meta)  # (meta-parameters added since)
            self._check_kept()
            if self._kept is None:  # nothing added since the last reduction: all of it is carried
                with torch.no_grad():
                    kept = [(p, p.grad.clone()) for p in meta if p.grad is not None]
            else:
                kept = [(p, c) for p, c in self._kept if p.grad is not None]
            marks = self._marks(meta)
            marks["gradients changed by hand since the step's first gradient"] = len(self._by_hand)
            # before anything changes: the collectives pair up only then
            distributed.check_alike(marks, self.process_group, meta[0].device if meta else None,
                                    self._checksums(meta, kept))
            if self._by_hand:  # (every rank alike: check_alike compared their number)
                raise ValueError(
                    f"Invalid .grad: the gradients of {', '.join(self._by_hand[:3])}"
                    f"{' and others' if len(self._by_hand) > 3 else ''} were changed by hand (scaled, "
                    "clipped or assigned, or by a gradient hook of yours, not by backward() or zero_grad()) "
                    "after the outer step's first "
                    "gradient arrived while they carried the last reduction's: which part the ranks "
                    "would sum is ambiguous; nothing was changed: change .grad after synchronize(), or "
                    "clear it (meta.zero_grad()) before the step's first backward()")
        total = self._tasks
        # What .grad held before this step's tasks is neither summed nor divided (_carry); with a
        # process group, what it held when the first gradient since the last reduction arrived.
        if self.distributed:
            held = kept
        else:
            held = self._carried or () if self._changes() else ()
        carried = [(p, c) for p, c in held if p.grad is not None and p.grad.shape == c.shape]
        if saved is None and self.distributed:
            saved = grad_copies(meta)
        try:
            with torch.no_grad():
                for p, c in carried:  # (out of place where either is sparse)
                    p.grad = p.grad.sub_(c) if takes_in_place(p.grad, c) else p.grad - c
            if self.distributed:
                total = distributed.sum_gradients(meta, self._tasks, self.process_group)
            if self._reduction == "mean":
                self._divide(total)
            with torch.no_grad():
                for p, c in carried:
                    p.grad = p.grad.add_(c) if takes_in_place(p.grad, c) else p.grad + c
        except BaseException:
            self._restore(saved or [])
            raise
        self._tasks, self._reduced, self._reduced_total = 0, True, total
        self._record(meta)
        if self.distributed:
            self._set_kept(None)  # taken at the next gradient's arrival
            self._watch_accumulation(meta)
        return total

    def _checksums(self, meta: List[Tensor], kept: List[Tuple[Tensor, Tensor]]) -> Dict[str, Tensor]:
        """What every rank's values must agree on before a reduction, each as a float64
        checksum on the device (:func:`distributed.check_alike`): the meta-parameters (seeded
        alike, stepped alike), and the gradients carried into it (reduced alike, then changed
        alike: a clip, a zero_grad on every rank)."""
        def total(tensors):  # (finite whatever the values: NaN never equals itself)
            out = torch.zeros((), dtype=torch.float64, device=meta[0].device)
            for i, t in enumerate(tensors, start=1):
                v = t.coalesce().values() if t.is_sparse else t
                v = torch.nan_to_num(v.detach().to(torch.float64), nan=0.0, posinf=1e100, neginf=-1e100)
                out = out + i * v.clamp(-1e100, 1e100).sum()
            return out
        return {"the meta-parameters' values (seed the model alike on every rank; a rank whose "
                "gradients differ from the others' steps apart)": total(meta),
                "the gradients carried from the last reduction (clear or change them alike on every "
                "rank)": total(c for _, c in kept)}

    def _marks(self, meta: List[Tensor]) -> Dict[str, int]:
        """What every rank's optimizer must agree on (:func:`distributed.check_alike`), each
        as a checksum: the inner loop and the outer step's hyperparameters too (review s34D:
        ranks built with another ``inner_lr`` or ``inner_params``, 0.76 / 0.15 off every
        single-process run, or stepping at another outer ``lr``, drifting apart)."""
        summary = self._settings_summary()
        outer = [{k: plain(v, frozenset(id(t) for t in meta)) for k, v in group.items() if k != "params"}
                 for group in self.optimizer.param_groups]
        return {name: zlib.crc32(repr(canonical(value)).encode()) for name, value in (
            ("the meta-parameters (their number, shapes and dtypes)",
             [(tuple(p.shape), str(p.dtype)) for p in meta]),
            ("reduction", self._reduction),
            ("the estimator (steps and the truncation law's probabilities: mode, q, truncation)",
             [float(p) for p in self.law.probs(self.steps)]),
            ("q='auto'", self.q_stats is not None),
            ("track_buffers", self._track_buffers),
            ("the inner rule (inner_lr, inner: its type and hyperparameters)", summary["inner"]),
            ("inner_params (the parameters the inner loop adapts)", summary["inner_params"]),
            ("the outer optimizer's hyperparameters (its param_groups but the params)", outer))}

    def _hook_outer_step(self) -> None:
        """Warn when the outer optimizer steps pending tasks directly (``outer.step()``, not
        :meth:`step`), which skips what :meth:`step` does first (review IA F4: under
        ``reduction="mean"`` the sum of the tasks was stepped, silently)."""
        me = weakref.ref(self)

        def hook(optimizer, args, kwargs):
            owner = me()
            if owner is None or owner._stepping:
                return
            skipped = [what for what, pending in (
                (f"the mean over its {owner._tasks} tasks", owner._reduction == "mean" and owner._tasks > 1
                 and not owner._reduced),
                ("the sum over the ranks", owner.distributed and owner._tasks > 0 and not owner._reduced),
                ("the tasks' running statistics (track_buffers)", bool(owner._buffers)),
                ("q='auto''s observations", bool(owner._observations))) if pending]
            if skipped:
                warnings.warn(f"the outer optimizer's step() ran directly while the MetaOptimizer holds "
                              f"pending tasks: it skips {', '.join(skipped)}, which MetaOptimizer.step() "
                              "takes first; call meta.step() instead", stacklevel=caller_level())

        weakref.finalize(self, self.optimizer.register_step_pre_hook(hook).remove)  # (holds no self)

    @contextlib.contextmanager
    def _outer_step(self):
        """The outer optimizer's step, from :meth:`step` (:meth:`_hook_outer_step`'s hook stays quiet)."""
        self._stepping = True
        try:
            yield
        finally:
            self._stepping = False

    def _changes(self) -> bool:
        """Whether :meth:`synchronize` would change ``.grad`` now."""
        return self.distributed or (self._reduction == "mean" and self._tasks > 1)

    def _divide(self, tasks: int) -> None:
        """Divide the accumulated meta-gradients by ``tasks`` (``"mean"``)."""
        if tasks > 1:
            with torch.no_grad():
                for p in self.meta_parameters():
                    if p.grad is not None:
                        p.grad.div_(tasks)

    def state_dict(self) -> Dict[str, Any]:
        """What a resumed run needs, as a dict (``torch.save`` it beside the model's).

        Keys: ``"optimizer"`` (the outer optimizer's ``state_dict``),
        ``"meta_tensors"`` (copies of the meta-parameters that are not the
        module's, such as a learned ``inner_lr``, in :meth:`meta_parameters`
        order: the model's ``state_dict`` does not hold them),
        ``"generator"`` (the generator's state, or ``None`` without one),
        ``"rank"`` (the rank that saved it with a ``process_group``, else
        ``None``: a dict loaded on another rank, e.g. saved on rank 0 and loaded
        on every rank, seeds that rank a stream of its own from the saved state),
        ``"q_stats"`` (the ``q="auto"`` statistics, else ``None``) with
        ``"q_rule"`` (the rule they belong to), ``"q_observations"`` (the
        ``q="auto"`` observations of the tasks since the last :meth:`step`),
        ``"tasks"`` (the number of tasks ``.grad`` holds, which
        ``reduction="mean"`` divides by), ``"reduced"`` (whether
        :meth:`synchronize` ran since, which then returns ``"tasks"``),
        ``"grad_zero"`` (whether the ``.grad`` of those tasks is all zero: a
        resumed run then does not take zeros for a clear; one read of the
        values where tasks are pending) and
        ``"settings"`` (the resolved configuration as plain values and strings:
        :meth:`load_state_dict` warns where it differs). The
        gradients themselves live on the parameters, and the buffers
        ``track_buffers`` keeps for the next :meth:`step` are not saved: save
        right after :meth:`step` to resume a run exactly.
        """
        self._notice_clears()  # (review s35U F1: a clear not seen yet was saved as the tasks')
        return {"optimizer": self.optimizer.state_dict(),
                "meta_tensors": [t.detach().clone() for t in self._extra_meta()],
                "generator": None if self.generator is None else self.generator.get_state(),
                "rank": distributed.rank(self.process_group) if self.distributed else None,
                "q_stats": None if self.adaptive is None else dict(self.q_stats),
                "q_rule": None if self.adaptive is None else self.adaptive.rule,
                "q_observations": [dict(o) for o in self._observations],
                "tasks": self._reduced_total if self._reduced else self._tasks,
                "reduced": self._reduced,
                "grad_zero": self._grads_zero(),
                "settings": self._settings_summary()}

    def _notice_clears(self) -> None:
        """:meth:`_check_cleared` before the state is saved or copied, so that a clear made
        outside ``meta`` since the last task is not taken for the tasks' gradients; but where a
        gradient lives on the meta device, which has no values to read (review s32O F2)."""
        meta = self.meta_parameters()
        if not any(p.grad is not None and p.grad.is_meta for p in meta):
            self._check_cleared(meta)

    def _grads_zero(self) -> bool:
        """Whether pending tasks left every ``.grad`` present all zero (one read; ``False``
        without pending tasks or without any ``.grad``)."""
        if not (self._tasks or self._reduced):
            return False
        present = [p for p in self.meta_parameters() if p.grad is not None]
        if any(p.grad.device.type == "meta" for p in present):  # (no values: review s32O F2)
            return False
        return bool(present) and not any(any_nonzero_each(present))

    def _extra_meta(self) -> List[Tensor]:
        """The meta-parameters that are not the module's parameters."""
        own = {id(p) for p in self.model.parameters()}
        return [t for t in self.meta_parameters() if id(t) not in own]

    def _settings_summary(self) -> Dict[str, Any]:
        """This optimizer's settings as plain values (:func:`~torch_ufom.state_dicts.settings_summary`),
        which ``state_dict`` saves and :meth:`load_state_dict` compares."""
        return settings_summary(self._config, self.meta_parameters(), self._reduction, self._track_buffers,
                                self.generator is not None)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned.

        The whole dict is checked before anything is changed: a dict that is
        not one (``None``, ``{}``, the outer optimizer's own ``state_dict``),
        an outer optimizer state with other parameter groups or counts (the
        outer optimizer then checks its own entries, and what it refuses
        changes nothing either, but like ``torch.optim`` it does not look at the
        values of its per-parameter state or hyperparameters), ``meta_tensors``
        of another number, shape or dtype, not finite, or, for an inner rule's
        hyperparameter (a learned ``inner_lr``), out of its range,
        a generator state without a generator or not a valid state,
        ``q="auto"`` statistics for a fixed ``q``, of another ``q_rule``, or
        with missing or invalid entries (a dict saved with a fixed ``q`` starts
        a ``q="auto"`` run's statistics afresh). Settings that differ from the
        saved run's (another estimator, ``steps``, inner rule ...,
        ``reduction``, ``track_buffers``, whether a generator draws) are not
        restored: a warning names them (:meth:`reconfigure` changes those it
        takes; the last three are the constructor's); ``q="auto"`` statistics
        saved under another ``q_min`` (or ``q_init``) have ``q`` chosen again
        from them, as :meth:`reconfigure` does.
        Dicts saved before a key existed load without it.

        Resuming between tasks: the optimizer's own pending tasks (their count,
        carried gradients and ``track_buffers`` statistics) are replaced by the
        loaded ones. ``.grad`` is yours to save and put back, before or after
        this call: the next task reads it once, and all zeros then count as a
        clear (``zero_grad(set_to_none=False)``), which forgets the loaded
        tasks, unless the dict's ``"grad_zero"`` says the saved tasks' gradient
        was zero (a dict saved before that key existed keeps its count).

        Raises:
            TypeError: ``state_dict`` or one of its entries has the wrong type.
            ValueError: an entry does not fit this ``MetaOptimizer``; nothing is changed.
        """
        extra = self._extra_meta()
        summary = self._settings_summary()
        law = summary["law"]
        check_state_dict(state_dict, self.optimizer, self.generator, self.adaptive, extra, law)
        check_meta_values(state_dict.get("meta_tensors"), extra, self._config.rule)
        differs = settings_differ(state_dict.get("settings"), summary)  # (before anything changes: IA F3)
        if differs:  # (before anything changes too: raised as an error, it changes nothing, review s37B F2)
            warnings.warn(differs, stacklevel=caller_level())
        opt, gen = self.optimizer, self.generator
        saved = (opt.state, opt.param_groups)
        try:
            # The outer optimizer checks its own entries (torch.optim checks some while it
            # loads, e.g. Adam's state entries in __setstate__, after it replaced its state).
            try:
                opt.load_state_dict(state_dict["optimizer"])
            except Exception as err:
                kind = TypeError if isinstance(err, TypeError) else ValueError
                raise kind(f"Invalid state_dict['optimizer']: {type(opt).__name__}.load_state_dict "
                           f"refused it ({type(err).__name__}: {err}); nothing was changed") from err
            if state_dict.get("generator") is not None:
                if self.distributed:  # a dict saved before "rank" existed: this rank's own
                    saved_rank = state_dict["rank"] if "rank" in state_dict else \
                        distributed.rank(self.process_group)
                    distributed.resume_generator(gen, state_dict["generator"], saved_rank,
                                                 self.process_group)
                else:  # (a generator's state is a CPU tensor: a dict loaded onto a device is moved back)
                    gen.set_state(state_dict["generator"].cpu())
        except BaseException:
            opt.__setstate__({"state": saved[0], "param_groups": saved[1]})
            raise
        with torch.no_grad():
            for t, value in zip(extra, state_dict.get("meta_tensors") or []):
                t.copy_(value)
        if state_dict.get("q_stats") is not None:
            self.q_stats = dict(state_dict["q_stats"])
            if saved_law_differs(state_dict.get("settings"), law):
                # Another q_min or q_init: q chosen again from the statistics, as reconfigure does
                # (review LB F3: a q below this q_min was refused, one above it kept as it was).
                self.q_stats = adaptive.rebound(self.adaptive, self.q_stats)
            self._observations = [dict(o) for o in state_dict.get("q_observations") or []]
        elif self.adaptive is not None and "q_stats" in state_dict:
            # Saved with a fixed q: this q="auto" run starts its statistics afresh (and the
            # settings warning above says that q differed).
            self.q_stats, self._observations = adaptive.init_stats(self.adaptive), []
        if state_dict.get("tasks") is not None:  # absent from dicts saved before it existed
            self._tasks = int(state_dict["tasks"])
        if state_dict.get("reduced") is not None:
            self._reduced = bool(state_dict["reduced"])
        if self._reduced and state_dict.get("tasks") is not None:
            self._tasks, self._reduced_total = 0, self._tasks  # the total synchronize() returns
        self._holding = self._holding or self._tasks > 0 or self._reduced
        # The pending tasks' bookkeeping is the loaded run's: nothing of this optimizer's own tasks
        # (review s32L F3, F4: their carried .grad and track_buffers statistics entered the step, 3.3 /
        # 7.7e-2 off, and their .grad tensors made a warning). What .grad holds is read at the next
        # task, whichever of .grad and this dict went back first (_check_cleared: review s32B F1,
        # s32H F3, s32L F1, F2).
        self._written, self._carried, self._buffers = None, None, []
        # (a dict saved before the key existed: the count kept, as it was then, review s32O F1)
        self._zero_saved = bool(state_dict.get("grad_zero", True))
        if self.distributed:  # (nor of its own reductions: review s32M F1, F2, the reviewer's fix)
            self._set_kept(None if self._reduced else [])
            self._by_hand = []

    def __repr__(self) -> str:
        return (f"MetaOptimizer(mode={self.mode!r}, steps={self.steps}, law={self.law!r}, "
                f"memory={self.memory!r}, inner={self.inner!r}, optimizer={type(self.optimizer).__name__})")


_SETTINGS_KEYWORDS = frozenset(f.name for f in dataclasses.fields(Settings))  # read-only attributes


def _check_holds(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Raise unless ``optimizer`` holds every parameter of ``model`` with ``requires_grad``,
    and none of its buffers."""
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    buffers = buffer_names(model)
    for gi, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            if id(p) in buffers:
                raise ValueError(f"Invalid optimizer: its param_groups[{gi}]['params'][{i}] is "
                                 f"{learned_buffer_message(buffers[id(p)])}")
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if missing:
        raise ValueError(
            f"Invalid optimizer: it does not hold the model parameters {missing}; pass all of "
            "model.parameters() to it (or set requires_grad=False on frozen ones; one that the inner "
            "loop adapts but the outer step must not move goes in a param group with lr=0, or, with an "
            "optimizer without param groups such as LBFGS, is held and has its .grad set to None "
            "before the step: in the closure, after the backward calls)")


def _warn_unheld(optimizer: torch.optim.Optimizer, rule: InnerRule) -> None:
    """Warn where a tensor hyperparameter of ``rule`` requires grad but ``optimizer`` holds
    no tensor viewing the same storage, or where ``optimizer`` holds it but it does not
    require grad (review s36T F2): either way it is a constant, not learned."""
    held = {id(root_of(p)) for g in optimizer.param_groups for p in g["params"]}  # by the storage they view
    tensors = [(rule.labels.get(key, key), t) for key, value in rule.hyper.items()
               for v in (value.values() if isinstance(value, Mapping) else (value,))
               for t in [v.values if isinstance(v, PerStep) else v] if isinstance(t, Tensor)]
    loose = [label for label, t in tensors if t.requires_grad and id(root_of(t)) not in held]
    if loose:
        warnings.warn(f"the inner rule's {', '.join(dict.fromkeys(loose))} requires grad, but the outer "
                      "optimizer does not hold it: it is not learned (its .grad stays None); hold it in "
                      "the optimizer given to MetaOptimizer, in a param group with lr=0 if another "
                      "optimizer steps it", stacklevel=caller_level())
    frozen = [label for label, t in tensors if not t.requires_grad and id(root_of(t)) in held]
    if frozen:
        warnings.warn(f"the outer optimizer holds the inner rule's {', '.join(dict.fromkeys(frozen))}, "
                      "which does not require grad: it is not learned (its .grad stays None, as "
                      "loss.backward() leaves it); to learn it, create it with requires_grad=True",
                      stacklevel=caller_level())


def _remove_hooks(handles: List[Any]) -> None:
    """Remove a freed MetaOptimizer's hooks from the gradient accumulators and parameters."""
    for handle in handles:
        handle.remove()
    handles.clear()
