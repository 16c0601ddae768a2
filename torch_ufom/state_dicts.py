"""The checkpoint format of :class:`~torch_ufom.MetaOptimizer`, and what a load refuses.

:meth:`~torch_ufom.MetaOptimizer.state_dict` returns a dict of plain values and
tensors (what ``torch.load(..., weights_only=True)`` reads back) with these keys:

* ``"optimizer"``: the outer optimizer's own ``state_dict``;
* ``"meta_tensors"``: copies of the meta-parameters that are not the module's
  (a learned ``inner_lr``), in ``meta_parameters()`` order;
* ``"generator"``: the generator's ``torch.uint8`` state, or ``None``; ``"rank"``: the
  rank that saved it under a ``process_group``, else ``None``;
* ``"q_stats"``, ``"q_rule"``, ``"q_observations"``: the ``q="auto"`` statistics, their
  rule and the observations of the tasks since the last step (``None``, ``None``,
  ``[]`` with a fixed ``q``);
* ``"tasks"``, ``"reduced"``, ``"grad_zero"``: the number of tasks ``.grad`` holds,
  whether ``synchronize()`` ran since, and whether their ``.grad`` is all zero;
* ``"settings"``: :func:`settings_summary`, the resolved configuration as plain values
  (format :data:`SETTINGS_FORMAT`; a summary of another format is not compared).

Every key but ``"optimizer"`` may be missing: a dict saved before the key existed loads
without it.

The validation contract: :func:`check_state_dict` and :func:`check_meta_values` read the
dict, and change nothing, before ``load_state_dict`` changes anything. They refuse, naming
the entry (``state_dict['q_stats']['n_x']``), with a ``TypeError`` for a wrong type and a
``ValueError`` for a value that does not fit: no dict, a dict without ``"optimizer"`` (the
outer optimizer's own ``state_dict`` is named as such), unknown keys, an outer optimizer
state of other parameter groups or counts, ``meta_tensors`` of another number, shape or
dtype, on the meta device, not finite, or restoring an inner hyperparameter outside its
range, a generator state without a generator or one no generator of its device takes,
``q="auto"`` statistics for a fixed ``q``, of another ``q_rule``, with missing, unknown or
invalid entries or a ``q`` below the same settings' ``q_min``, observations without
statistics or with invalid entries, and an invalid ``rank``, ``tasks``, ``reduced``,
``grad_zero`` or ``settings``. :func:`settings_differ` says which saved settings differ (a
warning: they are not restored) and raises for one that does not compare. What the outer
optimizer's own ``load_state_dict`` or the generator then refuses, ``load_state_dict``
undoes, so that a refused load changes nothing.
"""
from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import adaptive
from .checks import invalid, is_int, is_real
from .config import Config
from .graphs import root_of
from .inner import InnerRule, PerStep, in_range

__all__ = ["SETTINGS_FORMAT", "settings_summary", "settings_differ", "saved_law_differs", "plain",
           "canonical", "check_state_dict", "check_meta_values"]


SETTINGS_FORMAT = 2  # of settings_summary; other formats are not compared


def settings_summary(config: Config, meta: Sequence[Tensor], reduction: str, track_buffers: bool,
                     generator: bool) -> Dict[str, Any]:
    """The resolved configuration ``config`` as plain values (what ``torch.load`` with
    ``weights_only=True`` reads back), for :func:`settings_differ` to compare; ``meta``: the
    meta-parameters (a learned hyperparameter's value is state, not a setting), and the
    constructor's ``reduction``, ``track_buffers`` and whether a ``generator`` draws.
    Equivalent keywords give the same summary: the law by its probabilities
    (``mode="exact"`` or ``truncation=Fixed()``; a ``q`` that ``exact`` ignores),
    the inner rule by its hyperparameters as numbers (``inner_lr=1`` or
    ``inner=SGD(1.0)``; a learned tensor as ``"tensor"``), and no memory or HVP
    setting under a law that never runs an exact sweep."""
    c = config
    learned = frozenset(id(t) for t in meta)
    if c.adaptive is not None:
        law = "q='auto', " + ", ".join(f"{k}={plain(v)!r}" for k, v in vars(c.adaptive).items())
    else:
        law = f"P(K = 0..{c.steps}) = {tuple(round(float(p), 15) for p in c.law.probs(c.steps))}"
    flags = set()  # the options of the rule's constructors (nesterov=, amsgrad=, centered=)
    for cls in type(c.rule).__mro__:
        if "__init__" in vars(cls) and cls is not object:
            flags |= set(inspect.signature(vars(cls)["__init__"]).parameters)
    rule = {"type": type(c.rule).__name__, **{k: plain(v, learned) for k, v in c.rule.hyper.items()},
            **{k: v for k, v in vars(c.rule).items() if k in flags and isinstance(v, bool)}}
    out = {"format": SETTINGS_FORMAT, "steps": int(c.steps), "law": law, "inner": rule,
           "inner_params": list(c.adapted), "vectorise": plain(c.vectorise),
           "reduction": reduction, "track_buffers": track_buffers, "generator": generator}
    if c.adaptive is not None or c.law.survival(c.steps)[1] > 0.0:
        out.update(memory=c.memory, slots=plain(c.slots), max_memory=plain(c.max_memory), hvp=c.hvp)
    return out


