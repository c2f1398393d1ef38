"""Retry: attempt counts, backoff and jitter, Retry-After, deadlines, cancellation, predicates, budget, DSPy.

Every async test runs on looptime's virtual loop clock (``--looptime`` in pyproject), so sleeps are free and
``loop.time()`` advances by exactly what was slept.
"""

from __future__ import annotations

import asyncio
import math
import random
import uuid
import warnings
from collections.abc import Callable
from typing import Any

import dspy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resilient_dspy import (
    BudgetExceededError,
    BulkheadFullError,
    CircuitOpenError,
    Pipeline,
    RateLimitedError,
    RetriesExhaustedError,
    Retry,
    RetryBudget,
    Timeout,
    TimeoutExceededError,
)
from resilient_dspy.core import LoopClock
from resilient_dspy.errors import ConfigurationError, ResilienceWarning
from resilient_dspy.events import Event, RetryGaveUp, RetryScheduled
from resilient_dspy.middleware.retry import RetryOptions, compute_delay
from resilient_dspy.testing import FaultInjectingLM

# --------------------------------------------------------------------------------------------------- helpers


def other_tasks() -> set[asyncio.Task[Any]]:
    """Tasks still alive besides the current one (for no-orphan checks; same as tests/conftest.py)."""
    current = asyncio.current_task()
    return {task for task in asyncio.all_tasks() if task is not current and not task.done()}


def server_error() -> Exception:
    return dspy.LMServerError("injected 503", status=503)


class Flaky:
    """An async program (input ``question``) that raises ``errors`` in order, then returns ``result``."""

    def __init__(self, *errors: BaseException, result: Any = "ok") -> None:
        self.errors = list(errors)
        self.result = result
        self.calls = 0

    async def __call__(self, question: str) -> Any:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.result


class AlwaysFailing:
    """An async program that raises a fresh ``make()`` error on every call and keeps each one."""

    def __init__(self, make: Callable[[], BaseException] = server_error) -> None:
        self.make = make
        self.raised: list[BaseException] = []

    @property
    def calls(self) -> int:
        return len(self.raised)

    async def __call__(self, question: str) -> Any:
        error = self.make()
        self.raised.append(error)
        raise error


class RecordingClock(LoopClock):
    """The loop clock, remembering every sleep it was asked for."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await super().sleep(seconds)


def scheduled(events: list[Event]) -> list[RetryScheduled]:
    return [event for event in events if isinstance(event, RetryScheduled)]


def delays(events: list[Event]) -> list[float]:
    return [event.delay for event in scheduled(events)]


def gave_up(events: list[Event]) -> list[RetryGaveUp]:
    return [event for event in events if isinstance(event, RetryGaveUp)]


def now() -> float:
    return asyncio.get_running_loop().time()


# ------------------------------------------------------------------------------------------- 1. attempt counts


@pytest.mark.parametrize("failures", [0, 1, 2, 4])
async def test_success_after_k_failures_makes_exactly_k_plus_one_calls(failures: int) -> None:
    """k transient failures then success: k+1 program calls, k retries, the program's value returned."""
    program = Flaky(*(server_error() for _ in range(failures)), result="answer")
    events: list[Event] = []
    pipeline = Pipeline(program, Retry(5, base_delay=1.0, jitter="none"), listeners=[events.append])

    outcome = await pipeline.invoke(question="q")

    assert outcome.value == "answer"
    assert program.calls == failures + 1
    assert outcome.attempts == failures + 1
    assert outcome.retries == failures
    assert outcome.served_by == "primary"
    assert [event.attempt for event in scheduled(events)] == list(range(1, failures + 1))
    assert gave_up(events) == []


@pytest.mark.parametrize("max_attempts", [1, 2, 3, 6])
async def test_always_failing_makes_max_attempts_calls_then_gives_up(max_attempts: int) -> None:
    """An always-failing program is called exactly max_attempts times; the give-up chains the last error."""
    program = AlwaysFailing()
    events: list[Event] = []
    pipeline = Pipeline(program, Retry(max_attempts, base_delay=1.0, jitter="none"), listeners=[events.append])

    with pytest.raises(RetriesExhaustedError) as caught:
        await pipeline(question="q")

    error = caught.value
    assert program.calls == max_attempts
    assert error.attempts == max_attempts
    assert error.reason == "max_attempts"
    assert error.last_error is program.raised[-1]
    assert error.__cause__ is program.raised[-1]
    assert len(scheduled(events)) == max_attempts - 1
    [final] = gave_up(events)
    assert (final.attempts, final.reason, final.error) == (max_attempts, "max_attempts", program.raised[-1])


