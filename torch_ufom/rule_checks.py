"""The checks of an inner rule's results, and whether it reads what it is given.

A rule of the user's is a contract (:class:`~torch_ufom.inner.InnerRule`): its
``init`` and ``update`` return containers of tensors named after the parameters,
differentiably, without writing into their inputs. The inner loop checks the
results once (:func:`checked_rule_state`, :func:`checked_update`) and refuses a
break of the contract with one of the messages here (:func:`init_with_derivative`,
:func:`inplace_update`, :func:`detached_update`, ...). :func:`rule_reads_meta` decides
whether a rule reads the meta-parameters beyond the gradient (``ufom``'s
first-order stream is the identity otherwise), and :func:`elementwise_rule`
whether it acts on each coordinate alone.
"""
from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from typing import Any, List, Sequence, Tuple

import torch
import torch.utils._pytree as pytree
from torch.autograd import forward_ad
from torch import Tensor, nn

from .graphs import graph_nodes, graph_reaches, graph_targets, root_of
from .inner import own_code, shortcut
from .protocols import State
from .randomness import set_torch_random_states, torch_random_states

__all__ = ["held_tensors", "rule_reads_meta", "checked_rule_state", "checked_update", "init_with_derivative",
           "init_reaches_learned", "init_unchecked", "inplace_update", "detached_update", "elementwise_rule",
           "library_code", "versions", "checked_init", "written_argument", "init_reentrant"]


def held_tensors(rule: Any) -> List[Tensor]:
    """The tensors an inner rule holds: its hyperparameters'
    (:meth:`~torch_ufom.inner.InnerRule.tensors`) and those held as attributes (a learned
    optimiser's weights, an ``nn.Module``'s parameters, lists, tuples and dicts of them)."""
    held = list(rule.tensors())
    for leaf in pytree.tree_leaves(list(vars(rule).values())):
        if isinstance(leaf, Tensor):
            held.append(leaf)
        elif isinstance(leaf, nn.Module):
            held.extend(leaf.parameters())
    return held


def rule_reads_meta(rule: Any, meta: Sequence[Tensor], params: Mapping[str, Tensor], steps: int) -> bool:
    """Whether the inner rule reads a meta-parameter, which gives it first-order terms
    of its own that the shortcuts of ``first_order_additive`` and
    ``first_order_identity`` would drop: a tensor it holds (:func:`held_tensors`)
    that shares its root with a meta-parameter (``lrs[i]`` of a held ``lrs``, or of a
    ``params=[lrs[:4]]``; sharing a root without overlapping only costs the shortcut).
    A rule of the user's that declares a shortcut but holds none is also evaluated
    for its first two steps (of ``steps``) at ``params`` (the adapted parameters,
    gradients of ones) and its graph searched for the meta-parameters: it may reach
    them through an object or a closure (a tensor read only from the third step on,
    behind a branch, is missed: hold it as an attribute). That runs at every call;
    only a "yes" is kept per rule object (a "no" can turn into a "yes" when the
    rule's objects change), and an error in the evaluation counts as a "yes"."""
    roots = {id(root_of(t)) for t in meta}
    if any(id(root_of(t)) in roots for t in held_tensors(rule)):
        return True
    if library_code(rule) or not (shortcut(rule, "first_order_additive")
                                   or shortcut(rule, "first_order_identity")):
        return False  # a built-in rule's code, which reads only hyperparameters, or no shortcut to lose
    key = (id(rule), tuple(id(t) for t in meta))
    if _READS_META.get(key) is rule:
        return True
    try:
        found = _update_reads(rule, meta, params, steps)
    except Exception:  # noqa: BLE001 (the sweep runs the rule and raises what it raises)
        found = True  # only the shortcut is lost
    if found:
        try:
            _READS_META[key] = rule
        except TypeError:  # a rule without weak references (__slots__): asked every time
            pass
    return found


# (id(rule), meta ids) -> the rule, for the rules found to read their meta-parameters; an
# entry goes with its rule.
_READS_META: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()


def _update_reads(rule: Any, meta: Sequence[Tensor], params: Mapping[str, Tensor], steps: int) -> bool:
    """Whether the first two steps (at most ``steps``) of ``rule.update`` at ``params``
    reach a meta-parameter."""
    leaves = {id(t) for t in meta}
    nodes = {t.grad_fn for t in meta if t.grad_fn is not None}
    detached = {n: p.detach() for n, p in params.items()}
    ones = {n: torch.ones_like(p) for n, p in detached.items()}
    with torch.enable_grad():
        outs = [rule.update(ones, tuple(rule.init(detached)), detached, rule.hyper)]
        if steps >= 2:
            outs.append(rule.update(ones, tuple(outs[0][1]), dict(outs[0][0]), rule.hyper))
    starts = [t.grad_fn for t in pytree.tree_leaves(outs) if isinstance(t, Tensor)]
    return graph_reaches(starts, leaves, nodes)


