"""The engine and the functional entry points.

:func:`run_estimate` is the one engine: one sweep of one task or of a group of
stacked tasks (the evaluator says which). :func:`estimate_task` and
:func:`estimate_batch` draw every task's truncation point and random-stream
seed (restoring the random state on error), decide whether and how a meta-batch
is vectorised (:func:`vectorised_plan`) and group its tasks by ``K``; every
public entry point (:func:`hypergrad`, :func:`hypergrad_batch`,
``MetaOptimizer.backward`` and ``backward_batch``) calls them.
"""
from __future__ import annotations

import inspect
import sys
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from .batches import batch_getter, per_step_batches, probe_batches
from .checks import invalid, is_int
from .config import Config, InnerLR, InnerParams, Settings, Vectorise, check_generator, check_losses, resolve
from .estimators import Estimate, estimate, plus, raised_by_hook
from .functional_model import renormalises_weights, scripted, sparse_weights
from .fwdrev import FwdRevDisagrees, FwdRevError
from .graphs import COMPILED, graph_reaches, root_of, wrong_twice_message
from .inner import InnerRule
from .losses import AuxRefused
from .process import caller_level, one_call_at_a_time
from .protocols import Evaluator, Problem
from .randomness import draw_seed, restore_rng_on_error
from .rule_checks import elementwise_rule, held_tensors
from .truncation import Snapshot, TruncationLaw
from .unroll import InnerLoop, PerTask, reads_nothing
from .vectorised import (FEWEST_TASKS_BESIDE_ON_CPU, FEWEST_TASKS_ON_CPU, SLOW_ON_CPU_ELEMENTS, LookFailed,
                         Vectorised, attributes_kept, fresh, group_by_truncation, meta_batch_size,
                         noting_listed_tasks, Probe, probe_steps,
                         reads_meta_directly, runs_optimised_script, select_tasks, task_of, under_a_look)

__all__ = ["hypergrad", "hypergrad_batch", "run_estimate", "estimate_task", "estimate_batch", "BatchRun",
           "SlowOps", "resolve_hvp", "bind_problem", "buffer_names", "functional_problem",
           "learned_buffer_message", "sum_grads", "task_aux"]

# What hvp="auto" picks where forward-over-reverse applies (benchmarks/speed.py measures both).
DEFAULT_HVP = "revrev"
DIFFERENTIATES = ("a loss calls torch.autograd.grad or backward (a PINN's du/dx, a gradient penalty), "
                  "which under torch.func.vmap does not see the tensors outside the transform (a frozen "
                  "body, a captured tensor)")


def resolve_hvp(config: Config, model: nn.Module, meta: Sequence[Tensor]) -> str:
    """The Hessian-vector product actually used: ``"fwdrev"`` or ``"revrev"``.

    Forward-over-reverse differentiates the inner loss with ``torch.func`` as a
    function of the adapted parameters alone, so it applies when the losses write
    no buffers (BatchNorm's running statistics in train mode are written in place;
    asked for by name, that is looked at when a task runs, and buffers only read
    are constants; ``"auto"`` takes a module with buffers for revrev) and every
    meta-parameter is an adapted parameter or a tensor of the inner rule's
    hyperparameters (a tensor the losses use directly needs the mixed second
    derivative, which only reverse-over-reverse gives). ``"auto"`` picks the
    faster of the two where both apply (``DEFAULT_HVP``), else ``"revrev"``;
    ``"fwdrev"`` where it does not apply is a ``ValueError``, except under
    ``fom``, which computes no HVP (so that flipping ``mode`` stays a one-word
    change, as for ``q``).
    """
    hvp = config.hvp
    if hvp == "revrev" or (hvp == "auto" and DEFAULT_HVP == "revrev") or config.mode == "fom":
        return "revrev"  # without looking at the module (a walk per call)
    # Asked for by name, buffers are looked at when a task runs (check_fwdrev_task): the probe
    # tells whether the losses write them (running statistics) or only read them (review EY F7).
    why = fwdrev_obstacle(model, config, meta, constant_buffers=hvp == "fwdrev")
    if hvp == "auto":
        return "revrev" if why else DEFAULT_HVP
    if why:
        raise ValueError(f"Invalid hvp: 'fwdrev' {why}; use 'revrev' or 'auto'")
    return hvp


def fwdrev_obstacle(model: nn.Module, config: Config, meta: Sequence[Tensor],
                    constant_buffers: bool = False) -> str:
    """Why forward-over-reverse cannot compute this problem's HVPs (``""`` if it can);
    ``constant_buffers``: a look at the losses found that they write no buffer."""
    if not constant_buffers and next(model.buffers(), None) is not None:
        return ("needs a module without buffers (a forward inside torch.func.jvp may write them: "
                "running statistics in train() mode, the legacy spectral_norm's vectors)")
    if any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse for m in model.modules()):
        return SPARSE_FWDREV
    names = scripted(model)
    if names:
        return (f"cannot differentiate TorchScript twice (torch.jit.script module or function "
                f"{_name_list(names)}: once the JIT has optimised it, its gradients under "
                "torch.func carry no graph)")
    named = dict(model.named_parameters())
    held = {id(root_of(t)) for t in held_tensors(config.rule)}  # lrs of lrs[i]
    known = {id(named[n]) for n in config.adapted}
    # A tensor the rule holds may be a parameter of the module too, which the forward may also
    # read at its own value, where torch.func.jvp does not see it (review s34J F1: a temperature
    # the forward reads, left out of inner_params and used as the inner rate, 0.20 off per task and
    # 0.31 in a vectorised meta-batch of LayerNorm models): the look at the losses finds that read
    # (reads_meta_directly keeps such parameters attached), as it finds any other direct read.
    extra = [t for t in meta if t.requires_grad and id(t) not in known and id(root_of(t)) not in held]
    if extra:
        names = {id(p): n for n, p in named.items()}
        what = [names.get(id(t), f"a tensor of shape {tuple(t.shape)}") for t in extra]
        shown = ", ".join(what[:4]) + (f" and {len(what) - 4} more" if len(what) > 4 else "")
        return (f"differentiates only through adapted parameters and the inner rule's tensors "
                f"(its hyperparameters, and tensors it holds as attributes), but {len(extra)} "
                f"meta-parameter(s) are neither ({shown}: parameters inner_params leaves out, or "
                "tensors the losses read)")
    return ""


def draw(law: TruncationLaw, steps: int, generator: Optional[torch.Generator]) -> Tuple[int, int]:
    """Draw the truncation point and the base seed of the per-step random streams."""
    K = law.sample(steps, generator)
    return K, draw_seed(generator)


def run_estimate(problem: Problem, evaluator: Evaluator, tasks: Tuple[Any, Any], K: int, seed: int,
                 diagnostics: bool = False, hooks: bool = True) -> Estimate:
    """The engine: one sweep of one task (:class:`~torch_ufom.unroll.PerTask`) or of a
    group of stacked tasks (:class:`~torch_ufom.vectorised.Vectorised`) at
    truncation point ``K``; steps rebuilt for the exact sweep (``K > 0``) run
    attention under the math kernel throughout."""
    support, query = tasks
    c = problem.config
    loop = InnerLoop(problem, evaluator, support, query, seed, K > 0)
    try:
        with loop.streams():
            return estimate(loop, K, problem.law.survival(c.steps), c.schedule(), problem.params,
                            diagnostics, hooks)
    except RuntimeError as err:
        # A compiled graph the look at the first step with a graph did not meet (it ran eagerly
        # there, under a mode Dynamo does not compile: review JA F3): torch's own error, named.
        if K > 0 and any(m in str(err) for m in _COMPILED_DOUBLE_BACKWARD):
            raise RuntimeError(wrong_twice_message([COMPILED])) from err
        if _IN_PLACE in str(err) and renormalises_weights(problem.model):
            err.add_note(RENORMALISED)  # (review s34A F2: torch's error named no cause)
        raise


_IN_PLACE = "modified by an inplace operation"  # torch's error for a tensor written after it was saved
RENORMALISED = (
    "The model has an nn.Embedding or nn.EmbeddingBag with max_norm, whose forward renormalises the "
    "rows it looks up in place: where the inner loop does not adapt its weight and the losses also "
    "read that weight directly (a tied head), torch cannot differentiate the unroll. Adapt the "
    "embedding, or renormalise its weight once before the call and drop max_norm (docs/porting.md).")


