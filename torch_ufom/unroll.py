"""The inner loop as a pure step function of an explicit state.

:class:`InnerLoop` binds the user's module, losses, batches and inner rule.
Its inner state is ``State(params, opt, buffers)``; the differentiable part is
``params + opt``. Two step functions share one body:

* :meth:`InnerLoop.advance` computes ``s_j`` from ``s_{j-1}`` without a graph
  (replays, and the forward pass of the steps a sweep records);
  :meth:`InnerLoop.forward` runs the first steps, those no reverse sweep
  revisits, as one loop (in place for plain SGD);
* :meth:`InnerLoop.record` rebuilds step ``j`` with a graph, kept as a
  :class:`~torch_ufom.records.StepRecord` that gives the vector-Jacobian
  products of the exact rule ``F_j`` and of the first-order rule ``F~_j`` (the
  inner gradient held constant).

Every step ``j`` runs its losses under its own random stream, seeded from one
base seed and ``j``, so that dropout replays bit-identically whenever a step is
recomputed; the global random state is saved once around a whole run
(:meth:`InnerLoop.streams`) and restored after it.

The module is evaluated at the inner parameters by swapping its parameter and
buffer entries (:class:`~torch_ufom.functional_model.Reparametrization`, found in
the loop's one walk of the module) rather than by ``torch.func.functional_call``
at every step, and plain SGD at a plain-number rate is applied with foreach
kernels (:func:`~torch_ufom.inner.plain_update`): the same operations as the
general path, bit for bit (``tests/test_fastpath.py``).

The module holds, in this order (a map for readers; each part's contract is in
its docstrings): the looks for a loss that differentiates (:class:`Differentiates`);
:class:`PerTask`, one task's evaluator; :class:`InnerLoop`. What the loop uses around
it lives beside it:

* :mod:`torch_ufom.protocols`: the :class:`~torch_ufom.protocols.State`, the
  :class:`~torch_ufom.protocols.Problem` a call binds, the
  :class:`~torch_ufom.protocols.SweepPlan` of a sweep, and the ``Evaluator`` and
  ``Loop`` protocols (:class:`PerTask` and :class:`InnerLoop` implement them);
* :mod:`torch_ufom.process`: the process lock, the ``torch.compile`` guard, the
  transform level;
* :mod:`torch_ufom.randomness`: saving and restoring the random generators, the
  watch for draws from a generator of the user's;
* :mod:`torch_ufom.functional_model`: :class:`~torch_ufom.FunctionalModel` and
  the swap machinery;
* :mod:`torch_ufom.batches`: the steps' batches;
* :mod:`torch_ufom.losses`: the losses' checks and what a kept aux may hold;
* :mod:`torch_ufom.graphs`: the looks at autograd graphs;
* :mod:`torch_ufom.rule_checks`: the checks of an inner rule's results;
* :mod:`torch_ufom.fwdrev`: forward-over-reverse's errors and its check against
  reverse mode;
* :mod:`torch_ufom.records`: the :class:`~torch_ufom.records.StepRecord` a sweep
  keeps per step and the VJPs through it.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import warnings
import weakref
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .batches import SAMPLES_ANEW, StepBatches, batch_getter, per_step_batches
from .functional_model import (FunctionalModel, Reparametrization, renormalises_weights, sparse_weights,
                               take_assigned_none_buffers)
from .fwdrev import FWDREV_DRAWS, FwdRevCannot, FwdRevDisagrees, fwdrev_error, hvp_disagreement, jvp
from .graphs import (check_twice_differentiable, graph_nodes, graph_reaches, look_at_graph,
                     recomputes_message, sequence_marker)
from .inner import plain_update, shortcut
from .losses import check_kept_aux, detached, loss_and_aux
from .process import caller_level, current_level, fullgraph_refused, process_lock
from .protocols import Evaluator, Problem, State, SweepPlan
from .randomness import (OwnDraws, cuda_devices_in_use, host_random_states, states_differ,
                         torch_random_states, torch_random_states_kept)
from .records import StepRecord, Unchain, second_derivatives
from .rule_checks import (checked_init, checked_rule_state, checked_update, detached_update, elementwise_rule,
                          inplace_update, library_code, rule_reads_meta, versions, written_argument)

__all__ = ["PerTask", "InnerLoop", "AUTOGRAD_CALLS", "from_torch_func", "note_probed", "probed_ids",
           "reads_nothing", "watched_loss", "Differentiates"]


# A loss that differentiates inside itself (a PINN's du/dx, a gradient penalty): under
# torch.func.vmap, torch.autograd.grad does not see the tensors outside the transform (a
# frozen body: allow_unused gives None, silently), and in a sweep that chains the exact
# steps' graphs its derivatives would run back through the earlier steps.
AUTOGRAD_CALLS = frozenset({torch.autograd.grad, torch.autograd.backward, Tensor.backward})


def reads_nothing(which: str) -> str:
    """The warning for a loss (``which``: ``"inner_loss"`` or ``"outer_loss"``) that reads
    none of the adapted parameters: most likely one that calls the module itself."""
    return (f"{which} reads none of the adapted parameters: it must evaluate the model it is given "
            "(fmodel(x)), not the module itself (net(x)), whose parameters the inner loop never "
            "changes; as it stands " + ("the inner loop adapts nothing" if which == "inner_loss"
                                         else "nothing the inner loop does reaches it"))


COMPILED_REPLAY = (
    "inner_loss runs a function compiled with torch.compile(fullgraph=True), which cannot run under "
    "the torch-function mode that looks, in the first step evaluated again, for draws from a "
    "torch.Generator of your own (no step's random stream replays those): pass memory='store', "
    "which evaluates each step once, or compile without fullgraph=True")
COMPILED_WATCHED = (
    "inner_loss runs a function compiled with torch.compile(fullgraph=True), which cannot run under "
    "the torch-function mode that looks, in the first step an exact sweep differentiates, for "
    "calls of torch.autograd.grad (a gradient penalty chains the steps otherwise): compile without "
    "fullgraph=True, or use mode='fom' task by task (hypergrad, MetaOptimizer.backward)")


class Differentiates(TorchFunctionMode):
    """Notes whether the code run under it calls :data:`AUTOGRAD_CALLS` (``found``) at
    the ``torch.func`` transform level ``level`` (``None``: outside every transform;
    :func:`current_level` inside the library's own transform: a loss that calls
    ``torch.autograd.grad`` itself, where one written with ``torch.func.grad`` calls it
    one level deeper)."""

    def __init__(self, level: Optional[int] = None):
        super().__init__()
        self.found, self.level = False, level

    @functools.partial(torch.compiler.disable, recursive=False)  # (as OwnDraws's; review IC F1)
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in AUTOGRAD_CALLS and current_level() == self.level and not from_torch_func():
            self.found = True
        return func(*args, **(kwargs or {}))


_AUTOGRAD_MODULES = ("torch.overrides", "torch.autograd", "torch._tensor")


def from_torch_func() -> bool:
    """Whether the :data:`AUTOGRAD_CALLS` call being handled by a ``TorchFunctionMode``
    comes from ``torch.func``'s own code: ``torch.func.vjp``'s pull-back calls
    ``torch.autograd.grad`` after its transform level has exited, a differentiation
    ``torch.func`` runs (and nests) as it runs ``torch.func.grad``'s."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name != __name__ and not name.startswith(_AUTOGRAD_MODULES) and name != "torch_ufom.vectorised":
            return name.startswith("torch._functorch")
        frame = frame.f_back
    return False


