"""The benchmarks' problems, each defined once: models, task generators and losses.

The ReLU :func:`mlp` (:data:`MLP_WIDTHS`: the memory and speed benchmarks'
network, with :func:`random_batch`); MAML's sinusoid regression (Finn et al.,
2017: :func:`sinusoid_tasks`, :func:`sinusoid_mlp`); MAML's Omniglot
:func:`conv4` (with :func:`image_tasks`); scikit-learn's bundled digits
(:func:`digit_tasks`, :class:`SmallCNN`); the losses ``(model or functional
model, (x, y)) -> scalar`` and metrics. Every generator draws on the CPU from
an explicit ``torch.Generator``, so a problem is the same on every device.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

MLP_WIDTHS = (64, 320, 320, 10)
AMPLITUDE, PHASE, X_RANGE = (0.1, 5.0), (0.0, math.pi), (-5.0, 5.0)


def seeded(seed: int, build: Callable[[], nn.Module], dtype=torch.float32, device="cpu") -> nn.Module:
    """``build()`` under ``torch.manual_seed(seed)``, restoring the global RNG afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.to(device=device, dtype=dtype)


def mlp(*widths: int) -> nn.Module:
    """``Linear(widths[0], widths[1])-ReLU-...-Linear(widths[-2], widths[-1])``."""
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def random_batch(generator: torch.Generator, batch: int = 64, widths=MLP_WIDTHS,
                 dtype=torch.float32, device="cpu") -> Tuple[Tensor, Tensor]:
    """Random inputs ``(batch, widths[0])`` and labels in ``0..widths[-1]-1``."""
    x = torch.randn(batch, widths[0], generator=generator, dtype=dtype)
    y = torch.randint(0, widths[-1], (batch,), generator=generator)
    return x.to(device), y.to(device)


def sinusoid_mlp(hidden: int = 40) -> nn.Module:
    """The MAML sinusoid regressor ``1-hidden-hidden-1`` with ReLU."""
    return mlp(1, hidden, hidden, 1)


def sinusoid_tasks(n: int, support: int, query: int, generator: torch.Generator,
                   dtype=torch.float64, device="cpu") -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``n`` tasks ``y = A sin(x - phi)`` stacked: ``(xs, ys, xq, yq)``, shapes ``(n, support|query, 1)``.

    ``A ~ U[0.1, 5]``, ``phi ~ U[0, pi]``, ``x ~ U[-5, 5]``, drawn in float64
    from ``generator``, then cast and moved.
    """
    def uniform(shape, lo_hi):
        lo, hi = lo_hi
        return lo + (hi - lo) * torch.rand(shape, generator=generator, dtype=torch.float64)

    amp, phase = uniform((n, 1, 1), AMPLITUDE), uniform((n, 1, 1), PHASE)
    xs, xq = uniform((n, support, 1), X_RANGE), uniform((n, query, 1), X_RANGE)
    out = (xs, amp * torch.sin(xs - phase), xq, amp * torch.sin(xq - phase))
    return tuple(t.to(device=device, dtype=dtype) for t in out)


def conv4(ways: int = 5, track_running_stats: bool = True, channels: int = 64) -> nn.Module:
    """MAML's Omniglot network on ``(batch, 1, 28, 28)`` images.

    Four blocks of ``Conv2d(channels, 3x3, padding=1)``, ``BatchNorm2d``,
    ``ReLU``, ``MaxPool2d(2)`` (28 -> 14 -> 7 -> 3 -> 1), then ``Linear`` to
    ``ways`` classes. ``track_running_stats=False`` gives BatchNorm without
    running statistics (batch statistics in train and eval mode, as in
    pytorch-maml and learn2learn), a model without buffers.
    """
    blocks, width = [], 1
    for _ in range(4):
        blocks += [nn.Conv2d(width, channels, 3, padding=1),
                   nn.BatchNorm2d(channels, track_running_stats=track_running_stats),
                   nn.ReLU(), nn.MaxPool2d(2)]
        width = channels
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(channels, ways))


def image_tasks(n: int, ways: int, shots: int, generator: torch.Generator, dtype=torch.float32,
                device="cpu") -> Tuple[Tensor, Tensor]:
    """``n`` tasks of ``ways * shots`` random 1x28x28 images: ``(x, y)``, ``x`` of shape
    ``(n, ways * shots, 1, 28, 28)``, labels ``0..ways-1`` (``shots`` each)."""
    x = torch.rand(n, ways * shots, 1, 28, 28, generator=generator, dtype=dtype)
    y = torch.arange(ways).repeat_interleave(shots).expand(n, -1).contiguous()
    return x.to(device), y.to(device)


def load_digits(dtype=torch.float32) -> Tuple[Tensor, Tensor]:
    """scikit-learn's digits (bundled, nothing downloaded): ``(n, 64)`` images (pixels / 16) and labels."""
    from sklearn.datasets import load_digits as load
    data = load()
    return torch.as_tensor(data.data, dtype=dtype) / 16.0, torch.as_tensor(data.target, dtype=torch.int64)


