"""What a Cache reports: its counters (:class:`CacheStats`, from ``Cache.snapshot()``) and the events it emits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from resilient_dspy.events import Event

__all__ = [
    "CacheBackendFailed",
    "CacheCoalesced",
    "CacheHit",
    "CacheMiss",
    "CacheNotStored",
    "CacheStats",
    "CacheStored",
    "Counters",
]


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counts since the Cache was created. Every lookup is exactly one of hit, miss, coalesced or bypassed.

    ``saved_tokens`` / ``saved_cost`` add up the LM usage of the answers served without running the program
    (hits and coalesced followers); ``errors`` counts backend failures, ``timeouts`` those of them that ran out of
    time; ``skipped_stores`` the answers not stored because ``max_pending_stores`` stores were still running.
    """

    hits: int = 0
    misses: int = 0
    coalesced: int = 0
    bypassed: int = 0
    stores: int = 0
    errors: int = 0
    saved_tokens: int = 0
    saved_cost: float = 0.0
    timeouts: int = 0
    skipped_stores: int = 0

    @property
    def hit_rate(self) -> float:
        """Share of lookups served without running the program (hits + coalesced), 0.0 before any lookup."""
        total = self.hits + self.misses + self.coalesced + self.bypassed
        return (self.hits + self.coalesced) / total if total else 0.0


class Counters:
    """The running counts behind :class:`CacheStats` (plain attributes: the hot path adds to them)."""

    __slots__ = (
        "bypassed",
        "coalesced",
        "errors",
        "hits",
        "misses",
        "saved_cost",
        "saved_tokens",
        "skipped_stores",
        "stores",
        "timeouts",
    )

    def __init__(self) -> None:
        self.hits = self.misses = self.coalesced = self.bypassed = self.stores = self.errors = 0
        self.timeouts = self.skipped_stores = 0
        self.saved_tokens = 0
        self.saved_cost = 0.0

    def snapshot(self) -> CacheStats:
        return CacheStats(
            self.hits,
            self.misses,
            self.coalesced,
            self.bypassed,
            self.stores,
            self.errors,
            self.saved_tokens,
            self.saved_cost,
            self.timeouts,
            self.skipped_stores,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheHit(Event):
    """Served from the backend; ``saved_tokens`` / ``saved_usage`` (by model) are the usage stored with the answer."""

    key: str
    saved_tokens: int
    saved_usage: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheMiss(Event):
    """Not in the backend (or ``bypassed``: the call asked for a fresh answer); this call runs the program."""

    key: str
    bypassed: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheStored(Event):
    """The answer was stored for ``ttl`` seconds (None = no expiry); ``size`` in bytes."""

    key: str
    ttl: float | None
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheNotStored(Event):
    """A successful answer was not stored: ``reason`` is ``"fallback"``, ``"unencodable"``, ``"backlog"`` or
    ``"too_large"`` (over the backend's ``max_value_bytes``)."""

    key: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheCoalesced(Event):
    """This call waited for an identical call in flight and got its answer (saving its usage), or its ``error``
    (the leader's, or this follower's own ``CancelledError`` when its wait was cancelled or timed out)."""

    key: str
    error: BaseException | None
    saved_tokens: int = 0
    saved_usage: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheBackendFailed(Event):
    """A backend ``operation`` (get/set) raised ``error`` or ``timed_out``; the call went on without it."""

    key: str
    operation: str
    error: BaseException
    timed_out: bool
