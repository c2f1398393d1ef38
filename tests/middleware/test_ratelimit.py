"""RateLimiter: exact sliding windows (property-tested against a reference model), utilisation, FIFO fairness for
large requests, several limits at once, token reconciliation, max_wait and deadlines, oversize requests,
cancellation, partitions, burst mode, events, validation, what it reports (describe, snapshots, health, rejections),
and a real ``dspy.Predict`` on the fault-injecting LM. Exact waits and ``retry_after`` figures: test_ratelimit_exact.py.

Async tests run on looptime's virtual loop clock (``--looptime``); property tests build a looptime loop per example.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

import dspy
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from resilient_dspy import Pipeline, RateLimitedError, Retry
from resilient_dspy.core.health import LayerHealth
from resilient_dspy.errors import ConfigurationError, RequestTooLargeError
from resilient_dspy.events import Event
from resilient_dspy.middleware.ratelimit import (
    DEFAULT_MAX_TOKENS,
    Limit,
    LimitUsage,
    RateLimiter,
    RateLimiterOptions,
    RateLimiterSnapshot,
    RateLimitReconciled,
    RateLimitRejected,
    RateLimitWaited,
)
from resilient_dspy.testing import FaultInjectingLM
from tests.conftest import other_tasks, run_virtual

SLACK = 2e-9  # the limiter treats admission times within 1 ns as reached (float dust, timer resolution)


def now() -> float:
    return asyncio.get_running_loop().time()


def report_usage(tokens: int) -> None:
    """What an LM does when it answers: record its usage in DSPy's active tracker (if someone measures)."""
    tracker = dspy.settings.usage_tracker
    if tracker is not None:
        tracker.add_usage("test/model", {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens})


def by_tokens_input(call: Any) -> int:
    tokens: int = call.inputs.get("tokens", 1)
    return tokens


class Recorder:
    """An async program that records when each call was admitted; reports ``actual`` tokens as LM usage."""

    def __init__(self) -> None:
        self.admitted: list[tuple[float, str]] = []

    @property
    def names(self) -> list[str]:
        return [name for _, name in self.admitted]

    def time_of(self, name: str) -> float:
        return next(t for t, n in self.admitted if n == name)

    async def __call__(
        self, question: str, tokens: int = 1, actual: int | None = None, latency: float = 0.0, fail: bool = False
    ) -> str:
        self.admitted.append((now(), question))
        if latency:
            await asyncio.sleep(latency)
        if actual is not None:
            report_usage(actual)
        if fail:
            raise ValueError(question)
        return question


def spawn(pipeline: Pipeline, question: str, **inputs: Any) -> asyncio.Task[Any]:
    return asyncio.create_task(pipeline(question=question, **inputs))


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def window_sums(admissions: list[tuple[float, int]], per: float) -> list[int]:
    """For every admission time s, the weight admitted in [s, s + per) (minus the limiter's 1 ns slack)."""
    times = sorted(admissions)
    sums = []
    for start, _ in times:
        sums.append(sum(w for t, w in times if start <= t < start + per - SLACK))
    return sums


def reference_admissions(
    limits: list[Limit], arrivals: list[tuple[float, int]], held: list[float] | None = None
) -> list[float]:
    """An ideal exact, FIFO, work-conserving limiter: each call at the earliest time every window has room. With
    ``held`` (each call's latency) an admission's window starts at its answer (``counts_from="answer"``)."""
    admitted: list[tuple[float, int]] = []
    previous = -math.inf
    for index, (arrival, tokens) in enumerate(arrivals):
        t = max(arrival, previous)
        while True:
            later = t
            for limit in limits:
                weight = tokens if limit.unit == "tokens" else 1
                spans = [(a + (held[i] if held else 0.0), w) for i, (a, w) in enumerate(admitted[:index])]
                inside = sorted(
                    (a + limit.per, w if limit.unit == "tokens" else 1) for a, w in spans if a + limit.per > t
                )
                excess = sum(w for _, w in inside) + weight - limit.amount
                for expiry, w in inside:
                    if excess <= 0:
                        break
                    excess -= w
                    later = max(later, expiry)
            if later == t:
                break
            t = later
        admitted.append((t, tokens))
        previous = t
    return [t for t, _ in admitted]


# ------------------------------------------------------------------------------------ 1. exactness (properties)

Arrival = tuple[float, int, int, float]  # gap before arriving, token estimate, refund percent, latency


