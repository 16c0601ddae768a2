"""Test-time adaptation: the inner loop alone, without a graph.

Meta-validation and meta-test fine-tune the meta-learned initialisation on a
task's support set and evaluate the result, often with more inner steps than
training used. :func:`adapt` runs the same inner loop as the hypergradient
estimators (same rule, same adapted parameters, same per-step random streams)
but keeps no graph between steps, so its memory does not grow with ``steps``,
and returns a :class:`~torch_ufom.FunctionalModel` at the adapted parameters
and buffers. :func:`adapt_batch` adapts a stacked meta-batch of tasks at once.
The module itself is not changed (a forward that writes a parameter in place
writes the loop's copy of an adapted one; the parameters the loop does not adapt
are the module's own, as when it is called); both work under ``torch.no_grad()``.
"""
from __future__ import annotations

import operator
import warnings
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from .batches import probe_batches
from .checks import invalid, is_int
from .config import InnerLR, InnerParams, Settings, check_generator, check_loss, resolve
from .estimators import SweepLog, finite_each, first_nonfinite_loss
from .functional_model import FunctionalModel, check_parametrize_cache
from .inner import InnerRule
from .process import caller_level, one_call_at_a_time
from .protocols import Evaluator, Problem, State
from .randomness import draw_seed, restore_rng_on_error
from .rule_checks import elementwise_rule
from .unroll import InnerLoop, PerTask
from .vectorised import (Vectorised, attributes_kept, meta_batch_size, noting_listed_tasks, probe_steps,
                         task_of)

__all__ = ["adapt", "adapt_batch", "StackedFunctionalModel"]


