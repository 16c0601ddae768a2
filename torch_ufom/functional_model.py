"""The user's module evaluated at given tensors, and the swaps that do it.

:class:`FunctionalModel` is what the losses receive as ``fmodel`` and what
``adapt`` returns: the module called at the inner loop's parameters and buffers.
It and the inner loop evaluate the module by swapping its parameter and buffer
entries (:class:`Reparametrization`, laid out once per module) and putting them
back in a ``finally``, falling back to ``torch.func.functional_call`` where a
swap is not safe. Swaps nest, across modules that share submodules and across
threads: the registry of swaps in progress (``_SWAPS``, under ``_SWAPS_LOCK``)
puts back what the last one out must, and a forked child undoes the swaps only
other threads were in (:func:`_swaps_after_fork`).

The module also holds the looks at a module that decide how it can be
evaluated: cached parametrizations (:func:`check_parametrize_cache`), weight
norms and pruning (:func:`renormalises_weights`), sparse weights
(:func:`sparse_weights`) and TorchScript (:func:`scripted`).
"""
from __future__ import annotations

import collections
import contextlib
import copy
import functools
import inspect
import itertools
import numbers
import os
import threading
from collections.abc import Mapping
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import parametrize
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .process import outside_transforms, process_lock
from .randomness import set_torch_random_states, torch_random_states

__all__ = ["FunctionalModel", "Reparametrization", "check_parametrize_cache", "crowded_elsewhere",
           "renormalises_weights", "sparse_weights", "scripted", "take_assigned_none_buffers", "cell_filled"]

_UNLOCKED = contextlib.nullcontext()


def check_parametrize_cache(model: nn.Module) -> None:
    """Refuse a call inside ``torch.nn.utils.parametrize.cached()`` when ``model`` has
    parametrized weights: the cache would serve them as computed from the module's own
    parameters, so the inner loop's parameters would be silently ignored."""
    if parametrize._cache_enabled and any(parametrize.is_parametrized(m) for m in model.modules()):
        raise RuntimeError("Invalid call under torch.nn.utils.parametrize.cached(): the model has "
                           "parametrized weights, which the cache would keep as computed once, "
                           "from the module's own parameters or one inner step's, instead of each "
                           "step's; call outside cached(), and do not open it inside the losses")


def renormalises_weights(module: nn.Module) -> bool:
    """Whether ``module``'s forward is known to write its parameters in place:
    ``nn.Embedding`` and ``nn.EmbeddingBag`` with ``max_norm`` renormalise the rows they
    look up. Parameters the inner loop does not adapt are then copied too."""
    return any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None
               for m in module.modules())


def sparse_weights(module: nn.Module) -> set:
    """The ids of ``module``'s parameters whose gradient torch computes sparse: the
    weights of ``nn.Embedding`` and ``nn.EmbeddingBag`` with ``sparse=True``."""
    return {id(m.weight) for m in module.modules()
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse}


def scripted(module: nn.Module) -> List[str]:
    """What of ``module`` runs as TorchScript (``torch.jit.script``): the names of its
    scripted submodules (``""`` for the module itself), and ``"f (called by M.forward)"``
    for a scripted function that a submodule's ``forward`` (or a function of the user's
    it calls) refers to by a global name or a closure. Once the JIT has optimised their
    graph (after a pass or two through autograd, the user's or the library's), the
    gradients ``torch.func`` computes through them carry no graph, so ``vmap``'s and
    forward-over-reverse's second derivatives come out wrong; per-task
    reverse-over-reverse is exact. (A scripted function reached otherwise, e.g. as an
    attribute of a module, is not found here: :func:`~torch_ufom.vectorised.runs_optimised_script`
    finds it when it runs.)"""
    found: List[str] = []
    for n, m in module.named_modules():
        inside = any(n.startswith(f + ".") for f in found) or (found == [""] and n)
        # torch.jit.trace's modules are ScriptModules too, but their graph is recorded from an
        # ordinary forward and differentiates as torch does.
        if not inside and isinstance(m, torch.jit.ScriptModule) and not isinstance(m, torch.jit.TracedModule):
            found.append(n)
    for n, m in module.named_modules():
        forward = getattr(type(m), "forward", None)
        for f in _script_functions(forward, set(), 3):
            entry = f"{getattr(f, 'name', f)} (called by {type(m).__name__}.forward)"
            if entry not in found:
                found.append(entry)
    return found


def _script_functions(fn: Any, seen: set, depth: int) -> List[Any]:
    """The ``torch.jit.ScriptFunction`` objects Python function ``fn`` refers to by a
    global name or a closure cell, and those of the user's functions it refers to, up to
    ``depth`` calls deep (torch's own code is not entered)."""
    fn = getattr(fn, "__func__", fn)
    code = getattr(fn, "__code__", None)
    if code is None or id(fn) in seen or depth <= 0 or \
            (getattr(fn, "__module__", None) or "").split(".")[0] == "torch":
        return []
    seen.add(id(fn))
    names = getattr(fn, "__globals__", {})
    refs = [names[k] for k in code.co_names if k in names]
    refs += [c.cell_contents for c in fn.__closure__ or () if cell_filled(c)]
    out = []
    for r in refs:
        while isinstance(r, functools.partial):
            r = r.func
        if isinstance(r, torch.jit.ScriptFunction):
            out.append(r)
        elif callable(r) and hasattr(r, "__code__"):
            out += _script_functions(r, seen, depth - 1)
        elif callable(r) and not isinstance(r, type):  # an object with a __call__ of its own
            out += _script_functions(getattr(type(r), "__call__", None), seen, depth - 1)
    return out


def cell_filled(cell) -> bool:
    """Whether a closure's cell holds a value (a name assigned after the function was made
    may not yet)."""
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


def _swaps_after_fork() -> None:
    """A child forked while another thread held ``_SWAPS_LOCK`` inherits it held, by a thread it
    does not have: its first call would wait forever (review GE F2). The child gets a new lock."""
    global _SWAPS_LOCK
    _SWAPS_LOCK = threading.Lock()
    # The other threads are not in the child: the swaps only they ran in are undone, from the
    # innermost (review LA F6: the child's module held another thread's tensors, and a
    # hypergradient there started from them, 0.79 off); the forking thread's stay, its own.
    me = threading.get_ident()
    if _SWAPS and type(_SWAPS[0]) is list:
        _register_quick()
    for group in list(_SWAPS):
        for entry in group.stack:
            entry.only(me)
        while group.stack and not group.stack[-1].threads:
            done = group.pop()
            done.swap.undo(done.saved, note=False)
        if not group.stack:
            _SWAPS.remove(group)
    live = {id(entry.saved) for group in _SWAPS for entry in group.stack}
    for (_, key), (table, holders) in list(_NONE_WATCH.items()):  # (others' functional_call calls)
        holders[:] = [h for h in holders if h.thread == me or id(h) in live]
        if not holders:
            del _NONE_WATCH[(id(table), key)]
            table[key] = None


