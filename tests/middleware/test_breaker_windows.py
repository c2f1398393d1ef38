"""CircuitBreaker windows, to the exact count: slow calls and failures entering and sliding out of a count window,
a time window's buckets expiring on their boundary (float boundaries included), the default 60 s window, and the
``retry_after`` a rate opening keeps. Async tests run on looptime's virtual clock, which starts at 0 and moves only
on sleeps; the bucket-boundary tests set a hand clock.
"""

from __future__ import annotations

import asyncio
from typing import Any

import dspy
import pytest

from resilient_dspy import CircuitBreaker, Pipeline
from resilient_dspy.events import Event
from resilient_dspy.middleware.breaker import CircuitSnapshot
from resilient_dspy.testing import ManualClock

from .breaker_steps import CLOSED, OPEN, program, run, snap, transitions


def counts(snapshot: CircuitSnapshot) -> tuple[int, int, int]:
    return snapshot.calls, snapshot.failures, snapshot.slow_calls


# ------------------------------------------------------------------------------------------- count window


async def test_count_window_slow_calls_enter_and_slide_out() -> None:
    breaker = CircuitBreaker(slow_call_rate=1.0, slow_call_duration=1, window=3, min_calls=3)
    pipeline = Pipeline(program, breaker)
    expected = [
        ("sleep:1", 1, 1),  # exactly the slow duration is slow
        ("sleep:1", 2, 2),
        ("ok", 3, 2),
        ("ok", 3, 1),  # a slow call slides out
        ("ok", 3, 0),
        ("sleep:1", 3, 1),  # a fast call slides out: nothing to subtract
    ]
    for question, calls, slows in expected:
        assert await run(pipeline, question) == "answer"
        got = breaker.snapshot()
        assert (got.state, got.calls, got.failures, got.slow_calls) == (CLOSED, calls, 0, slows), question


async def test_count_window_slow_failures_count_as_failed_and_slow() -> None:
    breaker = CircuitBreaker(failure_rate=1.0, slow_call_rate=1.0, slow_call_duration=2, window=5, min_calls=5)
    pipeline = Pipeline(program, breaker)
    await asyncio.sleep(50)
    for question in ("sleep:2:fail", "fail", "sleep:1.9:fail", "sleep:2:excl"):
        assert await run(pipeline, question) == "error"
    got = breaker.snapshot()
    assert (got.calls, got.failures, got.slow_calls) == (3, 3, 1)


async def test_slow_rate_threshold_is_a_share_of_the_calls() -> None:
    breaker = CircuitBreaker(slow_call_rate=0.5, slow_call_duration=1, window=4, min_calls=4)
    pipeline = Pipeline(program, breaker)
    for question in ("ok", "ok", "ok", "sleep:1"):
        assert await run(pipeline, question) == "answer"
    assert breaker.state is CLOSED  # 1 of 4 < 0.5
    assert await run(pipeline, "sleep:1") == "answer"
    assert breaker.state is OPEN  # 2 of 4


async def test_a_failure_below_the_rate_raises_its_own_error_and_leaves_it_closed() -> None:
    breaker = CircuitBreaker(failure_rate=0.5, window=4, min_calls=4)
    pipeline = Pipeline(program, breaker)
    for _ in range(3):
        await pipeline("ok")
    with pytest.raises(dspy.LMServerError):
        await pipeline("fail")
    assert breaker.state is CLOSED


@pytest.mark.parametrize(
    ("options", "questions", "reason"),
    [
        ({"failure_rate": 0.5}, ["ok", "rl:50"], "failure_rate"),
        ({"slow_call_rate": 0.5, "slow_call_duration": 1}, ["ok", "sleep:1:rl:50"], "slow_call_rate"),
    ],
)
async def test_a_rate_opening_keeps_the_retry_after_of_the_error(
    options: dict[str, Any], questions: list[str], reason: str
) -> None:
    events: list[Event] = []
    breaker = CircuitBreaker(**options, window=2, min_calls=2, break_duration=10, name="cb")
    pipeline = Pipeline(program, breaker, name="p", listeners=[events.append])
    for question in questions:
        await run(pipeline, question)
    assert transitions(events) == [(CLOSED, OPEN, reason, 50.0)]
    assert breaker.snapshot().retry_after == pytest.approx(50.0)