class Attempts:
    """A layer below Retry recording the attempt number of each call it sees."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    async def __call__(self, call: Any, next: Any) -> Any:
        self.seen.append(call.attempt)
        return await next(call)


async def test_giving_up_after_max_attempts_emits_each_retry_and_the_give_up_exactly() -> None:
    """Every field of RetryScheduled and RetryGaveUp, on the pipeline clock; each attempt is numbered below."""
    events: list[Event] = []
    program = AlwaysFailing()
    attempts = Attempts()
    retry = Retry(3, backoff="constant", base_delay=2, jitter="none")
    pipeline = Pipeline(program, retry, attempts, name="p", listeners=[events.append])
    await asyncio.sleep(1)
    with pytest.raises(RetriesExhaustedError) as caught:
        await pipeline("q")
    assert (caught.value.attempts, caught.value.reason) == (3, "max_attempts")
    assert program.calls == 3 and attempts.seen == [1, 2, 3]
    first, second, third = program.raised
    assert events == [
        RetryScheduled(
            pipeline="p", layer="Retry", time=1.0, attempt=1, delay=2.0, reason="LMServerError", error=first
        ),
        RetryScheduled(
            pipeline="p", layer="Retry", time=3.0, attempt=2, delay=2.0, reason="LMServerError", error=second
        ),
        RetryGaveUp(pipeline="p", layer="Retry", time=5.0, attempts=3, reason="max_attempts", error=third),
    ]


async def test_a_named_retry_labels_its_events_and_describe() -> None:
    events: list[Event] = []
    retry = Retry(2, base_delay=0, name="llm-retry")
    with pytest.raises(RetriesExhaustedError):
        await Pipeline(AlwaysFailing(), retry, listeners=[events.append])("q")
    assert {event.layer for event in events} == {"llm-retry"}
    assert retry.name == retry.describe()["name"] == "llm-retry"
    assert Retry().name == "Retry"


async def test_a_single_attempt_gives_up_at_once() -> None:
    program = AlwaysFailing()
    with pytest.raises(RetriesExhaustedError) as caught:
        await Pipeline(program, Retry(1))("q")
    assert (caught.value.attempts, caught.value.reason, program.calls) == (1, "max_attempts", 1)


# ---------------------------------------------------------------------------------------- 2. backoff sequences


@pytest.mark.parametrize(
    ("backoff", "base_delay", "max_delay", "expected"),
    [
        ("constant", 1.0, 30.0, [1.0, 1.0, 1.0, 1.0, 1.0]),
        ("linear", 1.0, 30.0, [1.0, 2.0, 3.0, 4.0, 5.0]),
        ("linear", 0.5, 30.0, [0.5, 1.0, 1.5, 2.0, 2.5]),
        ("exponential", 1.0, 30.0, [1.0, 2.0, 4.0, 8.0, 16.0]),
        ("exponential", 0.25, 30.0, [0.25, 0.5, 1.0, 2.0, 4.0]),
        ("exponential", 1.0, 5.0, [1.0, 2.0, 4.0, 5.0, 5.0]),
        ("linear", 2.0, 5.0, [2.0, 4.0, 5.0, 5.0, 5.0]),
        ("constant", 10.0, 3.0, [3.0, 3.0, 3.0, 3.0, 3.0]),
    ],
)
async def test_backoff_without_jitter_sleeps_the_exact_sequence(
    backoff: Any, base_delay: float, max_delay: float, expected: list[float]
) -> None:
    """With jitter='none' the sleeps are exactly the backoff sequence, capped by max_delay."""
    program = AlwaysFailing()
    clock = RecordingClock()
    events: list[Event] = []
    retry = Retry(6, backoff=backoff, base_delay=base_delay, max_delay=max_delay, jitter="none", budget=None)
    pipeline = Pipeline(program, retry, clock=clock, listeners=[events.append])
    start = now()

    with pytest.raises(RetriesExhaustedError):
        await pipeline(question="q")

    assert clock.sleeps == expected
    assert delays(events) == expected
    assert now() - start == pytest.approx(sum(expected))


async def test_seeded_full_jitter_is_reproducible_and_within_each_backoff_step() -> None:
    """Two pipelines with the same seeded rng sleep the same jittered delays, each within [0, backoff]."""
    runs: list[list[float]] = []
    for _ in range(2):
        clock = RecordingClock()
        pipeline = Pipeline(AlwaysFailing(), Retry(5, base_delay=1.0, jitter="full"), clock=clock, rng=random.Random(7))
        with pytest.raises(RetriesExhaustedError):
            await pipeline(question="q")
        runs.append(clock.sleeps)
    assert runs[0] == runs[1]
    assert len(runs[0]) == 4
    for sleep, cap in zip(runs[0], [1.0, 2.0, 4.0, 8.0], strict=True):
        assert 0.0 <= sleep <= cap
    assert len(set(runs[0])) == 4  # really jittered, not the plain backoff


async def test_constant_backoff_with_jitter_is_still_jittered() -> None:
    events: list[Event] = []
    retry = Retry(2, backoff="constant", base_delay=1, jitter="full")
    pipeline = Pipeline(Flaky(server_error()), retry, rng=random.Random(7), listeners=[events.append])
    assert await pipeline("q") == "ok"
    assert delays(events) == [random.Random(7).uniform(0.0, 1.0)]


async def test_decorrelated_jitter_feeds_each_delay_into_the_next() -> None:
    events: list[Event] = []
    program = Flaky(server_error(), server_error(), server_error())
    retry = Retry(4, base_delay=1, max_delay=100, jitter="decorrelated", budget=None)
    pipeline = Pipeline(program, retry, rng=random.Random(3), listeners=[events.append])
    assert await pipeline("q") == "ok"
    rng = random.Random(3)
    expected, previous = [], 1.0
    for _ in range(3):
        previous = rng.uniform(1.0, max(1.0, previous * 3))
        expected.append(previous)
    assert delays(events) == expected


# ------------------------------------------------------------------------------------ 3. jitter bound properties

delays_st = st.floats(min_value=0.0, max_value=1e4, allow_nan=False, allow_infinity=False)
caps_st = st.floats(min_value=1e-6, max_value=1e4, allow_nan=False, allow_infinity=False)
backoffs_st = st.sampled_from(["constant", "linear", "exponential"])


def nominal(backoff: str, base: float, cap: float, retry: int) -> float:
    """The capped backoff before jitter, computed independently of the library."""
    if backoff == "constant":
        raw = base
    elif backoff == "linear":
        raw = base * retry
    else:
        raw = base * math.pow(2.0, min(retry - 1, 1000)) if base > 0 else 0.0
    return min(raw, cap)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    jitter=st.sampled_from(["none", "full", "equal"]),
    backoff=backoffs_st,
    base=delays_st,
    cap=caps_st,
    retry=st.integers(min_value=1, max_value=1000),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_jitter_bounds_none_full_equal(
    jitter: Any, backoff: Any, base: float, cap: float, retry: int, seed: int
) -> None:
    """none == d; full in [0, d]; equal in [d/2, d]; never negative, never above max_delay."""
    options = RetryOptions(backoff=backoff, base_delay=base, max_delay=cap, jitter=jitter)
    d = nominal(backoff, base, cap, retry)
    delay = compute_delay(options, retry, base, random.Random(seed).uniform)
    assert 0.0 <= delay <= cap
    if jitter == "none":
        assert delay == d
    elif jitter == "full":
        assert 0.0 <= delay <= d
    else:
        assert d / 2 <= delay <= d


@settings(max_examples=300)
@given(
    base=delays_st,
    cap=caps_st,
    previous=delays_st,
    retry=st.integers(min_value=1, max_value=1000),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_decorrelated_jitter_bounds(base: float, cap: float, previous: float, retry: int, seed: int) -> None:
    """decorrelated is in [base, min(cap, 3*prev)] (clamped to [0, cap]); never negative or above cap."""
    options = RetryOptions(base_delay=base, max_delay=cap, jitter="decorrelated")
    delay = compute_delay(options, retry, previous, random.Random(seed).uniform)
    low = min(base, cap)
    high = min(cap, max(base, 3 * previous))
    assert 0.0 <= delay <= cap
    assert low <= delay <= high * (1 + 1e-12)


@settings(max_examples=50)
@given(
    jitter=st.sampled_from(["none", "full", "equal", "decorrelated"]),
    backoff=backoffs_st,
    base=delays_st,
    cap=caps_st,
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_a_chain_of_delays_stays_within_bounds(jitter: Any, backoff: Any, base: float, cap: float, seed: int) -> None:
    """Feeding each delay back as ``previous`` (as Retry does) keeps 30 retries in [0, max_delay]."""
    options = RetryOptions(backoff=backoff, base_delay=base, max_delay=cap, jitter=jitter)
    rng = random.Random(seed)
    previous = base
    for retry in range(1, 31):
        previous = compute_delay(options, retry, previous, rng.uniform)
        assert 0.0 <= previous <= cap


class Recorder:
    """A ``uniform`` that records its arguments and returns the upper bound."""

    def __init__(self) -> None:
        self.args: list[tuple[float, float]] = []

    def __call__(self, low: float, high: float) -> float:
        self.args.append((low, high))
        return high


@pytest.mark.parametrize(
    ("jitter", "backoff", "retry", "previous", "calls", "delay"),
    [
        ("full", "exponential", 3, 0.0, [(0.0, 4.0)], 4.0),
        ("equal", "exponential", 3, 0.0, [(0.0, 2.0)], 4.0),
        ("equal", "linear", 3, 0.0, [(0.0, 1.5)], 3.0),
        ("decorrelated", "exponential", 5, 2.0, [(1.0, 6.0)], 6.0),
        ("decorrelated", "exponential", 5, 0.1, [(1.0, 1.0)], 1.0),
        ("none", "constant", 7, 0.0, [], 1.0),
    ],
)
def test_compute_delay_draws_from_the_documented_range(
    jitter: str, backoff: str, retry: int, previous: float, calls: list[tuple[float, float]], delay: float
) -> None:
    options = RetryOptions(jitter=jitter, backoff=backoff, base_delay=1.0, max_delay=100.0)
    uniform = Recorder()
    assert compute_delay(options, retry, previous, uniform) == delay
    assert uniform.args == calls


def test_exponential_delay_beyond_retry_1024_is_capped_not_overflowing() -> None:
    """Retry number 1025 of an exponential backoff is simply max_delay (the exponent must not overflow)."""
    options = RetryOptions(backoff="exponential", base_delay=0.001, max_delay=1.0, jitter="none")
    assert compute_delay(options, 1024, 0.0, random.Random(0).uniform) == 1.0
    assert compute_delay(options, 1025, 0.0, random.Random(0).uniform) == 1.0


async def test_many_attempts_end_in_retries_exhausted_not_overflow() -> None:
    """A long retry loop (max_attempts > 1025, small cap) still ends in RetriesExhaustedError."""
    program = AlwaysFailing()
    retry = Retry(1100, base_delay=0.001, max_delay=0.01, jitter="none", budget=None)
    with pytest.raises(RetriesExhaustedError) as caught:
        await Pipeline(program, retry)(question="q")
    assert caught.value.attempts == 1100
    assert program.calls == 1100


# ----------------------------------------------------------------------------------------------- 4. Retry-After


async def test_retry_after_is_a_floor_on_the_delay() -> None:
    """A rate limit with retry_after=5 waits 5s, though the backoff says 0.1s."""
    program = Flaky(dspy.LMRateLimitError("slow down", retry_after=5.0))
    events: list[Event] = []
    pipeline = Pipeline(program, Retry(3, base_delay=0.1, jitter="none"), listeners=[events.append])
    start = now()

    outcome = await pipeline.invoke(question="q")

    assert outcome.attempts == 2
    assert delays(events) == [5.0]
    assert now() - start == pytest.approx(5.0)


async def test_retry_after_is_a_floor_even_with_full_jitter() -> None:
    """Full jitter never undercuts the server's Retry-After: each wait is at least 5s."""
    program = Flaky(*(dspy.LMRateLimitError("slow down", retry_after=5.0) for _ in range(3)))
    events: list[Event] = []
    pipeline = Pipeline(
        program, Retry(4, base_delay=0.1, jitter="full"), listeners=[events.append], rng=random.Random(1)
    )

    await pipeline(question="q")

    assert len(delays(events)) == 3
    assert all(delay >= 5.0 for delay in delays(events))