# torch's errors for a double backward through aot_autograd's CompiledFunction (torch 2.11-2.13)
_COMPILED_DOUBLE_BACKWARD = ("torch.compile with aot_autograd does not currently support double backward",
                             "donated buffers")


def check_force_truncation(force, size: Optional[int], steps: int) -> Optional[List[int]]:
    """Validate ``force_truncation``: ``None``, an int in ``0..steps`` or, for a meta-batch
    of ``size`` tasks, also a sequence of ``size`` such ints."""
    if force is None:
        return None
    if hasattr(force, "__array__"):  # a tensor or a NumPy array of ints (one per task)
        return check_force_truncation(force.tolist(), size, steps)
    if is_int(force):
        if not 0 <= force <= steps:
            raise ValueError(f"Invalid force_truncation: {force!r} (expected an int in 0..{steps})")
        return [int(force)] * (size or 1)
    if size is None:
        raise TypeError(f"Invalid force_truncation: {force!r} (expected None or an int in 0..{steps})")
    if not isinstance(force, (list, tuple)) or len(force) != size:
        raise (ValueError if isinstance(force, (list, tuple)) else TypeError)(
            f"Invalid force_truncation: {force!r} (expected an int or a sequence of {size} ints, one per "
            "task)")
    for i, k in enumerate(force):
        if not is_int(k) or not 0 <= k <= steps:
            raise invalid(f"force_truncation[{i}]", k, f"an int in 0..{steps}", is_int(k))
    return [int(k) for k in force]


def _draws(problem: Problem, size: int, forced: Optional[List[int]]) -> Tuple[List[int], List[int]]:
    """Each task's ``(K, seed)``, drawn in task order; a forced ``K`` needs ``P(K >= K_forced) > 0``
    (its terms' weights ``1 / P(K >= m)`` finite), not that the law draws it (review FC)."""
    steps = problem.config.steps
    draws = [draw(problem.law, steps, problem.generator) for _ in range(size)]
    truncations = [d[0] for d in draws] if forced is None else forced
    survival = problem.law.survival(steps)
    for i, k in enumerate(truncations):
        if survival[k] <= 0.0:
            where = "" if size == 1 else f"[{i}]"
            raise ValueError(f"Invalid force_truncation{where}: K={k} is never drawn under "
                             f"{problem.law!r} (P(K >= {k}) = 0)")
    return truncations, [d[1] for d in draws]


def estimate_task(problem: Problem, support: Any, query: Any, force=None,
                  diagnostics: bool = False, hooks: bool = True) -> Estimate:
    """Draw ``K`` (unless forced) and return one task's :class:`~torch_ufom.estimators.Estimate`.

    The generator and torch's global generator are restored if anything raises.
    """
    forced = check_force_truncation(force, None, problem.config.steps)
    with restore_rng_on_error(problem.generator):
        (K,), (seed,) = _draws(problem, 1, forced)
        check_fwdrev_task(problem, support, K)
        return run_estimate(problem, PerTask(), (support, query), K, seed, diagnostics, hooks)


@dataclass
class BatchRun:
    """What :func:`estimate_batch` returns.

    Attributes:
        groups: ``(task indices, Estimate, seconds)`` per group of tasks run
            together: one group per drawn ``K`` when vectorised (its estimate's
            losses carry a task dimension), one task per group otherwise.
        vectorised: whether ``torch.func.vmap`` ran the meta-batch.
        reason: why not, when it did not; or, when it did, how (e.g. which
            Hessian-vector product the vectorised sweep used and why).
        truncations: every task's ``K``.
        fallback: the per-task loop ran although vectorising was asked for
            (it would not be exact, or ``torch.func`` refused): the entry points
            warn. ``False`` when the loop was chosen: ``vectorise=False``, or
            ``"auto"`` judging that vectorising does not pay.
        slow_ops: what the probe found for these losses and device
            (``None`` if it looked at nothing), with where ``vmap`` failed; pass
            it back as ``known`` so that the next call does not try ``vmap`` again
            where it failed.
        batched_groups: how many of ``groups``, from the first, ran under
            ``vmap`` (their losses carry a task dimension): all when
            ``vectorised``, but for the groups too small to pay (``alone``);
            after an error under ``vmap``, those that had finished, the other
            tasks then running one by one.
        alone: in a vectorised run, why the tasks after the batched groups ran
            one by one (``vectorise="auto"`` on a CPU: their group of tasks that
            drew the same ``K`` was too small to pay); ``""`` when none did.
        meta_batch: whether a meta-batch entry ran it (``hypergrad_batch``,
            ``backward_batch``), whose probe's findings (``slow_ops``) replace
            what was known and whose results say the path taken; ``False`` for
            one task run alone (:meth:`one`), which looked at nothing.
    """

    groups: List[Tuple[List[int], Estimate, float]]
    vectorised: bool
    reason: str
    truncations: List[int]
    fallback: bool = False
    slow_ops: Optional["SlowOps"] = None
    batched_groups: int = 0
    alone: str = ""
    meta_batch: bool = True

    @classmethod
    def one(cls, est: Estimate, seconds: float) -> "BatchRun":
        """The run of one task alone (``MetaOptimizer.backward``), as one group."""
        return cls([([0], est, seconds)], False, "", [est.truncation], meta_batch=False)


class SlowOps(NamedTuple):
    """What the last probe found for one pair of losses on one device: the operations too
    large to pay vectorised there under ``vectorise="auto"``, with their sizes (empty: vmap
    pays), and those whose gradient ``vmap`` gets wrong (non-empty: the loop runs); and why
    ``vmap`` failed on an earlier call with these losses and submodules, for exact sweeps
    (``failed_exact``) or for any (``failed``): the loop then runs at once instead of failing
    again."""

    inner_loss: Callable  # weak references (_weak): what is kept must not keep the losses'
    device: torch.device  # captured tensors, or the submodules, alive
    ops: Tuple[str, ...]
    wrong: Tuple[str, ...] = ()
    outer_loss: Callable = lambda: None
    failed: str = ""
    failed_exact: str = ""
    modules: tuple = ()  # the submodules these findings are for

    def applies(self, inner_loss, outer_loss, device, modules) -> bool:
        """Whether these findings are for these losses, device and submodules."""
        return (_same(self.inner_loss, inner_loss) and _same(self.outer_loss, outer_loss)
                and self.device == device and len(self.modules) == len(modules)
                and all(r() is m for r, m in zip(self.modules, modules)))


def _weak(obj) -> Callable[[], Any]:
    """A weak reference to ``obj`` where it takes one (a bound method: to its function and
    object), else a function returning ``obj``."""
    try:
        return weakref.WeakMethod(obj) if inspect.ismethod(obj) else weakref.ref(obj)
    except TypeError:
        return lambda: obj


def _same(ref: Callable[[], Any], obj) -> bool:
    """Whether ``ref`` refers to ``obj`` (a bound method: the same function and object)."""
    held = ref()
    return held is obj or (inspect.ismethod(obj) and held == obj)


class Plan(NamedTuple):
    """How :func:`estimate_batch` runs a meta-batch (:func:`vectorised_plan`)."""

    problem: Optional[Problem]  # the problem to vectorise (its hvp may differ), None: the loop
    reason: str  # why the loop, or how vmap runs
    fallback: bool  # the loop runs although vmap was asked for (the entry points warn)
    slow_ops: Optional[SlowOps]  # what the probe found for these losses and device
    unread: frozenset = frozenset()  # adapted parameters the inner loss never reads (vectorised)
    alone: frozenset = frozenset()  # the K whose groups run per task, too small to pay (auto, CPU)
    alone_reason: str = ""


