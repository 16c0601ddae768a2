"""The GPU check (issue 14): one prepared command, one report.

Run from the repository root (``docs/gpu.md`` says how on the offline GPU machine)::

    python tests/gpu_check.py --device cuda --out results/gpu --time-limit 240
    python tests/gpu_check.py --device cpu --tiny --out /tmp/gpu-tiny     # the test suite's run

Parts, in order, each with its budget at full size on one H200 (``BUDGETS``; an
item that would start after its part's budget or the ``--time-limit`` is
recorded as skipped, so a run cut short still reports what it did):

* ``exactness`` (float64): ``exact`` and ``fom`` against the brute-force oracle
  (``tests/oracle.py``) to ``1e-9`` for the 64-320-320-10 MLP, conv4 with
  BatchNorm with and without running statistics and a TransformerEncoderLayer
  (dropout 0, the oracle under the math attention kernel), under store,
  recompute and checkpoint; ``backward_batch`` against the per-task loop; a
  TransformerEncoderLayer with dropout 0.1 in float32: store, recompute and
  checkpoint bit for bit.
* ``replay`` (float32, ``torch.use_deterministic_algorithms(True)``): dropout
  replays bit-identical under store, recompute and checkpoint, the same seed
  twice identical, another seed different.
* ``sync``: host synchronisations per task: ``torch.cuda.set_sync_debug_mode``
  warnings on CUDA, and everywhere a ``TorchDispatchMode`` counting
  ``aten._local_scalar_dense``, ``aten.nonzero`` and copies to the CPU.
* ``precision``: bf16 autocast and fp16 autocast with a ``GradScaler`` around
  the losses: does each run, and the hypergradient's distance from float64's.
* ``memory``: peak ``torch.cuda.max_memory_allocated`` above the baseline for
  ``fom``, ``ufom`` (q=0.1, its exact branch: the peak over draws), ``exact``
  with ``slots=8``, with the default memory setting and with store, and
  ``higher``'s exact unroll, at the ``memory_steps`` (conv4 and the MLP).
  Flatness: with ``slots=8`` the peak at the largest ``steps`` is within 3
  state copies of the peak at the middle one. On the CPU no peak is measured.
* ``speed``: time per outer step (CUDA events after a warm-up; on the CPU
  ``perf_counter``), median of interleaved rounds, of ``fom``, the hand-written
  in-place first-order loop (issue 13), ``exact`` (default and store) and
  ``higher`` on conv4 and the MLP; ``backward_batch`` against the per-task loop
  at meta-batch 32 on conv4 (without running statistics: vectorisable).

Only ``exactness``, ``replay`` and flatness gate the exit status (flatness runs
right after the peaks it compares, whatever the clock): 1 if any failed (or
raised), else 3 if one was not run for lack of time, else 0 (2: no CUDA); the
other parts report figures. ``report.json``
and ``report.md`` in ``--out`` are rewritten after every item.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (replay)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run torch_ufom and benchmarks from this tree
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import torch_ufom  # noqa: E402
from benchmarks.problems import conv4, image_tasks, mlp, random_batch, seeded, xent  # noqa: E402
from devices import deterministic  # noqa: E402
from oracle import brute_force  # noqa: E402

# sync and precision (issue 13's synchronisations, autocast) before memory and speed, whose
# items are the longest: the run's --time-limit cuts the last part run.
PARTS = ("exactness", "replay", "sync", "precision", "memory", "speed")
GATED = ("exactness", "replay")  # every check of these parts gates; in memory, flatness does
BUDGETS = {"exactness": 45, "replay": 20, "memory": 90, "speed": 60, "sync": 10, "precision": 15}
TOLERANCE = 1e-9  # exact and fom against the oracle, float64
FLOOR = 1e-3  # rel_err: a tensor's error relative to at least this fraction of the whole
FLAT_COPIES = 3  # slots=8: peak at the largest steps within this many state copies of the middle's
LR = 0.05  # inner SGD rate
MARKS = {"pass": "ok", "fail": "FAIL", "error": "ERROR", "skip": "skip", "n/a": "n/a"}  # printed


@dataclass
class Size:
    """The sizes of one run (``--tiny`` for the test suite; ``--set name=value`` overrides one)."""

    mlp_widths: Tuple[int, ...] = (64, 320, 320, 10)
    mlp_batch: int = 64
    conv_channels: int = 64
    ways: int = 5
    shots: int = 1
    enc_width: int = 64
    enc_heads: int = 4
    enc_ff: int = 128
    enc_seq: int = 16
    enc_batch: int = 8
    exact_steps: int = 5
    batch_tasks: int = 8
    memory_steps: Tuple[int, ...] = (10, 100, 1000)
    speed_steps: Tuple[int, ...] = (5, 100)
    rounds: int = 5
    meta_batch: int = 32
    batch_steps: int = 5
    sync_tasks: int = 4
    sync_steps: int = 5
    precision_steps: int = 5


TINY = Size(mlp_widths=(8, 16, 16, 4), mlp_batch=8, conv_channels=4, ways=3, enc_width=8,
            enc_heads=2, enc_ff=16, enc_seq=5, enc_batch=4, exact_steps=3, batch_tasks=3,
            memory_steps=(2, 4, 8), speed_steps=(2, 4), rounds=2, meta_batch=4, batch_steps=2,
            sync_tasks=2, sync_steps=3, precision_steps=3)


# -- the report ------------------------------------------------------------------------------

class Report:
    """Checks and figures, rewritten to ``report.json`` and ``report.md`` after every item."""

    def __init__(self, out: Path, meta: Dict[str, Any]):
        self.out, self.meta = out, meta
        self.checks: List[Dict[str, Any]] = []
        self.parts: Dict[str, Dict[str, Any]] = {}
        out.mkdir(parents=True, exist_ok=True)
        self.write()

    def add(self, part: str, name: str, status: str, gated: bool = False, **figures) -> Dict:
        """Record one item: ``status`` is ``pass``, ``fail``, ``error`` (it raised), ``skip`` (not
        run: out of time), ``n/a`` (cannot be measured on this device) or ``report`` (figures)."""
        row = {"part": part, "name": name, "status": status, "gated": gated, **figures}
        self.checks.append(row)
        mark = MARKS.get(status, "--")
        print(f"[{part}] {mark:5} {name} {_brief(figures)}", flush=True)
        self.write()
        return row

    def failed(self) -> List[Dict]:
        """The gated items that failed or raised."""
        return [c for c in self.checks if c["gated"] and c["status"] in ("fail", "error")]

    def skipped(self) -> List[Dict]:
        """The gated items not run for lack of time."""
        return [c for c in self.checks if c["gated"] and c["status"] == "skip"]

    def write(self) -> None:
        """Rewrite both files (each atomically)."""
        data = {"meta": self.meta, "parts": self.parts, "checks": self.checks,
                "failed": len(self.failed()), "gated_skipped": len(self.skipped())}
        _atomic(self.out / "report.json", json.dumps(data, indent=1, default=str))
        _atomic(self.out / "report.md", markdown(data))


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _brief(figures: Dict) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in figures.items() if k not in ("traceback",))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def markdown(data: Dict) -> str:
    """The Markdown report of ``data`` (what ``report.json`` holds)."""
    m = data["meta"]
    lines = [f"# GPU check: {m['device_name']}", "",
             f"commit `{m['commit']}`, torch {m['torch']}, CUDA {m['cuda']}, Python {m['python']}, "
             f"started {m['started']}, arguments `{' '.join(m['argv'])}`", ""]
    done = m.get("finished")
    verdict = ("FAILED: " + ", ".join(f"{c['part']}/{c['name']}" for c in _failed(data))
               if data["failed"] else "no gated check failed")
    if data["gated_skipped"]:
        verdict += f"; INCOMPLETE: {data['gated_skipped']} gated check(s) not run for lack of time"
    lines += [f"**{verdict}**" + ("" if done else " (run in progress or cut short)"), ""]
    skipped = [c for c in data["checks"] if c["status"] == "skip"]
    if skipped:
        lines += [f"{len(skipped)} item(s) skipped: see the tables.", ""]
    for part in PARTS:
        rows = [c for c in data["checks"] if c["part"] == part]
        info = data["parts"].get(part)
        if not rows and not info:
            continue
        head = f"## {part}"
        if info:
            head += f" (budget {info['budget_s']} s, took {info.get('seconds', '?')} s)"
        lines += [head, "", "| item | status | figures |", "|---|---|---|"]
        for c in rows:
            figs = {k: v for k, v in c.items()
                    if k not in ("part", "name", "status", "gated", "traceback")}
            status = c["status"] + (" (gated)" if c["gated"] else "")
            lines.append(f"| {c['name']} | {status} | {_brief(figs).replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


def _failed(data: Dict) -> List[Dict]:
    return [c for c in data["checks"] if c["gated"] and c["status"] in ("fail", "error")]


class Part:
    """One part's clock: ``over()`` once its budget or the run's time limit is spent."""

    def __init__(self, report: Report, name: str, budget: float, deadline: Optional[float]):
        self.report, self.name, self.budget, self.deadline = report, name, budget, deadline
        self.start = time.perf_counter()
        report.parts[name] = {"budget_s": budget}

    def over(self) -> Optional[str]:
        """Why no further item may start (``None`` while one may)."""
        now = time.perf_counter()
        if self.deadline is not None and now > self.deadline:
            return "the run's --time-limit is spent"
        if now - self.start > self.budget:
            return f"over the part's budget of {self.budget} s"
        return None

    def item(self, name: str, fn: Callable[[], Dict], gated: bool = False,
             timed: bool = True) -> Optional[Dict]:
        """Run ``fn`` (returning ``{"status": ..., **figures}``) unless over budget (``timed=False``:
        whatever the clock, for arithmetic on what ran); an exception is recorded as ``error``
        with its message."""
        why = self.over() if timed else None
        if why:
            self.report.add(self.name, name, "skip", gated, reason=why)
            return None
        t = time.perf_counter()
        try:
            out = fn()
        except Exception as err:  # a raising check is reported, and gates like a failure
            return self.report.add(self.name, name, "error", gated, error=f"{type(err).__name__}: {err}",
                                   seconds=round(time.perf_counter() - t, 3),
                                   traceback=traceback.format_exc(limit=6))
        status = out.pop("status")
        return self.report.add(self.name, name, status, gated, seconds=round(time.perf_counter() - t, 3),
                               **out)

    def close(self) -> None:
        self.report.parts[self.name]["seconds"] = round(time.perf_counter() - self.start, 1)
        self.report.write()


# -- problems --------------------------------------------------------------------------------

class Recurrent(nn.Module):
    """A two-layer ``nn.LSTM`` (batch_first), its last step through a linear head: on CUDA cuDNN's
    RNN kernels, which have no double backward (the library's exact sweeps turn cuDNN off)."""

    def __init__(self, width: int, out: int = 2):
        super().__init__()
        self.rnn = nn.LSTM(width, width, num_layers=2, batch_first=True)
        self.head = nn.Linear(width, out)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class Encoder(nn.Module):
    """``nn.TransformerEncoderLayer`` (batch_first), mean-pooled, then a linear head."""

    def __init__(self, width: int, heads: int, ff: int, dropout: float, out: int = 2):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(width, heads, ff, dropout=dropout, batch_first=True)
        self.head = nn.Linear(width, out)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


def sq_loss(f, batch):
    """Mean squared error, written with elementwise operations."""
    x, y = batch
    return ((f(x) - y) ** 2).mean()


@dataclass
class Task:
    """A model, its loss and ``n`` tasks stacked along a leading dimension."""

    model: nn.Module
    loss: Callable
    supports: Tuple[torch.Tensor, torch.Tensor]
    queries: Tuple[torch.Tensor, torch.Tensor]
    attention: bool = False
    recurrent: bool = False

    def task(self, i: int = 0):
        """Task ``i``'s ``(support, query)``."""
        return tuple(t[i] for t in self.supports), tuple(t[i] for t in self.queries)


class Problems:
    """The check's problems at one size, dtype and device, each from a fixed seed."""

    def __init__(self, size: Size, device: torch.device):
        self.size, self.device = size, device

    def make(self, name: str, dtype: torch.dtype, n: int = 1, seed: int = 0) -> Task:
        """Problem ``name``: ``mlp``, ``conv4`` (running statistics), ``conv4_nostats``,
        ``conv4_dropout``, ``mlp_dropout``, ``transformer``, ``transformer_dropout`` or ``lstm``."""
        s, dev = self.size, self.device
        g = torch.Generator().manual_seed(1000 + seed)
        if name.startswith("mlp"):
            p = 0.3 if name == "mlp_dropout" else 0.0
            model = seeded(seed, lambda: _with_dropout(mlp(*s.mlp_widths), p), dtype, dev)
            pairs = [random_batch(g, s.mlp_batch, s.mlp_widths, dtype, dev) for _ in range(2 * n)]
            sup, qry = _stack(pairs[:n]), _stack(pairs[n:])
            return Task(model, xent, sup, qry)
        if name.startswith("conv4"):
            stats = name != "conv4_nostats"
            p = 0.2 if name == "conv4_dropout" else 0.0
            model = seeded(seed, lambda: _with_dropout(conv4(s.ways, stats, s.conv_channels), p),
                           dtype, dev)
            return Task(model, xent, image_tasks(n, s.ways, s.shots, g, dtype, dev),
                        image_tasks(n, s.ways, s.shots, g, dtype, dev))
        if name.startswith("transformer"):
            p = 0.1 if name == "transformer_dropout" else 0.0
            model = seeded(seed, lambda: Encoder(s.enc_width, s.enc_heads, s.enc_ff, p), dtype, dev)

            def batch():
                x = torch.randn(n, s.enc_batch, s.enc_seq, s.enc_width, generator=g, dtype=dtype)
                return x.to(dev), torch.randn(n, s.enc_batch, 2, generator=g, dtype=dtype).to(dev)
            return Task(model, sq_loss, batch(), batch(), attention=True)
        if name == "lstm":
            model = seeded(seed, lambda: Recurrent(s.enc_width), dtype, dev)

            def sequences():
                x = torch.randn(n, s.enc_batch, s.enc_seq, s.enc_width, generator=g, dtype=dtype)
                return x.to(dev), torch.randn(n, s.enc_batch, 2, generator=g, dtype=dtype).to(dev)
            return Task(model, sq_loss, sequences(), sequences(), recurrent=True)
        raise ValueError(f"Invalid problem: {name!r}")


def _with_dropout(model: nn.Sequential, p: float) -> nn.Sequential:
    """``model`` with ``Dropout(p)`` before its last layer (unchanged for ``p = 0``)."""
    if p == 0.0:
        return model
    layers = list(model)
    return nn.Sequential(*layers[:-1], nn.Dropout(p), layers[-1])


def _stack(pairs):
    return tuple(torch.stack([pair[k] for pair in pairs]) for k in range(2))


def rel_err(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    """The worst relative error over tensors, as in ``tests/test_conformance.py``: a reference
    tensor below ``FLOOR`` of the whole reference's norm is measured against that fraction
    instead of its own norm. A conv bias just before BatchNorm has an exact gradient of 0: its
    rounding noise (1e-14 of the whole on conv4, more than the zoo's 1e-6 floor allows against
    1e-9) then reads as about 1e-11, and any real error of a tensor still reads as one."""
    got, want = [a.double() for a in got], [b.double() for b in want]
    total = math.sqrt(sum(float(b.norm()) ** 2 for b in want)) or 1.0
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        err = float((a - b).norm())
        if not math.isfinite(err):
            return math.inf
        worst = max(worst, err / max(float(b.norm()), FLOOR * total))
    return worst


def global_err(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    """``|got - want| / |want|`` over all tensors at once."""
    diff = math.sqrt(sum(float((a.double() - b.double()).norm()) ** 2 for a, b in zip(got, want)))
    return diff / (math.sqrt(sum(float(b.double().norm()) ** 2 for b in want)) or 1.0)


def meta_opt(model: nn.Module, steps: int, params=None, generator=None, inner_lr=LR, **kw):
    """A ``MetaOptimizer`` whose outer SGD has rate 0 (hypergradients only)."""
    params = list(model.parameters()) if params is None else params
    return torch_ufom.MetaOptimizer(model, torch.optim.SGD(params, lr=0.0), inner_lr=inner_lr,
                                    steps=steps, generator=generator, **kw)


def grads_of(meta) -> List[torch.Tensor]:
    return [p.grad.detach().clone() for p in meta.meta_parameters()]


def backward(meta, loss, support, query, force=None) -> List[torch.Tensor]:
    """One task's hypergradient through ``meta.backward``, from zero gradients."""
    meta.zero_grad()
    meta.backward(loss, loss, support, query, force_truncation=force)
    return grads_of(meta)


def math_kernel(on: bool):
    """The math attention kernel where the oracle needs it (else nothing)."""
    return sdpa_kernel(SDPBackend.MATH) if on else contextlib.nullcontext()


def no_cudnn(on: bool):
    """cuDNN off where the oracle differentiates an RNN twice (else nothing)."""
    return torch.backends.cudnn.flags(enabled=False) if on else contextlib.nullcontext()


# -- exactness ---------------------------------------------------------------------------------

EXACT_MODELS = ("mlp", "conv4", "conv4_nostats", "transformer", "lstm")
MEMORIES = (("store", {}), ("recompute", {}), ("checkpoint", {"slots": 2}))


def exactness(part: Part, probs: Problems) -> None:
    """``exact`` and ``fom`` against the oracle in float64; ``backward_batch`` against the
    loop; the float32 transformer with dropout bit for bit across memory settings."""
    steps = probs.size.exact_steps
    for name in EXACT_MODELS:
        for mode in ("exact", "fom"):
            part.item(f"{name} {mode} vs oracle", lambda n=name, m=mode: _vs_oracle(probs, n, m, steps),
                      gated=True)
    for name in ("mlp", "conv4_nostats"):
        part.item(f"{name} backward_batch vs per-task loop",
                  lambda n=name: _batch_vs_loop(probs, n, steps), gated=True)
    part.item("transformer_dropout float32 store/recompute/checkpoint",
              lambda: _replays(probs, "transformer_dropout", steps, "exact"), gated=True)


def _vs_oracle(probs: Problems, name: str, mode: str, steps: int) -> Dict:
    t = probs.make(name, torch.float64)
    support, query = t.task()
    lr = torch.tensor(LR, dtype=torch.float64, device=probs.device, requires_grad=True)
    params = list(t.model.parameters()) + [lr]
    k = steps if mode == "exact" else 0
    with math_kernel(t.attention), no_cudnn(t.recurrent):
        want = brute_force(t.model, t.loss, t.loss, lambda j: support, query, steps, lr, params, k)
    errs = {}
    for memory, kw in MEMORIES:
        meta = meta_opt(t.model, steps, params, inner_lr=lr, mode=mode, memory=memory, **kw)
        errs[memory] = rel_err(backward(meta, t.loss, support, query), want)
    worst = max(errs.values())
    return {"status": "pass" if worst < TOLERANCE else "fail", "rel_err": errs, "tol": TOLERANCE}


def _batch_vs_loop(probs: Problems, name: str, steps: int) -> Dict:
    n = probs.size.batch_tasks
    t = probs.make(name, torch.float64, n=n)
    forced = [steps if i % 2 == 0 else 0 for i in range(n)]  # a mixed meta-batch
    # vectorise=True: the vectorised path is under test (on a CPU "auto" may choose the loop).
    meta = meta_opt(t.model, steps, mode="ufom", q=0.5, memory="store", vectorise=True)
    meta.zero_grad()
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        meta.backward_batch(t.loss, t.loss, t.supports, t.queries, force_truncation=forced)
    fell_back = [str(w.message) for w in log if "per-task loop" in str(w.message)]
    got = grads_of(meta)
    meta.zero_grad()
    for i in range(n):
        support, query = t.task(i)
        meta.backward(t.loss, t.loss, support, query, force_truncation=forced[i])
    err = rel_err(got, grads_of(meta))
    return {"status": "pass" if err < TOLERANCE else "fail", "rel_err": err, "tol": TOLERANCE,
            "path": "per-task loop: " + fell_back[0] if fell_back else "vectorised"}


def _replays(probs: Problems, name: str, steps: int, mode: str) -> Dict:
    """Gradients under each memory setting with one seed, store again with that seed and
    store with another seed; ``status`` pass when the first are bit-identical and the
    last differs (dropout is live)."""
    t = probs.make(name, torch.float32)
    support, query = t.task()

    def run(memory, seed, **kw):
        meta = meta_opt(t.model, steps, mode=mode, q=0.5, memory=memory,
                        generator=torch.Generator().manual_seed(seed), **kw)
        return backward(meta, t.loss, support, query, force=steps)

    out = {memory: run(memory, 4, **kw) for memory, kw in MEMORIES}
    again, other = run("store", 4), run("store", 5)
    same = {m: all(torch.equal(a, b) for a, b in zip(g, out["store"])) for m, g in out.items()}
    same["store again"] = all(torch.equal(a, b) for a, b in zip(again, out["store"]))
    live = rel_err(other, out["store"])
    ok = all(same.values()) and live > 0
    return {"status": "pass" if ok else "fail", "bit_identical": same,
            "other_seed_rel_diff": live}


# -- replay --------------------------------------------------------------------------------

REPLAY_MODELS = ("mlp_dropout", "conv4_dropout", "transformer_dropout")


def replay(part: Part, probs: Problems) -> None:
    """Dropout replays bit-identical under deterministic algorithms."""
    steps = probs.size.exact_steps
    with deterministic():
        for name in REPLAY_MODELS:
            for mode in ("exact", "ufom"):
                part.item(f"{name} {mode} deterministic", lambda n=name, m=mode: _replays(probs, n, steps, m),
                          gated=True)


# -- memory and speed: one outer step of each method -----------------------------------------

METHODS = {
    "fom": dict(mode="fom"),
    "ufom": dict(mode="ufom", q=0.1),  # its exact branch (K forced to steps): the peak over draws
    "exact_slots8": dict(mode="exact", slots=8),
    "exact_default": dict(mode="exact"),
    "exact_store": dict(mode="exact", memory="store"),
}


@dataclass
class Row:
    """One outer step's hypergradient by one method; ``prepare`` frees the last one's gradients."""

    run: Callable[[], Any]
    prepare: Callable[[], None] = lambda: None
    meta: Any = None


def make_row(method: str, t: Task, steps: int) -> Row:
    """``method``: a key of ``METHODS``, ``"loop"`` (the hand-written in-place first-order
    loop of issue 13) or ``"higher"`` (``higher``'s exact unroll on a copy of the module)."""
    support, query = t.task()
    if method == "loop":
        def loop():
            m = copy.deepcopy(t.model)
            ps = list(m.parameters())
            for _ in range(steps):
                gs = torch.autograd.grad(t.loss(m, support), ps)
                with torch.no_grad():
                    for p, g in zip(ps, gs):
                        p.add_(g, alpha=-LR)
            return torch.autograd.grad(t.loss(m, query), ps)
        return Row(loop)
    if method == "higher":
        import higher
        model = copy.deepcopy(t.model)  # higher writes the running statistics in place
        params = list(model.parameters())
        opt = torch.optim.SGD(params, lr=LR)

        def unroll():
            with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fm, diffopt):
                for _ in range(steps):
                    diffopt.step(t.loss(fm, support))
                return torch.autograd.grad(t.loss(fm, query), params)
        return Row(unroll)
    meta = meta_opt(t.model, steps, generator=torch.Generator().manual_seed(0), **METHODS[method])
    force = steps if method == "ufom" else None
    return Row(lambda: meta.backward(t.loss, t.loss, support, query, force_truncation=force),
               meta.zero_grad, meta)


def peak_bytes(row: Row, device: torch.device) -> Optional[int]:
    """Peak allocated bytes above the baseline during ``row.run()`` (CUDA; ``None`` elsewhere)."""
    row.prepare()
    if device.type != "cuda":
        row.run()
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = row.run()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak


def state_bytes(model: nn.Module) -> int:
    """The bytes of one copy of the module's parameters (one inner state for plain SGD)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def flatness(peaks: Dict[int, Optional[int]], copy_bytes: int, steps: Sequence[int],
             copies: int = FLAT_COPIES) -> Dict:
    """The flatness check: the peak at the largest of ``steps`` within ``copies`` state copies
    of the peak at the one before it (``fail`` where either was not measured: its item raised or
    was not run; ``n/a`` where the device has no peak memory measure)."""
    mid, top = sorted(steps)[-2:]
    missing = [s for s in (mid, top) if s not in peaks]
    if missing:
        return {"status": "fail", "reason": f"the peak at steps {missing} was not measured (see its item)"}
    if peaks[mid] is None or peaks[top] is None:
        return {"status": "n/a", "reason": "no peak memory measure on this device"}
    growth = peaks[top] - peaks[mid]
    return {"status": "pass" if growth <= copies * copy_bytes else "fail",
            "growth_bytes": growth, "limit_bytes": copies * copy_bytes,
            "growth_state_copies": growth / copy_bytes, "steps": [mid, top]}


MEMORY_MODELS = ("conv4", "mlp")
MEMORY_ORDER = ("exact_slots8", "fom", "ufom", "exact_default", "exact_store", "higher")


def memory(part: Part, probs: Problems) -> None:
    """Peaks per model, method and steps; flatness of ``exact`` with ``slots=8`` (gated)."""
    all_steps = probs.size.memory_steps
    tasks = {name: probs.make(name, torch.float32) for name in MEMORY_MODELS}
    peaks: Dict[Tuple[str, str], Dict[int, Optional[int]]] = {}
    # slots=8 at the two largest steps first: the flatness check must not be the one cut short.
    first = [(s, n, "exact_slots8") for s in all_steps[-2:] for n in MEMORY_MODELS]
    rest = [(s, n, m) for s in all_steps for n in MEMORY_MODELS for m in MEMORY_ORDER
            if (s, n, m) not in first]
    for steps, name, method in first:
        part.item(f"{name} {method} steps={steps}",
                  lambda s=steps, n=name, m=method: _peak(probs, tasks[n], n, m, s, peaks))
    for name in MEMORY_MODELS:  # arithmetic on those peaks: never skipped for time
        part.item(f"{name} exact_slots8 flatness",
                  lambda n=name: flatness(peaks.get((n, "exact_slots8"), {}), state_bytes(tasks[n].model),
                                          all_steps), gated=True, timed=False)
    for steps, name, method in rest:
        part.item(f"{name} {method} steps={steps}",
                  lambda s=steps, n=name, m=method: _peak(probs, tasks[n], n, m, s, peaks))
    for name in MEMORY_MODELS:  # figures only: the default budget is measured at run time
        part.item(f"{name} exact_default budget",
                  lambda n=name: _default_budget(tasks[n], peaks.get((n, "exact_default"), {})))


def _peak(probs: Problems, t: Task, name: str, method: str, steps: int, peaks) -> Dict:
    if method == "higher" and not _has_higher():
        return {"status": "n/a", "reason": "higher is not installed"}
    peak = peak_bytes(make_row(method, t, steps), probs.device)
    peaks.setdefault((name, method), {})[steps] = peak
    copies = None if peak is None else peak / state_bytes(t.model)
    return {"status": "report", "peak_MiB": _mib(peak), "state_copies": copies}


def _default_budget(t: Task, got: Dict[int, Optional[int]]) -> Dict:
    """The default setting's peaks against an explicit ``max_memory``; the default budget,
    ``128 (G + |s|) + W``, is measured at run time from the first step (``meta.max_memory``
    is ``None``), so its peaks are reported without a gate."""
    budget = getattr(meta_opt(t.model, 1, mode="exact"), "max_memory", None)
    if budget is None:
        return {"status": "report", "note": "the default budget is measured at run time "
                "(128 (G + |s|) + W): peaks only", "peaks_MiB": {s: _mib(p) for s, p in got.items()}}
    over = [s for s, p in got.items() if p is not None and p > budget]
    return {"status": "fail" if over else "pass", "budget_MiB": _mib(budget), "over_at_steps": over}


def _mib(b: Optional[int]) -> Optional[float]:
    return None if b is None else round(b / 2 ** 20, 2)


def _has_higher() -> bool:
    try:
        import higher  # noqa: F401
    except ImportError:
        return False
    return True


class Clock:
    """Seconds of one call: CUDA events around it on CUDA, ``perf_counter`` elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> float:
        if not self.cuda:
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


SPEED_METHODS = ("fom", "loop", "exact_default", "exact_store", "higher")


def speed(part: Part, probs: Problems) -> None:
    """Time per outer step, interleaved rounds after a warm-up; ratios against the floors."""
    clock = Clock(probs.device)
    for steps in probs.size.speed_steps:
        for name in MEMORY_MODELS:
            part.item(f"{name} steps={steps}", lambda s=steps, n=name: _speed_rows(probs, clock, n, s))
    part.item(f"conv4_nostats backward_batch vs loop, meta-batch {probs.size.meta_batch}",
              lambda: _batch_speed(probs, clock))


def _speed_rows(probs: Problems, clock: Clock, name: str, steps: int) -> Dict:
    t = probs.make(name, torch.float32)
    methods = [m for m in SPEED_METHODS if m != "higher" or _has_higher()]
    rows = {m: make_row(m, t, steps) for m in methods}
    times = _interleave(clock, rows, probs.size.rounds)
    med = {m: statistics.median(ts) for m, ts in times.items()}
    ratio = {"fom/loop": med["fom"] / med["loop"]}
    if "higher" in med:
        ratio["exact_store/higher"] = med["exact_store"] / med["higher"]
        ratio["exact_default/higher"] = med["exact_default"] / med["higher"]
    return {"status": "report", "median_ms": {m: round(v * 1e3, 3) for m, v in med.items()},
            "spread_ms": {m: round((max(ts) - min(ts)) * 1e3, 3) for m, ts in times.items()},
            "ratio": ratio, "rounds": probs.size.rounds}


def _interleave(clock: Clock, rows: Dict[str, Row], rounds: int) -> Dict[str, List[float]]:
    for row in rows.values():  # warm-up: caches, allocator, kernels
        row.prepare()
        row.run()
    times = {m: [] for m in rows}
    for _ in range(rounds):
        for m, row in rows.items():
            row.prepare()
            times[m].append(clock(row.run))
    return times


def _batch_speed(probs: Problems, clock: Clock) -> Dict:
    n, steps = probs.size.meta_batch, probs.size.batch_steps
    t = probs.make("conv4_nostats", torch.float32, n=n)
    rows, paths = {}, {}
    for mode in ("fom", "exact"):
        meta = meta_opt(t.model, steps, mode=mode, memory="store", vectorise=True)

        def batched(meta=meta):
            return meta.backward_batch(t.loss, t.loss, t.supports, t.queries)

        def loop(meta=meta):
            for i in range(n):
                meta.backward(t.loss, t.loss, *t.task(i))
        rows[f"{mode} batch"] = Row(batched, meta.zero_grad)
        rows[f"{mode} loop"] = Row(loop, meta.zero_grad)
        with warnings.catch_warnings(record=True) as log:
            warnings.simplefilter("always")
            batched()
        fell = [str(w.message) for w in log if "per-task loop" in str(w.message)]
        paths[mode] = fell[0] if fell else "vectorised"
    times = _interleave(clock, rows, max(2, probs.size.rounds // 2))
    med = {m: statistics.median(ts) for m, ts in times.items()}
    return {"status": "report", "median_ms": {m: round(v * 1e3, 2) for m, v in med.items()},
            "speedup": {mode: med[f"{mode} loop"] / med[f"{mode} batch"] for mode in ("fom", "exact")},
            "path": paths}


# -- synchronisations --------------------------------------------------------------------------

class SyncCounter(TorchDispatchMode):
    """Counts the operations that make the host wait for the device: ``aten._local_scalar_dense``
    (``.item()``, ``bool()``, ``int()``), ``aten.nonzero`` on tensors of ``device``'s type, and
    copies from another device to the CPU."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.kind = device.type
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        packet = func.overloadpacket
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if packet in (aten._local_scalar_dense, aten.nonzero) and first is not None \
                and first.device.type == self.kind:
            self.counts[packet.__name__] += 1
        elif packet is aten._to_copy and first is not None and first.device.type != "cpu" \
                and str(kwargs.get("device", first.device)) == "cpu":
            self.counts["copy to cpu"] += 1
        elif packet is aten.copy_ and first is not None and first.device.type == "cpu" \
                and isinstance(args[1], torch.Tensor) and args[1].device.type != "cpu":
            self.counts["copy to cpu"] += 1
        return func(*args, **kwargs)


SYNC_CASES = (("mlp", "fom", {}), ("mlp", "ufom K=0", {"force": 0}),
              ("mlp", "ufom K=steps", {"force": "steps"}),
              ("mlp_dropout", "exact checkpoint (dropout)", {"slots": 2}),
              # (review s38CU F5: the paths the docs give more reads: fwdrev, a learned rate on the device)
              ("mlp", "exact fwdrev", {"hvp": "fwdrev"}),
              ("mlp", "exact learned inner_lr", {"learned": True}))


def sync(part: Part, probs: Problems) -> None:
    """Host synchronisations per task in ``backward`` (report only)."""
    for name, label, kw in SYNC_CASES:
        part.item(f"{name} {label}", lambda n=name, lab=label, k=kw: _syncs(probs, n, lab, k))


def _syncs(probs: Problems, name: str, label: str, kw: Dict) -> Dict:
    steps, tasks = probs.size.sync_steps, probs.size.sync_tasks
    t = probs.make(name, torch.float32)
    support, query = t.task()
    mode = label.split()[0]
    force = {"steps": steps}.get(kw.get("force"), kw.get("force"))
    extra = {k: kw[k] for k in ("slots", "hvp") if k in kw}
    if kw.get("learned"):
        lr = torch.tensor(LR, dtype=torch.float32, device=probs.device, requires_grad=True)
        extra.update(params=list(t.model.parameters()) + [lr], inner_lr=lr)
    meta = meta_opt(t.model, steps, mode=mode, q=0.1, generator=torch.Generator().manual_seed(1),
                    **extra)

    def run():
        for _ in range(tasks):
            meta.backward(t.loss, t.loss, support, query, force_truncation=force)

    meta.backward(t.loss, t.loss, support, query, force_truncation=force)  # warm-up
    counter = SyncCounter(probs.device)
    with counter:
        run()
    out = {"status": "report", "dispatch_per_task": {k: v / tasks for k, v in counter.counts.items()},
           "dispatch_total_per_task": sum(counter.counts.values()) / tasks}
    if probs.device.type == "cuda":
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as log:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        out["sync_debug_warnings_per_task"] = sum(
            "synchroniz" in str(w.message) for w in log) / tasks
    return out


# -- precision -----------------------------------------------------------------------------------

def precision(part: Part, probs: Problems) -> None:
    """bf16 autocast and fp16 autocast with a GradScaler around the losses (report only)."""
    for name in ("mlp", "conv4_nostats"):
        for mode in ("float32", "bf16 autocast", "fp16 autocast + GradScaler"):
            part.item(f"{name} {mode}", lambda n=name, m=mode: _precision(probs, n, m))


def _autocast(loss: Callable, device: torch.device, dtype: Optional[torch.dtype]) -> Callable:
    if dtype is None:
        return loss

    def wrapped(f, batch):
        with torch.autocast(device.type, dtype=dtype):
            return loss(f, batch)
    return wrapped


def _precision(probs: Problems, name: str, mode: str) -> Dict:
    steps = probs.size.precision_steps
    t = probs.make(name, torch.float32)
    support, query = t.task()
    ref_model = copy.deepcopy(t.model).double()
    as64 = [tuple(x.double() if x.is_floating_point() else x for x in b) for b in (support, query)]
    want = backward(meta_opt(ref_model, steps, mode="exact", memory="store"), t.loss, *as64)
    dtype = {"float32": None, "bf16 autocast": torch.bfloat16}.get(mode, torch.float16)
    inner = _autocast(t.loss, probs.device, dtype)
    meta = meta_opt(t.model, steps, mode="exact", memory="store")
    if "GradScaler" not in mode:
        got = backward(meta, inner, support, query)
        return {"status": "report", "runs": True, "rel_err_vs_float64": rel_err(got, want),
                "global_err_vs_float64": global_err(got, want)}
    scaler = torch.amp.GradScaler(probs.device.type)
    refusals = []
    for _ in range(24):  # on a refusal, back off the scale as a skipped step would
        meta.zero_grad()
        try:
            meta.backward(inner, lambda f, b: scaler.scale(inner(f, b)), support, query)
        except FloatingPointError as err:  # NonFiniteHypergradient: the scaled sweep overflowed
            refusals.append(f"{type(err).__name__}: {err}")
            scaler.update(new_scale=scaler.get_scale() / 2)
            continue
        scaler.unscale_(meta.optimizer)
        got = grads_of(meta)
        scaler.step(meta.optimizer)
        scaler.update()
        return {"status": "report", "runs": True, "rel_err_vs_float64": rel_err(got, want),
                "global_err_vs_float64": global_err(got, want), "scale": scaler.get_scale(),
                "refused_scales": len(refusals), "first_refusal": refusals[0] if refusals else None}
    return {"status": "report", "runs": False, "refused_scales": len(refusals),
            "first_refusal": refusals[0]}


# -- the command ---------------------------------------------------------------------------------

RUNNERS = {"exactness": exactness, "replay": replay, "memory": memory, "speed": speed, "sync": sync,
           "precision": precision}


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python tests/gpu_check.py", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--out", default="results/gpu", help="folder for report.json and report.md")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (the CPU run of the test suite)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds after which no further item starts (the report stays complete)")
    ap.add_argument("--commit", default=None, help="the commit to record (default: git, if present)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="override one size, e.g. --set memory_steps=10,100 --set rounds=3")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"invalid --parts {bad} (expected names from {list(PARTS)})")
    args.parts = parts
    try:
        args.size = sized(TINY if args.tiny else Size(), args.set)
    except ValueError as err:
        ap.error(str(err))
    return args


def sized(base: Size, settings: Sequence[str]) -> Size:
    """``base`` with ``NAME=VALUE`` overrides (tuples as comma-separated integers)."""
    changes = {}
    fields = {f.name: f for f in dataclasses.fields(Size)}
    for item in settings:
        name, _, value = item.partition("=")
        if name not in fields or not value:
            raise ValueError(f"invalid --set {item!r} (expected NAME=VALUE with NAME in {list(fields)})")
        try:
            if isinstance(getattr(base, name), tuple):
                changes[name] = tuple(int(v) for v in value.split(","))
            else:
                changes[name] = int(value)
        except ValueError:
            raise ValueError(f"invalid --set {item!r} (expected integers)") from None
    return dataclasses.replace(base, **changes)


def describe(args, device: torch.device) -> Dict[str, Any]:
    """The run's metadata."""
    commit = args.commit or _git("rev-parse", "--short", "HEAD") or "unknown (pass --commit)"
    if args.commit is None and _git("status", "--porcelain", "--untracked-files=no"):
        commit += " + uncommitted changes"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"commit": commit, "device": str(device), "device_name": name, "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "torch_ufom": torch_ufom.__file__, "argv": sys.argv[1:] if args.argv is None else args.argv,
            "sizes": dataclasses.asdict(args.size), "budgets_s": BUDGETS, "tolerance": TOLERANCE,
            "flat_copies": FLAT_COPIES, "threads": torch.get_num_threads(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _git(*cmd: str) -> str:
    try:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the check; returns the exit status: 1 if a gated check failed or raised, else 3 if
    one was not run for lack of time (``--time-limit`` or a part's budget), else 0."""
    args = parse(argv)
    args.argv = None if argv is None else list(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if device.type == "cuda":  # the CUDA events and the sync debug mode use the current device
        if device.index is None:  # (set_device refuses "cuda" without an index)
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    report = Report(Path(args.out), describe(args, device))
    deadline = None if args.time_limit is None else time.perf_counter() + args.time_limit
    probs = Problems(args.size, device)
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        for name in args.parts:
            # The budgets are for the full sizes on a GPU; the tiny CPU run of the test suite runs
            # every item whatever the machine's load (--time-limit still applies).
            part = Part(report, name, float("inf") if args.tiny else BUDGETS[name], deadline)
            try:
                RUNNERS[name](part, probs)
            finally:
                part.close()
    finally:
        torch.set_default_dtype(old_dtype)
        report.meta["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        report.write()
    failed, skipped = report.failed(), report.skipped()
    print(f"gpu_check: {len(report.checks)} items, {len(failed)} gated failure(s), {len(skipped)} "
          f"gated check(s) not run for lack of time; report in {args.out}/report.md", flush=True)
    return 1 if failed else 3 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
