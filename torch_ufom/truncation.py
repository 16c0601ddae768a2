"""Truncation laws: the distribution of the truncation point ``K``.

A law is a distribution over ``K`` in ``{0..r}``, drawn **before** the inner
loop runs. The estimator back-propagates exactly through the last ``K`` inner
steps and first-order through the rest, and reweights the exact corrections by
the survival function ``P_k = P(K >= k)`` (``docs/maths.md#truncation-laws-and-telescope-weights``):

    g = G_0 + sum_{k=1..K} (G_k - G_{k-1}) / P_k,    so   E[g] = G_r

whenever ``P_k > 0`` for every ``k >= 1``. Every law here implements one small
contract: :meth:`TruncationLaw.probs` (``P(K = k)`` for ``k = 0..r``); the
survival function, the telescope weights and sampling derive from it.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Set as AbstractSet
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .checks import invalid, is_int, is_real

__all__ = ["TruncationLaw", "Bernoulli", "Geometric", "Fixed", "Custom", "Snapshot", "check_truncation",
           "is_bernoulli", "draw_truncation", "telescope_weights"]


# The smallest survival probability a law may give: 1 / P(K >= k) must be a
# finite float, and P itself a normal one (a denormal has lost its precision).
_SMALLEST_SURVIVAL = sys.float_info.min


def _check_steps(steps: int) -> None:
    if not is_int(steps) or steps < 1:
        raise invalid("steps", steps, "an int >= 1", is_int(steps))


def _as_probs(values, name: str) -> List[float]:
    """``values`` as a list of floats; ``TypeError`` naming ``name`` if it is not a
    sequence of real numbers, ``ValueError`` if one is negative or not finite."""
    # (a dict was read by its keys and a set in its iteration order, review s32E F2: Custom({0: 0.9,
    # 1: 0.1}) drew the exact branch every time; a 0-d tensor or array failed inside torch, F6)
    if type(values) in (list, tuple) and all(type(x) is float and 0.0 <= x < math.inf for x in values):
        return list(values)  # (a built-in law's probs, read at every call: the checks below pass)
    if isinstance(values, (str, bytes, Mapping, AbstractSet)) or not hasattr(values, "__len__") or \
            not hasattr(values, "__iter__") or getattr(values, "ndim", 1) == 0:
        raise TypeError(f"Invalid {name}: {values!r} (expected a sequence of probabilities "
                        "[P(K = 0), ..., P(K = steps)])")
    out = []
    for i, x in enumerate(values):
        if isinstance(x, (bool, str, bytes)) or getattr(getattr(x, "dtype", None), "kind", None) == "b" or \
                (isinstance(x, torch.Tensor) and (x.numel() != 1 or x.is_complex() or x.dtype == torch.bool)):
            raise TypeError(f"Invalid {name}[{i}]: {x!r} (expected a real number)")
        try:
            v = float(x)
        except (TypeError, ValueError):
            raise TypeError(f"Invalid {name}[{i}]: {x!r} (expected a real number)") from None
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"Invalid {name}[{i}]: {v!r} (expected a non-negative finite "
                             f"probability; {name} = {values!r})")
        out.append(v)
    return out


def _checked_probs(law: "TruncationLaw", steps: int) -> List[float]:
    """``law.probs(steps)`` checked: ``steps + 1`` non-negative finite floats."""
    name = f"truncation: {law!r}.probs({steps})"
    try:
        values = law.probs(steps)
    except NotImplementedError:
        raise TypeError(f"Invalid truncation: {law!r} does not implement probs(steps) (subclass "
                        "TruncationLaw and return [P(K = 0), ..., P(K = steps)])") from None
    try:
        p = _as_probs(values, name)
    except TypeError as err:
        raise ValueError(str(err)) from None
    if len(p) != steps + 1:
        raise ValueError(f"Invalid {name}: it returned {len(p)} values, expected steps + 1 = "
                         f"{steps + 1} ([P(K = 0), ..., P(K = {steps})])")
    return p


class TruncationLaw:
    """Base class of a law over the truncation point ``K`` in ``{0..steps}``.

    Subclasses implement :meth:`probs`; everything else derives from it.
    ``biased`` is ``True`` for laws whose estimate is not unbiased for the
    exact hypergradient (only :class:`Fixed` with ``k < steps``).
    """

    def probs(self, steps: int) -> List[float]:
        """Return ``[P(K = 0), ..., P(K = steps)]``."""
        raise NotImplementedError

    def biased(self, steps: int) -> bool:
        """Whether the estimate is biased for ``steps`` inner steps."""
        return False

    def survival(self, steps: int) -> List[float]:
        """Return ``[P(K >= 0), ..., P(K >= steps), 0.0]`` (length ``steps + 2``).

        ``P(K >= 0)`` is 1, and a tail sum above 1 (``probs`` summing to 1 only within
        :meth:`validate`'s tolerance: ``Custom([0, 0.3, 0.3, 0.4])`` in float32) is read
        as 1, as :meth:`sample` then draws it: the weights follow the draws."""
        p = self.probs(steps)
        tail = [0.0] * (steps + 2)
        for k in range(steps, -1, -1):
            tail[k] = min(tail[k + 1] + p[k], 1.0)
        tail[0] = 1.0
        return tail

    def validate(self, steps: int) -> None:
        """Raise ``ValueError`` if the law cannot be used for ``steps`` inner steps.

        Checks that :meth:`probs` returns ``steps + 1`` finite non-negative
        numbers summing to 1, that an unbiased law gives ``P(K >= steps) > 0``,
        and that every positive survival probability has a finite reciprocal
        (the estimator's weight ``1 / P(K >= k)``: a survival that underflows
        to a denormal number would make the estimate infinite or NaN).
        """
        _check_steps(steps)
        p = _checked_probs(self, steps)
        if abs(sum(p) - 1.0) > 1e-6:
            raise ValueError(f"Invalid truncation: {self!r}.probs({steps}) sums to {sum(p)!r}, "
                             "expected 1 within 1e-6")
        if not self.biased(steps) and p[steps] <= 0.0:
            raise ValueError(
                f"Invalid truncation: {self!r} gives P(K >= {steps}) = 0 for steps={steps}: the "
                "estimate would be silently biased; every P(K >= k) with k >= 1 must be positive "
                "(use Fixed(k) for deliberate truncation)")
        for k, s in enumerate(self.survival(steps)[:steps + 1]):
            if 0.0 < s < _SMALLEST_SURVIVAL:
                raise ValueError(
                    f"Invalid truncation: {self!r} gives P(K >= {k}) = {s!r} for steps={steps}, "
                    f"below {_SMALLEST_SURVIVAL!r}: its weight 1 / P(K >= {k}) is not a finite "
                    "normal float (choose a law whose survival probabilities stay above it, "
                    "e.g. a larger q or rho)")

    def sample(self, steps: int, generator: Optional[torch.Generator] = None) -> int:
        """Draw ``K`` from :meth:`survival`, the function the estimator's weights use.

        Drawing from the survival function keeps draws and weights consistent
        even where :meth:`probs` sums to 1 only within the checked tolerance.
        One uniform from ``generator`` usually decides (:func:`draw_truncation`).
        """
        device = generator.device if generator is not None else "cpu"
        return draw_truncation(self.survival(steps), lambda: torch.rand(
            (), generator=generator, dtype=torch.float64, device=device).tolist())


# A round of draw_truncation decides P(K >= k + 1 | state) by one uniform only
# while it is at least this. It is a power of two, so "u >= 1 - _RESOLVED" has
# probability exactly _RESOLVED on float64's uniform grid.
_RESOLVED = 2.0 ** -20


def draw_truncation(survival: Sequence[float], uniform: Callable[[], float]) -> int:
    """Draw ``K`` with ``P(K >= k) = survival[k]`` from uniforms on ``[0, 1)``.

    ``survival`` is :meth:`TruncationLaw.survival`'s list: ``survival[0] = 1``,
    non-increasing, with a trailing 0. Each round draws one uniform ``u`` and
    inverts the conditional survival function: given ``K >= lo`` and a scale
    ``base``, ``K >= k`` when ``u >= 1 - survival[k] / base``. A float64
    uniform resolves such an event only to about ``2**-53``, which a tail of
    ``survival[k] / base < 2**-20`` would distort (a ``P(K >= k)`` below
    ``2**-53`` would never be drawn). The round then stops and the next one
    draws the tail given what was drawn; a first step that small passes first
    a gate of probability exactly ``2**-20``. Each event is then decided to a
    relative precision of ``2**-33``. Laws without such a tail (Bernoulli with
    ``q >= 2**-20``, Fixed) take exactly one uniform.
    """
    steps = len(survival) - 2
    lo, base = 0, 1.0  # given K >= lo: P(K >= k) = survival[k] / base for k > lo
    while True:
        u, k = uniform(), lo
        while k < steps and survival[k + 1] > 0.0:
            ratio = survival[k + 1] / base
            if ratio < _RESOLVED:
                if k > lo:  # K >= k drawn: draw the tail in the next round
                    lo, base = k, survival[k]
                elif 1.0 - _RESOLVED > u:
                    return k
                else:  # the gate passed: P(K >= k + 1 | it) = ratio / _RESOLVED
                    base *= _RESOLVED
                break
            if 1.0 - ratio > u:
                return k
            k += 1
        else:
            return k


class _Immutable:
    """The laws shipped here are values: assigning one of the attributes that define
    the law (``_fields``) after construction raises (a changed law would bypass the
    checks its construction made, and a ``MetaOptimizer``'s ``mode`` would no longer
    describe it). A subclass's own attributes are its own."""

    __slots__ = ()
    _fields: Tuple[str, ...] = ()

    def _frozen(self, name: str) -> None:
        if name in self._fields or any(name in vars(c) for c in type(self).__mro__
                                       if c.__module__ == __name__):  # (law.probs = ... too)
            raise AttributeError(f"{type(self).__name__} cannot be changed after construction (setting "
                                 f"{name!r}): build a new law, or change a MetaOptimizer's with "
                                 "reconfigure(q=..., truncation=...)")

    def __setattr__(self, name, value):
        self._frozen(name)
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        self._frozen(name)
        object.__delattr__(self, name)


class Bernoulli(_Immutable, TruncationLaw):
    """The paper's UFOM law: ``K = steps`` with probability ``q``, else ``K = 0``.

    The estimate is ``G_0 + (xi / q) (G_r - G_0)`` with ``xi ~ Bernoulli(q)``.

    Args:
        q: probability of the exact branch, in ``(0, 1]``.
    """

    _fields = ("q",)

    def __init__(self, q: float):
        object.__setattr__(self, "q", _check_q(q, "q"))

    def probs(self, steps: int) -> List[float]:
        _check_steps(steps)
        p = [0.0] * (steps + 1)
        p[0] += 1.0 - self.q
        p[steps] += self.q
        return p

    def __repr__(self) -> str:
        return f"{type(self).__name__}(q={self.q})"


class Geometric(_Immutable, TruncationLaw):
    """A random truncation point with a geometric tail: ``P(K >= k) = q rho^(k-1)``.

    Args:
        q: ``P(K >= 1)``, in ``(0, 1]``.
        rho: ratio of successive survival probabilities, in ``(0, 1)``.
    """

    _fields = ("q", "rho")

    def __init__(self, q: float, rho: float):
        object.__setattr__(self, "q", _check_q(q, "q"))
        if not is_real(rho) or not 0.0 < rho < 1.0:
            raise invalid("rho", rho, "a float in (0, 1)", is_real(rho))
        object.__setattr__(self, "rho", float(rho))

    def probs(self, steps: int) -> List[float]:
        _check_steps(steps)
        surv = [1.0] + [self.q * self.rho ** (k - 1) for k in range(1, steps + 1)] + [0.0]
        return [surv[k] - surv[k + 1] for k in range(steps + 1)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(q={self.q}, rho={self.rho})"


class Fixed(_Immutable, TruncationLaw):
    """A fixed truncation point ``K = k``: truncated back-propagation.

    ``Fixed(0)`` is FOM and ``Fixed(steps)`` the exact hypergradient; any
    other ``k`` is biased (Shaban et al., 2019) and flagged by :meth:`biased`.

    Args:
        k: the truncation point, an int in ``0..steps``, or ``None`` for ``steps``
            (the exact hypergradient whatever the number of steps).
    """

    _fields = ("k",)

    def __init__(self, k: Optional[int] = None):
        if k is not None and (not is_int(k) or k < 0):
            raise invalid("k", k, "an int in 0..steps, or None for steps", is_int(k))
        object.__setattr__(self, "k", None if k is None else int(k))

    def _k(self, steps: int) -> int:
        k = steps if self.k is None else self.k
        if k > steps:
            # (named as the argument the user wrote, truncation= or steps=: review s32B F2)
            raise ValueError(f"Invalid truncation: {self!r} truncates at k={k}, beyond steps={steps} "
                             "(expected k in 0..steps)")
        return k

    def probs(self, steps: int) -> List[float]:
        _check_steps(steps)
        p = [0.0] * (steps + 1)
        p[self._k(steps)] = 1.0
        return p

    def biased(self, steps: int) -> bool:
        return self._k(steps) < steps

    def __repr__(self) -> str:
        return f"{type(self).__name__}(k={self.k})"


class Custom(_Immutable, TruncationLaw):
    """An arbitrary law given by its probabilities ``[P(K = 0), ..., P(K = r)]``.

    Args:
        probs: a sequence of ``steps + 1`` non-negative numbers summing to 1,
            with ``P(K = steps) > 0`` (so every survival probability is positive):
            a list, tuple, NumPy array or 1-D tensor (one-element rows are read as
            their number).

    Raises:
        TypeError: ``probs`` is not such a sequence (a dict, a set, a string, a
            0-d tensor or array), or an entry is not a real number (bools refused).
        ValueError: fewer than 2 entries, a negative or non-finite one, or a sum
            other than 1 (within 1e-6). ``steps + 1`` entries and ``P(K = steps) > 0``
            are checked where the law is used with a number of steps.
    """

    _fields = ("_probs",)

    def __init__(self, probs: Sequence[float]):
        object.__setattr__(self, "_probs", tuple(_as_probs(probs, "probs")))
        if len(self._probs) < 2:  # (one, [1.0], fits no steps >= 1: review s32E F6)
            raise ValueError(f"Invalid probs: {list(self._probs)} (expected steps + 1 >= 2 probabilities)")
        if abs(sum(self._probs) - 1.0) > 1e-6:
            raise ValueError(
                f"Invalid probs: they sum to {sum(self._probs)!r}, expected 1 within 1e-6")

    def probs(self, steps: int) -> List[float]:
        _check_steps(steps)
        if len(self._probs) != steps + 1:
            raise ValueError(
                f"Invalid probs: length {len(self._probs)} in {self!r}, expected steps + 1 = "
                f"{steps + 1} for steps={steps}")
        return list(self._probs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(probs={list(self._probs)})"


class Snapshot(_Immutable, TruncationLaw):
    """A law's probabilities for ``steps`` inner steps, read once: what one call
    draws every task's ``K`` from and weights every estimate by, so that both see
    the same numbers even if the law (one of the user's, whose ``probs`` may
    change from call to call) is changed meanwhile. Every reading is checked
    (:meth:`TruncationLaw.validate`, on the numbers read: no further call of the law).

    Args:
        law: the law to read.
        steps: the number of inner steps ``r``.
    """

    _fields = ("law", "steps", "_probs", "_survival")

    def __init__(self, law: TruncationLaw, steps: int):
        object.__setattr__(self, "law", law)
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "_probs", tuple(_checked_probs(law, steps)))
        object.__setattr__(self, "_survival", tuple(TruncationLaw.survival(self, steps)))
        self.validate(steps)  # this reading (cached lists: no call of the law's probs)

    def _held(self, steps: int) -> None:
        if steps != self.steps:
            raise ValueError(f"Invalid steps: {steps!r} (this snapshot of {self.law!r} holds "
                             f"steps={self.steps})")

    def probs(self, steps: int) -> List[float]:
        self._held(steps)
        return list(self._probs)

    def survival(self, steps: int) -> List[float]:
        self._held(steps)
        return list(self._survival)

    def biased(self, steps: int) -> bool:
        return self.law.biased(steps)

    def __repr__(self) -> str:
        return repr(self.law)


def is_bernoulli(law: TruncationLaw) -> bool:
    """Whether ``law`` is the UFOM law of its ``q`` (a :class:`Bernoulli` whose ``probs`` is
    Bernoulli's: a subclass that changes it has no single ``q`` to report)."""
    return isinstance(law, Bernoulli) and type(law).probs is Bernoulli.probs


def check_truncation(law: TruncationLaw) -> None:
    """Refuse a law that overrides what derives from :meth:`TruncationLaw.probs`
    (``survival``, ``sample``: a law's draws and its estimator's weights must come
    from one function, read once per call, :class:`Snapshot`)."""
    if isinstance(law, Snapshot):  # (its repr is its law's: the message would name that one, s35G F1)
        raise TypeError(f"Invalid truncation: Snapshot({law.law!r}, steps={law.steps}); pass the law "
                        f"itself ({law.law!r}), of which each call takes a snapshot")
    own = getattr(law, "__dict__", {})  # (set on the instance)
    for name in ("survival", "sample"):
        if getattr(type(law), name) is not getattr(TruncationLaw, name) or name in own:
            raise TypeError(f"Invalid truncation: {law!r} overrides {name}(); a law implements "
                            "probs(steps) only, from which its survival function, its draws and the "
                            "estimator's weights derive (a stratified or antithetic sampler would "
                            "need weights of its own)")


def _check_q(q, name: str) -> float:
    if not is_real(q) or not 0.0 < q <= 1.0:
        raise invalid(name, q, "a float in (0, 1]", is_real(q))
    if q < _SMALLEST_SURVIVAL:
        raise ValueError(f"Invalid {name}: {q!r} (expected a float in (0, 1] at least "
                         f"{_SMALLEST_SURVIVAL!r}, so that the weight 1 / {name} is finite)")
    return float(q)


def telescope_weights(survival: Sequence[float], K: int):
    """Weights of the one-sweep estimator for a drawn ``K``.

    With ``P_m = survival[m]``, the estimate ``G_0 + sum_{k<=K} (G_k - G_{k-1}) / P_k``
    equals ``sum_{k=0..K} c_k G_k`` with ``c_k = 1/P_k - 1/P_{k+1}`` for
    ``k < K`` and ``c_K = 1/P_K``.

    Returns:
        ``(inv_p, c)``: ``inv_p[m] = 1 / P_m`` for ``m = 0..K`` (the weight of
        the exact stream's parameter terms at depth ``m``) and ``c[m]`` for
        ``m = 0..K`` (the injection of the exact adjoint into the first-order one).
    """
    inv_p = [1.0 / survival[m] for m in range(K + 1)]
    c = [inv_p[m] - inv_p[m + 1] for m in range(K)] + [inv_p[K]]
    return inv_p, c