async def test_backoff_longer_than_retry_after_wins() -> None:
    """Retry-After is a floor, not a replacement: a 2s backoff beats retry_after=0.5."""
    program = Flaky(dspy.LMRateLimitError("slow down", retry_after=0.5))
    events: list[Event] = []
    pipeline = Pipeline(program, Retry(3, base_delay=2.0, jitter="none"), listeners=[events.append])
    await pipeline(question="q")
    assert delays(events) == [2.0]


async def test_retry_after_is_capped_by_max_retry_after() -> None:
    """retry_after=500 with max_retry_after=10 waits exactly 10s."""
    program = Flaky(dspy.LMRateLimitError("slow down", retry_after=500.0))
    events: list[Event] = []
    retry = Retry(3, base_delay=0.1, jitter="none", max_retry_after=10.0)
    pipeline = Pipeline(program, retry, listeners=[events.append])
    start = now()

    await pipeline(question="q")

    assert delays(events) == [10.0]
    assert now() - start == pytest.approx(10.0)


async def test_respect_retry_after_false_ignores_it() -> None:
    """With respect_retry_after=False the plain backoff (0.1s) is used."""
    program = Flaky(dspy.LMServerError("busy", status=503, retry_after=5.0))
    events: list[Event] = []
    retry = Retry(3, base_delay=0.1, jitter="none", respect_retry_after=False)
    pipeline = Pipeline(program, retry, listeners=[events.append])
    start = now()

    await pipeline(question="q")

    assert delays(events) == [0.1]
    assert now() - start == pytest.approx(0.1)


