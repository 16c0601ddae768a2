"""Memory schedules: how the exact sweep gets the inner states it needs.

The exact reverse sweep visits steps ``j = stop, stop-1, ..., start+1`` and
needs the state ``s_{j-1}`` of each, with that step's graph. A schedule runs
the forward pass over those steps and then yields one
:class:`~torch_ufom.records.StepRecord` per step in reverse order:

* :class:`Store` keeps every step's graph from the forward pass: ``O(K)``
  memory, no recomputation (the classic unrolled graph).
* :class:`Recompute` keeps only ``s_start`` and replays the inner loop from it
  for every reverse step: constant memory, ``K (K - 1) / 2`` extra inner
  steps (the paper's scheme).
* :class:`Checkpoint` follows a binomial (Revolve) schedule, the one
  ``checkpoint_schedules.Revolve`` gives (:func:`revolve_actions` builds the
  same actions faster): at most ``slots`` stored states plus one step's
  graph, about ``K log K`` replayed steps (``K = 1000, slots = 8``: 4,285
  replays, against 499,500 for :class:`Recompute`). By default it is sized
  by a byte budget measured on the sweep's first step: every graph when they
  fit (like :class:`Store`), else as many slots as fit; with a fixed
  ``slots``, a sweep of ``K <= slots`` steps keeps its ``K`` graphs.

Each is one call, :meth:`Schedule.sweep`, which runs the forward pass and
returns the final state with an iterator over the records in reverse order;
everything a sweep keeps lives in that iterator, and every inner-loss
evaluation is reported to the caller's :class:`SweepLog`.
"""
from __future__ import annotations

import functools
import itertools
import warnings
from typing import Dict, Iterator, List, Optional, Protocol, Tuple

import checkpoint_schedules as cs
import torch
from torch import Tensor

from .batches import SAMPLES_ANEW
from .checks import invalid, is_int
from .process import caller_level
from .protocols import Loop, State, SweepPlan
from .randomness import host_random_states
from .randomness import REPLAY_DRAWS
from .records import StepRecord

__all__ = ["Schedule", "SweepLog", "Store", "Recompute", "Checkpoint", "make_schedule", "check_slots",
           "check_max_memory", "check_checkpoint", "budget_slots", "least_memory", "revolve_actions",
           "MEMORY_CHOICES", "DEFAULT_BUDGET_STEPS", "NODE_BYTES", "TENSOR_BYTES", "replays_reproduce"]

MEMORY_CHOICES = ("checkpoint", "recompute", "store")


class SweepLog(Protocol):
    """Where a sweep reports each inner-loss evaluation (see
    :class:`~torch_ufom.estimators.SweepLog`): ``first`` for the forward pass,
    ``again`` for replays and rebuilds; ``exact`` for a step rebuilt with a graph.
    ``count`` is the number of forward-pass steps reported."""

    count: int

    def first(self, loss: Tensor, exact: bool) -> None:
        """A step of the forward pass."""

    def again(self, loss: Tensor, exact: bool, j: int, compare: bool) -> None:
        """Step ``j`` evaluated again (a replay or a rebuild); ``compare``: from the
        forward pass's own state, so that its loss must be the forward pass's."""


class Schedule:
    """Base class: :meth:`sweep` runs steps ``start+1..stop`` and returns ``s_stop``
    with an iterator over their records in reverse order."""

    def sweep(self, loop: Loop, state: State, start: int, stop: int, log: SweepLog,
              plan: SweepPlan) -> Tuple[State, Iterator[StepRecord]]:
        """Run steps ``start+1..stop`` from ``state``, reporting each loss to ``log``.

        Steps ``j > plan.exact_after`` are recorded with the exact rule's graph,
        earlier ones for the first-order rule only. Returns ``(s_stop, records)``:
        ``records`` yields the records of steps ``stop, ..., start+1``.
        """
        raise NotImplementedError

    def keeps_every_graph(self, steps: int) -> bool:
        """Whether a sweep over ``steps`` steps may record each of them once, in order,
        from the forward pass, so that ``SweepPlan.connected`` can chain them (a
        schedule that then decides otherwise makes records that are not linked)."""
        return False