class DifferentiatesUnderTransform(RuntimeError):
    """A loss called ``torch.autograd.grad`` or ``backward`` inside the library's own
    ``torch.func`` transform (found at a later step of per-step batches, where the look
    at the first step saw none): under ``vmap`` it does not see the tensors outside the
    transform, and forward-over-reverse does not see through it. Meta-batches run the
    per-task loop instead."""


def watched_loss(loop: "InnerLoop", fm, batch):
    """``loop.inner_loss(fm, batch)`` inside one of the library's ``torch.func``
    transforms, watched for :data:`AUTOGRAD_CALLS` where the batches are per step
    (``loop.per_step``; with one batch for every step the look at the first step
    stands for all): :class:`DifferentiatesUnderTransform` if the loss makes one."""
    if not loop.per_step:
        return loop.inner_loss(fm, batch)
    watch = Differentiates(current_level())
    with watch:
        out = loop.inner_loss(fm, batch)
    if watch.found:
        raise DifferentiatesUnderTransform(
            "a loss calls torch.autograd.grad or backward at a later step (a PINN's du/dx, a gradient "
            "penalty), which torch.func does not see through: run it per task with hvp='revrev'")
    return out


_NONE_TYPE = type(None)  # (PerTask.grad: a gradient autograd.grad left None)


class PerTask:
    """The :class:`Evaluator` of one task: ``torch.autograd`` on the losses."""

    def stack(self, params):
        """The initial adapted parameters: the module's own (:meth:`Evaluator.stack`)."""
        return params

    def grad(self, loop, state, batch, create_graph, fmodel=None):
        """``(loss, grads, buffers)`` of one task's inner loss by autograd (:meth:`Evaluator.grad`)."""
        fm = loop.fmodel(state.params, state.buffers) if fmodel is None else fmodel
        loss = loop.inner_loss(fm, batch)
        # A plain tensor that is a real 0-d loss with a graph passes at the cost of four attribute
        # reads; anything else (an aux, a subclass, an error to raise) takes the full check.
        if not (type(loss) is Tensor and loss.requires_grad and loss.dim() == 0
                and loss.dtype.is_floating_point and not loss.is_meta):
            loss, _ = loss_and_aux(loss, "inner_loss")  # the inner aux is dropped
        if not loop.recompute_checked:
            loop.check_recomputation(loss, state.params)
        if not loop.carried_checked:
            loop.check_carried(loss, state.params)
        if create_graph:
            loop.check_twice_differentiable(loss, state.params)
        grads = torch.autograd.grad(loss, state.params, create_graph=create_graph, allow_unused=True)
        if _NONE_TYPE in map(type, grads):
            loop.note_unread(frozenset(i for i, g in enumerate(grads) if g is None))
            grads = tuple(torch.zeros_like(p) if g is None else g for p, g in zip(state.params, grads))
        elif loop.unread is None or loop.unread:  # (once a step read every parameter, nothing to note)
            loop.note_unread(_NOTHING)
        # Buffers are not differentiated: one the forward wrote with a graph (an update
        # without no_grad) must not carry it into the next step.
        return loss, grads, tuple(fm.buffers[n].detach() for n in loop.buffer_names) if fm.buffers else ()

    def hvp(self, loop, state, batch, vec):
        """``(H v, loss)`` of one task's inner loss by ``torch.func.jvp`` of its gradient
        (:meth:`Evaluator.hvp`)."""
        def loss_of(ps):
            loss = loss_and_aux(watched_loss(loop, loop.fmodel(ps, state.buffers), batch), "inner_loss")[0]
            return loss, loss

        try:
            _, hv, loss = jvp(torch.func.grad(loss_of, has_aux=True), (state.params,), (vec,), has_aux=True)
            return hv, loss
        except DifferentiatesUnderTransform:
            raise ValueError("Invalid hvp: 'fwdrev' cannot run a loss that calls torch.autograd.grad or "
                             "backward (here at a later step: a PINN's du/dx, a gradient penalty): "
                             "torch.func.jvp does not see through it; use 'revrev' or 'auto'") from None

    def outer(self, loop, params, state):
        """One task's outer loss, aux, gradient and buffers (:meth:`Evaluator.outer`)."""
        fm = loop.fmodel(params, state.buffers)
        out = loop.outer_loss(fm, loop.query)
        loss, aux = loss_and_aux(out, "outer_loss")
        if loop.keeps_aux:  # (before any gradient, whose hooks would run: review s39R3 F2, s39R4 F1)
            check_kept_aux(aux)
        # (an outer loss that is the inner loss, whose first step was looked at for checkpointed
        # parts: only the cheap look for graphs made before the call, which the query may carry)
        if loss.grad_fn is not None and loop.outer_loss is not loop.inner_loss:
            loop.check_outer_graph(loss, params)
        else:  # (review GD F1)
            loop.retains(loss, params)
        if not loop.carried_checked:
            loop.check_carried(loss, params, outer=True)
        elif loop.watch_leaves and (loop.kept_leaves or PROBED):
            loop.check_left_behind(loss, params)
        grads = torch.autograd.grad(loss, params + tuple(loop.meta), allow_unused=True,
                                    retain_graph=loop.retain)
        return loss, aux, grads, tuple(fm.buffers[n].detach() for n in loop.buffer_names) if fm.buffers \
            else state.buffers

    def reduce(self, adjoint):
        """One task: the adjoint as it is (:meth:`Evaluator.reduce`)."""
        return adjoint


