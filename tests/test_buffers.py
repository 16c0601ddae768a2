"""BatchNorm buffers and dropout: exact replay, buffers left alone, track_buffers,
and a run resumed from state_dict."""
import copy

import pytest
import torch
from torch import nn

import torch_ufom
from helpers import rel_err, xent
from devices import DEVICES, deterministic, to


class BNCNN(nn.Module):
    """A tiny CNN with BatchNorm (running statistics) and dropout."""

    def __init__(self, p=0.3):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(p)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        return self.fc(self.drop(torch.tanh(self.bn(self.conv(x)))).flatten(1))


def problem(seed=0, p=0.3):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = BNCNN(p)
    data = [(torch.randn(5, 1, 6, 6, generator=g), torch.randint(0, 4, (5,), generator=g))
            for _ in range(8)]
    return model, data


@pytest.mark.parametrize("mode", ["exact", "ufom"])
@pytest.mark.parametrize("device", DEVICES)
@deterministic()
def test_recompute_checkpoint_and_store_agree_bit_for_bit(mode, device):
    model, data = problem()
    model, data = model.to(device), to(device, data)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    grads = {}
    for memory in ("store", "recompute", "checkpoint"):
        meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                        inner_lr=0.2, steps=6, mode=mode, q=0.5, memory=memory,
                                        slots=2, generator=torch.Generator().manual_seed(4))
        meta.zero_grad()
        meta.backward(xent, xent, data.__getitem__, data[-1], force_truncation=6)
        grads[memory] = [p.grad.clone() for p in model.parameters()]
        assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    for memory in ("recompute", "checkpoint"):
        assert all(torch.equal(a, b) for a, b in zip(grads[memory], grads["store"], strict=True))
    # Dropout is live: another seed gives another estimate.
    other = torch_ufom.hypergrad(model, xent, xent, data.__getitem__, data[-1], steps=6,
                                 inner_lr=0.2, mode=mode, q=0.5, memory="store",
                                 generator=torch.Generator().manual_seed(5))
    assert rel_err(other, grads["store"]) > 1e-6


def test_track_buffers_writes_the_final_statistics_at_step():
    # The statistics as the task's last forward left them: the inner step's, then the outer loss's
    # at the adapted parameters (review KB F1: the query forward's update was dropped, 6.4e-2 off a
    # hand-written loop; a MAML++ per-step BatchNorm never trained its last step's statistics).
    model, data = problem(1, p=0.0)
    expected = copy.deepcopy(model)
    grads = torch.autograd.grad(xent(expected, data[0]), list(expected.parameters()))  # steps=1
    with torch.no_grad():
        for p, g in zip(expected.parameters(), grads):
            p.sub_(0.1 * g)
        expected(data[1][0])  # the outer loss's forward
    before = {n: b.clone() for n, b in model.named_buffers()}
    for track in (False, True):
        meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.0),
                                        inner_lr=0.1, steps=1, mode="exact", track_buffers=track)
        meta.zero_grad()
        meta.backward(xent, xent, data[0], data[1])
        assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())  # never in backward
        meta.step()
        if not track:
            assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())
    for (n, b), (_, e) in zip(model.named_buffers(), expected.named_buffers(), strict=True):
        assert torch.allclose(b.double(), e.double(), rtol=1e-12, atol=0), n  # float64: 1e-17 apart
    assert int(model.bn.num_batches_tracked) == 2


@pytest.mark.parametrize("vectorise", ["auto", True, False])
def test_track_buffers_under_backward_batch_equals_the_loop(vectorise):
    # Review s36C: backward_batch with track_buffers ran in no test. Losses that write running
    # statistics run task by task (vectorise=True says why), and step() then writes what a loop
    # of backward calls writes, bit for bit.
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2))
    xs, ys, xq, yq = torch.randn(3, 8, 3), torch.randn(3, 8, 2), torch.randn(3, 6, 3), torch.randn(3, 6, 2)

    def loss(f, b):
        return ((f(b[0]) - b[1]) ** 2).mean()
    got = {}
    for how in ("loop", "batch"):
        model = copy.deepcopy(base)
        meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), inner_lr=0.3,
                                        steps=2, mode="exact", track_buffers=True, vectorise=vectorise)
        if how == "loop":
            for i in range(3):
                meta.backward(loss, loss, (xs[i], ys[i]), (xq[i], yq[i]))
        elif vectorise is True:
            with pytest.warns(UserWarning, match="buffers that the losses write"):
                meta.backward_batch(loss, loss, (xs, ys), (xq, yq))
        else:
            meta.backward_batch(loss, loss, (xs, ys), (xq, yq))
        meta.step()
        got[how] = model.state_dict()
    assert not torch.equal(got["loop"]["1.running_mean"], base.state_dict()["1.running_mean"])
    for name, value in got["loop"].items():
        assert torch.equal(got["batch"][name], value), name


def test_resumed_run_reproduces_the_uninterrupted_run():
    def fresh():
        model, data = problem(2)
        outer = torch.optim.Adam(model.parameters(), lr=1e-2)
        meta = torch_ufom.MetaOptimizer(model, outer, steps=3, mode="ufom", q=0.3,
                                        inner=torch_ufom.inner.SGD(0.1, momentum=0.9),
                                        generator=torch.Generator().manual_seed(9))
        return model, data, meta

    def train(model, data, meta, outer_steps, start):
        for i in range(start, start + outer_steps):
            meta.zero_grad()
            for t in range(2):
                a, b = (2 * i + t) % 7, (2 * i + t + 1) % 7
                meta.backward(xent, xent, data[a], data[b])
            meta.step()

    model, data, meta = fresh()
    train(model, data, meta, 12, 0)
    model_a, data, meta_a = fresh()
    train(model_a, data, meta_a, 7, 0)
    saved = copy.deepcopy((model_a.state_dict(), meta_a.state_dict()))  # like torch.save
    model_b, _, meta_b = fresh()
    model_b.load_state_dict(saved[0])
    meta_b.load_state_dict(saved[1])
    train(model_b, data, meta_b, 5, 7)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model_b.parameters(), strict=True))