class Store(Schedule):
    """Keep every step's graph from the forward pass (``O(K)`` memory, no replay)."""

    def keeps_every_graph(self, steps):
        return True

    def sweep(self, loop, state, start, stop, log, plan):
        records: List[StepRecord] = []
        for j in range(start + 1, stop + 1):
            rec = loop.record(state, j, plan)
            log.first(rec.loss, rec.is_exact)
            if rec.linked and records and records[-1].linked:
                # Linked records are differentiated together (chain_vjp), which reads only the
                # newest record's outputs and the oldest one's inputs: the others let go of
                # their states, so that what the graph does not save (a momentum buffer, Adam's
                # moments) is freed instead of kept for every step.
                records[-1].release(keep_inputs=len(records) == 1 or not records[-2].linked)
                rec.release_inputs()
            records.append(rec)
            state = rec.next_state

        def reverse():
            while records:
                yield records.pop()

        return state, reverse()


class _Again:
    """A sweep's evaluations of steps again (replays, rebuilds): the first runs watched for
    draws from a generator of the user's, which no step's stream replays, so every
    evaluation again would draw other numbers (:data:`~torch_ufom.randomness.REPLAY_DRAWS`);
    with per-step batches (a ``j -> batch`` callable may draw at some steps only) every
    one does. Such a draw that changes the loss's value is also caught by comparing each
    loss evaluated again with the forward pass's; one that changes only its gradient (a
    straight-through estimator) is caught only here."""

    def __init__(self, loop: Loop, memory: str):
        self.loop, self.memory, self.watched = loop, memory, False
        self.host_watched: set = set()  # the steps evaluated again around which NumPy's and Python's
        # generators were read: the first of all, with per-step batches the first of each step
        # (reading both costs about 50 us: every replay's made recompute over 40 per-step
        # batches 1.5x slower, review FF; the first one's alone missed draws at later steps, FG)

    def advance(self, state: State, j: int):
        """:meth:`Loop.advance`, watched if first."""
        return self._run(lambda: self.loop.advance(state, j), j)

    def record(self, state: State, j: int, plan: SweepPlan) -> StepRecord:
        """:meth:`Loop.record`, watched if first."""
        return self._run(lambda: self.loop.record(state, j, plan), j)

    def _run(self, run, j: int):
        if self.watched and not self.loop.per_step:
            return run()
        key = j if self.loop.per_step else 0
        host = None if key in self.host_watched else host_random_states()
        self.host_watched.add(key)
        self.watched = True
        out, drew = self.loop.draws_own_generator(run)
        if drew:
            sampler = REPLAY_SAMPLER_DRAWS if self.loop.step_function else ""  # (review s39Y F1)
            raise RuntimeError(REPLAY_DRAWS.format(memory=self.memory) + sampler)
        if host is not None and host_random_states() != host:  # (review FC: straight-through NumPy noise)
            anew = f". Or {SAMPLES_ANEW}" if self.loop.step_function else ""  # (review s35R F3)
            raise RuntimeError(REPLAY_HOST_DRAWS.format(memory=self.memory) + anew)
        return out


REPLAY_SAMPLER_DRAWS = (
    ". Or the j -> batch callable draws from one, even a generator it seeds afresh for each step, "
    "which the library cannot tell from one that draws anew: give the batches as StepBatches, or "
    "pass memory='store'")


REPLAY_HOST_DRAWS = (
    "inner_loss draws from NumPy's or Python's global random generator (np.random, random), which no "
    "step's random stream replays: memory='{memory}' evaluates inner steps again, and each evaluation "
    "would draw other numbers than the forward pass did, so the sweep would differentiate another "
    "function (their states changed while a step evaluated again ran, the first one or, with per-step "
    "batches, a step's first: a draw of the loss's, even one that only decides what to log, or of "
    "another thread's meanwhile). Draw from torch's "
    "global generator (torch.rand, torch.randn: each step's stream reseeds it), or pass "
    "memory='store', which evaluates each step once")


def replays_reproduce(state: State) -> bool:
    """Whether a step replayed from a recomputed state repeats the forward pass's
    arithmetic, so that every loss evaluated again must equal the forward pass's: the
    state lies on the CPU (whose kernels add up in a fixed order), or deterministic
    algorithms are on (not warn-only). Otherwise (CUDA's atomic sums) recomputed states
    drift by rounding, and only losses at the forward pass's own states are compared."""
    if torch.are_deterministic_algorithms_enabled() \
            and not torch.is_deterministic_algorithms_warn_only_enabled():
        return True
    return all(t.device.type == "cpu" for part in state for t in part)