# The parameter copies a probe evaluated the losses at (vectorised.probe), while a tensor the
# losses kept holds them (a weak set: the others leave it at once). A loop that the probe then
# sends a meta-batch to must not read such a tensor: its graph reaches the probe's copies, which
# no step's own leaves are (review FF: a first-call memo in a global, 1.6e-1 off, silently).
PROBED: weakref.WeakSet = weakref.WeakSet()
_PROBED_LOCK = threading.Lock()  # (another thread's probe may add to it while a check reads it)


def _probed_after_fork() -> None:
    """A new ``_PROBED_LOCK`` in a forked child (:mod:`torch_ufom.process` says why)."""
    global _PROBED_LOCK
    _PROBED_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_probed_after_fork)


def note_probed(tensors) -> None:
    """Add a probe's parameter copies to :data:`PROBED`."""
    with _PROBED_LOCK:
        PROBED.update(tensors)


def probed_ids() -> set:
    """The ids of the tensors in :data:`PROBED` (a copy, taken under its lock: review FG)."""
    if not PROBED:
        return set()
    with _PROBED_LOCK:
        return {id(t) for t in PROBED}


def _carried_message(which: str) -> str:
    """The error of :meth:`InnerLoop.check_carried` and :meth:`InnerLoop.check_left_behind`."""
    return (f"{which} reads a tensor that an earlier evaluation of inner_loss left behind with its graph "
            "(a recurrent state or key-value cache the forward keeps in self, a weight memoised from the "
            "parameters): the library evaluates each inner step at its own parameters, so a step would "
            "read another step's and the hypergradient would be silently wrong; compute such state in "
            "every forward from what it is given (detach a state carried between calls, reset a memo "
            "before each evaluation)")


def _autocasting(params: Sequence[Tensor]) -> bool:
    """Whether an autocast region is open (enabled or not, at any depth) or autocast is on
    for the parameters' device. Autocast caches one low-precision copy of each leaf until
    the outermost region exits, so the loop's leaves must not be updated in place: a region
    the losses open themselves inside a disabled outer one keeps serving step 2's copies."""
    depth = torch.autocast_increment_nesting()
    torch.autocast_decrement_nesting()
    if depth > 1:
        return True
    try:
        return any(torch.is_autocast_enabled(kind) for kind in {p.device.type for p in params})
    except RuntimeError:  # a device type autocast does not know
        return False


_NOTHING: frozenset = frozenset()


_FLOAT64_EPS = torch.finfo(torch.float64).eps  # (the precision hint of FwdRevDisagrees)


