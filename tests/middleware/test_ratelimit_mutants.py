"""RateLimiter: exact-value tests written from mutmut survivors (see docs/mutation-testing.md).

Exact waits and ``retry_after`` estimates (requests window, token window, bucket, backlogs of several windows),
snapshot and ``health()`` figures, event fields, rejection messages, the max_wait/deadline choice, zero-token and
bad estimates, partition eviction of token and burst lanes, and the 1 ns admission slack at its exact boundary.
Async tests run on looptime's virtual clock, which starts at 0; the boundary tests use a hand-set clock.
"""

from __future__ import annotations

import asyncio
from typing import Any

import dspy
import pytest

from resilient_dspy import Pipeline, RateLimitedError
from resilient_dspy.core.health import LayerHealth
from resilient_dspy.events import Event
from resilient_dspy.middleware.ratelimit import (
    Limit,
    LimitUsage,
    RateLimiter,
    RateLimiterSnapshot,
    RateLimitReconciled,
    RateLimitRejected,
    RateLimitWaited,
)
from resilient_dspy.testing import FaultInjectingLM
from resilient_dspy.testing.plugin import ManualClock

from .test_ratelimit import Recorder, by_tokens_input, now, report_usage, settle, spawn


def first_char(call: Any) -> str:
    key: str = call.inputs["question"][0]
    return key


class HandClock(ManualClock):
    """A :class:`ManualClock` whose deadline jumps the clock to it and fires at once."""

    def deadline(self, when: float) -> asyncio.Timeout:
        self.time = max(self.time, when)
        return asyncio.timeout(0)


async def cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# ---------------------------------------------------------------------------------------- options, describe


def test_limit_str_without_burst() -> None:
    assert str(Limit.requests(5, 2.0)) == "5 requests per 2s"
    assert str(Limit.tokens(100, 0.5)) == "100 tokens per 0.5s"


def test_shortcut_defaults_and_describe() -> None:
    limiter = RateLimiter(requests=5)
    assert limiter.name == "RateLimiter"
    assert limiter.describe() == {
        "layer": "RateLimiter",
        "options": {
            "key": None,
            "max_keys": 1024,
            "idle_after": 600.0,
            "limits": ({"amount": 5, "per": 1.0, "unit": "requests", "burst": None},),
            "max_wait": None,
            "estimate_tokens": None,
            "name": None,
        },
    }


@pytest.mark.parametrize("bad", [True, 2.5, -1])
async def test_bad_estimates_name_the_value(bad: Any) -> None:
    pipeline = Pipeline(Recorder(), RateLimiter(tokens=100, estimate_tokens=lambda call: bad))
    with pytest.raises(ValueError) as caught:
        await pipeline(question="q")
    assert str(caught.value) == f"RateLimiter: estimate_tokens must return an int >= 0 (got {bad!r})"


async def test_default_estimate_counts_non_string_inputs_as_text() -> None:
    """(3 chars + len("1234")) // 4 + max_tokens: 7 // 4 = 1, so one stray character would round up to 2."""
    limiter = RateLimiter(tokens=1_000_000)
    pipeline = Pipeline(FaultInjectingLM(max_tokens=77), limiter)
    assert limiter.default_estimate(pipeline.new_call({"prompt": "abc", "n": 1234})) == 1 + 77


# ------------------------------------------------------------------------------------------------- snapshots


def test_snapshot_before_any_call() -> None:
    requests, tokens = Limit.requests(3, 1.0), Limit.tokens(100, 1.0, burst=50)
    limiter = RateLimiter(requests, tokens)
    assert limiter.snapshot() == RateLimiterSnapshot(
        None, 0, (LimitUsage(requests, 0.0, 3.0), LimitUsage(tokens, 0.0, 50.0))
    )


