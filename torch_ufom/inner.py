"""Inner update rules: pure ``init`` / ``update`` pairs.

An inner rule maps the inner gradient ``g_j`` to the next inner state::

    state = rule.init(params)
    new_params, new_state = rule.update(grads, state, params, rule.hyper)

``params`` and ``grads`` are dicts from parameter name to tensor, ``state`` is a
tuple of tensors, ``hyper`` a dict of hyperparameters. A hyperparameter may be
a float, a tensor, a dict from parameter name to value (one value per
parameter, e.g. learned per-parameter learning rates), or a :class:`PerStep`
value that changes with the inner step (alone or inside such a dict). Tensors
held by the outer optimizer are meta-parameters and receive hypergradients
through ``update``, which must therefore be written with differentiable tensor
ops and must not modify its arguments in place. A hypergradient's sweep keeps
each step's arguments and differentiates the update at them again, so a rule of
your own that writes into one (``grads[n].mul_(0.5)``, ``state[0].mul_(b)``) is
refused with a ``ValueError`` naming the argument; a write through ``.data``,
which autograd does not see, is not caught and gives wrong hypergradients.

``init`` is not differentiated: the initial state is a constant of the inner
loop. A hypergradient therefore refuses a rule of your own whose ``init``
returns a state with a derivative with respect to a differentiated parameter
or a learned tensor: a proximal anchor ``params[n].clone()``, a state computed
from a learned rate, or the learned tensor itself. A constant that happens to
carry a graph of the parameters' copies (``p * 0``) passes; one whose graph
reaches a learned tensor (``lr * 0``) is refused: build it from ``lr.detach()``.
An ``init`` the library cannot check is refused too where a parameter is
differentiated: one that fails both at copies of the parameters that require
grad and at forward-mode dual copies (it then runs once more at plain copies,
where an error of its own raises as it is; its NumPy or Python draws happen
again) and one whose state autograd cannot differentiate; a state with a graph
that a reentrant ``torch.utils.checkpoint`` computed is always refused (it may
read a learned tensor unseen: use ``use_reentrant=False``). A constant anchor is
``params[n].detach().clone()``; an anchor at the meta-parameters is a proximal
term in the inner loss that reads the module's own parameter, whose direct read
the library differentiates. ``adapt`` and ``adapt_batch``, which differentiate
nothing, run such an ``init`` and such writes as written.

A rule may also read learned
tensors that are not hyperparameters (a learned optimiser's weights, which need
not broadcast to the parameters), held as attributes (tensors, modules, or
lists, tuples and dicts of them, where the estimator finds them) or elsewhere
(another object, a closure: a rule that declares one of the shortcuts below is
then evaluated for two steps at every call, and its graph searched for the
meta-parameters, since the shortcuts would drop their first-order terms; a
tensor read only from the third step on is missed there).

A hyperparameter tensor must have the dtype and device of the parameters it
applies to and broadcast to their shapes without changing them: a tensor
shared by every parameter is in practice a scalar, a per-parameter one may
have the parameter's shape (Meta-SGD). ``validate`` checks this, with the
values' ranges, against the adapted parameters before anything runs.

A rule of your own is checked where the library reads it, each error naming the
rule (``Invalid inner: ...``). When the configuration is resolved: ``hyper`` is a
mapping (a dict or an ``nn.ParameterDict``) and each ``ranges`` entry of a key of
``hyper`` a sequence ``(low, high, closed)`` of two numbers and a flag read for
its truth (``TypeError`` otherwise). At the first step of each call: ``init``
returns an iterable of tensors as the state (a tuple, a list, a generator; a
non-tensor entry is a ``TypeError``), and ``update`` a pair: a mapping with a
tensor of every adapted parameter's shape, dtype and device (a missing name or
another shape, dtype or device is a ``ValueError``, a non-tensor a ``TypeError``),
and an iterable of tensors. Later steps are not checked. A rule without ``init``
or ``update`` raises ``NotImplementedError`` naming it.

``first_order_additive`` declares that, with the gradients held constant (the
first-order rule ``F~`` of ``docs/maths.md#the-first-order-rule``), the update leaves the adjoint of the
state unchanged and is linear in the gradients with the same coefficients at
every step (a term that does not read them, ``p - lr * (g + c)``, is not
linear; a :class:`PerStep` value changes the coefficients, so a rule holding
one is not taken as additive whatever it declares). The estimator then sums
the first-order steps' gradients during the forward pass instead of sweeping
them backwards.

``first_order_identity`` declares less: with the gradients held constant, the
new parameters are the old ones plus a term that does not read them, and no
entry of the new optimizer state reads the parameters (momentum and Adam
without weight decay). The first-order VJP then passes the parameters'
adjoint unchanged, and what it gives the optimizer state never reaches the
parameters. With no learned hyperparameter the estimator then sweeps no
first-order step, as for an additive rule. Every additive rule has the
property whether it declares it or not; weight decay (``phi`` read by the
update) breaks both. A subclass of a built-in rule with code of its own (an
``update``, or a helper it overrides) does not inherit the built-in rule's
answer: both read ``False`` unless it declares them, since the shortcuts would
drop the terms of an update that is not the built-in one (a reset to a
constant, review JA F2; a rescaled rate, JD F1). A declaration of the user's
(a class attribute or a property, ``True`` itself) likewise describes the code
of the class that holds it and of its bases: the library takes it
(:func:`shortcut`) only where no other class of the rule's has code of its own
(a subclass's reset, a sibling's update in multiple inheritance: review JD F2,
KE F2), and below a built-in rule only where the built-in rule's own flag holds
for the hyperparameters (weight decay breaks both; JD F3, KE F1). An
instance's own value can only turn a shortcut off
(``rule.first_order_additive = False``). A declaration is not checked against
the update's arithmetic: a wrong one (``first_order_additive`` on an update
that scales the gradient by its running statistics, ``first_order_identity`` on
one with weight decay, ``elementwise`` below on a global-norm clip) gives wrong
hypergradients without a warning (review s38IR F4 measured 0.1-0.5 off); leave
a flag you are not sure of unset, which costs speed only.

The rules keep their step count in ``state[0]`` when they need it (momentum
buffers, bias corrections, :class:`PerStep` values). The built-in rules'
``update`` acts elementwise on the state, so it runs unchanged on a meta-batch's
state stacked along a leading task dimension (the count then stays shared); a
meta-batch calls it there, outside ``torch.func.vmap``, so a reduction over a
tensor (a norm) of a rule that declares ``elementwise`` would mix the tasks.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import numbers
import sys
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.utils._pytree as pytree
from torch import Tensor

__all__ = ["InnerRule", "SGD", "Adam", "AdamW", "RMSprop", "PerStep", "per_param", "check_hyper", "shortcut"]

# Set by :func:`values_deferred`: the ids of the tensors whose range checks collect their flags,
# unread, and the list of those flags.
_VALUES_DEFERRED = contextvars.ContextVar("torch_ufom_inner_values_deferred", default=None)


@contextlib.contextmanager
def values_deferred(tensors: Sequence[Tensor]):
    """Within it, the range checks of ``tensors`` (in the rules' constructors, ``validate``,
    :func:`check_hyper`, whoever calls them: a user's rule with bounds of its own too) append
    their 0-d flags, unread, to the list it yields, instead of reading each (a host
    synchronisation per tensor); other tensors' checks read as always (review s36R F1). The
    caller reads the flags at once and, where one is ``False``, runs the checks again outside
    to name the value. Private to the library (not in ``__all__``)."""
    flags: list = []
    token = _VALUES_DEFERRED.set(({id(t) for t in tensors}, flags))
    try:
        yield flags
    finally:
        _VALUES_DEFERRED.reset(token)


class PerStep:
    """A hyperparameter whose value changes with the inner step ``j``.

    Step ``j`` (``j = 0 .. steps - 1``) of the inner loop uses ``values[j]``.
    ``values`` is a sequence of numbers or a 1-D floating-point tensor of
    length ``steps``; a tensor held by the outer optimizer is learned, one
    hypergradient per step. A ``PerStep`` may stand for the whole
    hyperparameter or for one parameter's entry of a per-parameter dict.
    MAML++'s learned per-layer, per-step rates (LSLR) are::

        SGD(lr={name: PerStep(torch.full((steps,), 0.01, requires_grad=True))
                for name, _ in model.named_parameters()})

    The rule looks the value up with its step count (``state[0]``), by a
    mask rather than an index, so it works on a shared count and under
    ``torch.func.vmap`` over per-task counts alike. Its length is checked
    against the number of inner steps when the rule is validated (``steps``).

    Args:
        values: one value per inner step.

    Attributes:
        values: the 1-D tensor as given (give it to the outer optimizer to
            learn it), or the numbers as a tuple of floats.

    Raises:
        TypeError: ``values`` is neither a sequence of numbers nor a tensor.
        ValueError: ``values`` is empty, or a tensor not 1-D or not floating point.
    """

    def __init__(self, values: Union[Sequence[float], Tensor]):
        self.values = values

    @property
    def values(self) -> Union[Tuple[float, ...], Tensor]:
        """The 1-D tensor as given, or the numbers as a tuple of floats (a list given, or
        assigned later, is copied: editing it afterwards changes nothing here)."""
        return self._values

    @values.setter
    def values(self, values: Union[Sequence[float], Tensor]) -> None:
        if hasattr(values, "__array__") and not isinstance(values, Tensor):
            values = values.tolist()  # a NumPy array
        if isinstance(values, Tensor):
            if values.dim() != 1 or not values.is_floating_point():
                raise ValueError(f"Invalid PerStep values: expected a 1-D floating-point tensor (one "
                                 f"value per inner step), got shape {tuple(values.shape)}, {values.dtype}")
        elif (isinstance(values, (str, bytes)) or not isinstance(values, Sequence)
              or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values)):
            raise TypeError(f"Invalid PerStep values: {values!r} (expected a sequence of numbers or a "
                            "1-D tensor, one value per inner step)")
        else:
            values = tuple(float(v) for v in values)
        if len(values) == 0:
            raise ValueError("Invalid PerStep values: empty (expected one value per inner step)")
        self._values = values

    def __len__(self) -> int:
        return len(self.values)

    def __setstate__(self, state):
        table, slots = state if isinstance(state, tuple) else (state, None)
        table = dict(table or {})
        legacy = table.pop("values", None)  # pickled before values became a property
        self.__dict__.update(table)
        if legacy is not None:
            self.values = legacy  # through the setter: checked, a list copied into a tuple
        for name, value in (slots or {}).items():
            setattr(self, name, value)

    def __getstate__(self):
        state = super().__getstate__()  # (dict, slots) for a subclass with __slots__
        table = state[0] if isinstance(state, tuple) else state
        if isinstance(table, dict) and "_tensors" in table:  # device copies, made again on use
            table = {k: v for k, v in table.items() if k != "_tensors"}
            state = (table,) + state[1:] if isinstance(state, tuple) else table
        return state

    def at(self, count: Tensor, like: Tensor) -> Tensor:
        """The value at step ``count`` (a 0-d tensor), as a 0-d tensor like ``like``.

        A count past the end gives 0; ``validate(params, steps)`` rules that out.
        """
        values = self.values
        if not isinstance(values, Tensor):  # one copy to the device per dtype and device, not per step
            key = (like.dtype, like.device)
            cache = self.__dict__.setdefault("_tensors", {})
            hit = cache.get(key)
            if hit is None or hit[0] is not values:  # values reassigned since: copy them again
                hit = cache[key] = (values, torch.tensor(values, dtype=like.dtype, device=like.device))
            values = hit[1]
        # A mask, not values[count]: the count may be batched under vmap.
        mask = torch.arange(len(values), dtype=count.dtype, device=values.device) == _local(count, values)
        return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()

    def __repr__(self) -> str:
        if isinstance(self.values, Tensor):
            return f"PerStep(tensor{tuple(self.values.shape)})"
        return f"PerStep({list(self.values)!r})"


Hyper = Union[float, Tensor, PerStep, Mapping[str, Union[float, Tensor, PerStep]]]
Params = Union[Mapping[str, Tensor], Sequence[str]]


def per_param(value: Hyper, name: str):
    """The value of hyperparameter ``value`` for the parameter called ``name``."""
    return value[name] if isinstance(value, Mapping) else value


def check_hyper(value: Hyper, arg: str, params: Params, *, low: float = 0.0,
                high: float = float("inf"), closed: bool = False, steps: Optional[int] = None,
                per_step: bool = True) -> None:
    """Validate one hyperparameter against the adapted parameters.

    Args:
        value: the hyperparameter (a float, a tensor, a :class:`PerStep`, or a
            dict from parameter name to one of those).
        arg: its name as the user wrote it, used in the messages.
        params: the adapted parameters, a mapping name -> tensor (then each
            tensor's dtype, device and shape are checked too), or only their
            names (then only the keys of a per-parameter dict are checked).
        low, high: the accepted range ``[low, high)`` (``[low, high]`` when
            ``closed``).
        steps: the number of inner steps, which a :class:`PerStep` must match;
            ``None`` leaves its length unchecked.
        per_step: whether a :class:`PerStep` is accepted here.

    Raises:
        ValueError: naming ``arg`` (with the parameter's key for a dict entry)
            for a value out of range or not finite, a non-float tensor, a
            tensor whose dtype or device differs from its parameter's or
            that does not broadcast to its shape unchanged, a meta tensor, a
            ``PerStep`` of another length than ``steps``, or a dict whose
            keys are not the adapted parameters' names.
    """
    tensors = params if isinstance(params, Mapping) else {}
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(params))
        missing = sorted(set(params) - set(value))
        if unknown or missing:
            raise ValueError(
                f"Invalid {arg}: a per-parameter dict must have exactly the model's adapted "
                f"parameter names, as named_parameters() gives them (a tied parameter under its "
                f"first name); unknown {unknown}, missing {missing}"
                + (" (the inner loop adapts every parameter that requires grad unless inner_params= "
                   "selects some: pass inner_params= to leave parameters out of it, e.g. rates the "
                   "model holds)" if missing else ""))
        for k, v in value.items():
            target = {k: tensors[k]} if k in tensors else {}
            _check_entry(v, f"{arg}[{k!r}]", target, (low, high, closed), (steps, per_step), False)
    else:
        _check_entry(value, arg, tensors, (low, high, closed), (steps, per_step), True)


def _check_entry(v, arg: str, targets: Mapping[str, Tensor], bounds, per_step_rule,
                 shared: bool) -> None:
    """One value (or one dict entry) against the parameters ``targets`` it applies to;
    ``bounds`` is ``(low, high, closed)``, ``per_step_rule`` is ``(steps, per_step)``:
    the inner steps (or ``None``) and whether a :class:`PerStep` value is accepted."""
    low, high, closed = bounds
    steps, per_step = per_step_rule
    if isinstance(v, PerStep):
        if not per_step:
            raise TypeError(f"Invalid {arg}: {v!r} (a PerStep value is not accepted here; expected "
                            "a float or a tensor)")
        if steps is not None and len(v) != steps:
            raise ValueError(f"Invalid {arg}: PerStep has {len(v)} values but the inner loop runs "
                             f"steps={steps} (expected one value per inner step)")
        values = v.values
        if isinstance(values, Tensor):
            _check_tensor(values, arg, targets, shape=False, shared=shared)
        else:
            # Checked on the CPU whatever the default device (torch.device("meta") while a
            # model is built, or CUDA, where reading the check would synchronise).
            values = torch.tensor(values, dtype=torch.float64, device="cpu")
        _check_value(values, arg, low, high, closed)
        return
    if isinstance(v, Tensor):
        _check_tensor(v, arg, targets, shape=True, shared=shared)
    _check_value(v, arg, low, high, closed)


def _check_tensor(v: Tensor, arg: str, targets: Mapping[str, Tensor], shape: bool, shared: bool) -> None:
    """``v`` is a float tensor with each target's dtype and device that broadcasts to its shape."""
    if not v.is_floating_point():
        raise ValueError(f"Invalid {arg}: expected a floating-point tensor, got {v.dtype}")
    if v.is_meta:
        raise ValueError(f"Invalid {arg}: a meta-device tensor has no values (expected a tensor on "
                         "the parameters' device)")
    if v.requires_grad and v.grad_fn is not None and not (v._is_view() and v._base.is_leaf):
        raise ValueError(f"Invalid {arg}: a tensor computed from others (grad_fn="
                         f"{type(v.grad_fn).__name__}): the rule would keep its value at construction "
                         "and its graph would be used up by the first backward (expected a leaf tensor, "
                         "which the outer optimizer holds to learn it, a view of one such as lrs[i], "
                         "or a tensor without grad)")
    for n, p in targets.items():
        if v.dtype != p.dtype:
            raise ValueError(f"Invalid {arg}: a {v.dtype} tensor for parameter {n!r} of dtype "
                             f"{p.dtype} (expected the parameter's dtype, or a Python float)")
        if v.device != p.device:
            raise ValueError(f"Invalid {arg}: a tensor on {v.device} for parameter {n!r} on "
                             f"{p.device} (expected the parameter's device)")
        if shape and not _broadcasts(v.shape, p.shape):
            hint = ("a scalar, or a dict from parameter name to a tensor that broadcasts to that "
                    "parameter" if shared else "a scalar or a tensor that broadcasts to the parameter")
            raise ValueError(f"Invalid {arg}: shape {tuple(v.shape)} does not broadcast to parameter "
                             f"{n!r} of shape {tuple(p.shape)} without changing it (expected {hint})")


def _broadcasts(shape, target) -> bool:
    """Whether ``shape`` broadcasts to ``target`` with the result's shape ``target``."""
    return len(shape) <= len(target) and all(a in (1, b) for a, b in zip(reversed(shape), reversed(target)))


def in_range(v: Tensor, low: float, high: float, closed: bool) -> Tensor:
    """A 0-d bool tensor, not read here: every value of ``v`` is finite and in ``[low, high)``
    (``[low, high]`` when ``closed``)."""
    with torch.no_grad():
        below = (v <= high) if closed else (v < high)
        return ((v >= low) & below & torch.isfinite(v)).all()


def _check_value(v, arg: str, low: float, high: float, closed: bool = False) -> None:
    if high == float("inf"):
        where = f">= {low}"
    else:
        where = f"in [{low}, {high}]" if closed else f"in [{low}, {high})"
    if isinstance(v, Tensor):
        if not v.is_floating_point():
            raise ValueError(f"Invalid {arg}: expected a floating-point tensor, got {v.dtype}")
        if v.is_meta:
            raise ValueError(f"Invalid {arg}: a meta-device tensor has no values (expected a tensor on "
                             "the parameters' device)")
        deferred = _VALUES_DEFERRED.get()
        if deferred is not None and id(v) in deferred[0]:
            deferred[1].append(in_range(v, low, high, closed))  # read with the others (values_deferred)
            return
        if not bool(in_range(v, low, high, closed)):
            rate = low == 0.0 and arg.startswith(("lr", "inner_lr"))
            hint = (" (for a rate of any sign, as Meta-SGD learns: a subclass of the rule with ranges = "
                    "{'lr': (-math.inf, math.inf, False)}, docs/porting.md)") if rate else ""
            raise ValueError(f"Invalid {arg}: values must be finite and {where}{hint}")
    elif isinstance(v, numbers.Real) and not isinstance(v, bool):
        x = float(v)
        if not (low <= x and (x <= high if closed else x < high) and math.isfinite(x)):
            raise ValueError(f"Invalid {arg}: {v!r} (expected a finite number {where})")
    elif isinstance(v, (list, tuple)) and any(isinstance(x, Tensor) for x in v):
        # (higher's per-parameter list of rates; the tensors' reprs would fill the screen)
        raise TypeError(f"Invalid {arg}: a {type(v).__name__} holding tensors (expected a float, a tensor, "
                         "a PerStep, or a dict from parameter name, as model.named_parameters() gives "
                         "them, to one of those)")
    else:
        raise TypeError(f"Invalid {arg}: {v!r} (expected a float, a tensor, a PerStep or a dict of "
                        "those)")


class _Flag:
    """A built-in rule's flag that follows from its hyperparameters, computed from them at
    each read (they may be assigned between calls), unless an instance sets its own value
    (as a subclass may, in ``__init__``; a subclass's class attribute overrides it too).
    A shortcut's flag (``first_order_additive``, ``first_order_identity``) reads ``False``
    for a subclass (or an instance) with code of its own that declares nothing (:func:`own_code`): it
    describes the built-in update, and the shortcut it allows would drop terms of another one
    (a subclass of ``SGD`` that resets a parameter is not additive)."""

    def __init__(self, compute, doc: str, shortcut: bool = False):
        self.compute, self.__doc__, self.shortcut = compute, doc, shortcut

    def __set_name__(self, owner, name: str) -> None:
        if not hasattr(self, "owner"):  # (the class that defines it: a subclass's body that reuses
            self.name, self.owner = name, owner  # the object, x = SGD.x, must not take it: review KG F5)

    def __get__(self, rule, owner=None):
        if rule is None:
            return self
        value = rule.__dict__.get(self.name, _UNSET_FLAG)
        if value is not _UNSET_FLAG:
            return value
        if self.shortcut and own_code(rule):
            return False
        return self.compute(rule)

    def __set__(self, rule, value) -> None:
        rule.__dict__[self.name] = value


_UNSET_FLAG = object()


def shortcut(rule: Any, name: str) -> bool:
    """Whether ``rule``'s shortcut flag ``name`` (``"first_order_additive"`` or
    ``"first_order_identity"``) holds for the update that runs: what the estimator and
    the inner loop read (a ``False`` only loses the shortcut; an exact update runs
    either way).

    An instance's own value can only turn a shortcut off (a ``True`` set by a base class's
    constructor would vouch for a subclass's update: reviews KG F2, KI F1). A built-in
    rule's flag follows its hyperparameters, and holds only where no class of the user's
    anywhere among the rule's classes, nor an instance attribute replacing a method, has
    code of its own (:func:`own_code`; review KI F2: a mixin after ``SGD`` whose ``_get``
    ``SGD`` calls). A declaration of the user's (a class attribute or a property, made at
    any time) describes the code of the class that holds it and of that class's bases:
    it holds only if it is ``True`` itself, no other class of the user's among the rule's
    classes has code of its own (review JD F2: a child that resets a bias; KE F2: a
    sibling in multiple inheritance), and every built-in rule among the bases has the
    flag for the hyperparameters (JD F3, KE F1, KG F1, KG F3: weight decay, momentum,
    Adam's update)."""
    if vars(rule).get(name, True) is not True or _instance_code(rule):
        return False
    if name == "first_order_additive" and _holds_per_step(rule):
        return False  # PerStep values: other coefficients at each step (review s34J F3: 25 % off)
    mro = type(rule).__mro__
    holder = next((klass for klass in mro if name in vars(klass)), None)
    if holder is None:
        return False
    declared = vars(holder)[name]
    if _library_class(holder):  # a built-in rule's flag, or InnerRule's False
        if isinstance(declared, _Flag):
            return bool(declared.compute(rule)) and not own_code(rule)
        return declared is True
    if isinstance(declared, (property, _Flag)):  # (a _Flag re-exported by a user's class: review KI F4)
        declared = declared.__get__(rule, type(rule))
    if declared is not True:
        return False
    vouched = set(holder.__mro__)
    if any(klass not in vouched and not _library_class(klass) and _has_code(klass) for klass in mro):
        return False
    return _built_in_holds(rule, name, mro)


def _holds_per_step(rule: Any) -> bool:
    """Whether ``rule`` holds a :class:`PerStep` anywhere among its attributes (``hyper``'s
    entries, per-parameter dicts, or an attribute of its own: review s34P F4, 0.90 off,
    declared additive), as :func:`~torch_ufom.rule_checks.held_tensors` walks them."""
    return any(isinstance(leaf, PerStep) for leaf in pytree.tree_leaves(list(vars(rule).values())))


def _built_in_holds(rule: Any, name: str, mro: Tuple[type, ...]) -> bool:
    """Whether every built-in rule among ``rule``'s classes has the flag ``name`` for its
    hyperparameters: its :class:`_Flag`, or ``InnerRule``'s ``False`` where it has none
    (review KG F3: Adam's update is not additive, whatever a subclass declares)."""
    for klass in mro:
        if klass is not InnerRule and issubclass(klass, InnerRule) and klass.__module__ == __name__ and \
                _library_class(klass):
            flag = next(vars(k)[name] for k in klass.__mro__ if name in vars(k))
            if not (flag.compute(rule) if isinstance(flag, _Flag) else flag is True):
                return False
    return True


def _instance_code(rule: Any) -> bool:
    """Whether the instance holds code of its own: a callable in its ``__dict__`` in place
    of one of its class's attributes (an ``update``, an ``init``, a helper such as ``_get``:
    review KG F4); a module or function it holds as data (a learned optimiser's network,
    review KI F5) is not."""
    return any(callable(v) and hasattr(type(rule), k) for k, v in vars(rule).items())


def _library_class(klass: type) -> bool:
    """Whether ``klass`` is this module's (a built-in rule, ``InnerRule``), or Python's or
    torch's (``object``, ``abc.ABC``, ``typing.Generic``, ``nn.Module`` as a holder of learned
    hyperparameters: review KJ F2), whose code is not a rule's update: the class its module
    holds by its name, not one that only says it is from there (review LA F1: a class made by
    ``abc.ABCMeta(name, bases, body)``, ``types.new_class`` or ``exec`` reads ``abc`` or
    ``builtins`` as its module, and kept SGD's shortcuts over its own update, 1.08 off)."""
    module = klass.__module__
    if module != __name__ and module.split(".")[0] not in _FOREIGN:
        return False
    found: Any = sys.modules.get(module)
    for part in klass.__qualname__.split("."):
        found = getattr(found, part, None)
    return found is klass


def _has_code(klass: type) -> bool:
    """Whether ``klass`` defines a method or any callable (a helper such as ``_get``, review JD
    F1), or any other descriptor (a static or class method, a property, a
    ``functools.partialmethod`` or ``cached_property``: review KG F4) but a built-in flag,
    besides dunder names."""
    return any(callable(v) or (hasattr(type(v), "__get__") and not isinstance(v, _Flag))
               for k, v in vars(klass).items()
               if not (k.startswith("__") and k.endswith("__")) or k in _CODE_DUNDERS)


_FOREIGN = frozenset({"builtins", "abc", "typing", "torch"})
# Dunder methods that change what a rule's methods are (review KI F3: __getattribute__
# serving another update).
_CODE_DUNDERS = frozenset({"__getattribute__", "__getattr__"})


def own_code(rule: Any) -> bool:
    """Whether ``rule`` runs code of its own besides the built-in rules': a method (or any
    callable: a helper such as ``_get``, review JD F1; any other descriptor) defined by a
    class of the user's among its classes, or an attribute of the instance replacing one
    of its class's (an ``update``, ``init``, ``_get`` given to it)."""
    if _instance_code(rule):
        return True
    # Every class of the user's counts, below the built-in class or not: a mixin after it in
    # the method resolution order supplies methods its code calls (review KI F2: R(SGD, M)).
    return any(not _library_class(klass) and _has_code(klass) for klass in type(rule).__mro__)


_NO_RANGE = object()  # (a hyperparameter without a ranges entry: the default range)


def _number_like(value: Any) -> bool:
    """A real number, NumPy's included, or a one-element real tensor."""
    if isinstance(value, Tensor):
        return value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_rule_contract(inner: "InnerRule") -> None:
    """Raise, naming the rule, where what the library reads of a rule of the user's does not
    read as it must: ``hyper`` a mapping (a dict, an ``nn.ParameterDict``), and each of its keys'
    ``ranges`` entry, where there is one, ``(low, high, closed)`` (review s32E F3: an AttributeError
    or a ValueError from deep inside; s32H F1, F2: a ParameterDict, a list entry and an entry of a
    key the rule does not have had run, and run again)."""
    name = type(inner).__name__
    if not hasattr(inner, "hyper"):
        raise TypeError(f"Invalid inner: {name} has no hyper (set self.hyper = {{...}} in its constructor, a "
                        "dict from hyperparameter name to value; {} for none)")
    hyper = inner.hyper
    if not isinstance(hyper, (Mapping, torch.nn.ParameterDict)):
        raise TypeError(f"Invalid inner: {name}.hyper is {type(hyper).__name__} (expected a dict from "
                        "hyperparameter name to value; {} for none)")
    ranges = getattr(inner, "ranges", {})
    if hyper and not callable(getattr(ranges, "get", None)):
        raise TypeError(f"Invalid inner: {name}.ranges is {type(ranges).__name__} (expected a dict from "
                        "hyperparameter name to (low, high, closed))")
    for key in hyper.keys():
        entry = ranges.get(key, _NO_RANGE)
        if entry is _NO_RANGE:
            continue
        # (as the rule's checks read it: bounds compared with numbers, NumPy's and 0-d tensors' too,
        # review s32L F6; closed read for its truth, whatever it is, s32O F3; None fails the unpacking, F5)
        fits = isinstance(entry, Sequence) and not isinstance(entry, (str, bytes)) and len(entry) == 3 and \
            all(_number_like(bound) for bound in entry[:2])
        if not fits:
            raise TypeError(f"Invalid inner: {name}.ranges[{key!r}] is {entry!r} (expected (low, high, "
                            "closed): two numbers and a flag)")


def plain_update(params: Sequence[Tensor], grads: Sequence[Tensor], lr: float,
                 inplace: bool = False) -> Tuple[Tensor, ...]:
    """``update``'s new parameters for a rule whose :attr:`InnerRule.plain_rate` is ``lr``:
    ``phi - lr * g`` for each parameter and its gradient, in order, without the
    containers. The same operation as :meth:`SGD.update`'s, bit for bit: one foreach
    kernel where nothing is differentiated, ``p.add(g, alpha=-lr)`` per parameter
    under autograd. ``inplace``: written into ``params`` (which must carry no graph:
    the inner loop's detached aliases of its leaves) and returned.

    A function of the library's, not a method a rule could override (review s40R F1: a
    rule of the user's declaring ``plain_rate`` with an attribute of that name of its own
    broke); the rate is an argument, as the inner loop reads :attr:`InnerRule.plain_rate`
    once per call (it walks the rule's classes)."""
    if inplace:
        torch._foreach_add_(params, grads, alpha=-lr)
        return tuple(params)
    if not torch.is_grad_enabled():
        return tuple(torch._foreach_add(params, grads, alpha=-lr))
    return tuple(p.add(g, alpha=-lr) for p, g in zip(params, grads))


class InnerRule:
    """Base class of inner update rules (see the module docstring for the contract).

    Subclasses set ``hyper`` (name -> value) in their constructor, call
    ``_check_values()``, and may declare per hyperparameter the accepted
    range (``ranges``), the name used in messages (``labels``), and which
    ones take no :class:`PerStep` (``fixed``). A rule of your own whose
    ``update`` acts on each entry of the state on its own declares
    ``elementwise = True``: a meta-batch (``backward_batch``,
    ``hypergrad_batch``, ``adapt_batch``) then runs it on the tasks' state
    stacked along a leading dimension; otherwise (a global-norm clip, a step
    normalised by a tensor's norm, which would mix the tasks) the meta-batch
    runs task by task (``backward_batch`` and ``hypergrad_batch`` warn).
    """

    hyper: Dict[str, Hyper]
    first_order_additive: bool = False
    first_order_identity: bool = False
    # Declared by a rule of the user's whose update acts on each entry of the state on its own
    # (no norm or other reduction over a tensor): a meta-batch then runs it on the tasks'
    # stacked state, else task by task. The built-in rules are, whatever this says.
    elementwise: bool = False
    ranges: Mapping[str, Tuple[float, float, bool]] = {}  # (low, high, closed); default [0, inf)
    labels: Mapping[str, str] = {}  # hyper key -> the argument as the user wrote it
    fixed: Tuple[str, ...] = ()  # hyperparameters that may not be PerStep

    def init(self, params: Mapping[str, Tensor]) -> Tuple[Tensor, ...]:
        """Return the initial optimizer state for ``params``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement init(params), which returns the "
                                  "rule's initial state: a tuple of tensors, () for none")

    @property
    def plain_rate(self) -> Optional[float]:
        """``lr`` when ``update`` is exactly ``phi - lr * g`` for one plain-number ``lr``
        and no state (the inner loop then applies :func:`plain_update` at that rate
        instead of ``update``); ``None`` otherwise."""
        return None

    def update(self, grads, state, params, hyper):
        """Return ``(new_params, new_state)``; see the module docstring."""
        raise NotImplementedError(f"{type(self).__name__} does not implement update(grads, state, params, "
                                  "hyper), which returns (new_params, new_state)")

    def validate(self, params: Params, steps: Optional[int] = None) -> None:
        """Check the hyperparameters against the adapted parameters.

        Args:
            params: the adapted parameters, a mapping name -> tensor: every
                hyperparameter tensor must have its parameters' dtype and
                device and broadcast to their shapes unchanged, and a
                per-parameter dict must name exactly these parameters. A
                sequence of names (the older form) checks only the names.
            steps: the number of inner steps; every :class:`PerStep` must have
                this length. ``None`` leaves the lengths unchecked.

        Raises:
            ValueError: naming the argument (see :func:`check_hyper`).
        """
        if isinstance(params, (str, bytes)) or not isinstance(params, (Mapping, Sequence)):
            raise TypeError(f"params must be a mapping name -> tensor or a sequence of names, got "
                            f"{type(params).__name__}")
        for key, value in self.hyper.items():
            self._check(key, value, params, steps)

    def layout(self) -> tuple:
        """What :meth:`validate` checks but the values of tensors, cheaply, for a caller that
        validated once to see a change: each hyperparameter's numbers, its tensors' identity,
        shape, dtype and device, a per-parameter dict's names, a :class:`PerStep`'s values."""
        return tuple((key, _layout(value)) for key, value in self.hyper.items())

    def tensors(self) -> Tuple[Tensor, ...]:
        """Every tensor among the hyperparameters (those inside :class:`PerStep` values too)."""
        return tuple(t for value in self.hyper.values() for t in hyper_tensors(value))

    def tensors_in_range(self) -> Optional[Tensor]:
        """A 0-d bool tensor: every tensor hyperparameter is finite and in its range
        (``ranges``), computed on the device without reading it; ``None`` without tensors.
        Where it is ``False``, :meth:`validate` names the value."""
        flags = []
        for key, value in self.hyper.items():
            low, high, closed = self.ranges.get(key, (0.0, float("inf"), False))
            for v in (value.values() if isinstance(value, Mapping) else (value,)):
                v = v.values if isinstance(v, PerStep) else v
                if isinstance(v, Tensor):
                    flags.append(in_range(v, low, high, closed))
        if not flags:
            return None
        device = flags[0].device
        return torch.stack([f.to(device) for f in flags]).all()

    @property
    def per_step(self) -> bool:
        """Whether some hyperparameter is a :class:`PerStep` (the rule then counts its steps)."""
        return any(isinstance(v, PerStep) for value in self.hyper.values()
                   for v in (value.values() if isinstance(value, Mapping) else (value,)))

    def _check(self, key: str, value: Hyper, params: Params, steps: Optional[int]) -> None:
        low, high, closed = self.ranges.get(key, (0.0, float("inf"), False))
        check_hyper(value, self.labels.get(key, key), params, low=low, high=high, closed=closed,
                    steps=steps, per_step=key not in self.fixed)

    def _check_values(self) -> None:
        """Validate the values alone (a dict's names are checked by ``validate``), after what
        :func:`check_rule_contract` checks (review s32P F5: a rule's constructor calling this met
        the raw errors first)."""
        check_rule_contract(self)
        for key, value in self.hyper.items():
            self._check(key, value, list(value) if isinstance(value, Mapping) else (), None)

    def _get(self, hyper, key: str, name: str, count: Optional[Tensor], like: Tensor):
        """Hyperparameter ``key`` for parameter ``name`` at step ``count``."""
        v = per_param(hyper[key], name)
        return v.at(count, like) if isinstance(v, PerStep) else v

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={_short(v)}" for k, v in self.hyper.items())
        return f"{type(self).__name__}({args})"


def _layout(value) -> Any:
    """:meth:`InnerRule.layout` of one hyperparameter."""
    if isinstance(value, Mapping):
        return ("dict", tuple((k, _layout(v)) for k, v in value.items()))
    if isinstance(value, PerStep):
        return ("steps", _layout(value.values))
    if isinstance(value, Tensor):
        return ("tensor", id(value), value.shape, value.dtype, value.device)
    if isinstance(value, (tuple, list)):
        return tuple(_layout(v) for v in value)
    return value


def _short(v):
    if isinstance(v, Mapping):
        return "{per-parameter}"
    if isinstance(v, Tensor):
        return f"tensor({v.detach().cpu().tolist()})" if v.numel() == 1 else f"tensor{tuple(v.shape)}"
    return repr(v)


def _check_flag(value, name: str) -> bool:
    """``value`` if it is a bool, else a ``TypeError`` naming ``name`` (a truthy
    string such as ``"no"`` must not switch the option on)."""
    if not isinstance(value, bool):
        raise TypeError(f"Invalid {name}: {value!r} (expected True or False)")
    return value


def _is_zero(value: Hyper) -> bool:
    return isinstance(value, numbers.Real) and float(value) == 0.0


def hyper_tensors(value: Hyper) -> Tuple[Tensor, ...]:
    """The tensors of one hyperparameter: itself, a :class:`PerStep`'s values, or those of a
    per-parameter dict's entries."""
    found = []
    for v in (value.values() if isinstance(value, Mapping) else (value,)):
        v = v.values if isinstance(v, PerStep) else v
        if isinstance(v, Tensor):
            found.append(v)
    return tuple(found)


def _zero_everywhere(value: Hyper) -> bool:
    """Whether a hyperparameter is 0 for every parameter and step, whatever its form (a
    check when a rule is built: it reads tensors' values)."""
    if isinstance(value, Mapping):
        return all(_zero_everywhere(v) for v in value.values())
    value = value.values if isinstance(value, PerStep) else value
    if isinstance(value, Tensor):
        return bool((value == 0).all())
    if isinstance(value, (tuple, list)):  # a PerStep's plain numbers
        return all(_is_zero(v) for v in value)
    return _is_zero(value)


def _local(x, like):
    """``x`` on ``like``'s device where both are tensors on different devices: a model's
    parameters may sit on several (the step count and what derives from it live on the
    first parameter's, and a 0-d CUDA tensor does not combine with CPU tensors)."""
    if isinstance(x, Tensor) and isinstance(like, Tensor) and x.device != like.device:
        return x.to(like.device)
    return x


def _count(params: Mapping[str, Tensor], dtype=None) -> Tensor:
    """A zero step count on the parameters' device (``dtype`` defaults to int64)."""
    if not params:
        raise ValueError("Invalid params: the inner rule got no parameters to adapt (expected at "
                         "least one parameter with requires_grad)")
    first = next(iter(params.values()))
    return torch.zeros((), dtype=torch.int64 if dtype is None else dtype, device=first.device)


class SGD(InnerRule):
    """Stochastic gradient descent with ``torch.optim.SGD``'s update formula.

    With ``d = g + weight_decay * phi``: without momentum ``phi <- phi - lr d``;
    with momentum the buffer is ``b <- d`` at the first step and
    ``b <- momentum b + (1 - dampening) d`` after, and
    ``phi <- phi - lr (d + momentum b)`` (Nesterov) or ``phi <- phi - lr b``.

    Every hyperparameter may be a float, a tensor, a :class:`PerStep` or a
    dict from parameter name to one of those (broadcast against the
    parameter); tensors held by the outer optimizer are learned (e.g.
    Meta-SGD's per-parameter rates, MAML++'s per-step rates). The first-order
    rule (FOM) holds ``g`` constant; ``weight_decay * phi`` and the momentum
    buffer are still differentiated.

    Args:
        lr: learning rate, ``>= 0``.
        momentum: momentum factor, ``>= 0``.
        dampening: dampening for momentum, ``>= 0``.
        nesterov: Nesterov momentum (needs ``momentum > 0`` and no dampening).
        weight_decay: L2 penalty added to the gradient, ``>= 0``.

    Example:
        >>> rule = SGD(0.1, momentum=0.9)
        >>> rule.validate({"w": torch.zeros(3)}, steps=5)
    """

    def __init__(self, lr: Hyper, momentum: Hyper = 0.0, dampening: Hyper = 0.0,
                 nesterov: bool = False, weight_decay: Hyper = 0.0):
        self.hyper = {"lr": lr, "momentum": momentum, "dampening": dampening,
                      "weight_decay": weight_decay}
        self._check_values()
        self.nesterov = _check_flag(nesterov, "nesterov")
        self._check_nesterov()

    # What follows from the hyperparameters is read from them at each use (review EY: flags set
    # once went stale when the user assigned rule.hyper["momentum"] = 0.9 between calls).
    has_momentum = _Flag(lambda self: not _is_zero(self.hyper["momentum"]),
                         "Whether a momentum buffer runs (``momentum`` is not a plain 0).")
    counts = _Flag(lambda self: self.has_momentum or self.per_step,
                   "Whether the state counts steps (for the momentum buffer or PerStep values).")
    first_order_additive = _Flag(lambda self: not self.counts and _is_zero(self.hyper["weight_decay"]),
                                 "No state and no weight decay: see InnerRule.", shortcut=True)
    first_order_identity = _Flag(lambda self: _is_zero(self.hyper["weight_decay"]),
                                 "No weight decay (the momentum buffer never reads phi): see InnerRule.",
                                 shortcut=True)

    def _check_nesterov(self) -> None:
        if self.nesterov and (_zero_everywhere(self.hyper["momentum"])
                              or not _zero_everywhere(self.hyper["dampening"])):
            raise ValueError("Invalid nesterov: Nesterov momentum requires a momentum and zero dampening")

    def validate(self, params: Params, steps: Optional[int] = None) -> None:
        """:meth:`InnerRule.validate`, and Nesterov's requirements."""
        super().validate(params, steps)
        self._check_nesterov()

    @property
    def plain_rate(self) -> Optional[float]:
        """``lr`` for plain SGD at one plain-number rate (see :attr:`InnerRule.plain_rate`)."""
        lr = self.hyper["lr"]
        # SGD's own condition, whatever a subclass or an instance declares (review KG F1: an
        # instance's True under momentum assigned later stepped plain SGD, exact 0.90 off)
        plain = vars(SGD)["first_order_additive"].compute(self) and isinstance(lr, numbers.Real) \
            and not isinstance(lr, bool)
        # (a subclass, or an instance, with code of its own runs that code: review JD F1)
        return float(lr) if plain and not own_code(self) else None

    @classmethod
    def from_inner_lr(cls, inner_lr: Hyper) -> "SGD":
        """``SGD(inner_lr)``, the rule that an ``inner_lr=`` argument stands for.

        Its messages name the rate ``inner_lr`` (``Invalid inner_lr[...]``), as
        the user wrote it, instead of ``lr``.
        """
        rule = cls.__new__(cls)
        rule.labels = {"lr": "inner_lr"}
        rule.__init__(inner_lr)
        return rule

    def init(self, params):
        if not self.counts:
            return ()
        # The step count (for "b <- d at the first step" and PerStep values) then
        # one buffer per parameter.
        bufs = tuple(torch.zeros_like(p) for p in params.values()) if self.has_momentum else ()
        return (_count(params),) + bufs

    def update(self, grads, state, params, hyper):
        new_params, new_bufs = {}, []
        count = state[0] if self.counts else None
        first = count == 0 if self.has_momentum else None
        for i, (n, p) in enumerate(params.items()):
            d = grads[n]
            wd = self._get(hyper, "weight_decay", n, count, p)
            if not _is_zero(wd):
                d = d + wd * p
            if self.has_momentum:
                mom = self._get(hyper, "momentum", n, count, p)
                damp = self._get(hyper, "dampening", n, count, p)
                # (1 - 0) * d is d, bit for bit: no product without dampening.
                kept = d if _is_zero(damp) else (1 - damp) * d
                buf = torch.where(_local(first, d), d, mom * state[1 + i] + kept)
                new_bufs.append(buf)
                d = d + mom * buf if self.nesterov else buf
            lr = self._get(hyper, "lr", n, count, p)
            # A plain-number rate: one fused op (half the allocations of p - lr * d).
            new_params[n] = p.add(d, alpha=-lr) if isinstance(lr, numbers.Real) else p - lr * d
        new_state = (count + 1,) + tuple(new_bufs) if self.counts else ()
        return new_params, new_state

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", nesterov={self.nesterov})"


class Adam(InnerRule):
    """Adam with ``torch.optim.Adam``'s update formula (L2 ``weight_decay``).

    With ``d = g + weight_decay * phi`` and ``t`` the step count:
    ``m <- beta1 m + (1 - beta1) d``, ``v <- beta2 v + (1 - beta2) d^2``,
    ``phi <- phi - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)``.
    ``eps`` is added outside the square root, after the bias correction, as in
    ``torch.optim.Adam`` (``higher``'s Adam adds it before the correction).
    With ``amsgrad``, ``v_max <- max(v_max, v)`` replaces ``v`` in the
    denominator.

    Differentiating ``sqrt(v)`` at ``v = 0`` (a coordinate whose gradients were
    all exactly zero so far) would give ``inf * 0 = NaN``; its derivative is
    taken as 0 there, the subgradient of ``|g|`` at 0, so hypergradients stay
    finite. The first-order rule (FOM) holds the gradient ``g`` constant, so
    ``m`` and ``v`` are constants too unless ``weight_decay`` is set; the
    update direction is then not differentiated at all.

    ``lr``, ``eps`` and ``weight_decay`` may be floats, tensors, :class:`PerStep`
    values or per-parameter dicts; the betas floats, tensors or dicts (a
    per-step beta would change the bias corrections' formula).

    Args:
        lr: learning rate, ``>= 0``.
        betas: ``(beta1, beta2)``, each in ``[0, 1)``.
        eps: term added to the denominator, ``>= 0``.
        weight_decay: L2 penalty added to the gradient, ``>= 0``.
        amsgrad: use the running maximum of ``v`` (AMSGrad).
    """

    ranges = {"beta1": (0.0, 1.0, False), "beta2": (0.0, 1.0, False)}
    labels = {"beta1": "betas[0]", "beta2": "betas[1]"}
    fixed = ("beta1", "beta2")
    decoupled = False  # weight decay added to the gradient (Adam) or applied to phi (AdamW)

    def __init__(self, lr: Hyper = 1e-3, betas: Tuple[Hyper, Hyper] = (0.9, 0.999), eps: Hyper = 1e-8,
                 weight_decay: Hyper = 0.0, amsgrad: bool = False):
        if hasattr(betas, "__array__") and not isinstance(betas, Tensor):
            betas = betas.tolist()  # a NumPy pair, as torch.optim.Adam takes
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise (ValueError if isinstance(betas, (tuple, list)) else TypeError)(
                f"Invalid betas: {betas!r} (expected a pair (beta1, beta2))")
        self.hyper = {"lr": lr, "beta1": betas[0], "beta2": betas[1], "eps": eps,
                      "weight_decay": weight_decay}
        self._check_values()
        self.amsgrad = _check_flag(amsgrad, "amsgrad")

    first_order_identity = _Flag(lambda self: _is_zero(self.hyper["weight_decay"]),
                                 "No weight decay (m and v never read phi): see InnerRule.", shortcut=True)

    def init(self, params):
        # The count is a float for the bias corrections' powers, at least float32 (in
        # bfloat16 0.999 ** t rounds to 1: no update at all, and the count stops at 256),
        # and as precise as the most precise parameter (each parameter gets its
        # corrections cast to its own dtype).
        dtype = functools.reduce(torch.promote_types, (p.dtype for p in params.values()), torch.float32)
        count = _count(params, dtype)
        zeros = tuple(torch.zeros_like(p) for p in params.values())
        # The step count, then m, v (and v_max) per parameter.
        return (count,) + zeros * (3 if self.amsgrad else 2)

    def update(self, grads, state, params, hyper):
        n_p = len(params)
        # The step count is a floating-point tensor (for the powers below) but a counter: nothing
        # is differentiated through it, so the bias corrections carry no graph.
        count = state[0].detach()
        t = count + 1
        new_params, ms, vs, v_maxs = {}, [], [], []
        betas, corrections = None, None
        for i, (n, p) in enumerate(params.items()):
            d = grads[n]
            lr = self._get(hyper, "lr", n, count, p)
            wd = self._get(hyper, "weight_decay", n, count, p)
            decayed = p
            if not _is_zero(wd):
                if self.decoupled:
                    decayed = p * (1 - lr * wd)
                else:
                    d = d + wd * p
            b1, b2 = per_param(hyper["beta1"], n), per_param(hyper["beta2"], n)
            m = b1 * state[1 + i] + (1 - b1) * d
            v = b2 * state[1 + n_p + i] + (1 - b2) * d * d
            ms.append(m)
            vs.append(v)
            if self.amsgrad:
                v = torch.maximum(state[1 + 2 * n_p + i], v)
                v_maxs.append(v)
            if betas is None or b1 is not betas[0] or b2 is not betas[1]:
                # The bias corrections, once for the parameters that share their betas.
                betas = (b1, b2)
                corrections = (_one_minus_pow(b1, _local(t, b1)),
                               _safe_sqrt(_one_minus_pow(b2, _local(t, b2))))
            corr1, root2 = corrections
            if isinstance(corr1, Tensor) and (corr1.dtype != p.dtype or corr1.device != p.device):
                # Computed in the count's dtype (a 0-d parameter would be promoted to it), on
                # the first parameter's device.
                corr1, root2 = corr1.to(p), root2.to(p)
            denom = _safe_sqrt(v) / root2 + self._get(hyper, "eps", n, count, p)
            new_params[n] = decayed - lr / corr1 * m / denom
        return new_params, (t,) + tuple(ms) + tuple(vs) + tuple(v_maxs)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", amsgrad={self.amsgrad})"


class AdamW(Adam):
    """AdamW with ``torch.optim.AdamW``'s update formula (decoupled weight decay).

    As :class:`Adam` without the decay in the gradient (``d = g``), and with
    the parameter shrunk before the step: ``phi <- phi (1 - lr weight_decay)
    - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)``. The same
    safe square root, ``amsgrad`` option and hyperparameter forms as
    :class:`Adam`. Under the first-order rule (FOM) ``m`` and ``v`` are
    constants; the decay ``phi (1 - lr weight_decay)`` is still
    differentiated.

    Args:
        lr: learning rate, ``>= 0``.
        betas: ``(beta1, beta2)``, each in ``[0, 1)``.
        eps: term added to the denominator, ``>= 0``.
        weight_decay: decoupled weight decay, ``>= 0`` (``torch.optim.AdamW``'s
            default ``1e-2``).
        amsgrad: use the running maximum of ``v`` (AMSGrad).

    Example:
        >>> rule = AdamW(1e-3, weight_decay=0.01, amsgrad=True)
    """

    decoupled = True

    def __init__(self, lr: Hyper = 1e-3, betas: Tuple[Hyper, Hyper] = (0.9, 0.999), eps: Hyper = 1e-8,
                 weight_decay: Hyper = 1e-2, amsgrad: bool = False):
        super().__init__(lr, betas, eps, weight_decay, amsgrad)


class RMSprop(InnerRule):
    """RMSprop with ``torch.optim.RMSprop``'s update formula.

    With ``d = g + weight_decay * phi``: ``s <- alpha s + (1 - alpha) d^2``;
    centered, also ``a <- alpha a + (1 - alpha) d`` and ``s`` is replaced by
    ``s - a^2`` below; the denominator is ``sqrt(s) + eps``. Without momentum
    ``phi <- phi - lr d / (sqrt(s) + eps)``; with momentum the buffer (zero at
    the start) is ``b <- momentum b + d / (sqrt(s) + eps)`` and
    ``phi <- phi - lr b``.

    The square root's derivative at 0 is taken as 0, as in :class:`Adam`, so
    hypergradients stay finite where the gradients were exactly zero. Every
    hyperparameter may be a float, a tensor, a :class:`PerStep` or a
    per-parameter dict. The first-order rule (FOM) holds ``g`` constant; the
    weight decay and momentum buffer are still differentiated.

    Args:
        lr: learning rate, ``>= 0``.
        alpha: smoothing constant, in ``[0, 1]``.
        eps: term added to the denominator, ``>= 0``.
        weight_decay: L2 penalty added to the gradient, ``>= 0``.
        momentum: momentum factor, ``>= 0``.
        centered: normalise by the estimated variance of the gradient
            instead of its second moment.

    Example:
        >>> rule = RMSprop(1e-2, momentum=0.9, centered=True)
    """

    ranges = {"alpha": (0.0, 1.0, True)}

    def __init__(self, lr: Hyper = 1e-2, alpha: Hyper = 0.99, eps: Hyper = 1e-8,
                 weight_decay: Hyper = 0.0, momentum: Hyper = 0.0, centered: bool = False):
        self.hyper = {"lr": lr, "alpha": alpha, "eps": eps, "weight_decay": weight_decay,
                      "momentum": momentum}
        self._check_values()
        self.centered = _check_flag(centered, "centered")

    has_momentum = _Flag(lambda self: not _is_zero(self.hyper["momentum"]),
                         "Whether a momentum buffer runs (``momentum`` is not a plain 0).")
    first_order_identity = _Flag(lambda self: _is_zero(self.hyper["weight_decay"]),
                                 "No weight decay (s, a and b never read phi): see InnerRule.", shortcut=True)

    def init(self, params):
        zeros = tuple(torch.zeros_like(p) for p in params.values())
        # The step count, then s, (a), (b) per parameter.
        return (_count(params),) + zeros * (1 + self.centered + self.has_momentum)

    def update(self, grads, state, params, hyper):
        n_p = len(params)
        count = state[0]
        new_params, ss, avgs, bufs = {}, [], [], []
        for i, (n, p) in enumerate(params.items()):
            d = grads[n]
            wd = self._get(hyper, "weight_decay", n, count, p)
            if not _is_zero(wd):
                d = d + wd * p
            alpha = self._get(hyper, "alpha", n, count, p)
            s = alpha * state[1 + i] + (1 - alpha) * d * d
            ss.append(s)
            var = s
            if self.centered:
                a = alpha * state[1 + n_p + i] + (1 - alpha) * d
                avgs.append(a)
                var = s - a * a
            step = d / (_safe_sqrt(var) + self._get(hyper, "eps", n, count, p))
            if self.has_momentum:
                mom = self._get(hyper, "momentum", n, count, p)
                step = mom * state[1 + (1 + self.centered) * n_p + i] + step
                bufs.append(step)
            new_params[n] = p - self._get(hyper, "lr", n, count, p) * step
        return new_params, (count + 1,) + tuple(ss) + tuple(avgs) + tuple(bufs)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", centered={self.centered})"


def _one_minus_pow(base, t: Tensor) -> Tensor:
    """``1 - base ** t`` for a float or tensor ``base`` and a tensor step count ``t``.

    For a Python ``base`` (``torch.optim.Adam`` computes its corrections in double
    precision) it is ``-expm1(t log(base))`` with the logarithm taken in double: in
    the count's dtype, ``1 - base ** t`` would carry the rounding of ``base`` to that
    dtype, relative ``1e-4`` for ``beta2 = 0.9999`` in float32 at small ``t``. A tensor
    ``base`` (a learned beta) is the user's value in its own dtype."""
    if isinstance(base, Tensor):
        return 1 - torch.pow(base, t)
    if base <= 0.0:
        return torch.ones_like(t)  # 1 - 0 ** t for t >= 1
    # A Python number stays a scalar argument: as a new tensor it would be a copy to the
    # device (a host synchronisation on CUDA) at every step.
    return -torch.expm1(t * math.log(base))


def _safe_sqrt(x):
    """``sqrt(max(x, tiny))``, ``tiny`` the dtype's smallest subnormal number:
    ``sqrt(x)`` whose derivatives at ``x <= 0`` are 0 instead of ``inf``.

    A positive ``x`` passes unchanged, with its derivatives of every order;
    ``x <= 0`` gives ``sqrt(tiny)`` (about ``4e-23`` in float32, ``2e-162`` in
    float64, ``2e-4`` in float16), with derivative 0. The rules add ``eps`` to
    it, which absorbs it in float32 and float64 for any ``eps`` above about
    ``1e-13``: the denominator has the bits it would have with ``sqrt(0) = 0``.
    Where it is not absorbed (``eps = 0``; float16, where ``1e-8`` rounds to
    0), a coordinate whose gradients were all zero moves by ``0 / tiny = 0``
    instead of ``0 / 0 = NaN``.

    Two forms of the same function, with the same derivatives: without a graph
    to record, ``clamp_min`` then ``sqrt`` (two kernels); with one, masks
    (four kernels, but the graph keeps two boolean masks where ``clamp_min``
    would keep ``x`` itself). A Python number (a bias correction) gives
    ``max(x, 0) ** 0.5``.
    """
    if not isinstance(x, Tensor):
        return max(x, 0.0) ** 0.5
    info = torch.finfo(x.dtype)
    tiny = info.smallest_normal * info.eps
    if not (x.requires_grad and torch.is_grad_enabled()):
        return x.clamp_min(tiny).sqrt()
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, 1.0).sqrt(), tiny ** 0.5)