_RULES = "torch_ufom.inner"  # the module of the built-in rules


def library_code(rule: Any) -> bool:
    """Whether every method of ``rule`` is a built-in rule's: a subclass that only sets
    class attributes (porting.md's ``SignedSGD`` sets ``ranges``) runs the library's code;
    an instance given a method of its own (``rule.update = f``) does not (:func:`own_code`)."""
    return any(cls.__module__ == _RULES for cls in type(rule).__mro__) and not own_code(rule)


def checked_rule_state(rule: Any, state: Any, method: str) -> Tuple[Tensor, ...]:
    """``state``, what a rule of the user's ``init`` or ``update`` returned as its state, as a
    tuple; ``TypeError`` naming the rule unless a sequence of tensors (review s32E F3: None
    or a float failed deep inside)."""
    if isinstance(state, (str, bytes, Mapping, Tensor)) or not isinstance(state, Iterable):
        what = "None" if state is None else _a(type(state).__name__)
    else:
        state = tuple(state)  # (a list, a generator: taken as before, review s32H F4)
        what = next((f"{'None' if t is None else _a(type(t).__name__)} among its entries" for t in state
                     if not isinstance(t, Tensor)), None)
    if what is not None:
        raise TypeError(f"Invalid inner: {type(rule).__name__}.{method} returned {what} as its state "
                        "(expected a tuple or list of tensors, () for none)")
    return state