async def test_snapshot_usage_of_a_window_a_token_window_and_a_bucket() -> None:
    """Bucket 100 tokens / 25 s (0.25 s a token), burst 40: its debt is (tat - now) / 0.25 tokens."""
    requests, window, bucket = Limit.requests(3, 10.0), Limit.tokens(40, 10.0), Limit.tokens(100, 25.0, burst=40)
    limiter = RateLimiter(requests, window, bucket, estimate_tokens=by_tokens_input)
    pipeline = Pipeline(Recorder(), limiter)
    await asyncio.sleep(1.0)
    await pipeline(question="a", tokens=30)
    assert limiter.snapshot().limits == (
        LimitUsage(requests, 1.0, 2.0),
        LimitUsage(window, 30.0, 10.0),
        LimitUsage(bucket, 30.0, 10.0),
    )
    await pipeline(question="b", tokens=10)
    await pipeline(question="c", tokens=0)
    assert limiter.snapshot().limits == (
        LimitUsage(requests, 3.0, 0.0),
        LimitUsage(window, 40.0, 0.0),
        LimitUsage(bucket, 40.0, 0.0),
    )
    await asyncio.sleep(2.0)
    assert limiter.snapshot().limits[2] == LimitUsage(bucket, 32.0, 8.0)
    await asyncio.sleep(20.0)
    assert limiter.snapshot() == RateLimiterSnapshot(
        None, 0, (LimitUsage(requests, 0.0, 3.0), LimitUsage(window, 0.0, 40.0), LimitUsage(bucket, 0.0, 40.0))
    )


async def test_snapshot_of_a_key() -> None:
    limit = Limit.requests(2, 10.0)
    limiter = RateLimiter(limit, key=first_char)
    await Pipeline(Recorder(), limiter)(question="a1")
    assert limiter.snapshot("a") == RateLimiterSnapshot("a", 0, (LimitUsage(limit, 1.0, 1.0),))


async def test_a_token_bucket_counts_tokens_and_a_refund_lowers_its_debt() -> None:
    """Estimate 50 then actual 20 at 0.25 s a token: the debt is 20 tokens (tat 5.0 moved back to 5.0 - 7.5)."""
    bucket = Limit.tokens(100, 25.0, burst=100)
    limiter = RateLimiter(bucket, estimate_tokens=by_tokens_input)
    pipeline = Pipeline(Recorder(), limiter)
    await pipeline(question="a", tokens=50, actual=20)
    assert limiter.snapshot().limits == (LimitUsage(bucket, 20.0, 80.0),)
    await pipeline(question="b", tokens=10, actual=40)
    assert limiter.snapshot().limits == (LimitUsage(bucket, 60.0, 40.0),)


# ------------------------------------------------------------------------------------------------ exact waits


async def test_a_token_call_one_token_over_waits_for_the_window() -> None:
    program = Recorder()
    pipeline = Pipeline(program, RateLimiter(Limit.tokens(100, 10.0), estimate_tokens=by_tokens_input))
    await pipeline(question="a", tokens=60)
    await pipeline(question="b", tokens=41)
    assert program.time_of("b") == 10.0


async def test_a_token_call_waits_until_enough_admissions_have_expired() -> None:
    """50 at t=0 and 50 at t=1: a 51-token call needs both gone (t=11), not only the first (t=10)."""
    program = Recorder()
    pipeline = Pipeline(program, RateLimiter(Limit.tokens(100, 10.0), estimate_tokens=by_tokens_input))
    await pipeline(question="a", tokens=50)
    await asyncio.sleep(1.0)
    await pipeline(question="b", tokens=50)
    await asyncio.sleep(1.0)
    await pipeline(question="c", tokens=51)
    assert program.time_of("c") == 11.0


async def test_a_request_waits_for_the_oldest_admission_to_expire() -> None:
    """2 per 10 s, admissions at t=0 and t=1: a third call goes when the first leaves (t=10), not the second."""
    program = Recorder()
    pipeline = Pipeline(program, RateLimiter(requests=2, per=10.0))
    await pipeline(question="a")
    await asyncio.sleep(1.0)
    await pipeline(question="b")
    await asyncio.sleep(1.0)
    await pipeline(question="c")
    assert program.time_of("c") == 10.0