class Recompute(Schedule):
    """Keep ``s_start`` only and replay from it for each reverse step (constant memory)."""

    def sweep(self, loop, state, start, stop, log, plan):
        base, every, again = state, replays_reproduce(state), _Again(loop, "recompute")
        for j in range(start + 1, stop + 1):
            state, loss, _ = loop.advance(state, j)
            log.first(loss, False)

        def reverse():
            for j in range(stop, start, -1):
                s = base
                for i in range(start + 1, j):
                    s, loss, _ = again.advance(s, i)
                    log.again(loss, False, i, every or i == start + 1)  # from s_start, the forward pass's
                rec = again.record(s, j, plan)
                log.again(rec.loss, rec.is_exact, j, every or j == start + 1)
                yield rec

        return state, reverse()


class Checkpoint(Schedule):
    """Binomial checkpointing (Revolve): stored states, ``O(K log K)`` replays.

    With ``slots=N`` (an int), a sweep over ``K <= N`` steps keeps every
    step's graph, as :class:`Store` does (no replay; Revolve would store every
    state and then replay each step once to rebuild its graph), and a longer
    one runs Revolve with ``N`` stored states: memory at most ``N`` step
    graphs or ``N`` states, independent of ``steps``.

    With ``slots=None`` (the default) the sweep is sized by the byte budget
    ``max_memory``: its first step is recorded and measured (``G``, the bytes
    its record keeps besides the state: the tensors saved in its graph and its
    gradient when kept; ``|s|``, the bytes of one inner state), and
    :func:`budget_slots` decides between keeping every step's graph (when
    ``K`` of them fit, by bytes) and Revolve with the most slots that fit. The
    first step's record is reused either way, so the step counts are those of
    the chosen schedule. Under ``hvp="fwdrev"`` (which ``"auto"`` picks for
    vectorised meta-batches of normalisation layers) a record keeps no graph,
    and each forward-over-reverse HVP's working memory (the batch's activations,
    their tangents, the gradient's) is counted in ``W`` from the first step's
    gradient taken once more with a graph (``H``, its bytes).

    Args:
        slots: ``None`` (sized by ``max_memory``) or the number of stored inner
            states, an int ``>= 1``.
        max_memory: the byte budget of a sized sweep: ``None`` for the default
            ``DEFAULT_BUDGET_STEPS * (G + N + |s|) + W`` (what keeping every graph
            costs for that many steps), or an int ``>= 1``. Only with
            ``slots=None``.
    """

    def __init__(self, slots: Optional[int] = None, max_memory: Optional[int] = None):
        self.slots, self.max_memory = check_checkpoint(slots, max_memory)

    def keeps_every_graph(self, steps):
        # Under a byte budget the choice is made after measuring the first step: a
        # sweep that then runs Revolve records step by step (its records are not linked).
        return self.slots is None or steps <= self.slots

    def sweep(self, loop, state, start, stop, log, plan):
        n = stop - start
        if n == 0 or (self.slots is not None and n <= self.slots):
            return Store().sweep(loop, state, start, stop, log, plan)
        if self.slots is not None:
            return _Revolve.run(loop, state, (start, revolve_actions(n, self.slots)), log, plan)
        if self.max_memory is None and n <= DEFAULT_BUDGET_STEPS:  # the default budget keeps every
            return Store().sweep(loop, state, start, stop, log, plan)  # graph up to that, unmeasured
        first, state_bytes, record_bytes, node_bytes, hvp_bytes = _probe(loop, state, start + 1, stop, plan,
                                                                        self.max_memory is not None)
        slots = budget_slots(n, state_bytes, record_bytes, self.max_memory, node_bytes, hvp_bytes)
        least = least_memory(state_bytes, record_bytes, node_bytes, hvp_bytes)
        if slots is not None and n > 2 and self.max_memory is not None and self.max_memory < least:
            warnings.warn(f"max_memory={self.max_memory} is below the least a sweep of this model "
                          f"is estimated to need, about {least} bytes (one checkpoint and the working "
                          "memory, from the first step's graph): it runs with one slot, whose replays "
                          "grow as steps**2 / 2",
                          stacklevel=caller_level())
        if slots is None:  # every graph fits: keep them, the measured step's included
            log.first(first.loss, first.j > plan.exact_after)
            last, records = Store().sweep(loop, first.next_state, start + 1, stop, log, plan)
            return last, itertools.chain(records, (first,))
        ahead = (first.next_state.detach(), first.loss)  # the first step's result, no graph
        del first
        return _Revolve.run(loop, state, (start, revolve_actions(n, slots)), log,
                            plan._replace(connected=False), ahead)


