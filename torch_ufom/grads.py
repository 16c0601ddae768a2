"""How :class:`~torch_ufom.MetaOptimizer` writes, reads and puts back the ``.grad`` of the
meta-parameters.

Written as autograd accumulates a ``backward()``: :func:`accumulate_grads` adds each
estimate into ``.grad``, all or nothing. A missing ``.grad`` becomes a copy laid out as
autograd lays out a new one (:func:`grad_layout`), a dense one that can take it
(:func:`writable`) is added to in place, and any other (an expanded view, a sparse
gradient) is replaced by the out-of-place sum; the replacements run first and
are undone if one fails, the in-place additions last. A reduction's
(:meth:`~torch_ufom.MetaOptimizer.synchronize`) in-place changes take dense pairs only
(:func:`takes_in_place`).

Put back: :func:`grad_copies` copies each ``.grad`` before a reduction or step that may
fail, and :func:`put_back` restores them exactly (``None`` as ``None``, a sparse gradient
as the sparse one).

Read, to see what other code did to ``.grad`` between calls: its version counter
(:func:`grad_version`), whether it is another tensor than the last write left
(:func:`replaced`), and whether it holds a nonzero value (:func:`any_nonzero_each`,
:func:`any_nonzero`: one host synchronisation for all of them). A ``.grad`` that is an
inference tensor has no version counter: :func:`refuse_inference_grads` refuses it where
calls begin.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .estimators import plus

__all__ = ["accumulate_grads", "grad_layout", "writable", "takes_in_place", "grad_copies", "put_back",
           "grad_version", "replaced", "any_nonzero_each", "any_nonzero", "refuse_inference_grads"]


def accumulate_grads(pairs: Sequence[Tuple[Tensor, Tensor]]) -> None:
    """Add each ``g`` of ``pairs`` (``(parameter, g)``) into ``parameter.grad``, all or nothing.

    Everything that can fail runs before the first write: ``g`` cast to the parameter's
    dtype, the new ``.grad`` where there is none (:func:`grad_layout`), and the sums for
    gradients that cannot be added to in place (an expanded view, a sparse gradient,
    :func:`writable`), which are computed out of place and then assigned (undone if an
    assignment fails). The remaining ``.grad`` tensors are added to in place last, as
    autograd does.
    """
    replace, in_place = [], []
    for p, g in pairs:
        g = g.detach().to(p.dtype)
        old = p.grad
        if old is None:
            replace.append((p, grad_layout(p, g)))
        elif writable(old):
            in_place.append((old, g))
        else:
            replace.append((p, plus(old, g)))
    done = []
    try:
        for p, new in replace:
            done.append((p, p.grad))  # (before: a setter may assign and then raise, review s40R3 F3)
            p.grad = new
    except BaseException:
        for p, old in reversed(done):
            try:  # (one that refuses the undo too leaves the others undone: review s40H2 F7)
                p.grad = old
            except Exception:  # noqa: BLE001 (the assignment's own error is raised below)
                pass
        raise
    with torch.no_grad():
        for old, g in in_place:
            old.add_(g)


def grad_layout(p: Tensor, g: Tensor) -> Tensor:
    """A copy of ``g`` laid out as autograd lays out a new ``.grad``: with ``p``'s strides
    where ``p`` is dense and non-overlapping (channels_last, a transposed parameter),
    else in the memory format its strides suggest (``torch.preserve_format``; autograd
    takes contiguous strides there, the values are the same). torch's fused optimizers
    (``Adam(fused=True)``) step wrongly, silently, on a gradient whose strides differ
    from its parameter's."""
    if g.layout != torch.strided or p.layout != torch.strided:
        return g.clone()
    return torch.empty_like(p, dtype=g.dtype, memory_format=torch.preserve_format).copy_(g)


def grad_copies(params: Sequence[Tensor]) -> List[Tuple[Tensor, Optional[Tensor]]]:
    """``(parameter, a copy of its .grad)`` for each of ``params`` (``None`` for none)."""
    with torch.no_grad():
        return [(p, None if p.grad is None else p.grad.clone()) for p in params]


