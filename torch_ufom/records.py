"""The steps a reverse sweep keeps, and their vector-Jacobian products.

A :class:`StepRecord` is one inner step kept for the reverse sweep (the memory
schedules in :mod:`torch_ufom.schedules` decide which are kept, dropped and
recomputed): its leaf state, its inner gradient and, for an exact step, the graph
of the exact rule's output. Its VJPs give the adjoint of the previous state and
the step's meta-parameter terms, for the exact rule (``vjp_exact``) and the
first-order one (``vjp_first_order``). Linked records (a connected sweep) are
differentiated in one backward through their joined graph (:func:`chain_vjp`);
:class:`Unchain` says that a chained step's loss differentiated through the
earlier steps, and the sweep runs again unchained. :func:`second_derivatives`
turns torch's "derivative ... not implemented" into an error that says the exact
sweep needed it.
"""
from __future__ import annotations

import contextlib
import re
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .protocols import Loop, State

__all__ = ["StepRecord", "chain_vjp", "second_derivatives", "Unchain"]


class Unchain(Exception):
    """Raised by :meth:`~torch_ufom.unroll.InnerLoop.record` when a chained step's inner loss differentiated
    through the earlier steps (``SweepPlan.connected``): the sweep runs again unchained."""


def _vjp(outputs, inputs, cotangents, retain_graph: bool = False):
    """The VJP of ``outputs`` at ``cotangents`` with respect to ``inputs`` (``None`` for those
    that do not require grad or are not reached); ``retain_graph``:
    :attr:`~torch_ufom.unroll.InnerLoop.retain`."""
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad and c is not None]
    if not pairs:
        return [None] * len(inputs)
    live = [i for i, t in enumerate(inputs) if t.requires_grad]
    try:
        got = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in live],
                                  [c for _, c in pairs], allow_unused=True, retain_graph=retain_graph)
    except RuntimeError as err:
        if retain_graph or "backward through the graph a second time" not in str(err):
            raise
        raise RuntimeError(
            f"{err} [torch_ufom: a loss reads a tensor computed with its graph before the call (w = "
            "softplus(raw) outside the loss) at some inner steps but not at the first, where the "
            "library looks for such graphs to keep them (review GD F4): compute it inside the "
            "losses, or read it at every step]") from err
    out: List[Optional[Tensor]] = [None] * len(inputs)
    for i, g in zip(live, got):
        out[i] = g
    return out


def chain_vjp(records: List["StepRecord"], e):
    """``(e_start, dtheta)``: the VJP at ``e`` of the linked exact steps of a connected
    sweep (``SweepPlan.connected``), newest record first, in one backward through
    their graph; ``dtheta`` sums the meta-parameter terms of every step.

    Consumes ``records`` (the list is emptied): the backward then frees each
    step's tensors as it passes them instead of holding every state to the end
    (about 5 % of the backward's time on the 64-320-320-10 MLP).
    """
    outputs, leaves = records[0].exact, records[-1].leaves.diff
    inputs, retain = list(leaves) + records[-1].loop.meta, records[-1].loop.retain
    records.clear()
    with second_derivatives():
        return _split(leaves, _vjp(outputs, inputs, e, retain))


@contextlib.contextmanager
def second_derivatives():
    """Around a VJP through an inner gradient's graph: torch's error for an operator
    whose backward has no derivative ("the derivative for '...' is not implemented")
    is raised again, of the same type, saying that the exact sweep needed it and that
    ``mode='fom'`` needs none; any other error passes unchanged."""
    try:
        yield
    except RuntimeError as err:  # NotImplementedError is one
        found = re.search(r"derivative for (.+?) is not implemented", str(err))
        if found is None or type(err) not in (RuntimeError, NotImplementedError):
            raise
        raise type(err)(
            f"{str(err).rstrip('. ')}: an exact hypergradient (mode='exact' or 'truncated', ufom's "
            f"exact branch, a truncation law's exact steps) differentiates the inner loss's gradient, "
            f"and torch has no derivative for {found.group(1)}, which that gradient runs; use "
            "mode='fom' (no second derivatives), or write that part of the inner loss with operators "
            "that have one (docs/porting.md, 'Operators without a second derivative')") from err