def settings_differ(saved: Optional[Mapping], now: Dict[str, Any]) -> Optional[str]:
    """The warning for saved settings (``state_dict['settings']``) that differ from ``now``
    (this MetaOptimizer's :func:`settings_summary`), or ``None``; raises for an entry that
    does not compare as a saved setting does (a tensor where a plain value was saved)."""
    if not saved or saved.get("format") != SETTINGS_FORMAT:  # not comparable
        return None
    differ = []
    for k in now:
        if k not in saved:
            continue
        try:
            if bool(saved[k] != now[k]):
                differ.append(k)
        except Exception as err:  # noqa: BLE001 (a tensor's ambiguous truth value, ...)
            raise TypeError(f"Invalid state_dict['settings'][{k!r}]: {saved[k]!r} does not compare "
                            f"with a setting ({type(err).__name__}: {err}; expected the plain value "
                            "state_dict() saved); nothing was changed") from err
    if not differ:
        return None
    was = ", ".join(f"{k}={saved[k]!r}" for k in differ)
    has = ", ".join(f"{k}={now[k]!r}" for k in differ)
    built = [k for k in ("reduction", "track_buffers", "generator") if k in differ]
    how = [] if len(built) == len(differ) else ["meta.reconfigure(...)"]
    if built:  # (set when the MetaOptimizer is built: reviews HA F2, LB F2)
        how.append("a MetaOptimizer built with " + ", ".join(
            ("a generator" if saved[k] else "generator=None") if k == "generator" else f"{k}={saved[k]!r}"
            for k in built))
    return (f"load_state_dict: the saved run had {was} where this MetaOptimizer has {has}; its state "
            f"was loaded, but settings are not restored (use {' and '.join(how)} to resume the run "
            "as it was)")


def saved_law_differs(settings: Optional[Mapping], law: str) -> bool:
    """Whether saved settings (``state_dict['settings']``) name another law than ``law``."""
    return bool(settings) and settings.get("format") == SETTINGS_FORMAT and "law" in settings and \
        settings["law"] != law


