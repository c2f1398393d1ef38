"""The two ways the limit moves with each finished call: AIMD and a Gradient2-style RTT gradient.

Each algorithm keeps a float limit between the bounds; the layer admits ``int(limit)`` calls. Both grow only while
the limit is in use (at least half of it in flight), so a quiet period does not inflate it, and both cut it at most
once per round trip: a drop from a call that started before the last cut says nothing the cut did not already act on.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

from resilient_dspy.middleware.adaptive_concurrency.options import AdaptiveConcurrencyOptions

__all__ = ["Aimd", "Gradient", "LimitAlgorithm", "algorithm_for"]


class LimitAlgorithm(ABC):
    """The limit of one key and how it moves; subclasses write :meth:`estimate`."""

    __slots__ = ("cut_at", "high", "limit", "low")

    def __init__(self, options: AdaptiveConcurrencyOptions) -> None:
        self.limit = float(options.initial_limit)
        self.low = float(options.min_limit)
        self.high = float(options.max_limit)
        self.cut_at = -math.inf

    def update(self, started: float, now: float, in_flight: int, dropped: bool) -> None:
        """Move the limit after a call that started at ``started`` finished at ``now`` (``dropped``: an overload)."""
        if dropped and started < self.cut_at:
            return
        new = self.estimate(now - started, in_flight, dropped)
        if new < self.limit:
            self.cut_at = now
        self.limit = min(self.high, max(self.low, new))

    @abstractmethod
    def estimate(self, rtt: float, in_flight: int, dropped: bool) -> float:
        """The limit this algorithm wants after a call of round trip ``rtt`` (before the bounds are applied)."""

    def rtts(self) -> tuple[float | None, float | None]:
        """The recent and the baseline round trip the algorithm reads (None where it keeps none)."""
        return None, None


class Aimd(LimitAlgorithm):
    """Additive increase (+1 a round trip) on a fast success while the limit is in use; multiplicative decrease
    (``backoff``) on an error, a timeout or a success slower than ``latency_threshold``."""

    __slots__ = ("backoff", "threshold")

    def __init__(self, options: AdaptiveConcurrencyOptions) -> None:
        super().__init__(options)
        self.backoff = options.backoff
        self.threshold = options.latency_threshold

    def estimate(self, rtt: float, in_flight: int, dropped: bool) -> float:
        limit = self.limit
        if dropped or (self.threshold is not None and rtt > self.threshold):
            return limit * self.backoff
        if 2 * in_flight >= limit:
            return limit + 1.0 / limit  # +1 per limit's worth of successes: one step per round trip, as TCP does
        return limit


class Gradient(LimitAlgorithm):
    """Netflix's Gradient2, in short: every ``short_window`` samples, the recent round trip (their average) is
    compared with a baseline, an exponential average of those over ``long_window`` samples that follows a faster
    window at full weight but a slower one at a tenth of it, so a sustained overload does not become the new normal
    (at ``min_limit`` at full weight: the provider is slower, not loaded):
    ``gradient = clamp(tolerance * baseline / recent, 0.5, 1)``; the new estimate is ``limit * gradient`` below 1
    and ``limit + sqrt(limit)`` at 1 (a probe upward; Gradient2 adds it always, which holds a small limit past the
    knee), smoothed in. A drop counts as the smallest gradient at once."""

    __slots__ = ("batch", "batch_size", "long", "short", "smoothing", "sum", "tolerance", "weight")

    def __init__(self, options: AdaptiveConcurrencyOptions) -> None:
        super().__init__(options)
        self.tolerance = options.tolerance
        self.smoothing = options.smoothing
        self.batch_size = options.short_window
        self.weight = options.short_window / options.long_window
        self.batch = 0
        self.sum = 0.0
        self.short: float | None = None
        self.long: float | None = None

    def estimate(self, rtt: float, in_flight: int, dropped: bool) -> float:
        limit = self.limit
        if dropped:
            return limit * (1 - self.smoothing) + limit * 0.5 * self.smoothing
        self.batch += 1
        self.sum += rtt
        if self.batch < self.batch_size:
            return limit
        short = self.short = self.sum / self.batch
        self.batch, self.sum = 0, 0.0
        long = self.long
        if long is None:
            long = short
        else:
            weight = self.weight if short < long or limit <= self.low else self.weight / 10
            long += (short - long) * weight
        self.long = long
        if 2 * in_flight < limit:
            return limit
        gradient = max(0.5, min(1.0, self.tolerance * long / short)) if short > 0 else 1.0
        new = limit * gradient if gradient < 1.0 else limit + math.sqrt(limit)
        return limit * (1 - self.smoothing) + new * self.smoothing

    def rtts(self) -> tuple[float | None, float | None]:
        return self.short, self.long


def algorithm_for(options: AdaptiveConcurrencyOptions) -> LimitAlgorithm:
    """A fresh limit for one key, moved by the algorithm ``options`` name."""
    return Aimd(options) if options.algorithm == "aimd" else Gradient(options)