class FunctionalModel:
    """The user's module evaluated at given parameters and buffers.

    Call it exactly like the module: ``fmodel(x)`` runs the module with its
    parameter and buffer entries swapped for ``params`` and ``buffers`` for
    the duration of the call, as ``torch.func.functional_call(module,
    (params, buffers), (x,))`` does (tied entries included), and restored
    afterwards, error or not. The swap follows a :class:`Reparametrization`:
    by default (``swap=...``) :meth:`Reparametrization.of` the module as it is
    at each call, used where it knows every name given (an inner loop
    computes it once and passes it). Where there is none (``swap=None``) or a
    name is not one of its own (a tied weight's second name), the call is
    ``functional_call`` itself, which does not put back the entries of a
    submodule reached by two paths (torch 2.13). A name the module lacks
    altogether (a typo) is refused with a ``ValueError`` at the call.
    Buffers are cloned for each step, so in-place updates (BatchNorm's running
    statistics) land on the inner state, never on the module.

    Args:
        module: the user's module.
        params: parameter name (as ``named_parameters()`` gives it) to tensor;
            names left out keep the module's own parameters.
        buffers: buffer name to tensor, likewise.
        swap: the :class:`Reparametrization` to use, ``None`` for
            ``functional_call``, or ``...`` (default) to compute it at each call.
        serialised: each call holds the process lock
            (:func:`~torch_ufom.process.one_call_at_a_time`): the models ``adapt`` returns,
            which the user may run in one thread while a library call on the same module runs
            in another (each would put back what the other swapped in: review
            GE F1). The loop's own models run inside a call that holds it, and a loss may hand
            them to a worker thread (review GF F1: locked, that waited forever).

    Raises:
        TypeError: ``module`` is not an ``nn.Module``, or ``params`` or ``buffers`` not a mapping
            (a dict, an ``nn.ParameterDict``) from name to tensor (or None).
        ValueError: a name in both ``params`` and ``buffers``; at the call (and in
            :meth:`to_module`), a name that is none of the module's.
    """

    def __init__(self, module: nn.Module, params: Dict[str, Tensor], buffers: Dict[str, Tensor],
                 swap: Any = ..., serialised: bool = False):
        for name, value, expected in (("module", module, nn.Module), ("params", params, Mapping),
                                      ("buffers", buffers, Mapping)):
            # (a mapping need not be a Mapping: an nn.ParameterDict ran before the check came,
            # review LD F5)
            if not (isinstance(value, expected) or expected is Mapping and _mapping_like(value)):
                what = "an nn.Module" if expected is nn.Module else "a dict from name to tensor"
                raise TypeError(f"Invalid {name}: {type(value).__name__} (expected {what})")
        if swap is ...:  # (a user's model: the library's own pass their swap, and checked values)
            params, buffers = self._checked(params, buffers)
        self.module = module
        self.params = params
        self.buffers = buffers
        self.swap = swap
        self.serialised = serialised

    @staticmethod
    def _checked(params, buffers) -> Tuple[Mapping, Mapping]:
        """``params`` and ``buffers`` as mappings from name to tensor (or None), refused with a
        message naming the entry where a value is no tensor or a name is in both, as
        ``functional_call`` refuses it (review LM F4-F6: a dict-like whose keys() is a list
        failed at the first call, a name in both ran at params' value, a float reached the
        forward)."""
        given = []
        for kind, mapping in (("params", params), ("buffers", buffers)):
            # (a dict-like of the user's: its items, in a dict; a ParameterDict is kept, which the
            # user may change after: review LN F1)
            if not isinstance(mapping, (Mapping, nn.ParameterDict)):
                mapping = dict(mapping.items())
            bad = next(((k, v) for k, v in mapping.items() if v is not None and not isinstance(v, Tensor)),
                       None)
            if bad is not None:
                raise TypeError(f"Invalid {kind}: {bad[0]!r} is a {type(bad[1]).__name__} "
                                "(expected a tensor)")
            given.append(mapping)
        both = next((name for name in given[0] if name in given[1]), None)
        if both is not None:
            raise ValueError(f"Invalid buffers: {both!r} is given in params too (give each name once)")
        return given[0], given[1]

    def __call__(self, *args, **kwargs):
        if not self.serialised and self.swap is not ... and self.swap is not None:  # (the loop's models)
            return self._swapped(self.swap, functools.partial(self.module, *args, **kwargs))
        if self.serialised and _SWAPS:
            # A call inside this model's own run (a worker's) joins that swap without the process
            # lock, which the thread in run holds (review LC F4, KF F4: it waited forever).
            out = self._swapped(None, lambda: self.module(*args, **kwargs), join_only=True)
            if out is not _UNJOINED:
                return out
        with process_lock() if self.serialised else _UNLOCKED:
            everything = Reparametrization.of(self.module) if self.swap is ... else None
            swap = self._module_swap(everything) if self.swap is ... else self.swap
            if swap is None:
                self._check_names()
                check_parametrize_cache(self.module)
                # functional_call swaps the entries itself, inside a swap that puts nothing but
                # counts as writing the entries of the names given and those tied to them (review
                # LG F3): another thread's call of a model whose forward reads them is refused
                # (review LF F3: the two ran on each other's entries, 1.99 off), and a buffer
                # registered as None the forward sets lives for the call only (LD F8).
                if everything is None:  # (None where a test patches it out, or swap=None was given)
                    everything = Reparametrization.of(self.module)
                call = functools.partial(self._functional_call, everything, args, kwargs)
                return call() if everything is None else self._swapped(everything, call, puts=False)
            return self._swapped(swap, lambda: self.module(*args, **kwargs))

    def _functional_call(self, layout: Optional["Reparametrization"], args: tuple, kwargs: dict):
        """The module called through ``torch.func.functional_call`` at this model's tensors (by
        the names it takes: a tied weight's second name, a plain attribute's). An entry of
        ``layout`` left holding a given tensor is put back: functional_call leaves one where a
        submodule is reached by two paths (review LI F1: the module kept it, 4.7 off after)."""
        given = (dict(self.params), dict(self.buffers))  # (a ParameterDict it refuses: LF F6)
        kept = [(table, key, table[key]) for table, key, _ in layout.slots] if layout is not None else []
        for name in itertools.chain(*given):  # (and each name's own entry: review LJ F1, F6)
            prefix, _, key = name.rpartition(".")
            sub = self.module.get_submodule(prefix)
            table = sub._parameters if key in sub._parameters else \
                sub._buffers if key in sub._buffers else vars(sub)
            kept.append((table, key, _entry(table, key, _ABSENT)))
        handle = None
        try:
            if not self.buffers:
                return functional_call(self.module, given, args, kwargs)
            # functional_call puts the module's own buffers back before it returns: read the
            # replaced ones from inside the call, after the forward.
            slots = [(sub._buffers, key, f"{prefix}.{key}" if prefix else key)
                     for prefix, sub in self.module.named_modules(remove_duplicate=False)
                     for key in sub._buffers]
            handle = self.module.register_forward_hook(lambda *_: self._read_back(slots, given[1]))
            return functional_call(self.module, given, args, kwargs)
        finally:
            if handle is not None:
                handle.remove()
            ids = {id(t) for part in given for t in part.values()}
            for table, key, tensor in kept:
                now = _entry(table, key, _ABSENT)
                if tensor is _ABSENT and now is not _ABSENT:  # (a class's attribute, copied in)
                    del table[key]
                elif now is not tensor and id(now) in ids:
                    table[key] = tensor

    def _swapped(self, swap: Optional["Reparametrization"], call: Callable[[], Any], join_only: bool = False,
                 in_run: bool = False, puts: bool = True):
        """``call()`` with ``swap`` putting this model's tensors in the module. A call made
        while the module holds this model's swap (a call of the model or another ``run``
        inside ``run``, in this thread or a worker's; two threads calling the model at
        once) runs in that swap, and the last one out reads the replaced buffers back and
        restores the module (review KC F1: a nested swap's restore put back a buffer the
        forward had replaced, 7.7e-2 off; KD F1, F3: a worker thread's swap did so too, and
        restored the module's own parameters under another thread's forward). A call of
        another model of the module swaps on top of it in the same thread (KD F2), and is
        refused while another thread runs in a swap (KF F1: the two swaps undid each
        other, 30 % off, and left the module holding plain tensors). With ``join_only``,
        only a call that joins a swap this model's ``run`` made (``in_run``) runs:
        ``_UNJOINED`` where none is on top of its group, nothing done (review LD F2: two
        threads' plain calls of an adapted model joined without the lock, and a buffer
        update was lost). Without ``puts``, ``call`` swaps the entries itself
        (``functional_call``): the swap puts none, writes the tables of the model's names and
        of the entries tied to them, and nests rather than joins (another thread's call of the
        model is refused). A swap that meets no other (the inner loop's calls, as a rule) is
        registered as a token that the first other look at the registry turns into its entry
        (:func:`_register_quick`): the same semantics, without building them per call."""
        thread, token = threading.get_ident(), None
        if puts and not (join_only or self.buffers) and swap.plain:
            with _SWAPS_LOCK:
                if not (_SWAPS or _NONE_WATCH):
                    # The one swap active, of no buffers: nothing to join, watch or read back. It is
                    # registered as a token (a list, the only entry of _SWAPS) that every other look at
                    # _SWAPS first turns into the entry and group the general path makes (_register_quick),
                    # so a call nested in it or another thread's sees what it would have seen (an
                    # entry and a group per call are a measurable share of a small model's `fom` step).
                    saved = swap.put_plain(self.params)
                    token = [self, swap, saved, thread, in_run]
                    _SWAPS.append(token)
        if token is not None:
            try:
                return call()
            finally:
                with _SWAPS_LOCK:
                    quick = len(token) == 5
                    if quick:  # (never registered: undone as the general path undoes it, no
                        _SWAPS.remove(token)  # buffer registered as None watched)
                        Reparametrization.undo_plain(saved)
                if not quick:
                    self._leave(token[5], thread, None)
        with _SWAPS_LOCK:
            if _SWAPS and type(_SWAPS[0]) is list:
                _register_quick()
            if join_only:
                group = next((group for group in _SWAPS
                              if group.stack[-1].model is self and group.stack[-1].in_run), None)
                if group is None:
                    return _UNJOINED
            else:
                tables = self._written(swap) if puts else self._written_through_call(swap)
                group = _Group.joined(tables, swap.reads, thread, self.module) if _SWAPS else None
            stack = group.stack if group is not None else None
            watched = None
            # (a call of the model inside run, another thread's; not one through functional_call,
            # which swaps for itself: two threads' calls restored under each other, review LG F1)
            if stack and stack[-1].model is self and puts:
                entry = stack[-1]
                entry.join(thread)
                if entry.given and not outside_transforms():  # (a transform inside run: review KF F3)
                    watched = [(table, key, name, table[key]) for table, key, name in entry.swap.slots
                               if name in entry.given]
            else:
                # (review KH F1, F2: a thread still running in a swap another thread made, one left
                # running after run returned, is in the way as much as the thread that made it)
                if stack and any(t != thread for e in stack for t in e.threads):
                    raise _crowded(self.module)
                if swap.parametrized:
                    check_parametrize_cache(self.module)
                if stack and self.buffers and puts:
                    group.catch_up(self)
                given = dict(self.buffers) if self.buffers and puts else None
                saved = swap.put(self.params, self.buffers) if puts else swap.put({}, {})
                entry = _Swap(self, swap, saved, given, thread, tables, in_run)
                if group is None:
                    _SWAPS.append(_Group(entry))
                else:
                    group.push(entry)
        try:
            return call()
        finally:
            self._leave(entry, thread, watched)

    @staticmethod
    def _leave(entry: "_Swap", thread: int, watched: Optional[List]) -> None:
        """:meth:`_swapped`'s end of a call in ``entry``: the buffers ``watched`` (under a
        transform) put back, and the swaps no call runs in any more undone."""
        replaced = None
        if watched is not None:  # a replacement made under the transform cannot leave it
            replaced = next((name for table, key, name, tensor in watched if table[key] is not tensor),
                            None)
            for table, key, _, tensor in watched:
                table[key] = tensor
        with _SWAPS_LOCK:
            if entry.leave(thread):
                # Undo the swaps no call runs in any more, from the innermost: one below a
                # swap another thread still runs in waits for it (review KJ F1: a worker left
                # in a nested model's swap, the outer swap restored the module under it).
                group, error = entry.group, None
                while group.stack and not group.stack[-1].threads:
                    done = group.pop()
                    try:  # (a read-back that raises: every swap below is still undone)
                        if done.given:
                            done.model._read_back(done.swap.slots, done.given)
                    except BaseException as err:  # noqa: BLE001 (raised below, after the undoing)
                        error = error or err
                    finally:
                        done.swap.undo(done.saved)
                        if done.given:
                            group.hand_down(done.model)
                if not group.stack and group in _SWAPS:  # (a forked child's registry starts empty)
                    _SWAPS.remove(group)
                if error is not None:
                    raise error
        if replaced is not None:
            raise _replaced_under_transform(replaced)

    def run(self, fn: Callable, /, *args, **kwargs):
        """``fn(module, *args, **kwargs)`` with the module at this model's parameters and
        buffers, as a call of the model has it: for a part of the model or a method of
        its (``fmodel.run(lambda m: m.features(x))``, where ``higher``'s functional model
        reads ``fmodel.features(x)``). Everything ``fn`` reads of the module (submodules,
        properties, parametrized weights, ``ModuleDict.values()``) is at these
        parameters, and the module's own entries are put back afterwards, error or not.
        Inside ``fn``, a call of this model (or another ``run`` of it) runs in the same
        swap. ``fn`` must not keep a part of the module for later (in a list of its own,
        a closure): outside ``run`` it runs at the module's own parameters.

        Returns:
            What ``fn`` returns: tensors, numbers (NumPy's too), strings, ``None``, NumPy
            arrays, ``torch.distributions`` objects, or tuples, lists and dicts of them
            (keys included). A module, a bound method or any other object, which may hold
            a part of the module, is refused (``TypeError``), and the call then changes
            nothing: this model's buffers and torch's global generators are put back.

        Raises:
            TypeError: ``fn`` is not a function (a module is not: it would run at its
                own parameters), or returned such an object.
            ValueError: the model's parameters are not all the module's own entries by
                the names ``named_parameters()`` gives (a tied weight's second name),
                where ``run`` cannot swap them.
        """
        if not callable(fn) or isinstance(fn, nn.Module):  # (a part given as fn would run outside the swap)
            raise TypeError(f"Invalid fn: expected a function of the module, e.g. lambda m: m.features(x); "
                            f"got {type(fn).__name__}")
        def of_module(module):
            return fn(module, *args, **kwargs)
        if self.serialised and _SWAPS:  # (inside its own run, a worker's call joins without the
            out = self._run(of_module, join_only=True)  # lock run holds: review LC F4)
            if out is not _UNJOINED:
                return out
        with process_lock() if self.serialised else _UNLOCKED:
            return self._run(of_module)

    def _run(self, fn: Callable[[nn.Module], Any], join_only: bool = False):
        """:meth:`run`'s call of ``fn(module)`` (with ``join_only``: only where it joins this
        model's swap, ``_UNJOINED`` otherwise)."""
        swap = self._module_swap(Reparametrization.of(self.module)) if self.swap is ... else self.swap
        if swap is None:
            self._check_names()
            raise ValueError("FunctionalModel.run needs the parameters and buffers under the names "
                             "named_parameters() and named_buffers() give (not a tied weight's second "
                             "name, a plain attribute's, or a parameter's or buffer's registered as "
                             "None); call the model itself instead")
        rng = torch_random_states()

        def call():
            # What the module's buffer entries hold inside the swap, this model's buffers or, in a
            # call joined inside another run, what that run's forwards put there (review KF F2), for
            # every model (review LA F4: one of the user's kept a refused call's BatchNorm update;
            # a clone per buffer and call, review KD F6).
            kept = [(table, key, table[key], table[key].clone()) for table, key, name in swap.slots
                    if name in self.buffers]
            out = fn(self.module)
            escaped = _escaping(out)
            if escaped is not None:  # (review KC F3: the refused call changes nothing)
                with torch.no_grad():
                    for table, key, tensor, value in kept:
                        tensor.copy_(value)
                        table[key] = tensor
                set_torch_random_states(rng)
                raise TypeError(f"FunctionalModel.run's fn returned a {type(escaped).__name__}: return "
                                "what fn computes (tensors, numbers), not a part of the module (a "
                                "submodule, a bound method) or an object that may hold one, which would "
                                "run at the module's own parameters once fn has returned")
            return out
        return self._swapped(swap, call, join_only, in_run=True)

    def _read_back(self, slots, given: Dict[str, Tensor]) -> None:
        """Take as this call's buffers those the forward replaced (``self.rm = a * self.rm
        + ...``) rather than wrote in place: the module's table holds them, as an ordinary
        call of the module would have left them. Under a ``torch.func`` transform, whose
        tensors must not outlive it, a replacement raises (the library's vectorised
        sweeps then run per task, with a warning; the probe finds one at the first step)."""
        inside = not outside_transforms()
        for table, key, name in slots:
            if name in given and table[key] is not None and table[key] is not given[name]:
                if inside:
                    raise _replaced_under_transform(name)
                self.buffers[name] = table[key]

    def _written(self, swap: "Reparametrization") -> FrozenSet[int]:
        """The ids of the entry tables this model's swap writes: every table of the module
        where it gives every name, else those of the names it gives (review LC F2: two modules
        sharing a frozen backbone, each model swapping its own head, were refused in two
        threads). Its forward reads every table of the module (``swap.reads``)."""
        if len(self.params) + len(self.buffers) >= len(swap.names):
            return swap.tables
        return frozenset(id(table) for table, _, name in swap.slots
                         if name in self.params or name in self.buffers)

    def _written_through_call(self, swap: "Reparametrization") -> FrozenSet[int]:
        """The ids of the entry tables ``functional_call`` writes for this model's names: each
        name's table, and those of the entries tied to it (it writes every alias), a plain
        attribute's counted as its module's parameter table (review LF F3, and LE F2: a model
        of a head, beside another module's sharing its backbone, runs)."""
        tables = set()
        for name in itertools.chain(self.params.keys(), self.buffers.keys()):
            prefix, _, key = name.rpartition(".")
            sub = self.module.get_submodule(prefix)  # (the names are checked)
            table = sub._buffers if key in sub._buffers else sub._parameters
            tables.add(id(table))
            primary = next((n for t, k, n in swap.slots if t is table and k == key), None)
            tables.update(id(t) for t, _, n in swap.slots if primary is not None and n == primary)
        return frozenset(tables)

    def _check_names(self) -> None:
        """Raise for a name given that is not one of the module's (a typo: ``functional_call``
        would run at the module's own entry for it, silently). A name is the module's if it is
        a parameter's or a buffer's (either dict may give either kind, as ``functional_call``
        takes them), a buffer's registered as None, or a plain attribute's of a submodule
        (review LD F5: those ran before the check came, and refusing them was a regression)."""
        known = {name for named in (self.module.named_parameters, self.module.named_buffers)
                 for name, _ in named(remove_duplicate=False)}
        for kind, given, named in (("params", self.params, self.module.named_parameters),
                                   ("buffers", self.buffers, self.module.named_buffers)):
            odd = next((name for name in given if not isinstance(name, str)), _ABSENT)
            if odd is not _ABSENT:  # (review LI F6, LJ F3: an AttributeError of the check's)
                raise TypeError(f"Invalid {kind}: key {odd!r} is a {type(odd).__name__} (expected names, "
                                f"strings as {named.__name__}() gives them)")
            unknown = [name for name in given if name not in known and not self._attribute(name)]
            if unknown:
                names = {name for name, _ in named(remove_duplicate=False)}
                raise ValueError(f"Invalid {kind}: {', '.join(map(repr, unknown[:3]))} "
                                 f"{'is not a name' if len(unknown) == 1 else 'are not names'} of the "
                                 f"{type(self.module).__name__}'s {named.__name__[6:]} (expected names as "
                                 f"{named.__name__}() gives them: "
                                 f"{', '.join(map(repr, sorted(names)[:6]))}{' ...' * (len(names) > 6)})")

    def _attribute(self, name: str) -> bool:
        """Whether ``name`` is a parameter or buffer registered as None or a plain tensor
        attribute of a submodule (in its ``__dict__``, or None there, or a tensor of its
        class), which ``functional_call`` replaces too; not a property, a parametrized weight
        (review LH F1: written through its setter, the module's ``original`` changed for good
        and the gradient was lost), one a forward pre-hook computes, or another kind of
        attribute (``training``: torch's TypeError)."""
        prefix, _, key = name.rpartition(".")
        try:
            sub = self.module.get_submodule(prefix)
        except AttributeError:
            return False
        if key in sub._buffers or key in sub._parameters:
            return True
        # (not one a forward pre-hook computes: the legacy weight_norm, spectral_norm, prune; the
        # hook overwrote the given tensor, review LI F2)
        if any(isinstance(hook, _WEIGHT_HOOKS) and key in (getattr(hook, "name", None),
                                                            getattr(hook, "_tensor_name", None))
               for hook in sub._forward_pre_hooks.values()):  # (torch's only: review LJ F2)
            return False
        # (None set in __init__ and given a tensor ran before, review LI F3; a class's tensor too)
        value = vars(sub)[key] if key in vars(sub) else inspect.getattr_static(type(sub), key, False)
        return isinstance(value, Tensor) or key in vars(sub) and value is None

    def _module_swap(self, swap: Optional["Reparametrization"]) -> Optional["Reparametrization"]:
        """``swap``, the module's swap now, if it knows every name given. functional_call does
        not put back the entries of a submodule reached by two paths (torch 2.13); the swap
        does."""
        if swap is None or not (self.params.keys() <= swap.names and self.buffers.keys() <= swap.names):
            return None
        return swap

    def named_parameters(self):
        """Iterate over ``(name, tensor)`` pairs of the current inner parameters."""
        return iter(self.params.items())

    def parameters(self):
        """Iterate over the current inner parameters."""
        return iter(self.params.values())

    def to_module(self) -> nn.Module:
        """A plain ``nn.Module``: a deep copy of the module holding these parameters and
        buffers (detached), e.g. to save or fine-tune an adapted model."""
        if self.swap is ... and self._module_swap(Reparametrization.of(self.module)) is None:
            self._check_names()  # (review LM F1, F3: a typo became an attribute of the copy)
        # One entry (tied names) given two tensors: the call refuses it, as functional_call does
        # (review LN F2: the copy held the last one given, 3.85 off the first).
        entries: Dict[int, Tuple[str, Any]] = {}
        for name, value in itertools.chain(self.params.items(), self.buffers.items()):
            prefix, _, key = name.rpartition(".")
            sub = self.module.get_submodule(prefix)
            held = _entry(sub._parameters, key, _entry(sub._buffers, key, None))
            first = entries.setdefault(id(held), (name, value)) if held is not None else (name, value)
            if first[1] is not value:
                raise ValueError(f"Invalid params: {first[0]!r} and {name!r} name one tied entry and are "
                                 "given different tensors (give one of them)")
        module = copy.deepcopy(self.module)
        _tie_as(self.module, module)
        with torch.no_grad():
            for given in (self.params, self.buffers):  # (by the names functional_call takes: LE F3)
                for name, value in given.items():
                    prefix, _, key = name.rpartition(".")
                    sub = module.get_submodule(prefix)
                    held = _entry(sub._parameters, key, _entry(sub._buffers, key, None))
                    if held is not None and value is not None and (held.shape, held.dtype, held.device) == \
                            (value.shape, value.dtype, value.device):
                        held.copy_(value)  # (in place: a tied weight stays tied)
                        continue
                    # (None, another shape, dtype or device: review LF F5, LM F2: copy_ cast a float64
                    # model's weights to the module's float32; at every tied name: LK F1)
                    new = None if value is None else value.detach().clone()
                    if new is not None and key in sub._parameters:
                        grad = held.requires_grad if held is not None else True
                        new = nn.Parameter(new, requires_grad=grad)
                    for t, k, _ in Reparametrization.of(module).slots if held is not None else ():
                        if t[k] is held:
                            t[k] = new
                    if key in sub._parameters or key in sub._buffers:
                        (sub._parameters if key in sub._parameters else sub._buffers)[key] = new
                    else:  # (a plain attribute, replaced as functional_call replaces it)
                        setattr(sub, key, new)
        return module


