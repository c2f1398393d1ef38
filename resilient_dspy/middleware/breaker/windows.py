"""The outcome windows a circuit counts in: the last N calls (a ring) or the last T seconds (buckets)."""

from __future__ import annotations

__all__: list[str] = []


_FAILED, _SLOW = 1, 2


class _CountWindow:
    """Outcomes of the last ``size`` calls in a ring, with running totals: O(1) per call."""

    __slots__ = ("failures", "filled", "index", "outcomes", "slows")

    def __init__(self, size: int) -> None:
        self.outcomes = [0] * size
        self.index = self.filled = self.failures = self.slows = 0

    def add(self, outcome: int, now: float) -> None:
        outcomes = self.outcomes
        old = outcomes[self.index]
        if self.filled == len(outcomes):
            self.failures -= old & _FAILED
            self.slows -= (old & _SLOW) >> 1
        else:
            self.filled += 1
        outcomes[self.index] = outcome
        self.failures += outcome & _FAILED
        self.slows += (outcome & _SLOW) >> 1
        self.index = (self.index + 1) % len(outcomes)

    def totals(self, now: float) -> tuple[int, int, int]:
        return self.filled, self.failures, self.slows


class _TimeWindow:
    """Outcomes of the last ``seconds`` in ``buckets`` slots; a slot older than the window counts as empty."""

    __slots__ = ("calls", "failures", "slows", "stamps", "width")

    def __init__(self, seconds: float, buckets: int) -> None:
        self.width = seconds / buckets
        self.stamps = [-(2**62)] * buckets
        self.calls = [0] * buckets
        self.failures = [0] * buckets
        self.slows = [0] * buckets

    def add(self, outcome: int, now: float) -> None:
        stamp = int(now // self.width)
        slot = stamp % len(self.stamps)
        if self.stamps[slot] != stamp:
            self.stamps[slot], self.calls[slot], self.failures[slot], self.slows[slot] = stamp, 0, 0, 0
        self.calls[slot] += 1
        self.failures[slot] += outcome & _FAILED
        self.slows[slot] += (outcome & _SLOW) >> 1

    def totals(self, now: float) -> tuple[int, int, int]:
        oldest = int(now // self.width) - len(self.stamps)
        calls = failures = slows = 0
        for slot, stamp in enumerate(self.stamps):
            if stamp > oldest:
                calls += self.calls[slot]
                failures += self.failures[slot]
                slows += self.slows[slot]
        return calls, failures, slows


class _Probe:
    """A half-open trial call; identity is its ticket."""

    __slots__ = ("started",)

    def __init__(self, started: float) -> None:
        self.started = started
