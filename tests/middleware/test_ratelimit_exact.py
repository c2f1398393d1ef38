"""RateLimiter, to the exact figure: how long a call waits (requests window, token window, bucket), the
``retry_after`` a rejected call is given (backlogs of one or several windows), and the 1 ns admission slack at its
exact boundary. Async tests run on looptime's virtual clock, which starts at 0; the boundary tests use a hand-set
clock.
"""

from __future__ import annotations

import asyncio

import pytest

from resilient_dspy import Pipeline, RateLimitedError
from resilient_dspy.events import Event
from resilient_dspy.middleware.ratelimit import Limit, LimitUsage, RateLimiter, RateLimitRejected
from resilient_dspy.testing.plugin import ManualClock

from .test_ratelimit import Recorder, by_tokens_input, cancel_all, now, report_usage, settle, spawn


class HandClock(ManualClock):
    """A :class:`ManualClock` whose deadline jumps the clock to it and fires at once."""

    def deadline(self, when: float) -> asyncio.Timeout:
        self.time = max(self.time, when)
        return asyncio.timeout(0)


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
    limiter = RateLimiter(tokens, estimate_tokens=lambda call: 4, counts_from="admission")

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