_UNJOINED = object()  # (FunctionalModel._swapped with join_only: no swap of the model to join)


_ABSENT = object()  # (Reparametrization.put: a name not given)


# torch's forward pre-hooks that compute a weight kept as a plain attribute (FunctionalModel._attribute)
_WEIGHT_HOOKS = (WeightNorm, SpectralNorm, BasePruningMethod)


def _tie_as(original: nn.Module, copied: nn.Module) -> None:
    """Tie again the entries of ``copied``, a deep copy of ``original``, that are one tensor in
    ``original`` and that the copy split: ``copy.deepcopy`` copies a scripted submodule's
    parameters apart from the others (review s37K: a weight tied across one kept its old value in
    :meth:`FunctionalModel.to_module`'s copy, which wrote the adapted one at one name only). The
    tensor a scripted submodule holds is kept (its tables take no other), the others take it."""
    groups: Dict[int, List[Tuple[Any, str]]] = {}
    pairs = zip(original.named_modules(remove_duplicate=False), copied.named_modules(remove_duplicate=False))
    for (_, sub), (_, twin) in pairs:
        for table, twin_table in ((sub._parameters, twin._parameters), (sub._buffers, twin._buffers)):
            for key in list(table.keys()):
                if table[key] is not None and key in twin_table:
                    groups.setdefault(id(table[key]), []).append((twin_table, key))
    for entries in groups.values():
        held = {id(t[k]): t[k] for t, k in entries}
        if len(held) < 2:
            continue
        fixed = [t[k] for t, k in entries if not isinstance(t, dict)]  # (a scripted submodule's)
        if len({id(t) for t in fixed}) > 1:
            continue  # (two scripted submodules each with its copy: none can take the other's)
        keep = fixed[0] if fixed else entries[0][0][entries[0][1]]
        for t, k in entries:
            if isinstance(t, dict):
                t[k] = keep