def estimate_batch(problem: Problem, supports: Any, queries: Any, force=None,
                   diagnostics: bool = False, known: Optional[SlowOps] = None) -> BatchRun:
    """A meta-batch's estimates: vectorised with ``torch.func.vmap`` where that is exact
    and, under ``vectorise="auto"``, where it pays.

    Each task draws its ``K`` and its random-stream seed from the generator in
    task order, exactly as a loop of single-task calls would. Tasks are then
    grouped by ``K`` and each group runs one vectorised sweep
    (:class:`~torch_ufom.vectorised.Vectorised`), or each task runs alone.

    ``config.vectorise`` chooses: ``False`` always runs the per-task loop.
    ``"auto"`` (the default) also runs it, by choice, when the module is on
    a CPU and one task is large: at least ``SLOW_ON_CPU_ELEMENTS`` (65,536)
    adapted parameters, or a convolution or ``batch_norm`` in task 0's inner
    loss whose output has that many elements. There the vectorised forms
    (B stacked parameter copies out of the cache, a grouped convolution,
    ``batch_norm`` decomposed into elementwise operations) cost more than the
    per-task loop (:mod:`torch_ufom.vectorised` gives the measurements); and
    on a CPU a group of tasks that drew the same ``K`` smaller than
    ``FEWEST_TASKS_ON_CPU`` runs per task (vmap's own cost per step is not
    paid back; when every group is that small, the loop runs without the
    look). It
    counts the parameters and looks at the operations (the probe below) on
    every call; ``known`` (a previous call's ``BatchRun.slow_ops``) says where
    ``vmap`` failed for the same losses, device and submodules. ``True`` vectorises
    wherever it is exact. Whatever it asks, the per-task loop runs instead
    (a fallback: ``BatchRun.fallback``) when the module has buffers that the
    losses write, when ``diagnostics`` are needed (``q="auto"`` keeps
    per-task statistics), when a loss calls an operation whose gradient
    ``vmap`` gets wrong (an embedding with ``padding_idx``: its padding row
    gets a gradient), when the model uses a normalisation whose double
    backward is wrong under ``vmap`` (pytorch/functorch#534) and
    forward-over-reverse HVPs cannot replace it, when the outer loss or a custom
    Function's backward raised during the look at the losses (what it missed after
    the error is unknown), or when anything raises under
    ``vmap`` (an operation ``vmap`` or forward-mode AD does not support, a
    batching rule that fails on the tasks' shapes): the loop then runs the tasks
    again, and an error of the user's losses is raised from there.
    ``BatchRun.reason`` says why.
    """
    with noting_listed_tasks(supports=supports, queries=queries):
        return _estimate_batch(problem, supports, queries, force, diagnostics, known)


def _estimate_batch(problem: Problem, supports: Any, queries: Any, force, diagnostics: bool,
                    known: Optional[SlowOps]) -> BatchRun:
    """:func:`estimate_batch`, without the note for per-task lists."""
    size = meta_batch_size(supports=supports, queries=queries)
    forced = check_force_truncation(force, size, problem.config.steps)
    # (the meta-batch's StepBatches, named as the argument whatever path runs: the per-task loop
    # blamed "support" of task 0, review s32E F4)
    batch_getter(supports, problem.config.steps, "supports")
    with restore_rng_on_error(problem.generator):
        truncations, seeds = _draws(problem, size, forced)
        try:
            plan = vectorised_plan(problem, supports, queries, diagnostics, known, truncations)
        except LookFailed as err:  # (review s37W2 F1: what the look missed is unknown)
            plan = Plan(None, _failed_look(str(err)), True, known)
        reason, fallback, slow_ops = plan.reason, plan.fallback, plan.slow_ops
        done: List[Tuple[List[int], Estimate, float]] = []  # the groups that ran vectorised
        alone = ""
        if plan.problem is not None:
            try:
                _run_groups(plan.problem, supports, queries, truncations, seeds, done, plan.unread,
                            plan.alone)
                batched = len(done)
                if not plan.alone:
                    return BatchRun(done, True, reason, truncations, False, slow_ops, batched)
                alone = plan.alone_reason
            except FloatingPointError:
                raise  # a non-finite loss or hypergradient: the loop would find it again
            except Exception as err:  # noqa: BLE001
                if raised_by_hook(err) or isinstance(err, AuxRefused):
                    raise
                # torch.func's own refusals, and any other error raised under vmap (a batching
                # rule that fails on the user's shapes, a packed sequence of another length per
                # task): the tasks of the groups that did not finish run again per task, where
                # an error of the losses is raised. Finished groups are kept (their hooks ran).
                chosen = isinstance(err, FwdRevError) and plan.problem.hvp != problem.hvp
                first_line = (str(err.detail if chosen else err).splitlines() or [type(err).__name__])[0]
                reason = f"an error under torch.func.vmap ({first_line})"
                if chosen:  # not the user's hvp: advice to pick another would not help
                    reason += f"; the vectorised sweep needs {plan.reason}"
                fallback = True
                if slow_ops is not None:  # remembered: the next call runs the loop at once
                    failed_k = next(k for k in sorted(set(truncations)) if k not in plan.alone and k not in
                                    {truncations[index[0]] for index, _, _ in done})  # (review HF F5)
                    slow_ops = slow_ops._replace(**{"failed_exact" if failed_k > 0 else "failed":
                                                    reason})
        groups = list(done)
        finished = {i for index, _, _ in done for i in index}
        for i in range(size):
            if i in finished:
                continue
            start = time.perf_counter()
            task = (task_of(supports, i), task_of(queries, i))
            try:
                check_fwdrev_task(problem, task[0], truncations[i])
                est = run_estimate(problem, PerTask(), task, truncations[i], seeds[i], diagnostics)
            except Exception as err:
                note = f"(raised by task {i} of the meta-batch of {size}, run per task)"
                if size > 1 and note not in getattr(err, "__notes__", ()):
                    err.add_note(note)
                raise
            groups.append(([i], est, time.perf_counter() - start))
        if alone:  # the groups too small to pay ran per task, by choice
            return BatchRun(groups, True, reason, truncations, False, slow_ops, batched, alone)
        return BatchRun(groups, False, reason, truncations, fallback, slow_ops, len(done))


def _run_groups(problem: Problem, supports, queries, truncations, seeds, done: list,
                unread: frozenset = frozenset(), alone: frozenset = frozenset()) -> None:
    """One vectorised sweep per drawn ``K`` but those in ``alone``, each appended to
    ``done`` as it finishes (``unread``: the adapted parameters the inner loss never
    reads, as the probe found). What the forwards store in the module's attributes
    (``self.last = h``, tensors of ``vmap``'s) is put back after each."""
    for k, index in group_by_truncation(truncations).items():
        if k in alone:
            continue
        start = time.perf_counter()
        tasks = (select_tasks(supports, index), select_tasks(queries, index))
        try:
            with attributes_kept(problem.model):
                est = run_estimate(problem, Vectorised(len(index), unread), tasks, k, seeds[index[0]])
        except FloatingPointError as err:  # (review FC: which tasks the values listed are)
            err.add_note(f"(raised by the vectorised group of tasks {index} of the meta-batch, run "
                         "together: the values listed are theirs, in that order)")
            raise
        done.append((index, est, time.perf_counter() - start))


def too_few_to_pay(groups: Dict[int, List[int]], per_step: bool) -> Tuple[frozenset, str]:
    """The ``K`` of the groups of tasks (:func:`group_by_truncation`) too small to pay
    vectorised on a CPU, and why: every ``K`` when no group has
    ``FEWEST_TASKS_ON_CPU`` tasks (vmap's cost per step and the look, at every step's batch
    with ``per_step`` batches); else those beside it with fewer than
    ``FEWEST_TASKS_BESIDE_ON_CPU`` (the look is paid)."""
    if all(len(index) < FEWEST_TASKS_ON_CPU[k > 0, per_step] for k, index in groups.items()):
        first, then = FEWEST_TASKS_ON_CPU[False, per_step], FEWEST_TASKS_ON_CPU[True, per_step]
        per = " with per-step batches" * per_step
        return frozenset(groups), _slow([f"groups of fewer than {first} first-order or {then} exact tasks "
                                         f"(those that drew the same K){per}"])
    fewest = {x: min(FEWEST_TASKS_BESIDE_ON_CPU, FEWEST_TASKS_ON_CPU[x, per_step]) for x in (False, True)}
    return (frozenset(k for k, index in groups.items() if len(index) < fewest[k > 0]),
            _slow([f"a group of fewer than {FEWEST_TASKS_BESIDE_ON_CPU} tasks beside a larger one"]))


SPARSE_FWDREV = "cannot differentiate sparse gradients (an embedding with sparse=True) in forward mode"


def _name_list(names: Sequence[str]) -> str:
    return ", ".join(repr(n) if n else "the model itself" for n in names)


def _slow(what: Sequence[str]) -> str:
    return (f"vectorising {', '.join(what)} does not pay on CPU (vectorise='auto'; "
            "vectorise=True forces vmap)")