async def test_fault_lm_rate_limit_retry_after_is_honoured_end_to_end() -> None:
    """A dspy.Predict on a rate-limited LM: DSPy maps retry_after, Retry waits at least that long."""
    lm = FaultInjectingLM(script=["rate_limit"])
    events: list[Event] = []
    pipeline = Pipeline(
        dspy.Predict("question -> answer"), Retry(3, base_delay=0.01, jitter="none"), listeners=[events.append]
    )
    with dspy.context(lm=lm):
        outcome = await pipeline.invoke(question=f"rate limited {uuid.uuid4()}")

    [event] = scheduled(events)
    assert isinstance(event.error, dspy.LMRateLimitError)
    assert event.error.retry_after is not None and event.error.retry_after >= 0.5
    assert event.delay == event.error.retry_after
    assert outcome.attempts == 2
    assert lm.requests == 2


# ------------------------------------------------------------------------------------------------- 5. deadline


async def test_gives_up_before_sleeping_past_the_deadline() -> None:
    """Timeout(3) outside Retry(base 10): the 10s wait would cross the deadline, so stop now, not sleep."""
    program = AlwaysFailing()
    events: list[Event] = []
    pipeline = Pipeline(program, Timeout(3), Retry(5, base_delay=10, jitter="none"), listeners=[events.append])
    start = now()

    with pytest.raises(RetriesExhaustedError) as caught:
        await pipeline(question="q")

    assert caught.value.reason == "deadline"
    assert caught.value.attempts == 1
    assert caught.value.last_error is program.raised[0]
    assert program.calls == 1
    assert now() - start < 3
    assert now() - start == pytest.approx(0.0)
    assert scheduled(events) == []
    assert [(e.attempts, e.reason) for e in gave_up(events)] == [(1, "deadline")]


async def test_retry_after_that_crosses_the_deadline_stops_now() -> None:
    """A retry_after of 5s under a 3s deadline gives up at once instead of sleeping."""
    program = AlwaysFailing(lambda: dspy.LMRateLimitError("slow", retry_after=5.0))
    pipeline = Pipeline(program, Timeout(3), Retry(5, base_delay=0.1, jitter="none"))
    start = now()
    with pytest.raises(RetriesExhaustedError) as caught:
        await pipeline(question="q")
    assert (caught.value.reason, caught.value.attempts, program.calls) == ("deadline", 1, 1)
    assert now() - start == pytest.approx(0.0)


async def test_retries_that_fit_run_and_the_one_that_does_not_stops() -> None:
    """Timeout(10), exponential base 4: sleep 4 fits, then 8 would cross (6 left), so 2 attempts at t=4."""
    program = AlwaysFailing()
    pipeline = Pipeline(program, Timeout(10), Retry(5, base_delay=4, jitter="none"))
    start = now()
    with pytest.raises(RetriesExhaustedError) as caught:
        await pipeline(question="q")
    assert (caught.value.reason, caught.value.attempts, program.calls) == ("deadline", 2, 2)
    assert now() - start == pytest.approx(4.0)


async def test_a_delay_exactly_reaching_the_deadline_gives_up() -> None:
    program = AlwaysFailing()
    pipeline = Pipeline(program, Retry(3, backoff="constant", base_delay=1, jitter="none"))
    call = pipeline.new_call({"question": "q"}, deadline=1.0)
    with pytest.raises(RetriesExhaustedError) as caught:
        await pipeline.run(call)
    assert (caught.value.attempts, caught.value.reason, program.calls) == (1, "deadline", 1)


async def test_total_timeout_cancels_a_hanging_attempt_without_retrying_it() -> None:
    """The outer deadline cancels the running attempt: TimeoutExceededError at t=3, no further attempt."""
    calls = 0

    async def hangs(question: str) -> str:
        nonlocal calls
        calls += 1
        await asyncio.Event().wait()
        return "never"

    pipeline = Pipeline(hangs, Timeout(3), Retry(5, base_delay=0.1, jitter="none"))
    start = now()
    with pytest.raises(TimeoutExceededError) as caught:
        await pipeline(question="q")
    assert caught.value.scope == "total"
    assert calls == 1
    assert now() - start == pytest.approx(3.0)
    assert other_tasks() == set()


async def test_attempt_timeout_inside_retry_is_retried() -> None:
    """A Timeout below Retry bounds each attempt; its TimeoutExceededError is retried until success."""
    calls = 0

    async def slow_then_fast(question: str) -> str:
        nonlocal calls
        calls += 1
        if calls <= 2:
            await asyncio.sleep(100)
        return "fast"

    with pytest.warns(ResilienceWarning, match="total"):  # an attempt timeout with no total one: warned at build
        pipeline = Pipeline(slow_then_fast, Retry(4, base_delay=1.0, jitter="none"), Timeout(2))
    start = now()
    outcome = await pipeline.invoke(question="q")
    assert outcome.value == "fast"
    assert (outcome.attempts, calls) == (3, 3)
    assert now() - start == pytest.approx(2 + 1 + 2 + 2)


# --------------------------------------------------------------------------------------------- 6. cancellation


async def test_cancelled_error_from_the_program_is_never_retried() -> None:
    """A CancelledError raised by the program propagates as-is after one call."""
    program = Flaky(asyncio.CancelledError())
    pipeline = Pipeline(program, Retry(5, base_delay=1.0, jitter="none", retry_on=(Exception,)))
    with pytest.raises(asyncio.CancelledError):
        await pipeline(question="q")
    assert program.calls == 1


