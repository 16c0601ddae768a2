"""The configuration: the public keywords, checked and turned into objects once.

:class:`Settings` holds the keywords exactly as the user wrote them;
:func:`resolve` checks every one of them (also those the chosen ``mode`` does
not use, so that flipping ``mode`` stays a one-word change) and every rule
that spans several of them, and returns a frozen :class:`Config` of objects:
the inner rule, the truncation law (or the adaptive rule that chooses it), the
memory schedule's factory and the Hessian-vector product. Nothing else in the
library turns a knob into an object.

Rules that span arguments:

* ``truncation=`` replaces ``mode``; giving both is an error.
* ``k`` is the truncation point of ``mode="truncated"`` and an error elsewhere.
* ``q="auto"`` is an adaptive ``ufom``: an error with any other mode, and in
  the functional entry points (which keep no statistics).
* ``q`` under ``fom``/``exact``/``truncated``, ``slots`` and ``max_memory``
  under ``store`` or ``recompute`` and the ``q_rule``/``q_min``/``q_beta`` of
  a fixed ``q`` are accepted (checked, unused).
* ``slots`` (a fixed number of checkpoints) and ``max_memory`` (a byte budget
  that sizes them) exclude each other.
* ``inner_lr`` and ``inner=`` exclude each other; one of them is required.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Literal, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import adaptive
from .batches import positional_obstacle
from .checks import invalid, is_int, is_real
from .functional_model import check_parametrize_cache, crowded_elsewhere
from .inner import SGD, Hyper, InnerRule, check_rule_contract, hyper_tensors, values_deferred
from .schedules import MEMORY_CHOICES, Schedule, check_checkpoint, make_schedule
from .truncation import Bernoulli, Fixed, TruncationLaw, check_truncation

__all__ = ["Settings", "Config", "resolve", "adapted_parameters", "check_model", "check_values",
           "validate_rule", "check_generator", "check_losses", "check_steps", "MODES", "HVP_CHOICES",
           "VECTORISE_CHOICES", "InnerLR", "InnerParams", "Vectorise", "check_loss"]

MODES = ("fom", "ufom", "exact", "truncated")
HVP_CHOICES = ("auto", "fwdrev", "revrev")
# How a meta-batch runs: "auto" (vmap where it pays), True (vmap where it is exact), False (the loop).
VECTORISE_CHOICES = ("auto", True, False)
# The forms of the keywords every entry point shares, for their signatures (the docstrings say
# what each form means): inner_lr= (a float, a tensor, a PerStep, or a dict from parameter name to
# one of those), inner_params= (names, a predicate on the name, or the parameters) and vectorise=.
InnerLR = Optional[Hyper]
InnerParams = Union[Sequence[str], Callable[[str], bool], Iterable[Tensor], None]
Vectorise = Union[bool, Literal["auto"]]


_BUILT_ONLY = ("reduction", "track_buffers", "generator", "process_group", "model", "optimizer")


@dataclass(frozen=True)
class Settings:
    """The configuration keywords as the user wrote them (see :class:`~torch_ufom.MetaOptimizer`).

    ``mode=None`` means ``"ufom"`` unless ``truncation`` is given.
    """

    steps: Any = None
    inner_lr: Any = None
    inner: Any = None
    mode: Any = None
    q: Any = 0.1
    k: Any = None
    truncation: Any = None
    q_rule: Any = "ufom"
    q_min: Any = None
    q_beta: Any = None
    memory: Any = "checkpoint"
    slots: Any = None
    hvp: Any = "auto"
    inner_params: Any = None
    vectorise: Any = "auto"
    max_memory: Any = None

    def replace(self, **changes) -> "Settings":
        """New settings with ``changes``; changing one law keyword drops the others it
        conflicts with (a new ``mode`` drops ``truncation`` and, unless
        ``"truncated"``, ``k``; a new ``truncation`` drops ``mode``); likewise a
        new ``slots`` drops ``max_memory`` and a new ``max_memory`` drops ``slots``,
        and a new ``inner_lr`` drops ``inner`` and a new ``inner`` drops ``inner_lr``."""
        fields = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(fields))
        if unknown:  # (review IA F6: name what it takes, and what only the constructor takes)
            fixed = [k for k in unknown if k in _BUILT_ONLY]
            built = f"; {', '.join(fixed)} {'is' if len(fixed) == 1 else 'are'} set when the " \
                "MetaOptimizer is built" if fixed else ""
            raise TypeError(f"reconfigure() got unexpected keyword(s) {unknown} (expected some of "
                            f"{', '.join(fields)}{built})")
        if "mode" in changes:
            changes.setdefault("truncation", None)
            if changes["mode"] != "truncated":
                changes.setdefault("k", None)
        if changes.get("truncation") is not None:
            changes.setdefault("mode", None)
        if changes.get("slots") is not None:
            changes.setdefault("max_memory", None)
        if changes.get("max_memory") is not None:
            changes.setdefault("slots", None)
        if changes.get("inner_lr") is not None:
            changes.setdefault("inner", None)
        if changes.get("inner") is not None:
            changes.setdefault("inner_lr", None)
        return dataclasses.replace(self, **changes)

    def __post_init__(self):
        # A one-shot iterable (model.head.parameters(), a generator) is read once here: the
        # settings are resolved again later (reconfigure, adapt) and must select the same.
        chosen = self.inner_params
        if isinstance(chosen, Iterator) and not isinstance(chosen, (Tensor, nn.Module)):
            object.__setattr__(self, "inner_params", tuple(chosen))


@dataclass(frozen=True)
class Config:
    """The resolved configuration (built by :func:`resolve`, never changed).

    Attributes:
        settings: the keywords it was resolved from.
        steps: the number of inner steps ``r``.
        rule: the inner rule.
        mode: the resolved mode (``"law"`` for an explicit ``truncation=``).
        law: the truncation law (for ``q="auto"``, the law of the initial ``q``).
        adaptive: the adaptive rule for ``q="auto"``, else ``None``.
        memory, slots, max_memory: the memory setting of the exact sweep
            (``slots=None``: sized by the byte budget ``max_memory``, ``None``
            for the default; see :class:`~torch_ufom.schedules.Checkpoint`).
        hvp: the requested Hessian-vector product (``"auto"``, ``"fwdrev"``, ``"revrev"``).
        adapted: the names of the parameters the inner loop adapts, in
            ``named_parameters()`` order.
        vectorise: how a meta-batch runs: ``"auto"``, ``True`` or ``False``
            (see :func:`~torch_ufom.functional.estimate_batch`).
    """

    settings: Settings
    steps: int
    rule: InnerRule
    mode: str
    law: TruncationLaw
    adaptive: Optional[adaptive.AdaptiveQ]
    memory: str
    slots: Optional[int]
    hvp: str
    adapted: Tuple[str, ...]
    vectorise: Any = "auto"
    max_memory: Optional[int] = None

    def law_at(self, q_stats) -> TruncationLaw:
        """The law of the next task: ``Bernoulli`` of the adaptive statistics' current
        ``q`` under ``q="auto"`` (``q_stats``), else :attr:`law`."""
        return self.law if self.adaptive is None else Bernoulli(q_stats["q"])

    def schedule(self) -> Schedule:
        """A fresh memory schedule for one sweep."""
        return make_schedule(self.memory, self.slots, self.max_memory)


def check_steps(steps) -> int:
    """Validate ``steps`` (an int ``>= 1``; required)."""
    if steps is None:
        raise TypeError("Invalid steps: None (steps is required: the number of inner steps, an int >= 1)")
    if not is_int(steps) or steps < 1:
        raise invalid("steps", steps, "an int >= 1", is_int(steps))
    return int(steps)


# Wrappers whose all-reduce hooks the module's own parameters' gradients, which the library
# never computes (by class name: torch.distributed.fsdp need not be importable).
_DATA_PARALLEL = {"DistributedDataParallel", "FullyShardedDataParallel", "FSDPModule",
                  "DDP"}  # the last: the base of torch.distributed's composable replicate()


def check_model(model) -> nn.Module:
    """Validate ``model``: an ``nn.Module`` with at least one parameter with ``requires_grad``,
    not wrapped for data parallelism (``DistributedDataParallel``, FSDP)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model: expected an nn.Module, got {type(model).__name__}")
    wrapped = [(n, type(m).__name__) for n, m in model.named_modules()
               if {c.__name__ for c in type(m).__mro__} & _DATA_PARALLEL]
    if wrapped:
        where = ", ".join(f"{kind} at {n!r}" if n else kind for n, kind in wrapped)
        raise ValueError(f"Invalid model: a data-parallel wrapper ({where}), whose gradient "
                         "reduction never runs here (the inner loop computes with copies of the "
                         "parameters and the hypergradient is written to .grad directly), so the "
                         "ranks would drift apart; pass the wrapped module (ddp.module), and to "
                         "average over ranks MetaOptimizer(..., process_group=...)")
    lazy = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers())
            if isinstance(t, nn.parameter.UninitializedTensorMixin)]
    if lazy:
        raise ValueError(f"Invalid model: {lazy} are not initialised yet (a lazy module such as "
                         "nn.LazyLinear); run one forward pass of the model first")
    if not any(p.requires_grad for p in model.parameters()):
        crowded = crowded_elsewhere(model)  # (another thread's model holds its entries: s37K F2)
        if crowded is not None:
            raise crowded
        raise ValueError("Invalid model: it has no parameter with requires_grad=True, so the inner "
                         "loop has nothing to adapt")
    names = {id(p): n for n, p in model.named_parameters()}
    both = [(names[id(b)], n) for n, b in model.named_buffers() if id(b) in names]
    if both:  # (review GD: swapped once as a parameter and once as a buffer, 54 % off, silently)
        raise ValueError(f"Invalid model: its parameter {both[0][0]!r} is registered as a buffer too "
                         f"({both[0][1]!r}); the library gives each inner step the adapted parameters "
                         "and copies of the buffers, so the two entries would disagree (keep it a "
                         "parameter only, and read it through the module that holds it)")
    return model


