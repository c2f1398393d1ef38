"""The cache invariant: a hit never serves an entry past its TTL, and only real successes are stored."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from resilient_dspy.middleware.cache import CacheHit, CacheStored
from resilient_dspy.testing.harness import CallResult, RecordedEvent
from resilient_dspy.testing.invariants.violation import EPSILON, Violation

__all__ = ["cache_fresh_and_clean"]


def cache_fresh_and_clean(
    calls: Sequence[CallResult], events: Sequence[RecordedEvent], ttl: float | None, journal: Sequence[Any] = ()
) -> list[Violation]:
    """Every hit is of an entry stored at most ``ttl`` seconds earlier; every stored answer is a real success.

    A store must come from a call whose latest program run (``journal`` entries with ``call``, ``ended`` and
    ``error``) succeeded, and that was served by the primary (never a fallback answer).
    """
    stored: dict[str, list[float]] = defaultdict(list)
    found = []
    by_call = {c.index: c for c in calls}
    runs: dict[int | None, list[Any]] = defaultdict(list)
    for entry in journal:
        runs[entry.call].append(entry)
    for recorded in events:
        event = recorded.event
        if isinstance(event, CacheStored):
            stored[event.key].append(event.time)
            call = by_call.get(recorded.call) if recorded.call is not None else None
            if call is not None and call.served_by != "primary":
                found.append(Violation("cache_fresh_and_clean", f"stored a {call.served_by} answer", call.index))
            finished = [r for r in runs.get(recorded.call, ()) if r.ended <= event.time + EPSILON]
            if journal and recorded.call is not None:
                latest = finished[-1] if finished else None  # the journal is in start order
                if latest is None or latest.error is not None or getattr(latest, "cancelled", False):
                    why = "no program run" if latest is None else f"a run that failed ({type(latest.error).__name__})"
                    found.append(Violation("cache_fresh_and_clean", f"stored an answer after {why}", recorded.call))
        elif isinstance(event, CacheHit):
            before = [t for t in stored.get(event.key, ()) if t <= event.time + EPSILON]
            if not before:
                found.append(Violation("cache_fresh_and_clean", "a hit on a key never stored", recorded.call))
            elif ttl is not None and event.time - max(before) > ttl + EPSILON:
                age = event.time - max(before)
                found.append(
                    Violation("cache_fresh_and_clean", f"served an entry {age:g}s old, ttl {ttl:g}s", recorded.call)
                )
    return found