async def test_cancelling_the_caller_during_a_retry_sleep_stops_everything() -> None:
    """Cancel during the 10s backoff: CancelledError, no further attempt, no task left behind."""
    program = AlwaysFailing()
    events: list[Event] = []
    pipeline = Pipeline(program, Retry(5, base_delay=10, jitter="none"), listeners=[events.append])
    task = asyncio.create_task(pipeline(question="q"))
    await asyncio.sleep(1)
    assert program.calls == 1
    assert delays(events) == [10]

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(100)

    assert task.cancelled()
    assert program.calls == 1
    assert gave_up(events) == []
    assert other_tasks() == set()


async def test_cancelling_the_caller_during_an_attempt_is_not_retried() -> None:
    """Cancel while the program awaits: the cancellation propagates and the program is not called again."""
    calls = 0
    started = asyncio.Event()

    async def hangs(question: str) -> str:
        nonlocal calls
        calls += 1
        started.set()
        await asyncio.Event().wait()
        return "never"

    pipeline = Pipeline(hangs, Retry(5, base_delay=1.0, jitter="none", retry_on=lambda error: True))
    task = asyncio.create_task(pipeline(question="q"))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(100)
    assert calls == 1
    assert other_tasks() == set()


# ------------------------------------------------------------------------------------ 7. never retried by default


@pytest.mark.parametrize(
    "error",
    [
        dspy.LMAuthError("bad key", status=401),
        dspy.LMBillingError("no credit", status=402),
        dspy.LMInvalidRequestError("bad request", status=400),
        dspy.ContextWindowExceededError(model="small"),
        dspy.LMProviderError("not found", status=404),
        ValueError("a bug"),
        CircuitOpenError(retry_after=1.0),
        BulkheadFullError(),
        RateLimitedError(retry_after=0.5),
        BudgetExceededError(),
    ],
    ids=lambda error: type(error).__name__,
)
async def test_non_retryable_errors_are_raised_as_is_after_one_call(error: Exception) -> None:
    """Client errors, unknown errors and inner rejections: raised unwrapped after exactly one call."""
    program = Flaky(error)
    events: list[Event] = []
    pipeline = Pipeline(program, Retry(5, base_delay=1.0, jitter="none"), listeners=[events.append])
    with pytest.raises(type(error)) as caught:
        await pipeline(question="q")
    assert caught.value is error
    assert program.calls == 1
    assert events == []


@pytest.mark.parametrize(
    "retry_on",
    [(Exception,), lambda error: True],
    ids=["tuple-Exception", "predicate-always"],
)
@pytest.mark.parametrize(
    "error", [CircuitOpenError(retry_after=1.0), BulkheadFullError(), RateLimitedError(), BudgetExceededError()]
)
async def test_inner_rejections_are_never_retried_even_when_everything_is(retry_on: Any, error: Exception) -> None:
    """retry_on=(Exception,) or an always-true predicate still does not retry a rejection from below."""
    program = Flaky(error)
    pipeline = Pipeline(program, Retry(5, base_delay=1.0, jitter="none", retry_on=retry_on))
    with pytest.raises(type(error)) as caught:
        await pipeline(question="q")
    assert caught.value is error
    assert program.calls == 1


@pytest.mark.parametrize(
    "error",
    [
        dspy.LMRateLimitError("429", status=429),
        dspy.LMServerError("503", status=503),
        dspy.LMTimeoutError("slow"),
        dspy.LMTransportError("reset"),
        dspy.LMProviderError("bad gateway", status=502),
        TimeoutExceededError(2, scope="attempt"),
        TimeoutError(),
        ConnectionResetError(),
    ],
    ids=lambda error: type(error).__name__,
)
async def test_transient_errors_are_retried_by_default(error: Exception) -> None:
    """Rate limits, 5xx, timeouts and transport errors are retried: two failures then success = 3 calls."""
    program = Flaky(error, error)
    outcome = await Pipeline(program, Retry(3, base_delay=0.1, jitter="none")).invoke(question="q")
    assert outcome.value == "ok"
    assert program.calls == 3


async def test_fault_lm_auth_and_context_window_are_not_retried() -> None:
    """Through a real dspy.Predict: auth and context-window faults reach the caller after one request."""
    for fault, expected in [("auth", dspy.LMAuthError), ("context_window", dspy.ContextWindowExceededError)]:
        lm = FaultInjectingLM(script=[fault])
        pipeline = Pipeline(dspy.Predict("question -> answer"), Retry(4, base_delay=0.1, jitter="none"))
        with dspy.context(lm=lm), pytest.raises(expected):
            await pipeline(question=f"{fault} {uuid.uuid4()}")
        assert lm.requests == 1, fault


# ------------------------------------------------------------------------------------------ 8. custom predicates


async def test_retry_on_a_single_type() -> None:
    """retry_on=ValueError retries ValueError (a subclass too) and nothing else, not even a rate limit."""
    program = Flaky(ValueError("flaky"), UnicodeError("flaky subclass"))
    outcome = await Pipeline(program, Retry(3, base_delay=0.1, jitter="none", retry_on=ValueError)).invoke(question="q")
    assert (outcome.value, outcome.attempts, program.calls) == ("ok", 3, 3)

    limited = Flaky(dspy.LMRateLimitError("429"))
    with pytest.raises(dspy.LMRateLimitError):
        await Pipeline(limited, Retry(3, base_delay=0.1, jitter="none", retry_on=ValueError))(question="q")
    assert limited.calls == 1


async def test_retry_on_a_tuple_of_types() -> None:
    """retry_on=(KeyError, ValueError) retries both, then a TypeError is raised as-is."""
    program = Flaky(KeyError("k"), ValueError("v"), TypeError("t"))
    pipeline = Pipeline(program, Retry(5, base_delay=0.1, jitter="none", retry_on=(KeyError, ValueError)))
    with pytest.raises(TypeError):
        await pipeline(question="q")
    assert program.calls == 3