def _failed_look(what: str) -> str:
    """Why the loop runs where a loss failed during a look (``what``: which, and its error)."""
    return (f"{what} during the library's look at the losses, which decides whether vmap is exact for "
            "them: the tasks run one by one (which raise it again if it recurs)")


def _wrong(what: Sequence[str]) -> str:
    return f"torch.func.vmap differentiates {', '.join(what)} wrongly"


def _saved_tensor_hooks() -> bool:
    """Whether default saved-tensor hooks are set (``save_on_cpu``, ``saved_tensors_hooks``):
    torch's own look, private (``False`` where a torch lacks it: the vmap attempt then fails
    and says why)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


def vectorised_plan(problem: Problem, supports: Any, queries: Any, diagnostics: bool,
                    known: Optional[SlowOps] = None, truncations: Optional[Sequence[int]] = None) -> Plan:
    """Whether and how the meta-batch runs under ``vmap`` (see :func:`estimate_batch`).
    A model whose normalisation layers ``vmap`` differentiates twice wrongly gets
    forward-over-reverse HVPs instead, where they apply. ``truncations``: every
    task's ``K`` as drawn (by default, the plan is for any ``K`` the law can draw).

    The checks run in a fixed order, and the first that refuses decides which cause the
    warning names where several hold: the settings and the model (:func:`_static_refusal`),
    what pays on a CPU, the caller's saved-tensor hooks, where ``vmap`` failed before, the
    model's hooks and TorchScript (:func:`_module_refusal`); then the look at the losses
    (:func:`_probed`) and what it found (``_PROBE_REFUSALS``, :func:`_exact_refusal`),
    and last the switch to forward-over-reverse HVPs (:func:`_norms_plan`)."""

    def loop(reason: str, fallback: bool = True) -> Plan:
        # The per-task loop, with what is known as it stands at the refusal (known is rebound
        # below: dropped where it no longer applies, replaced by what the probe found).
        return Plan(None, reason, fallback, known)

    refusal = _static_refusal(problem, diagnostics)
    if refusal is not None:
        return loop(*refusal)
    device = next(problem.model.parameters()).device
    auto = problem.config.vectorise == "auto" and device.type == "cpu"  # vmap pays on accelerators
    if auto:
        named = dict(problem.model.named_parameters())
        size = sum(named[n].numel() for n in problem.config.adapted)
        if size >= SLOW_ON_CPU_ELEMENTS:
            return loop(_slow([f"{size:,} adapted parameters"]), False)
    scope = _scope(problem, supports, truncations, auto)
    if scope.all_alone:
        return loop(scope.alone_reason, False)
    if _saved_tensor_hooks():  # the caller's: found before the look blames a loss (review s35B F4), after
        # what vectorise="auto" decides (review s35R F1: a loop it picks anyway needs no warning)
        return loop("saved-tensor hooks are set around the call (torch.autograd.graph.save_on_cpu, "
                    "saved_tensors_hooks), which torch.func's gradients cannot run under")
    modules = tuple(problem.model.modules())
    if known is not None and not known.applies(problem.inner_loss, problem.outer_loss, device, modules):
        known = None  # other losses, device or submodules: where vmap failed no longer applies
    if known is not None and (known.failed or (scope.exact and known.failed_exact)):
        return loop(known.failed or known.failed_exact)
    why = _module_refusal(problem.model, scope.exact)
    if why:
        return loop(why)
    batches = probe_batches(task_of(supports, 0), problem.config.steps, "supports")
    found, known, reads_none = _probed(problem, batches, task_of(queries, 0), known, device, modules)
    findings = _Findings(found, known, auto, reads_none)
    for applies, reason, fallback in _PROBE_REFUSALS:
        if applies(findings):
            return loop(reason(findings), fallback)
    if scope.exact:
        why = _exact_refusal(problem, found, batches)
        if why:
            return loop(why)
        if problem.hvp == "fwdrev":
            _check_fwdrev_choice(problem, found, batches, supports, scope.step_one)
    if not scope.exact or problem.hvp == "fwdrev" or not found.norms:
        return Plan(problem, "", False, known, found.unread, scope.alone, scope.alone_reason)
    return _norms_plan(problem, found, batches, supports, scope, known)


def _static_refusal(problem: Problem, diagnostics: bool) -> Optional[Tuple[str, bool]]:
    """Why the per-task loop runs whatever the tasks and the losses (the settings, the inner
    rule, the model's weights), as ``(reason, fallback)``; ``None``: nothing here stops ``vmap``."""
    if problem.config.vectorise is False:
        return "vectorise=False", False
    if diagnostics:
        return "q='auto' keeps per-task statistics", True
    rule = problem.config.rule
    if not elementwise_rule(rule):
        return (f"the inner rule {type(rule).__name__} is a rule of your own that does not declare "
                "elementwise = True: its update on the tasks' stacked state could mix the tasks "
                "(a norm over a tensor)", True)
    if sparse_weights(problem.model):  # found before a vmap attempt that would fail
        return "torch.func.vmap has no sparse kernels (an embedding with sparse=True)", True
    return None


class _Scope(NamedTuple):
    """Which truncation points the vectorised sweeps of a meta-batch run (:func:`_scope`)."""

    exact: bool  # whether some vectorised group may run exact steps (K > 0)
    step_one: bool  # whether one may differentiate the first step (K = steps)
    alone: frozenset = frozenset()  # the K whose groups run per task, too small to pay (auto, CPU)
    alone_reason: str = ""
    all_alone: bool = False  # every group is too small to pay: the loop runs, without the look


def _scope(problem: Problem, supports: Any, truncations: Optional[Sequence[int]], auto: bool) -> _Scope:
    """What the vectorised sweeps run: for the drawn ``truncations`` (every task's ``K``),
    the groups of tasks that drew the same ``K`` but, under ``auto`` (``vectorise="auto"`` on
    a CPU), those too small to pay (:func:`too_few_to_pay`); without them, any ``K`` the law
    can draw."""
    steps = problem.config.steps
    survival = problem.law.survival(steps)
    if truncations is None:
        return _Scope(survival[1] > 0.0, survival[steps] > 0.0)
    groups = group_by_truncation(truncations)
    alone, alone_reason = too_few_to_pay(groups, per_step_batches(supports)) if auto else (frozenset(), "")
    run = [k for k in groups if k not in alone]
    return _Scope(any(k > 0 for k in run), any(k == steps for k in run), alone, alone_reason,
                  auto and len(alone) == len(groups))


def _module_refusal(model: nn.Module, exact: bool) -> str:
    """Why the per-task loop runs, found in the model before any look at the losses: full
    backward hooks (a vmap attempt would fail) and, where some task runs exact steps
    (``exact``), TorchScript that ``vmap`` cannot differentiate twice; ``""``: neither."""
    hooked = [n or "the model itself" for n, m in model.named_modules()
              if m._backward_hooks or m._backward_pre_hooks]
    if hooked:  # found before a vmap attempt that would fail
        return (f"torch.func.vmap cannot run full backward hooks (register_full_backward_hook "
                f"or register_full_backward_pre_hook on {', '.join(map(repr, hooked))}: an "
                "autograd.Function without vmap support)")
    names = scripted(model) if exact else []
    if names:  # vectorised first-order steps are right: only the second derivatives are lost
        return (f"torch.func.vmap cannot differentiate TorchScript twice (torch.jit.script "
                f"module or function {_name_list(names)}: once the JIT has optimised it, its "
                "gradients under vmap carry no graph)")
    return ""


def _probed(problem: Problem, batches: Sequence[Any], query: Any, known: Optional[SlowOps],
            device: torch.device, modules: tuple) -> Tuple[Probe, SlowOps, bool]:
    """The look at the losses (:func:`~torch_ufom.vectorised.probe_steps` on task 0's
    ``batches`` and ``query``), what of it the next call keeps (:class:`SlowOps`, with where
    ``vmap`` failed as ``known`` says) and whether the inner loss reads none of the adapted
    parameters (warned here, as the per-task loop's own look warns)."""
    # The probe runs on every call: what it finds depends on the module and on whatever the
    # losses read (a swapped submodule, a padding index switched on), which no cheap key covers.
    found = probe_steps(problem.model, problem.inner_loss, batches, problem.outer_loss, query,
                        problem.config.adapted)
    reads_none = bool(problem.config.adapted) and set(problem.config.adapted) <= set(found.unread)
    if reads_none:
        warnings.warn(reads_nothing("inner_loss"), stacklevel=caller_level())  # (the loop's own look)
    slow = SlowOps(_weak(problem.inner_loss), device, tuple(
        f"{op} ({n:,} elements per task)" for op, n in sorted(found.slow_on_cpu.items())),
        tuple(sorted(found.wrong)), _weak(problem.outer_loss),
        *((known.failed, known.failed_exact) if known is not None else ("", "")),
        tuple(map(weakref.ref, modules)))
    return found, slow, reads_none


class _Findings(NamedTuple):
    """What ``_PROBE_REFUSALS`` reads: the probe's findings (``found``; ``slow``, as
    :func:`_probed` keeps them), whether ``vectorise="auto"`` decides on a CPU (``auto``)
    and whether the inner loss reads none of the adapted parameters (``reads_none``)."""

    found: Probe
    slow: SlowOps
    auto: bool
    reads_none: bool


# Why the per-task loop runs, from what the look at the losses found: (applies, reason, fallback)
# rows, walked in order by vectorised_plan; the first row that applies decides (which cause the
# warning names where several hold).
_PROBE_REFUSALS: Tuple[Tuple[Callable[[_Findings], Any], Callable[[_Findings], str], bool], ...] = (
    (lambda x: x.auto and x.slow.ops, lambda x: _slow(x.slow.ops), False),
    # (review s37W F1: a loss failing once in the look hid a NumPy draw after it)
    (lambda x: x.found.raised, lambda x: _failed_look(x.found.raised), True),
    # (vmap's own check would refuse it under another name: review IA F7; _probed warned)
    (lambda x: x.reads_none, lambda x: "inner_loss reads none of the adapted parameters", False),
    (lambda x: x.slow.wrong, lambda x: _wrong(x.slow.wrong), True),
    (lambda x: x.found.own_generator, lambda x: (
        "a random operation draws from a torch.Generator of the losses' own (generator=...), which "
        "vmap(randomness='different') would advance once per task, so each task would draw other "
        "numbers than it draws alone"), True),
    (lambda x: x.found.host_draws, lambda x: (
        "a loss draws from NumPy's or Python's global random generator (np.random, random), which "
        "vmap would run once for the whole meta-batch: every task would draw the same numbers, where "
        "alone each draws its own (draw from torch's generator, torch.randn: "
        "vmap(randomness='different') draws per task)"), True),
    (lambda x: x.found.written, lambda x: (
        f"the module has buffers that the losses write ({', '.join(x.found.written)}: running "
        "statistics cannot be vectorised)"), True),
    (lambda x: x.found.attributes, lambda x: (
        f"the module's forward keeps tensors in plain attributes "
        f"({', '.join('self.' + n for n in x.found.attributes[:3])}): state kept between calls "
        "cannot be vectorised (a tensor under torch.func.vmap must not outlive it)"), True),
    # (review HB F3: named the wrong cause)
    (lambda x: x.found.kept and x.found.kept != "elsewhere", lambda x: (
        f"a forward pre-hook keeps a tensor computed from a task's parameters in the module's "
        f"attributes ({x.found.kept}: torch.nn.utils.prune, the legacy weight_norm or spectral_norm), "
        "which under torch.func.vmap would be a tensor of the transform's"), True),
    (lambda x: x.found.kept, lambda x: (
        "a loss keeps a tensor computed from a task's parameters or batch beyond its evaluation, "
        "outside the module's attributes (a global list of logged values, a class attribute, a "
        "forward hook's store, a memo of a function's own): under torch.func.vmap it would keep a "
        "tensor of the transform's (return what you log as the loss's aux)"), True),
    (lambda x: x.found.differentiates, lambda x: DIFFERENTIATES, True),
    (lambda x: x.found.hooks, lambda x: (
        "a loss registers a gradient hook on a tensor or a graph node (Tensor.register_hook, "
        "grad_fn.register_hook), which the gradients taken through torch.func.vmap do not run (or "
        "run on every task's at once)"), True),
    (lambda x: x.found.hooks_unseen, lambda x: (
        "a profiler is set (sys.setprofile: cProfile, torch.profiler with with_stack=True), which "
        "hides from the look the hooks a loss may register on graph nodes, which the gradients taken "
        "through torch.func.vmap would not run"), True),
)


def _exact_refusal(problem: Problem, found: Probe, batches: Sequence[Any]) -> str:
    """Why the per-task loop runs where some task runs exact steps, from what the look at
    the losses found (``""``: nothing); raises where the per-task loop would raise too."""
    if found.wrong_twice:  # as the per-task loop does (graphs.check_twice_differentiable)
        raise RuntimeError(wrong_twice_message(found.wrong_twice))
    if found.once:  # the per-task loop raises (graphs.check_twice_differentiable)
        return f"{', '.join(found.once)} has a @once_differentiable backward"
    if runs_optimised_script(problem.model, problem.inner_loss, batches, problem.config.adapted,
                             generators=found.own_generator):
        if problem.hvp == "fwdrev":
            raise ValueError(f"Invalid hvp: 'fwdrev' {_OPTIMISED_SCRIPT}; use 'revrev' or 'auto'")
        return f"torch.func.vmap {_OPTIMISED_SCRIPT}"
    return ""


def _check_fwdrev_choice(problem: Problem, found: Probe, batches: Sequence[Any], supports: Any,
                         step_one: bool) -> None:
    """Refuse ``hvp="fwdrev"``, the user's choice, where forward-over-reverse HVPs cannot
    run the losses (``batches``: task 0's, as looked at; the check that they agree with
    revrev runs on task 0 of ``supports``)."""
    why = found.fwdrev_obstacle()
    if why:
        raise ValueError(f"Invalid hvp: 'fwdrev' {why}; use 'revrev' or 'auto'")
    check_fwdrev_reads(problem, batches)
    if not found.attention_dropout:  # (per task, torch.func draws other attention masks)
        check_fwdrev_agrees(problem, fresh(task_of(supports, 0)), step_one)


def _norms_plan(problem: Problem, found: Probe, batches: Sequence[Any], supports: Any, scope: _Scope,
                known: SlowOps) -> Plan:
    """The plan where ``vmap`` differentiates the model's normalisations twice wrongly
    (pytorch/functorch#534) and the user left the HVPs to the library: forward-over-reverse
    ones where they apply and agree with reverse-over-reverse on task 0 of ``supports``, else
    the per-task loop, saying why not."""
    norms = ", ".join(sorted(found.norms))
    # (buffers the losses do not write, a positional encoding or a causal mask, are constants)
    why = fwdrev_obstacle(problem.model, problem.config, problem.params, constant_buffers=not found.written) \
        or found.fwdrev_obstacle()
    if not why and loss_reads_meta(problem, batches):
        why = READS_META
    if not why and not found.attention_dropout:  # (per task, torch.func draws other attention masks)
        try:
            why = fwdrev_disagreement(problem._replace(hvp="fwdrev"), fresh(task_of(supports, 0)),
                                      scope.step_one)
        except Exception as err:  # noqa: BLE001 (the per-task loop runs revrev: its own errors raise there)
            said = err.detail if isinstance(err, FwdRevError) else str(err)  # (no advice of another hvp)
            why = f"fails on the first task ({type(err).__name__}: {said[:200]})"
    if why:
        return Plan(None, f"torch.func.vmap differentiates {norms} twice wrongly "
                    f"(pytorch/functorch#534) and forward-over-reverse, which would replace it, {why}",
                    True, known)
    return Plan(problem._replace(hvp="fwdrev"), "forward-over-reverse HVPs: vmap differentiates "
                f"{norms} twice wrongly (pytorch/functorch#534)", False, known, found.unread, scope.alone,
                scope.alone_reason)


_OPTIMISED_SCRIPT = ("cannot differentiate TorchScript twice (the inner loss runs a torch.jit.script "
                     "function or module that the JIT has optimised, reached where the library's look "
                     "at names does not see it, e.g. through a method or an attribute: its gradients "
                     "under torch.func carry no graph)")


_UNDER_A_LOOK = ("Invalid hvp: 'fwdrev' cannot run inside a loss that an enclosing torch_ufom call is "
                 "looking at (a bilevel problem nested in another's loss): that look sets a profile "
                 "function, under which hooks on graph nodes cannot be looked for, and forward-mode AD "
                 "would not run them; use 'revrev' or 'auto' for the nested call")
_UNDER_PROFILER = ("Invalid hvp: 'fwdrev' cannot look for hooks on graph nodes under a profiler "
                   "(sys.setprofile: cProfile, torch.profiler with with_stack=True), and forward-mode "
                   "AD would not run them; use 'revrev' or 'auto', or run without the profiler")


def check_fwdrev_task(problem: Problem, support: Any, K: int) -> None:
    """Refuse per-task forward-over-reverse where its HVP would differentiate another
    function than the step: attention with dropout (the step runs under autograd and
    its HVP under ``torch.func``, whose attention kernels draw different masks; a
    vectorised sweep runs both under ``torch.func`` and is consistent), a generator of
    the loss's own, a loss that differentiates, what the probe's look finds
    (:meth:`~torch_ufom.vectorised.Probe.fwdrev_obstacle`) or cannot look for (hooks
    on graph nodes under a profiler); then the numeric backstop."""
    if problem.hvp != "fwdrev":
        return
    if sys.getprofile() is not None:  # every task alike, whatever its K
        raise ValueError(_UNDER_A_LOOK if under_a_look() else _UNDER_PROFILER)
    buffers = next(problem.model.buffers(), None) is not None
    if K == 0 and not buffers:  # no HVP
        return
    batches = probe_batches(support, problem.config.steps)
    found = probe_steps(problem.model, problem.inner_loss, batches, adapted=problem.config.adapted)
    if found.written:  # (every task alike, whatever its K, as when resolve_hvp refused any buffer)
        raise ValueError(_writes_buffers(found.written))
    if K == 0:
        return
    if found.attention_dropout:
        raise ValueError("Invalid hvp: 'fwdrev' cannot run attention with dropout per task "
                         "(torch.func draws other masks than the step that ran, so it would "
                         "differentiate another function); use 'revrev' or 'auto'")
    if found.own_generator:
        raise ValueError("Invalid hvp: 'fwdrev' cannot run a loss that draws from a torch.Generator "
                         "of its own (generator=...): its HVP evaluates the loss again, drawing "
                         "other numbers, so it would differentiate another function; use 'revrev'")
    if found.differentiates:
        raise ValueError("Invalid hvp: 'fwdrev' cannot run a loss that calls torch.autograd.grad or "
                         "backward (a PINN's du/dx, a gradient penalty): torch.func.jvp does not see "
                         "through it; use 'revrev' or 'auto'")
    why = found.fwdrev_obstacle()
    if why:
        raise ValueError(f"Invalid hvp: 'fwdrev' {why}; use 'revrev' or 'auto'")
    if found.hooks_unseen:  # (a profiler the loss runs itself)
        raise ValueError(_UNDER_PROFILER)
    check_fwdrev_reads(problem, batches)
    check_fwdrev_agrees(problem, support, K == problem.config.steps)


def fwdrev_disagreement(problem: Problem, support: Any, step_one: bool = True) -> str:
    """The backstop of the probe's look at what a loss calls (stop-gradients, custom
    Functions, hooks, normalisations): one Hessian-vector product of the first step's
    inner loss at the module's parameters, in a direction drawn from a generator of its
    own (zero where the step's gradient is zero), by forward-over-reverse as a sweep takes
    it, which a per-task loop compares with reverse mode's (:class:`FwdRevDisagrees`).
    Why forward-over-reverse would differentiate another function (``""``: the two
    agree); a :class:`FwdRevError` where fwdrev fails, if the sweep differentiates the
    first step (``step_one``; else ``""``: a per-task sweep compares its own first HVP with
    reverse mode's, review s37R5 F1: a truncated sweep that never reaches step 1 was refused).
    ``support``: one task's support batch (or per-step batches)."""
    loop = InnerLoop(problem, PerTask(), support, None, 0, True)
    with loop.streams():
        state = loop.initial_state()
        if not state.params or any(p.is_complex() for p in state.params):
            return ""  # (a complex HVP's convention is not checked here)
        _, _, grads = loop.advance(state, 1)
        if any(g is not None and g.layout != torch.strided for g in grads):  # (review HB F6: an
            return SPARSE_FWDREV  # F.embedding(..., sparse=True) the module-type check does not see)
        # Where the gradient is zero by construction (Embedding's padding row) autograd's
        # derivatives are not symmetric; the sweep's vectors are zero there as well.
        # Drawn from the global generator, reseeded (streams() puts it back): a generator of the
        # library's own would be one of the user's to an enclosing call's look (review s35B F2).
        torch.default_generator.manual_seed(0)
        vec = tuple(torch.randn(p.shape, dtype=p.dtype, device="cpu").to(p.device) * (g != 0)
                    for p, g in zip(state.params, grads))
        try:
            loop.hessian_vector(state, 1, vec)  # (its loss: the look does not compare it)
        except FwdRevError:  # (review s37LK F1: taken for agreement, a failure here once let a wrong
            if step_one:  # vmapped sweep run)
                raise
            return ""
        except FwdRevDisagrees as err:
            return err.why
    return ""


def check_fwdrev_agrees(problem: Problem, support: Any, step_one: bool = True) -> None:
    """Refuse forward-over-reverse where :func:`fwdrev_disagreement` finds a reason."""
    why = fwdrev_disagreement(problem, support, step_one)
    if why:
        raise ValueError(f"Invalid hvp: 'fwdrev' {why}; use 'revrev' or 'auto'")


def check_fwdrev_reads(problem: Problem, batches: Sequence[Any]) -> None:
    """Refuse forward-over-reverse when the inner loss reads a meta-parameter directly:
    its HVP differentiates the inner gradient with respect to the adapted parameters
    only, and would drop that mixed second derivative."""
    try:
        reads = loss_reads_meta(problem, batches)
    except LookFailed as err:  # (review s37R4 F1: taken for "not read", fwdrev dropped a direct read)
        raise err.__cause__ from None  # the loss's own error, raised where the look ran it
    if reads:
        raise ValueError(f"Invalid hvp: 'fwdrev' {READS_META}; use 'revrev' or 'auto'")


def loss_reads_meta(problem: Problem, batches: Sequence[Any]) -> bool:
    """Whether the inner loss reads a meta-parameter directly on any of ``batches`` (every
    step's with per-step batches, :func:`probe_batches`: a loss may read it at later steps
    only, review s34M F1: 8-32 % off where the first step's batch stood for all)."""
    return any(reads_meta_directly(problem.model, problem.inner_loss, batch, problem.params,
                                   problem.config.adapted) for batch in batches)


def _writes_buffers(names: Sequence[str]) -> str:
    """Why explicit forward-over-reverse refuses a module whose losses write ``names``."""
    return (f"Invalid hvp: 'fwdrev' needs a module whose losses write no buffers (they write "
            f"{', '.join(names)}, which a forward inside torch.func.jvp would write again: running "
            "statistics in train() mode, the legacy spectral_norm's vectors; buffers only read, such as "
            "a positional encoding, are constants); use 'revrev' or 'auto'")


READS_META = ("cannot differentiate an inner loss that reads a meta-parameter directly "
              "(model.parameters(), model(x) or a captured tensor rather than fmodel): it drops "
              "that mixed second derivative")


def task_aux(aux: Any, i: int) -> Any:
    """Task ``i``'s entry of a vectorised group's stacked aux, copied (a view would keep the
    whole group's)."""
    return None if aux is None else pytree.tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t,
                                                    task_of(aux, i))


