"""Event sequences of representative scenarios across layers: exact order, layer names and key fields."""

from __future__ import annotations

import asyncio
from typing import Any

import dspy

from resilient_dspy import Bulkhead, Cache, CircuitBreaker, Fallback, Pipeline, RateLimiter, Retry, Static, Timeout
from resilient_dspy.events import Event


def summary(events: list[Event]) -> list[tuple[Any, ...]]:
    """(event class, layer, the fields that tell the story) for each event, in order."""
    rows: list[tuple[Any, ...]] = []
    for event in events:
        name = type(event).__name__
        if name == "RetryScheduled":
            rows.append((name, event.layer, event.attempt, event.delay, event.reason))  # type: ignore[attr-defined]
        elif name == "CircuitStateChanged":
            rows.append((name, event.layer, event.old.value, event.new.value, event.reason))  # type: ignore[attr-defined]
        elif name == "TimeoutFired":
            rows.append((name, event.layer, event.scope))  # type: ignore[attr-defined]
        elif name == "FallbackUsed":
            rows.append((name, event.layer, event.alternative, type(event.error).__name__))  # type: ignore[attr-defined]
        else:
            rows.append((name, event.layer))
    return rows


class Script:
    """An async program driven by a list of actions: an exception to raise, a float to sleep, or 'ok'."""

    def __init__(self, *actions: Any) -> None:
        self.actions = list(actions)

    async def __call__(self, question: str) -> dspy.Prediction:
        action = self.actions.pop(0) if self.actions else "ok"
        if isinstance(action, BaseException):
            raise action
        if isinstance(action, float):
            await asyncio.sleep(action)
        return dspy.Prediction(answer=f"answer to {question}")


def production(program: Script, events: list[Event]) -> Pipeline:
    return Pipeline(
        program,
        Fallback(Static(answer="sorry")),
        Timeout(10.0),
        RateLimiter(requests=100, per=1.0),
        Retry(3, base_delay=0.5, jitter="none", budget=None),
        CircuitBreaker(2, break_duration=30.0),
        Bulkhead(4),
        Timeout(1.0),
        Cache(),
        listeners=[events.append],
    )


async def test_a_hang_then_a_5xx_open_the_circuit_and_the_fallback_answers() -> None:
    events: list[Event] = []
    pipeline = production(Script(5.0, dspy.LMServerError("503", status=503)), events)
    assert (await pipeline("q")).answer == "sorry"
    assert summary(events) == [
        ("CacheMiss", "Cache"),
        ("TimeoutFired", "Timeout(attempt)", "attempt"),
        ("RetryScheduled", "Retry", 1, 0.5, "TimeoutExceededError"),
        ("CacheMiss", "Cache"),
        ("CircuitStateChanged", "CircuitBreaker", "closed", "open", "failure_threshold"),
        ("RetryGaveUp", "Retry"),  # the 30 s break outlasts the 10 s deadline: no sleep for a rejected attempt
        ("FallbackUsed", "Fallback", "static", "RetriesExhaustedError"),
    ]


async def test_two_transient_failures_then_an_answer_stored_and_served_from_the_cache() -> None:
    events: list[Event] = []
    pipeline = Pipeline(
        Script(dspy.LMRateLimitError("429", status=429, retry_after=2.0), dspy.LMServerError("503", status=503)),
        Timeout(30.0),
        Retry(3, base_delay=0.5, jitter="none", budget=None),
        CircuitBreaker(5),
        Cache(),
        listeners=[events.append],
    )
    await pipeline("q")
    await pipeline("q")
    assert summary(events) == [
        ("CacheMiss", "Cache"),
        ("RetryScheduled", "Retry", 1, 2.0, "LMRateLimitError"),  # Retry-After 2 s beats the 0.5 s backoff
        ("CacheMiss", "Cache"),
        ("RetryScheduled", "Retry", 2, 1.0, "LMServerError"),
        ("CacheMiss", "Cache"),
        ("CacheStored", "Cache"),
        ("CacheHit", "Cache"),
    ]
    times = [event.time - events[0].time for event in events]
    assert times[:5] == [0.0, 0.0, 2.0, 2.0, 3.0]


async def test_a_full_bulkhead_queues_then_admits_in_order() -> None:
    events: list[Event] = []
    pipeline = Pipeline(Script(1.0, 1.0), Bulkhead(1, max_queue=1), listeners=[events.append])
    await asyncio.gather(pipeline("a"), pipeline("b"))
    assert summary(events) == [("BulkheadQueued", "Bulkhead"), ("BulkheadAcquired", "Bulkhead")]
    acquired = events[1]
    assert acquired.waited == 1.0 and acquired.time - events[0].time == 1.0  # type: ignore[attr-defined]