class StackedFunctionalModel:
    """The adapted models of a meta-batch: parameters and buffers with a leading task
    dimension. Call it like the module on stacked inputs (``fmodel(xs)`` with
    ``xs[i]`` task ``i``'s input; tensor outputs come stacked the same way): it
    runs ``torch.func.vmap`` over the tasks, or calls each task's model in turn
    where ``vmap`` cannot run the module (e.g. ``nn.GRU``, ``nn.LSTM``).

    Attributes:
        module: the user's module (its parameters that are not adapted are its own).
        params, buffers: dicts from name to stacked tensors (non-adapted
            parameters are expanded views of the module's; every buffer is each
            task's own copy).
        size: the number of tasks.
        vectorised: whether calls try ``vmap`` first (``False`` where ``vmap``
            refused the module during the adaptation, or where the adaptation's
            look found a tensor kept outside the module, which a forward may
            keep; a call that ``vmap`` refuses runs task by task either way).

    :func:`adapt_batch` builds it; built by hand, its arguments are the attributes above
    (``size`` an int >= 1, ``vectorised`` a bool).

    Raises:
        TypeError: ``module`` is not an ``nn.Module``, ``params`` or ``buffers`` not a
            mapping from name to tensor, ``size`` not an int or ``vectorised`` not a bool.
        ValueError: ``size`` < 1, a name in both mappings, or an entry that is None
            (leave the name out to keep the module's own) or whose first dimension is
            not ``size``.
    """

    def __init__(self, module: nn.Module, params: Dict[str, Tensor], buffers: Dict[str, Tensor],
                 size: int, vectorised: bool = True):
        # (a user's: review s32E F5, nothing was checked until a call failed inside, e.g. size="3":
        # "leading size 3, but the stacked model holds 3 tasks")
        checked = FunctionalModel(module, params, buffers)  # (its checks of module, params and buffers)
        params, buffers = checked.params, checked.buffers
        if not is_int(size):
            raise invalid("size", size, "an int >= 1, the number of tasks", False)
        if size < 1:
            raise invalid("size", size, "an int >= 1, the number of tasks", True)
        for kind, given in (("params", params), ("buffers", buffers)):
            for name, value in given.items():
                if value is None:  # (review s32H F6: it failed at the call, "'NoneType' object ...")
                    raise ValueError(f"Invalid {kind}: {name!r} is None (expected a tensor whose first "
                                     f"dimension indexes the size={size} tasks; leave the name out to keep "
                                     "the module's own)")
                if value.dim() == 0 or value.shape[0] != size:
                    raise ValueError(f"Invalid {kind}: {name!r} has shape {tuple(value.shape)} (expected a "
                                     f"tensor whose first dimension indexes the size={size} tasks)")
        if not isinstance(vectorised, bool):
            raise TypeError(f"Invalid vectorised: {vectorised!r} (expected True or False)")
        self.module, self.params, self.buffers, self.size = module, params, buffers, int(size)
        self.vectorised = vectorised

    @one_call_at_a_time  # (it reads and swaps the module's entries: review GE F1)
    def __call__(self, *args, **kwargs):
        """The tasks' outputs, stacked: task ``i``'s model on ``xs[i]`` for every tensor ``xs``
        among the arguments (each with a leading dimension of ``size``; other values are
        passed to every task as they are).

        Raises:
            ValueError: a tensor argument whose leading size is not the number of tasks
                (``task(i)(x)`` runs one task's model on an input of its own).
        """
        for path, leaf in pytree.tree_leaves_with_path((args, kwargs)):
            if isinstance(leaf, Tensor) and (leaf.dim() == 0 or leaf.shape[0] != self.size):
                # (review IA F2: vmap refused it, and the task-by-task fallback read one row per task)
                where = ("args" + pytree.keystr(path[1:]) if path[0].idx == 0
                         else path[1].key + pytree.keystr(path[2:]))
                got = "a 0-d tensor" if leaf.dim() == 0 else f"a tensor of leading size {leaf.shape[0]}"
                raise ValueError(f"Invalid {where}: {got}, but the stacked model holds {self.size} tasks "
                                 "(expected a tensor whose first dimension indexes the tasks; "
                                 "task(i)(x) runs task i's model on an input of its own)")
        # (a forward hook, of the module's or global, may keep what it sees: feature extraction
        # stored tensors of vmap's, review FF; the look at the adaptation ran before it existed)
        if self.vectorised and not _forward_hooked(self.module):
            def one(params, buffers, a, k):
                return FunctionalModel(self.module, params, buffers)(*a, **k)

            # (what a forward writes in place before vmap refuses it, a buffer it replaces, must not
            # be written twice: review LA F5, BatchNorm's statistics counted twice; an expanded
            # view, a buffer the tasks share, cannot be written in place)
            kept = {n: t.clone() for n, t in self.buffers.items() if t.dim() == 0 or t.stride(0) != 0}
            try:
                with attributes_kept(self.module):  # (tensors of vmap's must not outlive it)
                    return torch.func.vmap(one, randomness="different")(self.params, self.buffers, args,
                                                                         kwargs)
            except Exception:  # noqa: BLE001 (run per task, where an error of the module is raised)
                with torch.no_grad():
                    for name, value in kept.items():
                        self.buffers[name].copy_(value)
        models = [self.task(i) for i in range(self.size)]
        given = [dict(model.buffers) for model in models]
        try:
            outs = [model(*task_of(args, i), **task_of(kwargs, i)) for i, model in enumerate(models)]
        finally:  # (the tasks that ran before one raised keep theirs, as their in-place writes: LC F1)
            self._stack_back(models, given)
        return pytree.tree_map(lambda *xs: torch.stack(xs) if isinstance(xs[0], Tensor) else xs[0], *outs)

    def _stack_back(self, models: List[FunctionalModel], given: List[Dict[str, Tensor]]) -> None:
        """Take the buffers the tasks' forwards replaced (``self.rm = ...``) rather than wrote
        in place, which are in each task's model only (review LA F5: the stacked model's
        second call read the old one, 2.6 off). Where the tasks' new buffers differ in shape
        (or dtype, device), which no stacked tensor holds, the old ones stay, with a warning
        (review LC F3: stacking them raised after every task had run)."""
        for name in list(self.buffers):
            if all(model.buffers[name] is views[name] for model, views in zip(models, given)):
                continue
            values = [model.buffers[name] for model in models]
            if any((v.shape, v.dtype, v.device) != (values[0].shape, values[0].dtype, values[0].device)
                   for v in values):
                warnings.warn(f"the module's forward replaced its buffer {name!r} with tensors of other "
                              "shapes (or dtypes) in different tasks, which the stacked model cannot hold: "
                              "it keeps the buffer as it was; call task(i) for each task's model",
                              stacklevel=caller_level())
                continue
            self.buffers[name] = torch.stack(values)

    def task(self, i: int) -> FunctionalModel:
        """Task ``i``'s adapted model (``-size <= i < size``, as indexing counts)."""
        boolean = isinstance(i, bool) or getattr(i, "dtype", None) in (torch.bool, bool)
        try:  # an int, or a 0-d integer tensor or array, as indexing takes
            if boolean or getattr(i, "ndim", 0):
                raise TypeError
            i = operator.index(i)
        except TypeError:
            raise TypeError(f"Invalid i: {type(i).__name__} (expected an int, the task's index)") from None
        if not -self.size <= i < self.size:
            raise IndexError(f"Invalid i: {i} (expected a task index in {-self.size}..{self.size - 1})")
        return FunctionalModel(self.module, {n: t[i] for n, t in self.params.items()},
                               {n: t[i] for n, t in self.buffers.items()}, serialised=True)

    def __getitem__(self, i: int) -> FunctionalModel:
        """``self[i]`` is :meth:`task` ``(i)`` (review s34F F3: indexing raised Python's
        generic error); so iterating gives each task's model."""
        return self.task(i)

    def __len__(self) -> int:
        """The number of tasks (``size``)."""
        return self.size