class _Revolve:
    """One checkpointed sweep: the working state, the stored states and the
    recorded steps, driven by the Revolve schedule's actions.

    ``Forward(n0, n1)`` advances the working state (storing it first as
    checkpoint ``n0`` when ``write_ics``, and recording each step's graph when
    ``write_adj_deps``); ``Reverse(n1, n0)`` hands the recorded steps to the
    sweep, newest first; ``Copy`` / ``Move`` restore the working state from a
    checkpoint (``Move`` frees it). ``ahead``, when given, is the first step's
    result ``(s_{start+1}, loss)`` already computed (by the measured step of a
    budget-sized sweep): the first advance of step ``start+1`` takes it
    instead of running the step again.
    """

    def __init__(self, loop, state, schedule: Tuple[int, Tuple], log, plan, ahead=None):
        self.loop, self.state, self.log, self.plan = loop, state, log, plan
        self.start, actions = schedule  # the sweep's first step - 1, and Revolve's actions
        self.actions: Iterator = iter(actions)
        self.checkpoints: Dict[int, State] = {}
        self.records: Dict[int, StepRecord] = {}
        self.ahead = ahead
        # Whether the working state is the forward pass's, bit for bit (a replay from it
        # recomputes that step's loss, which SweepLog.again compares), and the stored
        # states that are: a replay through a kernel that adds in a varying order (CUDA's
        # atomics) drifts, so only losses of undrifted states are compared, unless every
        # replay reproduces the forward pass (replays_reproduce).
        self.original, self.originals = True, set()
        self.every = replays_reproduce(state)
        self.again = _Again(loop, "checkpoint")

    @classmethod
    def run(cls, loop, state, schedule: Tuple[int, Tuple], log, plan, ahead=None):
        """The forward pass: ``(s_stop, records in reverse order)``, as :meth:`Schedule.sweep`."""
        run = cls(loop, state, schedule, log, plan, ahead)
        run.carry_out(until=cs.EndForward, first=True)
        return run.state, run.reverse()

    def carry_out(self, until, first: bool = False):
        """Carry out actions up to the next ``until`` (returned)."""
        for action in self.actions:
            if isinstance(action, until):
                return action
            if isinstance(action, cs.Forward):
                self._forward(action, first)
            elif isinstance(action, (cs.Copy, cs.Move)):
                table = self.checkpoints
                self.state = table.pop(action.n) if isinstance(action, cs.Move) else table[action.n]
                self.original = action.n in self.originals
            elif not isinstance(action, cs.EndForward):
                raise RuntimeError(f"unexpected checkpointing action {action!r}")
        return None

    def _forward(self, action, first: bool):
        if action.write_ics:
            self.checkpoints[action.n0] = self.state
            if self.original:
                self.originals.add(action.n0)
            else:
                self.originals.discard(action.n0)
        log, loop = self.log, (self.loop if first else self.again)

        def report(loss, exact, j):
            if first:
                log.first(loss, exact)
            else:
                log.again(loss, exact, j, self.original or self.every)
                self.original = False

        for n in range(action.n0, action.n1):
            j = self.start + n + 1
            if action.write_adj_deps:
                rec = loop.record(self.state, j, self.plan)
                self.records[n + 1], self.state = rec, rec.next_state
                report(rec.loss, rec.is_exact, j)
            elif n == 0 and self.ahead is not None:
                (self.state, loss), self.ahead = self.ahead, None
                report(loss, False, j)
            else:
                self.state, loss, _ = loop.advance(self.state, j)
                report(loss, False, j)

    def reverse(self):
        """Yield the recorded steps, newest first, replaying as the schedule says."""
        while True:
            action = self.carry_out(until=(cs.Reverse, cs.EndReverse))
            if not isinstance(action, cs.Reverse):
                return
            for n in range(action.n1, action.n0, -1):
                yield self.records.pop(n)


