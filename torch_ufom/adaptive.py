"""Adaptive choice of UFOM's exact-branch probability ``q`` (``q="auto"``).

With ``A = E||G_r||^2`` and ``D = E||G_r - G_0||^2``, the Bernoulli estimate has
second moment ``A + (1/q - 1) D``. SGD's time to an epsilon-stationary point
scales with (cost per step) x (second moment),
``(c_f + q c_x) (A - D + D/q)``, whose minimiser is

    q* = sqrt(c_f D / (c_x (A - D)))   clipped to [q_min, 1]   (q* = 1 if A <= D)

where ``c_f`` is the cost of a first-order step and ``c_x`` the extra cost of
the exact branch (``docs/maths.md#the-two-q-rules``). ``A`` and ``D`` are estimated by
bias-corrected exponential moving averages over the tasks on which the exact
branch ran (the sweep then yields ``G_0`` beside ``G_r`` at no second-order
cost). Two rules share this machinery:

* ``"ufom"`` (ours): costs are measured wall-clock times (moving averages of
  the first-order and exact-branch calls; inner-step counts until both have
  been seen), averaging factor ``beta = 0.9``, ``q_min = 0.01``, start at 0.2.
* ``"authors"``: the rule of the authors' reference implementation (the
  ``UnbMAML`` class of their TensorFlow code), reproduced term by term (they
  update ``q`` after every task, ``MetaOptimizer`` once per outer step; their
  costs count one step more, and ``A = D = 0`` gives 1 there:
  ``docs/maths.md#the-authors-rule``): start
  at and never below 0.05, ``beta = 0.99``, costs counted in inner steps as for
  recomputation (``c_f = r + 1``, ``c_x = r(r-1)/2 + r``, whatever memory
  setting runs; this ``c_x`` is an exact task's whole count in their budget, used
  where the derivation has the extra cost), ``D`` divided by 10, and ``q`` the root in ``(0, 1)`` of

      (A - D) c_x q^2 - D c_x q - 2 D c_f = 0,

  or ``q = 1`` once ``D >= c_x A / (2 (c_f + c_x))``. As in their code, the
  ``D`` it averages is the squared distance between the *reweighted* estimate
  and ``G_r``, i.e. ``(1/q - 1)^2 ||G_r - G_0||^2`` at the ``q`` of the draw
  (:func:`authors_q`).

Everything here is pure: :func:`init_stats` makes the statistics, a plain dict
that :class:`~torch_ufom.MetaOptimizer` keeps in its ``state_dict``;
:func:`observe` turns one task into plain numbers and :func:`update` returns
new statistics with the new ``q``. ``MetaOptimizer`` applies the observations
of an outer step in :meth:`~torch_ufom.MetaOptimizer.step`, so ``q`` is fixed
within an outer step and identical on every rank of a process group.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

from torch import Tensor

from .checks import invalid, is_real

__all__ = ["AdaptiveQ", "optimal_q", "authors_q", "init_stats", "observe", "update", "rebound", "difference"]

RULES = ("ufom", "authors")


def _number(name: str, value, expected: str) -> float:
    """``value`` as a float (a real number of Python, NumPy or ``decimal``, a one-element
    real tensor or array), else the error naming ``name``: a ``TypeError`` for what is not
    a number (strings, booleans), a ``ValueError`` for a number no float holds (10 ** 400)
    (the convention of :mod:`torch_ufom.checks`; review s40H2 F5: every failure was a
    ``ValueError``)."""
    boolean = isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool")
    if not (boolean or isinstance(value, (str, bytes, complex))):
        try:  # numbers, NumPy scalars and 0-d arrays, Decimal, one-element tensors
            return float(value)
        except (TypeError, ValueError, OverflowError, RuntimeError):
            pass
    raise invalid(name, value, expected, typed=is_real(value))


def _check_rule(A, D, c_f, c_x, q_min) -> Tuple[float, float, float, float, float]:
    """The arguments of a rule as floats; a ``ValueError`` names the first out of range."""
    out = []
    for name, value in (("A", A), ("D", D), ("c_f", c_f), ("c_x", c_x)):
        x = _number(name, value, "a float >= 0")
        if not x >= 0 or (name.startswith("c_") and x == math.inf):
            raise ValueError(f"Invalid {name}: {value!r} (expected a float >= 0"
                             f"{', finite' if name.startswith('c_') else ''})")
        out.append(x)
    q = _number("q_min", q_min, "a float in (0, 1]")
    if not 0 < q <= 1:
        raise ValueError(f"Invalid q_min: {q_min!r} (expected a float in (0, 1])")
    return (*out, q)


def optimal_q(A: float, D: float, c_f: float, c_x: float, q_min: float) -> float:
    """``q* = sqrt(c_f D / (c_x (A - D)))`` clipped to ``[q_min, 1]``; 1 if ``A <= D``,
    except ``q_min`` if ``A = D = 0`` (every ``q`` then has the same zero variance).
    Computed from the ratios ``D / A`` and ``c_f / c_x``, on which alone it depends.

    Args:
        A, D: ``E||G_r||^2`` and ``E||G_r - G_0||^2``, at least 0 (``inf`` allowed).
        c_f: the cost of a first-order task, at least 0.
        c_x: the exact branch's extra cost, at least 0 (0: ``q = 1``).
        q_min: the smallest ``q``, in ``(0, 1]``.

    Raises:
        TypeError: an argument that is not a real number (a string, a bool), named.
        ValueError: an argument out of its range, named.
    """
    A, D, c_f, c_x, q_min = _check_rule(A, D, c_f, c_x, q_min)
    if A == 0.0 and D == 0.0:
        return q_min
    if A <= D or c_x <= 0:
        return 1.0
    return min(1.0, max(q_min, math.sqrt((c_f / c_x) * (D / (A - D)))))  # A = inf gives 0


def authors_q(A: float, D: float, c_f: float, c_x: float, q_min: float) -> float:
    """The authors' rule: the root in ``(0, 1)`` of ``(A - D) c_x q^2 - D c_x q - 2 D c_f``.

    Returns 1 when ``D >= c_x A / (2 (c_f + c_x))`` (the quadratic then has no
    root below 1), and never less than ``q_min``; ``q_min`` if ``A = D = 0``
    (every ``q`` then has the same zero variance). Arguments as for
    :func:`optimal_q` (``c_x`` above 0 here); computed from the ratios ``D / A``
    and ``c_f / c_x``, on which alone it depends.

    Raises:
        TypeError: an argument that is not a real number (a string, a bool), named.
        ValueError: an argument out of its range, named.
    """
    A, D, c_f, c_x, q_min = _check_rule(A, D, c_f, c_x, q_min)
    if c_x == 0:
        raise ValueError(f"Invalid c_x: {c_x!r} (expected a float > 0)")
    if D == 0.0:  # A > 0: no bias to correct; A = 0: every q has the same zero variance
        return q_min
    if A == 0.0 or D >= A:
        return 1.0
    d, r = D / A, c_f / c_x  # d in (0, 1): A = inf gives 0
    if d >= 0.5 / (r + 1.0):
        return 1.0
    # Past the threshold the quadratic (1 - d) q^2 - d q - 2 d r (the rule divided by A c_x)
    # has roots of opposite signs, and (-b + root) / 2a is the stable form of the positive one.
    a, b, c = 1.0 - d, -d, -2.0 * d * r
    q = (-b + math.sqrt(b * b - 4.0 * a * c)) / (2.0 * a)
    return min(1.0, max(q, q_min))


class AdaptiveQ:
    """Configuration of the adaptive rule (see the module docstring).

    Args:
        rule: ``"ufom"`` or ``"authors"``.
        q_min: the smallest ``q``, in ``(0, 1]`` (default 0.01, authors 0.05).
        beta: averaging factor of the moving averages, in ``[0, 1)``
            (default 0.9, authors 0.99).
        q_init: the first ``q``, in ``[q_min, 1]`` (default 0.2, authors 0.05).
    """

    def __init__(self, rule: str = "ufom", q_min: Optional[float] = None,
                 beta: Optional[float] = None, q_init: Optional[float] = None):
        if not isinstance(rule, str) or rule not in RULES:
            raise invalid("q_rule", rule, f"one of {', '.join(RULES)}", isinstance(rule, str))
        authors = rule == "authors"
        q_min = (0.05 if authors else 0.01) if q_min is None else q_min
        beta = (0.99 if authors else 0.9) if beta is None else beta
        if not is_real(q_min) or not 0 < q_min <= 1:
            raise invalid("q_min", q_min, "a float in (0, 1]", is_real(q_min))
        if not is_real(beta) or not 0 <= beta < 1:
            raise invalid("q_beta", beta, "a float in [0, 1)", is_real(beta))
        q_init = max(q_min, 0.05 if authors else 0.2) if q_init is None else q_init
        if not is_real(q_init) or not q_min <= q_init <= 1:
            raise invalid("q_init", q_init, "a float in [q_min, 1]", is_real(q_init))
        self.rule, self.q_min, self.beta, self.q_init = rule, float(q_min), float(beta), float(q_init)
        self.d_shrink = 10.0 if authors else 1.0

    def __repr__(self) -> str:
        return f"AdaptiveQ(rule={self.rule!r}, q_min={self.q_min}, beta={self.beta}, q_init={self.q_init})"


def init_stats(cfg: AdaptiveQ) -> Dict[str, float]:
    """Fresh statistics: the moving sums and counts of ``A``, ``D`` and the costs."""
    return {"q": cfg.q_init, "A": 0.0, "D": 0.0, "n_x": 0, "t_x": 0.0, "n_f": 0, "t_f": 0.0,
            "c_f_steps": 0.0, "c_x_steps": 0.0}


def _ema(avg: float, x: float, beta: float) -> float:
    return beta * avg + (1 - beta) * x


def _debiased(avg: float, n: int, beta: float) -> float:
    return avg / (1 - beta ** n) if n else 0.0


_LARGEST = 1e300  # a squared norm beyond it (float64 overflows at 1.8e308) is taken as this


def _sq_norm(grads: Sequence[Optional[Tensor]]) -> float:
    """The squared norm, at most ``_LARGEST``: the moving averages and their bias
    correction stay finite (a huge but finite hypergradient would make them ``inf``)."""
    return min(_LARGEST, float(sum((g.detach().double() ** 2).sum() for g in grads if g is not None)))


def difference(a: Sequence[Optional[Tensor]], b: Sequence[Optional[Tensor]]) -> List[Optional[Tensor]]:
    """``a - b`` tensor by tensor, ``None`` standing for zero (a tensor that one
    estimate does not reach, e.g. a hyperparameter read only by the inner loss,
    which ``G_0`` leaves out)."""
    return [None if x is None and y is None else -y if x is None else x if y is None else x - y
            for x, y in zip(a, b)]


def observe(*, exact: bool, seconds: float, steps: int, forward_steps: int, reverse_steps: int,
            g0=None, gr=None, q: float = 1.0) -> Dict[str, float]:
    """One task's observation, as plain numbers (so ranks can exchange it).

    Args:
        exact: whether the exact branch ran (then ``g0`` and ``gr`` are ``G_0``, ``G_r``).
        seconds: the wall-clock time of the task.
        steps: ``r``.
        forward_steps, reverse_steps: the task's inner-step counts.
        g0, gr: ``G_0`` and ``G_r`` of an exact draw.
        q: the probability of the exact branch the draw used.
    """
    obs = {"exact": bool(exact), "seconds": float(seconds), "steps": int(steps),
           "forward_steps": int(forward_steps), "reverse_steps": int(reverse_steps), "q": float(q)}
    if exact:
        obs["A"] = _sq_norm(gr)
        obs["D"] = _sq_norm(difference(gr, g0))
    return obs


def update(cfg: AdaptiveQ, stats: Dict[str, float], obs: Dict[str, float]) -> Dict[str, float]:
    """New statistics after one observation; ``stats["q"]`` is then the ``q`` to use.

    Args:
        cfg: the rule's configuration.
        stats: the current statistics (not modified).
        obs: what :func:`observe` returned for a task.
    """
    s = dict(stats)
    b = cfg.beta
    steps = obs["steps"]
    authors = cfg.rule == "authors"
    if obs["exact"]:
        s["n_x"] += 1
        d = obs["D"]
        if authors:  # their D: the reweighted estimate's distance to G_r
            d = min(_LARGEST, d * (1.0 / obs.get("q", 1.0) - 1.0) ** 2)
        s["A"] = _ema(s["A"], obs["A"], b)
        s["D"] = _ema(s["D"], d, b)
        s["t_x"] = _ema(s["t_x"], obs["seconds"], b)
        # Inner-step units: steps run again (replays and each reverse step's
        # rebuild) plus one per reverse VJP; r(r-1)/2 + 2r under recomputation.
        s["c_x_steps"] = obs["forward_steps"] + 2 * obs["reverse_steps"] - steps
    else:
        s["n_f"] += 1
        s["t_f"] = _ema(s["t_f"], obs["seconds"], b)
    s["c_f_steps"] = steps + 1
    return _choose(cfg, s)


def rebound(cfg: AdaptiveQ, stats: Dict[str, float]) -> Dict[str, float]:
    """The statistics under ``cfg``, another ``q_min`` or ``q_init`` of the same rule
    and ``beta``: the same moving averages, with ``q`` chosen again from them (the
    new ``q_init`` until an exact branch has been observed)."""
    s = dict(stats)
    s["q"] = cfg.q_init
    return _choose(cfg, s)


def _choose(cfg: AdaptiveQ, s: Dict[str, float]) -> Dict[str, float]:
    """``s`` with ``q`` chosen from its moving averages (unchanged before the first
    exact observation)."""
    if s["n_x"] == 0:
        return s
    b, steps, authors = cfg.beta, int(s["c_f_steps"]) - 1, cfg.rule == "authors"
    A = _debiased(s["A"], s["n_x"], b)
    D = _debiased(s["D"], s["n_x"], b) / cfg.d_shrink
    if authors:
        s["q"] = authors_q(A, D, steps + 1, steps * (steps + 1) / 2, cfg.q_min)
        return s
    if s["n_f"] > 0:
        c_f = _debiased(s["t_f"], s["n_f"], b)
        c_x = _debiased(s["t_x"], s["n_x"], b) - c_f
    else:
        c_f, c_x = s["c_f_steps"], s["c_x_steps"]
    s["q"] = optimal_q(A, D, c_f, max(c_x, 1e-12 * c_f), cfg.q_min)
    return s