async def test_a_token_call_whose_exact_wait_exceeds_max_wait_is_rejected_at_once() -> None:
    """50 at t=0 and 50 at t=1; at t=2 a 51-token call needs t=11, beyond max_wait 8.5: rejected now, not at t=10."""
    program = Recorder()
    pipeline = Pipeline(program, RateLimiter(Limit.tokens(100, 10.0), max_wait=8.5, estimate_tokens=by_tokens_input))
    await pipeline(question="a", tokens=50)
    await asyncio.sleep(1.0)
    await pipeline(question="b", tokens=50)
    await asyncio.sleep(1.0)
    with pytest.raises(RateLimitedError) as caught:
        await pipeline(question="c", tokens=51)
    assert (now(), caught.value.retry_after) == (2.0, 9.0)


async def test_a_requests_bucket_beside_a_token_limit_counts_one_per_call() -> None:
    bucket, tokens = Limit.requests(1, 1.0, burst=3), Limit.tokens(1000, 1.0)
    limiter = RateLimiter(bucket, tokens, estimate_tokens=by_tokens_input)
    await Pipeline(Recorder(), limiter)(question="a", tokens=2)
    assert limiter.snapshot().limits == (LimitUsage(bucket, 1.0, 2.0), LimitUsage(tokens, 2.0, 998.0))


async def test_a_token_bucket_paces_by_tokens() -> None:
    """Bucket of 50 tokens refilled at 10/s: 40 tokens, then 40 more once 30 have dripped back (t=3)."""
    program = Recorder()
    pipeline = Pipeline(program, RateLimiter(Limit.tokens(100, 10.0, burst=50), estimate_tokens=by_tokens_input))
    await pipeline(question="a", tokens=40)
    await pipeline(question="b", tokens=40)
    assert program.time_of("b") == pytest.approx(3.0, abs=1e-6)


async def test_a_wait_of_exactly_max_wait_is_admitted() -> None:
    program = Recorder()
    pipeline = Pipeline(program, RateLimiter(requests=1, per=10.0, max_wait=10.0))
    await pipeline(question="a")
    await pipeline(question="b")
    assert program.time_of("b") == 10.0


async def test_a_zero_token_call_fits_a_full_token_window() -> None:
    """Estimate 0 is allowed, and needs no room: it follows the 100-token head in at t=10, not at t=20."""
    program = Recorder()
    pipeline = Pipeline(program, RateLimiter(Limit.tokens(100, 10.0), estimate_tokens=by_tokens_input))
    await pipeline(question="a", tokens=100)
    head = spawn(pipeline, "head", tokens=100)
    zero = spawn(pipeline, "zero", tokens=0)
    await asyncio.gather(head, zero)
    assert program.admitted == [(0.0, "a"), (10.0, "head"), (10.0, "zero")]


async def test_a_call_arriving_as_the_head_wakes_does_not_overtake_it() -> None:
    """The late caller's timer fires just before the head's (both at t=10): it still queues behind the head."""
    program = Recorder()
    pipeline = Pipeline(program, RateLimiter(requests=1, per=10.0))
    await pipeline(question="a")

    async def late() -> str:
        await asyncio.sleep(10.0)
        result: str = await pipeline(question="late")
        return result

    late_task = asyncio.create_task(late())
    await settle()
    head = spawn(pipeline, "head")
    await asyncio.gather(late_task, head)
    assert program.admitted == [(0.0, "a"), (10.0, "head"), (20.0, "late")]


# -------------------------------------------------------------------------------------- retry_after estimates


