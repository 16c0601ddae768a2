"""The inner loop as a pure step function of an explicit state.

:class:`InnerLoop` binds the user's module, losses, batches and inner rule.
Its inner state is ``State(params, opt, buffers)``; the differentiable part is
``params + opt``. Two step functions share one body:

* :meth:`InnerLoop.advance` computes ``s_j`` from ``s_{j-1}`` without a graph
  (the forward pass and its replays);
* :meth:`InnerLoop.record` rebuilds step ``j`` with a graph and returns the
  vector-Jacobian products of the exact rule ``F_j`` and of the first-order
  rule ``F~_j`` (the inner gradient held constant).

Every step ``j`` runs its losses under its own random stream, seeded from one
base seed and ``j``, so that dropout replays bit-identically whenever a step is
recomputed.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["FunctionalModel", "State", "InnerLoop", "StepBatches", "batch_getter"]


class FunctionalModel:
    """The user's module evaluated at given parameters and buffers.

    Call it exactly like the module: ``fmodel(x)`` runs
    ``torch.func.functional_call(module, (params, buffers), (x,))``. Buffers
    are cloned for each step, so in-place updates (BatchNorm's running
    statistics) land on the inner state, never on the module.
    """

    def __init__(self, module: nn.Module, params: Dict[str, Tensor], buffers: Dict[str, Tensor]):
        self.module = module
        self.params = params
        self.buffers = buffers

    def __call__(self, *args, **kwargs):
        return functional_call(self.module, (self.params, self.buffers), args, kwargs)

    def named_parameters(self):
        """Iterate over ``(name, tensor)`` pairs of the current inner parameters."""
        return iter(self.params.items())

    def parameters(self):
        """Iterate over the current inner parameters."""
        return iter(self.params.values())


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


class StepBatches:
    """One batch per inner step: ``StepBatches([b_0, ..., b_{steps-1}])``.

    A plain list or tuple passed as ``support`` is one batch (``[x, y]``, as a
    ``DataLoader`` yields it) reused at every step; wrap a sequence of
    per-step batches in ``StepBatches`` (or pass a callable ``j -> batch``)
    to give each step its own. In a meta-batch, each entry is a stacked batch
    (tasks along dimension 0).

    Args:
        batches: a sequence of exactly ``steps`` batches.
    """

    def __init__(self, batches):
        if isinstance(batches, (Tensor, Mapping, str)) or not hasattr(batches, "__len__") or \
                not hasattr(batches, "__getitem__"):
            raise TypeError(f"Invalid batches: expected a sequence of per-step batches, got "
                            f"{type(batches).__name__}")
        self.batches = list(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, j: int):
        return self.batches[j]

    def __repr__(self) -> str:
        return f"StepBatches({len(self.batches)} batches)"


def batch_getter(support: Any, steps: int, arg: str = "support") -> Callable[[int], Any]:
    """Return ``j -> batch`` (``j = 0..steps-1``) for the three kinds of support.

    A callable is used as is, a :class:`StepBatches` must hold exactly
    ``steps`` batches, and anything else (a tensor, a tuple or list of
    tensors, a dict) is one batch reused at every step.
    """
    if isinstance(support, StepBatches):
        if len(support) != steps:
            raise ValueError(
                f"Invalid {arg}: StepBatches must hold exactly steps={steps} batches, got "
                f"{len(support)}")
        return support.__getitem__
    if callable(support) and not isinstance(support, (Tensor, nn.Module)):
        return support
    return lambda j: support


def _check_loss(loss: Any, name: str) -> Tensor:
    """``loss`` if it is a real floating-point scalar tensor that depends on the
    parameters; else an error naming the loss function (``name``).

    Only metadata is read (type, shape, dtype, device, ``requires_grad``): no
    value, so no host synchronisation per step. Inside ``torch.func.vmap`` a
    batched tensor does not carry ``requires_grad`` (a caller that vmaps a loss
    under ``torch.autograd`` checks the result with :func:`_check_depends`).
    """
    if not isinstance(loss, Tensor):
        raise TypeError(f"Invalid {name}: it must return a scalar tensor, got "
                        f"{type(loss).__name__}")
    if loss.dim() != 0:
        raise ValueError(f"Invalid {name}: it must return a scalar tensor, got shape "
                         f"{tuple(loss.shape)}")
    if not loss.dtype.is_floating_point:
        raise TypeError(f"Invalid {name}: it must return a real floating-point scalar tensor, "
                        f"got dtype {loss.dtype}")
    if loss.device.type == "meta":
        raise ValueError(f"Invalid {name}: it returned a tensor on the meta device, which has no "
                         "values (expected the device of the model's parameters)")
    if not _batched(loss):
        _check_depends(loss, name)
    return loss


def _check_depends(loss: Tensor, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` if ``loss`` does not require grad."""
    if not loss.requires_grad:
        raise ValueError(
            f"Invalid {name}: its value does not depend on the parameters (requires_grad=False: "
            "a constant, a detached tensor, or a loss computed under torch.no_grad()); it must "
            "be computed from fmodel's output or its parameters")