def plain(value: Any, learned: frozenset = frozenset()) -> Any:
    """``value`` as plain Python values that compare as the settings do: a number as a
    ``float`` (``1`` and ``1.0``, a numpy scalar), a bool as a bool, a tensor whose ``id``
    is in ``learned`` as ``"tensor"`` (its value is state, not a setting), another tensor
    by its values (a large one by its shape, sum and norm), a ``PerStep`` by its values,
    tuples and per-parameter dicts entry by entry, and anything else by its type's name."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, Tensor):
        if id(value) in learned or (value._base is not None and id(value._base) in learned):
            return "tensor"
        v = value.detach().to("cpu", torch.float64)
        if v.dim() == 0:
            return float(v)
        if v.numel() <= 16:
            return plain(v.reshape(-1).tolist())
        return ("tensor", tuple(v.shape), float(v.sum()), float(v.norm()))
    if isinstance(value, PerStep):
        return ("PerStep", plain(value.values, learned))
    if isinstance(value, (tuple, list)):
        return tuple(plain(v, learned) for v in value)
    if isinstance(value, Mapping):
        return {str(k): plain(v, learned) for k, v in value.items()}
    return type(value).__name__


def canonical(value: Any) -> Any:
    """``value`` with every dict's items sorted by key (tuples and lists entry by entry): the
    same settings written in another key order compare equal (review s34E L3)."""
    if isinstance(value, Mapping):
        return tuple(sorted(((str(k), canonical(v)) for k, v in value.items()), key=lambda kv: kv[0]))
    if isinstance(value, (tuple, list)):
        return tuple(canonical(v) for v in value)
    return value


_STATE_KEYS = ("optimizer", "meta_tensors", "generator", "rank", "q_stats", "q_rule", "q_observations",
               "tasks", "reduced", "grad_zero", "settings")


# The kind and lowest value of the q="auto" entries whose range is known; the
# keys themselves come from adaptive.init_stats and adaptive.observe, and an
# entry not listed here must be a finite float.
_KINDS = {"q": ("q", None), "A": ("real", 0.0), "D": ("real", 0.0), "n_x": ("int", 0),
          "t_x": ("real", 0.0), "n_f": ("int", 0), "t_f": ("real", 0.0), "c_x_steps": ("real", 0.0),
          "c_f_steps": ("steps", None),
          "exact": ("bool", None), "seconds": ("real", 0.0), "steps": ("int", 1),
          "forward_steps": ("int", 0), "reverse_steps": ("int", 0)}


def check_state_dict(sd: Any, optimizer: torch.optim.Optimizer,
                      generator: Optional[torch.Generator],
                      rule: Optional[adaptive.AdaptiveQ], extra: List[Tensor], law: str = "") -> None:
    """Raise unless ``sd`` is a :meth:`~torch_ufom.MetaOptimizer.state_dict` this optimizer can load
    (``law``: this optimizer's, as its settings summary writes it)."""
    expected = f"the dict MetaOptimizer.state_dict() returns, with keys {list(_STATE_KEYS)}"
    if not isinstance(sd, Mapping):
        raise TypeError(f"Invalid state_dict: {type(sd).__name__} (expected {expected})")
    if "optimizer" not in sd:
        if "state" in sd and "param_groups" in sd:
            raise ValueError(
                "Invalid state_dict: it is an outer optimizer's own state_dict (keys 'state', "
                "'param_groups'); pass what MetaOptimizer.state_dict() returned, or load this one "
                "with meta.optimizer.load_state_dict")
        raise ValueError(f"Invalid state_dict: missing key 'optimizer' (expected {expected})")
    unknown = [k for k in sd if k not in _STATE_KEYS]
    if unknown:
        raise ValueError(f"Invalid state_dict: unknown keys {unknown} (expected {expected})")
    _check_optimizer_state(sd["optimizer"], optimizer)
    _check_meta_tensors(sd.get("meta_tensors"), extra)
    _check_generator_state(sd.get("generator"), generator)
    stats, observations = sd.get("q_stats"), sd.get("q_observations")
    auto_q = rule is not None
    if stats is not None and not auto_q:
        raise ValueError("Invalid state_dict['q_stats']: it holds q='auto' statistics but this "
                         "MetaOptimizer has a fixed q (build it with q='auto' to resume them)")
    saved_rule = sd.get("q_rule")
    if stats is not None and saved_rule is not None and saved_rule != rule.rule:
        raise ValueError(f"Invalid state_dict['q_rule']: {saved_rule!r}, but this MetaOptimizer has "
                         f"q_rule={rule.rule!r} (the statistics of one rule mean other things to the "
                         "other)")
    rank = sd.get("rank")
    if rank is not None and not (is_int(rank) and rank >= 0):
        raise invalid("state_dict['rank']", rank, "None or an int >= 0, the rank that saved it", is_int(rank))
    for key in ("reduced", "grad_zero"):
        flag = sd.get(key)
        if flag is not None and not isinstance(flag, bool):
            raise TypeError(f"Invalid state_dict[{key!r}]: {flag!r} (expected True or False)")
    settings = sd.get("settings")
    if settings is not None and not isinstance(settings, Mapping):
        raise TypeError(f"Invalid state_dict['settings']: {type(settings).__name__} (expected a dict)")
    if stats is not None:
        _check_entries(stats, _spec(adaptive.init_stats(rule)), "state_dict['q_stats']")
        if stats["q"] < rule.q_min and not saved_law_differs(settings, law):
            # (a run with this q_min never has such a q; one saved with another has q chosen again)
            raise ValueError(f"Invalid state_dict['q_stats']['q']: {stats['q']!r} is below this "
                             f"MetaOptimizer's q_min={rule.q_min!r}, which the saved run had too")
    tasks = sd.get("tasks")
    if tasks is not None and not (is_int(tasks) and tasks >= 0):
        raise invalid("state_dict['tasks']", tasks, "an int >= 0, the number of tasks .grad holds",
                      is_int(tasks))
    if observations is None:
        return
    if not isinstance(observations, (list, tuple)):
        raise TypeError(f"Invalid state_dict['q_observations']: {type(observations).__name__} "
                        "(expected a list of observation dicts)")
    if observations and stats is None:
        raise ValueError("Invalid state_dict['q_observations']: q='auto' observations without "
                         "state_dict['q_stats']" + ("" if auto_q else ", and this MetaOptimizer "
                                                    "has a fixed q"))
    first, exact = _observation_specs()
    for i, obs in enumerate(observations):
        name = f"state_dict['q_observations'][{i}]"
        _check_entries(obs, first, name, extra=exact)
        if obs["exact"]:
            _check_entries(obs, exact, name)


def _check_meta_tensors(values: Any, extra: List[Tensor]) -> None:
    """Raise unless ``values`` (``None`` in older dicts) fits the meta-parameters that
    are not the module's, one tensor of the same shape each."""
    if values is None:
        return
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, Tensor) for v in values):
        raise TypeError("Invalid state_dict['meta_tensors']: expected a list of tensors")
    if len(values) != len(extra) or any(v.shape != t.shape for v, t in zip(values, extra)):
        raise ValueError(
            f"Invalid state_dict['meta_tensors']: shapes {[tuple(v.shape) for v in values]}, but the "
            f"meta-parameters that are not the module's have shapes {[tuple(t.shape) for t in extra]}")


