"""One state snapshot for "a failed call changes nothing" (issue 10).

:func:`capture` records everything a call of the library could change:
the parameters, buffers and ``.grad`` (``None`` included) of the model and of
every tensor the outer optimizer holds, the outer optimizer's ``state_dict``
(deep-copied), the global CPU generator, every CUDA generator when CUDA is
available, every user generator passed in (and the ``MetaOptimizer``'s own),
and the ``MetaOptimizer``'s ``q`` statistics and every field of its pending
per-step state (each one ``MetaOptimizer._task_state_kept`` puts back on error,
the reduction's kept gradients and the warned-once flags; ``tests/test_snapshot.py``
checks that none is missing). :func:`assert_unchanged` compares two snapshots
and names the first item that differs.

Usage::

    before = capture(meta=meta, generators=[gen])
    with pytest.raises(ValueError, match="inner_lr"):
        meta.backward(...)
    assert_unchanged(before)          # captures again from the same objects
"""
import copy
import math

import torch

__all__ = ["Snapshot", "capture", "changed_items", "assert_unchanged", "same"]


def _pairs(pairs, name):
    """``[(tensor, value), ...]`` (or None) as ``[(tensor's name, copy of value), ...]``."""
    return None if pairs is None else [(name(p), _clone(v)) for p, v in pairs]


def _written(entries, name):
    """``MetaOptimizer._written``: ``(tensor, weak reference to its .grad, version, sparse)``, as the
    tensor's name, the identity of the .grad it refers to (None once freed), the version, sparse."""
    if entries is None:
        return None
    out = []
    for p, ref, version, sparse in entries:
        grad = ref()
        out.append((name(p), None if grad is None else id(grad), version, sparse))
    return out


# The MetaOptimizer's pending per-step state: (item name, attribute, how to copy it (value, name of a
# tensor)). Read with getattr, no default: a renamed attribute fails every test that captures a
# MetaOptimizer (tests/test_snapshot.py checks that every field _task_state_kept restores is here).
META_ITEMS = [
    ("q statistics", "q_stats", lambda v, name: copy.deepcopy(v)),
    ("pending q observations", "_observations", lambda v, name: copy.deepcopy(v)),
    ("pending task count", "_tasks", lambda v, name: v),
    ("pending buffers", "_buffers", lambda v, name: copy.deepcopy(v)),
    ("reduced (synchronize ran)", "_reduced", lambda v, name: v),
    ("holding (tasks wrote .grad)", "_holding", lambda v, name: v),
    ("carried .grad", "_carried", _pairs),
    ("written .grad (identity, version)", "_written", _written),
    ("zero saved (loaded grad_zero)", "_zero_saved", lambda v, name: v),
    ("kept .grad (reduction)", "_kept", _pairs),
    ("warned: per-task loop reasons", "_warned_per_task", lambda v, name: set(v)),
    ("warned: edited gradients", "_warned_edited", lambda v, name: v),
    ("warned: fom gaps", "_warned_fom_gaps", lambda v, name: set(v)),
]


class Snapshot(dict):
    """A captured state: item name -> value, with the sources kept to capture again."""

    def __init__(self, items, sources):
        super().__init__(items)
        self.sources = sources

    def again(self) -> "Snapshot":
        """A new snapshot of the same objects."""
        return capture(**self.sources)


def _clone(t):
    return None if t is None else t.detach().clone()