def sum_grads(run: BatchRun, count: int) -> List[Optional[Tensor]]:
    """The sum over a meta-batch's groups of their hypergradients (``count`` tensors)."""
    total: List[Optional[Tensor]] = [None] * count
    for _, est, _ in run.groups:
        for i, g in enumerate(est.grads):
            if g is not None:
                total[i] = g if total[i] is None else plus(total[i], g)
    return total


def buffer_names(model: nn.Module) -> Dict[int, str]:
    """The name of each buffer of ``model``, by the tensor's ``id`` (none is also a parameter:
    :func:`~torch_ufom.config.check_model`, which every caller's ``resolve`` ran first, refuses
    such a model)."""
    return {id(b): n for n, b in model.named_buffers()}


def learned_buffer_message(name: str) -> str:
    """Why a buffer of the model cannot be a meta-parameter (review GA F1: its hypergradient
    read 0 or ``None``, silently, on every path)."""
    return (f"the model's buffer {name!r}, which the library copies for each inner step and task "
            "and reads as a constant, so its hypergradient would be silently 0 (expected the "
            "model's parameters or tensors outside it: make it a parameter, nn.Parameter or "
            "register_parameter, to meta-learn it)")


def check_derived_buffers(model: nn.Module, meta: Sequence[Tensor], what: str = "params") -> None:
    """Refuse a buffer of ``model`` computed from a meta-parameter (``softplus(raw)``
    registered as a buffer: its graph reaches one of ``meta``): the library copies buffers
    for each inner step and task as constants, so that meta-parameter's hypergradient
    through it would be silently 0 (review s34M F2). Buffers that carry no graph, nearly
    all, cost one attribute read each."""
    derived = [(n, b) for n, b in model.named_buffers() if b.grad_fn is not None]
    if not derived:
        return
    targets = {id(t) for t in meta if t.requires_grad} | {id(t._base) for t in meta if t._base is not None}
    for name, b in derived:
        if graph_reaches([b.grad_fn], targets):
            raise ValueError(
                f"Invalid model: its buffer {name!r} was computed from one of {what}, but the library "
                "copies buffers for each inner step and task and reads them as constants, so that "
                "tensor's hypergradient through the buffer would be silently 0 (detach it where the value "
                "is only recorded; to learn through it, compute it in forward from the tensor, or make it "
                "a parameter of the module)")


