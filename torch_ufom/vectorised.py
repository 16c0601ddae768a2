"""Meta-batches through ``torch.func.vmap``: one vectorised inner loop for many tasks.

:class:`Vectorised` is the loop's evaluator for a meta-batch: the inner state
carries a leading task dimension. Its inner gradients (and outer
losses) are ``torch.func.vmap`` of ``torch.func.grad`` of the user's losses,
so a meta-batch of ``B`` tasks runs one batched step where the per-task loop
runs ``B`` small ones. Everything else is shared with the per-task engine:
the inner rule acts elementwise on the stacked tensors (the built-in rules
do), the memory schedules and the two-stream estimator
(:func:`~torch_ufom.estimators.estimate`) run unchanged, and vector-Jacobian
products go through ``torch.autograd`` on top of ``vmap``. Meta-parameters
shared by the tasks therefore receive the sum of the tasks' hypergradients.

Tasks are grouped by their truncation point ``K`` (:func:`group_by_truncation`):
each group runs its own vectorised sweep, so tasks that drew ``K = 0`` never
pay for the exact sweep of the others.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import gc
import os
import sys
import threading
import types
import weakref
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .batches import StepBatches
from .functional_model import FunctionalModel, cell_filled, renormalises_weights
from .fwdrev import jvp
from .graphs import graph_nodes, graph_reaches, graph_survey, once_differentiable, root_of, wrong_twice
from .losses import check_depends, check_kept_aux, loss_and_aux, passes_for, slot_names
from .process import outside_transforms
from .randomness import (cuda_devices_in_use, generator_position, host_random_states, is_default_generator,
                         set_host_random_states, torch_random_states_kept)
from .unroll import AUTOGRAD_CALLS, from_torch_func, note_probed, watched_loss

__all__ = ["Vectorised", "meta_batch_size", "select_tasks", "task_of", "group_by_truncation", "probe",
           "probe_steps", "reads_meta_directly", "LookFailed", "SLOW_ON_CPU_ELEMENTS", "FEWEST_TASKS_ON_CPU",
           "FEWEST_TASKS_BESIDE_ON_CPU", "under_a_look", "EmptyMetaBatch", "attributes_kept", "fresh",
           "noting_listed_tasks", "runs_optimised_script", "Probe"]


def _register_step_batches() -> None:
    """Let pytree functions see into :class:`~torch_ufom.StepBatches` (a list of batches)."""
    def flatten(sb):
        return list(sb.batches), None

    def unflatten(children, _):
        return StepBatches(list(children))

    def flatten_with_keys(sb):
        return [(pytree.SequenceKey(i), b) for i, b in enumerate(sb.batches)], None

    pytree.register_pytree_node(StepBatches, flatten, unflatten,
                                serialized_type_name="torch_ufom.StepBatches",
                                flatten_with_keys_fn=flatten_with_keys)


_register_step_batches()


def meta_batch_size(**trees: Any) -> int:
    """The number of tasks of a meta-batch: the common leading size of every tensor
    of ``trees`` (by argument name: ``supports=..., queries=...``).

    Raises:
        TypeError: a tree is ``None``, or naming the first entry that is not a
            tensor (a callable, a string, a number).
        ValueError: a tree holds no tensor, or naming the first entry that is
            a 0-d tensor, or whose leading size differs from the first one's.
    """
    entries = []
    for name, tree in trees.items():
        leaves = [(f"{name}{pytree.keystr(k)}", v) for k, v in pytree.tree_leaves_with_path(tree)]
        if not leaves:  # [], {}, (), None: no task's batch to index
            raise (TypeError if tree is None else ValueError)(
                f"Invalid {name}: {tree!r} holds no tensor (expected a tensor, or a "
                "tuple/list/dict of tensors, whose first dimension indexes the tasks)")
        entries += leaves
    size, first = None, None
    for path, leaf in entries:
        if not isinstance(leaf, Tensor) or leaf.dim() == 0:
            what = "a 0-d tensor" if isinstance(leaf, Tensor) else type(leaf).__name__
            raise (ValueError if isinstance(leaf, Tensor) else TypeError)(
                f"Invalid {path}: expected a tensor whose first dimension indexes the tasks, got {what}")
        if size is None:
            size, first = leaf.shape[0], path
        elif leaf.shape[0] != size:
            raise ValueError(f"Invalid {path}: its leading size is {leaf.shape[0]}, but {first} "
                             f"has {size} tasks; every tensor of a meta-batch must stack the same "
                             "tasks along dimension 0")
    if size == 0:
        raise EmptyMetaBatch(f"Invalid {first}: the meta-batch is empty (leading size 0)")
    return int(size)


class EmptyMetaBatch(ValueError):
    """A meta-batch of no task (:func:`meta_batch_size`): ``MetaOptimizer.backward_batch``
    under a ``process_group`` adds what a rank without tasks does (review s36E F1: the
    functional calls, which have neither, said it too)."""


@contextlib.contextmanager
def noting_listed_tasks(**trees: Any):
    """Run the body of a meta-batch call; an exception it raises gets a note when an
    argument (by name: ``supports=...``) looks like a list of per-task batches, the
    layout :meth:`MetaOptimizer.backward` takes one at a time: a list or tuple of two or
    more tuples, lists or dicts of one layout, whose tensors the call read as stacked
    along dimension 0 (review IB F4). Only a note: such a tree may also be a stacked
    batch of several parts."""
    try:
        yield
    except Exception as err:
        for name, tree in trees.items():
            if not (type(tree) in (list, tuple) and len(tree) >= 2
                    and all(isinstance(e, (list, tuple, dict)) for e in tree)):
                continue
            layouts = [pytree.tree_structure(e) for e in tree]
            if all(spec == layouts[0] for spec in layouts[1:]):
                note = (f"Note: {name} is a {type(tree).__name__} of {len(tree)} {type(tree[0]).__name__}s "
                        "of one layout. A meta-batch reads dimension 0 of every tensor as the task index: "
                        f"if these are {len(tree)} tasks' batches, stack each field "
                        f"(torch.utils._pytree.tree_map(lambda *t: torch.stack(t), *{name})), or run "
                        "the tasks one at a time")
                if note not in getattr(err, "__notes__", ()):  # (an exception raised again: review KE F5)
                    err.add_note(note)
                break
        raise


def select_tasks(tree: Any, index: Sequence[int]) -> Any:
    """The tasks ``index`` of a meta-batch (a pytree of stacked tensors)."""
    on_device: Dict[torch.device, Tensor] = {}  # one copy of the index per device (a sync on CUDA)

    def pick(t: Tensor) -> Tensor:
        if len(index) == t.shape[0] and list(index) == list(range(t.shape[0])):
            return t
        if t.device not in on_device:
            on_device[t.device] = torch.as_tensor(list(index), device=t.device)
        return t[on_device[t.device]]

    return pytree.tree_map(pick, tree)


def task_of(tree: Any, i: int) -> Any:
    """Task ``i`` of a meta-batch (a pytree of stacked tensors; any other value is shared
    by every task and returned as is)."""
    return pytree.tree_map(lambda t: t[i] if isinstance(t, Tensor) else t, tree)


# Normalisation functions whose vmap backward is wrong when differentiated again
# (pytorch/functorch#534), with the test that the call is affected.
def _arg(args, kwargs, i: int, name: str, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


_UNSAFE_NORMS = {
    F.layer_norm: ("LayerNorm with weights", lambda a, k: _arg(a, k, 2, "weight") is not None),
    F.batch_norm: ("BatchNorm with batch statistics",
                   lambda a, k: bool(_arg(a, k, 5, "training", False))
                   or _arg(a, k, 1, "running_mean") is None),
    F.instance_norm: ("InstanceNorm", lambda a, k: True),
}
if hasattr(F, "rms_norm"):
    _UNSAFE_NORMS[F.rms_norm] = ("RMSNorm with weights", lambda a, k: _arg(a, k, 2, "weight") is not None)


# Normalisations whose forward-mode third derivative differs from reverse mode's in torch
# 2.13 (affine or not), with the test that the call is affected: a loss that differentiates
# itself with torch.func through them gets another answer under forward-over-reverse HVPs
# (layer_norm 1.4-3e-3, batch_norm 4e-3 relative; RMSNorm and GroupNorm, which decompose
# into elementwise operations on a CPU, agree to rounding).
_THIRD_ORDER = {
    F.layer_norm: ("LayerNorm", lambda a, k: True),
    F.batch_norm: _UNSAFE_NORMS[F.batch_norm],
    F.instance_norm: _UNSAFE_NORMS[F.instance_norm],
}


# torch functions written in Python that make a stop-gradient inside, which the probe's mode
# (off while it runs the function it caught) does not see, with the argument it stops:
# F.gaussian_nll_loss clamps var in place under no_grad.
_STOPS_INSIDE = {
    F.gaussian_nll_loss: lambda a, k: _arg(a, k, 2, "var"),
}


# Functions whose gradient vmap gets wrong even once differentiated, with the test that
# the call is affected: torch 2.13's embedding backward under vmap gives the padding row
# a gradient in every task but the first.
_WRONG_UNDER_VMAP = {
    F.embedding: ("Embedding with padding_idx", lambda a, k: _arg(a, k, 2, "padding_idx") is not None),
}


def _schema_args(func, args, kwargs) -> Dict[str, Any]:
    """An ATen call's arguments by their schema names."""
    named = {a.name: a.default_value for a in func._schema.arguments if a.has_default_value()}
    named.update(zip((a.name for a in func._schema.arguments), args))
    named.update(kwargs)
    return named


def _batch_statistics(a: Dict[str, Any]) -> bool:
    return bool(a.get("training", True)) or a.get("running_mean") is None


