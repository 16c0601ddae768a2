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

Both are driven by the same two calls, ``forward`` then ``reverse``.
"""
from __future__ import annotations

import functools
from typing import Dict, Iterator, List, Tuple

import checkpoint_schedules as cs

from .unroll import InnerLoop, State, StepRecord

__all__ = ["Schedule", "Store", "Recompute", "Checkpoint", "make_schedule", "check_slots",
           "MEMORY_CHOICES"]

MEMORY_CHOICES = ("checkpoint", "recompute", "store")


class Schedule:
    """Base class: ``forward`` runs steps ``start+1..stop``, ``reverse`` yields their records."""

    def forward(self, loop: InnerLoop, state: State, start: int, stop: int, losses) -> State:
        """Run steps ``start+1..stop`` from ``state``; ``losses.append`` each step's
        loss; return ``s_stop``.

        Steps ``j > loop.exact_after`` are recorded with the exact rule's graph,
        earlier ones for the first-order rule only.
        """
        raise NotImplementedError

    def reverse(self) -> Iterator[StepRecord]:
        """Yield the records of steps ``stop, ..., start+1``."""
        raise NotImplementedError


class Store(Schedule):
    """Keep every step's graph from the forward pass (``O(K)`` memory, no replay)."""

    def forward(self, loop, state, start, stop, losses):
        self.records: List[StepRecord] = []
        for j in range(start + 1, stop + 1):
            rec = loop.record(state, j, j > loop.exact_after)
            losses.append(rec.loss)
            self.records.append(rec)
            state = rec.next_state
        return state

    def reverse(self):
        while self.records:
            yield self.records.pop()


class Recompute(Schedule):
    """Keep ``s_start`` only and replay from it for each reverse step (constant memory)."""

    def forward(self, loop, state, start, stop, losses):
        self.loop, self.base, self.start, self.stop = loop, state, start, stop
        for j in range(start + 1, stop + 1):
            state, loss, _ = loop.advance(state, j)
            losses.append(loss)
        return state

    def reverse(self):
        for j in range(self.stop, self.start, -1):
            state = self.base
            for i in range(self.start + 1, j):
                state = self.loop.advance(state, i)[0]
            yield self.loop.record(state, j, j > self.loop.exact_after)


class Checkpoint(Schedule):
    """Binomial checkpointing (Revolve): ``slots`` stored states, ``O(K log K)`` replays.

    The schedule's actions are interpreted as follows: ``Forward(n0, n1)``
    advances the working state (storing it first as checkpoint ``n0`` when
    ``write_ics``, and recording each step's graph when ``write_adj_deps``);
    ``Reverse(n1, n0)`` hands the recorded steps to the sweep, newest first;
    ``Copy`` / ``Move`` restore the working state from a checkpoint (``Move``
    frees it).

    A sweep over ``K <= slots`` steps keeps every step's graph instead, as
    :class:`Store` does (no replay; Revolve would store every state and then
    replay each step once to rebuild its graph): memory is then at most
    ``slots`` step graphs, still independent of ``steps``.

    Args:
        slots: the number of stored inner states, ``>= 1``.
    """

    def __init__(self, slots: int = 8):
        self.slots = check_slots(slots)

    def forward(self, loop, state, start, stop, losses):
        self.loop, self.start, self.state = loop, start, state
        self.checkpoints: Dict[int, State] = {}
        self.records: Dict[int, StepRecord] = {}
        self.store = None
        if stop - start <= self.slots:
            # Every state fits: Revolve would store them all, then replay each step
            # once for its graph; keeping the graphs at once skips those replays.
            self.store = Store()
            return self.store.forward(loop, state, start, stop, losses)
        if stop == start:
            self.actions = iter(())
            return state
        self.actions = iter(revolve_actions(stop - start, self.slots))
        self._run(until=cs.EndForward, losses=losses)
        return self.state

    def _run(self, until, losses=None):
        """Carry out actions up to the next ``until`` (or ``Reverse``, which is returned)."""
        for action in self.actions:
            if isinstance(action, until):
                return action
            if isinstance(action, cs.Forward):
                self._forward(action, losses)
            elif isinstance(action, (cs.Copy, cs.Move)):
                table = self.checkpoints
                self.state = table.pop(action.n) if isinstance(action, cs.Move) else table[action.n]
            elif not isinstance(action, cs.EndForward):
                raise RuntimeError(f"unexpected checkpointing action {action!r}")
        return None

    def _forward(self, action, losses):
        if action.write_ics:
            self.checkpoints[action.n0] = self.state
        for n in range(action.n0, action.n1):
            j = self.start + n + 1
            if action.write_adj_deps:
                rec = self.loop.record(self.state, j, j > self.loop.exact_after)
                self.records[n + 1], self.state, loss = rec, rec.next_state, rec.loss
            else:
                self.state, loss, _ = self.loop.advance(self.state, j)
            if losses is not None:
                losses.append(loss)

    def reverse(self):
        if self.store is not None:
            yield from self.store.reverse()
            return
        while True:
            action = self._run(until=(cs.Reverse, cs.EndReverse))
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