@settings(max_examples=150, deadline=None)
@given(
    requests=st.none() | st.tuples(st.integers(1, 5), st.sampled_from([0.5, 1.0, 1.5, 2.5])),
    tokens=st.none() | st.tuples(st.integers(10, 60), st.sampled_from([0.7, 1.0, 3.0])),
    arrivals=st.lists(
        st.tuples(
            st.sampled_from([0.0, 0.0, 0.05, 0.2, 0.5, 1.3]),
            st.integers(1, 60),
            st.sampled_from([0, 0, 0, 50, 100]),
            st.sampled_from([0.0, 0.1, 0.5, 2.0]),
        ),
        min_size=1,
        max_size=30,
    ),
    counts_from=st.sampled_from(["answer", "admission"]),
)
def test_property_no_window_exceeds_any_limit(
    requests: tuple[int, float] | None, tokens: tuple[int, float] | None, arrivals: list[Arrival], counts_from: str
) -> None:
    """Any arrivals, weights, refunds and latencies, one or two limits: every window [s, s+per) starting at an
    admission holds at most ``amount`` (tokens counted at their reconciled weight), admissions are FIFO, and
    without refunds each call is admitted exactly when an ideal exact limiter would admit it. Counting from the
    answer, no moment has more than ``amount`` in [admitted, answered + per): a provider that stamps a request
    anywhere between the two can never see more."""
    assume(requests is not None or tokens is not None)
    limits = []
    if requests is not None:
        limits.append(Limit.requests(*requests))
    if tokens is not None:
        limits.append(Limit.tokens(*tokens))
    cap = tokens[0] if tokens is not None else 60
    calls = [(gap, min(weight, cap), refund, latency) for gap, weight, refund, latency in arrivals]
    refunds = any(refund for _, _, refund, _ in calls)

    async def scenario() -> None:
        program = Recorder()
        limiter = RateLimiter(*limits, estimate_tokens=by_tokens_input, counts_from=counts_from)  # type: ignore[arg-type]
        pipeline = Pipeline(program, limiter)
        arrived: list[tuple[float, int]] = []
        tasks = []
        for index, (gap, weight, refund, latency) in enumerate(calls):
            await asyncio.sleep(gap)
            arrived.append((now(), weight))
            actual = weight - weight * refund // 100
            tasks.append(spawn(pipeline, str(index), tokens=weight, actual=actual, latency=latency))
        assert await asyncio.gather(*tasks) == [str(i) for i in range(len(calls))]

        assert program.names == [str(i) for i in range(len(calls))]  # FIFO
        times = [t for t, _ in program.admitted]
        for limit in limits:
            if limit.unit == "requests":
                weights = [1] * len(calls)
            else:
                weights = [weight - weight * refund // 100 for _, weight, refund, _ in calls]
            assert max(window_sums(list(zip(times, weights, strict=True)), limit.per)) <= limit.amount
            if counts_from == "answer":
                spans = [(t, t + latency + limit.per) for t, (_, _, _, latency) in zip(times, calls, strict=True)]
                for moment, _ in spans:
                    inside = (
                        w for (start, end), w in zip(spans, weights, strict=True) if start <= moment < end - SLACK
                    )
                    assert sum(inside) <= limit.amount
        if not refunds:
            held = [latency for _, _, _, latency in calls] if counts_from == "answer" else None
            expected = reference_admissions(limits, arrived, held)
            assert times == pytest.approx(expected, abs=1e-4)

    run_virtual(scenario)


@settings(max_examples=80, deadline=None)
@given(
    amount=st.integers(1, 8),
    per=st.sampled_from([0.5, 1.0, 2.0]),
    burst=st.integers(1, 12),
    gaps=st.lists(st.sampled_from([0.0, 0.0, 0.0, 0.05, 0.3, 1.1]), min_size=1, max_size=40),
)
def test_property_burst_mode_obeys_the_bucket_bound(amount: int, per: float, burst: int, gaps: list[float]) -> None:
    """Burst mode is a token bucket: in any interval [t_i, t_k], admissions <= burst + amount * (t_k - t_i) / per,
    and a call arriving to a full bucket is admitted at once."""

    async def scenario() -> None:
        program = Recorder()
        pipeline = Pipeline(program, RateLimiter(Limit.requests(amount, per, burst=burst)))
        tasks = []
        for index, gap in enumerate(gaps):
            await asyncio.sleep(gap)
            tasks.append(spawn(pipeline, str(index)))
        await asyncio.gather(*tasks)
        times = [t for t, _ in program.admitted]
        assert program.names == [str(i) for i in range(len(gaps))]
        for i in range(len(times)):
            for k in range(i, len(times)):
                assert k - i + 1 <= burst + amount * (times[k] - times[i]) / per + 1e-6
        assert times[0] == 0.0 + sum(gaps[:1])

    run_virtual(scenario)


async def test_exact_mode_admits_exactly_amount_in_the_first_window_after_idle() -> None:
    """The difference from a bucket whose burst equals the rate: 100/s admits 100 in [0, 1), not ~200."""
    program = Recorder()
    pipeline = Pipeline(program, RateLimiter(requests=100, per=1.0))
    start = now()
    await asyncio.gather(*(pipeline(question=str(i)) for i in range(300)))
    times = [t - start for t, _ in program.admitted]
    assert sum(1 for t in times if t < 1.0) == 100
    assert sum(1 for t in times if 1.0 <= t < 2.0) == 100
    assert max(window_sums([(t, 1) for t in times], 1.0)) == 100


async def test_utilisation_under_saturation_is_at_least_98_percent() -> None:
    """500 callers looping for 20 s against 100/s: the admissions fill >= 98 % of the theoretical 2000."""
    program = Recorder()
    pipeline = Pipeline(program, RateLimiter(requests=100, per=1.0))
    start = now()
    end = start + 20.0

    async def caller(index: int) -> None:
        while now() < end:
            await pipeline(question=str(index))

    await asyncio.gather(*(caller(i) for i in range(500)))
    inside = [t for t, _ in program.admitted if start <= t < end]
    assert 0.98 * 2000 <= len(inside) <= 2000
    assert max(window_sums([(t, 1) for t in inside], 1.0)) <= 100


# ---------------------------------------------------------------------------------------------- 2. fairness


async def test_large_request_is_admitted_at_its_fifo_position_not_starved() -> None:
    """A 50-token call queued behind 150 one-token calls, with a flood of one-token calls arriving behind it,
    is admitted at t=2 (its fair share: 100 at t=0, 100 at t=1, then 50 + 50 at t=2), before the flood."""
    program = Recorder()
    pipeline = Pipeline(program, RateLimiter(Limit.tokens(100, per=1.0), estimate_tokens=by_tokens_input))
    start = now()
    ahead = [spawn(pipeline, f"ahead{i}", tokens=1, actual=1) for i in range(250)]
    await asyncio.sleep(0.5)
    large = spawn(pipeline, "large", tokens=50, actual=50)
    flood: list[asyncio.Task[Any]] = []
    for i in range(400):
        flood.append(spawn(pipeline, f"flood{i}", tokens=1, actual=1))
        await asyncio.sleep(0.005)
    await asyncio.gather(*ahead, large, *flood)
    assert program.time_of("large") - start == pytest.approx(2.0, abs=1e-5)
    position = program.names.index("large")
    assert program.names[:position] == [f"ahead{i}" for i in range(250)]
    assert all(name.startswith("flood") for name in program.names[position + 1 :])


# ---------------------------------------------------------------------------------------- 3. several limits


async def test_several_limits_are_checked_together_and_charged_atomically() -> None:
    """Requests 2/s and tokens 100/s: a call waiting for tokens does not hold a request slot meanwhile."""
    program = Recorder()
    limiter = RateLimiter(Limit.requests(2, per=1.0), Limit.tokens(100, per=1.0), estimate_tokens=by_tokens_input)
    pipeline = Pipeline(program, limiter)
    start = now()
    first = spawn(pipeline, "a", tokens=90, actual=90)
    second = spawn(pipeline, "b", tokens=20, actual=20)
    third = spawn(pipeline, "c", tokens=1, actual=1)
    await settle()
    assert program.names == ["a"]
    snapshot = limiter.snapshot()
    assert snapshot.queued == 2
    assert [usage.used for usage in snapshot.limits] == [1.0, 90.0]
    await asyncio.gather(first, second, third)
    assert [t - start for t, _ in program.admitted] == [0.0, 1.0, 1.0]


async def test_the_binding_limit_sets_the_pace() -> None:
    """Requests 5/s and tokens 100/s: 30-token calls go 3 per second, 1-token calls 5 per second."""
    program = Recorder()
    limiter = RateLimiter(
        Limit.requests(5, per=1.0), Limit.tokens(100, per=1.0), estimate_tokens=by_tokens_input, name="both"
    )
    pipeline = Pipeline(program, limiter)
    start = now()
    await asyncio.gather(*(pipeline(question=f"big{i}", tokens=30, actual=30) for i in range(6)))
    assert [round(t - start, 6) for t, _ in program.admitted] == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    program.admitted.clear()
    await asyncio.sleep(5)
    start = now()
    await asyncio.gather(*(pipeline(question=f"small{i}", tokens=1, actual=1) for i in range(10)))
    assert [round(t - start, 6) for t, _ in program.admitted] == [0.0] * 5 + [1.0] * 5


# ------------------------------------------------------------------------------------------ 4. reconciliation


async def test_a_refund_lets_the_next_waiter_in_early() -> None:
    """Estimate 80, actual 20: when the first call ends at t=1, the refund wakes the 60-token waiter at once
    (without the refund it would wait for the window, until t=10)."""
    events: list[Event] = []
    program = Recorder()
    limiter = RateLimiter(Limit.tokens(100, per=10.0), estimate_tokens=by_tokens_input)
    pipeline = Pipeline(program, limiter, listeners=[events.append])
    start = now()
    first = spawn(pipeline, "first", tokens=80, actual=20, latency=1.0)
    second = spawn(pipeline, "second", tokens=60, actual=60)
    await asyncio.gather(first, second)
    assert program.time_of("second") - start == pytest.approx(1.0)
    reconciled = [e for e in events if isinstance(e, RateLimitReconciled)]
    assert [(e.estimate, e.actual, e.charged) for e in reconciled] == [(80, 20, 20), (60, 60, 60)]
    assert limiter.snapshot().limits[0].used == 80.0


async def test_counted_from_the_answer_an_excess_delays_later_calls_until_per_after_that_answer() -> None:
    """The same excess, counted from the answer (the default): the first call answered at t=1, so the 30-token call
    waits until t=11, and until then the first call's 90 tokens are held even though it was admitted at t=0."""
    program = Recorder()
    limiter = RateLimiter(Limit.tokens(100, per=10.0), estimate_tokens=by_tokens_input)
    pipeline = Pipeline(program, limiter)
    start = now()
    await pipeline(question="first", tokens=20, actual=90, latency=1.0)
    await asyncio.sleep(9.5)
    assert limiter.snapshot().limits[0].used == 90.0
    await pipeline(question="second", tokens=30, actual=30)
    assert program.time_of("second") - start == pytest.approx(11.0)


async def test_counted_from_the_answer_a_full_window_waits_for_a_running_call_to_answer() -> None:
    """requests=2 per 5 s, both admissions still running: a third call waits for the first answer (t=3) and then
    ``per`` more (t=8); counted from admission it would have gone at t=5, while the provider may still count the
    first request (it reached it at some moment before t=3)."""
    program = Recorder()
    pipeline = Pipeline(program, RateLimiter(requests=2, per=5.0))
    start = now()
    running = [spawn(pipeline, "a", latency=3.0), spawn(pipeline, "b", latency=6.0)]
    await settle()
    await pipeline(question="c")
    assert program.time_of("c") - start == pytest.approx(8.0)
    await asyncio.gather(*running)


async def test_counted_from_the_answer_a_call_waiting_on_running_calls_gives_up_at_max_wait() -> None:
    """Room held by a call that runs longer than ``max_wait``: the waiter is refused at ``max_wait`` (not at once, nor
    later), with a retry_after of at least ``per``."""
    pipeline = Pipeline(Recorder(), RateLimiter(requests=1, per=5.0, max_wait=2.0))
    start = now()
    running = spawn(pipeline, "a", latency=30.0)
    await settle()
    with pytest.raises(RateLimitedError) as refused:
        await pipeline(question="b")
    assert now() - start == pytest.approx(2.0)
    assert refused.value.retry_after is not None and refused.value.retry_after >= 5.0
    await cancel_all([running])


async def test_an_excess_delays_later_calls() -> None:
    """Estimate 20, actual 90: a 30-token call arriving at t=2 waits until the first leaves the window (t=10)."""
    program = Recorder()
    limiter = RateLimiter(Limit.tokens(100, per=10.0), estimate_tokens=by_tokens_input, counts_from="admission")
    pipeline = Pipeline(program, limiter)
    start = now()
    await pipeline(question="first", tokens=20, actual=90, latency=1.0)
    assert limiter.snapshot().limits[0].used == 90.0
    await asyncio.sleep(1.0)
    await pipeline(question="second", tokens=30, actual=30)
    assert program.time_of("second") - start == pytest.approx(10.0)


async def test_a_failed_call_keeps_its_estimate() -> None:
    """No usage measured (the call failed before the LM answered): the estimate stays charged."""
    program = Recorder()
    limiter = RateLimiter(Limit.tokens(100, per=10.0), estimate_tokens=by_tokens_input)
    pipeline = Pipeline(program, limiter)
    start = now()
    with pytest.raises(ValueError):
        await pipeline(question="failed", tokens=80, fail=True)
    assert limiter.snapshot().limits[0].used == 80.0
    await pipeline(question="next", tokens=60, actual=60)
    assert program.time_of("next") - start == pytest.approx(10.0)


async def test_a_failed_call_with_partial_usage_is_charged_at_least_its_estimate() -> None:
    """Failed after some usage: charged max(estimate, measured), never refunded."""
    program = Recorder()
    limiter = RateLimiter(Limit.tokens(100, per=10.0), estimate_tokens=by_tokens_input)
    pipeline = Pipeline(program, limiter)
    with pytest.raises(ValueError):
        await pipeline(question="low", tokens=50, actual=10, fail=True)
    assert limiter.snapshot().limits[0].used == 50.0
    with pytest.raises(ValueError):
        await pipeline(question="high", tokens=10, actual=30, fail=True)
    assert limiter.snapshot().limits[0].used == 80.0


async def test_a_call_that_measured_no_usage_keeps_its_estimate() -> None:
    """A plain function (or a DSPy cache hit) records no LM usage: nothing to reconcile with, estimate kept."""
    program = Recorder()
    limiter = RateLimiter(Limit.tokens(100, per=10.0), estimate_tokens=by_tokens_input)
    await Pipeline(program, limiter)(question="q", tokens=70)
    assert limiter.snapshot().limits[0].used == 70.0


async def test_a_cancelled_admitted_call_keeps_its_charge() -> None:
    """Cancelled while running (the request was sent): no refund."""
    program = Recorder()
    limiter = RateLimiter(Limit.tokens(100, per=10.0), estimate_tokens=by_tokens_input)
    task = spawn(Pipeline(program, limiter), "sent", tokens=70, latency=5.0)
    await asyncio.sleep(1.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert limiter.snapshot().limits[0].used == 70.0


async def test_usage_is_measured_only_with_a_token_limit() -> None:
    """The requests-only path opens no usage scope (it stays cheap); a token limit does."""
    seen: list[object] = []

    async def program(question: str) -> str:
        seen.append(dspy.settings.usage_tracker)
        return question

    await Pipeline(program, RateLimiter(requests=10))(question="q")
    await Pipeline(program, RateLimiter(tokens=10_000, estimate_tokens=lambda call: 1))(question="q")
    assert seen[0] is None
    assert seen[1] is not None


# -------------------------------------------------------------------------------- 5. max_wait and deadlines


async def test_head_whose_exact_wait_exceeds_max_wait_is_rejected_at_once() -> None:
    """1 per 10 s, max_wait 2: a call at t=3 would wait 7 s, so it fails now with retry_after=7 and never runs."""
    events: list[Event] = []
    program = Recorder()
    pipeline = Pipeline(program, RateLimiter(requests=1, per=10.0, max_wait=2.0), listeners=[events.append])
    start = now()
    await pipeline(question="first")
    await asyncio.sleep(3.0)
    before = now()
    with pytest.raises(RateLimitedError) as caught:
        await pipeline(question="second")
    assert now() == before
    assert caught.value.retry_after == pytest.approx(7.0)
    assert program.names == ["first"]
    rejected = [e for e in events if isinstance(e, RateLimitRejected)]
    assert [(e.reason, e.waited) for e in rejected] == [("max_wait", 0.0)]
    assert rejected[0].retry_after == pytest.approx(7.0)
    assert before - start == pytest.approx(3.0)


async def test_head_within_max_wait_sleeps_exactly_until_admission() -> None:
    """A wait of 1.5 s under max_wait 2 is slept on a timer, to the tick; the waited event says 1.5."""
    events: list[Event] = []
    program = Recorder()
    pipeline = Pipeline(program, RateLimiter(requests=1, per=2.0, max_wait=2.0), listeners=[events.append])
    start = now()
    await pipeline(question="first")
    await asyncio.sleep(0.5)
    await pipeline(question="second")
    assert program.time_of("second") - start == pytest.approx(2.0)
    waited = [e for e in events if isinstance(e, RateLimitWaited)]
    assert [e.tokens for e in waited] == [None]
    assert waited[0].waited == pytest.approx(1.5)


async def test_a_wait_that_would_cross_the_deadline_is_rejected_at_once() -> None:
    """Without max_wait the call's deadline bounds the wait: admission at t=10 after a deadline at t=5 fails now."""
    program = Recorder()
    pipeline = Pipeline(program, RateLimiter(requests=1, per=10.0))
    start = now()
    await pipeline(question="first")
    with pytest.raises(RateLimitedError, match="deadline") as caught:
        await pipeline.run(pipeline.new_call({"question": "second"}, deadline=start + 5.0))
    assert now() == start
    assert caught.value.retry_after == pytest.approx(10.0)
    assert program.names == ["first"]


async def test_a_queued_call_gives_up_at_its_deadline_with_an_estimate() -> None:
    """1 per 10 s; the head waits for t=10; a call queued behind it with a deadline at t=9 fails at t=9, with a
    retry_after estimating its turn (one more window after the head's: t=20)."""
    events: list[Event] = []
    program = Recorder()
    limiter = RateLimiter(requests=1, per=10.0)
    pipeline = Pipeline(program, limiter, listeners=[events.append])
    start = now()
    await pipeline(question="first")
    head = spawn(pipeline, "head")
    await asyncio.sleep(8.0)
    with pytest.raises(RateLimitedError) as caught:
        await pipeline.run(pipeline.new_call({"question": "queued"}, deadline=start + 9.0))
    assert now() - start == pytest.approx(9.0)
    assert caught.value.retry_after == pytest.approx(11.0)
    assert limiter.snapshot().queued == 1
    await head
    assert program.time_of("head") - start == pytest.approx(10.0)
    assert program.names == ["first", "head"]
    assert [e.reason for e in events if isinstance(e, RateLimitRejected)] == ["deadline"]


async def test_promoted_waiter_rejected_with_its_exact_wait() -> None:
    """A call that reaches the head and finds its wait beyond max_wait is rejected with the exact wait."""
    program = Recorder()
    pipeline = Pipeline(program, RateLimiter(requests=1, per=4.0, max_wait=5.0))
    start = now()
    await pipeline(question="first")
    waiting = spawn(pipeline, "waiting")
    await asyncio.sleep(0.5)
    late = spawn(pipeline, "late")
    assert await waiting == "waiting"
    with pytest.raises(RateLimitedError) as caught:
        await late
    assert program.time_of("waiting") - start == pytest.approx(4.0)
    assert now() - start == pytest.approx(4.0)
    assert caught.value.retry_after == pytest.approx(4.0)


async def test_rate_limited_error_is_not_retried_by_retry_above() -> None:
    program = Recorder()
    pipeline = Pipeline(program, Retry(3, base_delay=0.01), RateLimiter(requests=1, per=10.0, max_wait=1.0))
    await pipeline(question="first")
    with pytest.raises(RateLimitedError):
        await pipeline(question="second")
    assert program.names == ["first"]


# ------------------------------------------------------------------------------------------ 6. request too large


async def test_a_request_larger_than_a_token_limit_can_never_be_admitted() -> None:
    program = Recorder()
    pipeline = Pipeline(program, RateLimiter(Limit.tokens(100, per=60.0), estimate_tokens=by_tokens_input))
    with pytest.raises(RequestTooLargeError) as caught:
        await asyncio.wait_for(pipeline(question="huge", tokens=150), timeout=600)
    assert caught.value.field == "RateLimiter.tokens"
    assert "request of 150 tokens exceeds the limit of 100 tokens per 60s" in caught.value.rule
    assert program.names == []
    assert await pipeline(question="fits", tokens=100) == "fits"


async def test_a_request_larger_than_the_burst_is_too_large() -> None:
    pipeline = Pipeline(
        Recorder(), RateLimiter(Limit.tokens(1000, per=60.0, burst=50), estimate_tokens=by_tokens_input)
    )
    with pytest.raises(RequestTooLargeError, match="burst of 50"):
        await asyncio.wait_for(pipeline(question="q", tokens=51), timeout=600)


async def test_a_bad_estimate_is_an_error() -> None:
    pipeline = Pipeline(Recorder(), RateLimiter(tokens=100, estimate_tokens=lambda call: -1))
    with pytest.raises(ValueError, match="estimate_tokens must return an int >= 0"):
        await pipeline(question="q")


# ------------------------------------------------------------------------------------------ 7. cancellation


async def test_cancelled_head_hands_the_turn_to_the_next_waiter() -> None:
    """Cancel the sleeping head: the next waiter becomes head and is admitted at the head's time."""
    program = Recorder()
    limiter = RateLimiter(requests=1, per=10.0)
    pipeline = Pipeline(program, limiter)
    start = now()
    await pipeline(question="first")
    head = spawn(pipeline, "head")
    behind = spawn(pipeline, "behind")
    await asyncio.sleep(3.0)
    assert limiter.snapshot().queued == 2
    head.cancel()
    with pytest.raises(asyncio.CancelledError):
        await head
    assert limiter.snapshot().queued == 1
    await asyncio.wait_for(behind, timeout=60)
    assert program.time_of("behind") - start == pytest.approx(10.0)
    assert program.names == ["first", "behind"]
    assert limiter.snapshot().queued == 0
    assert not other_tasks()


async def test_cancelled_queued_waiter_leaves_and_the_rest_keep_order() -> None:
    """Cancel a call in the middle of the queue: the others are admitted in order, one window apart."""
    program = Recorder()
    limiter = RateLimiter(requests=1, per=1.0)
    pipeline = Pipeline(program, limiter)
    start = now()
    tasks = [spawn(pipeline, str(i)) for i in range(5)]
    await settle()
    tasks[2].cancel()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=60)
    assert isinstance(results[2], asyncio.CancelledError)
    assert program.names == ["0", "1", "3", "4"]
    assert [round(t - start, 6) for t, _ in program.admitted] == [0.0, 1.0, 2.0, 3.0]


# ------------------------------------------------------------------------------------------ 8. partitions


async def test_keys_are_limited_independently() -> None:
    program = Recorder()
    limiter = RateLimiter(requests=1, per=10.0, key=lambda call: call.inputs["question"][0])
    pipeline = Pipeline(program, limiter)
    start = now()
    await asyncio.gather(pipeline(question="a1"), pipeline(question="b1"), pipeline(question="a2"))
    assert program.time_of("a1") == program.time_of("b1") == start
    assert program.time_of("a2") - start == pytest.approx(10.0)
    assert limiter.snapshot("a").limits[0].used == 1.0
    assert limiter.snapshot("b").limits[0].used == 0.0  # b's window has passed
    assert limiter.snapshot("z") == RateLimiterSnapshot("z", 0, (LimitUsage(limiter.options.limits[0], 0.0, 1.0),))


async def test_idle_keys_are_evicted_once_their_windows_are_empty() -> None:
    """A key is evicted only when its log is empty and nothing waits: old windows keep it, then it goes."""
    program = Recorder()
    limiter = RateLimiter(requests=5, per=10.0, key=lambda call: call.inputs["question"], max_keys=3, idle_after=5)
    pipeline = Pipeline(program, limiter)
    for name in ("k1", "k2", "k3"):
        await pipeline(question=name)
    await asyncio.sleep(6.0)
    await pipeline(question="k3")
    assert {"k1", "k2", "k3"} <= set(limiter.snapshots())  # unused past idle_after, but windows hold admissions
    await asyncio.sleep(10.0)
    await pipeline(question="k4")
    await pipeline(question="k4")
    assert set(limiter.snapshots()) == {"k4"}  # every window has emptied and every key is stale


# ------------------------------------------------------------------------------------------ 9. burst


async def test_burst_mode_admits_the_burst_then_paces_at_the_rate() -> None:
    """Limit.requests(10, 1 s, burst=10): 10 at once, then one every 0.1 s — 19 in the first second (exact: 10)."""
    program = Recorder()
    pipeline = Pipeline(program, RateLimiter(Limit.requests(10, per=1.0, burst=10)))
    start = now()
    await asyncio.gather(*(pipeline(question=str(i)) for i in range(30)))
    times = [t - start for t, _ in program.admitted]
    assert times[:10] == [0.0] * 10
    assert times[10:13] == pytest.approx([0.1, 0.2, 0.3], abs=2e-6)
    assert sum(1 for t in times if t < 1.0 - 1e-6) == 19
    assert max(window_sums([(t, 1) for t in times], 1.0)) <= 10 + 10


async def test_burst_of_one_paces_evenly() -> None:
    program = Recorder()
    pipeline = Pipeline(program, RateLimiter(Limit.requests(4, per=1.0, burst=1)))
    start = now()
    await asyncio.gather(*(pipeline(question=str(i)) for i in range(5)))
    assert [t - start for t, _ in program.admitted] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0], abs=2e-6)