def _split(leaves: Sequence[Tensor], grads):
    """``(state adjoint, meta terms)`` from the VJP on ``leaves + meta`` (zeros for ``None``)."""
    n = len(leaves)
    state_adj = tuple(torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads[:n]))
    return state_adj, list(grads[n:])


class StepRecord:
    """One inner step kept for the reverse sweep: its leaf state, its inner
    gradient and, for an exact step, the graph of the exact rule's output."""

    def __init__(self, loop: Loop, leaves: State, out, grads, next_state: State, loss,
                 exact: bool, j: int = 0):
        self.loop, self.leaves, self.loss, self.j, self.is_exact = loop, leaves, loss, j, exact
        # Reverse-over-reverse keeps the exact rule's graph; forward-over-reverse
        # keeps only the inner gradient and differentiates the update alone.
        self.forward_over_reverse = exact and loop.hvp == "fwdrev"
        self.exact = out[0] + out[1] if exact and not self.forward_over_reverse else None
        # The inner gradient, held constant by the first-order rule; exact
        # records that no first-order VJP will visit do not keep it.
        self.grads = None if grads is None else tuple(g.detach() for g in grads)
        self.next_state = next_state
        self.linked = False  # whether it continues the previous record's graph (SweepPlan.connected)

    def release(self, keep_inputs: bool) -> None:
        """Drop this linked record's outputs (and its inputs unless ``keep_inputs``): a
        newer linked record continues its graph, and :func:`chain_vjp` reads only the
        newest record's outputs and the oldest record's inputs. The graph keeps what
        its backward needs."""
        self.exact = self.next_state = None
        if not keep_inputs:
            self.leaves = None

    def release_inputs(self) -> None:
        """Drop this linked record's inputs (the previous record's outputs)."""
        self.leaves = None

    def _split(self, grads):
        return _split(self.leaves.diff, grads)

    def vjp_first_order(self, f):
        """``(f_{j-1}, dtheta)``: VJP of the first-order rule ``F~_j`` at ``f``."""
        with torch.enable_grad():
            first = self.loop.apply_rule(self.grads, self.leaves)
        inputs = list(self.leaves.diff) + self.loop.meta
        return self._split(_vjp(first[0] + first[1], inputs, f, self.loop.retain))

    def vjp_exact(self, e, log):
        """``(e_{j-1}, dtheta)``: VJP of the exact rule ``F_j`` at ``e`` (a Hessian-vector product).
        A forward-over-reverse product evaluates the step's loss again: it goes to ``log``'s
        ``product`` (:meth:`~torch_ufom.estimators.SweepLog.product`), compared there with the
        step's own."""
        if not self.forward_over_reverse:
            with second_derivatives():
                inputs = list(self.leaves.diff) + self.loop.meta
                return self._split(_vjp(self.exact, inputs, e, self.loop.retain))
        # F_j(s) = U(g(phi), s): the VJP of U at e gives the gradient's cotangent u,
        # which reaches phi as H u (the Hessian is symmetric).
        inputs = list(self.leaves.diff) + self.loop.meta
        with torch.enable_grad():
            g = tuple(t.detach().requires_grad_() for t in self.grads)
            out = self.loop.apply_rule(g, self.leaves)
        got = _vjp(out[0] + out[1], inputs + list(g), e, self.loop.retain)
        u = got[len(inputs):]
        hv, loss = self.loop.hessian_vector(self.leaves, self.j, u)
        log.product(loss, self.loss, self.j)
        n = len(self.leaves.params)
        params = [h if a is None else a + h for a, h in zip(got[:n], hv)]
        return self._split(params + got[n:len(inputs)])
