"""What a harness run records: each call's result, the events with the call that emitted them, program runs.

:data:`current_call` and :data:`current_recorder` are set in every harness call's task, so whatever a call causes
(an event, a journal entry) is attributed to it.
"""

from __future__ import annotations

import asyncio
import math
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

from resilient_dspy.events import Event
from resilient_dspy.faults import Fault

__all__ = ["CallResult", "EventRecorder", "ProgramEntry", "RecordedEvent", "Run", "current_call", "current_recorder"]

current_call: ContextVar[int | None] = ContextVar("resilient_dspy_harness_call", default=None)
"""The harness index of the call the current task runs (None outside a harness call)."""
current_recorder: ContextVar[EventRecorder | None] = ContextVar("resilient_dspy_harness_recorder", default=None)
"""The run's event recorder, so a :class:`Checkpoint` entry knows which events came before it (same-instant order)."""

E = TypeVar("E", bound=Event)


@dataclass(frozen=True, slots=True)
class CallResult:
    """One call as its caller saw it: when it ran, what it returned or raised, and what the pipeline recorded."""

    index: int
    question: str
    started: float
    ended: float
    value: Any = None
    error: BaseException | None = None
    cancel_requested: bool = False
    hung: bool = False
    attempts: int = 0
    retries: int = 0
    served_by: str = "primary"
    missing_inputs: tuple[str, ...] = ()

    @property
    def duration(self) -> float:
        return self.ended - self.started

    @property
    def ok(self) -> bool:
        return self.error is None and not self.hung

    @property
    def cancelled(self) -> bool:
        return isinstance(self.error, asyncio.CancelledError)


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """An event and the harness call whose task emitted it (None when emitted outside any harness call)."""

    call: int | None
    event: Event


class EventRecorder:
    """A pipeline listener that keeps every event with the harness call that emitted it."""

    def __init__(self) -> None:
        self.events: list[RecordedEvent] = []

    def __call__(self, event: Event) -> None:
        self.events.append(RecordedEvent(current_call.get(), event))

    def of_type(self, kind: type[E]) -> list[tuple[int | None, E]]:
        """``(call, event)`` for every recorded event of ``kind``, in order."""
        return [(r.call, r.event) for r in self.events if isinstance(r.event, kind)]


@dataclass(slots=True)
class ProgramEntry:
    """One run of the program (or one passage through a :class:`Checkpoint`): its call, question, fault (None at
    a checkpoint), start and end times, and how it ended."""

    call: int | None
    question: str
    fault: Fault | None
    started: float
    ended: float = math.inf
    error: BaseException | None = None
    cancelled: bool = False
    reached: bool | None = None  # at a checkpoint: whether the call reached the program below it (None: unknown)
    events_before: int | None = None  # at a checkpoint: how many of the run's events were recorded when it started

    @property
    def finished(self) -> bool:
        return self.ended != math.inf


@dataclass(slots=True)
class Run:
    """Everything one :func:`run_calls` recorded."""

    calls: list[CallResult]
    events: list[RecordedEvent]
    orphans: list[str]
    started: float
    ended: float
    horizon: float
    extra: dict[str, Any] = field(default_factory=dict)
    longest_block: float = 0.0
    """The longest the event loop went without running anything else, in real seconds (a blocking call)."""
    blocked_at: float | None = None
    """When (pipeline clock) the longest block ended; None when nothing blocked the loop."""

    def of_type(self, kind: type[E]) -> list[tuple[int | None, E]]:
        return [(r.call, r.event) for r in self.events if isinstance(r.event, kind)]

    @property
    def questions(self) -> dict[str, int]:
        """Question → call index (questions are unique per run)."""
        return {c.question: c.index for c in self.calls}
