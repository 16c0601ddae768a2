"""Forward-over-reverse Hessian-vector products (``hvp="fwdrev"``): their errors and their check.

Forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``) computes a
step's Hessian-vector product without keeping the step's double-backward graph.
It cannot run every loss: :class:`FwdRevError` where it fails inside
``torch.func``, :class:`FwdRevCannot` where a loss draws what no stream replays
(:data:`FWDREV_DRAWS`). Where it runs, its first product in each per-task sweep
is compared with reverse mode's (:func:`hvp_disagreement`), and a difference is
refused (:class:`FwdRevDisagrees`), never returned.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from .batches import SAMPLES_ANEW

__all__ = ["jvp", "FwdRevError", "FwdRevCannot", "FwdRevDisagrees", "FWDREV_DRAWS", "FUNC_DRAWS_OTHERWISE",
           "hvp_disagreement", "fwdrev_error"]


@functools.lru_cache(maxsize=None)
def _jvp_decompositions() -> None:
    """Import what ``torch.func.jvp`` imports on its first call, with the DeprecationWarning its
    ``torch.jit.script`` calls raise in torch 2.13 silenced: torch's own, not the user's, which
    under ``warnings.simplefilter("error")`` failed every forward-over-reverse call, the failed
    import tried again each time (review s37B F4). Once per process."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import torch._decomp.decompositions_for_jvp  # noqa: F401
        except ImportError:  # (a torch without it: nothing to import)
            pass


def jvp(fn: Callable, primals: tuple, tangents: tuple, has_aux: bool = False):
    """``torch.func.jvp``, its first call's import of torch's decompositions made quietly."""
    _jvp_decompositions()
    return torch.func.jvp(fn, primals, tangents, has_aux=has_aux)


FWDREV_DRAWS = (
    "inner_loss or its batch draws from NumPy's or Python's global random generator (np.random, "
    "random), which no step's random stream replays: hvp='fwdrev' evaluates each exact step's inner "
    "loss again for its Hessian-vector product (its batch fetched again), and that evaluation would "
    "draw other numbers than the step did, so the sweep would differentiate another function (a draw "
    "that only decides what to log is refused too, as for replays: the library cannot tell it "
    "apart). Draw from torch's global generator (torch.rand, torch.randn: each step's stream reseeds "
    "it), or pass hvp='revrev' with memory='store', which evaluate each step once")


class FwdRevCannot(RuntimeError):
    """Forward-over-reverse cannot run this loss (it draws what no stream replays): raised as
    it is, not wrapped as a failure inside ``torch.func`` (:class:`FwdRevError`)."""


class FwdRevError(RuntimeError):
    """A forward-over-reverse HVP that failed inside ``torch.func``. ``detail`` says
    what failed, without the advice to pick another ``hvp`` that the message ends
    with (a vectorised sweep that chose forward-over-reverse itself gives other advice)."""

    def __init__(self, detail: str):
        super().__init__(f"{detail}; use hvp='revrev' or hvp='auto'")
        self.detail = detail


class FwdRevDisagrees(ValueError):
    """A forward-over-reverse HVP that differs from reverse mode's at the same point and
    direction (:meth:`~torch_ufom.unroll.InnerLoop.hessian_vector` compares the first of each per-task
    sweep): the loss computes something forward-mode AD differentiates otherwise. ``why``:
    the reason without the advice."""

    def __init__(self, j: int, rel: float, mixed: bool = False, step_function: bool = False,
                 draws: bool = False, low_precision: bool = False):
        self.why = (f"gives another Hessian-vector product than reverse mode at inner step {j} ({rel:.1e} "
                    "relative): the loss computes something forward-mode AD differentiates otherwise (a "
                    "stop-gradient made under torch.no_grad() or through .data, a custom Function's jvp, "
                    "a hook on a graph node), or computes in a lower precision than its parameters' "
                    "(autocast, a bfloat16 part), whose rounding the check against reverse mode cannot "
                    "tell from a difference (review HE F5)")
        if mixed:  # (review IC F2)
            self.why += ("; the model mixes parameter dtypes, and the difference is within the least "
                         "precise one's rounding, which reaches every parameter it touches")
        if low_precision and rel < 0.1:  # (review s39N F1, s39R3 F4: float32 refused at a small loss)
            self.why += ("; or, in float32 or lower, the loss is small (a softmax near saturation, "
                         "below about 1e-4), where the two products differ by rounding alone, which "
                         "the check cannot tell from a difference either")
        if draws:  # (the step drew from torch's generators)
            self.why += f"; the step draws random numbers: {FUNC_DRAWS_OTHERWISE}"
        if step_function:  # (review s35C: a j -> batch callable that samples anew at every call)
            self.why += f"; or {SAMPLES_ANEW}"
        super().__init__(f"Invalid hvp: 'fwdrev' {self.why}; use 'revrev' or 'auto'")


FUNC_DRAWS_OTHERWISE = (  # (review s39Z F1: torch's own behaviour, torch 2.11-2.13)
    "if it applies dropout to a non-contiguous tensor (a batch_first RNN's output, a transposed view), "
    "torch.func (hvp='fwdrev') draws other masks than eager mode does: call .contiguous() before the "
    "dropout")


def hvp_disagreement(forward: Sequence[Tensor], reverse: Sequence[Tensor]) -> Tuple[float, bool]:
    """How far apart two HVPs are, relative (their difference's norm over their norms'), where
    that exceeds the square root of their dtype's epsilon, each dtype's parameters compared
    apart (``0.0`` where they agree), and whether it is within the square root of the least
    precise parameter dtype's epsilon (a model that mixes precisions: a float32 part's rounding
    reaches the float64 parameters it touches; review IC F2 read it as a stop-gradient, and
    review JA F1 showed that loosening the check for every parameter let a 6e-4 disagreement
    through). One host synchronisation."""
    if not forward:
        return 0.0, False
    groups: Dict[torch.dtype, List[int]] = {}
    for i, f in enumerate(forward):
        groups.setdefault(f.dtype, []).append(i)
    sums = torch.stack([torch.stack([sum((forward[i] - reverse[i]).abs().pow(2).sum() for i in index),
                                     sum(forward[i].abs().pow(2).sum() for i in index),
                                     sum(reverse[i].abs().pow(2).sum() for i in index)]).to(torch.float64)
                        for index in groups.values()]).tolist()
    worst = 0.0
    for dtype, (diff, ours, theirs) in zip(groups, sums):
        if not math.isfinite(ours + theirs):
            # Nothing to compare: a non-finite forward HVP is the sweep's to report (its hypergradient
            # check names it); a non-finite reverse one (torch's double backward of logcumsumexp can
            # be) leaves forward mode unchecked, as it leaves reverse mode unusable.
            continue
        if diff > torch.finfo(dtype).eps * (ours + theirs):  # (squared: sqrt(eps) relative)
            worst = max(worst, (diff / (ours + theirs)) ** 0.5)
    lowest = max(torch.finfo(f.dtype).eps for f in forward)
    return worst, len(groups) > 1 and worst ** 2 <= lowest


def fwdrev_error(err: Exception, j: int) -> FwdRevError:
    """The error raised when forward-over-reverse fails inside ``torch.func``."""
    return FwdRevError(
        f"hvp='fwdrev' failed inside torch.func.jvp(torch.func.grad(inner_loss)) at inner step "
        f"{j}: {str(err).rstrip('. ')}. Some operators have no forward-over-reverse formula in this "
        "torch (F.mse_loss in torch 2.13, for one)")