# -- the Revolve schedule ------------------------------------------------------------------
# checkpoint_schedules.Revolve(n, c) fills a dynamic-programming table of the
# optimal cost of every (length, slots) pair: O(n^2 c) Python operations, 27 s
# for n = 1000, c = 64. The table has a closed form (Griewank and Walther [4]),
# used below to emit the same actions in O(n log n).
#
# With l = n - 1 and every forward or reverse step of unit cost, Revolve's
# graph-free steps for n steps and c slots number
#     f(c, l) = t (l + 1) - C(c + t, c + 1),  t = reps(c, l),
# the smallest t with C(c + t, t) >= l + 1 (the repetition number). f grows by
# reps(c, l) from l - 1 to l, so it is convex in l. Revolve stores the working
# state, advances it j steps, reverses the last l - j + 1 steps with c - 1
# slots, restores the stored state and reverses the first j steps with c
# slots: j minimises g(j) = j + f(c - 1, l - j) + f(c, j - 1), a convex
# function of j whose increments are
#     g(j) - g(j - 1) = 1 - reps(c - 1, l - j + 1) + reps(c, j - 1);
# checkpoint_schedules takes the largest minimiser, found here by bisection.


@functools.lru_cache(maxsize=4096)
def _reps(slots: int, length: int) -> int:
    """The repetition number: the smallest ``t`` with ``C(slots + t, t) >= length + 1``."""
    if slots == 1:
        return length
    t, reach = 0, 1
    while reach < length + 1:
        t += 1
        reach = reach * (slots + t) // t
    return t


def _split(length: int, slots: int) -> int:
    """The largest ``j`` in ``1..length-1`` minimising ``g(j)`` (see above)."""
    best, lo, hi = 1, 2, length - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        if 1 - _reps(slots - 1, length - mid + 1) + _reps(slots, mid - 1) <= 0:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def _revolve_ops(length: int, slots: int, base: int, store: bool = True) -> Iterator[Tuple]:
    """The operations reversing steps ``base .. base + length + 1`` with ``slots``
    stored states, the working state at ``base``, in order: ``("store", n)``,
    ``("advance", n0, n1)``, ``("record", n0, n1)``, ``("reverse", n1, n0)``,
    ``("restore", n)``. ``store=False``: the state at ``base`` is stored already.

    Revolve's recursion (split at ``j``: reverse the part after ``j`` with one slot
    fewer, then the part before it) runs on an explicit stack: its depth grows with
    ``slots``, which may be close to ``steps``, beyond Python's recursion limit. The
    operations are yielded as the stack produces them, so that only the stack
    (``O(slots)`` items) is held, not the ``O(steps log steps)`` operations."""
    todo: List[Tuple] = [("reverse part", length, slots, base, store)]  # last item runs first
    while todo:
        item = todo.pop()
        if item[0] != "reverse part":
            yield item
            continue
        _, length, slots, base, store = item
        if length == 0:
            yield ("record", base, base + 1)
            yield ("reverse", base + 1, base)
            continue
        if store:
            yield ("store", base)
        if length == 1 or slots == 1:  # advance to each step from the stored state, last step first
            for i in range(length, 0, -1):
                if i != length:
                    yield ("restore", base)
                yield ("advance", base, base + i)
                yield ("record", base + i, base + i + 1)
                yield ("reverse", base + i + 1, base + i)
            yield ("restore", base)
            yield ("record", base, base + 1)
            yield ("reverse", base + 1, base)
            continue
        j = _split(length, slots)
        yield ("advance", base, base + j)
        todo += [("reverse part", j - 1, slots, base, False), ("restore", base),
                 ("reverse part", length - j, slots - 1, base + j, True)]


