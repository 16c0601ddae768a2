"""The conformance zoo: small float64 models of every kind users bring.

Each :class:`Kind` builds a :class:`Problem` (a module, the inner and outer
losses and a meta-batch of ``TASKS`` stacked tasks) from a fixed seed, without
touching the global random state. The flags of a kind say which refusals and
fallbacks the conformance matrix allows for it (issue 10): forward-over-reverse
may refuse modules with buffers or operators without a forward-mode formula,
and the vectorised path may fall back to the per-task loop on running
statistics and RNNs. Nothing else may refuse or fall back.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

TASKS = 3  # tasks in a meta-batch
N = 4  # examples in a task's support or query batch
DTYPE = torch.float64


@dataclass
class Problem:
    """One kind's module, losses and stacked tasks (leading task dimension)."""

    model: nn.Module
    inner_loss: Callable
    outer_loss: Callable
    supports: Any
    queries: Any

    def task(self, i: int) -> Tuple[Any, Any]:
        """Task ``i``'s ``(support, query)``, in the same container types."""
        return task_of(self.supports, i), task_of(self.queries, i)


@dataclass
class Kind:
    """A model kind of the zoo and what the matrix allows it.

    Attributes:
        name: the row name in the table.
        build: ``() -> Problem``, deterministic.
        about: one line for the table.
        buffers: the module has buffers.
        writes_buffers: its losses write them (running statistics in train mode):
            ``hvp="fwdrev"`` refuses, with the library's sentence for it.
        running_stats: BatchNorm running statistics (the vectorised path may fall back).
        rnn: an RNN (the vectorised path may fall back: no batching rule).
        no_forward_ad: an operator without a forward-mode formula may make
            ``hvp="fwdrev"`` refuse, with torch's own error for it (the text says which).
        must_refuse_fwdrev: a callable returning True when torch lacks the
            formula, so that fwdrev must refuse its exact sweep (not only may).
        random: dropout is active: the oracle cannot replay the library's
            random streams; store, recompute and checkpoint must agree bit for bit.
        attention: the oracle runs under the math attention kernel.
        wrong_under_vmap: vmap differentiates an operation wrongly: the
            vectorised path must fall back (the text says which).
    """

    name: str
    build: Callable[[], Problem]
    about: str
    buffers: bool = False
    writes_buffers: bool = False
    running_stats: bool = False
    rnn: bool = False
    no_forward_ad: str = ""
    must_refuse_fwdrev: Callable[[], bool] = lambda: False
    random: bool = False
    attention: bool = False
    wrong_under_vmap: str = ""


def task_of(tree: Any, i: int) -> Any:
    """Task ``i`` of stacked tasks (a tensor, or a list, tuple or dict of them)."""
    if isinstance(tree, Mapping):
        return {k: task_of(v, i) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(task_of(v, i) for v in tree)
    return tree[i]


# -- data and losses -------------------------------------------------------------------------

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=DTYPE)


def _regression(g, *x_shape, out=2):
    return _randn(g, TASKS, N, *x_shape), _randn(g, TASKS, N, out)


def _classes(g, *x_shape, classes=3):
    return _randn(g, TASKS, N, *x_shape), torch.randint(0, classes, (TASKS, N), generator=g)


def sq_loss(f, batch):
    """Mean squared error written with elementwise ops (they all have forward-mode formulas)."""
    x, y = batch
    return ((f(x) - y) ** 2).mean()


def xent(f, batch):
    """Cross-entropy of a classifier."""
    x, y = batch
    return F.cross_entropy(f(x), y)


def mse_loss(f, batch):
    """``F.mse_loss``: no forward-over-reverse formula in torch 2.13."""
    x, y = batch
    return F.mse_loss(f(x), y)


def mse_loss_lacks_forward_ad() -> bool:
    """Whether ``torch.func.jvp`` of ``torch.func.grad`` of ``F.mse_loss`` fails in this torch."""
    w = torch.ones(2, dtype=DTYPE)
    x = torch.ones(3, 2, dtype=DTYPE)
    try:
        torch.func.jvp(torch.func.grad(lambda w: F.mse_loss(x * w, x)), (w,), (w,))
    except RuntimeError:
        return True
    return False


def _build(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    """``make()`` under a seeded, forked global RNG, in float64."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().to(DTYPE)


# -- the kinds ---------------------------------------------------------------------------------

def mlp(seed=1, loss=sq_loss):
    model = _build(seed, lambda: nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)))
    g = _gen(seed)
    return Problem(model, loss, loss, _regression(g, 3), _regression(g, 3))


class ConvNet(nn.Module):
    """conv -> normalisation -> tanh -> linear on 1x5x5 images, 3 classes."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.norm = norm
        self.head = nn.Linear(3 * 3 * 3, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.conv(x))).flatten(1))