def _problem(model, inner_loss, settings: Settings, generator) -> Problem:
    if torch.is_inference_mode_enabled():  # autograd.grad cannot differentiate inference tensors
        raise RuntimeError("Invalid call under torch.inference_mode(): adapt differentiates the inner "
                           "loss (torch.no_grad() is fine: the library enables gradients where it "
                           "needs them)")
    config = resolve(settings, model, "adapt")
    check_parametrize_cache(model)
    check_loss("inner_loss", inner_loss)
    check_generator(generator)
    return Problem(model, inner_loss, None, config, config.law, (), "revrev", generator)


def _run(problem: Problem, evaluator: Evaluator, support: Any) -> State:
    """The inner loop from the module's parameters, without a graph; ``s_r``."""
    seed = draw_seed(problem.generator)
    loop = InnerLoop(problem, evaluator, support, None, seed, hypergradient=False)
    log = SweepLog(loop.steps)
    state = loop.initial_state()
    # Which parameters are finite at the start (a -inf mask that requires grad stays what it was:
    # review s37R F1), read with the others below.
    params = [p for p in state.params if p.numel() > 0]
    device = params[0].device if params else torch.device("cpu")
    before = finite_each(params, device)
    with loop.streams():
        for j in range(1, loop.steps + 1):
            state, loss, _ = loop.advance(state, j)
            log.first(loss)
    # One host synchronisation per call: the losses and the adapted parameters (an inner gradient
    # not finite at a finite loss makes the last step's parameters so, which no loss shows).
    named = [(n, p) for n, p in zip(problem.config.adapted, state.params) if p.numel() > 0]
    became = before & ~finite_each([p for _, p in named], device)
    if not bool(log.all_finite() & ~became.any().to(log.values.device)):
        said = first_nonfinite_loss(log.values[:loop.steps], loop.steps)
        if said:
            raise FloatingPointError(said)
        bad = [(n, p) for (n, p), was in zip(named, before.tolist())
               if was and not bool(torch.isfinite(p).all())]
        if bad:
            where = ""
            if isinstance(evaluator, Vectorised):  # (the tasks' stacked parameters)
                where = " in tasks " + str(sorted({i for _, p in bad for i in (
                    ~torch.isfinite(p.reshape(p.shape[0], -1)).all(1)).nonzero().flatten().tolist()}))
            bad = [n for n, _ in bad]
            raise FloatingPointError(
                f"the adapted parameters {bad}{where} are not finite after the last inner step "
                f"({loop.steps}), though every inner loss was finite: its update (an inner gradient not "
                "finite at a finite loss) made them so")
    return state


def _named(problem: Problem, state: State):
    """The adapted model's parameters (non-adapted ones at their module values) and buffers."""
    model, adapted = problem.model, problem.config.adapted
    params = dict(zip(adapted, state.params))
    for n, p in model.named_parameters():
        params.setdefault(n, p.detach())
    return params, {n: b for (n, _), b in zip(model.named_buffers(), state.buffers)}


