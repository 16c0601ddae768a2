"""The state snapshot of ``tests/snapshot.py`` detects a change of each item, alone."""
import re

import pytest
import torch
from torch import nn

import torch_ufom
from snapshot import assert_unchanged, capture, changed_items


def mse(f, batch):
    x, y = batch
    return ((f(x) - y) ** 2).mean()


def build():
    """A model with buffers, Adam with state, a loss weight ``w`` held by the
    optimizer, q="auto" statistics with one pending observation, a user generator."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Tanh(), nn.Linear(3, 1))
    w = torch.tensor(1.5, requires_grad=True)
    opt = torch.optim.Adam(list(model.parameters()) + [w], lr=0.01)
    meta = torch_ufom.MetaOptimizer(model, opt, inner_lr=0.1, steps=1, q="auto", q_min=0.5,
                                    generator=torch.Generator().manual_seed(1))
    batch = (torch.randn(4, 2, generator=g), torch.randn(4, 1, generator=g))

    def outer(f, b):
        return w * mse(f, b)

    meta.backward(mse, outer, batch, batch)
    meta.step()
    meta.backward(mse, outer, batch, batch)  # a pending observation and .grad
    w.grad = None
    user = torch.Generator().manual_seed(2)
    return {"model": model, "opt": opt, "meta": meta, "w": w, "user": user}


def bump(t):
    with torch.no_grad():
        t.add_(1)


def clear_grad(c, p):
    """``p.grad = None``, the old ``.grad`` kept alive: the MetaOptimizer's record of the last write,
    which refers to it, stays as it was."""
    c["old .grad"] = p.grad
    p.grad = None


CASES = {
    "parameter '0.weight'": lambda c: bump(c["model"][0].weight),
    "optimizer tensor param_groups[0]['params'][6]": lambda c: bump(c["w"]),
    "buffer '1.running_mean'": lambda c: bump(c["model"][1].running_mean),
    "buffer '1.num_batches_tracked'": lambda c: bump(c["model"][1].num_batches_tracked),
    ".grad of parameter '3.bias'": lambda c: bump(c["model"][3].bias.grad),
    ".grad of parameter '0.bias'": lambda c: clear_grad(c, c["model"][0].bias),
    ".grad of optimizer tensor param_groups[0]['params'][6]":
        lambda c: setattr(c["w"], "grad", torch.zeros(())),
    "outer optimizer state_dict": lambda c: bump(c["opt"].state[c["w"]]["exp_avg"]),
    "CPU generator (global RNG)": lambda c: torch.rand(1),
    "generator 0 (cpu)": lambda c: torch.rand(1, generator=c["user"]),
    "generator 1 (cpu)": lambda c: torch.rand(1, generator=c["meta"].generator),
    "q statistics": lambda c: c["meta"].q_stats.update(q=0.75),
    "pending q observations": lambda c: c["meta"]._observations.pop(),
    "pending task count": lambda c: setattr(c["meta"], "_tasks", c["meta"]._tasks + 1),
    "pending buffers": lambda c: c["meta"]._buffers.append([torch.zeros(3)]),
    "reduced (synchronize ran)": lambda c: setattr(c["meta"], "_reduced", True),
    "holding (tasks wrote .grad)": lambda c: setattr(c["meta"], "_holding", False),
    "carried .grad": lambda c: setattr(c["meta"], "_carried", [(c["w"], torch.zeros(()))]),
    "written .grad (identity, version)": lambda c: c["meta"]._written.__setitem__(
        0, c["meta"]._written[0][:2] + (c["meta"]._written[0][2] + 1,) + c["meta"]._written[0][3:]),
    "zero saved (loaded grad_zero)": lambda c: setattr(c["meta"], "_zero_saved", True),
    "kept .grad (reduction)": lambda c: setattr(c["meta"], "_kept", None),
    "warned: per-task loop reasons": lambda c: c["meta"]._warned_per_task.add("a reason"),
    "warned: edited gradients": lambda c: setattr(c["meta"], "_warned_edited", True),
    "warned: fom gaps": lambda c: c["meta"]._warned_fom_gaps.add("w"),
}


def snap(c):
    return capture(meta=c["meta"], generators=[c["user"]])


def test_nothing_changed_passes_and_every_item_is_captured():
    c = build()
    before = snap(c)
    assert_unchanged(before)
    assert changed_items(before, snap(c)) == []
    for item in CASES:
        assert item in before, item
    assert before[".grad of optimizer tensor param_groups[0]['params'][6]"] is None


@pytest.mark.parametrize("item", list(CASES))
def test_a_change_of_each_item_alone_is_detected_and_named(item):
    c = build()
    before = snap(c)
    CASES[item](c)
    assert changed_items(before, snap(c)) == [item]
    with pytest.raises(AssertionError, match=re.escape(item)):
        assert_unchanged(before)


def test_every_field_the_meta_optimizer_restores_on_error_is_captured():
    # MetaOptimizer._task_state_kept puts back these fields (its _TALLY) when a call raises: each is
    # part of "a refused call changes nothing", so the snapshot holds each (read from the library, so
    # that a field added there and not here fails); the warned-once flags too.
    import snapshot
    from torch_ufom import meta_optimizer
    restored = list(meta_optimizer._TALLY)
    assert len(restored) >= 8 and "_tasks" in restored, restored
    c = build()
    warned = [a for a in vars(c["meta"]) if a.startswith("_warned_")]
    assert warned, sorted(vars(c["meta"]))
    captured = {attr: item for item, attr, _ in snapshot.META_ITEMS}
    before = snap(c)
    for attr in restored + warned + ["_kept"]:
        assert attr in captured, attr
        assert captured[attr] in before and captured[attr] in CASES, attr  # and a change of it is seen


def test_a_renamed_meta_optimizer_field_fails_loudly():
    c = build()
    c["meta"]._reduced_renamed = c["meta"].__dict__.pop("_reduced")
    with pytest.raises(AttributeError, match="_reduced"):
        snap(c)


def test_hyperparameter_of_a_param_group_is_part_of_the_optimizer_state():
    c = build()
    before = snap(c)
    c["opt"].param_groups[0]["lr"] = 0.5
    assert changed_items(before, snap(c)) == ["outer optimizer state_dict"]


def test_nan_equals_nan_but_not_a_number():
    c = build()
    with torch.no_grad():
        c["model"][3].bias.fill_(float("nan"))
    before = snap(c)
    assert_unchanged(before)
    with torch.no_grad():
        c["model"][3].bias.fill_(0.0)
    assert changed_items(before, snap(c)) == ["parameter '3.bias'"]


def test_without_meta_optimizer_model_and_optimizer_are_captured():
    c = build()
    before = capture(model=c["model"], optimizer=c["opt"])
    assert "q statistics" not in before
    bump(c["model"][0].bias)
    assert changed_items(before, before.again()) == ["parameter '0.bias'"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the CUDA generators")
def test_cuda_generator_draw_is_detected():
    c = build()
    before = snap(c)
    torch.rand(1, device="cuda")
    assert changed_items(before, snap(c)) == [f"CUDA generator {torch.cuda.current_device()}"]