class InnerLoop:
    """The inner loop of one task (or of a stacked meta-batch) as pure functions of
    an explicit state; immutable after construction, except ``densify`` (set by
    the first sparse gradient).

    Args:
        problem: the call's :class:`Problem`.
        evaluator: :class:`PerTask` or :class:`~torch_ufom.vectorised.Vectorised`.
        support: one batch, :class:`StepBatches`, or ``j -> batch``.
        query: the batch of the outer loss.
        seed: base seed of the per-step random streams.
        math_attention: run attention under the math kernel in every
            evaluation (forward, replays, rebuilds): set for sweeps that rebuild
            steps with a graph, since the fused kernels have no double backward
            and draw their dropout masks differently; for a module holding a
            recurrent layer (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``) cuDNN is off in
            them too (its RNN kernels have neither a double backward nor a
            forward-AD formula, and draw their inter-layer dropout from a state of
            their own; review s38CU F3): the process-wide flag, so the model's
            convolutions run without cuDNN there as well (review s38R2 F4).

    ``problem.hvp`` says how an exact reverse step gets its Hessian-vector
    product: ``"revrev"`` (the step is recorded with a graph of its inner
    gradient, ``create_graph=True``, and differentiated again) or ``"fwdrev"``
    (``torch.func.jvp`` of ``torch.func.grad`` of the inner loss; the step
    keeps no graph).
    """

    def __init__(self, problem: Problem, evaluator: Evaluator, support, query, seed: int,
                 math_attention: bool = False, hypergradient: bool = True):
        module, rule = problem.model, problem.config.rule
        self.module, self.evaluator, self.rule = module, evaluator, rule
        # Whether a hypergradient differentiates this loop's updates (adapt's: False): a rule of the user's
        # that writes into its arguments is refused then (review s38R8 F1: judged by `query`, a call
        # given query=None let such a write through, 0.41 off)
        self.hypergradient = hypergradient
        self.inner_loss, self.outer_loss, self.query = problem.inner_loss, problem.outer_loss, query
        self.differentiates = False  # the inner loss calls AUTOGRAD_CALLS (see _watched_grad)
        # The adapted parameters (indices into names) that no inner step's loss has read so
        # far (None: no step ran yet), and those the outer loss does not read (outer_vjp):
        # a parameter in both gets no gradient, as from loss.backward() (unread()).
        self.unread: Optional[frozenset] = None
        self.twice_checked = False  # check_twice_differentiable ran on a step with a graph
        self.recompute_checked = False  # check_recomputation ran on a step
        # Weak references to the parameters the first evaluation of the inner loss ran at, until a
        # later evaluation has been looked at (check_carried); then None, and carried_checked.
        self.first_params: Optional[Tuple[Any, ...]] = None
        self.carried_checked = False
        # The leaves that the steps at leaves of their own (advance, an unlinked record) ran at in an
        # exact sweep, while alive (a weak set: those nothing keeps leave it at once): the outer loss
        # must not read what a step left behind with its graph (check_left_behind).
        self.kept_leaves: weakref.WeakSet = weakref.WeakSet()
        self.watch_leaves = math_attention  # an exact sweep, until the outer loss was looked at
        # Buffers registered as None (named_buffers() skips them, so the library neither copies
        # nor puts them back): a forward that assigns one is refused (check_carried, review FB).
        self.none_buffers = tuple((sub, name) for sub in module.modules()
                                  for name, b in sub._buffers.items() if b is None)
        if self.none_buffers:  # (what a swap noted before this loop: another call's)
            take_assigned_none_buffers()
        self.hvp_checked = False  # a forward-over-reverse HVP was compared with reverse mode's
        self.hvp_watched: set = set()  # the keys of the HVP evaluations watched for draws (hessian_vector)
        library = library_code(rule)  # (asked once: it walks the rule's classes)
        self.own_rule = not library  # its update is looked at for a lost graph
        self.elementwise = library or elementwise_rule(rule)  # each parameter's update its own
        self.outer_unread: frozenset = _NOTHING
        self.steps, self.seed, self.hvp = problem.config.steps, seed, problem.hvp
        self.keeps_aux = problem.keeps_aux
        self.batch = batch_getter(support, self.steps)
        if isinstance(query, StepBatches):  # (review GA: the outer loss got the StepBatches object)
            raise TypeError("Invalid query: StepBatches (per-step batches are the support's; the outer "
                            "loss runs once, on one query batch)")
        # Per-step batches may make a loss differentiate at some steps only (record watches them).
        self.per_step = per_step_batches(support)
        self.step_function = self.per_step and not isinstance(support, StepBatches)
        named, self.module_buffers, self.swap = Reparametrization.layout(module)  # one walk per loop
        self.named = dict(named)  # the module's parameters by name
        self.names = list(problem.config.adapted)
        known = getattr(evaluator, "unread_names", None)  # a vectorised evaluator's probe
        if known is not None:
            self.unread = frozenset(i for i, n in enumerate(self.names) if n in known)
        # Parameters the inner loop does not adapt keep their module values (as
        # leaves: a meta-parameter among them gets its gradient through every step).
        # The adapted ones start from copies (initial_state): a forward may write its
        # parameters in place (a layer that clips its own weight). The others are the
        # module's own tensors, as when the module is called (a frozen backbone is not
        # copied per task), except where the forward is known to write them.
        self.frozen = {n: p for n, p in named if n not in set(self.names)}
        if renormalises_weights(module):
            with torch.enable_grad():  # a copy linked to the parameter, even under no_grad
                self.frozen = {n: p.clone() for n, p in self.frozen.items()}
        self.buffer_names = [n for n, _ in self.module_buffers]
        self.meta = [t for t in problem.params if t.requires_grad]
        self.learned_hyper = rule_reads_meta(rule, self.meta, {n: self.named[n] for n in self.names},
                                        problem.config.steps)
        self.cuda_devices = cuda_devices_in_use()
        self.math_attention = math_attention
        self.recurrent = math_attention and any(isinstance(m, nn.RNNBase) for m in module.modules())
        self.plain_rate = rule.plain_rate
        self.rule_checked = False  # its output's contract, checked at the first step (checked_update)
        # A sparse gradient (nn.Embedding(sparse=True)) goes through an additive rule's
        # p - lr g as it is; other rules mix it with dense tensors, which sparse ops refuse,
        # in their forward and in their backward (a sparse cotangent of the new parameters,
        # from the next step's or the outer loss's lookup). So the rule gets the gradients
        # dense, the outer loss's gradient is made dense, and the new parameters pass
        # through a copy whose backward makes their cotangent dense (densify): from the
        # first step where an adapted parameter is a sparse embedding's weight, else from
        # the first sparse gradient. Their hypergradients are then dense whatever K.
        self.dense_grads = not shortcut(rule, "first_order_additive")
        sparse = sparse_weights(module) if self.dense_grads else set()
        self.densify = any(id(self.named[n]) in sparse for n in self.names)
        # A graph made before this call that the losses read (a tensor the user computed from a
        # meta-parameter outside them: w = softplus(raw)) is differentiated through by every
        # backward of the call, so none may free it (retain; review GA F6): found by the
        # sequence numbers of its nodes, below the marker taken here (retains, _grad).
        self.marker, self.retain, self.retain_looked = sequence_marker(), False, False

    # -- state -----------------------------------------------------------------
    def initial_state(self, differentiated: bool = False) -> State:
        """``s_0``: the module's parameters, the rule's initial state, the module's buffers.
        ``differentiated``: for a hypergradient, which does not differentiate ``init``: a
        rule of the user's ``init`` is checked for a derivative it would drop
        (:func:`~torch_ufom.rule_checks.checked_init`)."""
        params = self.evaluator.stack(tuple(self.named[n].detach().clone() for n in self.names))
        if self.own_rule and differentiated:
            opt = checked_init(self.rule, self.names, self.named, self.meta, params)
        else:
            opt = self.rule.init(dict(zip(self.names, params)))
        if self.own_rule:
            opt = checked_rule_state(self.rule, opt, "init")
        buffers = tuple(b.detach() for _, b in self.module_buffers)
        return State(params, tuple(opt), buffers)

    def fmodel(self, params: Sequence[Tensor], buffers: Sequence[Tensor]) -> FunctionalModel:
        """A :class:`FunctionalModel` at ``params``, with fresh copies of ``buffers``."""
        p = dict(zip(self.names, params))
        if self.frozen:
            p.update(self.frozen)
        b = {n: t.clone() for n, t in zip(self.buffer_names, buffers)} if buffers else {}
        return FunctionalModel(self.module, p, b, self.swap)

    # -- random streams ----------------------------------------------------------
    @contextlib.contextmanager
    def streams(self):
        """Save the global random state, run the body, restore it: whoever runs the
        loop's steps wraps them in this once (each step seeds its own stream). Calls in
        several threads take turns (:func:`~torch_ufom.process.process_lock`). With
        ``math_attention`` the body runs under the math attention kernel (and, for a
        module holding a recurrent layer, without cuDNN). The body
        runs without ``nn.MultiheadAttention``'s inference fast path: under ``vmap``
        the parameters hide ``requires_grad``, and in ``eval()`` mode the layer
        would take that path, which has no derivative."""
        with process_lock():
            with torch_random_states_kept(self.cuda_devices), \
                    (_math_attention() if self.math_attention else contextlib.nullcontext()), \
                    (_no_cudnn() if self.recurrent else contextlib.nullcontext()), \
                    _no_attention_fastpath():
                yield

    def _seed(self, j: int) -> None:
        """Seed the global generators with step ``j``'s stream (inside :meth:`streams`)."""
        seed = (self.seed + j * 0x9E3779B97F4A7C15) % (1 << 63)
        torch.default_generator.manual_seed(seed)
        for d in self.cuda_devices:
            torch.cuda.default_generators[d].manual_seed(seed)

    @contextlib.contextmanager
    def stream(self, j: int):
        """Run the body under step ``j``'s own random stream (inside :meth:`streams`)."""
        self._seed(j)
        yield

    def draws_own_generator(self, run: Callable[[], Any]) -> Tuple[Any, bool]:
        """``run()`` and whether it drew from a generator of the user's (:class:`OwnDraws`).
        Looked for in the per-task loop only: a vectorised one never runs such a loss (its
        probe finds the draw, and the meta-batch runs task by task)."""
        if not isinstance(self.evaluator, PerTask):
            return run(), False
        with fullgraph_refused(COMPILED_REPLAY), OwnDraws() as mode:
            out = run()
        return out, mode.found

    # -- what the losses read -----------------------------------------------------------
    def note_unread(self, missing: frozenset) -> None:
        """One inner step's loss did not read the adapted parameters ``missing`` (indices
        into ``names``): those left unread by every step so far. A first step that read
        none of them warns (a loss that calls the module instead of the model it is given)."""
        if self.unread is None and self.names and len(missing) == len(self.names):
            warnings.warn(reads_nothing("inner_loss"), stacklevel=caller_level())
        self.unread = missing if self.unread is None else self.unread & missing

    def check_carried(self, loss: Tensor, params: Tuple[Tensor, ...], outer: bool = False) -> None:
        """Raise if an evaluation of a loss reads a tensor that the call's first evaluation of
        the inner loss left behind (review ES): its graph reaches the first evaluation's
        parameters other than through its own (a recurrent state or a key-value cache a
        forward keeps in ``self`` with its graph, a weight memoised from the parameters at
        the first call). Each step would then be differentiated at another step's
        parameters, and the sweep, which differentiates each step at its own, would be
        silently wrong. The first evaluation notes its parameters (weakly: a graph that
        reaches them keeps them alive); the next one at leaves of its own (not a chained
        step of a connected sweep, whose graph legitimately reaches back), or else the
        outer loss (``outer``, at detached leaves), is looked at: one walk of its graph.
        Any evaluation looked at also may not reach the copies a probe evaluated the losses
        at that a kept tensor holds (:data:`PROBED`)."""
        probed = probed_ids()
        if probed and loss.grad_fn is not None and graph_reaches(
                [loss.grad_fn], probed, stop={t.grad_fn for t in params}):
            raise RuntimeError(_carried_message("outer_loss" if outer else "inner_loss"))
        if self.first_params is None:
            if not outer:
                self.first_params = tuple(weakref.ref(t) for t in params if t.grad_fn is None)
                self.check_none_buffers()
            return
        if not outer and any(t.grad_fn is not None for t in params):
            return  # (a chained step: the outer loss is looked at instead)
        first, self.first_params, self.carried_checked = self.first_params, None, True
        own = {id(t) for t in params}
        leaves = {id(t) for t in (ref() for ref in first) if t is not None and id(t) not in own}
        if loss.grad_fn is None or not leaves:
            return
        if graph_reaches([loss.grad_fn], leaves, stop={t.grad_fn for t in params}):
            raise RuntimeError(_carried_message("outer_loss" if outer else "inner_loss"))

    def check_left_behind(self, loss: Tensor, params: Tuple[Tensor, ...]) -> None:
        """Raise if the outer loss reads a tensor that an inner step at leaves of its own
        (:meth:`advance`, an unlinked :meth:`record`: the forward pass of ``recompute``, of
        Revolve, of store's unlinked steps) left behind with its graph (review EX F1:
        ``self.last = h`` read by the outer loss was silently treated as a constant, 24 %
        off: autograd prunes the branch that reaches the step's leaves; review FE: a memo of
        the first step's, 35 % off). Their leaves are looked for only while one of them is
        alive, which a tensor left behind keeps so: one walk of the outer loss's graph then,
        none otherwise."""
        own = {id(t) for t in params}
        leaves = ({id(t) for t in self.kept_leaves} | probed_ids()) - own
        self.kept_leaves = weakref.WeakSet()
        if leaves and loss.grad_fn is not None and \
                graph_reaches([loss.grad_fn], leaves, stop={t.grad_fn for t in params}):
            raise RuntimeError(_carried_message("outer_loss"))

    def check_outer_graph(self, loss: Tensor, params: Sequence[Tensor]) -> None:
        """:meth:`check_recomputation` for the outer loss at ``params`` (a function of its own:
        the inner loss's look stands for an outer loss that is the inner loss), which also notes
        in :attr:`retain` a graph made before the call."""
        look = look_at_graph([loss.grad_fn], params, marker=self.marker)
        if look.recomputed:
            raise RuntimeError(recomputes_message("outer_loss"))
        self.retain = self.retain or look.made_before

    def retains(self, loss: Tensor, params: Sequence[Tensor] = ()) -> bool:
        """Whether the backwards of this call must keep their graphs (:attr:`retain`), once
        ``loss``'s graph (not walked past the nodes of ``params``) is looked at: it reaches a
        node made before the call (:func:`look_at_graph`'s ``made_before``)."""
        if not self.retain and loss.grad_fn is not None:
            self.retain = any(node._sequence_nr() < self.marker
                              for node in graph_nodes([loss.grad_fn], {t.grad_fn for t in params}))
        return self.retain

    def check_none_buffers(self) -> None:
        """Raise, after putting them back, if the first evaluation assigned buffers registered
        as ``None``: ``named_buffers()`` skips such a slot, so the library could neither give
        each step its own value nor start each task from the module's (review FB: carried from
        task to task and call to call, two identical calls 3.5e-2 apart)."""
        noted = take_assigned_none_buffers()
        assigned = [(sub, name) for sub, name in self.none_buffers
                    if sub._buffers.get(name, None) is not None or (id(sub._buffers), name) in noted]
        if not assigned:
            return
        for sub, name in assigned:
            sub._buffers[name] = None
        prefixes = {id(sub): prefix for prefix, sub in self.module.named_modules()}
        names = ", ".join(f"{prefixes[id(sub)]}.{name}" if prefixes[id(sub)] else name
                          for sub, name in assigned)
        raise RuntimeError(
            f"inner_loss assigns buffers registered as None ({names}), which the library cannot "
            "give each inner step and task as it gives the others (named_buffers() skips a None "
            "slot): register them with a tensor (register_buffer(name, torch.zeros(...))), or "
            "keep such a value as a plain attribute")

    def check_recomputation(self, loss: Tensor, params: Sequence[Tensor]) -> None:
        """Raise if a step's inner loss holds a part that ``torch.utils.checkpoint`` evaluates
        again in backward, reading adapted parameters (:func:`~torch_ufom.graphs.look_at_graph`); the
        caller runs it on the first step a call evaluates (a walk of the graph: 13 us on
        the sinusoid MLP; at every step with per-step batches it cost 12-18 % of a ``fom``
        call, review ER)."""
        self.recompute_checked = self.retain_looked = True
        if loss.grad_fn is None:
            return
        look = look_at_graph([loss.grad_fn], params, {t.grad_fn for t in params}, self.marker)
        if look.recomputed:
            raise RuntimeError(recomputes_message("inner_loss"))
        self.retain = self.retain or look.made_before

    def check_twice_differentiable(self, loss: Tensor, params: Sequence[Tensor]) -> None:
        """:func:`check_twice_differentiable` on the first step evaluated with a graph, and
        on every one where the batches are per step (a loss may apply the Function at some
        steps only), up to the step's parameters ``params``."""
        if not self.twice_checked or self.per_step:
            check_twice_differentiable(loss, params)
            self.twice_checked = True

    def unread_params(self) -> frozenset:
        """The adapted parameters (indices into ``names``) that neither the outer loss
        nor any inner step's loss read: the adjoint of their initial value is zero, and
        autograd gives such a tensor no gradient at all (``None``), which a stateful outer
        optimizer tells from zero (it skips the tensor). Call after :meth:`outer_vjp`."""
        if not self.elementwise:
            return _NOTHING  # a rule of the user's may read every parameter (a global norm)
        return (self.unread or _NOTHING) & self.outer_unread

    # -- one inner step ------------------------------------------------------------
    def _grad(self, state: State, j: int, create_graph: bool):
        self._seed(j)
        loss, grads, buffers = self.evaluator.grad(self, state, self.batch(j - 1), create_graph)
        # (the first step with a graph stands for all, but for per-step batches)
        if (not self.retain_looked or self.per_step) and loss.grad_fn is not None:
            self.retain_looked = True
            self.retains(loss, state.params)
        return loss, self._dense(grads), buffers

    def _dense(self, grads: Tuple[Tensor, ...]) -> Tuple[Tensor, ...]:
        """``grads``, dense under a rule that is not additive (see ``densify``, which the
        first sparse one sets)."""
        if not (self.dense_grads and any(g.layout != torch.strided for g in grads)):
            return grads
        self.densify = True
        return tuple(g if g.layout == torch.strided else g.to_dense() for g in grads)

    def apply_rule(self, grads, state: State):
        """The inner rule's update at ``state``: ``(params, rule state)``; plain SGD at a fixed rate without
        its containers (:func:`~torch_ufom.inner.plain_update`; :meth:`Loop.apply_rule`)."""
        if self.plain_rate is not None:
            return plain_update(state.params, grads, self.plain_rate), ()
        watched = self.own_rule and self.hypergradient  # (adapt differentiates nothing: review s38H F3)
        if watched:  # (review s38IR F2: a write into the gradient halved d/dlr under fom, silently)
            args = (*grads, *state.opt, *state.params)
            before = versions(args)
        try:
            out = self.rule.update(
                dict(zip(self.names, grads)), state.opt, dict(zip(self.names, state.params)),
                self.rule.hyper)
        except RuntimeError as err:  # (review s38IR F3: autograd's message named neither)
            if watched and "leaf Variable that requires grad is being used in an in-place" in str(err):
                where = written_argument(self.rule, self.names, grads, state)
                raise ValueError(inplace_update(self.rule, where)) from err
            raise
        if watched and versions(args) != before:
            where = written_argument(self.rule, self.names, grads, state, args, before)
            raise ValueError(inplace_update(self.rule, where))
        if self.own_rule and not self.rule_checked:  # (the first step's: review s32O F4, 5 us a step)
            out = checked_update(self.rule, out, self.names, state.params)
            self.rule_checked = True
        new_p, new_opt = out
        new_p = tuple(new_p[n] for n in self.names)
        if self.own_rule and torch.is_grad_enabled():
            # Every parameter that had a graph lost it (review IA F1: every mode's hypergradient was
            # zero, silently); one set to a constant beside others is a rule's right (review JA F2).
            had = [n for n, p in zip(self.names, state.params) if p.requires_grad]
            lost = [n for n, p, q in zip(self.names, state.params, new_p) if p.requires_grad and not
                    (isinstance(q, Tensor) and q.requires_grad)]
            if lost and len(lost) == len(had):
                raise ValueError(detached_update(self.rule, lost))
        if self.densify:
            new_p = tuple(map(_DenseCotangent.apply, new_p))
        return new_p, tuple(new_opt)

    def advance(self, state: State, j: int):
        """Step ``j`` without a graph: returns ``(s_j, loss_j, g_j)``."""
        params = tuple(p.detach().requires_grad_() for p in state.params)
        if self.watch_leaves:  # an exact sweep: what this step leaves behind is looked for
            self.kept_leaves.update(params)  # by the outer loss (check_left_behind)
        with torch.enable_grad():
            loss, grads, buffers = self._grad(State(params, state.opt, state.buffers), j, False)
        with torch.no_grad():
            new_p, new_opt = self.apply_rule(grads, State(params, state.opt, state.buffers))
        return State(new_p, new_opt, buffers), loss.detach(), grads

    def forward(self, state: State, stop: int, log) -> Tuple[State, Optional[Tuple[Tensor, ...]]]:
        """Steps ``1..stop`` from ``state`` (``s_0``) without a graph, each loss
        reported to ``log.first``: the steps that no reverse sweep revisits.

        Returns ``(s_stop, grad_sum)``: ``grad_sum`` is the sum of the steps' inner
        gradients when a learned hyperparameter enters the update
        (:meth:`first_order_theta` needs it), else ``None``. ``s_0`` (a copy of the
        module's parameters) is never written. With plain SGD at a plain-number
        rate, outside ``torch.autocast`` (whose cache of low-precision copies would
        keep serving a leaf updated in place), :meth:`_sgd_forward` runs the same
        operations as :meth:`advance` without its per-step objects.
        """
        if stop == 0:
            return state, None
        if self.plain_rate is not None and stop > 1 and not _autocasting(state.params):
            return self._sgd_forward(state, stop, log)
        state, loss, g = self.advance(state, 1)
        log.first(loss)
        grad_sum = g if self.learned_hyper else None
        for j in range(2, stop + 1):
            state, loss, g = self.advance(state, j)
            log.first(loss)
            if grad_sum is not None:
                grad_sum = tuple(a + b for a, b in zip(grad_sum, g))
        return state, grad_sum

    def _sgd_forward(self, state: State, stop: int, log) -> Tuple[State, None]:
        """:meth:`forward` for plain SGD at a plain-number rate, ``stop >= 2``.

        Steps ``2..stop`` update the parameters step 1 made in place (the rule's
        :func:`~torch_ufom.inner.plain_update`, one foreach kernel each,
        through detached aliases: the gradients carry no graph), and a module
        without buffers is evaluated through one :class:`FunctionalModel` for all
        of them. Every step is seeded with its own stream, as elsewhere: a
        loss may draw random numbers without moving the global generator's state
        (inside ``torch.random.fork_rng()``), so whether it draws is not checked.
        """
        state, loss, _ = self.advance(state, 1)
        log.first(loss)
        params, rate, batch, grad = state.params, self.plain_rate, self.batch, self.evaluator.grad
        for p in params:
            p.requires_grad_()
        targets = [p.detach() for p in params]  # same storage and version counter
        fm = None if state.buffers else self.fmodel(params, ())
        with _grad_mode(True):
            for j in range(2, stop + 1):
                self._seed(j)
                loss, grads, buffers = grad(self, state, batch(j - 1), False, fm)
                # Logged before the update: a loss that is a view of a parameter would read the
                # next step's value (review s34C F2). (Detached of a forward-mode tangent too:
                # review s33B F2.)
                log.first(loss.detach())
                plain_update(targets, grads, rate, inplace=True)
                # Autocast caches a low-precision copy of each leaf until its outermost region
                # exits; a region the losses open without exiting it (torch.set_autocast_enabled)
                # would keep serving this step's copy (review s34C F1: 17 % off), as would a worker
                # thread's region left open (2.5 % off): torch 2.11-2.13 keep one cache for the
                # process, which this clears (tests/test_fastpath.py holds both). About 80 ns.
                torch.clear_autocast_cache()
                if buffers:
                    state = State(params, state.opt, buffers)
        return state, None

    def _watched_grad(self, leaves: State, j: int):
        """:meth:`_grad` with a graph, noting in ``differentiates`` whether the inner loss
        calls :data:`AUTOGRAD_CALLS`: a PINN's du/dx or a gradient penalty taken through
        chained steps would differentiate the earlier steps too, so a connected sweep then
        keeps its records apart (per step, as recompute does)."""
        user, watch = self.inner_loss, Differentiates()

        def watched(fm, batch):
            with fullgraph_refused(COMPILED_WATCHED), watch:
                return user(fm, batch)

        self.inner_loss = watched
        try:
            return self._grad(leaves, j, create_graph=True)
        finally:
            self.inner_loss = user
            self.differentiates = watch.found

    def record(self, state: State, j: int, plan: SweepPlan) -> "StepRecord":
        """Step ``j`` kept for the reverse sweep: with a graph of the exact rule
        (``j > plan.exact_after``), or only its gradient for the first-order rule.
        Under ``plan.connected`` an exact step after the first continues the
        previous record's graph instead of starting from detached leaves."""
        exact = j > plan.exact_after
        graph = exact and self.hvp == "revrev"
        linked = graph and plan.connected
        first = linked and j == plan.exact_after + 1
        chained = linked and not first and not self.differentiates
        if chained:
            leaves = state  # the previous record's outputs, with their graph
        else:
            leaves = State(*(tuple(t.detach().requires_grad_(t.is_floating_point()) for t in part)
                             for part in state[:2]), state.buffers)
            if self.watch_leaves:  # (as in advance: a step of Revolve's forward pass, of store's
                self.kept_leaves.update(leaves.params)  # sweep of unlinked steps)
        # A chained step whose inner loss differentiates (the first did not: a loss that does
        # so at some steps only, told by its per-step batches; with one batch for every step,
        # the first step stands for all) runs a backward through the previous step's update:
        # its nodes, which this step's own gradient (taken at them) never runs, are watched.
        leaked: List[int] = []
        hooks = [t.grad_fn.register_prehook(lambda _, leaked=leaked: leaked.append(1))
                 for t in leaves.diff if t.grad_fn is not None] if chained and self.per_step else []
        try:
            with torch.enable_grad():
                if first:  # an inner loss that differentiates must not see the earlier steps' graphs
                    loss, grads, buffers = self._watched_grad(leaves, j)
                else:
                    loss, grads, buffers = self._grad(leaves, j, create_graph=graph)
                if graph:
                    out = self.apply_rule(grads, leaves)
        finally:
            for h in hooks:
                h.remove()
        if leaked:
            raise Unchain(j)
        linked = linked and not self.differentiates
        if not graph:
            with torch.no_grad():
                out = self.apply_rule(grads, leaves)
        keep = not graph or j <= plan.first_order_until
        if linked:
            next_state = State(out[0], out[1], buffers)
        else:
            next_state = State(tuple(t.detach() for t in out[0]), tuple(t.detach() for t in out[1]),
                               buffers)
        rec = StepRecord(self, leaves, out, grads if keep else None, next_state, loss.detach(), exact, j)
        rec.linked = linked
        return rec

    def hessian_vector(self, state: State, j: int, vec: Sequence[Optional[Tensor]]
                       ) -> Tuple[Tuple[Tensor, ...], Tensor]:
        """``(H v, loss)``: the Hessian of step ``j``'s inner loss at ``state.params`` times
        ``vec``, by forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``), under
        step ``j``'s random stream, and the loss that evaluation computed (detached), which
        the sweep compares with the step's own (:meth:`SweepLog.product
        <torch_ufom.estimators.SweepLog.product>`). The evaluation runs the step again (its
        batch fetched again too): a per-task loop's first one, with per-step batches each
        step's first, is watched for draws from NumPy's and Python's generators, which no
        stream replays, as replays are (review s38CU F1: a ``j -> batch`` sampler drawing
        from a generator of the user's at one step gave a 31 % wrong hypergradient,
        silently)."""
        params = tuple(p.detach() for p in state.params)
        vec = tuple(torch.zeros_like(p) if v is None else v.detach() for p, v in zip(params, vec))

        def run():
            return self.evaluator.hvp(self, State(params, state.opt, state.buffers), self.batch(j - 1), vec)

        key = j if self.per_step else 0
        watch = key not in self.hvp_watched and isinstance(self.evaluator, PerTask)
        with self.stream(j):
            try:
                if not watch:
                    hv, loss = run()
                else:
                    # (NumPy's and Python's generators only: a torch.Generator of the loss's own is
                    # refused before the sweep, and one a j -> batch callable draws from changes the
                    # batch, which the loss comparison sees; a sampler seeding a fresh one per step is
                    # deterministic, review s38R F1)
                    self.hvp_watched.add(key)
                    host = host_random_states()
                    hv, loss = run()
                    anew = f". Or {SAMPLES_ANEW}" if self.step_function else ""
                    if host_random_states() != host:
                        raise FwdRevCannot(FWDREV_DRAWS + anew)
            except FwdRevCannot:
                raise
            except RuntimeError as err:
                raise fwdrev_error(err, j) from err
        # Non-adapted parameters the losses read are leaves of autograd's graph (fwdrev is
        # refused when any of them is a meta-parameter): drop that graph.
        hv = tuple(h.detach() for h in hv)
        if not self.hvp_checked and isinstance(self.evaluator, PerTask):
            self.hvp_checked = True
            reverse = self.reverse_hessian_vector(State(params, state.opt, state.buffers), j, vec)
            rel, mixed = hvp_disagreement(hv, reverse)
            if rel:
                raise FwdRevDisagrees(j, rel, mixed, self.step_function,
                                      self._draws(State(params, state.opt, state.buffers), j),
                                      any(torch.finfo(h.dtype).eps > _FLOAT64_EPS for h in hv))
        return hv, loss.detach()

    def _draws(self, state: State, j: int) -> bool:
        """Whether step ``j``'s inner loss draws from torch's global generators (a refusal's
        message may then name dropout); ``False`` where evaluating it again raises (review
        s39H2 F4: that error would hide the refusal's)."""
        try:
            with self.stream(j):
                seeded = torch_random_states()
                self.gradient_graph(state, j)
                return states_differ(seeded, torch_random_states())
        except Exception:  # noqa: BLE001 (a message's detail: the refusal is raised either way)
            return False

    def reverse_hessian_vector(self, state: State, j: int, vec: Sequence[Tensor]) -> Tuple[Tensor, ...]:
        """``H v`` of step ``j``'s inner loss by reverse mode (autograd on the step's
        gradient, taken with a graph), under step ``j``'s random stream: what
        :meth:`hessian_vector`'s first call of a per-task sweep is compared with."""
        leaves, grads = self.gradient_graph(state, j)
        with torch.enable_grad():  # (the sum too: review s35B F1, a caller's no_grad broke it)
            dots = [(g * v).sum() for g, v in zip(grads, vec) if g.requires_grad]
            total = sum(dots) if dots else None
        with second_derivatives():
            got = torch.autograd.grad(total, leaves, allow_unused=True) if dots else (None,) * len(leaves)
        return tuple(torch.zeros_like(p) if r is None else r for p, r in zip(leaves, got))

    def gradient_graph(self, state: State, j: int) -> Tuple[Tuple[Tensor, ...], Tuple[Tensor, ...]]:
        """``(leaves, grads)``: step ``j``'s inner gradient at detached copies of
        ``state.params`` (``leaves``), taken by reverse mode with a graph, under step
        ``j``'s random stream. What a forward-over-reverse HVP is compared with
        (:meth:`reverse_hessian_vector`), and what a budget-sized sweep measures its
        working memory by (:func:`~torch_ufom.schedules._probe`)."""
        leaves = tuple(p.detach().requires_grad_() for p in state.params)
        with self.stream(j), torch.enable_grad():
            _, grads, _ = self.evaluator.grad(self, State(leaves, state.opt, state.buffers),
                                              self.batch(j - 1), True)
        return leaves, grads

    def reduce(self, adjoint: Tensor) -> Tensor:
        """The adjoint of a shared initial parameter from the state's adjoint."""
        return self.evaluator.reduce(adjoint)

    # -- outer loss ------------------------------------------------------------------
    def outer_vjp(self, state: State):
        """``dL_out/d(params + opt)`` at ``s_r``, the explicit ``dL_out/dtheta``, the
        outer loss (one per task for a meta-batch) and its aux, detached."""
        params = tuple(p.detach().requires_grad_() for p in state.params)
        with torch.enable_grad(), self.stream(self.steps + 1):
            loss, aux, grads, buffers = self.evaluator.outer(self, params, state)
        self.watch_leaves, self.kept_leaves = False, weakref.WeakSet()  # (replays come after)
        self.outer_unread = frozenset(i for i, g in enumerate(grads[:len(params)]) if g is None)
        if self.names and len(self.outer_unread) == len(self.names):
            warnings.warn(reads_nothing("outer_loss"), stacklevel=caller_level())
        e = tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))
        e = self._dense(e) + tuple(torch.zeros_like(t) for t in state.opt)
        return e, list(grads[len(params):]), loss.detach(), detached(aux), buffers

    def first_order_theta(self, f_params: Sequence[Tensor], grad_sum: Sequence[Tensor], state: State):
        """The meta-parameter terms of the first-order steps of an additive rule.

        For a rule with ``first_order_additive``, the first-order VJP leaves the
        adjoint ``f`` unchanged, so the meta-parameter terms of all those steps
        add up to one VJP of ``update`` at the summed gradients.
        """
        if not self.meta:
            return [None] * len(self.meta)
        with torch.enable_grad():
            new_p, _ = self.apply_rule(tuple(grad_sum), state)
        outs = [(o, f) for o, f in zip(new_p, f_params) if o.requires_grad]
        if not outs:
            return [None] * len(self.meta)
        return list(torch.autograd.grad([o for o, _ in outs], self.meta,
                                        [f for _, f in outs], allow_unused=True))