# ------------------------------------------------------------------------------------------ 10. real DSPy


async def test_real_predict_on_the_fault_injecting_lm_reconciles_its_usage() -> None:
    """dspy.Predict on FaultInjectingLM: the default estimate is (inputs + instructions) / 4 + max_tokens; after
    the call the charge is the LM's reported usage, and the prediction still carries its usage."""
    events: list[Event] = []
    program = dspy.Predict("question -> answer")
    limiter = RateLimiter(Limit.tokens(100_000, per=60.0), Limit.requests(100, per=60.0))
    pipeline = Pipeline(program, limiter, listeners=[events.append])
    lm = FaultInjectingLM(max_tokens=300)
    question = "What is DSPy, in one sentence?"
    with dspy.context(lm=lm, track_usage=True):
        prediction = await pipeline(question=question)
    instructions = len(program.signature.instructions)
    entry = lm.journal[-1]
    actual = entry.input_tokens + entry.output_tokens
    reconciled = [e for e in events if isinstance(e, RateLimitReconciled)]
    assert len(reconciled) == 1
    assert reconciled[0].estimate == (len(question) + instructions) // 4 + 300
    assert reconciled[0].actual == actual == reconciled[0].charged
    assert limiter.snapshot().limits[0].used == float(actual)
    assert limiter.snapshot().limits[1].used == 1.0
    usage = prediction.get_lm_usage()
    assert sum(u["total_tokens"] for u in usage.values()) == actual


