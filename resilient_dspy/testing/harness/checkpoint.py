"""A middleware that journals what passes it, so a run shows exactly what the layer above it let through."""

from __future__ import annotations

import asyncio
from typing import Any

from resilient_dspy.core.call import Call, Handler
from resilient_dspy.testing.harness.records import ProgramEntry, current_call, current_recorder

__all__ = ["Checkpoint"]


class Checkpoint:
    """A middleware that journals every call passing it (start, end, error): place it below a layer to see exactly
    what that layer let through, e.g. admissions below a RateLimiter or probes below a CircuitBreaker.

    With ``follows_leases=True`` (below a Bulkhead) a call's passage pauses while it lends its permit (a Cache's
    single-flight follower waiting, see :class:`~resilient_dspy.core.call.Lease`): the journal then holds the spans
    during which the call held a permit, one entry each."""

    def __init__(self, name: str = "Checkpoint", *, follows_leases: bool = False) -> None:
        self.name = name
        self.follows_leases = follows_leases
        self.journal: list[ProgramEntry] = []

    async def __call__(self, call: Call, next: Handler) -> Any:
        values = list(call.inputs.values())
        span = _Span(self, call, str(values[0]) if values else "")
        attempts = call.record.attempts
        leases = None
        if self.follows_leases:
            leases = call.record.leases
            if leases is None:
                leases = call.record.leases = []
            leases.append(span)
        try:
            return await next(call)
        except asyncio.CancelledError:
            span.entry.cancelled = True
            raise
        except Exception as error:
            span.entry.error = error
            raise
        finally:
            if span.held:
                span.entry.ended = call.clock.now()
            span.entry.reached = call.record.attempts != attempts
            if leases is not None:
                leases.remove(span)


class _Span:
    """A call's passage through a :class:`Checkpoint` as a lease: lending ends its journal entry, reclaiming
    starts the next one."""

    __slots__ = ("call", "checkpoint", "entry", "held", "question")

    def __init__(self, checkpoint: Checkpoint, call: Call, question: str) -> None:
        self.checkpoint = checkpoint
        self.call = call
        self.question = question
        self.held = True
        self.entry = self._start()

    def _start(self) -> ProgramEntry:
        entry = ProgramEntry(current_call.get(), self.question, None, self.call.clock.now())
        recorder = current_recorder.get()
        entry.events_before = None if recorder is None else len(recorder.events)
        self.checkpoint.journal.append(entry)
        return entry

    def lend(self) -> None:
        if self.held:
            self.held = False
            self.entry.ended = self.call.clock.now()

    async def reclaim(self, call: Call) -> None:
        if not self.held:
            self.held = True
            self.entry = self._start()
