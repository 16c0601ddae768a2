"""The randomized-telescope estimator in one reverse sweep with two adjoint streams.

For a drawn truncation point ``K`` with survival ``P_m = P(K >= m)`` and
weights ``c_m`` (:func:`~torch_ufom.truncation.telescope_weights`), the estimate
``g = sum_{k<=K} c_k G_k`` is computed as in ``docs/maths.md#the-one-sweep-two-stream-algorithm``:

1. forward: the first ``r - K`` steps first-order (no graph; for additive
   rules their inner gradients are summed, ``first_order_identity`` rules
   without a learned hyperparameter need nothing of them, other rules keep
   them in the schedule too), then the last ``K`` steps through a memory
   :mod:`~torch_ufom.schedules` schedule;
2. ``e = dL_out/ds_r`` (exact stream), ``f = c_0 e`` (first-order stream),
   meta-gradient ``= dL_out/dtheta`` (explicit; the weights sum to one);
3. for depth ``m = 1..K``: ``f <- VJP(F~)(f)``, ``e <- VJP(F)(e)``, the
   meta-parameter terms of the first added with weight 1 and of the second
   with ``1 / P_m``, then ``f += c_m e``;
4. the first ``r - K`` steps: first-order only (``f <- VJP(F~)(f)``); for an
   additive rule ``f`` passes unchanged and their meta-parameter terms are
   one VJP of the update at the summed gradients; for an identity rule
   without a learned hyperparameter the parameters' part of ``f`` passes
   unchanged and nothing else of it is read, so no first-order VJP runs at
   any depth;
5. ``f`` at ``s_0`` is the hypergradient of the initial parameters.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .batches import SAMPLES_ANEW
from .fwdrev import FUNC_DRAWS_OTHERWISE
from .inner import shortcut
from .protocols import Loop, SweepPlan
from .records import Unchain, chain_vjp
from .schedules import Schedule
from .truncation import telescope_weights

__all__ = ["Estimate", "estimate", "SweepLog", "check_finite", "NonFiniteHypergradient", "plus",
           "finite_each", "finite_norms", "first_nonfinite_loss", "raised_by_hook"]


@dataclass
class Estimate:
    """What one call of :func:`estimate` returns.

    Attributes:
        grads: one hypergradient per tensor of ``params`` (``None`` where the
            tensor does not influence the outer loss).
        outer_loss: the detached outer loss at ``s_r``.
        inner_losses: the detached inner losses of steps ``1..r``, a 1-D tensor.
        truncation: the truncation point ``K`` used.
        weights: ``1 / P(K >= m)`` for ``m = 0..K``, the weights of the exact
            corrections.
        forward_steps: inner steps run without a graph (forward and replays).
        reverse_steps: inner steps run with a graph for the exact sweep (recorded in the
            forward pass under ``memory="store"``, and under ``"checkpoint"`` when the
            sweep's graphs fit its budget or its slots; rebuilt otherwise).
        g0, gk: with ``diagnostics`` and ``K > 0``, the unweighted ``G_0`` (FOM)
            and ``G_K``; else ``None``.
        buffers: the module's buffers as the task's last forward left them (the outer
            loss's, after the inner loop), in
            ``named_buffers()`` order.
        aux: the outer loss's aux from the forward pass, detached (``None``
            when it returns a plain loss); for a meta-batch, stacked over tasks.
    """

    grads: Tuple[Optional[Tensor], ...]
    outer_loss: Tensor
    inner_losses: Tensor
    truncation: int
    weights: List[float] = field(default_factory=list)
    forward_steps: int = 0
    reverse_steps: int = 0
    g0: Optional[Tuple[Optional[Tensor], ...]] = None
    gk: Optional[Tuple[Optional[Tensor], ...]] = None
    buffers: Tuple[Tensor, ...] = ()
    aux: Any = None


def plus(a: Tensor, b: Tensor) -> Tensor:
    """``a + b``, also where ``a`` is sparse (an embedding's gradient) and ``b`` dense:
    torch adds a sparse tensor to a dense one, not the reverse (autograd's
    accumulation orders them the same way)."""
    return b + a if a.layout != torch.strided and b.layout == torch.strided else a + b


def _add(acc: List[Optional[Tensor]], terms: Sequence[Optional[Tensor]], scale: float = 1.0):
    for i, t in enumerate(terms):
        if t is not None:
            t = t if scale == 1.0 else t * scale
            acc[i] = t if acc[i] is None else plus(acc[i], t)


_ROWS = 64  # rows of SweepLog.values with a view at hand


class SweepLog:
    """What one estimate's inner loop reports: the forward pass's losses, written
    into one tensor allocated at the first step, the losses of the steps evaluated
    again (replays, rebuilds; the last one per step), and the step counts.
    :meth:`replays` compares the two: every loss evaluated again finite, and equal
    to its step's forward-pass loss up to rounding; :meth:`all_finite` adds the
    forward pass's losses. Both are 0-d bool tensors on the losses' device, read
    once per task.

    Keeping each step's 0-d loss alive instead can pin a batch-sized buffer per
    step (seen with ``F.mse_loss``) and fragments the heap, so memory would
    grow with ``steps``.
    """

    def __init__(self, steps: int):
        self.steps, self.count, self.values = steps, 0, None
        self._row0, self._rows = 0, ()  # the first row with a view in _rows, and the views
        self.forward_steps = 0  # inner steps run without a graph (forward pass and replays)
        self.reverse_steps = 0  # inner steps run with a graph for an exact VJP
        self.again_values: Optional[Tensor] = None  # each step's loss when last evaluated again
        self.again_rows: Optional[Tensor] = None  # which steps were evaluated again
        self.same_values: Optional[Tensor] = None  # ... from the forward pass's own state
        self.same_rows: Optional[Tensor] = None
        self.product_values: Optional[Tensor] = None  # each step's loss as its fwdrev product computed it
        self.product_steps: Optional[Tensor] = None  # ... as the step computed it
        self.product_rows: Optional[Tensor] = None  # which steps ran a product

    def first(self, loss: Tensor, exact: bool = False) -> None:
        """A step of the forward pass (its finiteness is read from ``values`` at the end)."""
        if self.values is None:
            self.values = torch.empty((self.steps,) + tuple(loss.shape), dtype=loss.dtype,
                                      device=loss.device)
        i = self.count - self._row0
        if not 0 <= i < len(self._rows):  # views of the next rows: a copy_ is cheaper than
            # indexing, and views of every row would keep about 650 bytes per step
            self._row0, i = self.count, 0
            self._rows = self.values[self.count:self.count + _ROWS].unbind(0)
        self._rows[i].copy_(loss)
        self.count += 1
        self._count(exact)

    def again(self, loss: Tensor, exact: bool, j: int, compare: bool = False) -> None:
        """Step ``j`` evaluated again (a replay or a rebuild): its loss is kept for
        :meth:`replays`; ``compare``: evaluated at the forward pass's own state (a stored
        one, not one recomputed), so that it must be the forward pass's loss."""
        self._count(exact)
        if self.again_values is None:
            self.again_values, self.same_values = torch.empty_like(self.values), torch.empty_like(self.values)
            self.again_rows = torch.zeros(self.steps, dtype=torch.bool, device=self.values.device)
            self.same_rows = torch.zeros_like(self.again_rows)
        loss = loss.detach()
        self.again_values.select(0, j - 1).copy_(loss)
        self.again_rows.select(0, j - 1).fill_(True)
        if compare:
            self.same_values.select(0, j - 1).copy_(loss)
            self.same_rows.select(0, j - 1).fill_(True)

    def product(self, loss: Tensor, step_loss: Tensor, j: int) -> None:
        """Step ``j`` evaluated again by a forward-over-reverse product at the step's own
        state and random stream: its loss must be the step's (``step_loss``), up to
        rounding, or the product differentiated another function (a batch or a draw that
        no stream replays, review s38CU F1). Kept for :meth:`replays`, no host read."""
        if self.product_values is None:
            self.product_values = torch.empty_like(self.values)
            self.product_steps = torch.empty_like(self.values)
            self.product_rows = torch.zeros(self.steps, dtype=torch.bool, device=self.values.device)
        self.product_values.select(0, j - 1).copy_(loss)
        self.product_steps.select(0, j - 1).copy_(step_loss)
        self.product_rows.select(0, j - 1).fill_(True)

    @property
    def evaluated_again(self) -> bool:
        """Whether some step was evaluated again (a replay, a rebuild or a product)."""
        return self.again_values is not None or self.product_values is not None

    def replays(self) -> Tuple[Tensor, Tensor]:
        """``(finite, same)``, 0-d bool tensors: every loss evaluated again was finite, and
        each one evaluated at the forward pass's own state equal to the forward pass's up
        to rounding (``sqrt(eps)`` relative: a kernel may add up in another order, and
        CUDA's atomic sums vary from run to run). Another value means the step computed
        another function (a random operation drawing from a generator of the user's,
        which no stream reseeds), and the exact sweep would have differentiated it. No
        step evaluated again: both true."""
        with torch.no_grad():
            true = torch.ones((), dtype=torch.bool)
            if not self.evaluated_again:
                return true, true
            shape = (-1,) + (1,) * (self.values.dim() - 1)
            eps = torch.finfo(self.values.dtype).eps

            def close(got, kept):  # (a non-finite one is reported as such, not as another value)
                return (torch.isclose(got, kept, rtol=eps ** 0.5, atol=eps) | ~torch.isfinite(got)).all()

            checks = []  # (finite, same) of the replays and rebuilds, and of the products
            if self.again_values is not None:
                checks.append((torch.isfinite(torch.where(self.again_rows.view(shape), self.again_values,
                                                          self.values)).all(),
                               close(torch.where(self.same_rows.view(shape), self.same_values, self.values),
                                     self.values)))
            if self.product_values is not None:  # (each product against its own step's loss)
                rows = self.product_rows.view(shape)
                got = torch.where(rows, self.product_values, self.values)
                checks.append((torch.isfinite(got).all(),
                               close(got, torch.where(rows, self.product_steps, self.values))))
            (finite, same), *more = checks
            for f, s in more:
                finite, same = finite & f, same & s
            return finite, same

    def _count(self, exact: bool) -> None:
        if exact:
            self.reverse_steps += 1
        else:
            self.forward_steps += 1

    def all_finite(self) -> Tensor:
        """A 0-d bool tensor: every inner loss reported so far was finite."""
        with torch.no_grad():
            ok = torch.isfinite(self.values[:self.count]).all()
            return ok & self.replays()[0] if self.evaluated_again else ok


def _values(t: Tensor) -> Tensor:
    """The values of a sparse tensor (``nn.Embedding(sparse=True)``'s gradient), else ``t``:
    those of the coalesced tensor, whose duplicate entries are summed (each entry may be
    finite and their sum not)."""
    if t.layout == torch.sparse_coo:
        return t.coalesce()._values()
    if t.layout != torch.strided:
        return t.values()  # compressed layouts
    return t


def finite_each(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """A bool tensor on ``device``, one entry per tensor, no host read: whether it is finite,
    by its largest absolute value, which cannot overflow as a 2-norm can (review s37R2 F1: a
    finite parameter near 1e20 in float32 taken for a non-finite one)."""
    if not tensors:
        return torch.ones((0,), dtype=torch.bool, device=device)
    norms = torch._foreach_norm(list(tensors), ord=math.inf)
    return torch.isfinite(torch.stack([n.to(device) for n in norms]))  # stack promotes dtypes


def finite_norms(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """A 0-d bool tensor on ``device``: every tensor's 2-norm is finite (every tensor is
    finite, or a norm overflowed: a false alarm to clear element by element)."""
    # Half-precision norms in float32: a float16 gradient's norm overflows at 65,504.
    half = [t for t in tensors if t.dtype in (torch.float16, torch.bfloat16)]
    rest = [t for t in tensors if t.dtype not in (torch.float16, torch.bfloat16)]
    norms = (torch._foreach_norm(rest) if rest else ()) + \
        (torch._foreach_norm(half, dtype=torch.float32) if half else ())
    if not norms:
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.isfinite(torch.stack([n.to(device) for n in norms])).all()  # stack promotes dtypes


def first_nonfinite_loss(values: Tensor, steps: int) -> str:
    """The message for the first inner step whose loss is not finite (of ``values``, the
    losses by step: one per step, or one per task and step), or ``""`` where all are."""
    finite = torch.isfinite(values.reshape(steps, -1)).all(1)
    if bool(finite.all()):
        return ""
    j = int((~finite).nonzero()[0, 0]) + 1
    before = (f" (the losses of the steps before were finite: this step's batch, or the update of step "
              f"{j - 1} (an inner gradient not finite at a finite loss), made it so)") if j > 1 else ""
    return f"inner_loss is not finite at inner step {j}: {values[j - 1].tolist()}{before}"


def _all_finite(log: SweepLog, outer: Tensor, grads: Sequence[Optional[Tensor]]) -> Tensor:
    """One 0-d bool tensor: every inner loss evaluated (forward, replays, rebuilds),
    the outer loss and every hypergradient finite. Read once per task."""
    with torch.no_grad():
        device = outer.device
        # The 2-norm per tensor in one foreach kernel, for the hypergradients, the outer loss and the
        # forward pass's inner losses at once: NaN and inf carry through it, so a finite norm means a
        # finite tensor. A finite tensor whose norm overflows is a false alarm, which check_finite
        # clears element by element. (The max-norm would raise none, but on CPU foreach_norm runs
        # one kernel per tensor and only the 2-norm's is vectorised.)
        tensors = [_values(g) for g in grads if g is not None and g.numel() > 0] + [outer]
        if log.values is not None:
            tensors.append(log.values[:log.count])
        ok = finite_norms(tensors, device)
        if log.evaluated_again:
            finite, same = log.replays()
            ok = ok & (finite & same).to(device)
        return ok


def check_finite(log: SweepLog, est: "Estimate", step_function: bool = False) -> None:
    """Raise ``FloatingPointError`` naming what is not finite (one host synchronisation
    when everything is finite and no norm overflows), or ``RuntimeError`` where a step
    evaluated again gave another loss (``step_function``: the batches come from a
    callable ``j -> batch``, which may be the cause)."""
    if bool(_all_finite(log, est.outer_loss, est.grads)):
        return
    anew = f" Or {SAMPLES_ANEW}." if step_function else ""
    losses = est.inner_losses
    said = first_nonfinite_loss(losses, losses.shape[0])
    if said:
        raise FloatingPointError(said)
    if not bool(torch.isfinite(est.outer_loss).all()):
        last = (" (every inner loss was finite: the query batch, the outer loss, or the last inner "
                "step's update (an inner gradient not finite at a finite loss) made it so)") \
            if losses.shape[0] else ""
        raise FloatingPointError(f"outer_loss is not finite: {est.outer_loss.tolist()}{last}")
    finite, same = log.replays()
    if not bool(finite):
        raise FloatingPointError(
            "inner_loss was finite on the forward pass but not when a step was evaluated again "
            "(a replay, the exact sweep's rebuild or a forward-over-reverse product): the loss must "
            "be a deterministic function of the parameters, the batch and the step's random "
            f"stream.{anew}")
    if not bool(same):
        fwdrev = f" Under hvp='fwdrev', {FUNC_DRAWS_OTHERWISE}." if log.product_values is not None else ""
        raise RuntimeError(
            "inner_loss gave another value when a step was evaluated again (a replay, the exact "
            "sweep's rebuild or a forward-over-reverse product) than on the forward pass, so the "
            "sweep would differentiate another function: the loss must be a deterministic function "
            "of the parameters, the batch and the step's random stream. A random operation that "
            "draws from a torch.Generator of your own (generator=...) is not replayed: draw from the "
            "global generator, or pass memory='store' and hvp='revrev', which evaluate each step "
            "once. A forward that draws nothing of its own but "
            "sums in a varying order (CUDA's atomic kernels) differs by more than rounding only "
            "where the loss cancels most of its terms: torch.use_deterministic_algorithms(True) "
            "makes replays exact. A forward that writes a tensor in place (a layer clipping its own "
            "weight, an nn.Embedding with max_norm on a table the inner loop does not adapt) must "
            f"write the same values when a step runs again.{fwdrev}{anew}")
    i = next((i for i, g in enumerate(est.grads)
              if g is not None and not bool(torch.isfinite(_values(g)).all())), None)
    if i is not None:
        raise NonFiniteHypergradient(i, f"params[{i}] (shape {tuple(est.grads[i].shape)})")
    # every tensor is finite: a norm overflowed (values near the dtype's largest)


class NonFiniteHypergradient(FloatingPointError):
    """A hypergradient is not finite though every loss was; ``index`` is its position in ``params``."""

    def __init__(self, index: int, name: str):
        super().__init__(f"non-finite hypergradient for {name} though every loss was finite; "
                         "nothing was written")
        self.index = index


def estimate(loop: Loop, K: int, survival: Sequence[float], schedule: Schedule,
             params: Sequence[Tensor], diagnostics: bool = False, hooks: bool = True) -> Estimate:
    """Run the inner loop once and return the estimate for truncation point ``K``.

    Args:
        loop: the task's :class:`~torch_ufom.protocols.Loop`.
        K: the truncation point, ``0 <= K <= loop.steps``.
        survival: ``P(K >= m)`` for ``m = 0..steps+1``.
        schedule: how the exact sweep gets its states.
        params: the tensors to return hypergradients for; model parameters
            among them receive the adjoint of the initial state.
        diagnostics: also return ``G_0`` and ``G_K`` (unweighted), for the
            adaptive choice of ``q``. ``G_K`` costs nothing extra; ``G_0`` one
            more first-order stream (no second derivatives).
        hooks: run the hooks registered on adapted parameters on their share of
            the estimate (``False`` for statistics nobody writes, ``diagnose``).
    """
    r = loop.steps
    inv_p, c = telescope_weights(survival, K)
    log = SweepLog(r)
    state = loop.initial_state(differentiated=True)
    s0 = state
    # (planned here, after the rule's init ran in initial_state: an init may turn a shortcut off,
    # review s33B F1; the loop's dense_grads was asked before it)
    swept, identity, plan = _plan_sweep(loop, K, inv_p, c, schedule, diagnostics)
    connected = plan.connected
    # The summed gradients matter only if a learned hyperparameter enters the update.
    state, grad_sum = loop.forward(state, swept, log)
    count, start = log.count, state
    try:
        state, records = schedule.sweep(loop, state, swept, r, log, plan)
    except Unchain:  # a step's inner loss differentiated through the chained steps before it
        records = None  # (outside the handler, which would keep the aborted records alive)
    if records is None:
        log.count = count  # (the steps ran: the call counters keep them)
        connected, plan = False, plan._replace(connected=False)
        state, records = schedule.sweep(loop, start, swept, r, log, plan)
    # the buffers as the task's last forward left them: the outer loss's, after the inner loop's
    e, explicit, outer_loss, aux, final_buffers = loop.outer_vjp(state)
    inner_losses = log.values
    diagnostics = diagnostics and K > 0  # for K = 0 the estimate is G_0 = G_K itself
    theta = list(explicit)
    theta_k = list(explicit) if diagnostics else None  # G_K: the exact stream alone
    f0, theta_0 = (e, list(explicit)) if diagnostics else (None, None)  # G_0: no injections
    # While every injection so far had weight 0 (the exact law), f is exactly
    # zero and its VJPs are skipped.
    f = None if c[0] == 0.0 else _scaled(c[0], e)
    if connected:
        # A schedule that decided to replay (a byte budget running Revolve) made unlinked
        # records: they take the per-depth loop below, one at a time.
        newest = next(records)
        records = itertools.chain([newest], records)
        if newest.linked:
            del newest
            e, d_exact = chain_vjp(list(records), e)
            _add(theta, d_exact, inv_p[1])
            f = _scaled(c[K], e) if f is None else tuple(plus(a, c[K] * b) for a, b in zip(f, e))
            records = iter(())
        else:
            del newest
    for m, rec in enumerate(records, start=1):
        if f is not None and not identity:
            f, d_first = rec.vjp_first_order(f)
            _add(theta, d_first)
        if f0 is not None and not identity:
            f0, d_zero = rec.vjp_first_order(f0)
            _add(theta_0, d_zero)
        if m > K:  # the first-order steps of a rule that is neither additive nor identity
            if theta_k is not None:
                e, d_k = rec.vjp_first_order(e)
                _add(theta_k, d_k)
            continue
        e, d_exact = rec.vjp_exact(e, log)
        _add(theta, d_exact, inv_p[m])
        if theta_k is not None:
            _add(theta_k, d_exact)
        if c[m] != 0.0:
            f = _scaled(c[m], e) if f is None else tuple(plus(a, c[m] * b) for a, b in zip(f, e))
    # c_K = 1 / P_K > 0, so f is set here whatever K.

    def finish(adjoint, acc, hooks=False, unread=frozenset()):
        # The first r - K steps (first-order, additive rule) and the initial parameters.
        if grad_sum is not None:
            _add(acc, loop.first_order_theta(adjoint[:len(s0.params)], grad_sum, s0))
        return _assemble(loop, params, adjoint, acc, hooks, unread)

    # The statistics below are not the user's gradients: they stay dense.
    grads = finish(f, theta, hooks, loop.unread_params())
    g0 = finish(f0, theta_0) if diagnostics else None
    gk = finish(e, theta_k) if diagnostics else None
    est = Estimate(grads, outer_loss, inner_losses, K, inv_p,
                   log.forward_steps, log.reverse_steps, g0, gk, final_buffers, aux)
    check_finite(log, est, loop.step_function)
    return est


class _Sweep(NamedTuple):
    """How :func:`estimate` sweeps one task for a drawn ``K`` (:func:`_plan_sweep`)."""

    swept: int  # the first steps run first-order by loop.forward, before the schedule's sweep
    identity: bool  # the first-order VJP passes the stream unchanged: none runs
    plan: SweepPlan  # which steps the schedule's sweep records how


def _plan_sweep(loop: Loop, K: int, inv_p: Sequence[float], c: Sequence[float], schedule: Schedule,
                diagnostics: bool) -> _Sweep:
    """The sweep :func:`estimate` runs for truncation point ``K`` with the telescope's
    weights ``inv_p`` and ``c`` (:func:`~torch_ufom.truncation.telescope_weights`), from the
    rule's shortcuts (asked after its ``init`` ran: the caller's ``loop.initial_state``), the
    loop's HVP and ``schedule``; ``diagnostics``: ``G_0`` and ``G_K`` are kept too."""
    r = loop.steps
    # For an additive rule with no learned hyperparameter the first-order VJP is the
    # identity with no meta-parameter terms; for a rule with first_order_identity and no
    # learned hyperparameter it is the identity on the parameters' adjoint, and what it
    # gives the optimizer state never reaches them. Either way the stream passes
    # unchanged, so it is not swept and the exact records keep no gradient for it
    # (ufom's exact branch then costs what exact costs).
    rule = loop.rule
    additive = shortcut(rule, "first_order_additive")
    identity = (additive or shortcut(rule, "first_order_identity")) and not loop.learned_hyper
    # An additive rule needs nothing of the first r - K steps in reverse but their
    # summed gradients, and an identity one nothing at all; any other rule sweeps
    # them first-order too.
    swept = r - K if additive or identity else 0
    # The first-order stream f starts at the first depth m with c_m != 0; the
    # exact records above it (steps j > r - m) never see a first-order VJP.
    start_f = 0 if diagnostics else next(m for m, cm in enumerate(c) if cm != 0.0)
    # When, besides, every exact depth has the same weight and injects nothing before
    # the last, the exact stream is needed only at s_{r-K}: the exact steps then form
    # one graph differentiated by one backward (schedules that keep every graph).
    connected = (identity and not diagnostics and K > 0 and loop.hvp == "revrev"
                 and schedule.keeps_every_graph(K) and all(w == inv_p[1] for w in inv_p[1:])
                 and not any(c[1:K]))
    # Under identity no first-order VJP runs, G_0's and G_K's streams included: the exact
    # records keep no gradient (forward-over-reverse records keep theirs for H u).
    plan = SweepPlan(exact_after=r - K, first_order_until=0 if identity else r - start_f,
                     connected=connected)
    return _Sweep(swept, identity, plan)


def _scaled(weight: float, tensors: Sequence[Tensor]) -> Tuple[Tensor, ...]:
    """``weight * t`` for each tensor; the tensors themselves for weight 1 (the same values:
    no tensor is written in place afterwards)."""
    return tuple(tensors) if weight == 1.0 else tuple(weight * t for t in tensors)


def _assemble(loop: Loop, params: Sequence[Tensor], adjoint, theta, hooks: bool = False,
              unread: frozenset = frozenset()) -> Tuple:
    """One gradient per tensor of ``params``: its direct terms plus, for a model
    parameter, the adjoint of its initial value (through the parameter's hooks
    with ``hooks``, once per task: :func:`_hooked`); ``None`` for an adapted
    parameter in ``unread`` (indices into ``loop.names``: no loss read it) without
    direct terms, as autograd gives a tensor its graph does not reach."""
    direct = {id(t): g for t, g in zip(loop.meta, theta)}
    index = {id(loop.named[n]): i for i, n in enumerate(loop.names)}
    grads = []
    for p in params:
        g = direct.get(id(p))
        if id(p) in index:
            if g is None and index[id(p)] in unread:
                grads.append(None)
                continue
            adj = adjoint[index[id(p)]]
            reduced = loop.reduce(adj)
            if hooks and getattr(p, "_backward_hooks", None):
                # A vectorised sweep's adjoint has one slice per task: each its own hooks,
                # as a loop of single-task calls gives them.
                reduced = _hooked(p, reduced) if reduced.shape == adj.shape else \
                    sum(_hooked(p, a) for a in adj.unbind(0))
            g = reduced if g is None else plus(g, reduced)
        if loop.dense_grads and g is not None and g.layout != torch.strided:
            g = g.to_dense()  # one layout whatever K under a rule that mixes gradients with state
        grads.append(g)
    return tuple(grads)


def _hooked(p: Tensor, grad: Tensor) -> Tensor:
    """``grad`` through the hooks registered on ``p`` with ``Tensor.register_hook``, as
    autograd runs them on a gradient it computes for ``p``. The sweep differentiates a
    detached copy of an adapted parameter, so the adjoint of its initial value has not
    been through them (its direct terms, where a loss reads ``p`` itself, have)."""
    with torch.enable_grad():
        # A copy, not a view: a view's backward reshapes, which a sparse gradient cannot.
        try:
            return torch.autograd.grad(p.clone(), p, grad_outputs=grad.to(p.dtype))[0].detach()
        except Exception as err:
            try:
                if HOOK_RAISED not in getattr(err, "__notes__", ()):
                    err.add_note(HOOK_RAISED)  # (read by raised_by_hook)
            except Exception:  # noqa: BLE001 (review s39H2 F3: one whose __setattr__ refuses takes no
                pass  # note; a meta-batch then runs its tasks again per task, where it is raised)
            raise


HOOK_RAISED = "(raised by a hook registered on a meta-parameter with register_hook)"


def raised_by_hook(err: BaseException) -> bool:
    """Whether ``err`` came from a hook of the user's that :func:`_hooked` ran: an error of
    theirs, which a meta-batch raises as it is rather than running its tasks again one by one
    (review s39O F2: the tasks' hooks ran twice, an error raised once was dropped)."""
    return HOOK_RAISED in getattr(err, "__notes__", ())