async def test_default_estimate_falls_back_to_the_documented_max_tokens() -> None:
    limiter = RateLimiter(tokens=1_000_000)
    pipeline = Pipeline(dspy.Predict("question -> answer"), limiter)
    call = pipeline.new_call({"question": "x" * 40})
    instructions = len(dspy.Predict("question -> answer").signature.instructions)
    with dspy.context(lm=FaultInjectingLM()):
        assert limiter.default_estimate(call) == (40 + instructions) // 4 + DEFAULT_MAX_TOKENS


async def test_default_estimate_uses_a_wrapped_lm_max_tokens() -> None:
    limiter = RateLimiter(tokens=1_000_000)
    pipeline = Pipeline(FaultInjectingLM(max_tokens=77), limiter)
    assert limiter.default_estimate(pipeline.new_call({"prompt": "abcdefgh"})) == 2 + 77


# ------------------------------------------------------------------------------------------ 11. options, events


def test_bad_options_name_every_field() -> None:
    with pytest.raises(ConfigurationError) as caught:
        RateLimiter(requests=0, per=-1.0, max_wait=0.0, max_keys=0)
    fields = {field for field, _ in caught.value.problems}
    assert fields == {"RateLimiter.requests", "RateLimiter.per", "RateLimiter.max_wait", "RateLimiter.max_keys"}