# The same calls seen at the ATen level, whatever name reached them (``torch.layer_norm``,
# ``torch.batch_norm``, ``torch.instance_norm``, ``torch.embedding``, ``torch.ops.aten.*``):
# the backstop of the tables above, which see only the ``F.*`` functions.
_ATEN_UNSAFE_NORMS = {
    "native_layer_norm": ("LayerNorm with weights", lambda a: a.get("weight") is not None),
    "native_batch_norm": ("batch_norm with batch statistics", _batch_statistics),
    "_native_batch_norm_legit": ("batch_norm with batch statistics", _batch_statistics),
    "_native_batch_norm_legit_functional": ("batch_norm with batch statistics", _batch_statistics),
    "cudnn_batch_norm": ("batch_norm with batch statistics", _batch_statistics),
    "miopen_batch_norm": ("batch_norm with batch statistics", _batch_statistics),
    # CUDA's fused kernel (on the CPU, torch.rms_norm decomposes into elementwise operations)
    "_fused_rms_norm": ("RMSNorm with weights", lambda a: a.get("weight") is not None),
}
_ATEN_THIRD_ORDER = {
    "native_layer_norm": ("LayerNorm", lambda a: True),
    **{name: entry for name, entry in _ATEN_UNSAFE_NORMS.items() if "batch_norm" in name},
    # CUDA's fused kernel: not checked (no GPU here), so not trusted
    "_fused_rms_norm": ("RMSNorm (CUDA's fused kernel, not checked)", lambda a: True),
}
# Operations whose forward-mode derivative torch gets wrong (forward-over-reverse HVPs through
# them differ from reverse mode's), by ATen name.
_ATEN_FORWARD_WRONG = {
    **{name: ("torch.logcumsumexp (its forward-mode derivative drops early prefixes once the input spans "
              "a wide range: pytorch/pytorch#196705)", lambda a: True)
       for name in ("logcumsumexp", "_logcumsumexp")},
    "scatter_reduce": ("scatter_reduce(reduce='prod') (torch gives it no forward-mode tangent: "
                       "pytorch/pytorch#196702)", lambda a: a.get("reduce") == "prod"),
}
_ATEN_WRONG_UNDER_VMAP = {
    "embedding": ("Embedding with padding_idx", lambda a: a.get("padding_idx", -1) not in (-1, None)),
}


class _AtenProbe(TorchDispatchMode):
    """The ATen-level twin of :class:`_Probe`'s normalisation and ``vmap`` tables; also
    finds the random operations that draw from a generator of the user's
    (``generator=``), whose states it keeps so that :meth:`restore` puts them back, and
    follows the tensors computed from ``sources`` and ``held`` (:meth:`kept`)."""

    def __init__(self, sources: Sequence[Tensor] = (), held: Sequence[Tensor] = ()):
        super().__init__()
        self.norms: set = set()
        self.third: set = set()
        self.wrong: set = set()
        self.forward_wrong: set = set()
        self.generators: Dict[int, Tuple[torch.Generator, Tensor]] = {}
        # The tensors an evaluation starts from (a task's adapted parameters and batch; ``held``:
        # those the caller keeps alive, which kept() does not look at), and every tensor an
        # operation computed from them, by id: weak references (see kept()).
        self.derived: Dict[int, weakref.ref] = {id(t): weakref.ref(t) for t in held}
        self.held = len(self.derived)  # the first entries: kept() does not look at them
        self.derived.update((id(t), weakref.ref(t)) for t in sources if id(t) not in self.derived)
        self.following = bool(self.derived)  # (a probe without tensors to follow looks at nothing)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        watcher = _quiet()
        try:
            self._look(func, args, kwargs or {})
        finally:
            if watcher is not None:
                sys.setprofile(watcher)
        out = func(*args, **(kwargs or {}))
        # (Under vmap even x.new_ones(n) and torch.zeros_like(x) make batched tensors: a cache
        # of them filled by this evaluation counts as kept, and is found filled next time. So do
        # random operations, whatever their inputs: vmap(randomness="different") draws per task.)
        if self.following and (self._derived(args) or (kwargs and self._derived(kwargs.values()))
                             or torch.Tag.nondeterministic_seeded in func.tags):
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, Tensor):
                    self.derived[id(t)] = weakref.ref(t)
            if func._schema.is_mutable and args and isinstance(args[0], Tensor):  # (written in place)
                self.derived[id(args[0])] = weakref.ref(args[0])
        return out

    def _derived(self, values) -> bool:
        """Whether a tensor among ``values`` (or in a list among them) is one of ``derived``."""
        for v in values:
            if isinstance(v, Tensor):
                ref = self.derived.get(id(v))
                if ref is not None and ref() is v:
                    return True
            elif isinstance(v, (list, tuple)) and self._derived(v):
                return True
        return False

    def kept(self) -> set:
        """The ids of the tensors computed from the sources that outlive the evaluation (asked
        once the probe has let go of what it returned): kept somewhere by the losses. Under
        ``vmap`` each would be a tensor of the transform's, kept past it (a global list of logged
        losses, a class attribute, a forward hook's store, a memo of a function's own)."""
        alive = [ref for i, ref in enumerate(self.derived.values())
                 if i >= self.held and ref() is not None]
        if alive:  # (held in a reference cycle made by the evaluation, unreachable: collect the
            gc.collect(0)  # youngest generation, where the probe's evaluations keep what they make)
            alive = [ref for ref in alive if ref() is not None]
        return {id(t) for t in (ref() for ref in alive) if t is not None}

    def _look(self, func, args, keywords) -> None:
        name = func.overloadpacket.__name__
        for table, found in ((_ATEN_UNSAFE_NORMS, self.norms), (_ATEN_THIRD_ORDER, self.third),
                             (_ATEN_WRONG_UNDER_VMAP, self.wrong)):
            entry = table.get(name)
            if entry is not None and entry[1](_schema_args(func, args, keywords)):
                found.add(entry[0])
        entry = _ATEN_FORWARD_WRONG.get(name[:-1] if name.endswith("_") else name)  # (scatter_reduce_)
        if entry is not None and entry[1](_schema_args(func, args, keywords)):
            self.forward_wrong.add(entry[0])
        i = generator_position(func)
        gen = (args[i] if len(args) > i else keywords.get("generator")) if i >= 0 else None
        if isinstance(gen, torch.Generator) and id(gen) not in self.generators \
                and not is_default_generator(gen):
            self.generators[id(gen)] = (gen, gen.get_state())

    def restore(self) -> None:
        """Put the user's generators back as they were before their first draw (newest
        entry first: should the dispatcher hand over two Python objects for one generator,
        the state saved first is the one left)."""
        for gen, state in reversed(list(self.generators.values())):
            gen.set_state(state)


# Attention whose dropout draws its masks differently under torch.func than under
# autograd (the kernels differ), so forward-over-reverse would differentiate another function.
_ATTENTION_DROPOUT = {
    F.scaled_dot_product_attention: lambda a, k: float(_arg(a, k, 4, "dropout_p", 0.0)) > 0.0,
    F.multi_head_attention_forward: lambda a, k: float(_arg(a, k, 10, "dropout_p", 0.0)) > 0.0
    and bool(_arg(a, k, 13, "training", True)),
}


# On a CPU, vmap pays while the per-op overhead it saves dominates; once one task's tensors
# are large it costs more than the per-task loop: elementwise updates of B stacked copies of
# the parameters leave the cache, vmap runs a convolution over the tasks as one grouped
# convolution and decomposes batch_norm into elementwise operations. Measured (one thread,
# meta-batch 16, vmap speed / loop speed, fom / exact): MLPs 64-h-h-10 with 17,610, 37,770,
# 65,130 and 126,730 parameters: 3.3/2.7, 2.2/1.8, 1.4/1.2, 1.1/0.85-0.94; MAML's conv4 with
# BatchNorm at 4, 8, 16, 32 and 64 channels (5 images of 28x28, largest activation 15,680 ...
# 250,880 elements per task; 64 channels: 112,005 parameters): 3.2/2.4, 2.6/1.9, 1.8/1.2,
# 1.4/0.80, 1.1/0.69; four 32-channel convolutions on 5 images of 3x84x84 (1,128,960
# elements, 28,000 parameters): 0.46/0.61; the sinusoid MLP at meta-batch 32: 6-8/11.
# vectorise="auto" therefore runs the loop on a CPU from this many adapted parameters, or
# from a convolution or batch_norm output of this many elements, per task.
SLOW_ON_CPU_ELEMENTS = 1 << 16

# On a CPU, vmap's own cost per step (its dispatch of each operation for the whole group, and,
# with per-step batches, the look at task 0's losses at each step's batch) is paid back by the
# per-task overhead it saves only from a few tasks on. Measured by benchmarks/small_batches.py
# (one thread, vmap time / loop time; MLPs 1-40-40-1 and 1-160-160-1, 10-point batches, r = 5):
# one batch for every step, first-order 1.29-1.30 at meta-batch 4, 0.88-0.89 at 6; exact 0.83-1.00
# at 4, 1.53-1.58 at 2; per-step batches, first-order 0.95-1.01 at 8, 0.68-0.74 at 12; exact
# 1.14-1.21 at 4, 0.78-0.93 at 6. vectorise="auto" therefore runs a group of tasks (those that
# drew the same K) per task on a CPU below this many tasks, by (whether the group's sweep is
# exact, whether the batches are per step).
FEWEST_TASKS_ON_CPU = {(False, False): 6, (True, False): 4, (False, True): 10, (True, True): 6}
# Once one group runs vectorised (the look paid), a further group of tasks that drew another K
# pays from fewer tasks: ufom's few exact draws beside its first-order group. Measured (the same
# MLPs, beside a group of 16, vectorised time / one by one, further group of 1, 2, 3, 4 tasks):
# exact 1.29-1.52, 1.09-1.19, 0.91-1.02, 0.74-0.93; first-order 1.06-1.27, 1.06-1.10,
# 0.93-1.01, 0.97-0.99.
FEWEST_TASKS_BESIDE_ON_CPU = 3
_SLOW_ON_CPU = {F.conv1d: "conv1d", F.conv2d: "conv2d", F.conv3d: "conv3d",
                F.conv_transpose1d: "conv_transpose1d", F.conv_transpose2d: "conv_transpose2d",
                F.conv_transpose3d: "conv_transpose3d", F.batch_norm: "batch_norm"}


