"""Looks at autograd graphs: what a loss's graph reads, and what torch cannot differentiate twice.

The looks at the losses use these to refuse what a sweep cannot differentiate
rightly, before any gradient is written: functions without a double backward
(:func:`once_differentiable`, :func:`check_twice_differentiable`), those whose
second derivative torch computes wrongly (:func:`wrong_twice`), and whether a
step's graph saves or recomputes what a checkpointed sweep replays
(:func:`look_at_graph`). The walks themselves are :func:`graph_nodes`,
:func:`graph_reaches`, :func:`graph_survey` and :func:`graph_targets`.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["graph_nodes", "graph_reaches", "graph_survey", "graph_targets", "once_differentiable",
           "check_twice_differentiable", "wrong_twice", "wrong_twice_message", "GraphLook", "look_at_graph",
           "recomputes_message", "sequence_marker", "root_of", "COMPILED"]


def root_of(t: Tensor) -> Tensor:
    """The tensor whose memory ``t`` views (``t`` itself if it is no view): ``lrs[i]``,
    ``lrs[:4][i]`` and ``lrs`` have one root."""
    return t if t._base is None else t._base


def graph_survey(starts: Sequence[Any], stop: set = frozenset()) -> Tuple[set, List[type]]:
    """What autograd's graph from the nodes ``starts`` reaches (not walking past the nodes
    in ``stop``): the ``id`` of every leaf tensor, and the class of every custom
    ``torch.autograd.Function`` applied."""
    seen, stack, leaves, functions = set(stop), list(starts), set(), []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaves.add(id(variable))
        cls = getattr(node, "_forward_cls", None)
        if cls is not None and cls not in functions:
            functions.append(cls)
        stack.extend(f for f, _ in node.next_functions)
    return leaves, functions


_ONCE = torch.autograd.function.once_differentiable(lambda ctx, *grads: grads).__code__


def once_differentiable(functions: Sequence[type]) -> List[str]:
    """The names of the custom ``torch.autograd.Function`` classes among ``functions``
    whose backward is marked ``@once_differentiable`` (under other decorators too, such as
    ``torch.amp.custom_bwd``, that keep the function they wrap as ``__wrapped__``)."""
    def once(fn) -> bool:
        for _ in range(32):  # a chain of wrappers
            if fn is None:
                return False
            if getattr(fn, "__code__", None) is _ONCE:
                return True
            fn = getattr(fn, "__wrapped__", None)
        return False
    return [cls.__name__ for cls in functions  # vjp: torch's other name for backward
            if once(getattr(cls, "backward", None)) or once(getattr(cls, "vjp", None))]


def check_twice_differentiable(loss: Tensor, before: Sequence[Tensor] = ()) -> None:
    """Raise if the graph of ``loss`` applies a custom ``torch.autograd.Function`` whose
    backward is ``@once_differentiable``: ``torch.autograd.grad`` with ``create_graph``
    gives its gradient no graph (or one whose error node it never runs), so an exact
    sweep would drop that second derivative silently. The walk stops at the nodes of
    ``before`` (the step's parameters: a chained sweep's earlier steps were walked)."""
    if loss.grad_fn is None:
        return
    stop = {t.grad_fn for t in before}
    wrong = wrong_twice([loss.grad_fn], stop, before)
    if wrong:
        raise RuntimeError(wrong_twice_message(wrong))
    names = once_differentiable(graph_survey([loss.grad_fn], stop)[1])
    if names:
        raise RuntimeError(
            f"inner_loss applies {', '.join(names)}, a torch.autograd.Function whose backward is "
            "marked @once_differentiable: an exact hypergradient needs its second derivative, which "
            "torch would drop silently here; write its backward with differentiable torch operations "
            "(or use mode='fom', which needs none)")


def wrong_twice(starts: Sequence[Any], stop: set = frozenset(),
                adapted: Optional[Sequence[Tensor]] = None) -> List[str]:
    """What in autograd's graph from ``starts`` (not past the nodes in ``stop``) torch
    differentiates twice wrongly, each with why and what to do instead:

    - an embedding lookup with ``scale_grad_by_freq=True``, whose double backward drops
      the 1/count scaling (torch 2.11-2.13: the second derivative of
      ``embedding_dense_backward`` is the unscaled lookup; review EJ);
    - a ``torch.compile``d function or module (aot_autograd's ``CompiledFunction``): its
      backward has no derivative, and where nothing the backward reads requires a
      gradient (a compiled loss criterion: the gradient flowing in is the constant 1)
      torch hangs the node that would raise on a dummy tensor, which
      ``torch.autograd.grad`` never reaches: the second derivative is dropped silently
      (review EO: an exact hypergradient 100 % off, the first-order one instead);
    - a weight norm (``torch._weight_norm``: ``torch.nn.utils.weight_norm`` and
      ``parametrizations.weight_norm``), whose double backward is wrong (torch 2.11-2.13
      fail their own ``gradgradcheck``; an HVP 43 % off a finite difference; review ES:
      exact 4.8e-2 off); only where it reads an adapted parameter (of ``adapted``;
      ``None``: any): the sweep differentiates twice only what the inner gradient is
      taken at, and a weight norm in a part the loop does not adapt is exact (review EV).
    """
    found = set()
    for node in graph_nodes(starts, stop):
        if getattr(node, "_saved_scale_grad_by_freq", False) and node.name().startswith("Embedding"):
            found.add(_SCALED)
        elif type(node).__name__ == "WeightNormInterfaceBackward0" and _reads(node, adapted):
            found.add(_WEIGHT_NORM)
        elif _compiled(getattr(node, "_forward_cls", None)):
            found.add(COMPILED)
    return sorted(found)


_SCALED = ("an embedding with scale_grad_by_freq=True, whose second derivative torch computes wrongly "
           "(it drops the 1/count scaling of the gradient: use scale_grad_by_freq=False)")


_WEIGHT_NORM = ("a weight norm (torch.nn.utils.weight_norm or parametrizations.weight_norm: "
                "torch._weight_norm), whose second derivative torch computes wrongly (it fails torch's "
                "own gradgradcheck: write the norm out as a parametrization of your own, "
                "g * v / v.norm(dim=1, keepdim=True) for a Linear layer's weight)")


COMPILED = ("a torch.compile'd function or module (aot_autograd's CompiledFunction), whose backward has no "
            "derivative: where nothing it reads requires a gradient (a compiled loss criterion) torch "
            "drops the second derivative silently, elsewhere it raises (leave what the losses run "
            "uncompiled, compile it with backend='eager', or use hvp='fwdrev', which differentiates "
            "it by forward mode)")


def _reads(node: Any, adapted: Optional[Sequence[Tensor]]) -> bool:
    """Whether autograd's graph from ``node`` reaches one of ``adapted`` (``None``: yes)."""
    return adapted is None or graph_reaches([node], *graph_targets(adapted))


def _compiled(cls: Any) -> bool:
    """Whether ``cls`` (a graph node's ``_forward_cls``) is aot_autograd's ``CompiledFunction``."""
    return cls is not None and cls.__name__ == "CompiledFunction" and \
        getattr(cls, "__module__", "").startswith("torch._functorch")


def wrong_twice_message(what: Sequence[str]) -> str:
    """The error for :func:`wrong_twice`'s findings in an exact sweep."""
    return (f"inner_loss differentiates {'; and '.join(what)}: an exact hypergradient would be silently "
            "wrong; use mode='fom', which needs no second derivative")


_SAVED: Dict[type, Tuple[str, ...]] = {}  # a graph node class: its saved tensors' attributes


class GraphLook(NamedTuple):
    """What :func:`look_at_graph` found in a loss's graph."""

    recomputed: bool  # a part torch.utils.checkpoint evaluates again reads an adapted parameter
    made_before: bool  # a node made before the marker (a graph the user computed before the call)


def look_at_graph(starts: Sequence[Any], adapted: Sequence[Tensor], stop: set = frozenset(),
                  marker: int = -1) -> GraphLook:
    """One walk of autograd's graph from the nodes ``starts`` (not past those in ``stop``).

    ``made_before``: it holds a node made in this thread before :func:`sequence_marker` gave
    ``marker`` (a leaf's accumulator has the largest number and never counts): a tensor the
    losses read that the user computed, with its graph, before the call (``w = softplus(raw)``
    outside the losses), which every backward of the call passes through (review GA F6).

    ``recomputed``: it holds a part that ``torch.utils.checkpoint`` (``use_reentrant=False``)
    evaluates again in backward and that reads one of the ``adapted`` parameters: torch then
    runs the checkpointed function again, reading the module's parameters as they are at that
    time, after :class:`~torch_ufom.FunctionalModel` put the module's own back (review EO: every path 2-19 %
    off, ``fom`` and ``adapt`` too). A checkpointed part that reads no adapted parameter (a
    frozen backbone, a parameter-free part of a loss) recomputes what it computed.

    The part is found by its saved tensors' unpack hook (``SavedTensor.unpack_hook``, read
    without unpacking); what it reads, by following its nodes' inputs through nodes of the part
    and nodes that save nothing (views, additions) to the leaves: a node that saved tensors
    without the hook lies outside it, and so does what a part reads through ``.detach()`` (not
    an edge of the graph; review EU measured 2e-3 off). The walk is conservative at the part's
    inputs: one made from an adapted parameter by operations that save nothing (``x + prompt``,
    ``torch.cat([prompt, x])``) counts as read, though the checkpoint stores its inputs (a false
    refusal of prompt tuning over a checkpointed frozen backbone; telling them apart needs
    torch's internals)."""
    inside, saves, before = [], set(), False
    for node in graph_nodes(starts, stop):
        before = before or node._sequence_nr() < marker
        names = _SAVED.get(type(node))
        if names is None:
            names = _SAVED[type(node)] = tuple(k for k in dir(node) if k.startswith("_raw_saved_"))
        hooked = False
        for name in names:
            try:
                saved = getattr(node, name)
            except RuntimeError:  # freed by a backward
                continue
            for one in saved if isinstance(saved, (list, tuple)) else (saved,):
                hook = getattr(one, "unpack_hook", None)
                if hook is not None and getattr(hook, "__module__", None) == "torch.utils.checkpoint":
                    hooked = True
        if hooked:
            inside.append(node)
        elif names:
            saves.add(node)
    return GraphLook(bool(inside) and _reads_through(inside, saves, adapted), before)


def _reads_through(inside: List[Any], saves: set, adapted: Sequence[Tensor]) -> bool:
    """Whether the nodes ``inside`` a checkpointed part reach one of ``adapted`` through nodes
    of the part and nodes that save nothing (not through those in ``saves``)."""
    leaves, nodes = graph_targets(adapted)
    seen, stack = set(), inside
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in nodes or id(getattr(node, "variable", None)) in leaves:
            return True
        if node not in saves:  # (a node of the part, or one that saves nothing)
            stack.extend(f for f, _ in node.next_functions)
    return False


def recomputes_message(which: str) -> str:
    """The error for :func:`look_at_graph`'s ``recomputed`` in ``which`` loss."""
    instead = ("remove the checkpointing from the forward (memory='checkpoint', the default, keeps the "
               "inner loop's memory flat instead) or leave what it reads out of the adapted parameters "
               "(inner_params=)") if which == "inner_loss" else \
        "compute the outer loss without checkpointing what reads the adapted parameters"
    return (f"{which} runs torch.utils.checkpoint with use_reentrant=False (activation checkpointing, "
            "checkpoint_sequential) on a part that reads adapted parameters: torch evaluates that part "
            "again during backward, when the module holds its own parameters again instead of the inner "
            f"loop's, so every gradient through it would be silently wrong (on every path and mode); "
            f"{instead}")


def graph_nodes(starts: Sequence[Any], stop: set = frozenset()) -> Iterator[Any]:
    """Every node of autograd's graph from the nodes ``starts``, once each, not walking
    past the nodes in ``stop``."""
    seen, stack = set(stop), list(starts)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(f for f, _ in node.next_functions)


_MARK = torch.empty(0, requires_grad=True)  # (its views' nodes tell the next sequence number)


def sequence_marker() -> int:
    """The sequence number of the next autograd node made in this thread (autograd numbers a
    thread's nodes in the order it makes them); ``-1`` under inference mode (no graph)."""
    if torch.is_inference_mode_enabled():
        return -1
    with torch.enable_grad():
        return _MARK.view(0).grad_fn._sequence_nr()


def graph_reaches(starts: Sequence[Any], leaves: set, nodes: set = frozenset(),
                  stop: set = frozenset()) -> bool:
    """Whether autograd's graph from the nodes ``starts`` (not past those in ``stop``) reaches
    a leaf whose ``id`` is in ``leaves`` or a node in ``nodes`` (a non-leaf tensor's ``grad_fn``)."""
    return any(node in nodes or id(getattr(node, "variable", None)) in leaves
               for node in graph_nodes(starts, stop))


def graph_targets(tensors: Sequence[Tensor]) -> Tuple[set, set]:
    """``(leaves, nodes)`` for :func:`graph_reaches`: the ``id`` of each leaf of ``tensors``
    and the ``grad_fn`` of each other one."""
    return ({id(t) for t in tensors if t.grad_fn is None},
            {t.grad_fn for t in tensors if t.grad_fn is not None})