async def test_retry_on_a_predicate() -> None:
    """A callable retry_on decides per error: 'transient' messages are retried, others are not."""
    program = Flaky(RuntimeError("transient glitch"), RuntimeError("fatal"))
    seen: list[Exception] = []

    def transient(error: Exception) -> bool:
        seen.append(error)
        return "transient" in str(error)

    pipeline = Pipeline(program, Retry(5, base_delay=0.1, jitter="none", retry_on=transient))
    with pytest.raises(RuntimeError, match="fatal"):
        await pipeline(question="q")
    assert program.calls == 2
    assert [str(error) for error in seen] == ["transient glitch", "fatal"]


async def test_retry_on_result_retries_until_accepted() -> None:
    """retry_on_result=lambda r: r is None retries None results and returns the first accepted one."""
    results = [None, None, "late answer"]

    async def program(question: str) -> str | None:
        return results.pop(0)

    events: list[Event] = []
    retry = Retry(5, base_delay=1.0, jitter="none", retry_on_result=lambda r: r is None)
    outcome = await Pipeline(program, retry, listeners=[events.append]).invoke(question="q")
    assert (outcome.value, outcome.attempts, outcome.retries) == ("late answer", 3, 2)
    assert [(event.reason, event.error) for event in scheduled(events)] == [("result rejected", None)] * 2


async def test_retry_on_result_returns_the_last_result_when_attempts_run_out() -> None:
    """When every result is rejected, the last result is returned (no exception) after max_attempts."""
    produced: list[dict[str, int]] = []

    async def program(question: str) -> dict[str, int]:
        value = {"n": len(produced)}
        produced.append(value)
        return value

    events: list[Event] = []
    retry = Retry(4, base_delay=1.0, jitter="none", retry_on_result=lambda r: True)
    outcome = await Pipeline(program, retry, listeners=[events.append]).invoke(question="q")
    assert outcome.value is produced[-1]
    assert outcome.value == {"n": 3}
    assert outcome.attempts == 4
    assert [(e.attempts, e.reason, e.error) for e in gave_up(events)] == [(4, "max_attempts", None)]


async def test_a_rejected_result_is_retried_then_returned_with_exact_events() -> None:
    events: list[Event] = []

    async def program(question: str) -> str:
        return "same"

    retry = Retry(2, base_delay=0, jitter="none", retry_on_result=lambda result: result == "same")
    assert await Pipeline(program, retry, name="p", listeners=[events.append])("q") == "same"
    assert events == [
        RetryScheduled(
            pipeline="p", layer="Retry", time=0.0, attempt=1, delay=0.0, reason="result rejected", error=None
        ),
        RetryGaveUp(pipeline="p", layer="Retry", time=0.0, attempts=2, reason="max_attempts", error=None),
    ]


# ----------------------------------------------------------------------------------- 9. per-call attempt state


async def test_concurrent_calls_do_not_share_attempt_state() -> None:
    """Two concurrent calls, failing 1 and 3 times, each count their own attempts and own backoff."""
    failures = {"one": 1, "three": 3}
    calls = {"one": 0, "three": 0}

    async def program(question: str) -> str:
        calls[question] += 1
        if calls[question] <= failures[question]:
            raise server_error()
        return question

    pipeline = Pipeline(program, Retry(5, base_delay=1.0, jitter="none"))
    one, three = await asyncio.gather(pipeline.invoke(question="one"), pipeline.invoke(question="three"))

    assert (one.value, one.attempts, one.retries) == ("one", 2, 1)
    assert (three.value, three.attempts, three.retries) == ("three", 4, 3)
    assert one.duration == pytest.approx(1.0)
    assert three.duration == pytest.approx(1.0 + 2.0 + 4.0)
    assert calls == {"one": 2, "three": 4}


# ------------------------------------------------------------------------------ an opened circuit below