class _Probe(TorchFunctionMode):
    """Records the affected normalisation calls, the operations vmap differentiates wrongly,
    attention dropout and the CPU operations too large to pay vectorised
    (``SLOW_ON_CPU_ELEMENTS``), while active. ``adapted``: the ids of the adapted
    parameters' tensors (``None``: every leaf requiring grad counts as one), the only
    leaves a forward-mode tangent starts from."""

    def __init__(self, adapted: Optional[set] = None):
        super().__init__()
        self.adapted = adapted
        self.norms: set = set()
        self.third: set = set()
        self.wrong: set = set()
        self.attention_dropout = False
        self.slow_on_cpu: Dict[str, int] = {}
        self.differentiates = False
        self.stops_gradients = False
        self.hooks = False
        # Values cut from the graph (computed under no_grad from tensors requiring grad, or
        # read through .data), kept alive while the probe runs so that their ids stay theirs.
        self.stopped: List[Tensor] = []
        self.stopped_ids: set = set()
        self.aliases: set = set()  # ids of the values read through .data (they share storage)
        self.alias_storages: set = set()  # their storages (a view of one writes it)
        self.differentiates_inside = False  # autograd calls inside transforms (torch.func.grad)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        watcher = _quiet()  # the look's own bookkeeping runs unwatched (the profiler's cost)
        kwargs = kwargs or {}
        if func in AUTOGRAD_CALLS:
            if outside_transforms() and not from_torch_func():
                self.differentiates = True
            else:
                self.differentiates_inside = True
        if func in _HOOKS:
            self.hooks = True
        tensors = _tensors_in(args, kwargs)
        if watcher is not None and any(type(t) not in _PLAIN_TENSORS for t in tensors):
            sys.setprofile(watcher)  # a subclass's own code runs as its attributes are read: watched
            watcher = None
        stop = watch = None
        if not self.stops_gradients:
            stop = self._stop_before(func, args, tensors)
            watch = self._watch(tensors)
            inside = _STOPS_INSIDE.get(func)
            stopped = inside(args, kwargs) if inside is not None else None
            if isinstance(stopped, Tensor) and self._tangent(stopped):
                self.stops_gradients = True
        for table, found in ((_UNSAFE_NORMS, self.norms), (_THIRD_ORDER, self.third)):
            entry = table.get(func)
            if entry is not None and entry[1](args, kwargs):
                found.add(entry[0])
        entry = _WRONG_UNDER_VMAP.get(func)
        if entry is not None and entry[1](args, kwargs):
            self.wrong.add(entry[0])
        test = _ATTENTION_DROPOUT.get(func)
        if test is not None and test(args, kwargs):
            self.attention_dropout = True
        if watcher is not None:
            sys.setprofile(watcher)
        out = func(*args, **kwargs)
        if watcher is not None:
            sys.setprofile(None)
        if stop:
            self._stop_after(stop, out)
        if watch is not None and not self.stops_gradients:
            self._written(*watch)
        slow = _SLOW_ON_CPU.get(func)
        if slow is not None and isinstance(out, Tensor) and out.device.type == "cpu" \
                and out.numel() >= SLOW_ON_CPU_ELEMENTS:
            self.slow_on_cpu[slow] = max(out.numel(), self.slow_on_cpu.get(slow, 0))
        if watcher is not None:
            sys.setprofile(watcher)
        return out

    def _stop_before(self, func, args, tensors) -> Optional[str]:
        """Whether ``func``'s result is a stop-gradient (``"mark"``: computed under
        ``no_grad`` from a tensor requiring grad or from a stop-gradient, or read through
        ``.data``) or reads one with gradients enabled (``"check"``). Forward-mode AD passes
        through ``no_grad`` and ``.data``: a stop-gradient that reaches a value requiring grad
        (``stops_gradients``) makes forward-over-reverse differentiate another function; one
        that only reports (an accuracy returned as aux, a logged value) changes nothing.
        Writes are looked at here by name (``mul_``, ``x[i] = v``, ``torch._foreach_mul_``'s
        list) and after the call by version (:meth:`_written`)."""
        if getattr(func, "__self__", None) is _DATA:  # Tensor.data's getter or setter
            if getattr(func, "__name__", "") == "__set__":
                if tensors and self._tangent(tensors[0]):
                    self.stops_gradients = True  # values swapped under the graph
                return None
            return "alias" if tensors and self._tangent(tensors[0]) else None
        stopped = bool(self.stopped_ids) and any(id(t) in self.stopped_ids for t in tensors)
        grad = torch.is_grad_enabled()
        targets = _targets(func, args)
        for target in targets:
            # A write into a tensor of the graph under no_grad, through .data, or of a
            # stop-gradient into one requiring grad (x[i] = v returns None: nothing to check after).
            if self._tangent(target) and (not grad or stopped) or self._aliased(target):
                self.stops_gradients = True
                return None
        mark = stopped or (not grad and any(map(self._tangent, tensors)))
        if mark:
            self._hold(targets)  # a tensor written with a stop-gradient holds one
        if grad:
            return "check" if stopped else None
        return "mark" if mark else None

    def _tangent(self, t: Tensor) -> bool:
        """Whether ``t`` may carry a forward-mode tangent of the adapted parameters: it
        requires grad and is no leaf other than them (a frozen teacher's parameters,
        left requiring grad and read under ``no_grad``, carry none), seen through
        ``torch.func``'s wrappers (inside a loss's own ``vmap`` a value hides
        ``requires_grad``; inside its ``torch.func.grad`` it is a fresh leaf)."""
        t = _unwrapped(t)
        if not t.requires_grad:
            return False
        return self.adapted is None or id(t) in self.adapted or not t.is_leaf

    def _aliased(self, t: Tensor) -> bool:
        """Whether ``t`` is a value read through ``.data`` or shares its storage (a view of one)."""
        if id(t) in self.aliases:
            return True
        return bool(self.alias_storages) and not t.requires_grad and _storage(t) in self.alias_storages

    def _hold(self, values) -> None:
        for t in values:
            if id(t) not in self.stopped_ids:
                self.stopped.append(t)
                self.stopped_ids.add(id(t))

    def _watch(self, tensors):
        """What :meth:`_written` compares after the call: the arguments' versions."""
        stopped = bool(self.stopped_ids) and any(id(t) in self.stopped_ids for t in tensors)
        reads_graph = any(map(self._tangent, tensors))
        # The tensors inside torch.func's wrappers: a write inside a loss's own vmap bumps theirs.
        tensors = [u for u in map(_unwrapped, tensors) if not u.is_inference()]  # (no version counter)
        return torch.is_grad_enabled(), tensors, [t._version for t in tensors], stopped, reads_graph

    def _written(self, grad: bool, tensors, versions, stopped: bool, reads_graph: bool) -> None:
        """The writes a call made, seen by version counters whatever its name
        (``F.relu(x, inplace=True)``, ``out=``, ``torch.ops.aten.mul_.Tensor``): into a
        tensor of the graph (or a view of one) under ``no_grad`` or from a stop-gradient,
        or into storage read through ``.data``, is a stop-gradient; a tensor (and its base)
        written under ``no_grad`` from the graph, or from a stop-gradient, holds one."""
        for w, version in zip(tensors, versions):
            if w._version == version:
                continue
            root = root_of(w)
            graph = root.requires_grad and root.grad_fn is not None  # (a no_grad view's own grad_fn raises)
            if graph and (not grad or stopped) or self._aliased(w):
                self.stops_gradients = True
                return
            if stopped or (not grad and reads_graph):
                self._hold((w, root))

    def _stop_after(self, stop: str, out) -> None:
        values = [t for t in _tensors_in(out) if (t.is_floating_point() or t.is_complex())]
        if stop == "check" and any(_unwrapped(t).requires_grad for t in values):
            self.stops_gradients = True
            return
        if stop == "alias":
            self.aliases.update(id(t) for t in values)
            self.alias_storages.update(ptr for ptr in map(_storage, values) if ptr)
        self._hold(values)


_SCALARS = frozenset((int, float, bool, complex, str, type(None), torch.dtype, torch.device, torch.layout,
                     torch.memory_format, torch.Size, slice, type(Ellipsis)))  # leaves holding no tensor


def _tensors_in(*trees) -> List[Tensor]:
    """The tensors among ``trees``' leaves, in ``pytree.tree_leaves``' order: the common
    containers (tuple, list, dict) walked here, anything else handed to pytree (a
    namedtuple, a registered node). A mode sees every torch call, so this runs per op."""
    # (an explicit stack: a recursive closure is a reference cycle, which kept the tensors found
    # alive until the garbage collector ran)
    found: List[Tensor] = []
    stack = list(reversed(trees))
    while stack:
        x = stack.pop()
        kind = type(x)
        if kind in _SCALARS:
            continue
        if isinstance(x, Tensor):
            found.append(x)
        elif kind is tuple or kind is list:
            stack.extend(reversed(x))
        elif kind is dict:
            stack.extend(reversed(list(x.values())))
        else:
            found.extend(t for t in pytree.tree_leaves(x) if isinstance(t, Tensor))
    return found


_DATA = Tensor.data  # the descriptor (its __get__ is a new method wrapper at each access)
_IN_PLACE_DUNDERS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ipow__"}


def _in_place(func) -> bool:
    """Whether ``func`` writes its first argument (``mul_``, ``x[i] = v``, ``x += y``)."""
    name = getattr(func, "__name__", "")
    return name in _IN_PLACE_DUNDERS or (name.endswith("_") and not name.endswith("__"))


def _targets(func, args) -> List[Tensor]:
    """The tensors an in-place ``func`` writes, by its name: its first argument, or each
    tensor of it for ``torch._foreach_*_`` (whose writes bump no version under the probe's
    dispatch mode)."""
    if not args or not _in_place(func):
        return []
    if isinstance(args[0], Tensor):
        return [args[0]]
    if isinstance(args[0], (list, tuple)):
        return [t for t in args[0] if isinstance(t, Tensor)]
    return []


