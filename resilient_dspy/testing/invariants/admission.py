"""Invariants of the layers that bound what goes through: half-open probes, bulkhead permits, limiter windows.
Each reads the journal of what passed the layer (a checkpoint right below it, or program runs)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from resilient_dspy.middleware.breaker import CircuitBreaker, CircuitState, CircuitStateChanged
from resilient_dspy.middleware.ratelimit import Limit
from resilient_dspy.testing.harness import RecordedEvent
from resilient_dspy.testing.invariants.violation import EPSILON, Interval, Violation

__all__ = ["bulkhead_limit_respected", "half_open_probes_respected", "limiter_respected"]


def half_open_probes_respected(
    journal: Sequence[Any], events: Sequence[RecordedEvent], breaker: CircuitBreaker
) -> list[Violation]:
    """While half-open, at most ``half_open_probes`` trial runs hold a permit at once.

    Valid when the breaker sits right above the program (each program run is one breaker call). A probe holds its
    permit from its start until it ends neutral (cancelled, excluded error) or one break after it started (a hung
    probe is reclaimed then, or did not reach the program: a cache hit); a success keeps it until the circuit
    decides. ``journal`` entries need ``started``, ``ended``, ``error`` and ``cancelled`` (and ``reached`` if known).
    """
    limit = breaker.options.half_open_probes
    brk = breaker.options.break_duration  # the shortest a permit is held (the break only grows): never a false alarm
    changes = [(i, e.event.time, e.event) for i, e in enumerate(events) if isinstance(e.event, CircuitStateChanged)]
    found = []
    for position, (index, opened, change) in enumerate(changes):
        if change.new is not CircuitState.HALF_OPEN:
            continue
        following = changes[position + 1] if position + 1 < len(changes) else None
        closes = following[1] if following is not None else math.inf
        held: list[tuple[float, float]] = []
        for entry in journal:
            seen = getattr(entry, "events_before", None)
            if seen is not None:  # the order of events: exact even for runs at one instant
                if not index < seen <= (following[0] if following is not None else len(events)):
                    continue
            elif not opened - EPSILON <= entry.started < closes - EPSILON:
                continue
            neutral = (
                entry.cancelled
                or getattr(entry, "reached", None) is False  # a cache hit or a coalesced call: not a provider outcome
                or (entry.error is not None and breaker.counts_as_failure(entry.error) is None)
            )
            release = min(entry.ended if neutral else math.inf, entry.started + brk, closes)
            held.append((entry.started, release))
        peak, at = _peak(held)
        if peak > limit:
            found.append(
                Violation(
                    "half_open_probes_respected",
                    f"{peak} probes held permits at t={at:g} in the half-open state from t={opened:g} (limit {limit})",
                )
            )
    return found


def bulkhead_limit_respected(journal: Sequence[Interval], max_concurrent: int) -> list[Violation]:
    """At no instant did more than ``max_concurrent`` calls hold a permit below the bulkhead (``journal``: the
    spans a :class:`~resilient_dspy.testing.harness.Checkpoint` with ``follows_leases`` saw, or program runs)."""
    peak, at = _peak([(entry.started, entry.ended) for entry in journal])
    if peak > max_concurrent:
        return [
            Violation(
                "bulkhead_limit_respected", f"{peak} runs in flight at t={at:g} > max_concurrent={max_concurrent}"
            )
        ]
    return []


def limiter_respected(admissions: Sequence[float], limits: Sequence[Limit]) -> list[Violation]:
    """Request admissions (program start times) fit every requests limit: an exact limit in every window
    ``[t, t + per)``, a burst limit within ``burst + amount * span / per`` over every span."""
    times = sorted(admissions)
    found = []
    for limit in limits:
        if limit.unit != "requests":
            continue
        for i, start in enumerate(times):
            if limit.burst is None:
                count = sum(1 for t in times[i:] if t < start + limit.per - EPSILON)
                if count > limit.amount:
                    found.append(
                        Violation(
                            "limiter_respected",
                            f"{count} admissions in [{start:g}, {start + limit.per:g}) > {limit.amount} ({limit})",
                        )
                    )
                    break
            else:
                worst = next(
                    (
                        (k - i + 1, times[k])
                        for k in range(i, len(times))
                        if k - i + 1 > limit.burst + limit.amount * (times[k] - start) / limit.per + 1e-6
                    ),
                    None,
                )
                if worst is not None:
                    found.append(
                        Violation(
                            "limiter_respected",
                            f"{worst[0]} admissions in [{start:g}, {worst[1]:g}] exceed the bucket bound of {limit}",
                        )
                    )
                    break
    return found


def _peak(intervals: Sequence[tuple[float, float]]) -> tuple[int, float]:
    """The most intervals ``[start, end)`` overlapping at one instant, and when (ends sort before starts)."""
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals if e != math.inf])
    level = peak = 0
    at = 0.0
    for time, step in points:
        level += step
        if level > peak:
            peak, at = level, time
    return peak, at