def _entry(table: Any, key: str, default: Any) -> Any:
    """``table[key]``, or ``default`` where it has no such key: a submodule's ``_parameters``
    or ``_buffers`` (a scripted submodule's are torch's OrderedDictWrapper, without ``get``:
    review s37K F1) or its ``vars()``."""
    return table[key] if key in table else default


def _mapping_like(value: Any) -> bool:
    """Whether ``value`` reads like a dict from name to tensor (``keys``, ``items`` and
    ``[]``), as an ``nn.ParameterDict`` does (a module of modules does not: review LE F3)."""
    return (isinstance(value, nn.ParameterDict) or not isinstance(value, nn.Module)) and \
        all(callable(getattr(value, name, None)) for name in ("keys", "items", "__getitem__"))


class _Swap:
    """A swap of a module's entries active for one :class:`FunctionalModel`: what to
    restore, the buffers it put, and how many calls run in it."""

    __slots__ = ("model", "swap", "saved", "given", "threads", "group", "order", "tables", "in_run")
    # (tables: the ids of the entry tables it writes; swap.reads, those its module's forward reads)

    def __init__(self, model: "FunctionalModel", swap: "Reparametrization", saved: List,
                 given: Optional[Dict[str, Tensor]], thread: int, tables: FrozenSet[int],
                 in_run: bool = False):
        self.model, self.swap, self.saved, self.given = model, swap, saved, given
        self.tables = tables  # the ids of the entry tables it writes
        self.in_run = in_run  # made by the model's run (whose fn may hand the model to a worker)
        self.threads: Dict[int, int] = {thread: 1}  # the calls running in it, by thread
        self.group: Optional["_Group"] = None
        self.order = next(_ORDER)  # (swaps of one thread nest: their order is their nesting)

    def join(self, thread: int) -> None:
        """One more call runs in this swap (under ``_SWAPS_LOCK``)."""
        self.threads[thread] = self.threads.get(thread, 0) + 1

    def resave(self, table: dict, key: str, value: Any) -> bool:
        """Restore ``value`` to ``table[key]`` (instead of what this swap replaced there);
        whether this swap replaced it."""
        for i, (t, k, _) in enumerate(self.saved):
            if t is table and k == key:
                self.saved[i] = (t, k, value)
                return True
        return False

    def only(self, thread: int) -> None:
        """Forget the calls of every other thread (in a forked child, which has none of them)."""
        self.threads = {t: n for t, n in self.threads.items() if t == thread}

    def belong(self, group: "_Group") -> None:
        """This swap is now in ``group`` (under ``_SWAPS_LOCK``)."""
        self.group = group

    def leave(self, thread: int) -> bool:
        """A call in this swap ended (under ``_SWAPS_LOCK``); whether it was the last."""
        self.threads[thread] -= 1
        if not self.threads[thread]:
            del self.threads[thread]
        return not self.threads