async def rejected_in_queue(
    limiter: RateLimiter, fill: list[int], ahead: list[int], tokens: int, behind: list[int]
) -> tuple[RateLimitedError, list[Event]]:
    """Admit ``fill`` at t=0, queue ``ahead``; at t=1 a call of ``tokens`` with a deadline at t=6 queues behind
    them (then ``behind``); return its rejection and the events."""
    events: list[Event] = []
    pipeline = Pipeline(Recorder(), limiter, name="p", listeners=[events.append])
    for i, t in enumerate(fill):
        await pipeline(question=f"fill{i}", tokens=t)
    tasks = [spawn(pipeline, f"ahead{i}", tokens=t) for i, t in enumerate(ahead)]
    await asyncio.sleep(1.0)
    call = pipeline.new_call({"question": "x", "tokens": tokens}, deadline=6.0)
    rejected = asyncio.create_task(pipeline.run(call))
    await settle()
    tasks += [spawn(pipeline, f"behind{i}", tokens=t) for i, t in enumerate(behind)]
    with pytest.raises(RateLimitedError) as caught:
        await rejected
    await cancel_all(tasks)
    return caught.value, events


@pytest.mark.parametrize(
    ("ahead", "tokens", "behind", "retry_after"),
    [
        ([30], 50, [], 4.0),  # backlog 80 <= 100: when the first leaves (t=10)
        ([100], 1, [], 14.0),  # backlog 101: one more window (t=20)
        ([100], 50, [100], 14.0),  # backlog 150 (what is behind does not count): one more window
        ([100], 100, [], 14.0),  # backlog 200: still one more window
        ([100, 50], 100, [], 24.0),  # backlog 250: two more windows (t=30)
    ],
)
async def test_token_backlog_estimate_in_whole_windows(
    ahead: list[int], tokens: int, behind: list[int], retry_after: float
) -> None:
    limiter = RateLimiter(Limit.tokens(100, 10.0), estimate_tokens=by_tokens_input, key=lambda call: "k")
    error, events = await rejected_in_queue(limiter, [100], ahead, tokens, behind)
    assert error.retry_after == retry_after
    assert events[-1] == RateLimitRejected(
        pipeline="p", layer="RateLimiter", time=6.0, key="k", reason="deadline", retry_after=retry_after, waited=5.0
    )


@pytest.mark.parametrize(("ahead", "retry_after"), [(1, 4.0), (5, 24.0)])
async def test_requests_backlog_estimate_in_whole_windows(ahead: int, retry_after: float) -> None:
    """2 per 10 s, full until t=10: 2nd in the queue goes at t=10, 6th two windows later (t=30)."""
    error, _ = await rejected_in_queue(RateLimiter(requests=2, per=10.0), [1, 1], [1] * ahead, 1, [])
    assert error.retry_after == retry_after


async def test_bucket_backlog_estimate() -> None:
    """2/s, burst 2 (0.5 s a call), emptied at t=0: the head goes at 0.5, the 3rd in the queue at 1.5 (its own
    deadline at 0.25 gives retry_after 1.25)."""
    program = Recorder()
    pipeline = Pipeline(program, RateLimiter(Limit.requests(2, 1.0, burst=2)))
    await asyncio.gather(pipeline(question="a"), pipeline(question="b"))
    tasks = [spawn(pipeline, "head"), spawn(pipeline, "second")]
    await settle()
    with pytest.raises(RateLimitedError) as caught:
        await pipeline.run(pipeline.new_call({"question": "third"}, deadline=0.25))
    assert caught.value.retry_after == 1.25
    await asyncio.gather(*tasks)
    assert program.admitted[2:] == [(0.5, "head"), (1.0, "second")]


async def test_a_call_past_its_deadline_is_rejected_at_once() -> None:
    events: list[Event] = []
    limiter = RateLimiter(requests=1, per=10.0, name="api", key=lambda call: "k")
    pipeline = Pipeline(Recorder(), limiter, name="p", listeners=[events.append])
    await asyncio.sleep(1.0)
    await pipeline(question="a")
    await asyncio.sleep(9.5)
    with pytest.raises(RateLimitedError) as caught:
        await pipeline.run(pipeline.new_call({"question": "b"}, deadline=10.5))
    assert str(caught.value) == "api['k']: cannot admit the call within the call's deadline (retry after 0.5s)"
    assert caught.value.retry_after == 0.5
    assert events == [
        RateLimitRejected(pipeline="p", layer="api", time=10.5, key="k", reason="deadline", retry_after=0.5, waited=0.0)
    ]