_NODE_HOOKS = ("register_hook", "register_prehook")
# The Python function every graph node's register_hook / register_prehook calls back into
# (to make the handle): seen as a "call" event even where the C method is reached from C
# (functools.partial, map), which makes no "c_call" event.
_NODE_HOOK_CODE = getattr(getattr(getattr(torch.autograd.function, "_HookMixin", None), "_register_hook",
                                  None), "__code__", None)
_UNWATCHED = "(a profiler is set)"  # what _watching_node_hooks notes when it cannot look


@contextlib.contextmanager
def _watching_node_hooks(found: List[str]):
    """Note in ``found`` the hooks the body registers on autograd's graph nodes
    (``h.grad_fn.register_hook``, ``register_prehook``: C methods no mode sees, and no
    API lists a node's hooks), through ``sys.setprofile``; unless a profiler is set
    already (cProfile, ``torch.profiler.profile(with_stack=True)``), which is left
    alone: the body then runs unwatched, and ``found`` holds :data:`_UNWATCHED`."""
    if sys.getprofile() is not None:
        found.append(_UNWATCHED)
        yield
        return

    def profile(frame, event, arg):
        if event == "call":
            if frame.f_code is _NODE_HOOK_CODE:  # however the C method was reached (partial, map)
                found.append("register_hook")
        elif event == "c_call":
            name = getattr(arg, "__name__", "")
            if name in _NODE_HOOKS and isinstance(getattr(arg, "__self__", None), torch.autograd.graph.Node):
                found.append(name)
            elif (arg is sys.setprofile or name == "enable" and _is_cprofile(arg)) \
                    and not frame.f_code.co_filename.startswith(_OWN_CODE):
                found.append(_UNWATCHED)  # the loss's own profiler: unwatched until it puts ours back

    _WATCHERS.append(profile)
    sys.setprofile(profile)
    try:
        yield
    finally:
        if sys.getprofile() is not profile:  # the body set a profiler of its own, or switched ours off
            found.append(_UNWATCHED)
        sys.setprofile(None)
        _WATCHERS.pop()


# Code whose profile-function swaps are not the loss's: this module's own (the look switches its
# watcher off around its bookkeeping), torch's (torch.utils.viz's garbage observer swaps it from a
# gc callback and passes every event on).
_OWN_CODE = (__file__, os.path.dirname(torch.__file__) + os.sep)


def _is_cprofile(method) -> bool:
    """Whether ``method`` is bound to a ``cProfile.Profile`` (its ``enable`` sets a profile function)."""
    return type(getattr(method, "__self__", None)).__module__ in ("_lsprof", "cProfile")


_WATCHERS: List[Any] = []  # the running looks' profile functions, innermost last


def under_a_look() -> bool:
    """Whether the profile function set is a look's of this library: the caller runs inside a
    loss that an enclosing call is looking at (a bilevel problem nested in another's loss)."""
    return bool(_WATCHERS) and sys.getprofile() is _WATCHERS[-1]
_PLAIN_TENSORS = (Tensor, nn.Parameter)  # tensor types whose attributes run no code of the user's


def _quiet():
    """Switch the innermost look's profile function off if it is the one running (the
    modes' own bookkeeping needs no watching): it, to be switched on again; else ``None``."""
    watcher = sys.getprofile()
    if watcher is None or not _WATCHERS or watcher is not _WATCHERS[-1]:
        return None
    sys.setprofile(None)
    return watcher


def _unwrapped(t: Tensor) -> Tensor:
    """The tensor inside ``torch.func``'s wrappers (vmap's batched tensors, grad's)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def _storage(t: Tensor) -> int:
    """Where ``t``'s storage lies (0: none, or an empty or sparse tensor)."""
    try:
        return t.untyped_storage().data_ptr() if t.numel() else 0
    except (RuntimeError, NotImplementedError):
        return 0

# Gradient hooks registered on tensors while a loss runs: vmap's gradients and
# forward-mode AD do not run them.
_HOOKS = {Tensor.register_hook, Tensor.register_post_accumulate_grad_hook}


class Probe(NamedTuple):
    """What :func:`probe` found."""

    norms: set  # normalisations whose double backward vmap gets wrong
    wrong: set  # operations whose gradient vmap gets wrong
    written: List[str]  # buffers the inner loss writes in place
    attention_dropout: bool  # attention with dropout (fwdrev would differentiate another function)
    slow_on_cpu: Dict[str, int]  # CPU operations too large to pay vectorised: largest output size
    own_generator: bool = False  # a random operation draws from a generator of the user's
    differentiates: bool = False  # a loss calls torch.autograd.grad or backward (AUTOGRAD_CALLS)
    unread: frozenset = frozenset()  # adapted parameters the inner loss does not read (names)
    functions: Tuple[str, ...] = ()  # custom torch.autograd.Function classes the inner loss applies
    once: Tuple[str, ...] = ()  # those whose backward is @once_differentiable
    stops_gradients: bool = False  # a stop-gradient (no_grad, .data) reaches a value requiring grad
    hooks: bool = False  # a loss registers a gradient hook on a tensor (Tensor.register_hook)
    differentiates_inside: bool = False  # a loss differentiates with torch.func (grad, jacrev)
    third: frozenset = frozenset()  # normalisations whose forward-mode third derivative differs
    forward_wrong: frozenset = frozenset()  # operations whose forward-mode derivative torch gets wrong
    hooks_unseen: bool = False  # a profiler was set: hooks on graph nodes could not be looked for
    wrong_twice: Tuple[str, ...] = ()  # what torch differentiates twice wrongly (graphs.wrong_twice)
    attributes: Tuple[str, ...] = ()  # tensors a forward stores in a submodule's plain attributes
    # A loss keeps a tensor computed from a task's parameters or batch: the submodules' plain
    # attributes a forward pre-hook set that hold one, or "elsewhere" ("": none kept).
    kept: str = ""
    host_draws: bool = False  # a loss draws from NumPy's or Python's global generator
    # The error the outer loss or a custom Function's backward raised during the look ("": none):
    # what the look did not see then is unknown (review s37W F1: a NumPy draw after it, shared
    # by every task under vmap, 9.7 % off), so the tasks run one by one, which raise it again.
    raised: str = ""

    def fwdrev_obstacle(self) -> str:
        """Why forward-over-reverse HVPs would differentiate another function than the
        gradient the step took (``""``: nothing found): forward-mode AD passes through
        ``no_grad`` sections, runs a custom Function's ``jvp`` (not its backward) and no
        tensor hooks (a custom Function's forward runs under ``no_grad`` too)."""
        if self.forward_wrong:
            return f"cannot run {', '.join(sorted(self.forward_wrong))}"
        if self.functions:
            return (f"cannot run a loss that applies a custom torch.autograd.Function "
                    f"({', '.join(self.functions)}): forward-mode AD runs its jvp, not the backward the "
                    "step differentiated")
        if self.stops_gradients:
            return ("cannot run a loss with a stop-gradient made under torch.no_grad() or through .data "
                    "(use .detach()): forward-mode AD passes through it")
        if self.hooks:
            return ("cannot run a loss that registers a gradient hook on a tensor or a graph node "
                    "(Tensor.register_hook, grad_fn.register_hook): forward-mode AD does not run it")
        if self.differentiates_inside and self.third:
            return (f"cannot run a loss that differentiates itself (torch.func) through "
                    f"{', '.join(sorted(self.third))}: torch's forward-mode third derivative of it "
                    "differs from reverse mode's")
        return ""


def probe_steps(module: nn.Module, inner_loss, batches: Sequence[Any], outer_loss=None, query=None,
                adapted=None, node_hooks: bool = True) -> Probe:
    """:func:`probe` on each of ``batches`` (every step's batch of a task with per-step
    batches, where a loss may do at some steps only what decides how a sweep runs), the
    outer loss once: what any of them found (the parameters none of them reads as unread)."""
    found = probe(module, inner_loss, batches[0], outer_loss, query, adapted, node_hooks)
    for batch in batches[1:]:
        more = probe(module, inner_loss, batch, adapted=adapted, node_hooks=node_hooks)
        found = Probe(found.norms | more.norms, found.wrong | more.wrong,
                      found.written + [n for n in more.written if n not in found.written],
                      found.attention_dropout or more.attention_dropout,
                      {k: max(found.slow_on_cpu.get(k, 0), more.slow_on_cpu.get(k, 0))
                       for k in {**found.slow_on_cpu, **more.slow_on_cpu}},
                      found.own_generator or more.own_generator, found.differentiates or more.differentiates,
                      found.unread & more.unread, found.functions + tuple(
                          f for f in more.functions if f not in found.functions),
                      found.once + tuple(f for f in more.once if f not in found.once),
                      found.stops_gradients or more.stops_gradients, found.hooks or more.hooks,
                      found.differentiates_inside or more.differentiates_inside, found.third | more.third,
                      found.forward_wrong | more.forward_wrong, found.hooks_unseen or more.hooks_unseen,
                      found.wrong_twice + tuple(w for w in more.wrong_twice if w not in found.wrong_twice),
                      found.attributes + tuple(a for a in more.attributes if a not in found.attributes),
                      found.kept or more.kept, found.host_draws or more.host_draws,
                      found.raised or more.raised)
    return found


def _probe_params(module: nn.Module, adapted) -> Dict[str, Tensor]:
    """The parameters a probe evaluates the module at, detached: copies of the adapted
    ones (a forward may write them in place, and the inner loop copies them too), and
    of all of them where the module is known to write them or ``adapted`` is ``None``;
    the module's own tensors otherwise (a frozen backbone is not copied)."""
    copy_all = adapted is None or renormalises_weights(module)
    adapted = set(adapted or ())
    return {n: p.detach().clone() if copy_all or n in adapted else p.detach()
            for n, p in module.named_parameters()}