class _Group:
    """The active swaps of modules that share entry tables (a module, its submodules, a
    submodule two modules hold), innermost last, the tables they write and those their
    modules' forwards read: a swap that writes a table another reads, or reads one another
    writes, nests with it or is refused, whichever modules they were made on (review KJ F1's
    variant: a worker left in a swap of ``net[0]`` saw a swap of ``net`` restored under
    it, 1.21 for 6.0); two that only read a table both hold (a frozen backbone two models
    share, each swapping its own head: review LC F2) run side by side."""

    __slots__ = ("stack", "tables", "reads")

    def __init__(self, entry: _Swap):
        self.stack: List[_Swap] = [entry]
        self.tables: FrozenSet[int] = entry.tables  # the tables its swaps write
        self.reads: FrozenSet[int] = entry.swap.reads  # those their modules' forwards read
        entry.belong(self)

    @staticmethod
    def joined(tables: FrozenSet[int], reads: FrozenSet[int], thread: int,
               module: nn.Module) -> Optional["_Group"]:
        """The active group a swap writing ``tables`` of a module whose forward reads ``reads``
        meets (under ``_SWAPS_LOCK``): one of whose swaps writes a table it reads, or reads one it
        writes; the groups it meets merged into one: ``None`` if none does."""
        met = [group for group in _SWAPS
               if not group.tables.isdisjoint(reads) or not group.reads.isdisjoint(tables)]
        if len(met) < 2:
            return met[0] if met else None
        # (a swap of a module over those of two of its submodules: only this thread's swaps
        # nest, in the order they were made; where another thread runs in one, the new swap
        # would run on that thread's entries)
        if any(t != thread for group in met for entry in group.stack for t in entry.threads):
            raise _crowded(module)
        for group in met[1:]:
            _SWAPS.remove(group)
            met[0].absorb(group)
        return met[0]

    def absorb(self, other: "_Group") -> None:
        """Take ``other``'s swaps, all one thread's (under ``_SWAPS_LOCK``): they nest
        with this group's in the order they were made."""
        self.stack = sorted(self.stack + other.stack, key=lambda entry: entry.order)
        self.tables, self.reads = self.tables | other.tables, self.reads | other.reads
        for entry in other.stack:
            entry.belong(self)

    def push(self, entry: _Swap) -> None:
        """Put ``entry`` on top (under ``_SWAPS_LOCK``)."""
        entry.belong(self)
        self.stack.append(entry)
        self.tables, self.reads = self.tables | entry.tables, self.reads | entry.swap.reads

    def catch_up(self, model: "FunctionalModel") -> None:
        """Before a swap of ``model`` over this group's: the buffers its swap lower down has had
        replaced so far (its forwards' ``self.rm = ...``, read back only when that swap comes
        off) become the model's, which the new swap puts (review LA F2: A called inside B's run
        inside A's run put A's buffers of before, 0.35 off)."""
        lower = next((entry for entry in reversed(self.stack) if entry.model is model), None)
        if lower is None or not lower.given:
            return
        replaced = {}  # (by name, as _read_back takes them: a buffer registered under two names
        for table, key, name in lower.swap.slots:  # replaced through one, review LC F5)
            if name in lower.given:
                value = self._seen(lower, table, key)
                if value is not None and value is not lower.given[name]:
                    replaced[name] = value
        for name, value in replaced.items():
            model.buffers[name] = lower.given[name] = value

    def hand_down(self, model: "FunctionalModel") -> None:
        """After a swap of ``model`` came off (its replaced buffers read back into the model):
        its swap lower down, if any, sees them in the module, as its own forward would have
        left them (review LA F2: the outer swap's read-back then overwrote the inner call's)."""
        lower = next((entry for entry in reversed(self.stack) if entry.model is model), None)
        if lower is None or not lower.given:
            return
        newer = {name: model.buffers[name] for name in lower.given
                 if model.buffers.get(name) is not None and model.buffers[name] is not lower.given[name]}
        lower.given.update(newer)
        above = self._above(lower)
        for table, key, name in lower.swap.slots:  # (every slot of the name: review LC F5)
            if name in newer and not any(swap.resave(table, key, newer[name]) for swap in above):
                table[key] = newer[name]

    def _above(self, entry: _Swap) -> List[_Swap]:
        """The swaps over ``entry``, the nearest first."""
        return self.stack[next(i for i, e in enumerate(self.stack) if e is entry) + 1:]

    def _seen(self, entry: _Swap, table: dict, key: str) -> Any:
        """What ``table[key]`` holds while ``entry`` is the innermost swap: what the nearest
        swap over it that replaced it saved, else what it holds now."""
        for above in self._above(entry):
            for t, k, value in above.saved:
                if t is table and k == key:
                    return value
        return table[key]

    def pop(self) -> _Swap:
        """Take the top swap off (under ``_SWAPS_LOCK``): the group then covers the tables
        of the swaps left (a swap of ``net`` over one of ``net[0]``'s gone, ``net[1]`` is
        free again for another thread)."""
        done = self.stack.pop()
        if self.stack:
            self.tables = frozenset().union(*(entry.tables for entry in self.stack))
            self.reads = frozenset().union(*(entry.swap.reads for entry in self.stack))
        return done