def _batched(t: Tensor) -> bool:
    """Whether ``t`` is a tensor batched by ``torch.func.vmap``."""
    probe = getattr(torch._C._functorch, "is_batchedtensor", None)
    # Without the probe, assume batched: the check is then autograd's own.
    return probe is None or bool(probe(t))


class InnerLoop:
    """The inner loop of one task as pure functions of an explicit state.

    Args:
        module: the user's ``nn.Module`` (never modified).
        inner_loss, outer_loss: ``(fmodel, batch) -> scalar tensor``.
        support: one batch, a list of ``steps`` batches, or ``j -> batch``.
        query: the batch of the outer loss.
        steps: number of inner steps ``r``.
        rule: an :class:`~torch_ufom.inner.InnerRule`.
        meta: meta-parameters (tensors that receive hypergradients).
        seed: base seed of the per-step random streams.
        hvp: how an exact reverse step gets its Hessian-vector product:
            ``"revrev"`` (reverse-over-reverse: the step is recorded with a
            graph of its inner gradient, ``create_graph=True``, and
            differentiated again) or ``"fwdrev"`` (forward-over-reverse:
            ``torch.func.jvp`` of ``torch.func.grad`` of the inner loss; the
            step keeps no graph). See :func:`resolve_hvp`.
    """

    def __init__(self, module, inner_loss, outer_loss, support, query, steps, rule, meta, seed,
                 hvp: str = "revrev", math_attention: bool = False):
        self.module = module
        self.inner_loss, self.outer_loss, self.query = inner_loss, outer_loss, query
        self.batch = batch_getter(support, steps)
        self.steps, self.rule, self.seed = steps, rule, seed
        named = list(module.named_parameters())
        self.names = [n for n, p in named if p.requires_grad]
        self.frozen = {n: p for n, p in named if not p.requires_grad}
        self.buffer_names = [n for n, _ in module.named_buffers()]
        self.meta = [t for t in meta if t.requires_grad]
        meta_ids = {id(t) for t in self.meta}
        self.learned_hyper = any(id(t) in meta_ids for t in rule.tensors())
        self.hvp = hvp
        devices = {t.device for t in self.initial_params()}
        self.cuda_devices = sorted({d.index or 0 for d in devices if d.type == "cuda"})
        self.exact_after = 0  # steps j > exact_after are differentiated exactly (r - K)
        self.first_order_until = steps  # exact records of steps j <= this keep g for F~
        self.forward_steps = 0  # inner steps run without a graph (forward pass and replays)
        self.reverse_steps = 0  # inner steps rebuilt with a graph for a VJP
        # Steps that will be rebuilt with a graph run attention under the math kernel in
        # every evaluation (forward, replays, rebuilds): the fused kernels have no double
        # backward and draw their dropout masks differently.
        self.math_attention = math_attention
        # Whether every inner loss evaluated so far (forward pass, replays, rebuilds) was
        # finite: a 0-d bool tensor on the losses' device, read once per task.
        self.finite: Optional[Tensor] = None

    # -- state -----------------------------------------------------------------
    def initial_params(self) -> Tuple[Tensor, ...]:
        """The module's adapted parameters, detached."""
        params = dict(self.module.named_parameters())
        return tuple(params[n].detach() for n in self.names)

    def initial_state(self) -> State:
        """``s_0``: the module's parameters, the rule's initial state, the module's buffers."""
        params = self.initial_params()
        opt = tuple(self.rule.init(dict(zip(self.names, params))))
        buffers = tuple(b.detach() for _, b in self.module.named_buffers())
        return State(params, opt, buffers)

    def fmodel(self, params: Sequence[Tensor], buffers: Sequence[Tensor]) -> FunctionalModel:
        """A :class:`FunctionalModel` at ``params``, with fresh copies of ``buffers``."""
        p = dict(zip(self.names, params))
        p.update(self.frozen)
        b = {n: t.clone() for n, t in zip(self.buffer_names, buffers)}
        return FunctionalModel(self.module, p, b)

    # -- random streams ----------------------------------------------------------
    @contextlib.contextmanager
    def stream(self, j: int):
        """Run the body under step ``j``'s own random stream, restoring the global one."""
        seed = (self.seed + j * 0x9E3779B97F4A7C15) % (1 << 63)
        cpu = torch.get_rng_state()
        cuda = [torch.cuda.get_rng_state(d) for d in self.cuda_devices]
        torch.default_generator.manual_seed(seed)
        for d in self.cuda_devices:
            torch.cuda.default_generators[d].manual_seed(seed)
        try:
            with (_math_attention() if self.math_attention else contextlib.nullcontext()):
                yield
        finally:
            torch.set_rng_state(cpu)
            for d, s in zip(self.cuda_devices, cuda):
                torch.cuda.set_rng_state(s, d)

    # -- one inner step ------------------------------------------------------------
    def _grad_and_update(self, state: State, j: int, create_graph: bool):
        params = state.params
        fm = self.fmodel(params, state.buffers)
        with self.stream(j):
            loss = _check_loss(self.inner_loss(fm, self.batch(j - 1)), "inner_loss")
        grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
        grads = tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))
        new_buffers = tuple(fm.buffers[n] for n in self.buffer_names)
        return loss, grads, new_buffers

    def _update(self, grads, state: State):
        new_p, new_opt = self.rule.update(
            dict(zip(self.names, grads)), state.opt, dict(zip(self.names, state.params)),
            self.rule.hyper)
        return tuple(new_p[n] for n in self.names), tuple(new_opt)

    def advance(self, state: State, j: int):
        """Step ``j`` without a graph: returns ``(s_j, loss_j, g_j)``."""
        self.forward_steps += 1
        params = tuple(p.detach().requires_grad_() for p in state.params)
        state = State(params, state.opt, state.buffers)
        with torch.enable_grad():
            loss, grads, buffers = self._grad_and_update(state, j, create_graph=False)
        with torch.no_grad():
            new_p, new_opt = self._update(grads, State(tuple(p.detach() for p in params),
                                                       state.opt, state.buffers))
        self._track(loss)
        return State(new_p, new_opt, buffers), loss.detach(), grads

    def record(self, state: State, j: int, exact: bool = True) -> "StepRecord":
        """Step ``j`` kept for the reverse sweep: with a graph of the exact rule
        (``exact``), or only its gradient for the first-order rule."""
        if exact:
            self.reverse_steps += 1
        else:
            self.forward_steps += 1
        leaves = State(*(tuple(t.detach().requires_grad_(t.is_floating_point()) for t in part)
                         for part in state[:2]), state.buffers)
        graph = exact and self.hvp == "revrev"
        with torch.enable_grad():
            loss, grads, buffers = self._grad_and_update(leaves, j, create_graph=graph)
            if graph:
                out = self._update(grads, leaves)
        if not graph:
            with torch.no_grad():
                out = self._update(grads, leaves)
        self._track(loss)
        keep = not graph or j <= self.first_order_until
        return StepRecord(self, leaves, out, grads if keep else None, buffers, loss.detach(), exact, j)

    def _track(self, loss: Tensor) -> None:
        """Fold ``loss``'s finiteness into :attr:`finite` (no host synchronisation)."""
        with torch.no_grad():
            ok = torch.isfinite(loss).all()
            self.finite = ok if self.finite is None else self.finite & ok

    def hessian_vector(self, state: State, j: int, vec: Sequence[Optional[Tensor]]) -> Tuple[Tensor, ...]:
        """``H v``: the Hessian of step ``j``'s inner loss at ``state.params`` times ``vec``,
        by forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``), under
        step ``j``'s random stream."""
        params = tuple(p.detach() for p in state.params)
        vec = tuple(torch.zeros_like(p) if v is None else v.detach() for p, v in zip(params, vec))
        batch = self.batch(j - 1)

        def loss_of(ps):
            return self.inner_loss(self.fmodel(ps, state.buffers), batch)

        with self.stream(j):
            try:
                return torch.func.jvp(torch.func.grad(loss_of), (params,), (vec,))[1]
            except RuntimeError as err:
                raise fwdrev_error(err, j) from err

    def reduce(self, adjoint: Tensor) -> Tensor:
        """The adjoint of a shared initial parameter from the state's adjoint (identity
        here; a meta-batch sums over its tasks)."""
        return adjoint

    # -- outer loss ------------------------------------------------------------------
    def outer_vjp(self, state: State):
        """``dL_out/d(params + opt)`` at ``s_r``, the explicit ``dL_out/dtheta`` and the loss."""
        params = tuple(p.detach().requires_grad_() for p in state.params)
        with torch.enable_grad():
            fm = self.fmodel(params, state.buffers)
            with self.stream(self.steps + 1):
                loss = _check_loss(self.outer_loss(fm, self.query), "outer_loss")
            grads = torch.autograd.grad(loss, params + tuple(self.meta), allow_unused=True)
        e = tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))
        e = e + tuple(torch.zeros_like(t) for t in state.opt)
        return e, list(grads[len(params):]), loss.detach()

    def first_order_theta(self, f_params: Sequence[Tensor], grad_sum: Sequence[Tensor], state: State):
        """The meta-parameter terms of the first-order steps of an additive rule.

        For a rule with ``first_order_additive``, the first-order VJP leaves the
        adjoint ``f`` unchanged, so the meta-parameter terms of all those steps
        add up to one VJP of ``update`` at the summed gradients.
        """
        if not self.meta:
            return [None] * len(self.meta)
        with torch.enable_grad():
            new_p, _ = self._update(tuple(grad_sum), state)
        outs = [(o, f) for o, f in zip(new_p, f_params) if o.requires_grad]
        if not outs:
            return [None] * len(self.meta)
        return list(torch.autograd.grad([o for o, _ in outs], self.meta,
                                        [f for _, f in outs], allow_unused=True))