def probe(module: nn.Module, inner_loss, batch, outer_loss=None, query=None, adapted=None,
          node_hooks: bool = True) -> Probe:
    """:func:`_probe`, the attributes that hooks recompute put back after it, whatever it raised."""
    recomputed = _recomputed(module)
    try:
        return _probe(module, inner_loss, batch, outer_loss, query, adapted, node_hooks)
    finally:
        _put_back_recomputed(recomputed)


def _probe(module: nn.Module, inner_loss, batch, outer_loss=None, query=None, adapted=None,
           node_hooks: bool = True) -> Probe:
    """One evaluation of the inner loss at detached copies of the module's parameters
    (requiring gradients as the parameters do, so that a loss that differentiates runs),
    with the random states restored: what decides how a sweep may run.
    ``Probe.wrong`` also names the submodules whose gradient ``vmap`` gets wrong
    (:func:`wrong_under_vmap`), and, with ``outer_loss``, the operations one
    evaluation of it on ``query`` calls (with gradients enabled, as the sweep runs
    it; an error there is noted in ``Probe.raised``: the loop then runs it again).
    ``adapted``: the names of the parameters the inner loop adapts, which it copies
    (default ``None``: copy all; :func:`_probe_params`). ``node_hooks``: look for hooks
    registered on graph nodes (which matter to second derivatives only; the look costs a
    profiler on the loss)."""
    original = dict(module.named_buffers())
    buffers = {n: b.clone() for n, b in original.items()}
    versions = {n: b._version for n, b in buffers.items()}
    named = dict(module.named_parameters())
    params = {n: t.requires_grad_(named[n].requires_grad) for n, t in _probe_params(module, adapted).items()}
    note_probed(t for t in params.values() if t.requires_grad)
    mode = _Probe(None if adapted is None else {id(params[n]) for n in adapted if n in params})
    fm = FunctionalModel(module, params, dict(buffers))  # its own dict: a replaced buffer shows
    attributes = _attributes(module)
    devices = cuda_devices_in_use()
    batched = named if adapted is None else adapted
    batch, aten = _watched(params, batched, batch)
    hooked: List[str] = []
    # NumPy's and Python's global generators: vmap would run a draw of theirs once for every
    # task (review IB F1: a per-task np.random augmentation shared, 23 % off the loop); put back,
    # as torch's generators are, so that the look changes no draw.
    host = host_random_states()  # (compared once, after both losses: 0.2 ms a reading)
    out, _, stored = _look(inner_loss, fm, batch, (mode, aten), attributes, devices,
                           hooked if node_hooks else None, host)
    mode.hooks |= any(h != _UNWATCHED for h in hooked)
    unread, functions, raised = frozenset(), [], ""
    loss = out[0] if isinstance(out, tuple) and out else out
    twice: List[str] = []
    if isinstance(loss, Tensor) and loss.grad_fn is not None:
        reached, functions = graph_survey([loss.grad_fn])
        twice = wrong_twice([loss.grad_fn], adapted=None if adapted is None else
                            [params[n] for n in adapted if n in params])
        if adapted is not None:
            unread = frozenset(n for n in adapted if id(params[n]) not in reached)
        if functions:  # a custom Function's backward may keep what it sees (a gradient monitor:
            raised = _backward(loss, [t for t in params.values() if t.requires_grad], devices, aten)  # FF)
    # Kernels such as batch_norm write running statistics without bumping the version.
    written = [n for n, b in fm.buffers.items()
               if b is not buffers[n] or b._version != versions[n] or not torch.equal(b, original[n])]
    norms = mode.norms or aten.norms  # the F.* names where they apply, else the ATen ones
    wrong = mode.wrong | aten.wrong | wrong_under_vmap(module)
    del fm  # (a buffer the forward assigned is the probe's)
    if outer_loss is not None:
        # Detached copies: an outer loss that differentiates must not reach the parameters' hooks.
        copies = {n: params[n].detach().requires_grad_(p.requires_grad)
                  for n, p in module.named_parameters()}
        note_probed(t for t in copies.values() if t.requires_grad)
        outer = _Probe()
        query, outer_aten = _watched(copies, batched, query)
        attributes = _attributes(module)
        fm = FunctionalModel(module, copies, {n: b.clone() for n, b in original.items()})
        result, error, more = _look(outer_loss, fm, query, (outer, outer_aten), attributes, devices,
                                    hooked if node_hooks else None)
        if error:  # (the loop runs it again and raises what it raises)
            raised = raised or f"outer_loss raised {error}"
        stored += tuple(n for n in more if n not in stored)
        value = result[0] if isinstance(result, tuple) and result else result
        if isinstance(value, Tensor) and value.grad_fn is not None and graph_survey([value.grad_fn])[1]:
            raised = raised or _backward(value, [t for t in copies.values() if t.requires_grad], devices,
                                         outer_aten)
        del result, value
        wrong |= outer.wrong | outer_aten.wrong
        aten.generators.update(outer_aten.generators)
        mode.differentiates |= outer.differentiates
        mode.hooks |= outer.hooks or any(h != _UNWATCHED for h in hooked)
        del fm, copies, outer
    host_draws = host_random_states() != host
    if host_draws:
        set_host_random_states(host)
    found = Probe(norms, wrong, written, mode.attention_dropout, mode.slow_on_cpu, bool(aten.generators),
                 mode.differentiates, unread, tuple(cls.__name__ for cls in functions),
                 tuple(once_differentiable(functions)), mode.stops_gradients, mode.hooks,
                 mode.differentiates_inside, frozenset(mode.third or aten.third),
                 frozenset(aten.forward_wrong), _UNWATCHED in hooked, tuple(twice), stored,
                 host_draws=host_draws, raised=raised)
    del out, loss, params, mode, batch, query  # (the look at writes keeps the tensors it saw written)
    # An autocast region around the call keeps a cast of each leaf that requires grad until it
    # exits, the probe's copies among them: the next use casts them again.
    torch.clear_autocast_cache()
    alive = (outer_aten.kept() if outer_loss is not None else set()) | aten.kept()
    if alive:
        found = found._replace(kept=_attributes_holding(module, alive) or "elsewhere")
    return found


def _watched(params: Dict[str, Tensor], batched: Sequence[str], data: Any) -> Tuple[Any, _AtenProbe]:
    """``data`` with fresh copies of its tensors, so that one a loss keeps shows, and the ATen
    probe of a look at a loss of it, watching what ``vmap`` batches: the parameters among
    ``params`` named in ``batched`` (frozen parameters are shared) and those tensors."""
    data, held = _fresh(data)
    return data, _AtenProbe([params[n] for n in batched if n in params]
                            + [t for t in _tensors(data) if id(t) not in held], held.values())


def _look(loss, fm: FunctionalModel, data: Any, probes: Tuple[_Probe, _AtenProbe], attributes: list,
          devices: Sequence[int], hooked: Optional[List[str]],
          host: Optional[tuple] = None) -> Tuple[Any, str, Tuple[str, ...]]:
    """One evaluation ``loss(fm, data)`` for :func:`_probe`: with torch's random states kept on
    ``devices``, gradients enabled, ``probes`` (the look's :class:`_Probe` and
    :class:`_AtenProbe`) watching, the young generation's collection off (:func:`_young`) and,
    where ``hooked`` is a list, the hooks a loss registers on graph nodes noted in it; then,
    whatever it raised, the ATen probe's in-place writes undone and the module's plain
    attributes put back (``attributes``: :func:`_attributes` before it).

    Returns what the loss returned, the first line of the error it raised (``""``: none) and
    the names of the attributes it stored (:func:`_put_back_attributes`). ``host``: NumPy's and
    Python's generator states before the look, where the loss's errors propagate (the inner
    loss's; those states are put back first where it changed them); ``None``: an ``Exception``
    is returned instead (the outer loss's: the loop runs it again and raises what it raises)."""
    result, error = None, ""
    try:
        with torch_random_states_kept(devices), torch.enable_grad(), probes[0], probes[1], _young(), \
                (_watching_node_hooks(hooked) if hooked is not None else contextlib.nullcontext()):
            result = loss(fm, data)
    except BaseException as err:
        if host is not None or not isinstance(err, Exception):
            if host is not None and host_random_states() != host:
                set_host_random_states(host)
            raise
        error = _first_line(err)
    finally:
        probes[1].restore()
        stored = _put_back_attributes(attributes, fm)  # (its tensors are the probe's)
    return result, error, stored


def _recomputed(module: nn.Module) -> List[Tuple[nn.Module, str, Any]]:
    """``(submodule, key, value)`` of each attribute that one of torch's hook-based
    reparametrizations recomputes before every forward (``prune``'s and the legacy
    ``weight_norm``'s and ``spectral_norm``'s ``weight``), which :func:`_put_back_attributes`
    leaves as a forward set it: a look puts them back (:func:`_put_back_recomputed`)."""
    return [(sub, key, sub.__dict__[key]) for sub in module.modules() for h in sub._forward_pre_hooks.values()
            for key in (getattr(h, "name", None), getattr(h, "_tensor_name", None))
            if isinstance(key, str) and key in sub.__dict__]


def _put_back_recomputed(saved: List[Tuple[nn.Module, str, Any]]) -> None:
    """Put back what :func:`_recomputed` saved: after a look they held the look's tensors,
    with a graph (review s38M F1: a call refused after its look left them so, and
    ``copy.deepcopy`` of the module then raised)."""
    for sub, key, value in saved:
        sub.__dict__[key] = value


def _attributes_holding(module: nn.Module, ids: set) -> str:
    """The plain attributes of ``module``'s submodules that hold one of the tensors ``ids``
    (``weight`` of '0'), as a forward pre-hook leaves them (``torch.nn.utils.prune``, the legacy
    ``weight_norm`` and ``spectral_norm``); ``""`` if none does."""
    names = [f"{k} of {repr(n) if n else 'the model'}" for n, m in module.named_modules()
             for k, v in vars(m).items() if passes_for(v, Tensor) and id(v) in ids]
    return ", ".join(names)


