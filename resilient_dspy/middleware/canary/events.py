"""What a Canary reports: the route a call took, a rollback or promotion, a shadow's comparison, a skipped shadow,
and the figures (:class:`RouteStats`) they and :meth:`Canary.snapshot` carry."""

from __future__ import annotations

from dataclasses import dataclass

from resilient_dspy.events import Event

__all__ = [
    "CanaryPromoted",
    "CanaryRolledBack",
    "CanaryRouted",
    "CanarySnapshot",
    "CandidateSnapshot",
    "RouteStats",
    "ShadowCompared",
    "ShadowSkipped",
]


@dataclass(frozen=True, slots=True)
class RouteStats:
    """One route's judged outcomes in the window: calls, errors, their rate, and the latency percentile (seconds)."""

    calls: int
    errors: int
    error_rate: float
    latency: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class CanaryRouted(Event):
    """The call was sent to ``route`` (``"stable"`` or a candidate's name); ``shadow`` when only a copy went there."""

    route: str
    shadow: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class CanaryRolledBack(Event):
    """``candidate`` gets no more traffic: it was worse than stable (``reason`` ``error_rate`` or ``latency``, with
    both windows' figures) or rolled back by hand (``manual``)."""

    candidate: str
    reason: str
    stable: RouteStats | None
    observed: RouteStats | None


@dataclass(frozen=True, slots=True, kw_only=True)
class CanaryPromoted(Event):
    """``candidate`` was promoted by hand: it now serves every call."""

    candidate: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ShadowCompared(Event):
    """A shadow copy finished: its error (None when it answered), latency, stable's, and whether the answers were
    equal (None without ``compare=`` or when either failed)."""

    candidate: str
    error: BaseException | None
    latency: float
    stable_latency: float
    stable_error: BaseException | None
    matched: bool | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ShadowSkipped(Event):
    """No copy was sent to ``candidate``: ``max_shadows`` copies were already in flight."""

    candidate: str
    in_flight: int


@dataclass(frozen=True, slots=True)
class CandidateSnapshot:
    """A candidate's state: ``status`` (``active``, ``rolled_back``, ``promoted``), its share of calls now, the calls
    it served (or shadowed), its window, and for shadows the skipped copies and mismatched answers."""

    name: str
    status: str
    weight: float
    served: int
    window: RouteStats
    shadows_skipped: int
    mismatches: int
    rollback_reason: str | None


@dataclass(frozen=True, slots=True)
class CanarySnapshot:
    """The whole canary (see :meth:`Canary.snapshot`): the mode, stable's share, served calls and window, each
    candidate, and the shadow copies in flight."""

    mode: str
    stable_weight: float
    stable_served: int
    stable: RouteStats
    candidates: tuple[CandidateSnapshot, ...]
    shadows_in_flight: int