def load_digits_by_class(dtype=torch.float32) -> Dict[int, Tensor]:
    """:func:`load_digits` as ``{class: (n, 64) images}``."""
    x, y = load_digits(dtype)
    return {c: x[y == c] for c in range(10)}


def digit_tasks(by_class: Dict[int, Tensor], classes: Sequence[int], n: int, ways: int, shots: int,
                query: int, generator: torch.Generator, device="cpu"):
    """``n`` N-way K-shot tasks from ``classes``: ``(xs, ys, xq, yq)`` stacked over tasks.

    Per task: ``ways`` classes drawn without replacement and labelled
    ``0..ways-1`` in drawn order, ``shots`` support and ``query`` query images
    per class, without replacement within the task.
    """
    if ways > len(classes):
        raise ValueError(f"Invalid ways: {ways} (the split has {len(classes)} classes)")
    out = []
    for _ in range(n):
        parts = []
        for label, i in enumerate(torch.randperm(len(classes), generator=generator)[:ways].tolist()):
            pool = by_class[classes[i]]
            if shots + query > len(pool):
                raise ValueError(f"Invalid shots + query: {shots + query} > {len(pool)} images of class "
                                 f"{classes[i]}")
            idx = torch.randperm(len(pool), generator=generator)[:shots + query]
            parts.append((pool[idx[:shots]], torch.full((shots,), label), pool[idx[shots:]],
                          torch.full((query,), label)))
        out.append([torch.cat(p) for p in zip(*parts)])
    return tuple(torch.stack(t).to(device) for t in zip(*out))


def task_pairs(stacked: Sequence[Tensor]) -> List[Tuple[Tuple[Tensor, Tensor], Tuple[Tensor, Tensor]]]:
    """Stacked tasks ``(xs, ys, xq, yq)`` as ``[(support, query), ...]``."""
    xs, ys, xq, yq = stacked
    return [((xs[i], ys[i]), (xq[i], yq[i])) for i in range(xs.shape[0])]


class SmallCNN(nn.Module):
    """Two 3x3 convolutions (16 channels, ReLU, 2x2 max pooling) and a linear layer, on 8x8 digits."""

    def __init__(self, ways: int, channels: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(channels * 2 * 2, ways)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of ``x`` (``(batch, 64)`` pixels)."""
        return self.head(self.features(x.reshape(-1, 1, 8, 8)).flatten(1))


def mse(f, batch) -> Tensor:
    """Mean squared error of ``f`` on ``batch = (x, y)``, written out: ``F.mse_loss`` has no
    forward-over-reverse formula in torch 2.13."""
    x, y = batch
    return ((f(x) - y) ** 2).mean()


def xent(f, batch) -> Tensor:
    """Cross-entropy of ``f`` on ``batch = (x, y)``."""
    x, y = batch
    return nn.functional.cross_entropy(f(x), y)


def pred_mse(pred: Tensor, y: Tensor) -> Tensor:
    """Mean squared error of predictions."""
    return ((pred - y) ** 2).mean()


def accuracy(logits: Tensor, y: Tensor) -> Tensor:
    """The share of correct arg-max predictions."""
    return (logits.argmax(-1) == y).to(logits.dtype).mean()
