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
first-order rule ``F~`` of ``UFOM.md``), the update leaves the adjoint of the
state unchanged and is linear in the gradients. The estimator then sums the
first-order steps' gradients during the forward pass instead of sweeping them
backwards.
"""
from __future__ import annotations

import numbers
from typing import Dict, Mapping, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["InnerRule", "SGD", "per_param", "check_hyper"]

Hyper = Union[float, Tensor, Mapping[str, Tensor]]


def per_param(value: Hyper, name: str):
    """The value of hyperparameter ``value`` for the parameter called ``name``."""
    return value[name] if isinstance(value, Mapping) else value


def check_hyper(value: Hyper, arg: str, names: Sequence[str], *, low: float = 0.0) -> None:
    """Validate one hyperparameter against the model's parameter ``names``.

    Raises ``ValueError`` naming ``arg`` for a negative value, a non-scalar
    tensor that is not per-parameter, or a dict whose keys are not ``names``.
    """
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(names))
        missing = sorted(set(names) - set(value))
        if unknown or missing:
            raise ValueError(
                f"Invalid {arg}: a per-parameter dict must have exactly the model's adapted "
                f"parameter names; unknown {unknown}, missing {missing}")
        for k, v in value.items():
            _check_value(v, f"{arg}[{k!r}]", low)
    else:
        _check_value(value, arg, low)


def _check_value(v, arg: str, low: float) -> None:
    if isinstance(v, Tensor):
        if not v.is_floating_point():
            raise ValueError(f"Invalid {arg}: expected a floating-point tensor, got {v.dtype}")
        with torch.no_grad():
            bad = bool((v < low).any()) or not bool(torch.isfinite(v).all())
        if bad:
            raise ValueError(f"Invalid {arg}: values must be finite and >= {low}")
    elif isinstance(v, numbers.Real) and not isinstance(v, bool):
        if not (float(v) >= low and float(v) != float("inf")):
            raise ValueError(f"Invalid {arg}: {v!r} (expected a finite number >= {low})")
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


class SGD(InnerRule):
    """Plain stochastic gradient descent: ``phi <- phi - lr * g``.

    Args:
        lr: learning rate: a float, a scalar tensor, or a dict from parameter
            name to tensor (broadcast against the parameter; Meta-SGD when the
            tensors have the parameters' shapes). Tensors held by the outer
            optimizer are learned.
    """

    first_order_additive = True

    def __init__(self, lr: Hyper):
        check_hyper(lr, "lr", list(lr) if isinstance(lr, Mapping) else ())
        self.hyper = {"lr": lr}

    def init(self, params):
        return ()

    def update(self, grads, state, params, hyper):
        lr = hyper["lr"]
        return {n: p - per_param(lr, n) * grads[n] for n, p in params.items()}, state
