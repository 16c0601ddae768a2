"""What the losses return, checked, and what an outer loss may keep.

A loss returns a real floating-point scalar tensor that depends on what it is
given, or ``(loss, aux)`` (:func:`loss_and_aux`). Where a result keeps the outer
loss's ``aux`` (``MetaOptimizer``), :func:`check_kept_aux` refuses an aux that
holds tensors inside objects a pytree does not open (they would keep their graph,
or escape a transform); :func:`detached` is what is kept of the rest.
"""
from __future__ import annotations

import collections
import functools
import numbers
import types
from collections.abc import Mapping
from typing import Any, List, Optional, Tuple

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from .functional_model import cell_filled

__all__ = ["loss_and_aux", "check_depends", "AuxRefused", "check_kept_aux", "detached", "slot_names",
           "passes_for"]


def _check_loss(loss: Any, name: str) -> Tensor:
    """``loss`` if it is a real floating-point scalar tensor that depends on the
    parameters; else an error naming the loss function (``name``).

    Only metadata is read (type, shape, dtype, device, ``requires_grad``): no
    value, so no host synchronisation per step. Inside ``torch.func.vmap`` a
    batched tensor does not carry ``requires_grad`` (a caller that vmaps a loss
    under ``torch.autograd`` checks the result with :func:`check_depends`).
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
        check_depends(loss, name)
    return loss


def loss_and_aux(out: Any, name: str) -> Tuple[Tensor, Any]:
    """Split what a loss returned: a scalar tensor, or ``(loss, aux)`` like
    ``torch.func.grad(has_aux=True)``; ``aux`` is ``()`` when there is none."""
    if isinstance(out, tuple):
        if len(out) != 2 or not isinstance(out[0], Tensor) or out[0].dim() != 0:
            first = type(out[0]).__name__ if out else "nothing"
            if out and isinstance(out[0], Tensor):
                first = f"a tensor of shape {tuple(out[0].shape)}"
            raise ValueError(f"Invalid {name}: it returned a tuple of {len(out)} items whose first "
                             f"item is {first} (expected a scalar tensor, or (scalar tensor, aux))")
        return _check_loss(out[0], name), out[1]
    return _check_loss(out, name), ()


class AuxRefused(ValueError):
    """An outer loss's aux that :func:`check_kept_aux` refuses: an error of the arguments,
    which a meta-batch raises as it is rather than running its tasks again one by one."""


def check_kept_aux(aux: Any) -> None:
    """Refuse an outer loss's ``aux`` that :class:`~torch_ufom.MetaResult` would keep with
    tensors it cannot reach: inside an object ``torch.utils._pytree`` does not open, they
    are neither detached (``backward``'s aux kept its graph) nor split per task
    (``backward_batch``'s held tensors that escaped ``vmap``; review s39O F1). Only where
    the aux is kept (review s39H2 F2: ``hypergrad`` and ``diagnose`` drop it), as the outer
    loss's evaluation returns it, before any gradient (review s39R3 F2, s39R4 F1: after
    them, the parameters' hooks had run)."""
    opaque = _opaque_holding_tensors(aux)
    if opaque is not None:
        raise AuxRefused(
            f"Invalid outer_loss: its aux holds {opaque}, which torch.utils._pytree does not open (a "
            "dataclass, a dict subclass, an object's attributes, a callable's arguments or closure), "
            "so MetaResult.aux could neither detach them nor split them per task: return "
            "them in a tuple, list or dict, or register the type with torch.utils._pytree "
            "(register_dataclass, register_pytree_node)")


_OPENED_AT_MOST = 100_000  # objects reached per leaf of an aux (_opaque_holding_tensors)


def _opaque_holding_tensors(aux: Any) -> Optional[str]:
    """What the first leaf of ``aux`` (as ``torch.utils._pytree`` flattens it) that is not a
    tensor holds that :func:`check_kept_aux` refuses: tensors, in its fields, items, slots
    (inherited too) or attributes, or a callable's arguments, closure or bound object, or
    more objects than :data:`_OPENED_AT_MOST` to search (refused: what lies beyond is
    unknown); ``None`` when there is none."""
    for leaf in pytree.tree_leaves(aux):
        if leaf is None or issubclass(type(leaf), _ATOMS) or _tensor_like(leaf):
            continue
        stack, seen, reached = [leaf], set(), 0
        while stack:
            obj = stack.pop()
            kind = type(obj)
            if obj is None or kind in _PLAIN:  # (first: a long list of floats, review s39R6 F3)
                continue
            if issubclass(kind, Tensor):
                return f"tensors in a value of type {type(leaf).__name__}"
            if issubclass(kind, _ATOMS):  # (by type before the slower fallback: review s39R7 F1)
                continue
            if _tensor_like(obj):  # (what passes for a tensor: a proxy of one)
                return f"tensors in a value of type {type(leaf).__name__}"
            reached += 1  # (seen ones too: a walk that forgot them would end here, not loop)
            if reached > _OPENED_AT_MOST:
                return f"a value of type {type(leaf).__name__} with more than {_OPENED_AT_MOST} objects " \
                    "to search for tensors"
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            stack.extend(_held_by(obj))
    return None


_ATOMS = (Tensor, numbers.Number, str, bytes)  # (what the aux walk does not open)


_PLAIN = frozenset({float, int, bool, str, bytes, complex})


def _tensor_like(x: Any) -> bool:
    """Whether ``x`` is a tensor or passes for one (``weakref.proxy`` of a tensor: review
    s39R5 F1): :func:`passes_for` ``Tensor``."""
    return passes_for(x, Tensor)


def passes_for(x: Any, kinds) -> bool:
    """Whether ``x`` is an instance of ``kinds`` or passes for one (a ``weakref.proxy`` of
    one: review s39R6 F1), by its type first: ``isinstance`` reads ``__class__``, which an
    object of the user's may make raise (review s39R4 F3: then ``False``)."""
    if issubclass(type(x), kinds):
        return True
    try:
        claimed = x.__class__
        return claimed is not type(x) and issubclass(claimed, kinds)  # (one type check otherwise)
    except Exception:  # noqa: BLE001 (an object whose __class__ raises passes for nothing)
        return False


def _held_by(obj: Any) -> List[Any]:
    """What ``obj`` holds that :func:`_opaque_holding_tensors` searches: a mapping's values,
    a sequence's or set's items, a callable's arguments, closure or bound object, and its
    ``__dict__`` and ``__slots__`` values, read without its own ``__getattr__`` or
    ``__getattribute__`` (review s39R3 F1: those ran the user's code, which raised)."""
    held: List[Any] = []
    kind = type(obj)
    try:  # (each source read apart: one that raises leaves the others searched, review s39R4 F2)
        if passes_for(obj, Mapping):
            held.extend(obj.values())
        elif passes_for(obj, (list, tuple, set, frozenset, collections.deque)):
            held.extend(obj)
        elif passes_for(obj, functools.partial):  # (review s39R F2: callables hold tensors too)
            held.extend([obj.func, *obj.args, *obj.keywords.values()])
        elif passes_for(obj, types.MethodType):
            held.extend([obj.__self__, obj.__func__])
        elif passes_for(obj, types.FunctionType):
            held.extend([*(obj.__defaults__ or ()), *(obj.__kwdefaults__ or {}).values()])
            held.extend(c.cell_contents for c in obj.__closure__ or () if cell_filled(c))
    except Exception:  # noqa: BLE001 (review s39R3 F1: contents that raise when read are not searched)
        pass
    if not issubclass(kind, type):
        for name in ["__dict__", *slot_names(kind)]:
            try:
                value = object.__getattribute__(obj, name)
            except Exception:  # noqa: BLE001 (no __dict__, an empty slot, a descriptor that raises)
                continue
            if name == "__dict__" and issubclass(type(value), dict):
                held.extend(dict.values(value))
            else:  # (a __dict__ of another kind is searched as an object: review s39R5 F2)
                held.append(value)
    return held


def slot_names(klass: type) -> List[str]:
    """The ``__slots__`` names of ``klass`` and its bases (a lone string is one name), each as
    ``getattr`` finds it: a private one (``__cache``) under its mangled name (``_Klass__cache``)."""
    names = []
    for base in klass.__mro__:
        slots = base.__dict__.get("__slots__", ())
        for s in [slots] if isinstance(slots, str) else [s for s in slots if isinstance(s, str)]:
            private = s.startswith("__") and not s.endswith("__")  # (stored under a mangled name)
            names.append(f"_{base.__name__.lstrip('_')}{s}" if private else s)
    return names


def detached(aux: Any) -> Any:
    """``aux`` with every tensor detached (``None`` for no aux)."""
    if issubclass(type(aux), tuple) and len(aux) == 0:  # (type(): its reads may raise, review s39R4 F3)
        return None
    return pytree.tree_map(lambda t: t.detach() if _tensor_like(t) else t, aux)


def check_depends(loss: Tensor, name: str) -> None:
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