_SAME_MODE = contextlib.nullcontext()


class _DenseCotangent(torch.autograd.Function):
    """A copy, whose backward makes a sparse cotangent dense (see ``InnerLoop.densify``).
    A copy rather than a view: the next forward may write it in place (``max_norm``)."""

    @staticmethod
    def forward(t):
        return t.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad if grad.layout == torch.strided else grad.to_dense()


def _grad_mode(enabled: bool):
    """``torch.set_grad_enabled(enabled)``, or a shared no-op where the mode already is
    ``enabled`` (per step, the context object costs more than the check)."""
    return _SAME_MODE if torch.is_grad_enabled() == enabled else torch.set_grad_enabled(enabled)


@contextlib.contextmanager
def _no_attention_fastpath():
    """Turn off ``nn.MultiheadAttention``'s (and ``nn.TransformerEncoderLayer``'s) inference
    fast path for the body, whatever it was before."""
    mha = torch.backends.mha
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


@contextlib.contextmanager
def _no_cudnn():
    """Turn cuDNN off for the body (its other flags as they were), whatever it was before
    (``torch.backends.cudnn.flags`` would reset the others to their defaults)."""
    before = torch._C._get_cudnn_enabled()
    torch._C._set_cudnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_cudnn_enabled(before)


def _math_attention():
    """Run ``scaled_dot_product_attention`` under its math kernel (differentiable twice)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.MATH])