def put_back(saved: Sequence[Tuple[Tensor, Optional[Tensor]]]) -> None:
    """Put back the gradients :func:`grad_copies` copied (a ``None`` that a reduction filled
    in goes back to ``None``, and a sparse gradient it made dense back to the sparse one)."""
    with torch.no_grad():
        for p, g in saved:
            if p.grad is None or g is None or p.grad.layout != g.layout:
                p.grad = g
            else:
                p.grad.copy_(g)


def writable(t: Tensor) -> bool:
    """Whether ``t.add_(...)`` can write into ``t``: a dense tensor outside
    inference mode whose elements do not share memory (not an expanded view)."""
    if t.layout != torch.strided or t.is_inference():
        return False
    span = 0  # the largest offset reached by the dimensions of smaller strides
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n > 1):
        if stride <= span:
            return False
        span += stride * (size - 1)
    return True


def takes_in_place(grad: Tensor, other: Tensor) -> bool:
    """Whether ``grad`` can take ``other`` in place (both dense)."""
    return grad.layout == torch.strided and other.layout == torch.strided


def refuse_inference_grads(meta: Sequence[Tensor], name: Callable[[Tensor], str]) -> None:
    """Refuse a ``.grad`` made under ``torch.inference_mode()`` (an inference tensor): it has no
    version counter, so the bookkeeping of pending tasks (``reduction="mean"``'s count, what
    ``.grad`` carried, clears outside ``meta``) cannot see its in-place changes. Reading its
    version raised after the other gradients were written (review s36R F2); reading none, or
    replacing it by a copy, or comparing its values each missed some clear (reviews s36Q F1,
    s36V F1, s36W2 F1-F5: a zeroed gradient zeroed again looks unchanged)."""
    for p in meta:
        if p.grad is not None and p.grad.is_inference():
            raise ValueError(f"Invalid .grad: the gradient of {name(p)} is an inference tensor (made under "
                             "torch.inference_mode()), whose in-place changes no version counter shows, so "
                             "the tasks it holds cannot be counted; nothing was changed: assign it outside "
                             "inference mode (p.grad = g.clone()), or clear it with meta.zero_grad()")


def grad_version(grad: Tensor) -> Optional[int]:
    """``grad._version``; ``None`` for an inference tensor (refused where calls begin:
    :func:`refuse_inference_grads`; one a hook of the user's puts there meanwhile is another
    tensor, which the comparison of identities before this one catches)."""
    return None if grad.is_inference() else grad._version


def replaced(p: Tensor, written, sparse: bool) -> bool:
    """Whether ``p.grad`` is another tensor without a graph than ``written()`` (a weak
    reference) left (see :meth:`~torch_ufom.MetaOptimizer._check_cleared`), but for a dense one where a
    ``sparse`` gradient was written: autograd adds a dense gradient to a sparse ``.grad``
    into a new tensor, an accumulation as any other."""
    if p.grad is None or p.grad is written() or p.grad.requires_grad:
        return False
    return not (sparse and p.grad.layout == torch.strided)


def any_nonzero_each(params: Sequence[Tensor]) -> List[bool]:
    """For each of ``params`` (each with a ``.grad``): whether its gradient holds a nonzero
    value (a sparse gradient's stored values count), read in one synchronisation."""
    if not params:
        return []
    with torch.no_grad():
        flags = []
        for p in params:
            g = p.grad
            values = g._values() if g.layout == torch.sparse_coo else (
                g.values() if g.layout != torch.strided else g)
            flags.append(values.any().to(flags[0].device if flags else values.device))
        return torch.stack(flags).tolist()


def any_nonzero(params: Sequence[Tensor]) -> Optional[Tensor]:
    """A 0-d bool tensor: some ``.grad`` of ``params`` holds a nonzero value (a sparse
    gradient's stored values count); ``None`` without gradients. Not read here."""
    flags = []
    with torch.no_grad():
        for p in params:
            g = p.grad
            if g is None:
                continue
            values = g._values() if g.layout == torch.sparse_coo else (
                g.values() if g.layout != torch.strided else g)
            flags.append(values.any().to(flags[0].device if flags else values.device))
    return torch.stack(flags).any() if flags else None