def revolve_actions(steps: int, slots: int) -> Iterator:
    """The Revolve schedule's actions for ``steps`` and ``slots``, built as they are
    consumed.

    The same actions, one for one, as ``checkpoint_schedules.Revolve(steps,
    slots)`` (``tests/test_checkpoint.py`` compares them), built from the
    closed form of its cost table in ``O(steps log steps)`` time (about 10 ms at
    1,000 steps and 8 slots, against 27 s for ``Revolve`` at 64 slots) and
    ``O(slots)`` memory: a sweep holds the next action only, and nothing is
    cached (a list of them held about 1 KB per step, beyond any budget of a small
    model at 10,000 steps).
    """
    done, previous = 0, ("",)
    for op in _revolve_ops(steps - 1, slots, 0):
        if op[0] in ("advance", "record"):
            stored = op[0] == "advance" and previous[0] == "store"
            yield cs.Forward(op[1], op[2], stored, op[0] == "record",
                             cs.StorageType.RAM if stored else cs.StorageType.WORK)
            if op[2] == steps:
                yield cs.EndForward()
        elif op[0] == "reverse":
            yield cs.Reverse(op[1], op[2], True)
            done += 1
        elif op[0] == "restore":  # the last use of a stored state frees it
            last = op[1] == steps - done - 1
            yield (cs.Move if last else cs.Copy)(op[1], cs.StorageType.RAM, cs.StorageType.WORK)
        previous = op
    yield cs.EndReverse()


# -- sizing a sweep by a byte budget -----------------------------------------------------------
DEFAULT_BUDGET_STEPS = 128
# What one node of autograd's graph keeps besides its saved tensors' storages (the node,
# its saved variables' tensor objects, the allocator's slack): 0.7 to 1 KB measured on a
# CPU (transformer, LSTM, MLP layers). A model of many small ops keeps more in nodes than
# in saved storages (40 Linear(8, 8) layers: 12x).
NODE_BYTES = 1024
# What one tensor of a stored state keeps besides its storage (the tensor and storage
# objects, the allocator's rounding): a state of 80 small tensors (40 Linear(8, 8) layers)
# held 1.9 to 2 times its bytes.
TENSOR_BYTES = 256
# The working memory holds the nodes of about two records (the one consumed, and the graph
# its VJP builds): measured peaks put it between one (a transformer layer) and 3.5 (40
# Linear(8, 8) layers).
WORK_NODES = 2.0
# Fitted to peaks measured on a CPU (resident set, glibc's allocator) for the MLP
# 64-320-320-10 (G = 0.5 |s|) and conv4 on 5 images (G = 14 |s|), with some margin.
# W, the memory of a sweep besides what it stores, in records and states: the working
# state, the record being consumed, the adjoints, the VJP's temporaries, the allocator's
# slack around them (6.5 |s| + 0.8 G of live tensors on the MLP, 14 to 17 |s| resident).
WORK_RECORDS, WORK_STATES = 3.5, 16.0
# Under hvp="fwdrev" a record keeps no graph, and each forward-over-reverse HVP's working
# memory (the batch's activations, their tangents, the gradient's) comes on top: counted
# as this many times H, the bytes of the first step's gradient graph taken by reverse mode.
# Fitted with a margin to resident peaks: per task, Linear(64, 320)-LayerNorm-Tanh-Linear(320, 10)
# needs about 4 H (review KA F1: 46.3 MiB at batch 2,048 where 2.5 H gave a least of 29.1 MiB),
# conv nets without normalisation about 3 H, the MLP 64-320-320-10 2.2 H; vectorised, 8 tasks
# of the LayerNorm MLP at batch 512, 2.2 H (99 MiB under recompute, H = 37 MiB).
WORK_HVP = 4.5
# One checkpoint: its state, and the fragmentation of the heap around long-lived states
# (1.15 to 1.26 |s| resident per slot on the MLP, |s| of live tensors).
SLOT_STATES = 1.35


def least_memory(state_bytes: int, record_bytes: int, node_bytes: int = 0, hvp_bytes: int = 0) -> int:
    """The least memory of a checkpointed sweep, ``1.35 |s| + W`` bytes: one slot and the
    working memory (:func:`budget_slots`)."""
    return int(SLOT_STATES * state_bytes + _work(state_bytes, record_bytes, node_bytes, hvp_bytes))


def _work(state_bytes: int, record_bytes: int, node_bytes: int, hvp_bytes: int = 0) -> float:
    """``W``: the working memory of a sweep besides what it stores."""
    return WORK_RECORDS * record_bytes + WORK_NODES * node_bytes + WORK_STATES * state_bytes \
        + WORK_HVP * hvp_bytes


