"""Inner update rules: pure ``init`` / ``update`` pairs.

An inner rule maps the inner gradient ``g_j`` to the next inner state::

    state = rule.init(params)
    new_params, new_state = rule.update(grads, state, params, rule.hyper)

``params`` and ``grads`` are dicts from parameter name to tensor, ``state`` is a
tuple of tensors, ``hyper`` a dict of hyperparameters. A hyperparameter may be
a float, a scalar tensor, or a dict from parameter name to tensor (one value
per parameter, e.g. learned per-parameter learning rates). Tensors held by the
outer optimizer are meta-parameters and receive hypergradients through
``update``, which must therefore be written with differentiable tensor ops and
must not modify its arguments in place.

``first_order_additive`` declares that, with the gradients held constant (the
first-order rule ``F~`` of ``docs/maths.md#the-first-order-rule``), the update leaves the adjoint of the
state unchanged and is linear in the gradients. The estimator then sums the
first-order steps' gradients during the forward pass instead of sweeping them
backwards.
"""
from __future__ import annotations

import numbers
from typing import Dict, Mapping, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["InnerRule", "SGD", "Adam", "per_param", "check_hyper"]

Hyper = Union[float, Tensor, Mapping[str, Tensor]]


def per_param(value: Hyper, name: str):
    """The value of hyperparameter ``value`` for the parameter called ``name``."""
    return value[name] if isinstance(value, Mapping) else value


def check_hyper(value: Hyper, arg: str, names: Sequence[str], *, low: float = 0.0,
                high: float = float("inf")) -> None:
    """Validate one hyperparameter against the model's parameter ``names``.

    Raises ``ValueError`` naming ``arg`` for a value outside ``[low, high)``
    (``[low, inf)`` by default), a non-float tensor, or a dict whose keys are
    not ``names``.
    """
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(names))
        missing = sorted(set(names) - set(value))
        if unknown or missing:
            raise ValueError(
                f"Invalid {arg}: a per-parameter dict must have exactly the model's adapted "
                f"parameter names; unknown {unknown}, missing {missing}")
        for k, v in value.items():
            _check_value(v, f"{arg}[{k!r}]", low, high)
    else:
        _check_value(value, arg, low, high)


def _check_value(v, arg: str, low: float, high: float) -> None:
    where = f">= {low}" if high == float("inf") else f"in [{low}, {high})"
    if isinstance(v, Tensor):
        if not v.is_floating_point():
            raise ValueError(f"Invalid {arg}: expected a floating-point tensor, got {v.dtype}")
        with torch.no_grad():
            bad = bool((v < low).any() | (v >= high).any()) or not bool(torch.isfinite(v).all())
        if bad:
            raise ValueError(f"Invalid {arg}: values must be finite and {where}")
    elif isinstance(v, numbers.Real) and not isinstance(v, bool):
        if not (low <= float(v) < high and float(v) != float("inf")):
            raise ValueError(f"Invalid {arg}: {v!r} (expected a finite number {where})")
    else:
        raise ValueError(f"Invalid {arg}: {v!r} (expected a float, a tensor or a dict of tensors)")


class InnerRule:
    """Base class of inner update rules (see the module docstring for the contract)."""

    hyper: Dict[str, Hyper]
    first_order_additive: bool = False

    def init(self, params: Mapping[str, Tensor]) -> Tuple[Tensor, ...]:
        """Return the initial optimizer state for ``params``."""
        raise NotImplementedError

    def update(self, grads, state, params, hyper):
        """Return ``(new_params, new_state)``; see the module docstring."""
        raise NotImplementedError

    def validate(self, names: Sequence[str]) -> None:
        """Check the per-parameter hyperparameters against the model's ``names``."""
        for arg, value in self.hyper.items():
            check_hyper(value, arg, names)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={_short(v)}" for k, v in self.hyper.items())
        return f"{type(self).__name__}({args})"


def _short(v):
    if isinstance(v, Mapping):
        return "{per-parameter}"
    if isinstance(v, Tensor):
        return f"tensor({v.detach().cpu().tolist()})" if v.numel() == 1 else f"tensor{tuple(v.shape)}"
    return repr(v)


def _is_zero(value: Hyper) -> bool:
    return isinstance(value, numbers.Real) and float(value) == 0.0