def conv(norm: Callable[[], nn.Module], seed=2, train=True):
    def build():
        model = _build(seed, lambda: ConvNet(norm()))
        model.train(train)
        g = _gen(seed)
        return Problem(model, xent, xent, _classes(g, 1, 5, 5), _classes(g, 1, 5, 5))
    return build


class NormMLP(nn.Module):
    """linear -> normalisation -> tanh -> linear."""

    def __init__(self, norm: nn.Module, width: int = 6):
        super().__init__()
        self.inp, self.norm, self.out = nn.Linear(3, width), norm, nn.Linear(width, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x))))


def norm_mlp(norm: Callable[[], nn.Module], seed=3, width=6):
    def build():
        model = _build(seed, lambda: NormMLP(norm(), width))
        g = _gen(seed)
        return Problem(model, sq_loss, sq_loss, _regression(g, 3), _regression(g, 3))
    return build


class Recurrent(nn.Module):
    """An RNN over a length-4 sequence, then a linear head on the last output."""

    def __init__(self, cell: type):
        super().__init__()
        self.rnn, self.head = cell(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def recurrent(cell: type, seed=4):
    def build():
        model = _build(seed, lambda: Recurrent(cell))
        g = _gen(seed)
        return Problem(model, sq_loss, sq_loss, _regression(g, 4, 3), _regression(g, 4, 3))
    return build


class Encoder(nn.Module):
    """``nn.TransformerEncoderLayer`` (batch_first, default attention kernel), mean-pooled."""

    def __init__(self, dropout: float):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=dropout, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


def transformer(dropout: float, seed=5):
    def build():
        model = _build(seed, lambda: Encoder(dropout))
        g = _gen(seed)
        return Problem(model, sq_loss, sq_loss, _regression(g, 3, 4), _regression(g, 3, 4))
    return build


class Tied(nn.Module):
    """Two layers sharing one weight (``b.weight is a.weight``)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


def tied(seed=6):
    model = _build(seed, Tied)
    g = _gen(seed)
    return Problem(model, sq_loss, sq_loss, _regression(g, 3), _regression(g, 3))


class Symmetric(nn.Module):
    """A parametrization: ``W = X + X^T`` (every entry of ``X`` gets a gradient)."""

    def forward(self, X):
        return X + X.T


def parametrized(seed=7):
    def make():
        model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
        parametrize.register_parametrization(model[0], "weight", Symmetric())
        return model
    model = _build(seed, make)
    g = _gen(seed)
    return Problem(model, sq_loss, sq_loss, _regression(g, 3), _regression(g, 3))


def frozen(seed=8):
    model = _build(seed, lambda: nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)))
    model[0].weight.requires_grad_(False)
    g = _gen(seed)
    return Problem(model, sq_loss, sq_loss, _regression(g, 3), _regression(g, 3))


class Scaled(nn.Module):
    """A module called with a keyword argument: ``model(x=..., scale=...)``."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(3, 5), nn.Linear(5, 2)

    def forward(self, x, *, scale):
        return self.out(torch.tanh(self.inp(x) * scale))


def dict_loss(f, batch):
    """A loss reading a dict batch and calling the module with keyword arguments."""
    return ((f(x=batch["x"], scale=batch["scale"]) - batch["y"]) ** 2).mean()


def keyword_dict(seed=9):
    model = _build(seed, Scaled)
    g = _gen(seed)

    def batch():
        x, y = _regression(g, 3)
        return {"x": x, "scale": 1 + _randn(g, TASKS, N, 1).abs(), "y": y}
    return Problem(model, dict_loss, dict_loss, batch(), batch())


def list_batch(seed=10):
    """A batch given as a plain list ``[x, y]`` (DataLoader style): ONE batch, reused every step."""
    model = _build(seed, lambda: nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)))
    g = _gen(seed)
    return Problem(model, sq_loss, sq_loss, list(_regression(g, 3)), list(_regression(g, 3)))


class Positions(nn.Module):
    """An integer buffer read by the forward pass: position ids into an embedding."""

    def __init__(self):
        super().__init__()
        self.inp, self.pos, self.head = nn.Linear(3, 4), nn.Embedding(4, 4), nn.Linear(4, 2)
        self.register_buffer("position_ids", torch.arange(4))

    def forward(self, x):
        return self.head(torch.tanh(self.inp(x) + self.pos(self.position_ids)).mean(-2))


def int_buffer(seed=11):
    model = _build(seed, Positions)
    g = _gen(seed)
    return Problem(model, sq_loss, sq_loss, _regression(g, 4, 3), _regression(g, 4, 3))