def check_generator(generator) -> Optional[torch.Generator]:
    """Validate ``generator``: ``None`` or a ``torch.Generator``."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"Invalid generator: expected a torch.Generator or None, got "
                        f"{type(generator).__name__}")
    return generator


def check_losses(inner_loss, outer_loss, model: Optional[nn.Module] = None) -> None:
    """Validate the two loss callables, and that the call can differentiate them: not
    under ``torch.inference_mode()``, whose tensors autograd cannot record, and (see
    :func:`check_parametrize_cache`) not with ``model``'s parametrized weights cached."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("Invalid call under torch.inference_mode(): hypergradients need autograd "
                           "(torch.no_grad() is fine: the library enables gradients where it needs them)")
    if model is not None:
        check_parametrize_cache(model)
    check_loss("inner_loss", inner_loss)
    check_loss("outer_loss", outer_loss)


def check_loss(name: str, fn) -> None:
    """A ``TypeError`` naming ``name`` unless ``fn`` is a callable that takes ``(fmodel, batch)``."""
    if not callable(fn):
        raise TypeError(f"Invalid {name}: expected a callable (fmodel, batch) -> scalar tensor, "
                        f"got {type(fn).__name__}")
    if isinstance(fn, nn.Module) and type(fn).__module__ == "torch.nn.modules.loss":  # (review GA)
        raise TypeError(f"Invalid {name}: a loss criterion, nn.{type(fn).__name__}, which takes (input, "
                        f"target), but the library calls {name}(fmodel, batch): wrap it, "
                        "lambda fmodel, batch: criterion(fmodel(batch[0]), batch[1])")
    why = positional_obstacle(fn, 2)
    if why:
        raise TypeError(f"Invalid {name}: {why}, but the library calls {name}(fmodel, batch) "
                        "(a loss closing over its batch, as in code written for higher, takes the "
                        "batch as its second argument instead)")


