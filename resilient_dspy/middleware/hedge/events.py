"""What a Hedge reports: the events of a call's race and the snapshot of its tallies."""

from __future__ import annotations

from dataclasses import dataclass

from resilient_dspy.events import Event

__all__ = ["HedgeSnapshot", "HedgeStarted", "HedgeWon"]


@dataclass(frozen=True, slots=True, kw_only=True)
class HedgeStarted(Event):
    """Hedge number ``hedge`` (1 = the first extra attempt) started, running ``runs``, ``reason`` ``delay`` or
    ``failure`` (an attempt failed retryably), ``delay`` seconds after the previous attempt."""

    hedge: int
    runs: str
    reason: str
    delay: float


@dataclass(frozen=True, slots=True, kw_only=True)
class HedgeWon(Event):
    """Attempt ``attempt`` (0 = the first, n = hedge n) answered after ``latency`` s; ``hedges`` had started."""

    attempt: int
    hedges: int
    latency: float


@dataclass(frozen=True, slots=True)
class HedgeSnapshot:
    """A Hedge's tallies: ``wins`` by attempt (0 = the first), and the delay it would wait now."""

    calls: int
    hedged_calls: int
    hedges: int
    wins: dict[int, int]
    delay: float
    learned: bool