def _replaced_under_transform(name: str) -> RuntimeError:
    """The error for a forward that replaced the buffer ``name`` under a ``torch.func`` transform."""
    return RuntimeError(f"the module's forward replaced its buffer {name!r} (self.{name.rsplit('.', 1)[-1]} "
                        "= ...) under a torch.func transform (vmap), which its new value cannot leave; "
                        "call the module per sample or task")


def _crowded(module: nn.Module) -> RuntimeError:
    """The error for a swap of ``module`` while another thread runs in a swap of its entries."""
    return RuntimeError(
        f"two models of one {type(module).__name__} ran in two threads at once: the module's entries "
        "hold one model's tensors at a time (the library's models swap them in for each call; a "
        "submodule's are its module's); call them one after the other, or one on a copy of the module "
        "(FunctionalModel.to_module())")


def crowded_elsewhere(module: nn.Module) -> Optional[RuntimeError]:
    """The two-threads error (:func:`_crowded`) where a model of another thread runs in a
    swap of ``module``'s entries, else ``None``: read where a look at the module's parameters
    failed, which such a swap can cause (review s37K F2: a user's model holding every entry
    with tensors that do not require grad made a call say the module had none that did)."""
    tables = {id(t) for sub in module.modules() for t in (sub._parameters, sub._buffers)}
    me = threading.get_ident()
    with _SWAPS_LOCK:
        if _SWAPS and type(_SWAPS[0]) is list:
            _register_quick()
        if any(not group.tables.isdisjoint(tables) and t != me
               for group in _SWAPS for entry in group.stack for t in entry.threads):
            return _crowded(module)
    return None