def _backward(loss: Tensor, leaves: List[Tensor], devices, aten: "_AtenProbe") -> str:
    """The backward of a probe's loss, under its look (where a custom Function's backward may
    keep what it sees), with the random states restored; what an error said (``""``: none),
    which the loop raises again."""
    try:
        with torch_random_states_kept(devices), aten, _young():
            torch.autograd.grad(loss, leaves, allow_unused=True)
    except Exception as err:  # noqa: BLE001 (the loop runs it again and raises what it raises)
        return f"a custom Function's backward raised {_first_line(err)}"
    return ""


def _first_line(err: BaseException) -> str:
    """``Type: the message's first line`` (200 characters at most)."""
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"


def _tensors(tree: Any) -> List[Tensor]:
    """The tensors among a batch's leaves."""
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, Tensor)]


def fresh(tree: Any) -> Any:
    """``tree`` with its strided tensors copied (see :func:`_fresh`), for a look that
    evaluates a loss outside the sweep: what a forward writes into its input stays there."""
    return _fresh(tree)[0]


def _fresh(tree: Any) -> Tuple[Any, Dict[int, Tensor]]:
    """``tree`` with each strided tensor replaced by a fresh copy of it (``clone``: linked to
    it by autograd as a task's slice is, and a forward that writes its input in place, such as
    ``x /= 255``, writes the copy, not the user's batch: review HB F2; a subclass's own where it
    gives one of its type), and the tensors left as they are (other layouts), by id."""
    held: Dict[int, Tensor] = {}

    def alias(t):
        if not isinstance(t, Tensor):
            return t
        if t.layout == torch.strided:
            try:
                copy = t.clone()
            except Exception:  # noqa: BLE001 (a subclass without clone: kept as it is)
                copy = None
            if type(copy) is type(t):
                return copy
        held[id(t)] = t
        return t

    with torch.enable_grad():  # (linked as the losses see it: they run with gradients enabled)
        return pytree.tree_map(alias, tree), held


_YOUNG_LOCK = threading.Lock()
_YOUNG = {"depth": 0, "enabled": False}  # bodies running under _young, gc's switch before the first


def _young_after_fork() -> None:
    """A child forked while another thread ran a :func:`_young` body: a new lock, and gc's
    switch as it was before that body (the thread that would put it back is not there)."""
    global _YOUNG_LOCK
    _YOUNG_LOCK = threading.Lock()
    if _YOUNG["depth"]:
        _YOUNG["depth"] = 0
        if _YOUNG["enabled"]:
            gc.enable()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_young_after_fork)


@contextlib.contextmanager
def _young():
    """No automatic garbage collection inside: what the body makes stays in the youngest
    generation, where :meth:`_AtenProbe.kept` collects the reference cycles among it. gc's
    switch is the process's: the first body to enter turns it off and the last to leave puts it
    back, under a lock (review GC F2: two threads reading and turning it separately could leave
    it off for good)."""
    with _YOUNG_LOCK:
        if _YOUNG["depth"] == 0:
            _YOUNG["enabled"] = gc.isenabled()
            gc.disable()
        _YOUNG["depth"] += 1
    try:
        yield
    finally:
        with _YOUNG_LOCK:  # (at least 0: a child forked inside a body, which goes on, was reset)
            _YOUNG["depth"] = max(0, _YOUNG["depth"] - 1)
            if _YOUNG["depth"] == 0 and _YOUNG["enabled"]:
                gc.enable()


_MODULE_ENTRIES = frozenset(nn.Module().__dict__)  # what every module holds (its tables, hooks, flags)


_LARGE = 1024  # entries: an attribute holding more is not opened (its length is watched)
# elements: the attribute tensors a look copies (to put back in-place writes), in all (review EY: a
# model holding 150 tables of 65,536 elements in a list was 5x slower when each was copied)
_COPIED = 1 << 16

# Values not opened by _survey: tensors (leaves), modules (surveyed as submodules), code and types.
_OPAQUE = (Tensor, type, types.ModuleType,
           str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device)


class _Survey(NamedTuple):
    """What an attribute's value holds: the ids of the tensors in it (in order), a snapshot
    of each mutable container on the way (:func:`_restore`), each tensor with its version
    and (within ``_COPIED`` elements) a copy, and the length of a value too large to open."""
    tensors: Tuple[int, ...] = ()
    snapshots: Tuple[Tuple[Any, Any], ...] = ()
    versions: Tuple[Tuple[Tensor, int, Optional[Tensor]], ...] = ()
    size: Optional[int] = None


_UNSET = object()  # an unset slot


def _contents(value: Any) -> Optional[Tuple[Any, Any]]:
    """``(children, snapshot)`` of a container a forward may fill or mutate in place: a
    dict (its values), list or deque (its items), an object with a ``__dict__``
    (``SimpleNamespace``, a dataclass, a class of the user's or a library's, not the standard
    library's) or ``__slots__`` (its fields), a tensor's own attributes, a module kept out of
    the registered submodules (its attributes and tables), a function's closure cells; a
    tuple (named or not), a bound method's object, a function's defaults, a
    ``functools.partial``'s arguments and what a live ``weakref.ref`` points to are opened
    without a snapshot. ``None``: not opened.
    Kinds are told by type first (:func:`~torch_ufom.losses.passes_for`): an object whose
    ``__class__`` raises is opened as an object (review s40R3 F2: isinstance raised, and such
    an object, not opened, was not put back after a look's forward wrote into it)."""
    if passes_for(value, Tensor):  # (its own attributes: self.t.meta = h)
        return list(value.__dict__.values()), (dict(value.__dict__), {})
    if passes_for(value, _OPAQUE):
        return None
    if passes_for(value, nn.Module):  # (one kept out of the registered submodules: object.__setattr__)
        attrs = {k: v for k, v in value.__dict__.items() if k not in _MODULE_ENTRIES}
        # its tables are dicts, opened (and put back) as such (review FA: a buffer it reassigned)
        return list(attrs.values()) + [value._buffers, value._modules, value._parameters], ("module", attrs)
    if passes_for(value, (types.MethodType, types.BuiltinMethodType)):  # (review FA: Recorder().push)
        owner = getattr(value, "__self__", None)
        return ([] if owner is None or passes_for(owner, (types.ModuleType, type)) else [owner]), None
    if passes_for(value, dict):
        return list(value.values()), dict(value)
    if passes_for(value, (list, collections.deque)):
        return list(value), list(value)
    if passes_for(value, tuple):
        return list(value), None
    if passes_for(value, types.FunctionType):  # (its closure's cells, rebound by nonlocal, and defaults)
        cells = [(c, c.cell_contents if cell_filled(c) else _UNSET) for c in value.__closure__ or ()]
        return ([v for _, v in cells if v is not _UNSET] + list(value.__defaults__ or ())
                + list((value.__kwdefaults__ or {}).values()), ("cells", cells))
    if passes_for(value, functools.partial):
        return list(value.args) + list(value.keywords.values()), None
    if passes_for(value, weakref.ref):  # (a live one opens as what it points to: review s40R4 F3, a
        target = value()  # tensor a forward wrote through one was left advanced by the look)
        return ([] if target is None else [target]), None
    if type(value).__module__.partition(".")[0] in sys.stdlib_module_names \
            and not passes_for(value, types.SimpleNamespace):
        return None  # (a logger, a lock: the objects a forward does not keep its tensors in)
    fields: Dict[str, Any] = {}
    own = getattr(value, "__dict__", None)
    if isinstance(own, dict):
        fields.update(own)
    # (review s40H F1: a private slot, __cache, is read under its mangled name; its own walk of
    # the classes missed it, and a forward keeping a tensor there was refused for another reason)
    slots = [n for n in slot_names(type(value)) if n not in ("__dict__", "__weakref__")]
    for name in slots:
        fields[name] = getattr(value, name, _UNSET)
    if not fields and not isinstance(own, dict):
        return None
    return [v for v in fields.values() if v is not _UNSET], (dict(own) if isinstance(own, dict) else None,
                                                              {n: fields[n] for n in slots})


def _size(value: Any) -> Optional[int]:
    """The length of a dict, list, deque or tuple (``None`` for anything else)."""
    return len(value) if passes_for(value, (dict, list, collections.deque, tuple)) else None


def _survey(value: Any, registered: frozenset = frozenset(), versions: bool = False) -> _Survey:
    """The tensors in ``value`` and snapshots of the containers that hold them, opened to any
    depth (each once), and with ``versions`` each tensor's version (and no copy yet:
    :func:`_attributes` makes them); a value of more than ``_LARGE`` entries in all (a
    vocabulary, a long history) is not opened (review EV: a 100,000-entry dict made each
    meta-batch call 75x slower): only its length is kept. The modules whose ids are in
    ``registered`` (the model's own submodules, looked at each on its own) are not opened
    (review FA: a reference to the root in each of 100 layers made a call 9x slower)."""
    tensors: List[Tensor] = []
    snapshots: List[Tuple[Any, Any]] = []
    seen, stack, count = set(registered), [value], 0
    while stack:
        item = stack.pop()
        # (by type first: isinstance reads __class__, which raises for a weakref.proxy whose
        # object is gone, a back-reference to an owner: review s40H2 F1, a meta-batch crashed)
        if passes_for(item, Tensor):
            tensors.append(item)  # (and its own attributes, self.t.meta = h: review FB, below)
        if id(item) in seen:
            continue
        seen.add(id(item))
        try:
            opened = _contents(item)
        except Exception:  # noqa: BLE001 (an object whose fields cannot be read is not opened)
            opened = None
        if opened is None:
            continue
        children, snapshot = opened
        count += len(children)
        if count > _LARGE:
            return _Survey(size=_size(value))
        if snapshot is not None:
            snapshots.append((item, snapshot))
        stack.extend(reversed(children))
    # (inference tensors have no version counter, and cannot be written outside inference mode)
    kept = tuple((t, t._version, None) for t in tensors if versions and not t.is_inference())
    return _Survey(tuple(id(t) for t in tensors), tuple(snapshots), kept)


