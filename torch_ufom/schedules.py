"""Memory schedules: how the exact sweep gets the inner states it needs.

The exact reverse sweep visits steps ``j = stop, stop-1, ..., start+1`` and
needs the state ``s_{j-1}`` of each, with that step's graph. A schedule runs
the forward pass over those steps and then yields one
:class:`~torch_ufom.unroll.StepRecord` per step in reverse order:

* :class:`Store` keeps every step's graph from the forward pass: ``O(K)``
  memory, no recomputation (the classic unrolled graph).
* :class:`Recompute` keeps only ``s_start`` and replays the inner loop from it
  for every reverse step: constant memory, ``K (K - 1) / 2`` extra inner
  steps (the paper's scheme).
* :class:`Checkpoint` follows a binomial (Revolve) schedule from the
  ``checkpoint_schedules`` package: at most ``slots`` stored states plus one
  step's graph, about ``K log K`` replayed steps (``K = 1000, slots = 8``:
  4,285 replays, against 499,500 for :class:`Recompute`); a sweep of
  ``K <= slots`` steps keeps its ``K`` graphs, like :class:`Store`.

Each is one call, :meth:`Schedule.sweep`, which runs the forward pass and
returns the final state with an iterator over the records in reverse order;
everything a sweep keeps lives in that iterator, and every inner-loss
evaluation is reported to the caller's :class:`SweepLog`.
"""
from __future__ import annotations

import functools
from typing import Dict, Iterator, List, Protocol, Tuple

import checkpoint_schedules as cs
from torch import Tensor

from .unroll import Loop, State, StepRecord, SweepPlan

__all__ = ["Schedule", "SweepLog", "Store", "Recompute", "Checkpoint", "make_schedule", "check_slots",
           "MEMORY_CHOICES"]

MEMORY_CHOICES = ("checkpoint", "recompute", "store")


class SweepLog(Protocol):
    """Where a sweep reports each inner-loss evaluation (see
    :class:`~torch_ufom.estimators.SweepLog`): ``first`` for the forward pass,
    ``again`` for replays and rebuilds; ``exact`` for a step rebuilt with a graph."""

    def first(self, loss: Tensor, exact: bool) -> None:
        """A step of the forward pass."""

    def again(self, loss: Tensor, exact: bool) -> None:
        """A step evaluated again (a replay or a rebuild)."""


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
        """Whether a sweep over ``steps`` steps records each of them once, in order,
        from the forward pass (so that ``SweepPlan.connected`` can chain them)."""
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
            records.append(rec)
            state = rec.next_state

        def reverse():
            while records:
                yield records.pop()

        return state, reverse()


class Recompute(Schedule):
    """Keep ``s_start`` only and replay from it for each reverse step (constant memory)."""

    def sweep(self, loop, state, start, stop, log, plan):
        base = state
        for j in range(start + 1, stop + 1):
            state, loss, _ = loop.advance(state, j)
            log.first(loss, False)

        def reverse():
            for j in range(stop, start, -1):
                s = base
                for i in range(start + 1, j):
                    s, loss, _ = loop.advance(s, i)
                    log.again(loss, False)
                rec = loop.record(s, j, plan)
                log.again(rec.loss, rec.is_exact)
                yield rec

        return state, reverse()


class Checkpoint(Schedule):
    """Binomial checkpointing (Revolve): ``slots`` stored states, ``O(K log K)`` replays.

    A sweep over ``K <= slots`` steps keeps every step's graph instead, as
    :class:`Store` does (no replay; Revolve would store every state and then
    replay each step once to rebuild its graph): memory is then at most
    ``slots`` step graphs, still independent of ``steps``. Longer sweeps run
    :class:`_Revolve`.

    Args:
        slots: the number of stored inner states, ``>= 1``.
    """

    def __init__(self, slots: int = 8):
        self.slots = check_slots(slots)

    def keeps_every_graph(self, steps):
        return steps <= self.slots

    def sweep(self, loop, state, start, stop, log, plan):
        if stop - start <= self.slots:
            return Store().sweep(loop, state, start, stop, log, plan)
        run = _Revolve(loop, state, (start, revolve_actions(stop - start, self.slots)), log, plan)
        run.carry_out(until=cs.EndForward, first=True)
        return run.state, run.reverse()


class _Revolve:
    """One checkpointed sweep: the working state, the stored states and the
    recorded steps, driven by the Revolve schedule's actions.

    ``Forward(n0, n1)`` advances the working state (storing it first as
    checkpoint ``n0`` when ``write_ics``, and recording each step's graph when
    ``write_adj_deps``); ``Reverse(n1, n0)`` hands the recorded steps to the
    sweep, newest first; ``Copy`` / ``Move`` restore the working state from a
    checkpoint (``Move`` frees it).
    """

    def __init__(self, loop, state, schedule: Tuple[int, Tuple], log, plan):
        self.loop, self.state, self.log, self.plan = loop, state, log, plan
        self.start, actions = schedule  # the sweep's first step - 1, and Revolve's actions
        self.actions: Iterator = iter(actions)
        self.checkpoints: Dict[int, State] = {}
        self.records: Dict[int, StepRecord] = {}

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
            elif not isinstance(action, cs.EndForward):
                raise RuntimeError(f"unexpected checkpointing action {action!r}")
        return None

    def _forward(self, action, first: bool):
        if action.write_ics:
            self.checkpoints[action.n0] = self.state
        report = self.log.first if first else self.log.again
        for n in range(action.n0, action.n1):
            j = self.start + n + 1
            if action.write_adj_deps:
                rec = self.loop.record(self.state, j, self.plan)
                self.records[n + 1], self.state = rec, rec.next_state
                report(rec.loss, rec.is_exact)
            else:
                self.state, loss, _ = self.loop.advance(self.state, j)
                report(loss, False)

    def reverse(self):
        """Yield the recorded steps, newest first, replaying as the schedule says."""
        while True:
            action = self.carry_out(until=(cs.Reverse, cs.EndReverse))
            if not isinstance(action, cs.Reverse):
                return
            for n in range(action.n1, action.n0, -1):
                yield self.records.pop(n)


@functools.lru_cache(maxsize=64)
def revolve_actions(steps: int, slots: int) -> Tuple:
    """The Revolve schedule's actions for ``steps`` and ``slots``, computed once.

    Building the schedule is pure Python and costs about 3 s at 1,000 steps,
    so every later ``backward`` with the same sizes reuses the list. The
    actions are immutable records.
    """
    actions = []
    for action in cs.Revolve(steps, slots):
        actions.append(action)
        if isinstance(action, cs.EndReverse):
            break
    return tuple(actions)


def check_slots(slots) -> int:
    """Validate the number of checkpoint slots (an int ``>= 1``)."""
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise ValueError(f"Invalid slots: {slots!r} (expected an int >= 1)")
    return slots


def make_schedule(memory: str, slots: int = 8) -> Schedule:
    """The schedule for a ``memory`` setting (one of ``MEMORY_CHOICES``)."""
    if memory == "checkpoint":
        return Checkpoint(slots)
    if memory == "store":
        return Store()
    if memory == "recompute":
        return Recompute()
    raise ValueError(f"Invalid memory: {memory!r} (expected one of {', '.join(MEMORY_CHOICES)})")