def test_no_limit_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError) as caught:
        RateLimiter()
    assert [field for field, _ in caught.value.problems] == ["RateLimiter.limits"]
    assert "at least one limit" in caught.value.problems[0][1]


@pytest.mark.parametrize(
    ("build", "fields"),
    [
        (lambda: Limit.requests(0, 1.0), {"Limit.amount"}),
        (lambda: Limit.tokens(100, 0.0), {"Limit.per"}),
        (lambda: Limit.tokens(100, float("inf")), {"Limit.per"}),
        (lambda: Limit.requests(10, 1.0, burst=0), {"Limit.burst"}),
        (lambda: Limit.requests(2.5, 1.0), {"Limit.amount"}),  # type: ignore[arg-type]
        (lambda: Limit(amount=1, per=1.0, unit="bytes"), {"Limit.unit"}),
        (lambda: RateLimiter("100/s"), {"RateLimiter.limits.0"}),  # type: ignore[arg-type]
        (lambda: RateLimiter(tokens=-5), {"RateLimiter.tokens"}),
        (lambda: RateLimiter(requests=5, estimate_tokens=3), {"RateLimiter.estimate_tokens"}),  # type: ignore[arg-type]
    ],
)
def test_each_bad_setting_is_named(build: Callable[[], object], fields: set[str]) -> None:
    with pytest.raises(ConfigurationError) as caught:
        build()
    assert {field for field, _ in caught.value.problems} == fields


