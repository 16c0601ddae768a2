"""What every public call coordinates with the rest of the process.

* :func:`process_lock`: the lock every public entry point holds
  (:func:`one_call_at_a_time`), so that calls in several threads take turns
  with the process-wide state a call changes; a forked child gets a new one;
* :func:`fullgraph_refused`: torch's error for a ``torch.compile(fullgraph=True)``
  function run under the library's modes and transforms, as a message that says
  what to do;
* :func:`current_level` / :func:`outside_transforms`: whether a ``torch.func``
  transform is running;
* :func:`caller_level`: the ``stacklevel`` that makes a warning point at the
  user's call.

Forks: a child forked while another thread held a lock inherits it held, by a
thread the child does not have, and its first call would wait forever (review GE
F2). Each module that holds a lock gives the child a new one in its own at-fork
handler (this one, :mod:`~torch_ufom.functional_model`, :mod:`~torch_ufom.unroll`,
:mod:`~torch_ufom.vectorised`, run in that order, the order of their imports). No
handler takes another module's lock: ``functional_model``'s, which also undoes the
swaps only other threads were in, must not take the process lock.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from typing import Optional

import torch

__all__ = ["process_lock", "one_call_at_a_time", "fullgraph_refused", "COMPILED_FULLGRAPH", "caller_level",
           "current_level", "outside_transforms"]


# What a sweep sets for the whole process: the global generators (seeded per step) and the
# attention flags. Sweeps in several threads would reseed each other's streams and leave the
# flags as another one found them, so they take turns (reentrant: a loss may call the library).
_PROCESS_STATE = threading.RLock()


def process_lock() -> threading.RLock:
    """The lock every public entry point holds while it runs (reentrant: a loss may call the
    library). Read it through this function at every use, never keep it: a forked child gets
    a new one (:func:`_new_lock_after_fork`)."""
    return _PROCESS_STATE


def _new_lock_after_fork() -> None:
    """A child forked while another thread held the lock inherits it held, by a thread it does
    not have: its first call would wait forever (review GE F2). The child gets a new lock."""
    global _PROCESS_STATE
    _PROCESS_STATE = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_after_fork)


_OWN_DIRS = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
             os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


def caller_level() -> int:
    """The ``stacklevel`` that makes a warning issued by the caller of this function
    point at the first frame outside this package and torch: the user's call (through
    the entry points' own wrapper, and torch's, for a warning from a hook torch runs:
    review s36L F1, where fixed levels pointed at the wrapper)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_OWN_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def one_call_at_a_time(fn):
    """``fn`` (a public entry point) run holding :func:`process_lock`: a call swaps the module's
    parameter entries and reads them while it runs, so calls on one module in several threads
    would read one another's swapped tensors and put back the wrong ones (review GD F2: wrong
    hypergradients on every path, and a module left holding copies of its parameters)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with process_lock(), fullgraph_refused(COMPILED_FULLGRAPH, _NO_FRAMES):
            return fn(*args, **kwargs)
    return run


_NO_FRAMES = "fullgraph=True found no compiled frames"  # (torch's error, 2.11-2.13)


COMPILED_FULLGRAPH = (
    "a loss runs a function compiled with torch.compile(fullgraph=True), which torch cannot run "
    "under the library's looks at the losses (a TorchDispatchMode) nor under torch.func's transforms "
    "(hvp='fwdrev', vectorised meta-batches and adapt_batch), which exact sweeps need (review JA F7); "
    "use mode='fom' task by task (hypergrad, MetaOptimizer.backward), or compile without fullgraph=True. "
    "Torch now skips that function's frame for the rest of the process, so its later calls raise too, in "
    "your own code as well, until torch._dynamo.reset() (torch's behaviour once a compiled function ran "
    "under such a look or transform: review s35D F1)")


@contextlib.contextmanager
def fullgraph_refused(message: str, torchs: str = "torch.compiler.disable"):
    """Raise ``RuntimeError(message)`` for torch's error (naming ``torchs``) when a function
    compiled with ``fullgraph=True`` meets one of the library's torch-function modes, whose
    frames Dynamo does not compile (``torch.compiler.disable``: reviews HE F4, IC F1), or
    its dispatch-mode looks and torch.func's transforms."""
    try:
        yield
    except Exception as e:  # torch._dynamo.exc.Unsupported, a RuntimeError
        if (type(e).__name__ == "Unsupported" or isinstance(e, RuntimeError)) and torchs in str(e):
            raise RuntimeError(message) from e
        raise


def current_level() -> Optional[int]:
    """The innermost running ``torch.func`` transform's level (``None`` outside them)."""
    return torch._C._functorch.maybe_current_level()


def outside_transforms() -> bool:
    """Whether no ``torch.func`` transform is running (``torch.func.grad`` calls
    ``torch.autograd.grad`` inside its own: such a loss differentiates only its own
    inputs, and vectorises)."""
    return current_level() is None