def capture(model=None, optimizer=None, meta=None, generators=()) -> Snapshot:
    """Snapshot the state a library call could change.

    Args:
        model: the ``nn.Module`` (default: ``meta.model``).
        optimizer: the outer optimizer (default: ``meta.optimizer``).
        meta: a ``MetaOptimizer``: its generator, ``q`` statistics and pending
            observations are captured too.
        generators: user ``torch.Generator`` objects.
    """
    sources = {"model": model, "optimizer": optimizer, "meta": meta, "generators": list(generators)}
    if meta is not None:
        model = meta.model if model is None else model
        optimizer = meta.optimizer if optimizer is None else optimizer
    items = {}
    named = {}
    if model is not None:
        for n, p in model.named_parameters():
            named[id(p)] = f"parameter {n!r}"
        for n, b in model.named_buffers():
            items[f"buffer {n!r}"] = _clone(b)
    tensors = [] if model is None else list(model.parameters())
    if optimizer is not None:
        for gi, group in enumerate(optimizer.param_groups):
            for i, p in enumerate(group["params"]):
                named.setdefault(id(p), f"optimizer tensor param_groups[{gi}]['params'][{i}]")
                tensors.append(p)
        items["outer optimizer state_dict"] = copy.deepcopy(optimizer.state_dict())
    for p in tensors:
        items[named[id(p)]] = _clone(p)
        items[f".grad of {named[id(p)]}"] = _clone(p.grad)
    items["CPU generator (global RNG)"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for d in range(torch.cuda.device_count()):
            items[f"CUDA generator {d}"] = torch.cuda.get_rng_state(d)
    gens = list(generators)
    own = getattr(meta, "generator", None) if meta is not None else None
    if own is not None and all(own is not g for g in gens):
        gens.append(own)
    for i, g in enumerate(gens):
        items[f"generator {i} ({g.device})"] = g.get_state()
    if meta is not None:
        def name(t):
            return named.get(id(t), f"tensor {tuple(t.shape)} id {id(t)}")

        for item, attr, copied in META_ITEMS:
            items[item] = copied(getattr(meta, attr), name)
    return Snapshot(items, sources)


def same(a, b) -> bool:
    """Equality of nested tensors, dicts, lists and numbers; NaN equals NaN."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device or a.layout != b.layout:
            return False
        if a.layout != torch.strided:  # (sparse: compared by value)
            a, b = a.to_dense(), b.to_dense()
        if a.is_floating_point() or a.is_complex():
            nan = a.isnan()
            return bool(torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan]))
        return bool(torch.equal(a, b))
    if isinstance(a, dict) or isinstance(b, dict):
        return (isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and
                all(same(a[k], b[k]) for k in a))
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return (type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b)))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _show(v) -> str:
    if isinstance(v, torch.Tensor):
        v = v.to_dense() if v.layout != torch.strided else v
        return f"tensor{tuple(v.shape)} {v.dtype}" + (f" {v.flatten()[:4].tolist()}" if v.numel() else "")
    text = repr(v)
    return text if len(text) < 200 else text[:200] + "..."


def _where(a, b) -> str:
    """Where two tensors of one shape first differ."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape \
            or a.dtype != b.dtype or a.device != b.device or a.layout != b.layout:
        return ""
    if a.layout != torch.strided:
        a, b = a.to_dense(), b.to_dense()
    differ = (a != b) & ~(a.isnan() & b.isnan()) if a.is_floating_point() else a != b
    index = differ.flatten().nonzero()
    if not len(index):
        return ""
    i = int(index[0])
    return f" (first difference at flat index {i}: {a.flatten()[i].item()!r} -> {b.flatten()[i].item()!r})"


def changed_items(before: Snapshot, after: Snapshot) -> list:
    """The names of the items that differ between two snapshots, sorted."""
    return [k for k in sorted(set(before) | set(after))
            if k not in before or k not in after or not same(before[k], after[k])]


def assert_unchanged(before: Snapshot, after: Snapshot = None) -> None:
    """Assert that nothing changed between ``before`` and ``after`` (default: now).

    The message names every item that changed, with both values.
    """
    after = before.again() if after is None else after
    changed = []
    for key in changed_items(before, after):
        if key not in before or key not in after:
            changed.append(f"{key}: {'appeared' if key in after else 'disappeared'}")
        else:
            changed.append(f"{key}: {_show(before[key])} -> {_show(after[key])}" +
                           _where(before[key], after[key]))
    assert not changed, "state changed: " + "; ".join(changed)