def _a(noun: str) -> str:
    """``noun`` with its indefinite article."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def checked_update(rule: Any, out: Any, names: Sequence[str], params: Sequence[Tensor]) -> Tuple[Any, Any]:
    """What a rule of the user's ``update`` returned, ``(new_params, new_state)``, checked: a
    mapping with a tensor of each adapted parameter's shape, dtype and device, and a tuple of
    tensors; else an error naming the rule (review s32E F3: a KeyError or a shape error of the
    model's, deep inside)."""
    where = f"Invalid inner: {type(rule).__name__}.update returned"
    if not (isinstance(out, Sequence) and not isinstance(out, (str, bytes)) and len(out) == 2):
        raise TypeError(f"{where} {_a(type(out).__name__)} (expected a pair (new_params, new_state): a dict "
                        "name -> tensor and a tuple or list of tensors)")
    new_p, new_opt = out
    if not isinstance(new_p, Mapping):
        raise TypeError(f"{where} {_a(type(new_p).__name__)} as its parameters (expected a dict name -> "
                        "tensor)")
    for name, p in zip(names, params):
        try:
            q = new_p[name]  # (as it is read: a dict's __missing__ too, review s32H F4)
        except KeyError:
            raise ValueError(f"{where} no entry for parameter {name!r} (expected a tensor of every adapted "
                             "parameter)") from None
        if not isinstance(q, Tensor):
            raise TypeError(f"{where} {'None' if q is None else _a(type(q).__name__)} for parameter {name!r} "
                            "(expected a tensor of every adapted parameter)")
        if (q.shape, q.dtype, q.device) != (p.shape, p.dtype, p.device):
            raise ValueError(f"{where} a tensor of shape {tuple(q.shape)}, {q.dtype} on {q.device} for "
                             f"parameter {name!r} (expected its shape {tuple(p.shape)}, {p.dtype} on "
                             f"{p.device})")
    return new_p, checked_rule_state(rule, new_opt, "update")


def init_with_derivative(rule: Any) -> str:
    """The error for a rule of the user's whose ``init`` returned a state with a graph."""
    return (f"Invalid inner: {type(rule).__name__}.init returned a state whose derivative with respect "
            "to the parameters (a proximal anchor, params[n] or params[n].clone()) or to a learned "
            "tensor is not zero, and a hypergradient does not differentiate init (the initial state is "
            "a constant of the inner loop). For an anchor at the meta-parameters, add the "
            "proximal term to inner_loss, reading the module's own parameter (the library "
            "differentiates a loss's direct read of a meta-parameter); for a constant one, return "
            "params[n].detach().clone()")


def init_reaches_learned(rule: Any) -> str:
    """The error for a rule of the user's whose ``init`` state's graph reaches a learned tensor."""
    return (f"Invalid inner: {type(rule).__name__}.init returned a state whose graph reaches a learned "
            "tensor (a hyperparameter or tensor the outer optimizer steps, read with gradients enabled), "
            "and a hypergradient does not differentiate init (the initial state is a constant of the inner "
            "loop): the library does not run a backward into learned tensors to tell whether that "
            "derivative is zero (their hooks would run). If the state is a constant (lr * 0), build it "
            "from lr.detach() or under torch.no_grad(); if it depends on the learned tensor, that "
            "dependence cannot be learned through init")


def init_unchecked(rule: Any, err: BaseException) -> str:
    """The error for a rule of the user's whose ``init`` the library cannot check."""
    said = (str(err).splitlines() or [""])[0][:160]
    return (f"Invalid inner: {type(rule).__name__}.init cannot be checked for a derivative with respect to "
            "the parameters, which a hypergradient would drop (init is not differentiated): it fails at "
            "copies of them that require grad and at forward-mode dual copies, or autograd cannot "
            f"differentiate its state ({type(err).__name__}: {said}). Build a constant state without a "
            "graph (from params[n].detach(), or under torch.no_grad())")


def inplace_update(rule: Any, what: str) -> str:
    """The error for a rule of the user's whose ``update`` wrote into one of its arguments."""
    return (f"Invalid inner: {type(rule).__name__}.update modified an argument in place {what}: the "
            "sweep keeps the arguments of each step (the gradient, the state, the parameters) and "
            "differentiates the update at them again, so a write into one changes what it "
            "differentiates. Write the update out of place (state[i] * beta + g * g, not "
            "state[i].mul_(beta).add_(g * g); g * 0.5, not grads[n].mul_(0.5))")


def versions(tensors: Sequence[Tensor]) -> List[int]:
    """The tensors' version counters (``-1`` for an inference tensor, which keeps none)."""
    return [-1 if t.is_inference() else t._version for t in tensors]


def detached_update(rule: Any, names: Sequence[str]) -> str:
    """The error for a rule of the user's whose ``update`` returned the parameters
    ``names`` without a graph."""
    return (f"Invalid inner: {type(rule).__name__}'s update returned {', '.join(map(repr, names[:3]))}"
            f"{' and others' if len(names) > 3 else ''} without a graph (requires_grad=False) from "
            "parameters that had one: an update run under torch.no_grad(), or one that detaches "
            "(.detach(), .data). Every mode of a hypergradient differentiates the update (fom too, along "
            "the parameters; adapt and adapt_batch, which keep no graph, run it as it is): write it with "
            "differentiable out-of-place ops, as the built-in rules of torch_ufom.inner")


def elementwise_rule(rule: Any) -> bool:
    """Whether ``rule``'s update acts on each entry of the state on its own: a built-in
    rule's code, or a rule of the user's that declares ``elementwise = True``. Only then
    does it run unchanged on a meta-batch's stacked state (and give each parameter an
    update of its own)."""
    return library_code(rule) or getattr(rule, "elementwise", False) is True


def init_reentrant(rule: Any) -> str:
    """The refusal of an ``init`` whose state a reentrant ``torch.utils.checkpoint`` computed
    (review s38R5 F3)."""
    return (f"Invalid inner: {type(rule).__name__}.init returned a state computed under a reentrant "
            "torch.utils.checkpoint (use_reentrant=True), which hides what it reads from the library's "
            "check for a derivative that a hypergradient would drop (init is not differentiated): use "
            "use_reentrant=False, or build a constant state under torch.no_grad()")


def checked_init(rule: Any, names: Sequence[str], named: Mapping[str, Tensor], meta: Sequence[Tensor],
                 params: Tuple[Tensor, ...]) -> Tuple[Tensor, ...]:
    """``rule.init`` at ``params`` (by ``names``; ``named``, the module's own tensors by name, tells
    the parameters among the learned ``meta``): the state of a rule of the user's, refused
    (``ValueError``) where it has a derivative that a hypergradient would drop (review s38IR F1: a
    proximal anchor ``params[n].clone()``, 4.5e-2 to 0.24 off): with respect to a parameter the
    hypergradient differentiates (one whose tensor is among the learned ones; review s38R4 F3:
    ``params=[lr]`` alone differentiates none), or to a learned tensor, or is a copy of such a
    parameter or a learned tensor itself (review s38R3 F1). ``init`` runs under autograd at copies
    of the parameters that require grad; a random cotangent's VJP with respect to those copies must
    be zero (the graph kept: review s38R3 F3), so that a constant with a graph (``p * 0``) passes
    (review s38R F2), detached, while a state whose graph reaches a learned tensor is refused (no
    backward into the learned tensors, whose hooks would run: review s38R4 F4). An ``init`` that
    fails there (reading ``p.numpy()``, review s38R F3) runs again at forward-mode dual copies,
    whose random tangents must not reach the state (review s38R3 F2); one that fails there too runs
    at plain copies (an error of its own raises as it is, review s38R5 F1) and, like one whose
    derivative autograd cannot take or that a reentrant checkpoint computed, is refused as
    uncheckable where a parameter is differentiated (review s38R4 F1 / F2, s38R5 F3). torch's
    generators are put back before each retry (review s38R2 F3; NumPy's and Python's are not: such
    an init draws from them again)."""
    g = torch.Generator().manual_seed(0)  # (its own: the global streams stay as they are)
    drawn = torch_random_states()
    learned_ids = {id(m) for m in meta}
    learned = [id(named[n]) in learned_ids for n in names]

    def put_back():
        set_torch_random_states(drawn)

    def random_like(t):
        return torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device)

    def init(given):
        return checked_rule_state(rule, rule.init(dict(zip(names, given))), "init")

    leaves = tuple(p.detach().requires_grad_() for p in params)
    checked = tuple(t for t, d in zip(leaves, learned) if d)  # the copies whose derivative matters
    depends, failed, unchecked = False, False, None
    try:
        with torch.enable_grad():
            opt = init(leaves)
    except RuntimeError:
        failed = True
    if failed:
        put_back()
        checked = ()
        try:
            with torch.enable_grad(), forward_ad.dual_level():
                duals = tuple(forward_ad.make_dual(p, random_like(p)) if d and (
                    p.is_floating_point() or p.is_complex()) else p for p, d in zip(params, learned))
                unpacked = [forward_ad.unpack_dual(t) for t in init(duals)]
                depends = any(u.tangent is not None and bool(u.tangent.ne(0).any()) for u in unpacked)
                opt = tuple(u.primal for u in unpacked)
        except RuntimeError as err:
            unchecked = err
    if unchecked is not None:  # (outside the handlers: an error of the init's own raises once, as it is)
        put_back()
        with torch.enable_grad():
            opt = init(params)  # (review s38R5 F1)
        if any(learned):
            raise ValueError(init_unchecked(rule, unchecked)) from unchecked
    if depends or any(t is x for t in opt for x in (*checked, *meta)):
        raise ValueError(init_with_derivative(rule))
    graphed = [t for t in opt if t.grad_fn is not None and (t.is_floating_point() or t.is_complex())]
    if graphed and meta and graph_reaches([t.grad_fn for t in graphed], *graph_targets(meta)):
        raise ValueError(init_reaches_learned(rule))
    if graphed and any(type(node).__name__ == "CheckpointFunctionBackward"
                       for node in graph_nodes([t.grad_fn for t in graphed])):
        # (a reentrant torch.utils.checkpoint hides what it reads from autograd.grad: review s38R5 F3)
        raise ValueError(init_reentrant(rule))
    if graphed and checked:
        # (complex ones too: review s38R2 F1, an anchor in a complex state was taken for a constant)
        try:
            got = torch.autograd.grad(graphed, checked, [random_like(t) for t in graphed],
                                      allow_unused=True, retain_graph=True)
        except (RuntimeError, NotImplementedError) as err:  # (a Function without a backward)
            raise ValueError(init_unchecked(rule, err)) from err
        if any(d is not None and bool(d.ne(0).any()) for d in got):
            raise ValueError(init_with_derivative(rule))
    # (a leaf the init made to require grad, zeros_like(p).requires_grad_(), is left as it was)
    return tuple(t.detach() if t.grad_fn is not None else t for t in opt)


def written_argument(rule: Any, names: Sequence[str], grads, state: State, args=None, before=None) -> str:
    """``(grads['w'])``, ``(state[0])`` or ``(params['w'])``: the first argument a rule of the
    user's ``update`` wrote into, by version counters; where autograd refused the write
    (a leaf that requires grad, review s38H F2: no argument named), found by running the
    update again at detached copies, without a graph."""
    if args is None:
        args = tuple(t.detach().clone() for t in (*grads, *state.opt, *state.params))
        before = versions(args)
        n, m = len(grads), len(state.opt)
        try:
            with torch.no_grad():
                rule.update(dict(zip(names, args[:n])), args[n:n + m],
                                 dict(zip(names, args[n + m:])), rule.hyper)
        except Exception:  # noqa: BLE001 (review s38R8 F2: one failing there: the refusal unnamed)
            return "(one of them)"
    i = next((i for i, (a, b) in enumerate(zip(versions(args), before)) if a != b), None)
    if i is None:
        return "(one of them)"
    n, m = len(grads), len(state.opt)
    return (f"(grads[{names[i]!r}])" if i < n else f"(state[{i - n}])" if i < n + m
            else f"(params[{names[i - n - m]!r}])")