class OpensFor:
    """A layer below Retry that, like a CircuitBreaker tripping, marks the call blocked for ``seconds`` after a
    failure (``call.record.blocked_until``, the record's contract with Retry)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def __call__(self, call: Any, next: Any) -> Any:
        try:
            return await next(call)
        except Exception:
            call.record.blocked_until = call.clock.now() + self.seconds
            raise


async def test_retry_waits_for_a_circuit_below_to_let_the_next_attempt_through() -> None:
    events: list[Event] = []
    pipeline = Pipeline(
        Flaky(server_error()), Retry(3, base_delay=0, jitter="none"), OpensFor(5.0), listeners=[events.append]
    )
    await asyncio.sleep(10)
    assert await pipeline("q") == "ok"
    assert delays(events) == [5.0] and now() == 15.0


async def test_retry_gives_up_at_once_when_the_circuit_stays_open_past_max_retry_after() -> None:
    program = AlwaysFailing()
    pipeline = Pipeline(program, Retry(3, base_delay=0, max_retry_after=60), OpensFor(60.5))
    with pytest.raises(RetriesExhaustedError) as caught:
        await pipeline("q")
    assert (caught.value.reason, caught.value.attempts, program.calls, now()) == ("circuit_open", 1, 1, 0.0)


async def test_a_circuit_open_exactly_max_retry_after_is_waited_for() -> None:
    pipeline = Pipeline(Flaky(server_error()), Retry(2, base_delay=0, jitter="none", max_retry_after=60), OpensFor(60))
    assert await pipeline("q") == "ok"
    assert now() == 60.0


async def test_a_circuit_open_past_the_deadline_gives_up_for_the_deadline() -> None:
    pipeline = Pipeline(AlwaysFailing(), Timeout(3), Retry(3, base_delay=0), OpensFor(5.0))
    with pytest.raises(RetriesExhaustedError) as caught:
        await pipeline("q")
    assert (caught.value.reason, caught.value.attempts) == ("deadline", 1)


async def test_a_backoff_longer_than_max_retry_after_is_not_a_circuit_open() -> None:
    """max_retry_after caps a server's (or a circuit's) wait, not the backoff: with no circuit below, retry."""
    pipeline = Pipeline(Flaky(server_error()), Retry(2, base_delay=1, jitter="none", max_retry_after=0.5))
    assert await pipeline("q") == "ok"
    assert now() == 1.0


# ------------------------------------------------------------------------------------------------ 10. budget


async def test_retry_budget_stops_a_retry_storm() -> None:
    """200 concurrent always-failing calls: retries stay within ratio*calls + min_per_second*window."""
    program = AlwaysFailing()
    budget = RetryBudget(ratio=0.1, min_per_second=1, window=10)
    pipeline = Pipeline(program, Retry(5, base_delay=0.01, budget=budget), rng=random.Random(1))

    results = await asyncio.gather(*(pipeline(question=str(i)) for i in range(200)), return_exceptions=True)

    assert all(isinstance(result, RetriesExhaustedError) for result in results)
    exhausted = [result for result in results if isinstance(result, RetriesExhaustedError)]
    retries = program.calls - 200
    assert retries <= 0.1 * 200 + 10
    assert retries == 30  # the whole budget is spent, and not one retry more
    assert [error.reason for error in exhausted] == ["budget"] * 200
    assert sum(error.attempts for error in exhausted) == program.calls


async def test_without_budget_every_call_retries_fully() -> None:
    """budget=None: 200 always-failing calls make exactly 200*4 retries."""
    program = AlwaysFailing()
    pipeline = Pipeline(program, Retry(5, base_delay=0.01, budget=None), rng=random.Random(1))

    results = await asyncio.gather(*(pipeline(question=str(i)) for i in range(200)), return_exceptions=True)

    assert program.calls - 200 == 200 * 4
    assert {(type(r), r.reason) for r in results if isinstance(r, RetriesExhaustedError)} == {
        (RetriesExhaustedError, "max_attempts")
    }
    assert len(results) == 200


async def test_budget_refills_as_the_window_slides() -> None:
    """A spent budget (min 1/s over 2s = 2 retries) allows retries again once the window has passed."""
    program = AlwaysFailing()
    budget = RetryBudget(ratio=0.0, min_per_second=1, window=2)
    pipeline = Pipeline(program, Retry(10, base_delay=0.1, jitter="none", budget=budget))

    with pytest.raises(RetriesExhaustedError) as first:
        await pipeline(question="a")
    assert (first.value.reason, first.value.attempts) == ("budget", 3)

    await asyncio.sleep(5)
    with pytest.raises(RetriesExhaustedError) as later:
        await pipeline(question="b")
    assert (later.value.reason, later.value.attempts) == ("budget", 3)
    assert program.calls == 6


# ------------------------------------------------------------------------------ 11. AdapterParseError + cache


async def test_parse_error_is_retried_with_the_cache_bypassed() -> None:
    """Malformed answers are cached by DSPy; Retry re-asks uncached, so the 3rd request is fresh and ok."""
    lm = FaultInjectingLM(script=["malformed", "malformed"], cache=True)
    events: list[Event] = []
    pipeline = Pipeline(
        dspy.Predict("question -> answer"), Retry(3, base_delay=0.1, jitter="none"), listeners=[events.append]
    )
    with dspy.context(lm=lm):
        outcome = await pipeline.invoke(question=f"parse {uuid.uuid4()}")

    assert outcome.attempts == 2
    assert isinstance(outcome.value, dspy.Prediction)
    assert outcome.value.answer.startswith("A local answer")
    assert lm.requests == 3
    assert [entry.fault.value for entry in lm.journal] == ["malformed", "malformed", "ok"]
    [event] = scheduled(events)
    assert isinstance(event.error, dspy.AdapterParseError)


async def test_parse_error_is_retried_with_the_cache_bypassed_for_a_predictor_lm() -> None:
    """Same, with the LM set on the predictor (not in settings): the retry still reaches the LM."""
    lm = FaultInjectingLM(script=["malformed", "malformed"], cache=True)
    predict = dspy.Predict("question -> answer")
    predict.lm = lm
    outcome = await Pipeline(predict, Retry(3, base_delay=0.1, jitter="none")).invoke(question=f"parse {uuid.uuid4()}")
    assert outcome.attempts == 2
    assert lm.requests == 3


async def test_without_a_bypass_dspy_replays_the_cached_malformed_answer() -> None:
    """The DSPy fact behind the bypass: a plain second call replays the cache, 0 requests, same error."""
    lm = FaultInjectingLM(script=["malformed", "malformed"], cache=True)
    predict = dspy.Predict("question -> answer")
    question = f"replay {uuid.uuid4()}"
    with dspy.context(lm=lm):
        with pytest.raises(dspy.AdapterParseError):
            await predict.acall(question=question)
        assert lm.requests == 2  # ChatAdapter, then its JSON fallback
        with pytest.raises(dspy.AdapterParseError):
            await predict.acall(question=question)
    assert lm.requests == 2  # the second call made no new request


async def test_parse_errors_exhaust_attempts_when_the_lm_keeps_failing() -> None:
    """Malformed on every request: 3 attempts x 2 requests (chat + JSON fallback), then RetriesExhausted."""
    lm = FaultInjectingLM(script=["malformed"] * 6, cache=True)
    pipeline = Pipeline(dspy.Predict("question -> answer"), Retry(3, base_delay=0.1, jitter="none"))
    with dspy.context(lm=lm), pytest.raises(RetriesExhaustedError) as caught:
        await pipeline(question=f"always malformed {uuid.uuid4()}")
    assert isinstance(caught.value.last_error, dspy.AdapterParseError)
    assert lm.requests == 6


# ------------------------------------------------------------------------------------- 12. DSPy num_retries


async def test_predictor_lm_with_num_retries_warns_when_built_under_retry() -> None:
    """A predictor LM with num_retries=3 under Retry warns at build time, naming the count."""
    predict = dspy.Predict("q -> a")
    predict.lm = FaultInjectingLM(num_retries=3)
    with pytest.warns(ResilienceWarning, match="num_retries=3"):
        Pipeline(predict, Retry())


async def test_predictor_lm_without_num_retries_does_not_warn() -> None:
    """num_retries=0 (and a pipeline without Retry at all) builds silently."""
    quiet = dspy.Predict("q -> a")
    quiet.lm = FaultInjectingLM(num_retries=0)
    loud = dspy.Predict("q -> a")
    loud.lm = FaultInjectingLM(num_retries=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Pipeline(quiet, Retry())
        Pipeline(loud, Timeout(5))


async def test_settings_lm_with_num_retries_warns_once_at_first_call() -> None:
    """The LM from dspy.context is checked at the first call (once per LM), not at build time."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResilienceWarning)
        pipeline = Pipeline(dspy.Predict("question -> answer"), Retry(base_delay=0.1, jitter="none"))
    with dspy.context(lm=FaultInjectingLM(num_retries=2)):
        with pytest.warns(ResilienceWarning, match="num_retries=2"):
            await pipeline(question=f"first {uuid.uuid4()}")
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResilienceWarning)
            await pipeline(question=f"second {uuid.uuid4()}")