@one_call_at_a_time
def adapt(model: nn.Module, inner_loss: Callable, support: Any, *, steps: int, inner_lr: InnerLR = None,
          inner: Optional[InnerRule] = None, inner_params: InnerParams = None,
          generator: Optional[torch.Generator] = None) -> FunctionalModel:
    """Run the inner loop on one task without a meta-gradient and return the adapted model.

    Args:
        model: the module whose parameters the loop starts from (see the module docstring).
        inner_loss: ``(fmodel, batch) -> scalar tensor`` (or ``(loss, aux)``;
            the aux is not kept).
        support: one batch reused at every step, :class:`~torch_ufom.StepBatches`,
            or a callable ``j -> batch``.
        steps: the number of inner steps, an int >= 1 (it need not be
            training's; the unadapted baseline is the module itself).
        inner_lr, inner: the inner rule, as for :func:`~torch_ufom.hypergrad`.
        inner_params: the parameters to adapt (default: every parameter with
            ``requires_grad``); the others are not copied: the returned model
            reads the module's own tensors (an ANIL backbone costs no memory per
            call), so a later in-place change of them, such as the outer
            optimizer's step, is seen by it, and a tensor replaced in the module
            (``.data =``, ``.to()``) is not. Take ``.to_module()`` for a copy
            that keeps this call's values.
        generator: the random streams' generator (default: the global one).

    Returns:
        A :class:`~torch_ufom.FunctionalModel` at the adapted parameters and
        buffers (BatchNorm's running statistics as the inner loop left them):
        call it like the module, read ``.params``, or get an ``nn.Module`` copy
        with ``.to_module()``. No graph is kept.

    Raises:
        TypeError, ValueError: an invalid argument (nothing changes).
        FloatingPointError: a non-finite inner loss, or adapted parameters that were
            finite and are not after the last step (its inner gradient was not
            finite at a finite loss).
    """
    problem = _problem(model, inner_loss, Settings(steps, inner_lr, inner, mode="fom",
                                                   inner_params=inner_params), generator)
    with restore_rng_on_error(generator), torch.no_grad():
        state = _run(problem, PerTask(), support)
    params, buffers = _named(problem, state)
    return FunctionalModel(model, params, buffers, serialised=True)


@one_call_at_a_time
def adapt_batch(model: nn.Module, inner_loss: Callable, supports: Any, *, steps: int,
                inner_lr: InnerLR = None, inner: Optional[InnerRule] = None,
                inner_params: InnerParams = None,
                generator: Optional[torch.Generator] = None) -> StackedFunctionalModel:
    """:func:`adapt` for a meta-batch: ``supports`` stacks the tasks along dimension 0.

    The tasks run at once through ``torch.func.vmap`` unless the inner loss
    writes the module's buffers (BatchNorm's running statistics in train mode),
    calls an operation whose gradient ``vmap`` gets wrong (an embedding with
    ``padding_idx``), draws from a ``torch.Generator`` of its own (which ``vmap``
    would advance once per task), a custom ``autograd.Function``'s backward raised during the
    look at the loss (what the look missed is unknown) or ``vmap`` cannot run the model (an
    error under ``vmap``, the losses' own too: then with a warning that names it); they then run
    one by one, each with its own random streams. Without random operations the result equals a loop of
    :func:`adapt` over the tasks (with dropout, ``vmap`` draws other masks).

    Args:
        model: the module whose parameters every task starts from (see :func:`adapt`).
        inner_loss: ``(fmodel, batch) -> scalar tensor`` (or ``(loss, aux)``); it
            sees one task's batch.
        supports: a tensor, a tuple/list or a dict of tensors whose first
            dimension indexes the tasks (one support batch per task, reused at
            every step), or :class:`~torch_ufom.StepBatches` of such stacks.
        steps, inner_lr, inner, inner_params, generator: as for :func:`adapt`.

    Returns:
        A :class:`StackedFunctionalModel`; ``.task(i)`` is task ``i``'s
        :class:`~torch_ufom.FunctionalModel`. Parameters the loop does not adapt
        are the module's own tensors, as for :func:`adapt`.

    Raises:
        TypeError, ValueError: an invalid argument (nothing changes).
        FloatingPointError: a non-finite inner loss, or adapted parameters that were
            finite and are not after the last step (its inner gradient was not
            finite at a finite loss).
    """
    problem = _problem(model, inner_loss, Settings(steps, inner_lr, inner, mode="fom",
                                                   inner_params=inner_params), generator)
    with noting_listed_tasks(supports=supports):
        return _adapt_batch(problem, inner_loss, supports, generator)


