"""What a layer reports about its store: it became unreachable (and what the layer does now), or it is back."""

from __future__ import annotations

from dataclasses import dataclass

from resilient_dspy.events import Event

__all__ = ["StoreRecovered", "StoreUnavailable"]


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreUnavailable(Event):
    """The layer's store failed a step (``operation``, ``error``); ``mode`` says what the layer does meanwhile
    (``local``: serves on in-process state; ``reject``: refuses). Emitted once per outage, not per call."""

    store: str
    operation: str
    error: str
    mode: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreRecovered(Event):
    """The layer's store answered again after an outage of ``outage`` seconds (pipeline clock)."""

    store: str
    outage: float