def check_params(params, model: nn.Module) -> Tuple[Tensor, ...]:
    """Validate ``params`` (default: the model's floating-point parameters, frozen ones
    included, which get zeros; a frozen integer or complex one has no gradient and is left
    out): distinct floating-point tensors, each requiring grad when given, none a view of a
    module parameter (review s34Q F1: ``W[0]`` read 0: the inner loop reads ``W``, never
    the view)."""
    given = params is not None
    names: Dict[int, str] = {}
    if not given:
        named = [(n, p) for n, p in model.named_parameters() if p.is_floating_point() or p.requires_grad]
        params, names = [p for _, p in named], {id(p): n for n, p in named}
    if isinstance(params, Tensor) or not isinstance(params, (list, tuple)) and \
            not hasattr(params, "__iter__"):
        raise TypeError(f"Invalid params: expected a sequence of tensors, got {type(params).__name__}")
    params = list(params)
    if given and not params:
        raise ValueError("Invalid params: empty (expected the tensors to differentiate with respect "
                         "to; torch.autograd.grad refuses empty inputs too)")
    seen, buffers = set(), buffer_names(model)
    own = {id(p): n for n, p in model.named_parameters()}
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"Invalid params[{i}]: expected a tensor, got {type(p).__name__}")
        if id(p) in buffers:
            raise ValueError(f"Invalid params[{i}]: {learned_buffer_message(buffers[id(p)])}")
        if not p.is_floating_point():
            if not given:  # (the default params: name the model's parameter)
                raise ValueError(
                    f"Invalid model: its parameter {names[id(p)]!r} is a {p.dtype} tensor that requires "
                    "grad, which params (not given: the model's floating-point parameters and those "
                    "that require grad) would hold; hypergrad differentiates real floating-point "
                    "tensors only: pass params= without it, or set its requires_grad=False")
            raise ValueError(f"Invalid params[{i}]: a {p.dtype} tensor (expected real floating-point "
                             "tensors; integer tensors have no gradient, complex ones are not supported)")
        if id(p) in seen:
            raise ValueError(f"Invalid params[{i}]: the same tensor appears twice in params")
        if given and not p.requires_grad:
            raise ValueError(f"Invalid params[{i}]: a tensor that does not require grad, whose "
                             "hypergradient would read 0 (torch.autograd.grad refuses it too: set "
                             "requires_grad=True to learn it, or leave it out)")
        if p._base is not None and id(root_of(p)) in own:
            raise ValueError(f"Invalid params[{i}]: a view of the model's parameter {own[id(root_of(p))]!r} "
                             "(as W[0] or W.view(-1)), which the inner loop never reads (it reads the "
                             "parameter), so its hypergradient would read 0; pass the parameter and index "
                             "the result")
        seen.add(id(p))
    return tuple(params)