def _register_quick() -> None:
    """Turn the token of a swap made on :meth:`FunctionalModel._swapped`'s quick path (the only
    entry of ``_SWAPS``: ``[model, swap, saved, thread, in_run]``) into the entry and group the
    general path makes, before anything else looks at ``_SWAPS`` (under ``_SWAPS_LOCK``); the
    token keeps the entry, which its call leaves as the general path's calls do."""
    token = _SWAPS[0]
    model, swap, saved, thread, in_run = token
    entry = _Swap(model, swap, saved, None, thread, model._written(swap), in_run)
    _SWAPS[0] = _Group(entry)
    token.append(entry)


# The groups of active swaps (an entry lives only while a call of its model runs); or the token
# of the one swap made on the quick path (_register_quick).
_SWAPS: List[Any] = []


_SWAPS_LOCK = threading.Lock()


_ORDER = itertools.count()


def _escaping(out: Any) -> Any:
    """The first object in ``out`` (a result of :meth:`FunctionalModel.run`) that is not
    a tensor, a number, a string, ``None``, a NumPy array of numbers, a
    ``torch.distributions`` object (whose tensors are looked at too), or a tuple,
    list or dict (keys and values) of them: a module, a bound method, a generator, any
    other object may hold a part of the module (review KC F2: a submodule as a dict
    key, a defaultdict's factory). ``None`` when there is none."""
    stack, seen = [out], set()
    while stack:
        obj = stack.pop()
        if obj is None or isinstance(obj, (Tensor, numbers.Number, str, bytes, torch.dtype, torch.device,
                                           torch.Size)):
            continue
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if type(obj) in (tuple, list) or (isinstance(obj, tuple) and (
                hasattr(type(obj), "_fields") or type(obj).__module__ == "torch.return_types")):
            stack.extend(obj)  # a tuple, a namedtuple, torch's (values, indices) results
            stack.extend(getattr(obj, "__dict__", {}).values())  # (review KD F4: a subclass's attributes)
        elif type(obj) in (dict, collections.OrderedDict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif type(obj).__module__ == "numpy" and getattr(getattr(obj, "dtype", None), "kind", "O") in "biufc":
            continue  # an array of numbers
        elif isinstance(obj, (torch.distributions.Distribution, torch.distributions.Transform)):
            # their tensors, base distributions and transforms (review KD F5: LogNormal's); a
            # transform's weak reference to its inverse is a transform of its own
            stack.extend(v for k, v in vars(obj).items() if k != "_inv")
        else:
            return obj
    return None


# ``(id(buffer table), key)`` of the buffers registered as None that a swapped call set (and
# the swap put back to None), since an inner loop last looked: in any thread (review LD F1: a
# loss's model run in a worker noted it where the loop did not look). Library calls run one at
# a time; a user's call may add one meanwhile, of a module whose forward does set it.
_ASSIGNED: set = set()


def take_assigned_none_buffers() -> set:
    """What :data:`_ASSIGNED` holds, emptied (under ``_SWAPS_LOCK``, as :meth:`Reparametrization.undo`
    adds to it: a user thread's swap may note one meanwhile)."""
    with _SWAPS_LOCK:
        taken = set(_ASSIGNED)
        _ASSIGNED.clear()
    return taken


class Reparametrization:
    """A cached swap of a module's parameter and buffer entries.

    ``torch.func.functional_call`` finds the module's entries (and untangles
    tied ones) at every call; this finds them once: for each name of
    ``named_parameters()`` / ``named_buffers()``, every ``(owner table, key)``
    where the tensor lives, aliases of tied weights included. :meth:`put`
    puts given tensors in place and returns what it replaced, which
    :meth:`undo` puts back, as ``functional_call`` does around the call.
    A parametrized weight (``torch.nn.utils.parametrize``) is computed from
    its ``original`` entries, which are swapped like any parameter;
    ``parametrized`` says whether the module has one (its calls then refuse
    ``parametrize.cached()``, see :func:`check_parametrize_cache`).
    """

    def __init__(self, slots: List[Tuple[dict, str, str]], parametrized: bool = False,
                 empty: Sequence[Tuple[dict, str]] = (), reads: Optional[FrozenSet[int]] = None):
        self.slots = slots
        self.empty = tuple(empty)  # buffers registered as None, which a forward may set
        self.names = frozenset(name for _, _, name in slots)  # the names it swaps
        self.tables = frozenset(id(table) for table, _, _ in slots)  # the entry tables it writes
        # the entry tables its module's forward reads: every submodule's, empty ones too (review LG
        # F2: a parameter-free shared submodule's attribute, a backbone's only buffer, registered as
        # None, given to a model through functional_call, read by another module's model)
        self.reads = self.tables if reads is None else reads | self.tables
        self.parametrized = parametrized
        self.plain = not (parametrized or self.empty)  # (FunctionalModel._swapped's quick path)

    @classmethod
    def of(cls, module: nn.Module) -> "Reparametrization":
        """The swap for ``module``."""
        return cls.layout(module)[2]

    @classmethod
    def layout(cls, module: nn.Module) -> Tuple[List[Tuple[str, Tensor]], List[Tuple[str, Tensor]],
                                                 "Reparametrization"]:
        """``(named_parameters, named_buffers, swap)`` of ``module`` from one walk of its
        submodules: the two lists as ``list(module.named_parameters())`` and
        ``list(module.named_buffers())`` give them, and :meth:`of`'s swap."""
        slots: List[Tuple[dict, str, str]] = []
        seen = set()  # a submodule reached by two paths has one table
        named: Tuple[Dict[int, Tuple[str, Tensor]], Dict[int, Tuple[str, Tensor]]] = ({}, {})
        parametrized, empty, reads = False, [], set()
        for prefix, sub in module.named_modules(remove_duplicate=False):
            parametrized = parametrized or parametrize.is_parametrized(sub)
            reads.update((id(sub._parameters), id(sub._buffers)))
            for table, primary in ((sub._parameters, named[0]), (sub._buffers, named[1])):
                for key, t in table.items():
                    if t is None and table is sub._buffers and (id(table), key) not in seen:
                        seen.add((id(table), key))
                        empty.append((table, key))
                    if t is None or (id(table), key) in seen:
                        continue
                    seen.add((id(table), key))
                    name = primary.setdefault(id(t), (f"{prefix}.{key}" if prefix else key, t))[0]
                    slots.append((table, key, name))
        return list(named[0].values()), list(named[1].values()), \
            cls(slots, parametrized, empty, frozenset(reads))

    def put(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor]) -> "_Saved":
        """Put ``params`` and ``buffers`` (by name) in place; returns what to restore (under
        ``_SWAPS_LOCK``: it watches the buffers registered as None, :meth:`undo`)."""
        saved = _Saved(threading.get_ident())
        empty = self.empty
        if _NONE_WATCH:  # (one a forward set in another thread when this swap was laid out: LE F2)
            empty += tuple((table, key) for table, key, name in self.slots
                           if (id(table), key) in _NONE_WATCH and name not in params and name not in buffers)
        for table, key in empty:
            watch = _NONE_WATCH.get((id(table), key))
            if watch is None and table[key] is None:
                watch = _NONE_WATCH[(id(table), key)] = (table, [])
            if watch is not None:  # (one set outside every call is the user's: left alone)
                old = table[key]
                # Inside a swap of this thread's, a call starts from None too (review LF F2: a model
                # called in another's run ran on the cache the outer forward had made, 3.4 off);
                # one another thread watches is left to that thread's forward.
                if old is not None and all(h.thread == saved.thread for h in watch[1]):
                    table[key] = None
                watch[1].append(saved)
                saved.empty.append((table, key, old, table[key]))
        try:
            for table, key, name in self.slots:
                # (a name given None puts None, as functional_call does: review LI F4, it ran at
                # the module's own entry)
                value = params[name] if name in params else buffers.get(name, _ABSENT)
                if value is not _ABSENT:
                    saved.append((table, key, table[key]))
                    table[key] = value
        except BaseException:
            self.undo(saved, note=False)
            raise
        return saved

    def put_plain(self, params: Mapping[str, Tensor]) -> List[Tuple[dict, str, Tensor]]:
        """:meth:`put` of ``params`` alone, for :class:`FunctionalModel`'s quick path: a
        :attr:`plain` swap of no buffers while no other swap is active and no buffer
        registered as None is watched (under ``_SWAPS_LOCK``), so there is nothing to watch
        or note; returns what :meth:`undo_plain` puts back (a list of ``(table, key,
        tensor)``, which :meth:`undo` also takes)."""
        saved: List[Tuple[dict, str, Tensor]] = []
        try:
            for table, key, name in self.slots:
                if name in params:
                    saved.append((table, key, table[key]))
                    table[key] = params[name]
        except BaseException:
            self.undo_plain(saved)
            raise
        return saved

    @staticmethod
    def undo_plain(saved: List[Tuple[dict, str, Tensor]]) -> None:
        """Put back what :meth:`put_plain` replaced, from the last."""
        for table, key, value in reversed(saved):
            table[key] = value

    @staticmethod
    def undo(saved: "_Saved", note: bool = True) -> None:
        """Put back the entries :meth:`put` replaced, and the buffers registered as None it
        watched (under ``_SWAPS_LOCK``). A buffer registered as None that a forward sets (a
        cache) lives for the call only (review LC F6: the module kept a tensor of the model's,
        1.18 off): the last swap out puts None back, one nested in the same thread's what it
        found; while another thread's swap watches it, it is left to that one (review LD F4,
        LE F2: a swap put None back under another thread's forward, which then failed; LE F1: a
        model giving some names left a cache of the root's set). With ``note``, one that the
        call set is noted for this thread's library call, which refuses it
        (:meth:`~torch_ufom.unroll.InnerLoop.check_none_buffers`)."""
        for table, key, old, start in reversed(getattr(saved, "empty", ())):
            if note and table[key] is not start:
                _ASSIGNED.add((id(table), key))
            watch = _NONE_WATCH.get((id(table), key))
            holders = [h for h in watch[1] if h is not saved] if watch is not None else []
            if holders:
                watch[1][:] = holders
                if all(h.thread == saved.thread for h in holders):
                    table[key] = old
            else:
                _NONE_WATCH.pop((id(table), key), None)
                table[key] = None
        for table, key, value in reversed(saved):
            table[key] = value


class _Saved(list):
    """What :meth:`Reparametrization.put` replaced, ``(table, key, tensor)``; ``empty``, the
    buffers registered as None it watches, ``(table, key, what it held, what put left)``;
    ``thread``, the putting one's."""

    __slots__ = ("empty", "thread")

    def __init__(self, thread: int):
        super().__init__()
        self.empty: List[Tuple[dict, str, Optional[Tensor], Optional[Tensor]]] = []
        self.thread = thread


# The buffers registered as None that swaps watch, ``(id(table), key) -> (table, [the swaps'
# _Saved])`` (under ``_SWAPS_LOCK``): the last swap out puts None back.
_NONE_WATCH: Dict[Tuple[int, str], Tuple[dict, List[_Saved]]] = {}


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_swaps_after_fork)