def check_meta_values(values: Any, extra: List[Tensor], rule: InnerRule) -> None:
    """Raise unless the values ``values`` (checked by :func:`_check_meta_tensors`) would
    give are real and finite, and those of the inner rule's hyperparameters in their range
    (``rule.ranges``), as the constructor checks them."""
    if not values:
        return
    # id of a base tensor -> the hyperparameters read from it, each the tensor itself or a view
    # of it (one leaf may pack several: h[0], h[1]; a leaf may itself be a view: base[1:])
    held: Dict[int, List[Tuple[str, Tensor]]] = {}
    for key, value in rule.hyper.items():
        for v in (value.values() if isinstance(value, Mapping) else (value,)):
            v = v.values if isinstance(v, PerStep) else v
            if isinstance(v, Tensor):
                held.setdefault(id(root_of(v)), []).append((key, v))
    for i, (v, t) in enumerate(zip(values, extra)):
        name = f"state_dict['meta_tensors'][{i}]"
        if v.dtype != t.dtype:
            raise ValueError(f"Invalid {name}: a {v.dtype} tensor (expected {t.dtype}, the dtype of the "
                             "meta-parameter it restores)")
        if v.device.type == "meta":  # (review s32B F2: Tensor.item()'s own error named neither)
            raise ValueError(f"Invalid {name}: a meta-device tensor has no values (expected a tensor on "
                             "any device with the values to restore)")
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"Invalid {name}: its values are not all finite")
        root = root_of(t)
        laid = None
        for key, h in held.get(id(root), ()):
            if h is t:
                part = v
            else:  # the saved values where t lies in the base's storage, NaN elsewhere
                if laid is None:
                    laid = torch.empty_strided(root.shape, root.stride(), dtype=v.dtype, device=v.device)
                    laid.fill_(math.nan)
                    _within(laid, t, root).copy_(v)
                part = _within(laid, h, root)
                part = part[~torch.isnan(part)]  # the entries of h that t restores
            low, high, closed = rule.ranges.get(key, (0.0, math.inf, False))
            if not bool(in_range(part, low, high, closed)):
                span = f">= {low}" if high == math.inf else f"in [{low}, {high}{']' if closed else ')'}"
                raise ValueError(f"Invalid {name}: it restores {rule.labels.get(key, key)}, whose values "
                                 f"must be {span}")


def _within(laid: Tensor, view: Tensor, root: Tensor) -> Tensor:
    """``view``'s entries of ``laid``, a tensor laid out as ``root`` (``view``'s root)."""
    return laid.as_strided(view.shape, view.stride(), view.storage_offset() - root.storage_offset())