def budget_slots(steps: int, state_bytes: int, record_bytes: int,
                 max_memory: Optional[int] = None, node_bytes: int = 0, hvp_bytes: int = 0) -> Optional[int]:
    """How a sweep of ``steps`` steps fits in ``max_memory`` bytes.

    Keeping every step's record costs ``steps (G + N + |s|) + W`` bytes,
    Revolve with ``n`` slots ``1.35 n |s| + W``, where ``G = record_bytes``
    (the storages a record keeps), ``N = node_bytes`` (its graph's nodes),
    ``|s| = state_bytes`` and ``W = 3.5 G + 2 N + 16 |s| + 4.5 H`` (the working
    memory besides what the sweep stores, with about two records' nodes at a
    time; ``H = hvp_bytes``, under ``hvp="fwdrev"`` the bytes of a step's
    gradient graph, which stands for each HVP's working memory; the factor 1.35
    is the allocator's slack around long-lived states).
    ``max_memory=None`` is ``DEFAULT_BUDGET_STEPS (G + N + |s|) + W``: every
    record is kept up to 128 steps, and longer sweeps get
    ``128 (G + N + |s|) / (1.35 |s|)`` slots, whatever the steps (see
    ``docs/maths.md#costs-and-memory-of-each-schedule``).

    Returns:
        ``None`` to keep every record (also for ``steps <= 1``), else the slots
        for Revolve: the most that fit, at least 1 (a budget below
        ``1.35 |s| + W`` cannot be met: one slot is the least memory) and at
        most ``steps - 1`` (more would change nothing).
    """
    per_step = record_bytes + node_bytes + state_bytes
    work = _work(state_bytes, record_bytes, node_bytes, hvp_bytes)
    budget = DEFAULT_BUDGET_STEPS * per_step + work if max_memory is None else max_memory
    if steps <= 1 or steps * per_step + work <= budget:
        return None
    fit = int((budget - work) // (SLOT_STATES * max(state_bytes, 1)))
    return max(1, min(steps - 1, fit))


def _probe(loop, state: State, j: int, stop: int, plan: SweepPlan, hvp: bool = True):
    """Record step ``j`` (the sweep's first) and measure it: ``(record, |s|, G, N, H)``.

    ``|s|`` is the bytes of ``state`` or of the state after it, whichever is
    larger, with ``TENSOR_BYTES`` per tensor; ``G`` those the record keeps besides its
    input and output states (the tensors saved in its graph, found by walking
    autograd's graph, which works under ``torch.func.vmap`` where saved-tensor
    hooks do not, and its gradient when kept), each storage counted once; ``N``
    ``NODE_BYTES`` per node of the graph, held in host memory (0 for a record on
    an accelerator, whose budget is the device's memory). In a
    sweep whose first steps are first-order and last ones exact, the probe is
    recorded as an exact step keeping its gradient too (a record the
    first-order VJP can use), so that ``G`` is the exact records'. ``H``: for a
    forward-over-reverse record (which keeps no graph, and whose HVPs build
    one's worth of activations and tangents at a time), the bytes of step ``j``'s
    gradient taken once more by reverse mode with a graph, its saved tensors
    included; 0 otherwise, and without ``hvp`` (the default budget, from which
    ``W`` cancels out: review KA F2, where measuring it only cost one more
    evaluation of the loss).
    """
    if plan.exact_after >= j and plan.exact_after < stop:
        plan = SweepPlan(j - 1, max(plan.first_order_until, j))
    record = loop.record(state, j, plan)
    # The next state too: an initial state may share tensors (Adam's m and v start as one
    # zero tensor), which every later state, the ones the slots hold, keeps apart.
    state_bytes = max(_bytes(_tensors(state), set()), _bytes(_tensors(record.next_state), set())) \
        + TENSOR_BYTES * max(len(_tensors(state)), len(_tensors(record.next_state)))
    own = {_storage(t)[0] for t in _tensors((record.next_state, state))}
    inside = [t for t in _tensors(tuple(getattr(record, "__dict__", {}).values()))]
    saved, nodes = _saved(inside)
    on_host = all(t.device.type == "cpu" for t in _tensors(record.next_state))
    hvp_bytes = 0
    if hvp and record.forward_over_reverse:  # its HVPs' working memory: the gradient's graph, by reverse mode
        leaves, grads = loop.gradient_graph(record.leaves, j)
        hvp_bytes = _bytes(list(grads) + _saved(list(grads))[0], own)
        del leaves, grads
    return record, state_bytes, _bytes(inside + saved, own), NODE_BYTES * nodes if on_host else 0, hvp_bytes


def _tensors(tree) -> List[Tensor]:
    """The tensors in nested tuples and lists."""
    if isinstance(tree, Tensor):
        return [tree]
    if isinstance(tree, (tuple, list)):
        return [t for item in tree for t in _tensors(item)]
    return []


def _saved(roots: List[Tensor]) -> Tuple[List[Tensor], int]:
    """The tensors saved by every node of autograd's graph reachable from ``roots``, and
    the number of nodes."""
    seen, found = set(), []
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            if name.startswith("_saved_") or name == "saved_tensors":
                try:
                    found += _tensors(getattr(node, name))
                except RuntimeError:  # freed, or not readable here: nothing to count
                    continue
        stack += [nxt for nxt, _ in node.next_functions if nxt is not None]
    return found, len(seen)


_CUDA_BLOCK = 512  # the CUDA caching allocator's rounding of every block (kMinBlockSize)


def _storage(t: Tensor) -> Tuple[int, int]:
    """``(key, bytes)`` of the memory under ``t``: its storage, a sparse tensor's indices
    and values, or the tensor itself."""
    if t.layout == torch.sparse_coo:  # an embedding's sparse gradient, saved by the next step
        parts = [_storage(x) for x in (t._indices(), t._values())]
        return parts[1][0], sum(size for _, size in parts)
    try:
        storage = t.untyped_storage()
        size = storage.nbytes()
        if storage.device.type == "cuda":  # (review s38CU F4: CUDA's caching allocator hands out blocks
            size = -(-size // _CUDA_BLOCK) * _CUDA_BLOCK  # of whole 512-byte units)
        return storage.data_ptr(), size
    except (RuntimeError, NotImplementedError):  # no plain storage (a wrapper subclass)
        return id(t), t.numel() * t.element_size()



def _bytes(tensors: List[Tensor], skip: set) -> int:
    """The bytes under ``tensors``, each storage once, leaving out the keys in ``skip``."""
    sizes = dict(_storage(t) for t in tensors)
    return sum(size for key, size in sizes.items() if key not in skip)


def check_slots(slots) -> Optional[int]:
    """Validate the number of checkpoint slots (``None``, or an int ``>= 1``)."""
    if slots is None:
        return None
    if not is_int(slots) or slots < 1:
        raise invalid("slots", slots, "None, sized by max_memory, or an int >= 1", is_int(slots))
    return int(slots)


def check_max_memory(max_memory) -> Optional[int]:
    """Validate the byte budget (``None`` for the default, or an int ``>= 1``)."""
    if max_memory is None:
        return None
    if not is_int(max_memory) or max_memory < 1:
        raise invalid("max_memory", max_memory, "None, the default budget, or an int number of bytes >= 1",
                      is_int(max_memory))
    return int(max_memory)


def check_checkpoint(slots, max_memory) -> Tuple[Optional[int], Optional[int]]:
    """Validate ``slots`` and ``max_memory`` together: at most one of them is given."""
    slots, max_memory = check_slots(slots), check_max_memory(max_memory)
    if slots is not None and max_memory is not None:
        raise ValueError(f"Invalid max_memory: {max_memory!r} sizes the checkpoints, but "
                         f"slots={slots!r} fixes their number; give one of them")
    return slots, max_memory


def make_schedule(memory: str, slots: Optional[int] = None, max_memory: Optional[int] = None) -> Schedule:
    """The schedule for a ``memory`` setting (one of ``MEMORY_CHOICES``)."""
    if memory == "checkpoint":
        return Checkpoint(slots, max_memory)
    if memory == "store":
        return Store()
    if memory == "recompute":
        return Recompute()
    raise ValueError(f"Invalid memory: {memory!r} (expected one of {', '.join(MEMORY_CHOICES)})")