# ------------------------------------------------------------------------------------------- 13. bad options


def test_bad_options_list_every_problem() -> None:
    """Three bad settings are reported together, each named Retry.<field>."""
    with pytest.raises(ConfigurationError) as caught:
        Retry(max_attempts=0, jitter="wobbly", base_delay=-1)  # type: ignore[arg-type]
    fields = sorted(field for field, _ in caught.value.problems)
    assert fields == ["Retry.base_delay", "Retry.jitter", "Retry.max_attempts"]
    message = str(caught.value)
    assert message.startswith("3 invalid settings:")
    for field in fields:
        assert field in message


def test_good_options_are_described() -> None:
    """describe() reports the validated options, a single retry_on type normalised to a tuple."""
    described = Retry(4, backoff="linear", base_delay=0.2, jitter="equal", retry_on=KeyError).describe()
    assert described["layer"] == "Retry"
    options = described["options"]
    assert (options["max_attempts"], options["backoff"], options["base_delay"], options["jitter"]) == (
        4,
        "linear",
        0.2,
        "equal",
    )
    assert options["retry_on"] == (KeyError,)


def test_the_defaults_are_described_exactly() -> None:
    assert Retry().describe() == {
        "layer": "Retry",
        "name": "Retry",
        "options": {
            "max_attempts": 3,
            "backoff": "exponential",
            "base_delay": 0.5,
            "max_delay": 30.0,
            "jitter": "full",
            "retry_on": None,
            "retry_on_result": None,
            "respect_retry_after": True,
            "max_retry_after": 60.0,
            "budget": {"ratio": 0.2, "min_per_second": 1.0, "window": 10.0},
            "store": None,
            "on_store_failure": "local",
            "resample": True,
            "temperature_step": 0.7,
            "max_temperature": 1.0,
            "switch_adapter": False,
            "max_tokens_factor": 2.0,
            "max_tokens_cap": 4096,
            "name": None,
        },
    }


@pytest.mark.parametrize("retry_on", [KeyError, [KeyError], (KeyError,)])
def test_retry_on_types_are_options_as_a_tuple_however_given(retry_on: Any) -> None:
    """A single class is callable, so it must not pass as a predicate: the options hold it as a tuple."""
    assert RetryOptions(retry_on=retry_on).retry_on == (KeyError,)
    assert Retry(retry_on=retry_on).options.retry_on == (KeyError,)


# ------------------------------------------------------------------------------- property: fault schedules

Kind = str
RETRYABLE = {"rate_limit": True, "server": True, "timeout": True, "auth": False, "bug": False}


def make_error(kind: Kind) -> Exception:
    return {
        "rate_limit": lambda: dspy.LMRateLimitError("429", retry_after=0.5),
        "server": lambda: dspy.LMServerError("503", status=503),
        "timeout": lambda: dspy.LMTimeoutError("slow"),
        "auth": lambda: dspy.LMAuthError("401", status=401),
        "bug": lambda: ValueError("bug"),
    }[kind]()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    schedule=st.lists(st.sampled_from([*RETRYABLE, "ok"]), max_size=8),
    max_attempts=st.integers(min_value=1, max_value=6),
    seed=st.integers(min_value=0, max_value=1000),
)
async def test_attempts_follow_the_fault_schedule(schedule: list[Kind], max_attempts: int, seed: int) -> None:
    """For any schedule: calls stop at the first ok, the first non-retryable error, or max_attempts."""
    script = list(schedule)
    calls = 0

    async def program(question: str) -> str:
        nonlocal calls
        calls += 1
        kind = script.pop(0) if script else "ok"
        if kind == "ok":
            return "ok"
        raise make_error(kind)

    expected_calls = 0
    expected: str = "ok"
    for index in range(max_attempts):
        kind = schedule[index] if index < len(schedule) else "ok"
        expected_calls += 1
        if kind == "ok":
            expected = "ok"
            break
        if not RETRYABLE[kind]:
            expected = kind
            break
        expected = "exhausted"

    pipeline = Pipeline(program, Retry(max_attempts, base_delay=0.1, budget=None), rng=random.Random(seed))
    try:
        result: str = await pipeline(question="q")
    except RetriesExhaustedError as error:
        assert error.attempts == max_attempts
        result = "exhausted"
    except (dspy.LMAuthError, ValueError) as error:
        result = "auth" if isinstance(error, dspy.LMAuthError) else "bug"
    assert result == expected
    assert calls == expected_calls


async def test_a_call_that_started_long_ago_does_not_wipe_the_current_budget_bucket() -> None:
    """Regression: the call was recorded at its start time, which can map onto the current bucket's ring slot
    (e.g. after a long wait in a bulkhead queue) and reset the retries spent there."""
    budget = RetryBudget(ratio=0.0, min_per_second=0.1, window=10.0)  # one retry per 10 s window
    pipeline = Pipeline(AlwaysFailing(), Retry(3, base_delay=0, jitter="none", budget=budget))
    with pytest.raises(RetriesExhaustedError) as first:
        await pipeline("q")
    assert first.value.reason == "budget" and first.value.attempts == 2  # the one retry was spent
    loop = asyncio.get_running_loop()
    late = pipeline.new_call({"question": "q"})
    late.record.started_at = loop.time() - 10.0  # same ring slot as now, 10 buckets ago
    with pytest.raises(RetriesExhaustedError) as second:
        await pipeline.run(late)
    assert second.value.reason == "budget" and second.value.attempts == 1