def functional_problem(model: nn.Module, losses: Tuple[Callable, Callable], config: Config, params,
                       generator) -> Problem:
    """Check the arguments of a functional entry point (:func:`hypergrad`,
    :func:`hypergrad_batch`, :func:`~torch_ufom.diagnose`) beside its resolved ``config``
    and bind them: the losses, the generator, then ``params`` (default: see
    :func:`check_params`), so that of several wrong arguments the first in this order is
    named; then :func:`bind_problem`. The caller resolves ``config`` first (its errors
    come before these), and checks its own arguments in between."""
    check_losses(*losses, model)
    check_generator(generator)
    return bind_problem(model, losses, config, config.law, check_params(params, model), generator)


def bind_problem(model: nn.Module, losses: Tuple[Callable, Callable], config: Config, law: TruncationLaw,
                 meta: Tuple[Tensor, ...], generator: Optional[torch.Generator], what: str = "params",
                 keeps_aux: bool = False) -> Problem:
    """The :class:`Problem` of one call from arguments already checked, shared by the
    functional entry points and ``MetaOptimizer``: refuse a buffer computed from one of
    ``meta`` (named as ``what`` in the message: :func:`check_derived_buffers`), pick the
    Hessian-vector product (:func:`resolve_hvp`), and read ``law`` once for
    ``config.steps`` (a :class:`~torch_ufom.truncation.Snapshot`, which every task of the
    call draws from and is weighted by), in this order. ``keeps_aux``: the outer loss's
    aux is kept (``MetaResult.aux``)."""
    check_derived_buffers(model, meta, what)
    hvp = resolve_hvp(config, model, meta)
    return Problem(model, losses[0], losses[1], config, Snapshot(law, config.steps), meta, hvp, generator,
                   keeps_aux)


@one_call_at_a_time
def hypergrad_batch(model: nn.Module, inner_loss: Callable, outer_loss: Callable, supports: Any,
                    queries: Any, *, steps: int, inner_lr: InnerLR = None, mode: Optional[str] = None,
                    q: float = 0.1, memory: str = "checkpoint", slots: Optional[int] = None,
                    max_memory: Optional[int] = None, params: Optional[Sequence[Tensor]] = None,
                    generator: Optional[torch.Generator] = None, inner: Optional[InnerRule] = None,
                    truncation: Optional[TruncationLaw] = None, k: Optional[int] = None,
                    hvp: str = "auto", force_truncation: Union[int, Sequence[int], None] = None,
                    inner_params: InnerParams = None, vectorise: Vectorise = "auto") -> Tuple[Tensor, ...]:
    """The summed hypergradient estimates of a meta-batch of tasks, vectorised.

    The batched twin of :func:`hypergrad`: ``supports`` and ``queries`` are a
    tensor, a tuple/list or a dict of tensors whose first dimension indexes the
    tasks (one support batch per task, reused at every inner step; wrap
    per-step stacked batches in :class:`~torch_ufom.StepBatches`). The result
    equals the sum of :func:`hypergrad` over the tasks with the same draws
    (random operations inside the losses, such as dropout, draw other numbers
    under ``vmap`` than in the loop); it is computed by ``torch.func.vmap``
    over the tasks, one group per drawn truncation point, or by the per-task
    loop: by choice (``vectorise``), or with a warning that says why where vectorising would not be exact,
    or where a loss raised during the look that decides it (see :func:`estimate_batch`).
    The losses see one task's batch, as in :func:`hypergrad`.

    Args:
        supports, queries: the stacked tasks.
        force_truncation: ``None`` (draw), an int for every task, or one int per task
            (as for :meth:`~torch_ufom.MetaOptimizer.backward`: the estimate at that ``K``
            with the law's weights, which needs ``P(K >= K_forced) > 0``).
        vectorise: ``"auto"`` (default: ``vmap``, except on a CPU for tasks
            with 65,536 adapted parameters or more, or whose inner loss runs a
            convolution or ``batch_norm`` with that many output elements,
            where the per-task loop is faster, and there for groups of tasks
            that drew the same ``K`` too small to pay: every group when none
            reaches ``torch_ufom.vectorised.FEWEST_TASKS_ON_CPU``, else those
            below ``FEWEST_TASKS_BESIDE_ON_CPU``), ``True`` (``vmap`` wherever
            it is exact) or ``False`` (the per-task loop, without a warning).
        model, inner_loss, outer_loss, steps, inner_lr, inner, mode, q, k,
        truncation, memory, slots, max_memory, hvp, params, generator, inner_params:
            as for :func:`hypergrad`.

    Raises:
        TypeError: a meta-batch entry that is not a tensor (the message names it);
            nothing is changed.
        ValueError: an invalid argument, e.g. tensors whose leading sizes differ
            (the message names the entry); nothing is changed.
        FloatingPointError: a non-finite loss or hypergradient in any task.
        RuntimeError: as :func:`hypergrad`.
    """
    settings = Settings(steps, inner_lr, inner, mode, q, k, truncation, memory=memory, slots=slots,
                        max_memory=max_memory, hvp=hvp, inner_params=inner_params,
                        vectorise=vectorise)
    problem = functional_problem(model, (inner_loss, outer_loss), resolve(settings, model, "hypergrad_batch"),
                                 params, generator)
    with restore_rng_on_error(problem.generator):  # (the warning raised as an error too: review s37B F1)
        run = estimate_batch(problem, supports, queries, force_truncation)
        if run.fallback:
            warnings.warn(f"hypergrad_batch runs the per-task loop: {run.reason}", stacklevel=caller_level())
    total = sum_grads(run, len(problem.params))
    return tuple(torch.zeros_like(p) if g is None else g for p, g in zip(problem.params, total))