def penalty(fm, which):
    """An L2 penalty on the module's own (current inner) parameters."""
    params = fm.parameters() if which == "parameters" else (p for _, p in fm.named_parameters())
    return 0.05 * sum((p ** 2).sum() for p in params)


def l2_penalty(seed=12):
    model = _build(seed, lambda: nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)))
    g = _gen(seed)

    def inner(f, b):
        return sq_loss(f, b) + penalty(f, "parameters")

    def outer(f, b):
        return sq_loss(f, b) + penalty(f, "named_parameters")
    return Problem(model, inner, outer, _regression(g, 3), _regression(g, 3))


def dropout(seed=13):
    model = _build(seed, lambda: nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.3),
                                               nn.Linear(6, 2)))
    g = _gen(seed)
    return Problem(model, sq_loss, sq_loss, _regression(g, 3), _regression(g, 3))


class Tokens(nn.Module):
    """Token ids through ``nn.Embedding(padding_idx=0)``, mean-pooled, then a linear head."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(5, 4, padding_idx=0), nn.Linear(4, 2)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)).mean(-2))


def padding_embedding(seed=15):
    model = _build(seed, Tokens)
    g = _gen(seed)

    def batch():  # ids with padding (0) in every task
        return torch.randint(0, 5, (TASKS, N, 3), generator=g), _randn(g, TASKS, N, 2)
    return Problem(model, sq_loss, sq_loss, batch(), batch())


KINDS = [
    Kind("mlp", mlp, "Linear-Tanh-Linear"),
    Kind("bn_train", conv(lambda: nn.BatchNorm2d(3)), "conv + BatchNorm2d, running stats, train mode",
         buffers=True, writes_buffers=True, running_stats=True),
    Kind("bn_eval", conv(lambda: nn.BatchNorm2d(3), train=False),
         "conv + BatchNorm2d, running stats, eval mode", buffers=True, running_stats=True),
    Kind("bn_nostats", conv(lambda: nn.BatchNorm2d(3, track_running_stats=False)),
         "conv + BatchNorm2d(track_running_stats=False)"),
    Kind("layernorm", norm_mlp(lambda: nn.LayerNorm(6)), "LayerNorm, affine"),
    Kind("layernorm_plain", norm_mlp(lambda: nn.LayerNorm(6, elementwise_affine=False)),
         "LayerNorm(elementwise_affine=False)"),
    Kind("instancenorm", conv(lambda: nn.InstanceNorm2d(3, affine=True)),
         "conv + InstanceNorm2d(affine=True)"),
    Kind("groupnorm", norm_mlp(lambda: nn.GroupNorm(2, 6)), "GroupNorm(2, 6)"),
    Kind("lstm", recurrent(nn.LSTM), "LSTM, last output", rnn=True),
    Kind("gru", recurrent(nn.GRU), "GRU, last output", rnn=True),
    Kind("transformer", transformer(0.0),
         "TransformerEncoderLayer(dropout=0, batch_first), default attention kernel",
         attention=True, no_forward_ad="the CPU flash-attention kernel has no forward-mode formula"),
    Kind("padding_embedding", padding_embedding, "nn.Embedding(padding_idx=0) on token ids",
         wrong_under_vmap="vmap gives the padding row a gradient"),
    Kind("tied", tied, "two layers sharing one weight"),
    Kind("parametrized", parametrized, "torch.nn.utils.parametrize (W = X + X^T)"),
    Kind("frozen", frozen, "a parameter with requires_grad=False"),
    Kind("keyword_dict", keyword_dict, "dict batches, module called with keyword arguments"),
    Kind("list_batch", list_batch, "a batch given as a plain list [x, y]"),
    Kind("int_buffer", int_buffer, "an integer buffer (position ids) read by forward", buffers=True),
    Kind("l2_penalty", l2_penalty, "losses reading fmodel.parameters() / named_parameters()"),
    Kind("mse_loss", lambda: mlp(14, mse_loss), "F.mse_loss (no forward-over-reverse formula)",
         no_forward_ad="F.mse_loss has no forward-over-reverse formula",
         must_refuse_fwdrev=mse_loss_lacks_forward_ad),
    Kind("dropout", dropout, "Dropout(0.3): store, recompute, checkpoint bit for bit", random=True),
    Kind("transformer_dropout", transformer(0.1),
         "TransformerEncoderLayer(dropout=0.1): store, recompute, checkpoint bit for bit",
         random=True, attention=True,
         no_forward_ad="the CPU flash-attention kernel has no forward-mode formula; per task, "
                       "attention dropout draws other masks under torch.func"),
]

KIND = {k.name: k for k in KINDS}
