"""A route's state (its window of judged outcomes, its status), the judgement of a candidate against stable, and
where a call falls among the routes: a seeded draw, or a stable hash of its sticky key."""

from __future__ import annotations

import bisect
import hashlib
import math
from collections import deque
from collections.abc import Hashable
from statistics import NormalDist
from typing import TYPE_CHECKING

from resilient_dspy.middleware.canary.events import RouteStats

if TYPE_CHECKING:
    from resilient_dspy.middleware.canary.options import CanaryOptions
    from resilient_dspy.middleware.fallback import Alternative

__all__: list[str] = []

ACTIVE, ROLLED_BACK, PROMOTED = "active", "rolled_back", "promoted"
_SPAN = float(2**64)


class Window:
    """The last ``size`` judged outcomes of one route (``(time, failed, latency)``), those older than ``seconds``
    forgotten; the error count and the sorted latencies are kept as outcomes come and go, so a judgement is
    O(log n), not a sort."""

    __slots__ = ("errors", "latencies", "outcomes", "seconds", "size")

    def __init__(self, size: int, seconds: float | None) -> None:
        self.outcomes: deque[tuple[float, bool, float]] = deque()
        self.latencies: list[float] = []
        self.errors = 0
        self.size = size
        self.seconds = seconds

    def add(self, now: float, failed: bool, latency: float) -> None:
        if len(self.outcomes) == self.size:
            self._forget_oldest()
        self.outcomes.append((now, failed, latency))
        self.errors += failed
        bisect.insort(self.latencies, latency)

    def _forget_oldest(self) -> None:
        _, failed, latency = self.outcomes.popleft()
        self.errors -= failed
        del self.latencies[bisect.bisect_left(self.latencies, latency)]

    def stats(self, now: float, percentile: float) -> RouteStats:
        """Calls, errors, error rate and the ``percentile`` latency (nearest rank) of the outcomes in the window."""
        outcomes = self.outcomes
        if self.seconds is not None:
            oldest = now - self.seconds
            while outcomes and outcomes[0][0] < oldest:
                self._forget_oldest()
        calls = len(outcomes)
        if not calls:
            return RouteStats(0, 0, 0.0, None)
        rank = max(1, math.ceil(percentile / 100 * calls))
        return RouteStats(calls, self.errors, self.errors / calls, self.latencies[rank - 1])


class Route:
    """A candidate: its alternative, its configured share of calls, status, window and counters."""

    __slots__ = ("alternative", "mismatches", "reason", "served", "share", "skipped", "status", "window")

    def __init__(self, alternative: Alternative, share: float, options: CanaryOptions) -> None:
        self.alternative = alternative
        self.share = share
        self.status = ACTIVE
        self.reason: str | None = None
        self.window = Window(options.window, options.window_seconds)
        self.served = self.skipped = self.mismatches = 0

    @property
    def name(self) -> str:
        return self.alternative.name

    @property
    def weight(self) -> float:
        """Its share of calls now: the configured one while active, all when promoted, none when rolled back."""
        return {ACTIVE: self.share, PROMOTED: 1.0}.get(self.status, 0.0)


def verdict(stable: RouteStats, candidate: RouteStats, options: CanaryOptions) -> str | None:
    """Why ``candidate`` is worse than ``stable`` by more than the margins (``error_rate``, ``latency``), or None
    (also while either window holds fewer than ``min_calls`` outcomes)."""
    if stable.calls < options.min_calls or candidate.calls < options.min_calls:
        return None
    increase = options.max_error_rate_increase
    if increase is not None and _more_errors(stable, candidate, increase, options.confidence):
        return "error_rate"
    ratio = options.max_latency_ratio
    if ratio is None or stable.latency is None or candidate.latency is None:
        return None
    slower = candidate.latency > stable.latency * ratio + 1e-12
    return "latency" if slower and candidate.latency - stable.latency > options.min_latency_increase else None


def _more_errors(stable: RouteStats, candidate: RouteStats, margin: float, confidence: float | None) -> bool:
    """The candidate's error rate exceeds stable's by more than ``margin``: as seen, or (with ``confidence``) by a
    one-sided two-proportion z-test, so a few unlucky errors in a small window do not roll a good release back."""
    excess = candidate.error_rate - stable.error_rate - margin
    if excess <= 1e-12:
        return False
    if confidence is None:
        return True
    spread = math.sqrt(
        candidate.error_rate * (1 - candidate.error_rate) / candidate.calls
        + stable.error_rate * (1 - stable.error_rate) / stable.calls
    )
    return spread == 0 or excess / spread > NormalDist().inv_cdf(confidence)


def sticky_point(salt: str, key: Hashable) -> float:
    """Where ``key`` falls in [0, 1): a hash of its ``repr`` (stable across processes, unlike ``hash``), salted by
    the layer's name so that two canaries split their callers independently."""
    digest = hashlib.blake2b(f"{salt}\x00{key!r}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SPAN


def pick(routes: tuple[Route, ...], point: float) -> Route | None:
    """The candidate whose slice of [0, 1) holds ``point`` (slices in the configured order, a rolled-back one's
    slice given to stable so no other key moves), or None for stable."""
    low = 0.0
    for route in routes:
        high = low + route.share
        if point < high:
            return route if route.status == ACTIVE else None
        low = high
    return None
