"""What an AdaptiveConcurrency reports: its limit moving, its refusals, and the snapshot of one key's limit."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from resilient_dspy.events import Event, Rejected

__all__ = ["AdaptiveConcurrencyRejected", "AdaptiveConcurrencySnapshot", "ConcurrencyLimitChanged"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ConcurrencyLimitChanged(Event):
    """The limit for ``key`` moved from ``old`` to ``new`` calls; ``reason`` is ``increase``, ``latency`` (a slow
    success or a rising RTT) or ``drop`` (an overload error or a timeout)."""

    key: Hashable
    old: int
    new: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AdaptiveConcurrencyRejected(Rejected):
    """The call was refused without running; ``reason`` is ``queue_full``, ``max_wait`` or ``deadline``."""

    key: Hashable
    reason: str
    waited: float
    limit: int


@dataclass(frozen=True, slots=True)
class AdaptiveConcurrencySnapshot:
    """One key's limit and occupancy, and the round trips the gradient reads (see
    :meth:`AdaptiveConcurrency.snapshot`)."""

    key: Hashable
    limit: int
    in_flight: int
    queued: int
    min_limit: int
    max_limit: int
    short_rtt: float | None
    long_rtt: float | None
