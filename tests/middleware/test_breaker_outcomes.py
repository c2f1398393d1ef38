"""What a CircuitBreaker counts, to the exact figure: only outcomes that reached the provider (a layer below that
answers or refuses on its own is neutral, a half-open probe it answers gives its permit back), on the fast
unpartitioned path and on a keyed circuit alike; the end of the break handed to a Retry above; a fast success
counted as nothing but a success. Async tests run on looptime's virtual clock, which starts at 0.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from resilient_dspy import BulkheadFullError, CircuitBreaker, CircuitOpenError, Pipeline
from resilient_dspy.core.call import Call, Handler

from .breaker_steps import CLOSED, HALF_OPEN, OPEN, by_prefix, program, run, snap


class Below:
    """Just below the breaker: a question ending in ``|hit`` is answered without reaching the program (a cache hit),
    one ending in ``|full`` is refused without reaching it (an inner layer's rejection)."""

    async def __call__(self, call: Call, next: Handler) -> Any:
        question = call.inputs["question"]
        if question.endswith("|hit"):
            return "cached"
        if question.endswith("|full"):
            raise BulkheadFullError("inner")
        return await next(call)


async def answer_of(pipeline: Pipeline, question: str) -> str:
    try:
        return await run(pipeline, question)
    except BulkheadFullError:
        return "full"


@pytest.mark.parametrize("keyed", [False, True], ids=["unpartitioned", "keyed"])
async def test_an_answer_or_refusal_from_below_counts_nothing(keyed: bool) -> None:
    """Consecutive mode (the fast path when unpartitioned): hits and inner refusals between two failures neither
    reset the count nor add a call."""
    breaker = CircuitBreaker(3, key=by_prefix if keyed else None)
    pipeline = Pipeline(program, breaker, Below())
    key = "a" if keyed else None
    for question, expected in (("a|fail", "error"), ("a|hit", "cached"), ("a|full", "full"), ("a|fail", "error")):
        assert await answer_of(pipeline, question) == expected
    assert breaker.snapshot(key) == snap(key=key, calls=2, failures=2, consecutive_failures=2)


@pytest.mark.parametrize("below", ["hit", "full"])
@pytest.mark.parametrize("keyed", [False, True], ids=["unpartitioned", "keyed"])
async def test_a_probe_answered_or_refused_below_gives_its_permit_back(keyed: bool, below: str) -> None:
    breaker = CircuitBreaker(1, break_duration=10, key=by_prefix if keyed else None)
    pipeline = Pipeline(program, breaker, Below())
    key = "a" if keyed else None
    assert await answer_of(pipeline, "a|fail") == "error"
    await asyncio.sleep(10)
    assert await answer_of(pipeline, f"a|{below}") in ("cached", "full")
    assert breaker.snapshot(key) == snap(key=key, state=HALF_OPEN, break_duration=10.0)  # no probe out
    assert await answer_of(pipeline, "a|ok") == "answer"  # the next call probes the provider
    assert breaker.snapshot(key).state is CLOSED


async def test_a_fast_success_on_a_count_window_is_no_slow_call() -> None:
    breaker = CircuitBreaker(failure_rate=0.5, window=4, min_calls=4)
    pipeline = Pipeline(program, breaker)
    for _ in range(2):
        assert await run(pipeline, "ok") == "answer"
    assert breaker.snapshot() == snap(calls=2)


async def test_a_success_started_before_the_circuit_opened_counts_nothing_after() -> None:
    breaker = CircuitBreaker(1, break_duration=100)
    pipeline = Pipeline(program, breaker)
    late = asyncio.create_task(pipeline("sleep:5"))
    await asyncio.sleep(1)
    assert await run(pipeline, "fail") == "error"
    assert await late == "answer"
    assert breaker.snapshot() == snap(state=OPEN, break_duration=100.0, retry_after=96.0)


async def test_a_keyed_circuit_counts_each_success_in_consecutive_mode() -> None:
    breaker = CircuitBreaker(3, key=by_prefix)
    pipeline = Pipeline(program, breaker)
    for _ in range(2):
        await run(pipeline, "a|ok")
    await run(pipeline, "a|fail")
    assert breaker.snapshot("a") == snap(key="a", calls=3, failures=1, consecutive_failures=1)


async def test_a_keyed_circuit_counts_slow_calls_and_opens_for_the_errors_retry_after() -> None:
    breaker = CircuitBreaker(
        failure_rate=0.5, slow_call_rate=1.0, slow_call_duration=1, window=10, min_calls=3, key=by_prefix
    )
    pipeline = Pipeline(program, breaker)
    await run(pipeline, "a|sleep:1")
    await run(pipeline, "a|sleep:1:fail")
    assert breaker.snapshot("a") == snap(key="a", calls=2, failures=1, slow_calls=2, consecutive_failures=1)
    await run(pipeline, "a|rl:50")
    assert breaker.snapshot("a") == snap(key="a", state=OPEN, retry_after=50.0)


async def test_a_cancelled_keyed_probe_gives_its_permit_back() -> None:
    breaker = CircuitBreaker(1, break_duration=10, key=by_prefix)
    pipeline = Pipeline(program, breaker)
    await run(pipeline, "a|fail")
    await asyncio.sleep(10)
    probe = asyncio.create_task(pipeline("a|sleep:100"))
    await asyncio.sleep(1)
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    assert breaker.snapshot("a") == snap(key="a", state=HALF_OPEN, break_duration=10.0)
    assert await run(pipeline, "a|ok") == "answer"


async def test_the_failure_that_opens_it_tells_the_call_when_the_break_ends() -> None:
    """``call.record.blocked_until`` is what a Retry above waits for; a failure that leaves it closed sets none."""
    breaker = CircuitBreaker(2, break_duration=10)
    pipeline = Pipeline(program, breaker)
    await asyncio.sleep(3)
    first = pipeline.new_call({"question": "fail"})
    with pytest.raises(Exception, match="503"):
        await pipeline.run(first)
    assert first.record.blocked_until is None
    second = pipeline.new_call({"question": "fail"})
    with pytest.raises(Exception, match="503"):
        await pipeline.run(second)
    assert second.record.blocked_until == 13.0
    with pytest.raises(CircuitOpenError):
        await pipeline("ok")


def test_a_snapshot_outside_a_running_loop_reads_time_zero() -> None:
    breaker = CircuitBreaker(failure_rate=0.5)  # a time window: the snapshot reads the clock
    pipeline = Pipeline(program, breaker)  # kept alive: the breaker holds its pipelines weakly
    assert breaker.snapshot() == snap()
    assert breaker.health().status == "ok" and pipeline.name


async def test_a_success_that_trips_a_count_window_on_the_fast_path_opens_for_a_whole_break_from_now() -> None:
    """Regression: the unpartitioned fast path counted a success at time 0.0, so a success completing ``min_calls``
    opened the circuit until ``0 + break_duration`` (already over, once the loop clock is past it) and announced
    nothing."""
    events: list[Any] = []
    breaker = CircuitBreaker(failure_rate=0.5, window=4, min_calls=4, break_duration=30, name="cb")
    pipeline = Pipeline(program, breaker, listeners=[events.append])
    await asyncio.sleep(1000)  # the loop clock is far past one break
    for step in ("fail", "fail", "ok", "ok"):
        await run(pipeline, step)  # the last success brings the window to min_calls at 2 of 4 failed: trips
    assert breaker.state is OPEN
    assert await run(pipeline, "ok") == "rejected"
    assert breaker.snapshot().retry_after == pytest.approx(30.0)
    assert [(e.old, e.new, e.reason) for e in events if hasattr(e, "reason")] == [(CLOSED, OPEN, "failure_rate")]