def _is_batched(t: Tensor) -> bool:
    """Whether ``t`` is a tensor of a ``torch.func`` transform (a look's copy would fail). What
    only passes for a tensor (a ``weakref.proxy`` of one) is asked through ``t.detach()``, a real
    one: torch's check reads its argument as a tensor without checking its type, and answered
    at random for a proxy (review s40R3/R4: a look then sometimes kept no copy of a tensor a
    forward wrote through one, and raised where it falls back); a mock's answer is ``False``."""
    if not issubclass(type(t), Tensor):
        t = t.detach()
        if not issubclass(type(t), Tensor):
            return False
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def _same(now: Dict[Any, Any], then: Dict[Any, Any]) -> bool:
    """Whether dict ``now`` holds the very values of ``then``, under the same keys."""
    return len(now) == len(then) and all(k in now and now[k] is v for k, v in then.items())


def _unchanged(item: Any, snapshot: Any) -> bool:
    """Whether the container ``item`` still holds what ``snapshot`` (:func:`_contents`) saw."""
    if isinstance(item, dict):
        return _same(item, snapshot)
    if isinstance(item, (list, collections.deque)):
        return len(item) == len(snapshot) and all(a is b for a, b in zip(item, snapshot))
    if snapshot[0] == "cells":
        return all((c.cell_contents is v) if cell_filled(c) else v is _UNSET for c, v in snapshot[1])
    if snapshot[0] == "module":
        now = {k: v for k, v in item.__dict__.items() if k not in _MODULE_ENTRIES}
        return _same(now, snapshot[1])
    attrs, slots = snapshot
    return ((attrs is None or _same(item.__dict__, attrs))
            and all(getattr(item, n, _UNSET) is v for n, v in slots.items()))


def _restore(snapshots: Sequence[Tuple[Any, Any]]) -> None:
    """Put back, in place, the contents of the containers :func:`_survey` snapshotted that
    changed since (one that cannot be put back, a read-only dict, is left)."""
    for item, snapshot in snapshots:
        try:
            if _unchanged(item, snapshot):
                continue
            if isinstance(item, dict):
                item.clear()
                item.update(snapshot)
            elif isinstance(item, list):
                item[:] = snapshot
            elif isinstance(item, collections.deque):
                item.clear()
                item.extend(snapshot)
            elif snapshot[0] == "cells":
                for cell, v in snapshot[1]:
                    if v is not _UNSET:
                        cell.cell_contents = v
                    elif cell_filled(cell):  # (review FA: filled by nonlocal during the look)
                        del cell.cell_contents
            elif snapshot[0] == "module":
                for k in [k for k in item.__dict__ if k not in _MODULE_ENTRIES and k not in snapshot[1]]:
                    del item.__dict__[k]
                item.__dict__.update(snapshot[1])
            else:
                attrs, slots = snapshot
                if attrs is not None:
                    item.__dict__.clear()
                    item.__dict__.update(attrs)
                for name, v in slots.items():
                    if v is _UNSET:
                        if hasattr(item, name):
                            object.__delattr__(item, name)
                    else:
                        object.__setattr__(item, name, v)
        except Exception:  # noqa: BLE001
            pass


def _tensor_ids(value: Any, registered: frozenset = frozenset()) -> Tuple[int, ...]:
    """The ids of the tensors in ``value`` (:func:`_survey`)."""
    return _survey(value, registered).tensors


def _attributes(module: nn.Module) -> List[Tuple[str, nn.Module, Dict[str, Any]]]:
    """Each submodule of ``module`` (with its qualified name) and what its plain attributes
    (its ``__dict__`` but the entries every module has) hold: the value and its
    :func:`_survey`, for :func:`_put_back_attributes`. The tensors found, smallest first
    (a counter before a table: review FA), are copied up to ``_COPIED`` elements in all; the
    model's own parameters and buffers are not (the looks run at copies of them)."""
    registered = frozenset(id(m) for m in module.modules())
    saved = [(prefix, sub, {k: (v, _survey(v, registered, versions=True)) for k, v in sub.__dict__.items()
                            if k not in _MODULE_ENTRIES})
             for prefix, sub in module.named_modules(remove_duplicate=False)]
    own = {id(t) for t in module.parameters()} | {id(t) for t in module.buffers()}
    found = {id(t): t for _, _, entries in saved for _, survey in entries.values()
             for t, _, _ in survey.versions if id(t) not in own and not _is_batched(t)}
    copies, left = {}, _COPIED
    for t in sorted(found.values(), key=lambda t: t.numel()):  # (a weakref.proxy of one too: s40R3 F4)
        if t.numel() > left:
            break
        left -= t.numel()
        copies[id(t)] = t.detach().clone()
    for _, sub, entries in saved:
        for key, (v, survey) in entries.items():
            if survey.versions:
                entries[key] = (v, survey._replace(versions=tuple((t, version, copies.get(id(t)))
                                                                  for t, version, _ in survey.versions)))
        # (review FB: a submodule, a parameter or a buffer in a None slot registered by a forward)
        entries[_TABLES] = tuple((table, dict(getattr(sub, table))) for table in _TABLE_NAMES)
    return saved


_TABLES = object()  # the key of a submodule's registered tables in what _attributes saves
_TABLE_NAMES = ("_parameters", "_buffers", "_modules")


def _put_back_attributes(saved: List[Tuple[str, nn.Module, Dict[str, Any]]],
                         given: Optional[FunctionalModel] = None) -> Tuple[str, ...]:
    """Put back every plain attribute whose tensors a forward changed since :func:`_attributes`
    (``self.h = ...``, ``self.cache["w"] = ...``: a state or a memo kept between calls),
    containers filled and objects mutated in place included (:func:`_survey`), tensors it
    held written in place (``self.calls += 1``: put back from the copy the look kept, else a
    ``RuntimeError``), lists too large to open grown (cut back) and each submodule's tables
    of registered parameters, buffers and submodules, and return the qualified names of those that
    tell of state kept between calls. Not those that now hold only the module's own
    parameters and buffers, nor, where they held tensors before, those that hold only what
    ``given`` runs at (an RNN's ``_flat_weights``, which its forward takes from its
    parameters: put back); a memo of the parameters themselves (``self._w = self.a.weight``
    at the first call) tells (review EV). Those that torch's hook-based reparametrizations
    recompute before every forward (``prune``'s and the legacy ``weight_norm``'s and
    ``spectral_norm``'s ``weight``) are left as they are."""
    names: List[str] = []
    lost: List[Tuple[str, int]] = []  # tensors written in place that no copy puts back
    root = saved[0][1] if saved else None
    own = {id(t) for t in root.parameters()} | {id(t) for t in root.buffers()} if root is not None else set()
    registered = frozenset(id(m) for m in root.modules()) if root is not None else frozenset()
    ran_at = own | ({id(t) for t in given.params.values()} | {id(t) for t in given.buffers.values()}
                    if given is not None else set())
    for prefix, sub, before in saved:
        now = sub.__dict__
        hooks = sub._forward_pre_hooks.values()
        recomputed = {getattr(h, attr, None) for h in hooks for attr in ("name", "_tensor_name")}
        for table, then in before.get(_TABLES, ()):
            held = getattr(sub, table)
            if not _same(held, then):
                names += [f"{prefix}.{k}" if prefix else k
                          for k in held if k not in then or held[k] is not then[k]]
                held.clear()
                held.update(then)
                for key in [k for k in now if k not in _MODULE_ENTRIES and k not in before]:
                    del now[key]  # (and what goes with the tables: a ParameterList's _size)
                now.update({k: entry[0] for k, entry in before.items() if k is not _TABLES})
        for key in [k for k in now if k not in _MODULE_ENTRIES and k not in recomputed]:
            value, survey = before.get(key, (None, _Survey()))
            current = now[key]
            written = [(t, copy) for t, version, copy in survey.versions
                       if t._version != version and id(t) not in own]  # (review EX: self.calls += 1)
            grown = survey.size is not None and value is current and _size(current) != survey.size
            held = _tensor_ids(current, registered)
            if key in before and value is current and not written and not grown and held == survey.tensors:
                continue
            if not written and not grown and own.issuperset(held):
                continue  # (none, or the module's own)
            if key not in before:
                del now[key]
            else:
                now[key] = value
                _restore(survey.snapshots)  # (filled or mutated in place)
                with torch.no_grad():
                    for t, copy in written:
                        if copy is not None:
                            t.copy_(copy)
                if grown and passes_for(value, list) and len(value) > survey.size:
                    del value[survey.size:]  # (a long history a forward appended to)
            name = f"{prefix}.{key}" if prefix else key
            if written or grown or not (survey.tensors and ran_at.issuperset(held)):
                names.append(name)
            lost += [(name, t.numel()) for t, copy in written if copy is None]
    if lost:  # (review EY: left advanced, the loop that then ran started elsewhere, 22 % off)
        raise RuntimeError(
            f"the module's forward writes in place tensors it keeps in plain attributes ("
            f"{', '.join(f'self.{n}: {size:,} elements' for n, size in lost[:3])}), and the library's "
            f"look at the losses, which ran the forward, keeps copies of {_COPIED:,} elements of them "
            "at most, so it could not put them back: keep such state in buffers (register_buffer), "
            "which the library copies, or reset it yourself before each call")
    return tuple(names)


@contextlib.contextmanager
def attributes_kept(module: nn.Module):
    """Put back, on exit, what forwards stored in ``module``'s plain attributes meanwhile
    (:func:`_put_back_attributes`): a vectorised sweep's tensors must not outlive ``vmap``."""
    saved = _attributes(module)
    try:
        yield
    finally:
        _put_back_attributes(saved)


