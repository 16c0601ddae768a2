"""The argument checks' one convention: a value of the wrong type is a ``TypeError``, a value
of the right type outside what is accepted a ``ValueError`` (Python's convention, which
``torch.optim`` follows where it checks types), each naming the argument as the user wrote it
and what is accepted. A leaf module: every other one may use it."""
from __future__ import annotations

import numbers
from typing import Any

__all__ = ["is_int", "is_real", "invalid"]


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (a Python or NumPy int; not a bool, not a tensor)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """Whether ``value`` is a real number (an int or a float, NaN and inf included; not a
    bool, not a tensor)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def invalid(arg: str, value: Any, expected: str, typed: bool) -> Exception:
    """The error for ``arg`` given ``value`` (``"Invalid arg: value (expected ...)"``): a
    ``ValueError`` where the value's type is right (``typed``), else a ``TypeError``."""
    return (ValueError if typed else TypeError)(f"Invalid {arg}: {value!r} (expected {expected})")