class SGD(InnerRule):
    """Stochastic gradient descent with ``torch.optim.SGD``'s update formula.

    With ``d = g + weight_decay * phi``: without momentum ``phi <- phi - lr d``;
    with momentum the buffer is ``b <- d`` at the first step and
    ``b <- momentum b + (1 - dampening) d`` after, and
    ``phi <- phi - lr (d + momentum b)`` (Nesterov) or ``phi <- phi - lr b``.

    Every hyperparameter may be a float, a scalar tensor or a dict from
    parameter name to tensor (broadcast against the parameter); tensors held
    by the outer optimizer are learned (e.g. Meta-SGD's per-parameter rates).
    The first-order rule (FOM) holds ``g`` constant; ``weight_decay * phi`` and
    the momentum buffer are still differentiated.

    Args:
        lr: learning rate, ``>= 0``.
        momentum: momentum factor, ``>= 0``.
        dampening: dampening for momentum, ``>= 0``.
        nesterov: Nesterov momentum (needs ``momentum > 0`` and no dampening).
        weight_decay: L2 penalty added to the gradient, ``>= 0``.
    """

    def __init__(self, lr: Hyper, momentum: Hyper = 0.0, dampening: Hyper = 0.0,
                 nesterov: bool = False, weight_decay: Hyper = 0.0):
        self.hyper = {"lr": lr, "momentum": momentum, "dampening": dampening,
                      "weight_decay": weight_decay}
        _check_names_free(self.hyper)
        if nesterov and (_is_zero(momentum) or not _is_zero(dampening)):
            raise ValueError("Invalid nesterov: Nesterov momentum requires a momentum and zero dampening")
        self.nesterov = bool(nesterov)
        self.has_momentum = not _is_zero(momentum)
        self.first_order_additive = not self.has_momentum and _is_zero(weight_decay)

    def init(self, params):
        if not self.has_momentum:
            return ()
        first = next(iter(params.values()))
        # The step count (for "b <- d at the first step") then one buffer per parameter.
        return (torch.zeros((), dtype=torch.int64, device=first.device),) + tuple(
            torch.zeros_like(p) for p in params.values())

    def update(self, grads, state, params, hyper):
        new_params, new_bufs = {}, []
        first = state[0] == 0 if state else None
        for i, (n, p) in enumerate(params.items()):
            d = grads[n]
            wd = per_param(hyper["weight_decay"], n)
            if not _is_zero(wd):
                d = d + wd * p
            if self.has_momentum:
                mom, damp = per_param(hyper["momentum"], n), per_param(hyper["dampening"], n)
                buf = torch.where(first, d, mom * state[1 + i] + (1 - damp) * d)
                new_bufs.append(buf)
                d = d + mom * buf if self.nesterov else buf
            lr = per_param(hyper["lr"], n)
            # A plain-number rate: one fused op (half the allocations of p - lr * d).
            new_params[n] = p.add(d, alpha=-lr) if isinstance(lr, numbers.Real) else p - lr * d
        new_state = (state[0] + 1,) + tuple(new_bufs) if state else ()
        return new_params, new_state

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", nesterov={self.nesterov})"


class Adam(InnerRule):
    """Adam with ``torch.optim.Adam``'s update formula (L2 ``weight_decay``, no AMSGrad).

    With ``d = g + weight_decay * phi`` and ``t`` the step count:
    ``m <- beta1 m + (1 - beta1) d``, ``v <- beta2 v + (1 - beta2) d^2``,
    ``phi <- phi - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)``.
    ``eps`` is added outside the square root, after the bias correction, as in
    ``torch.optim.Adam`` (``higher``'s Adam adds it before the correction).

    Differentiating ``sqrt(v)`` at ``v = 0`` (a coordinate whose gradients were
    all exactly zero so far) would give ``inf * 0 = NaN``; its derivative is
    taken as 0 there, the subgradient of ``|g|`` at 0, so hypergradients stay
    finite. The first-order rule (FOM) holds the gradient ``g`` constant, so
    ``m`` and ``v`` are constants too unless ``weight_decay`` is set; the
    update direction is then not differentiated at all.

    Args:
        lr: learning rate, ``>= 0``.
        betas: ``(beta1, beta2)``, each in ``[0, 1)``.
        eps: term added to the denominator, ``>= 0``.
        weight_decay: L2 penalty added to the gradient, ``>= 0``.
    """

    def __init__(self, lr: Hyper = 1e-3, betas=(0.9, 0.999), eps: Hyper = 1e-8,
                 weight_decay: Hyper = 0.0):
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r} (expected a pair (beta1, beta2))")
        for i, b in enumerate(betas):
            check_hyper(b, f"betas[{i}]", list(b) if isinstance(b, Mapping) else (), high=1.0)
        self.hyper = {"lr": lr, "beta1": betas[0], "beta2": betas[1], "eps": eps,
                      "weight_decay": weight_decay}
        _check_names_free(self.hyper)

    def validate(self, names):
        super().validate(names)
        for i, arg in enumerate(("beta1", "beta2")):
            check_hyper(self.hyper[arg], f"betas[{i}]", names, high=1.0)

    def init(self, params):
        first = next(iter(params.values()))
        zeros = tuple(torch.zeros_like(p) for p in params.values())
        return (torch.zeros((), dtype=first.dtype, device=first.device),) + zeros + zeros

    def update(self, grads, state, params, hyper):
        n_p = len(params)
        t = state[0] + 1
        new_params, ms, vs = {}, [], []
        for i, (n, p) in enumerate(params.items()):
            d = grads[n]
            wd = per_param(hyper["weight_decay"], n)
            if not _is_zero(wd):
                d = d + wd * p
            b1, b2 = per_param(hyper["beta1"], n), per_param(hyper["beta2"], n)
            m = b1 * state[1 + i] + (1 - b1) * d
            v = b2 * state[1 + n_p + i] + (1 - b2) * d * d
            corr1 = 1 - _pow(b1, t)
            corr2 = 1 - _pow(b2, t)
            denom = _safe_sqrt(v) / _safe_sqrt(corr2) + per_param(hyper["eps"], n)
            new_params[n] = p - per_param(hyper["lr"], n) / corr1 * m / denom
            ms.append(m)
            vs.append(v)
        return new_params, (t,) + tuple(ms) + tuple(vs)


def _pow(base, t: Tensor) -> Tensor:
    """``base ** t`` for a float or tensor ``base`` and a tensor step count ``t``."""
    if not isinstance(base, Tensor):
        base = torch.as_tensor(base, dtype=t.dtype, device=t.device)
    return torch.pow(base, t)


def _safe_sqrt(x):
    """``sqrt(x)`` whose derivatives at ``x = 0`` are 0 instead of ``inf``."""
    if not isinstance(x, Tensor):
        return x ** 0.5
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def _check_names_free(hyper: Dict[str, Hyper]) -> None:
    """Validate the values of hyperparameters; per-parameter names are checked by ``validate``."""
    for arg, value in hyper.items():
        check_hyper(value, arg, list(value) if isinstance(value, Mapping) else ())
