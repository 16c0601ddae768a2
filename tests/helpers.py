"""Shared test helpers: small float64 problems and the comparison helper (imported by the
tests; conftest.py only holds fixtures)."""
import torch
from torch import nn


def rel_err(got, ref):
    """Largest relative error over a list of tensors (absolute where the reference is 0)."""
    worst = 0.0
    for a, b in zip(got, ref, strict=True):
        assert a is not None and a.shape == b.shape, (a, b.shape)
        den = float(b.norm())
        err = float((a - b).norm())
        worst = max(worst, err / den if den > 0 else err)
    return worst


def mse(f, batch):
    x, y = batch
    return ((f(x) - y) ** 2).mean()


def xent(f, batch):
    x, y = batch
    return nn.functional.cross_entropy(f(x), y)


def mlp_problem(seed=0):
    """An MLP regressor with smooth activations and a regression task."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Softplus(), nn.Linear(8, 2))
    data = [(torch.randn(6, 3, generator=g), torch.randn(6, 2, generator=g)) for _ in range(26)]
    return model, mse, data


class UnitRows(nn.Module):
    """A parametrization that scales a weight's rows to unit norm, written out: the tests'
    parametrized layer (torch's own ``weight_norm`` has a wrong second derivative, which
    exact sweeps refuse)."""

    def forward(self, v):
        return v / v.norm(dim=1, keepdim=True)


def unit_rows(layer: nn.Module) -> nn.Module:
    """``layer`` with its weight parametrized by :class:`UnitRows`."""
    from torch.nn.utils import parametrize
    parametrize.register_parametrization(layer, "weight", UnitRows())
    return layer


class SmallCNN(nn.Module):
    """A tiny convolutional classifier for 6x6 one-channel images."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def cnn_problem(seed=0):
    """The CNN classifier with a 4-way classification task."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallCNN()
    data = [(torch.randn(5, 1, 6, 6, generator=g), torch.randint(0, 4, (5,), generator=g))
            for _ in range(26)]
    return model, xent, data


class TwoHeads(nn.Module):
    """A shared body and two heads; the caller picks the head."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(3, 4)
        self.heads = nn.ModuleList([nn.Linear(4, 2) for _ in range(2)])

    def forward(self, x, head=0):
        return self.heads[head](torch.tanh(self.body(x)))


def flagged_pinn(f, b):
    """An inner loss on ``(flag, x, y)`` batches: a plain fit where the flag is 0, with a PINN's
    du/dx residual (``torch.autograd.grad`` inside the loss) where it is 1."""
    flag, xx, yy = b
    u = f(xx)
    if flag.item() == 0:
        return ((u - yy) ** 2).mean()
    du, = torch.autograd.grad(u.sum(), xx, create_graph=True)
    return ((du - 2 * torch.cos(2 * xx)) ** 2).mean() + ((u - yy) ** 2).mean()


def flagged_pinn_outer(f, b):
    return ((f(b[1]) - b[2]) ** 2).mean()
