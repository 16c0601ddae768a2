"""Which error a call with several wrong arguments raises: the first in the order the entry
points check them, which the shared Problem builder (``functional.functional_problem`` and
``bind_problem``) must keep. ``hypergrad``, ``hypergrad_batch`` and ``diagnose`` check the
settings (``resolve``), then their own arguments (``diagnose``'s tasks), the losses, the
generator, ``params``, a buffer computed from one of them, ``hvp``, and last read the
truncation law; ``MetaOptimizer.backward`` checks the losses before a buffer computed from
one of its tensors, and that before ``hvp``. Each case pairs two wrong arguments next to
each other in that order (written against the code before they shared one builder)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_ufom
from torch_ufom.truncation import TruncationLaw
from torch_ufom.batches import StepBatches


def mse(f, batch):
    x, y = batch
    return ((f(x) - y) ** 2).mean()


class Scaled(nn.Module):
    """A linear layer times a buffer, which ``derived`` computes from a meta-parameter."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("scale", torch.tensor(1.0))

    def forward(self, x):
        return self.lin(x) * self.scale


class Drifting(TruncationLaw):
    """A law read correctly ``good`` times, then with probabilities that do not sum to 1:
    refused where a call reads it after that (as a user's law whose ``probs`` change)."""

    def __init__(self, good=None):
        self.good, self.readings = good, 0

    def probs(self, steps):
        self.readings += 1
        if self.good is not None and self.readings > self.good:
            return [0.5] * (steps + 1)
        return [0.0] * steps + [1.0]


def resolves_law():
    """A :class:`Drifting` law read correctly as often as the settings' checks read it, and
    wrongly afterwards (counted on a call refused right after them)."""
    model, task = setup()
    counted = Drifting()
    with pytest.raises(TypeError, match=r"Invalid inner_loss"):
        torch_ufom.hypergrad(model, 3, mse, task, task, steps=2, inner_lr=0.1, truncation=counted)
    return Drifting(counted.readings)


def derived(model):
    """Make ``model.scale`` a buffer computed from a new meta-parameter, which it returns."""
    raw = torch.tensor(0.4, requires_grad=True)
    model.scale = F.softplus(raw)
    return raw


def setup(seed=0):
    torch.manual_seed(seed)
    model = Scaled()
    task = (torch.randn(6, 3), torch.randn(6, 2))
    return model, task


def frozen(params):
    """The call's params (the meta-parameter the buffer may be derived from kept) with a tensor
    that does not require grad added: Invalid params[N]."""
    return params + [torch.zeros(2)]


# (what is wrong: keywords and whether the buffer is derived from a meta-parameter, the error named)
FUNCTIONAL = {
    "steps before inner_loss": (dict(steps=0, inner_loss=3), False, r"Invalid steps"),
    "inner_loss before outer_loss": (dict(inner_loss=3, outer_loss=4), False, r"Invalid inner_loss"),
    "outer_loss before generator": (dict(outer_loss=4, generator="g"), False, r"Invalid outer_loss"),
    "generator before params": (dict(generator="g", params=frozen), False, r"Invalid generator"),
    "params before a derived buffer": (dict(params=frozen), True, r"Invalid params\[\d+\]"),
    "a derived buffer before hvp": (dict(hvp="fwdrev"), True, r"its buffer 'scale' was computed from one "
                                                               r"of params"),
    "hvp before the law's reading": (dict(hvp="fwdrev", truncation=resolves_law, mode=None), False,
                                     r"Invalid hvp: 'fwdrev'"),
    "the law's reading last": (dict(truncation=resolves_law, mode=None), False, r"Invalid truncation: "
                                                                                r".*sums to 1.5"),
}


def call(entry, model, task, wrong, raw):
    kw = dict(inner_loss=mse, outer_loss=mse, steps=2, inner_lr=0.1, mode="exact",
              params=list(model.parameters()) + [raw], generator=None)
    kw.update({k: v(kw["params"]) if k == "params" else v() if k == "truncation" else v
               for k, v in wrong.items()})
    inner, outer = kw.pop("inner_loss"), kw.pop("outer_loss")
    if entry == "hypergrad":
        return torch_ufom.hypergrad(model, inner, outer, task, task, **kw)
    if entry == "hypergrad_batch":
        stacked = tuple(t.unsqueeze(0) for t in task)
        return torch_ufom.hypergrad_batch(model, inner, outer, stacked, stacked, **kw)
    kw.pop("mode")
    return torch_ufom.diagnose(model, inner, outer, [(task, task)], **kw)


@pytest.mark.parametrize("entry, case", [(entry, case) for case in FUNCTIONAL
                                         for entry in ("hypergrad", "hypergrad_batch", "diagnose")
                                         if entry != "diagnose" or "truncation" not in FUNCTIONAL[case][0]])
def test_functional_entry_points_name_the_first_wrong_argument(entry, case):
    wrong, derive, message = FUNCTIONAL[case]
    model, task = setup()
    raw = derived(model) if derive else torch.tensor(0.4, requires_grad=True)
    with pytest.raises((TypeError, ValueError), match=message):
        call(entry, model, task, wrong, raw)


def test_diagnose_names_its_tasks_between_the_settings_and_the_losses():
    model, task = setup()
    short = (StepBatches([task[0]]), task[1])  # one batch for steps=2
    with pytest.raises(ValueError, match=r"Invalid steps"):
        torch_ufom.diagnose(model, mse, mse, [short], steps=0, inner_lr=0.1)
    with pytest.raises(ValueError, match=r"Invalid tasks\[0\]\[0\]"):
        torch_ufom.diagnose(model, 3, mse, [short], steps=2, inner_lr=0.1)


def test_backward_names_the_losses_then_a_derived_buffer_then_hvp():
    model, task = setup()
    raw = torch.tensor(0.4, requires_grad=True)
    params = list(model.parameters()) + [raw]
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(params, lr=0.1), inner_lr=0.1, steps=2,
                                    mode="exact", hvp="fwdrev")
    model.scale = F.softplus(raw)  # after the constructor: backward's checks see it
    with pytest.raises(TypeError, match=r"Invalid inner_loss"):
        meta.backward(3, mse, task, task)
    with pytest.raises(ValueError, match=r"its buffer 'scale' was computed from one of the outer "
                                         r"optimizer's tensors"):
        meta.backward(mse, mse, task, task)
    model.scale = torch.tensor(1.0)  # raw is still held and not adapted: forward-over-reverse refuses it
    with pytest.raises(ValueError, match=r"Invalid hvp: 'fwdrev'"):
        meta.backward(mse, mse, task, task)
    assert all(p.grad is None for p in params)