def _check_q(q, auto: bool = True) -> None:
    """``auto``: whether the caller takes ``"auto"`` (MetaOptimizer), which the message then
    lists (review s35K F5: the functional entry points' listed it and refused it)."""
    if q == "auto" and isinstance(q, str):
        return
    if not is_real(q) or not (math.isfinite(float(q)) and 0.0 < float(q) <= 1.0):
        raise invalid("q", q, "a float in (0, 1], or 'auto'" if auto else "a float in (0, 1]",
                      is_real(q) or isinstance(q, str))


def _check_vectorise(value) -> Any:
    # `is`, not `==`: 1, 0 and numpy booleans are not the flags.
    if not any(value is c for c in VECTORISE_CHOICES[1:]) and not (
            isinstance(value, str) and value == "auto"):
        raise invalid("vectorise", value, "'auto', True or False", isinstance(value, (str, bool)))
    return value


def _choice(value, arg: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise invalid(arg, value, f"one of {', '.join(choices)}", isinstance(value, str))
    return value


def _rule(settings: Settings, adapted: Mapping[str, Tensor], steps: int) -> InnerRule:
    inner, inner_lr = settings.inner, settings.inner_lr
    if inner is not None and inner_lr is not None:
        raise ValueError("Invalid inner_lr: give either inner_lr or inner=, not both")
    # Every check but the ranges of the rule's tensors here, then those ranges with one read for
    # all (review s35F F1: a tensor inner_lr was read twice per call, a dict of rates once per
    # tensor: a host synchronisation each on CUDA), the bounds of a validate of the user's too
    # (review s36R F1: reading the declared ranges alone again let its check_hyper(..., high=1) pass)
    in_range: list = []
    if inner is None:
        if inner_lr is None:
            raise ValueError("Invalid inner_lr: None (give inner_lr, or an inner rule as inner=)")
        with values_deferred(hyper_tensors(inner_lr)) as flags:
            inner = SGD.from_inner_lr(inner_lr)  # its errors say inner_lr, as the user wrote it
        in_range += flags
    if not isinstance(inner, InnerRule):
        if isinstance(inner, torch.optim.Optimizer):
            raise TypeError(f"Invalid inner: a torch.optim.{type(inner).__name__} (expected a "
                            "torch_ufom.inner rule, which updates the adapted parameters functionally: e.g. "
                            "torch_ufom.inner.SGD(lr=0.1, momentum=0.9) or torch_ufom.inner.Adam(lr=1e-3))")
        raise TypeError(f"Invalid inner: {inner!r} (expected a torch_ufom.inner rule)")
    # A rule of the user's: what the library reads of it, named (review s32E F3: AttributeError /
    # ValueError from deep inside)
    check_rule_contract(inner)
    validate_rule(inner, adapted, steps, in_range)
    return inner


def validate_rule(rule: InnerRule, adapted: Mapping[str, Tensor], steps: int,
                  flags: Sequence[Tensor] = ()) -> None:
    """``rule.validate(adapted, steps=steps)`` with the ranges of the rule's tensors read at
    once (one host synchronisation, none without tensors): the bounds its ``validate`` checks
    (a rule of the user's with its own: review s36R F1), its declared ``ranges`` (one whose
    ``validate`` checks none: review s36Q F2) and ``flags`` collected before (its
    construction's). Where one is out of range, the checks run again, reading each value, and
    name it."""
    with values_deferred(rule.tensors()) as more:
        rule.validate(adapted, steps=steps)
    declared = rule.tensors_in_range()
    flags = [*flags, *more] + ([] if declared is None else [declared])
    if flags and not bool(torch.stack([f.to(flags[0].device) for f in flags]).all()):
        rule.validate(adapted, steps=steps)  # reads each value: names the one out of range
        rule._check_values()  # the declared ranges


def _law(settings: Settings, steps: int, auto: bool = True) -> Tuple[str, TruncationLaw,
                                                                     Optional[adaptive.AdaptiveQ]]:
    mode, q, k, truncation = settings.mode, settings.q, settings.k, settings.truncation
    if mode is not None:
        _choice(mode, "mode", MODES)
    _check_q(q, auto)
    if k is not None and (not is_int(k) or k < 0):
        raise invalid("k", k, f"an int in 0..steps={steps}", is_int(k))
    # The adaptive rule's knobs are checked whatever q is.
    rule = adaptive.AdaptiveQ(settings.q_rule, settings.q_min, settings.q_beta)
    if truncation is not None:
        if mode is not None:
            raise ValueError(f"Invalid truncation: it replaces mode, but mode={mode!r} was given too; "
                             "pass one of them")
        if not isinstance(truncation, TruncationLaw):
            raise TypeError(f"Invalid truncation: {truncation!r} (expected a torch_ufom.truncation law)")
        mode = "law"
    mode = "ufom" if mode is None else mode
    if k is not None and mode != "truncated":
        raise ValueError(f"Invalid k: {k!r} is the truncation point of mode='truncated', but mode is "
                         f"{mode!r}")
    if q == "auto" and mode != "ufom":
        example = "truncation=..., q=0.1" if mode == "law" else f"mode={mode!r}, q=0.1"
        raise ValueError(f"Invalid q: 'auto' adapts the exact-branch probability of mode='ufom', "
                         f"but mode is {mode!r} (reconfigure: give a float q with the new mode, "
                         f"e.g. reconfigure({example}))")
    if mode == "law":
        law = truncation
    elif mode == "fom":
        law = Fixed(0)
    elif mode == "exact":
        law = Fixed(steps)
    elif mode == "ufom":
        law = Bernoulli(rule.q_init if q == "auto" else q)
    else:
        if k is None:
            raise ValueError(f"Invalid k: None (mode='truncated' needs k, an int in 0..steps={steps})")
        if k > steps:
            raise ValueError(f"Invalid k: {k!r} (expected an int in 0..steps={steps})")
        law = Fixed(int(k))
    check_truncation(law)
    law.validate(steps)
    return mode, law, rule if q == "auto" else None


def _chooses(predicate: Callable[[str], Any], name: str) -> bool:
    """``inner_params(name)``, an error in it named as ``inner_params``'s."""
    try:
        return bool(predicate(name))
    except Exception as err:  # noqa: BLE001 (re-raised, named)
        raise TypeError(f"Invalid inner_params: the predicate raised {type(err).__name__} on {name!r}: "
                        f"{err} (expected a function of a parameter's name, returning a bool)") from err


def check_values(model: nn.Module) -> None:
    """Refuse a module with a parameter on the meta device, where a call would compute
    (review s35F F2: refused at the first loss, which it blamed). A ``MetaOptimizer`` may
    hold one, as a ``torch.optim`` optimizer may, until a call computes."""
    meta = next((n for n, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise ValueError(f"Invalid model: its parameter {meta!r} is on the meta device, which holds no "
                         "values (a module built under torch.device('meta')): materialise it first, "
                         "e.g. model.to_empty(device='cpu') and initialise its parameters")


def resolve(settings: Settings, model: nn.Module, caller: str = "MetaOptimizer") -> Config:
    """Check ``settings`` against ``model`` and turn them into a :class:`Config`.

    Args:
        settings: the user's keywords.
        model: the module whose parameters the inner loop adapts.
        caller: the entry point's name, for messages (``q="auto"`` needs
            ``MetaOptimizer``'s statistics).

    Raises:
        TypeError: a keyword of the wrong type.
        ValueError: an invalid value or conflicting keywords; the message names
            the keyword as the user wrote it.
    """
    steps = check_steps(settings.steps)
    adapted = adapted_parameters(check_model(model), settings.inner_params)
    if caller != "MetaOptimizer":  # (which checks at its calls: check_values)
        check_values(model)
    unreal = sorted(n for n, p in adapted.items() if not p.is_floating_point())
    if unreal:
        raise ValueError(f"Invalid model: the adapted parameters {unreal} are not real floating-point "
                         "tensors (complex parameters are not supported; freeze them with "
                         "requires_grad=False or leave them out of inner_params)")
    mode, law, rule_q = _law(settings, steps, caller == "MetaOptimizer")
    if rule_q is not None and caller != "MetaOptimizer":
        raise ValueError(f"Invalid q: 'auto' needs the statistics that MetaOptimizer keeps; {caller} "
                         "takes a float in (0, 1]")
    memory = _choice(settings.memory, "memory", MEMORY_CHOICES)
    slots, max_memory = check_checkpoint(settings.slots, settings.max_memory)
    hvp = _choice(settings.hvp, "hvp", HVP_CHOICES)
    vectorise = _check_vectorise(settings.vectorise)
    rule = _rule(settings, adapted, steps)
    return Config(settings, steps, rule, mode, law, rule_q, memory, slots, hvp, tuple(adapted),
                  vectorise=vectorise, max_memory=max_memory)


def adapted_parameters(model: nn.Module, inner_params) -> Dict[str, Tensor]:
    """The parameters the inner loop adapts, by name, in ``named_parameters()`` order.

    ``inner_params`` is ``None`` (every parameter with ``requires_grad``), a
    name or a sequence of names, a predicate ``name -> bool``, or a sequence of
    the module's parameters. A tied parameter is known by each of its names
    (``named_parameters(remove_duplicate=False)``): naming any of them, or a
    predicate true for any of them, chooses it.

    Raises:
        TypeError, ValueError: naming ``inner_params``: an unknown name, a
            tensor that is not the module's parameter, a parameter without
            ``requires_grad``, or a selection of nothing.
    """
    named = dict(model.named_parameters())
    if inner_params is None:
        return {n: p for n, p in named.items() if p.requires_grad}
    if isinstance(inner_params, str):
        inner_params = [inner_params]
    by_id = {id(p): n for n, p in named.items()}
    primary = {n: by_id[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
    if isinstance(inner_params, Mapping):  # (review GA: its keys were taken, its values not read)
        if not all(isinstance(v, Tensor) for v in inner_params.values()):  # (flags)
            raise TypeError(f"Invalid inner_params: a {type(inner_params).__name__} of other values than "
                            "the parameters, which would not be read (expected names, a predicate on the "
                            "name, the module's parameters, or a dict of them such as "
                            "dict(model.named_parameters()); for flags: [name for name, on in "
                            "inner_params.items() if on])")
        named_all = dict(model.named_parameters(remove_duplicate=False))
        wrong = [k for k, v in inner_params.items() if named_all.get(k) is not v]
        if wrong:  # (review GE F4: {"2.weight": model[0].weight} adapted 0.weight, silently)
            raise ValueError(f"Invalid inner_params[{wrong[0]!r}]: not the model's parameter of that name "
                             "(expected a dict of the model's parameters by their names, such as "
                             "dict(model.named_parameters()) filtered)")
        inner_params = list(inner_params.values())  # (review GD: a filtered named_parameters() dict)
    if callable(inner_params) and not isinstance(inner_params, (Tensor, nn.Module)):
        chosen = {primary[n] for n in primary if _chooses(inner_params, n)}
    else:
        if isinstance(inner_params, (Tensor, nn.Module)) or not hasattr(inner_params, "__iter__"):
            raise TypeError(f"Invalid inner_params: {type(inner_params).__name__} (expected names, a "
                            "predicate on the name, or the module's parameters)")
        chosen = set()
        for i, item in enumerate(inner_params):
            if isinstance(item, str):
                if item not in primary:
                    raise ValueError(f"Invalid inner_params[{i}]: {item!r} is not a parameter of the "
                                     f"model (its parameters: {sorted(named)})")
                chosen.add(primary[item])
            elif isinstance(item, Tensor):
                if id(item) not in by_id:
                    raise ValueError(f"Invalid inner_params[{i}]: a tensor of shape "
                                     f"{tuple(item.shape)} that is not a parameter of the model")
                chosen.add(by_id[id(item)])
            else:
                raise TypeError(f"Invalid inner_params[{i}]: {type(item).__name__} (expected a "
                                "parameter name or a parameter)")
    frozen = sorted(n for n in chosen if not named[n].requires_grad)
    if frozen:
        raise ValueError(f"Invalid inner_params: {frozen} have requires_grad=False and cannot be "
                         "adapted")
    if not chosen:
        raise ValueError("Invalid inner_params: it selects no parameter (the inner loop would "
                         "adapt nothing)")
    return {n: p for n, p in named.items() if n in chosen}