def _check_optimizer_state(sd: Any, optimizer: torch.optim.Optimizer) -> None:
    """Raise unless ``sd`` has the structure of ``optimizer``'s ``state_dict``."""
    name = "state_dict['optimizer']"
    if not isinstance(sd, Mapping) or not isinstance(sd.get("state"), Mapping) or \
            not isinstance(sd.get("param_groups"), (list, tuple)):
        raise TypeError(f"Invalid {name}: {type(sd).__name__} (expected the outer optimizer's "
                        "state_dict, a dict with 'state' and 'param_groups')")
    groups = sd["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"Invalid {name}: {len(groups)} parameter groups, expected "
                         f"{len(optimizer.param_groups)} (the outer optimizer's)")
    for i, (saved, group) in enumerate(zip(groups, optimizer.param_groups)):
        if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), (list, tuple)):
            raise TypeError(f"Invalid {name}['param_groups'][{i}]: expected a dict with 'params'")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"Invalid {name}['param_groups'][{i}]: {len(saved['params'])} "
                             f"parameters, expected {len(group['params'])} (the outer optimizer's)")


def _check_generator_state(state: Any, generator: Optional[torch.Generator]) -> None:
    """Raise unless ``state`` is ``None`` or a state ``generator`` can take."""
    name = "state_dict['generator']"
    if state is None:
        return
    if generator is None:
        raise ValueError(f"Invalid {name}: it holds a generator state but this MetaOptimizer has "
                         "no generator (pass generator= to the constructor)")
    if not isinstance(state, Tensor) or state.dtype != torch.uint8:
        what = state.dtype if isinstance(state, Tensor) else type(state).__name__
        raise TypeError(f"Invalid {name}: {what} (expected the torch.uint8 tensor "
                        "Generator.get_state() returns)")
    try:  # a scratch generator of the same device, so that ours is untouched; the state is a
        # CPU tensor whatever the generator's device (torch.load(map_location=...) may move it)
        torch.Generator(device=generator.device).set_state(state.cpu())
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"Invalid {name}: not a valid state of a {generator.device} generator "
                         f"({err})") from None


def _check_entries(d: Any, spec: Dict[str, tuple], name: str,
                   extra: Optional[Dict[str, tuple]] = None) -> None:
    """Raise unless ``d`` is a dict with exactly the keys of ``spec`` (those of
    ``extra`` are allowed too), each of the kind and range ``spec`` gives."""
    if not isinstance(d, Mapping):
        raise TypeError(f"Invalid {name}: {type(d).__name__} (expected a dict with keys "
                        f"{list(spec)})")
    missing = [k for k in spec if k not in d]
    unknown = [k for k in d if k not in spec and k not in (extra or {})]
    if missing or unknown:
        raise ValueError(f"Invalid {name}: " + "; ".join(
            part for part in (missing and f"missing keys {missing}",
                              unknown and f"unknown keys {unknown}") if part) +
            f" (expected keys {list(spec)})")
    for key, (kind, low) in spec.items():
        v = d[key]
        typed = isinstance(v, bool) if kind == "bool" else is_int(v) if kind == "int" else is_real(v)
        if kind == "bool":
            ok = isinstance(v, bool)
            expected = "a bool"
        elif kind == "int":
            ok = is_int(v) and v >= low
            expected = f"an int >= {low}"
        else:
            ok = is_real(v) and math.isfinite(v)
            if kind == "q":
                ok = ok and 0.0 < v <= 1.0
                expected = "a float in (0, 1]"
            elif kind == "steps":  # r + 1 once a task was observed, else 0
                observed = d.get("n_x", 0) or d.get("n_f", 0)
                ok = ok and (v >= 2 and float(v).is_integer() if observed else v in (0, 0.0))
                expected = ("a whole number >= 2 (steps + 1) once a task was observed"
                            if observed else "0 before a task was observed")
            else:
                ok = ok and (low is None or v >= low)
                expected = "a finite float" + ("" if low is None else f" >= {low}")
        if not ok:
            raise invalid(f"{name}[{key!r}]", v, expected, typed)


def _spec(keys) -> Dict[str, tuple]:
    """The kind and lowest value of each of ``keys`` (:data:`_KINDS`; a finite float if unlisted)."""
    return {k: _KINDS.get(k, ("real", None)) for k in keys}


def _observation_specs():
    """The entries of an observation of the first-order branch and of the exact one."""
    first = adaptive.observe(exact=False, seconds=0.0, steps=1, forward_steps=0, reverse_steps=0)
    exact = adaptive.observe(exact=True, seconds=0.0, steps=1, forward_steps=0, reverse_steps=0,
                             g0=[], gr=[])
    return _spec(first), _spec(exact)