async def test_the_earlier_of_max_wait_and_deadline_is_the_reason() -> None:
    """max_wait 2.5 s: a deadline at the same moment names the deadline; a later one names max_wait."""
    events: list[Event] = []
    pipeline = Pipeline(Recorder(), RateLimiter(requests=1, per=10.0, max_wait=2.5), listeners=[events.append])
    await pipeline(question="a")
    with pytest.raises(RateLimitedError) as caught:
        await pipeline.run(pipeline.new_call({"question": "b"}, deadline=2.5))
    assert str(caught.value) == "RateLimiter: cannot admit the call within the call's deadline (retry after 10s)"
    with pytest.raises(RateLimitedError) as caught:
        await pipeline.run(pipeline.new_call({"question": "c"}, deadline=3.0))
    assert str(caught.value) == "RateLimiter: cannot admit the call within max_wait=2.5s (retry after 10s)"
    assert [e.reason for e in events if isinstance(e, RateLimitRejected)] == ["deadline", "max_wait"]


# ---------------------------------------------------------------------------------------------------- events


async def test_waited_and_reconciled_events_carry_every_field() -> None:
    events: list[Event] = []
    limiter = RateLimiter(Limit.tokens(100, 10.0), estimate_tokens=by_tokens_input, key=lambda call: "k", name="tok")
    pipeline = Pipeline(Recorder(), limiter, name="p", listeners=[events.append])
    first = spawn(pipeline, "a", tokens=100, actual=80, latency=2.0)
    await asyncio.sleep(1.0)
    await pipeline(question="b", tokens=50, actual=50)
    await first
    with pytest.raises(ValueError):
        await pipeline(question="c", tokens=10, actual=30, fail=True)
    assert events == [
        RateLimitReconciled(pipeline="p", layer="tok", time=2.0, key="k", estimate=100, actual=80, charged=80),
        RateLimitWaited(pipeline="p", layer="tok", time=10.0, key="k", waited=9.0, tokens=50),
        RateLimitReconciled(pipeline="p", layer="tok", time=10.0, key="k", estimate=50, actual=50, charged=50),
        RateLimitReconciled(pipeline="p", layer="tok", time=10.0, key="k", estimate=10, actual=30, charged=30),
    ]


async def test_an_uncontended_token_call_without_usage_emits_nothing_and_attaches_nothing() -> None:
    events: list[Event] = []

    async def program(question: str) -> dspy.Prediction:
        return dspy.Prediction(answer=question)

    pipeline = Pipeline(program, RateLimiter(tokens=1000, estimate_tokens=lambda call: 5), listeners=[events.append])
    with dspy.context(track_usage=True):
        result = await pipeline(question="q")
    assert result.get_lm_usage() is None
    assert events == []


# ------------------------------------------------------------------------------------------------ partitions


async def test_a_token_lane_is_kept_while_a_call_is_in_flight_and_evicted_after() -> None:
    """Tokens per 1 s, max_keys=1: key a, with one of its two calls still running at t=4, is kept; at t=10 it
    is evicted with b."""
    limiter = RateLimiter(Limit.tokens(100, 1.0), estimate_tokens=by_tokens_input, key=first_char, max_keys=1)
    pipeline = Pipeline(Recorder(), limiter)
    running = [spawn(pipeline, "a1", tokens=10, latency=3.0), spawn(pipeline, "a2", tokens=10, latency=8.0)]
    await asyncio.sleep(4.0)
    await pipeline(question="b")
    assert "a" in limiter._partitions
    await asyncio.gather(*running)
    await asyncio.sleep(2.0)
    await pipeline(question="c")
    assert set(dict(limiter._partitions.items())) == {"c"}


