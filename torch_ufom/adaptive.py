"""Adaptive choice of UFOM's exact-branch probability ``q`` (``q="auto"``).

With ``A = E||G_r||^2`` and ``D = E||G_r - G_0||^2``, the Bernoulli estimate has
second moment ``A + (1/q - 1) D``. SGD's time to an epsilon-stationary point
scales with (cost per step) x (second moment),
``(c_f + q c_x) (A - D + D/q)``, whose minimiser is

    q* = sqrt(c_f D / (c_x (A - D)))   clipped to [q_min, 1]   (q* = 1 if A <= D)

where ``c_f`` is the cost of a first-order step and ``c_x`` the extra cost of
the exact branch (``UFOM.md``). ``A`` and ``D`` are estimated by
bias-corrected exponential moving averages over the tasks on which the exact
branch ran (the sweep then yields ``G_0`` beside ``G_r`` at no second-order
cost). Two rules share this machinery:

* ``"ufom"`` (ours): costs are measured wall-clock times (moving averages of
  the first-order and exact-branch calls; inner-step counts until both have
  been seen), averaging factor ``beta = 0.9``, ``q_min = 0.01``, start at 0.2.
* ``"authors"``: the variant of the authors' reference implementation as
  ``UFOM.md`` describes it: start at and never below 0.05, ``beta = 0.99``,
  costs counted in inner steps (``c_f = r + 1``, ``c_x`` = replayed plus
  reverse steps of the exact branch, ``r(r-1)/2 + r`` under recomputation), and
  ``D`` shrunk by a factor 10 before choosing ``q``. Their final rule is the
  root of a quadratic from a slightly different bound, whose form we do not
  have; we apply ``q*`` above to their statistics instead.

Everything here is pure: :func:`init_stats` makes the statistics, a plain dict
that :class:`~torch_ufom.MetaOptimizer` keeps in its ``state_dict``;
:func:`observe` turns one task into plain numbers and :func:`update` returns
new statistics with the new ``q``. ``MetaOptimizer`` applies the observations
of an outer step in :meth:`~torch_ufom.MetaOptimizer.step`, so ``q`` is fixed
within an outer step and identical on every rank of a process group.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

from torch import Tensor

__all__ = ["AdaptiveQ", "optimal_q", "init_stats", "observe", "update"]

RULES = ("ufom", "authors")


def optimal_q(A: float, D: float, c_f: float, c_x: float, q_min: float) -> float:
    """``q* = sqrt(c_f D / (c_x (A - D)))`` clipped to ``[q_min, 1]``; 1 if ``A <= D``."""
    if A <= D or c_x <= 0:
        return 1.0
    return min(1.0, max(q_min, math.sqrt(c_f * D / (c_x * (A - D)))))


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
        if rule not in RULES:
            raise ValueError(f"Invalid q_rule: {rule!r} (expected one of {', '.join(RULES)})")
        authors = rule == "authors"
        q_min = (0.05 if authors else 0.01) if q_min is None else q_min
        beta = (0.99 if authors else 0.9) if beta is None else beta
        if isinstance(q_min, bool) or not isinstance(q_min, (int, float)) or not 0 < q_min <= 1:
            raise ValueError(f"Invalid q_min: {q_min!r} (expected a float in (0, 1])")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
            raise ValueError(f"Invalid q_beta: {beta!r} (expected a float in [0, 1))")
        q_init = max(q_min, 0.05 if authors else 0.2) if q_init is None else q_init
        if not q_min <= q_init <= 1:
            raise ValueError(f"Invalid q_init: {q_init!r} (expected a float in [q_min, 1])")
        self.rule, self.q_min, self.beta, self.q_init = rule, float(q_min), float(beta), float(q_init)
        self.d_shrink = 10.0 if authors else 1.0

    def __repr__(self) -> str:
        return f"AdaptiveQ(rule={self.rule!r}, q_min={self.q_min}, beta={self.beta})"


def init_stats(cfg: AdaptiveQ) -> Dict[str, float]:
    """Fresh statistics: the moving sums and counts of ``A``, ``D`` and the costs."""
    return {"q": cfg.q_init, "A": 0.0, "D": 0.0, "n_x": 0, "t_x": 0.0, "n_f": 0, "t_f": 0.0,
            "c_f_steps": 0.0, "c_x_steps": 0.0}


def _ema(avg: float, x: float, beta: float) -> float:
    return beta * avg + (1 - beta) * x


def _debiased(avg: float, n: int, beta: float) -> float:
    return avg / (1 - beta ** n) if n else 0.0


def _sq_norm(grads: Sequence[Optional[Tensor]]) -> float:
    return float(sum((g.detach().double() ** 2).sum() for g in grads if g is not None))


def observe(*, exact: bool, seconds: float, steps: int, forward_steps: int, reverse_steps: int,
            g0=None, gr=None) -> Dict[str, float]:
    """One task's observation, as plain numbers (so ranks can exchange it).

    Args:
        exact: whether the exact branch ran (then ``g0`` and ``gr`` are ``G_0``, ``G_r``).
        seconds: the wall-clock time of the task.
        steps: ``r``.
        forward_steps, reverse_steps: the task's inner-step counts.
    """
    obs = {"exact": bool(exact), "seconds": float(seconds), "steps": int(steps),
           "forward_steps": int(forward_steps), "reverse_steps": int(reverse_steps)}
    if exact:
        obs["A"] = _sq_norm(gr)
        obs["D"] = _sq_norm([None if a is None else a - z for a, z in zip(gr, g0)])
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
    if obs["exact"]:
        s["n_x"] += 1
        s["A"] = _ema(s["A"], obs["A"], b)
        s["D"] = _ema(s["D"], obs["D"], b)
        s["t_x"] = _ema(s["t_x"], obs["seconds"], b)
        # Inner-step units: steps run again (replays and each reverse step's
        # rebuild) plus one per reverse VJP; r(r-1)/2 + 2r under recomputation.
        s["c_x_steps"] = obs["forward_steps"] + 2 * obs["reverse_steps"] - steps
    else:
        s["n_f"] += 1
        s["t_f"] = _ema(s["t_f"], obs["seconds"], b)
    s["c_f_steps"] = steps + 1
    if s["n_x"] == 0:
        return s
    A = _debiased(s["A"], s["n_x"], b)
    D = _debiased(s["D"], s["n_x"], b) / cfg.d_shrink
    if cfg.rule == "ufom" and s["n_f"] > 0:
        c_f = _debiased(s["t_f"], s["n_f"], b)
        c_x = _debiased(s["t_x"], s["n_x"], b) - c_f
    else:
        c_f, c_x = s["c_f_steps"], s["c_x_steps"]
    s["q"] = optimal_q(A, D, c_f, max(c_x, 1e-12 * c_f), cfg.q_min)
    return s