async def test_after_closing_a_rate_circuit_counts_and_opens_again() -> None:
    breaker = CircuitBreaker(failure_rate=1.0, window=2, min_calls=2, break_duration=10)
    pipeline = Pipeline(program, breaker)
    await run(pipeline, "fail")
    await run(pipeline, "fail")
    assert breaker.snapshot() == snap(state=OPEN, break_duration=10.0, retry_after=10.0)
    await asyncio.sleep(10)
    assert await run(pipeline, "ok") == "answer"
    assert breaker.snapshot() == snap(break_duration=10.0)
    await run(pipeline, "fail")
    assert breaker.snapshot() == snap(break_duration=10.0, calls=1, failures=1, consecutive_failures=1)
    await run(pipeline, "fail")
    assert breaker.state is OPEN


# ------------------------------------------------------------------------------------------- time window


async def test_time_window_counts_slow_calls_per_bucket_and_expires_on_the_boundary() -> None:
    breaker = CircuitBreaker(slow_call_rate=1.0, slow_call_duration=1, window_seconds=10, min_calls=100)
    pipeline = Pipeline(program, breaker)
    assert await run(pipeline, "ok") == "answer"  # t=0, bucket 0
    assert breaker.snapshot() == snap(calls=1)
    assert await run(pipeline, "sleep:1") == "answer"  # t=1, bucket 1
    assert await run(pipeline, "sleep:1") == "answer"  # t=2, bucket 2
    assert await run(pipeline, "fail") == "error"  # t=2
    assert breaker.snapshot() == snap(calls=4, failures=1, slow_calls=2, consecutive_failures=1)
    await asyncio.sleep(8)  # t=10: bucket 0 is exactly one window old
    assert breaker.snapshot() == snap(calls=3, failures=1, slow_calls=2, consecutive_failures=1)
    await asyncio.sleep(1)  # t=11: bucket 1 is out
    assert breaker.snapshot() == snap(calls=2, failures=1, slow_calls=1, consecutive_failures=1)


async def test_time_window_records_successes_at_the_time_they_happen() -> None:
    breaker = CircuitBreaker(failure_rate=0.5, window_seconds=10, min_calls=4)
    pipeline = Pipeline(program, breaker)
    await asyncio.sleep(100)
    for question in ("ok", "ok", "ok", "fail", "fail"):
        await run(pipeline, question)
    assert breaker.snapshot() == snap(calls=5, failures=2, consecutive_failures=2)


async def test_default_time_window_counts_a_success() -> None:
    breaker = CircuitBreaker(failure_rate=0.5)
    pipeline = Pipeline(program, breaker)
    assert await pipeline("ok") == "answer"
    assert breaker.snapshot() == snap(calls=1)


async def test_default_time_window_is_sixty_seconds() -> None:
    breaker = CircuitBreaker(failure_rate=1.0, min_calls=2)
    pipeline = Pipeline(program, breaker)
    await run(pipeline, "fail")  # t=0
    await asyncio.sleep(59.9)
    assert breaker.snapshot().failures == 1
    await asyncio.sleep(0.1)  # t=60: 6 s buckets, the one from t=0 is out
    assert breaker.snapshot().failures == 0


async def test_default_time_window_counts_successes_after_the_first_minute() -> None:
    """Regression: the default 60 s time window took the untimed fast path and stamped successes at t=0."""
    breaker = CircuitBreaker(failure_rate=0.5, min_calls=4)
    pipeline = Pipeline(program, breaker)
    await asyncio.sleep(100)
    for question in ["ok"] * 6 + ["fail"] * 4:
        await run(pipeline, question)
    assert breaker.state is CLOSED  # 4 failures of 10 calls < 0.5


async def test_a_time_window_puts_a_call_in_the_bucket_floor_division_gives_at_a_float_boundary() -> None:
    """0.1 s buckets: 1.0 // 0.1 == 9.0 but 1.0 / 0.1 == 10.0. A failure at t=1.0 is in bucket 9, one window old at
    t=1.95 (bucket 19); one at t=0.05 (bucket 0) is still inside the last second at t=1.0."""
    clock = ManualClock()
    breaker = CircuitBreaker(failure_rate=1.0, window_seconds=1.0, buckets=10, min_calls=100)
    pipeline = Pipeline(program, breaker, clock=clock)
    clock.time = 1.0
    assert await run(pipeline, "fail") == "error"
    assert counts(breaker.snapshot()) == (1, 1, 0)
    clock.time = 1.95
    assert counts(breaker.snapshot()) == (0, 0, 0)

    early = CircuitBreaker(failure_rate=1.0, window_seconds=1.0, buckets=10, min_calls=100)
    clock = ManualClock()
    pipeline = Pipeline(program, early, clock=clock)
    clock.time = 0.05
    assert await run(pipeline, "fail") == "error"
    clock.time = 1.0
    assert counts(early.snapshot()) == (1, 1, 0)