def test_limits_describe_themselves() -> None:
    limiter = RateLimiter(Limit.requests(100, 1.0), Limit.tokens(90_000, 60.0, burst=10_000), name="openai")
    described = limiter.describe()
    assert described["layer"] == "RateLimiter" and described["name"] == "openai"
    assert [limit["unit"] for limit in described["options"]["limits"]] == ["requests", "tokens"]
    assert str(limiter.options.limits[1]) == "90000 tokens per 60s (burst 10000)"
    assert RateLimiter(requests=5, tokens=500, per=2.0).options.limits == (
        Limit.requests(5, 2.0),
        Limit.tokens(500, 2.0),
    )


async def test_no_events_without_waiting_and_layer_names_in_events() -> None:
    """The uncontended path emits nothing; waits and rejections carry the layer name and key."""
    events: list[Event] = []
    pipeline = Pipeline(
        Recorder(),
        RateLimiter(requests=1, per=1.0, max_wait=0.5, name="api", key=lambda call: "k"),
        name="p",
        listeners=[events.append],
    )
    await pipeline(question="a")
    assert events == []
    with pytest.raises(RateLimitedError, match=r"api\['k'\]"):
        await pipeline(question="b")
    assert [(type(e), e.pipeline, e.layer) for e in events] == [(RateLimitRejected, "p", "api")]
    assert [e.key for e in events if isinstance(e, RateLimitRejected)] == ["k"]