def _adapt_batch(problem: Problem, inner_loss: Callable, supports: Any, generator) -> StackedFunctionalModel:
    """:func:`adapt_batch` once its settings are resolved, without the note for per-task lists."""
    model = problem.model
    size = meta_batch_size(supports=supports)
    with torch.enable_grad():  # a support tensor that requires grad (a PINN's x) keeps it per task
        tasks = [task_of(supports, i) for i in range(size)]
    with restore_rng_on_error(generator), torch.no_grad():
        batches = probe_batches(tasks[0], problem.config.steps, "supports")
        found = probe_steps(model, inner_loss, batches, adapted=problem.config.adapted, node_hooks=False)
        # (tensors kept outside the module, maybe by its forward: calls too; a forward drawing from NumPy's
        # or Python's generator would draw once for every task: review JA F2)
        vectorised = not found.kept and not found.host_draws
        if elementwise_rule(problem.config.rule) and not (
                found.written or found.wrong or found.own_generator or found.differentiates
                or found.attributes or found.kept or found.hooks or found.host_draws or found.raised):
            # (the generators as they were: a fallback to the loop draws what a loop chosen at once
            # draws, review s37W2 F2)
            try:
                with restore_rng_on_error(generator), attributes_kept(model):
                    state = _run(problem, Vectorised(size), supports)
                return _stacked(problem, state, size)
            except FloatingPointError as err:  # a non-finite inner loss: the loop would find it again
                if str(err).startswith("inner_loss"):  # (the parameters' message names the tasks)
                    err.add_note(f"(raised by the meta-batch of {size} tasks run together: the values listed "
                                 "are theirs, in order)")
                raise
            except Exception as err:  # noqa: BLE001 (run per task, where an error of the loss is raised)
                vectorised = False  # calls of the result then loop over the tasks at once
                first_line = (str(err).splitlines() or [type(err).__name__])[0]
                warnings.warn(f"adapt_batch runs the tasks one by one: an error under torch.func.vmap "
                              f"({type(err).__name__}: {first_line}); the losses run again per task, "
                              "where an error of theirs is raised",  # (review s35B F3)
                              stacklevel=caller_level())
        states = []
        for i, task in enumerate(tasks):
            try:
                states.append(_run(problem, PerTask(), task))
            except FloatingPointError as err:
                if size > 1:
                    err.add_note(f"(raised by task {i} of the meta-batch of {size}, run per task)")
                raise
        return _stacked(problem, states, size, vectorised)  # (a list, even of one task)


def _forward_hooked(module: nn.Module) -> bool:
    """Whether a forward hook or pre-hook would run on a call of ``module``."""
    from torch.nn.modules import module as registry
    return bool(registry._global_forward_hooks or registry._global_forward_pre_hooks) or any(
        m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def _stacked(problem: Problem, states, size: int, vectorised: bool = True) -> StackedFunctionalModel:
    """One stacked model from one vectorised state, or from a list of ``size`` per-task
    states (a list of one for a meta-batch of one task: review s36F F1, where one per-task
    state was read as the vectorised one and its parameters lacked the task dimension)."""
    model, adapted = problem.model, problem.config.adapted
    if not isinstance(states, list):
        params = dict(zip(adapted, states.params))
        # each task's own copy: the vectorised state holds the module's own buffers, which a
        # call of the stacked model in train() mode would otherwise write, for every task at once
        buffers = {n: b.unsqueeze(0).expand(size, *b.shape).clone()
                   for (n, _), b in zip(model.named_buffers(), states.buffers)}
    else:
        params = {n: torch.stack([s.params[i] for s in states]) for i, n in enumerate(adapted)}
        buffers = {n: torch.stack([s.buffers[i] for s in states])
                   for i, (n, _) in enumerate(model.named_buffers())}
    for n, p in model.named_parameters():
        if n not in params:
            params[n] = p.detach().unsqueeze(0).expand(size, *p.shape)
    return StackedFunctionalModel(model, params, buffers, size, vectorised)