def reads_meta_directly(module: nn.Module, inner_loss, batch, meta: Sequence[Tensor],
                        adapted=None) -> bool:
    """Whether the inner loss reads a meta-parameter other than through the adapted
    parameters of the ``fmodel`` it is given (``model.parameters()``, ``model(x)``, a
    captured tensor, or a parameter the loop does not adapt, which the ``fmodel`` reads
    as the module's own tensor: an inner rate that is a module parameter and that the
    forward reads too, review s34J F1): one evaluation at detached copies of the adapted
    parameters and the module's own other ones, requiring grad as the module's do (a loss
    that asserts its output has a graph runs as in the sweep: review s37R4 F1, at copies that
    required none it failed, was taken for one that reads none, and fwdrev dropped the read,
    0.83 off), under ``enable_grad`` with the random states restored, whose graph is
    searched for the meta-parameters (no gradient is computed, so no hook runs). An error of
    the loss raises :class:`LookFailed`."""
    targets = {id(t) for t in meta if t.requires_grad}
    targets |= {id(t._base) for t in meta if t.requires_grad and t._base is not None}
    if not targets:
        return False
    named = dict(module.named_parameters())
    params = {n: t.requires_grad_(named[n].requires_grad) for n, t in _probe_params(module, adapted).items()}
    if adapted is not None:  # (the loop's own read of a parameter it does not adapt)
        kept = set(adapted)
        params.update({n: p for n, p in module.named_parameters()
                       if n not in kept and (id(p) in targets or id(root_of(p)) in targets)})
    loss = _evaluated(module, inner_loss, batch, params)
    return graph_reaches([loss.grad_fn], targets)


def _evaluated(module: nn.Module, inner_loss, batch, params: Dict[str, Tensor],
               generators: bool = True) -> Tensor:
    """The inner loss at ``params`` with copies of the module's buffers, under ``enable_grad``,
    the random states and (``generators``) the user's generators put back. An error the loss
    raises, or a value the library refuses, is a :class:`LookFailed`: what the look would have
    found is unknown (review s37W2 F1: taken for "not found", a loss failing once vectorised an
    optimised TorchScript, 0.56 off)."""
    fm = FunctionalModel(module, params, {n: b.clone() for n, b in module.named_buffers()})
    batch = fresh(batch)  # (a forward that writes its input writes the copy)
    devices = cuda_devices_in_use()
    aten = _AtenProbe() if generators else contextlib.nullcontext()  # for the user's generators
    attributes, recomputed = _attributes(module), _recomputed(module)
    try:
        with torch_random_states_kept(devices), torch.enable_grad(), aten:
            out = inner_loss(fm, batch)
    except Exception as err:  # noqa: BLE001
        raise LookFailed(f"inner_loss raised {_first_line(err)}") from err
    finally:
        if generators:
            aten.restore()
        _put_back_attributes(attributes, fm)  # (a memo of these copies would hide the sweep's own)
        _put_back_recomputed(recomputed)
    try:
        return loss_and_aux(out, "inner_loss")[0]
    except (TypeError, ValueError) as err:  # (review s37LK F2: taken for "nothing found", 4.3e-2 off)
        raise LookFailed(f"inner_loss returned what the library refuses ({_first_line(err)})") from err


class LookFailed(Exception):
    """A loss raised during a look at it (:func:`reads_meta_directly`,
    :func:`runs_optimised_script`): what the look would have found is unknown."""


def runs_optimised_script(module: nn.Module, inner_loss, batches: Sequence[Any], adapted=None,
                          generators: bool = True) -> bool:
    """Whether the inner loss runs TorchScript that the JIT has optimised into a differentiable
    graph, however the loss reaches it (a scripted function called from a method, held as an
    attribute, many calls deep: :func:`~torch_ufom.functional_model.scripted` looks only at names):
    evaluations at detached copies of the module's parameters under ``enable_grad``, with the
    random states restored, whose graphs are searched for the JIT's own backward node. The JIT
    optimises a graph once it has profiled it (``torch._C._jit_get_num_profiled_runs()``
    runs), so each batch is evaluated that many times more, until one shows it; a function the
    JIT leaves unfused differentiates as torch does. An error of the loss raises
    :class:`LookFailed`.
    ``generators=False``: the probe found that the loss draws from no generator of the
    user's, whose states then need no watch."""
    runs = getattr(torch._C, "_jit_get_num_profiled_runs", lambda: 1)() + 1
    named = dict(module.named_parameters())
    for batch in batches:
        for _ in range(runs):
            params = {n: t.requires_grad_(named[n].requires_grad)
                      for n, t in _probe_params(module, adapted).items()}
            loss = _evaluated(module, inner_loss, batch, params, generators)
            if any("DifferentiableGraph" in node.name() for node in graph_nodes([loss.grad_fn])):
                return True
    return False


def wrong_under_vmap(module: nn.Module) -> set:
    """The submodules of ``module`` whose gradient ``vmap`` gets wrong, by kind
    (``_WRONG_UNDER_VMAP``'s names): found whichever loss calls them, without running one."""
    return {"Embedding with padding_idx" for m in module.modules()
            if isinstance(m, nn.Embedding) and m.padding_idx is not None}


_TENSOR = object()  # where a tensor stood among an aux's leaves


def group_by_truncation(truncations: Sequence[int]) -> Dict[int, List[int]]:
    """Task indices grouped by truncation point, in increasing ``K``."""
    groups: Dict[int, List[int]] = {}
    for i, K in enumerate(truncations):
        groups.setdefault(int(K), []).append(i)
    return dict(sorted(groups.items()))


class Vectorised:
    """The :class:`~torch_ufom.protocols.Evaluator` of ``size`` tasks stacked along a
    leading task dimension: ``torch.func.vmap`` of ``torch.func.grad`` of the
    user's losses, which see one task's batch as in the per-task loop.

    The inner rule acts elementwise on the stacked tensors (the built-in rules
    do), the memory schedules and the two-stream estimator run unchanged, and
    vector-Jacobian products go through ``torch.autograd`` on top of ``vmap``.
    The module's buffers are shared by the tasks and must not be written by
    the losses (:func:`probe` tells), and every random operation draws
    independently per task (``vmap(randomness="different")``) from the step's
    stream, so a model with dropout gets valid but different masks than the
    per-task loop.

    Args:
        size: the number of tasks.
        unread_names: the adapted parameters the inner loss reads at no step
            (:func:`probe_steps` on the first task), which the loop cannot see
            through ``torch.func.grad``'s zeros.
    """

    def __init__(self, size: int, unread_names: frozenset = frozenset()):
        self.size = size
        self.unread_names = unread_names

    def stack(self, params):
        """Each task's copy of the initial parameters (:meth:`~torch_ufom.protocols.Evaluator.stack`)."""
        # A copy, not an expanded view: forward-mode AD writes into its inputs' tangents.
        return tuple(p.unsqueeze(0).expand(self.size, *p.shape).clone() for p in params)

    def grad(self, loop, state, batch, create_graph, fmodel=None):
        """``(losses, grads, buffers)`` of every task's inner loss by ``vmap(grad)``
        (:meth:`~torch_ufom.protocols.Evaluator.grad`)."""
        def one(params, b):  # each task's module comes from loop.fmodel inside vmap (fmodel unused)
            def loss_of(ps):
                loss, _ = loss_and_aux(watched_loss(loop, loop.fmodel(ps, state.buffers), b), "inner_loss")
                return loss, loss

            grads, loss = torch.func.grad(loss_of, has_aux=True)(params)
            return loss, grads

        # With create_graph, torch.autograd records through vmap(grad) for the
        # reverse sweep's second derivatives; without, nothing is recorded.
        with torch.enable_grad() if create_graph else torch.no_grad():
            loss, grads = torch.func.vmap(one, randomness="different")(tuple(state.params), batch)
        if loop.none_buffers:  # (the swaps put them back: review LC F6; refused as per task)
            loop.check_none_buffers()
        return loss, tuple(grads), state.buffers

    def hvp(self, loop, state, batch, vec):
        """Every task's ``(H v, loss)`` by ``vmap(jvp(grad))``
        (:meth:`~torch_ufom.protocols.Evaluator.hvp`)."""
        def one(ps, vs, b):
            def loss_of(pp):
                loss = loss_and_aux(watched_loss(loop, loop.fmodel(pp, state.buffers), b), "inner_loss")[0]
                return loss, loss

            _, hv, loss = jvp(torch.func.grad(loss_of, has_aux=True), (ps,), (vs,), has_aux=True)
            return hv, loss

        return torch.func.vmap(one, randomness="different")(tuple(state.params), vec, batch)

    def outer(self, loop, params, state):
        """Every task's outer loss and aux by ``vmap``, their summed gradient and the
        buffers (:meth:`~torch_ufom.protocols.Evaluator.outer`)."""
        # vmap returns tensors only: the aux's other values (Python numbers, strings) go
        # around it, the same for every task since vmap runs the loss once.
        held = {}

        def one(ps, qb):
            loss, aux = loss_and_aux(loop.outer_loss(loop.fmodel(ps, state.buffers), qb), "outer_loss")
            leaves, held["spec"] = pytree.tree_flatten(aux)
            held["values"] = [_TENSOR if isinstance(v, Tensor) else v for v in leaves]
            return loss, [v for v in leaves if isinstance(v, Tensor)]

        losses, tensors = torch.func.vmap(one, randomness="different")(params, loop.query)
        stacked = iter(tensors)
        aux = pytree.tree_unflatten([next(stacked) if v is _TENSOR else v for v in held["values"]],
                                    held["spec"])
        if loop.keeps_aux:  # (before the gradient, whose hooks would run: review s39R4 F1)
            check_kept_aux(aux)
        check_depends(losses, "outer_loss")  # vmap's batched tensors hide requires_grad
        total = losses.sum()
        grads = torch.autograd.grad(total, params + tuple(loop.meta), allow_unused=True,
                                    retain_graph=loop.retains(total))
        return losses, aux, grads, state.buffers  # (a loss writing buffers runs per task: probe)

    def reduce(self, adjoint):
        """The tasks share the initial parameters: their adjoints add up."""
        return adjoint.sum(0)
