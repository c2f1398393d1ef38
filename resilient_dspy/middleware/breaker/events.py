"""What a CircuitBreaker reports: its states, the events it emits and the snapshot of a circuit."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from enum import StrEnum

from resilient_dspy.events import Event, Rejected

__all__ = [
    "CircuitRejected",
    "CircuitSnapshot",
    "CircuitState",
    "CircuitStateChanged",
    "CircuitWaited",
    "CircuitWaiting",
]


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    ISOLATED = "isolated"


@dataclass(frozen=True, slots=True, kw_only=True)
class CircuitStateChanged(Event):
    """The circuit for ``key`` went from ``old`` to ``new``; ``reason`` says why; ``retry_after`` if it opened."""

    key: Hashable
    old: CircuitState
    new: CircuitState
    reason: str
    retry_after: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class CircuitRejected(Rejected):
    """A call was refused without running (open, half-open with no permit, or isolated)."""

    key: Hashable
    state: CircuitState
    retry_after: float | None

    def rejection_reason(self) -> str:
        return self.state.value


@dataclass(frozen=True, slots=True, kw_only=True)
class CircuitWaiting(Event):
    """A call found the circuit ``state`` (open, or half-open with its probes out) and waits, with
    ``wait_for_half_open``, up to ``until`` (pipeline clock; None = no bound) for it to let calls through."""

    key: Hashable
    state: CircuitState
    retry_after: float | None
    until: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class CircuitWaited(Event):
    """A waiting call stopped waiting after ``waited`` seconds: ``admitted`` (it runs) or refused (it raises)."""

    key: Hashable
    waited: float
    admitted: bool


@dataclass(frozen=True, slots=True)
class CircuitSnapshot:
    """The observable state of one circuit (see :meth:`CircuitBreaker.snapshot`)."""

    key: Hashable
    state: CircuitState
    calls: int
    failures: int
    slow_calls: int
    consecutive_failures: int
    retry_after: float | None
    break_duration: float
    probes_in_flight: int
    probes_succeeded: int

    @property
    def failure_rate(self) -> float:
        return self.failures / self.calls if self.calls else 0.0

    @property
    def slow_call_rate(self) -> float:
        return self.slow_calls / self.calls if self.calls else 0.0