def says(error: BaseException, *facts: str) -> None:
    """The message carries these facts (the layer and key, what bounded the wait), whatever its wording."""
    for fact in facts:
        assert fact in str(error), (fact, str(error))


def first_char(call: Any) -> str:
    key: str = call.inputs["question"][0]
    return key


async def cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def test_a_limit_without_burst_describes_itself() -> None:
    assert str(Limit.requests(5, 2.0)) == "5 requests per 2s"
    assert str(Limit.tokens(100, 0.5)) == "100 tokens per 0.5s"


def test_describe_gives_the_name_and_every_option_with_the_shortcuts_folded_into_limits() -> None:
    limiter = RateLimiter(requests=5)
    assert limiter.name == "RateLimiter"
    assert limiter.describe() == {
        "layer": "RateLimiter",
        "name": "RateLimiter",
        "options": {
            "key": None,
            "max_keys": 1024,
            "idle_after": 600.0,
            "limits": ({"amount": 5, "per": 1.0, "unit": "requests", "burst": None},),
            "requests": None,
            "tokens": None,
            "per": 1.0,
            "max_wait": None,
            "counts_from": "answer",
            "estimate_tokens": None,
            "name": None,
            "store": None,
            "on_store_failure": "local",
        },
    }


def test_options_rebuilt_from_their_dump_are_the_same_limits_not_doubled() -> None:
    options = RateLimiter(Limit.tokens(10, 2.0), requests=5, tokens=50, per=2.0).options
    assert options.limits == (Limit.tokens(10, 2.0), Limit.requests(5, 2.0), Limit.tokens(50, 2.0))
    assert RateLimiterOptions(**options.model_dump()) == options
    assert RateLimiterOptions.model_validate(options.model_dump(mode="json")) == options


def test_a_bad_shortcut_period_is_named_even_beside_explicit_limits() -> None:
    with pytest.raises(ConfigurationError) as caught:
        RateLimiter(Limit.requests(1, 1.0), requests=2, per=float("inf"))
    assert [field for field, _ in caught.value.problems] == ["RateLimiter.per"]


@pytest.mark.parametrize("bad", [True, 2.5, -1])
async def test_a_bad_estimate_names_the_option_and_the_value(bad: Any) -> None:
    pipeline = Pipeline(Recorder(), RateLimiter(tokens=100, estimate_tokens=lambda call: bad))
    with pytest.raises(ValueError, match="estimate_tokens") as caught:
        await pipeline(question="q")
    says(caught.value, "RateLimiter", repr(bad))


async def test_default_estimate_counts_non_string_inputs_as_text() -> None:
    """(3 chars + len("1234")) // 4 + max_tokens: 7 // 4 = 1, so one stray character would round up to 2; and
    (3 + len("12345")) // 4 = 2: the value's own text is counted, not a placeholder's."""
    limiter = RateLimiter(tokens=1_000_000)
    pipeline = Pipeline(FaultInjectingLM(max_tokens=77), limiter)
    assert limiter.default_estimate(pipeline.new_call({"prompt": "abc", "n": 1234})) == 1 + 77
    assert limiter.default_estimate(pipeline.new_call({"prompt": "abc", "n": 12345})) == 2 + 77


# ------------------------------------------------------------------------------------------ 12. snapshots, health


def test_snapshot_before_any_call_shows_every_limit_free() -> None:
    requests, tokens = Limit.requests(3, 1.0), Limit.tokens(100, 1.0, burst=50)
    limiter = RateLimiter(requests, tokens)
    expected = RateLimiterSnapshot(None, 0, (LimitUsage(requests, 0.0, 3.0), LimitUsage(tokens, 0.0, 50.0)))
    assert limiter.snapshot() == expected
    assert limiter.snapshots() == {None: expected}


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


async def test_snapshot_of_a_key_and_of_every_key() -> None:
    limit = Limit.requests(2, 10.0)
    limiter = RateLimiter(limit, key=first_char)
    await Pipeline(Recorder(), limiter)(question="a1")
    assert limiter.snapshot("a") == RateLimiterSnapshot("a", 0, (LimitUsage(limit, 1.0, 1.0),))
    assert limiter.snapshots() == {"a": limiter.snapshot("a")}


async def test_a_token_bucket_counts_tokens_and_a_refund_lowers_its_debt() -> None:
    """Estimate 50 then actual 20 at 0.25 s a token: the debt is 20 tokens (tat 5.0 moved back to 5.0 - 7.5)."""
    bucket = Limit.tokens(100, 25.0, burst=100)
    limiter = RateLimiter(bucket, estimate_tokens=by_tokens_input)
    pipeline = Pipeline(Recorder(), limiter)
    await pipeline(question="a", tokens=50, actual=20)
    assert limiter.snapshot().limits == (LimitUsage(bucket, 20.0, 80.0),)
    await pipeline(question="b", tokens=10, actual=40)
    assert limiter.snapshot().limits == (LimitUsage(bucket, 60.0, 40.0),)


