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

Both are driven by the same two calls, ``forward`` then ``reverse``.
"""
from __future__ import annotations

from typing import Iterator, List

from .unroll import InnerLoop, State, StepRecord

__all__ = ["Schedule", "Store", "Recompute", "make_schedule", "MEMORY_CHOICES"]

MEMORY_CHOICES = ("recompute", "store")


class Schedule:
    """Base class: ``forward`` runs steps ``start+1..stop``, ``reverse`` yields their records."""

    def forward(self, loop: InnerLoop, state: State, start: int, stop: int, losses: List) -> State:
        """Run steps ``start+1..stop`` from ``state``; append their losses; return ``s_stop``."""
        raise NotImplementedError

    def reverse(self) -> Iterator[StepRecord]:
        """Yield the records of steps ``stop, ..., start+1``."""
        raise NotImplementedError


class Store(Schedule):
    """Keep every step's graph from the forward pass (``O(K)`` memory, no replay)."""

    def forward(self, loop, state, start, stop, losses):
        self.records: List[StepRecord] = []
        for j in range(start + 1, stop + 1):
            rec = loop.record(state, j)
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
            yield self.loop.record(state, j)


def make_schedule(memory: str) -> Schedule:
    """The schedule for a ``memory`` setting (one of ``MEMORY_CHOICES``)."""
    if memory == "store":
        return Store()
    if memory == "recompute":
        return Recompute()
    raise ValueError(f"Invalid memory: {memory!r} (expected one of {', '.join(MEMORY_CHOICES)})")
