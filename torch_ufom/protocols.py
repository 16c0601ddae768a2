"""The data a sweep passes around and the two protocols it runs through.

:class:`State` is the inner state ``(params, opt, buffers)``; a :class:`Problem`
is what every task of one call shares; a :class:`SweepPlan` says which steps a
sweep records how. An :class:`Evaluator` evaluates the losses for one task
(:class:`~torch_ufom.unroll.PerTask`) or a stack of them
(:class:`~torch_ufom.vectorised.Vectorised`); a :class:`Loop` is the inner loop
the estimators and memory schedules drive (:class:`~torch_ufom.unroll.InnerLoop`
is its one implementation). The modules that only use these types (the step
records, the schedules, the estimators, the rule checks) import them from here,
not from the engine.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, NamedTuple, Optional, Protocol, Sequence, Tuple

import torch
from torch import Tensor, nn

from .functional_model import FunctionalModel

__all__ = ["State", "Problem", "SweepPlan", "Evaluator", "Loop"]


class State(NamedTuple):
    """An inner state: adapted parameters, optimizer state, buffers (tuples of tensors)."""

    params: Tuple[Tensor, ...]
    opt: Tuple[Tensor, ...]
    buffers: Tuple[Tensor, ...]

    @property
    def diff(self) -> Tuple[Tensor, ...]:
        """The differentiable part: ``params + opt``."""
        return self.params + self.opt

    def detach(self) -> "State":
        """A copy of the state cut from any graph."""
        return State(*(tuple(t.detach() for t in part) for part in self))


class Problem(NamedTuple):
    """What every task of one call shares: the module, the losses, the resolved
    configuration, the truncation law of this call (``config.law``, or the
    current ``q``'s law under ``q="auto"``), the tensors that get
    hypergradients, the Hessian-vector product and the generator. The entry points
    that compute hypergradients build it with
    :func:`~torch_ufom.functional.bind_problem`; ``adapt`` builds one of its own,
    with no outer loss, meta-parameters or Hessian-vector products."""

    model: nn.Module
    inner_loss: Callable
    outer_loss: Callable
    config: Any  # torch_ufom.config.Config
    law: Any  # torch_ufom.truncation.TruncationLaw
    params: Tuple[Tensor, ...]
    hvp: str
    generator: Optional[torch.Generator]
    keeps_aux: bool = False  # the outer loss's aux is kept (MetaResult.aux): check_kept_aux


class SweepPlan(NamedTuple):
    """Which steps a sweep records how (computed by the estimator from ``K``).

    Attributes:
        exact_after: steps ``j > exact_after`` are differentiated exactly (``r - K``).
        first_order_until: exact records of steps ``j <= first_order_until``
            keep their gradient for the first-order stream.
        connected: each exact step after the first takes the previous step's
            output as its input, so that the exact steps form one graph that
            one backward differentiates (:func:`~torch_ufom.records.chain_vjp`); only for schedules
            that keep every step's graph, reverse-over-reverse HVPs and an
            estimator that needs no per-step adjoint.
    """

    exact_after: int
    first_order_until: int
    connected: bool = False


class Evaluator(Protocol):
    """How a loop evaluates its losses: one task (:class:`PerTask`) or a stacked
    meta-batch (:class:`~torch_ufom.vectorised.Vectorised`). Every method gets
    the loop (module, losses, names), the state and the batch; the loop applies
    the step's random stream around the call."""

    def stack(self, params: Tuple[Tensor, ...]) -> Tuple[Tensor, ...]:
        """The initial adapted parameters from the module's (detached) ones."""

    def grad(self, loop: "Loop", state: State, batch: Any, create_graph: bool,
             fmodel: Optional[FunctionalModel] = None):
        """``(loss, grads, buffers)`` of the inner loss at ``state``; with
        ``create_graph``, differentiable again by ``torch.autograd``. ``fmodel``:
        ``loop.fmodel(state.params, ())`` made once by the caller for a module
        without buffers (an evaluator may ignore it)."""

    def hvp(self, loop: "Loop", state: State, batch: Any, vec: Tuple[Tensor, ...]):
        """``(H v, loss)``: the inner loss's Hessian at ``state.params`` times ``vec`` by
        forward-over-reverse, and the loss (detached) that evaluation computed."""

    def outer(self, loop: "Loop", params: Tuple[Tensor, ...], state: State):
        """The outer loss (per task) at ``params`` (leaves that require grad), its aux
        (``()`` for none), its gradient with respect to ``params + loop.meta``
        (summed over tasks) and the buffers as its forward left them (a train-mode
        BatchNorm's running statistics updated by the query batch)."""

    def reduce(self, adjoint: Tensor) -> Tensor:
        """A shared initial parameter's adjoint from its state's adjoint."""


class Loop(Protocol):
    """The contract between the inner loop and its users: what the memory schedules
    (:mod:`~torch_ufom.schedules`), the estimator
    (:func:`~torch_ufom.estimators.estimate`) and the step records read of a loop.
    :class:`~torch_ufom.unroll.InnerLoop` is the one implementation; a loop never changes
    after construction, and everything a sweep produces is returned or reported to its log.
    """

    module: nn.Module  # the user's module (never modified)
    named: Dict[str, Tensor]  # its parameters by name
    names: List[str]  # the adapted parameters, in state order
    meta: List[Tensor]  # the meta-parameters that require grad
    rule: Any  # the inner rule
    steps: int  # r
    learned_hyper: bool  # whether a meta-parameter is one of the rule's hyperparameters
    dense_grads: bool  # the rule is not first-order additive: sparse gradients are made dense
    per_step: bool  # the batches are per step (a loss may do at some steps only what matters)
    step_function: bool  # they come from a callable j -> batch, called again where a step is
    hvp: str  # the Hessian-vector product: "revrev" or "fwdrev" (the step records read it)
    retain: bool  # the VJPs keep the graph: a loss reads one made before the call

    def initial_state(self, differentiated: bool = False) -> State:
        """``s_0`` (``differentiated``: for a hypergradient, see
        :meth:`~torch_ufom.unroll.InnerLoop.initial_state`)."""

    def advance(self, state: State, j: int) -> Tuple[State, Tensor, Tuple[Tensor, ...]]:
        """Step ``j`` without a graph: ``(s_j, loss_j, g_j)``."""

    def forward(self, state: State, stop: int, log) -> Tuple[State, Optional[Tuple[Tensor, ...]]]:
        """Steps ``1..stop`` from ``s_0`` without a graph, each loss to ``log.first``:
        ``(s_stop, summed gradients or None)``."""

    def record(self, state: State, j: int, plan: SweepPlan) -> Any:  # a records.StepRecord
        """Step ``j`` kept for the reverse sweep, as ``plan`` says."""

    def outer_vjp(self, state: State):
        """``(e_r, explicit meta terms, outer loss, aux, buffers after the outer loss)`` at ``s_r``."""

    def first_order_theta(self, f_params, grad_sum, state: State):
        """The meta terms of an additive rule's first-order steps."""

    def reduce(self, adjoint: Tensor) -> Tensor:
        """A shared initial parameter's adjoint from its state's adjoint."""

    def hessian_vector(self, state: State, j: int, vec) -> Tuple[Tuple[Tensor, ...], Tensor]:
        """``(H v, loss)`` of step ``j``'s inner loss (forward-over-reverse), the loss as
        that evaluation computed it."""

    def gradient_graph(self, state: State, j: int) -> Tuple[Tuple[Tensor, ...], Tuple[Tensor, ...]]:
        """``(leaves, grads)``: step ``j``'s inner gradient taken with a graph at fresh leaves."""

    def draws_own_generator(self, run: Callable[[], Any]) -> Tuple[Any, bool]:
        """``run()`` (a step evaluated again) and whether it drew from a generator of the user's."""

    def apply_rule(self, grads, state: State):
        """The inner rule's update at ``state`` (differentiable)."""

    def unread_params(self) -> frozenset:
        """The adapted parameters no loss read (after :meth:`outer_vjp`)."""

    def note_unread(self, missing: frozenset) -> None:
        """An evaluator's report: one step's inner loss did not read ``missing``."""

    def check_twice_differentiable(self, loss: Tensor, params: Sequence[Tensor]) -> None:
        """An evaluator's check of an inner loss evaluated with a graph at ``params``."""