async def test_a_bucket_lane_is_idle_once_its_debt_is_paid() -> None:
    """1/s, burst 1: key a's bucket is full again at exactly t=1 and is evicted then; b's (due at 1.5) is kept."""
    limiter = RateLimiter(Limit.requests(1, 1.0, burst=1), key=first_char, max_keys=2)
    pipeline = Pipeline(Recorder(), limiter)
    await pipeline(question="a")
    await asyncio.sleep(0.5)
    await pipeline(question="b")
    await asyncio.sleep(0.5)
    await pipeline(question="c")
    assert set(dict(limiter._partitions.items())) == {"b", "c"}


# ---------------------------------------------------------------------------------------------------- health


async def test_health_of_a_single_lane() -> None:
    limiter = RateLimiter(requests=1, per=10.0, name="api")
    pipeline = Pipeline(Recorder(), limiter)
    lane = {"queued": 0, "limits": [{"unit": "requests", "per": 10.0, "used": 0.0, "available": 1.0}]}
    assert limiter.health() == LayerHealth("api", "ok", {"lanes": {"*": lane}})
    await pipeline(question="a")
    waiting = spawn(pipeline, "b")
    await settle()
    lane = {"queued": 1, "limits": [{"unit": "requests", "per": 10.0, "used": 1.0, "available": 0.0}]}
    assert limiter.health() == LayerHealth("api", "degraded", {"lanes": {"*": lane}})
    await cancel_all([waiting])


async def test_health_of_partitioned_lanes() -> None:
    limiter = RateLimiter(requests=1, per=10.0, key=first_char)
    pipeline = Pipeline(Recorder(), limiter)
    await pipeline(question="a1")
    waiting = spawn(pipeline, "a2")
    await settle()
    await pipeline(question="b1")

    def lane(queued: int) -> dict[str, Any]:
        return {"queued": queued, "limits": [{"unit": "requests", "per": 10.0, "used": 1.0, "available": 0.0}]}

    assert limiter.health() == LayerHealth("RateLimiter", "degraded", {"lanes": {"a": lane(1), "b": lane(0)}})
    await cancel_all([waiting])
    assert limiter.health() == LayerHealth("RateLimiter", "ok", {"lanes": {"a": lane(0), "b": lane(0)}})


# ------------------------------------------------------------------------- the 1 ns slack, at its exact boundary


async def test_an_admission_due_within_a_nanosecond_has_left_the_window() -> None:
    clock = HandClock()
    requests, tokens = Limit.requests(1, 1.0), Limit.tokens(10, 1.0)
    limiter = RateLimiter(requests, tokens, estimate_tokens=lambda call: 4)
    await Pipeline(Recorder(), limiter, clock=clock)(question="a")
    clock.time = 1.0 - 1e-9
    assert limiter.snapshot().limits == (LimitUsage(requests, 0.0, 1.0), LimitUsage(tokens, 0.0, 10.0))


async def test_usage_measured_as_the_admission_leaves_the_window_is_not_charged() -> None:
    """The call ends 1 ns before its admission expires (within the slack): its excess goes nowhere."""
    clock = HandClock()
    tokens = Limit.tokens(10, 1.0)
    limiter = RateLimiter(tokens, estimate_tokens=lambda call: 4)

    async def program(question: str) -> str:
        clock.time = 1.0 - 1e-9
        report_usage(7)
        return question

    await Pipeline(program, limiter, clock=clock)(question="a")
    assert limiter.snapshot().limits == (LimitUsage(tokens, 0.0, 10.0),)


async def test_a_bucket_due_within_a_nanosecond_admits_without_waiting() -> None:
    events: list[Event] = []
    clock = HandClock()
    program = Recorder()
    pipeline = Pipeline(program, RateLimiter(Limit.requests(1, 1.0, burst=1)), clock=clock, listeners=[events.append])
    await pipeline(question="a")
    clock.time = 1.0 - 1e-9
    await pipeline(question="b")
    assert clock.time == 1.0 - 1e-9
    assert events == []