def _math_attention():
    """Run ``scaled_dot_product_attention`` under its math kernel (differentiable twice)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.MATH])


def fwdrev_error(err: Exception, j: int) -> RuntimeError:
    """The error raised when forward-over-reverse fails inside ``torch.func``."""
    return RuntimeError(
        f"hvp='fwdrev' failed inside torch.func.jvp(torch.func.grad(inner_loss)) at inner step "
        f"{j}: {err}. Some operators have no forward-over-reverse formula in this torch "
        "(F.mse_loss in torch 2.13, for one); use hvp='revrev' or hvp='auto'")


def _vjp(outputs, inputs, cotangents, retain_graph=False):
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad and c is not None]
    if not pairs:
        return [None] * len(inputs)
    live = [i for i, t in enumerate(inputs) if t.requires_grad]
    got = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in live],
                              [c for _, c in pairs], allow_unused=True, retain_graph=retain_graph)
    out: List[Optional[Tensor]] = [None] * len(inputs)
    for i, g in zip(live, got):
        out[i] = g
    return out


class StepRecord:
    """One inner step kept for the reverse sweep: its leaf state, its inner
    gradient and, for an exact step, the graph of the exact rule's output."""

    def __init__(self, loop: InnerLoop, leaves: State, out, grads, buffers, loss, exact: bool,
                 j: int = 0):
        self.loop, self.leaves, self.loss, self.j = loop, leaves, loss, j
        # Reverse-over-reverse keeps the exact rule's graph; forward-over-reverse
        # keeps only the inner gradient and differentiates the update alone.
        self.forward_over_reverse = exact and loop.hvp == "fwdrev"
        self.exact = out[0] + out[1] if exact and not self.forward_over_reverse else None
        # The inner gradient, held constant by the first-order rule; exact
        # records that no first-order VJP will visit do not keep it.
        self.grads = None if grads is None else tuple(g.detach() for g in grads)
        self.next_state = State(tuple(t.detach() for t in out[0]),
                                tuple(t.detach() for t in out[1]), buffers)

    def _split(self, grads):
        n = len(self.leaves.diff)
        state_adj = tuple(torch.zeros_like(t) if g is None else g
                          for t, g in zip(self.leaves.diff, grads[:n]))
        return state_adj, list(grads[n:])

    def vjp_first_order(self, f):
        """``(f_{j-1}, dtheta)``: VJP of the first-order rule ``F~_j`` at ``f``."""
        with torch.enable_grad():
            first = self.loop._update(self.grads, self.leaves)
        return self._split(_vjp(first[0] + first[1], list(self.leaves.diff) + self.loop.meta, f))

    def vjp_exact(self, e):
        """``(e_{j-1}, dtheta)``: VJP of the exact rule ``F_j`` at ``e`` (a Hessian-vector product)."""
        if not self.forward_over_reverse:
            return self._split(_vjp(self.exact, list(self.leaves.diff) + self.loop.meta, e))
        # F_j(s) = U(g(phi), s): the VJP of U at e gives the gradient's cotangent u,
        # which reaches phi as H u (the Hessian is symmetric).
        inputs = list(self.leaves.diff) + self.loop.meta
        with torch.enable_grad():
            g = tuple(t.detach().requires_grad_() for t in self.grads)
            out = self.loop._update(g, self.leaves)
        got = _vjp(out[0] + out[1], inputs + list(g), e)
        u = got[len(inputs):]
        hv = self.loop.hessian_vector(self.leaves, self.j, u)
        n = len(self.leaves.params)
        params = [h if a is None else a + h for a, h in zip(got[:n], hv)]
        return self._split(params + got[n:len(inputs)])