@one_call_at_a_time
def hypergrad(model: nn.Module, inner_loss: Callable, outer_loss: Callable, support: Any,
              query: Any, *, steps: int, inner_lr: InnerLR = None, mode: Optional[str] = None, q: float = 0.1,
              memory: str = "checkpoint", slots: Optional[int] = None,
              max_memory: Optional[int] = None, params: Optional[Sequence[Tensor]] = None,
              generator: Optional[torch.Generator] = None, inner: Optional[InnerRule] = None,
              truncation: Optional[TruncationLaw] = None, k: Optional[int] = None,
              hvp: str = "auto", force_truncation: Optional[int] = None,
              inner_params: InnerParams = None) -> Tuple[Tensor, ...]:
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
        support: one batch reused at every step (a tensor, a tuple or list such
            as ``[x, y]``, a dict), per-step batches as
            :class:`~torch_ufom.StepBatches`, or a callable ``j -> batch`` for
            ``j = 0..steps-1``.
        query: the outer loss's batch.
        steps: number of inner steps ``r >= 1`` (required).
        inner_lr: the inner SGD learning rate: a float, a scalar tensor, or a
            dict from parameter name to tensor (a tensor has its parameters'
            dtype and device), or a :class:`~torch_ufom.inner.PerStep`. Tensors
            among ``params`` are learned.
        mode: ``"fom"`` (first-order, ``G_0``), ``"ufom"`` (the default:
            ``G_0 + (xi/q)(G_r - G_0)``, ``xi ~ Bernoulli(q)``: unbiased),
            ``"exact"`` (``G_r``) or ``"truncated"`` (``G_k``: exact through the
            last ``k`` steps; biased). Not together with ``truncation``; ``None``
            (the default) is ``"ufom"``, or the law ``truncation`` gives.
        q: probability of the exact branch for ``"ufom"``, in ``(0, 1]``;
            checked but unused by the other modes.
        memory: how the exact sweep over the last ``K`` steps gets its states:
            ``"checkpoint"`` (default: within the byte budget ``max_memory``,
            every step's graph when they fit, else binomial checkpointing with
            as many stored states as fit, about ``K log K`` replayed steps;
            memory constant in ``steps``), ``"recompute"`` (the paper's
            scheme: one stored state, ``K (K - 1) / 2`` replayed steps) or
            ``"store"`` (every step's graph: ``O(K)`` memory, no replay).
        slots: ``None`` (default: sized by ``max_memory``) or a fixed number of
            stored states for ``memory="checkpoint"`` (a sweep of at most
            ``slots`` steps then keeps every graph). Not with ``max_memory``.
            Accepted and unused under the other ``memory`` settings, as is ``max_memory``.
        max_memory: the byte budget of ``memory="checkpoint"`` with
            ``slots=None``: an int, or ``None`` (default) for
            ``128 (G + N + |s|) + W``, where the sweep's first step measures
            ``G`` (the bytes its graph keeps), ``N`` (1 KB per node of it, on a
            CPU) and ``|s|`` (one inner state), and ``W = 3.5 G + 2 N + 16 |s| + 4.5 H``
            (``H``: under ``hvp="fwdrev"`` with a ``max_memory`` given, the bytes of the
            step's gradient graph, measured by evaluating it once more):
            every graph is kept up to 128 steps (unmeasured), longer sweeps checkpoint with
            ``128 (G + N + |s|) / (1.35 |s|)``
            slots (see ``docs/maths.md#costs-and-memory-of-each-schedule``).
        params: tensors to differentiate with respect to (default: the model's
            parameters, a frozen one getting zeros; a frozen integer or complex one,
            which has no gradient, left out). Any tensor the losses or
            ``inner_lr`` use may be included; each must require grad, as for
            ``torch.autograd.grad``. A view of a model parameter (``W[0]``) is
            refused (the inner loop reads ``W``: pass it and index the result); a
            view of another tensor gets what flows through that very object, as
            with ``torch.autograd.grad``: zeros for a new ``lrs[:1]`` that nothing
            computed from (pass ``lrs`` itself).
        generator: a ``torch.Generator`` for the truncation draw and the
            per-step random streams (default: the global generator).
        inner: an inner rule from :mod:`torch_ufom.inner` instead of ``inner_lr``.
        truncation: a law from :mod:`torch_ufom.truncation`, instead of ``mode``.
        k: the truncation point of ``mode="truncated"`` (an error with other modes).
        hvp: Hessian-vector products of the exact sweep: ``"auto"`` (default),
            ``"fwdrev"`` (forward-over-reverse, ``torch.func.jvp`` of the
            gradient) or ``"revrev"`` (reverse-over-reverse, double backward);
            see :func:`resolve_hvp`. :func:`hypergrad_batch` runs a vectorised
            meta-batch of normalisation layers forward-over-reverse whatever this
            says (``vmap`` differentiates them twice wrongly; checked against the
            first task); ``vectorise=False`` keeps reverse-over-reverse.
        force_truncation: use this ``K`` instead of drawing it (tests and
            diagnostics; the weights stay those of the law): as for
            :meth:`~torch_ufom.MetaOptimizer.backward`, a ``K`` the law never
            draws is accepted where ``P(K >= K_forced) > 0`` (``mode="exact"``
            with ``force_truncation=2`` returns ``G_2``).
        inner_params: the parameters the inner loop adapts (names, a
            predicate on the name, or the parameters; default every parameter
            with ``requires_grad``); the others keep their module values.
            ``params`` still chooses which tensors get a hypergradient.

    Returns:
        A tuple with one tensor per entry of ``params``: zeros where the
        estimate does not reach a tensor (one the losses do not read; under
        ``mode="fom"``, also one that the inner loop reads but does not adapt,
        such as a weight-decay strength in the inner loss: the first-order
        estimate ignores how the inner loop depends on it).

    Raises:
        TypeError, ValueError: an invalid argument (nothing is changed).
        FloatingPointError: a non-finite loss (forward pass, replay or rebuild)
            or hypergradient; ``generator`` and torch's global generator are
            restored, so a retry reproduces (a loss that draws from NumPy's or
            Python's global generator has advanced it: reseed it before a retry).
        RuntimeError: the sweep cannot be exact (a ``@once_differentiable``
            Function, an embedding with ``scale_grad_by_freq=True``, a loss that
            gives another value when a step is evaluated again or draws from a
            ``torch.Generator`` of its own there, a failure inside
            forward-over-reverse); nothing is changed.
    """
    settings = Settings(steps, inner_lr, inner, mode, q, k, truncation, memory=memory, slots=slots,
                        max_memory=max_memory, hvp=hvp, inner_params=inner_params)
    problem = functional_problem(model, (inner_loss, outer_loss), resolve(settings, model, "hypergrad"),
                                 params, generator)
    est = estimate_task(problem, support, query, force_truncation)
    return tuple(torch.zeros_like(p) if g is None else g for p, g in zip(problem.params, est.grads))