async def test_a_requests_bucket_beside_a_token_limit_counts_one_per_call() -> None:
    bucket, tokens = Limit.requests(1, 1.0, burst=3), Limit.tokens(1000, 1.0)
    limiter = RateLimiter(bucket, tokens, estimate_tokens=by_tokens_input)
    await Pipeline(Recorder(), limiter)(question="a", tokens=2)
    assert limiter.snapshot().limits == (LimitUsage(bucket, 1.0, 2.0), LimitUsage(tokens, 2.0, 998.0))


async def test_health_of_a_single_lane_is_degraded_while_calls_queue() -> None:
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


# ------------------------------------------------------------------------------------------ 13. events, rejections


async def test_waited_and_reconciled_events_carry_every_field() -> None:
    events: list[Event] = []
    limiter = RateLimiter(
        Limit.tokens(100, 10.0),
        estimate_tokens=by_tokens_input,
        key=lambda call: "k",
        name="tok",
        counts_from="admission",
    )
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


async def test_a_call_past_its_deadline_is_rejected_at_once_naming_the_layer_and_key() -> None:
    events: list[Event] = []
    limiter = RateLimiter(requests=1, per=10.0, name="api", key=lambda call: "k")
    pipeline = Pipeline(Recorder(), limiter, name="p", listeners=[events.append])
    await asyncio.sleep(1.0)
    await pipeline(question="a")
    await asyncio.sleep(9.5)
    with pytest.raises(RateLimitedError) as caught:
        await pipeline.run(pipeline.new_call({"question": "b"}, deadline=10.5))
    says(caught.value, "api['k']", "deadline")
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
    says(caught.value, "RateLimiter:", "deadline")  # no key to show
    assert caught.value.retry_after == 10.0
    with pytest.raises(RateLimitedError) as caught:
        await pipeline.run(pipeline.new_call({"question": "c"}, deadline=3.0))
    says(caught.value, "RateLimiter:", "max_wait=2.5s")
    assert "deadline" not in str(caught.value)
    rejected = [e for e in events if isinstance(e, RateLimitRejected)]
    assert [(e.reason, e.key) for e in rejected] == [("deadline", None), ("max_wait", None)]


async def test_unpartitioned_waits_and_reconciliations_carry_no_key() -> None:
    events: list[Event] = []
    limiter = RateLimiter(Limit.tokens(100, 10.0), estimate_tokens=by_tokens_input)
    pipeline = Pipeline(Recorder(), limiter, listeners=[events.append])
    await pipeline(question="a", tokens=100, actual=100)
    await pipeline(question="b", tokens=10, actual=10)
    assert [(type(e), e.key) for e in events] == [  # type: ignore[attr-defined]
        (RateLimitReconciled, None),
        (RateLimitWaited, None),
        (RateLimitReconciled, None),
    ]


# ------------------------------------------------------------------------------------------ 14. partition eviction


async def test_a_token_lane_is_kept_while_a_call_is_in_flight_and_evicted_after() -> None:
    """Tokens per 1 s, max_keys=1: key a, with one of its two calls still running at t=4, is kept; at t=10 it
    is evicted with b."""
    limiter = RateLimiter(Limit.tokens(100, 1.0), estimate_tokens=by_tokens_input, key=first_char, max_keys=1)
    pipeline = Pipeline(Recorder(), limiter)
    running = [spawn(pipeline, "a1", tokens=10, latency=3.0), spawn(pipeline, "a2", tokens=10, latency=8.0)]
    await asyncio.sleep(4.0)
    await pipeline(question="b")
    assert "a" in limiter.snapshots()
    await asyncio.gather(*running)
    await asyncio.sleep(2.0)
    await pipeline(question="c")
    assert set(limiter.snapshots()) == {"c"}


async def test_a_token_lane_with_admissions_in_its_window_outlives_idle_after_and_goes_once_it_empties() -> None:
    limiter = RateLimiter(Limit.tokens(100, 10.0), estimate_tokens=by_tokens_input, key=first_char, idle_after=5)
    pipeline = Pipeline(Recorder(), limiter)
    await pipeline(question="a")
    await asyncio.sleep(6.0)
    await pipeline(question="b")
    assert set(limiter.snapshots()) == {"a", "b"}  # a is stale, but its window still holds its admission
    await asyncio.sleep(5.0)
    await pipeline(question="c")
    assert set(limiter.snapshots()) == {"b", "c"}  # a's window emptied at t=10; b's holds until t=16


async def test_a_bucket_lane_whose_debt_is_paid_exactly_now_is_idle() -> None:
    """1/s, burst 1: a's bucket is full again at exactly t=1, so a stale lane goes then (idle_after=1)."""
    limiter = RateLimiter(Limit.requests(1, 1.0, burst=1), key=first_char, idle_after=1.0)
    pipeline = Pipeline(Recorder(), limiter)
    await pipeline(question="a")
    await asyncio.sleep(1.0)
    await pipeline(question="b")
    assert set(limiter.snapshots()) == {"b"}


async def test_a_bucket_lane_is_idle_once_its_debt_is_paid() -> None:
    """1/s, burst 1: key a's bucket is full again at exactly t=1 and is evicted then; b's (due at 1.5) is kept."""
    limiter = RateLimiter(Limit.requests(1, 1.0, burst=1), key=first_char, max_keys=2)
    pipeline = Pipeline(Recorder(), limiter)
    await pipeline(question="a")
    await asyncio.sleep(0.5)
    await pipeline(question="b")
    await asyncio.sleep(0.5)
    await pipeline(question="c")
    assert set(limiter.snapshots()) == {"b", "c"}
