"""Retry: exact-value tests written from mutmut survivors (see docs/mutation-testing.md).

Exact event fields, defaults, jitter arguments, the budget's first window, the ``>=`` deadline boundary, and the
attempt number passed down. Async tests run on looptime's virtual clock, which starts at 0.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import dspy
import pytest

from resilient_dspy import Pipeline, RetriesExhaustedError, Retry
from resilient_dspy.events import Event, RetryGaveUp, RetryScheduled
from resilient_dspy.middleware.retry import RetryBudget, RetryOptions, _BudgetWindow, compute_delay


class Failing:
    """Fails with a transient server error ``failures`` times, then answers; counts calls."""

    def __init__(self, failures: int = 10**9) -> None:
        self.failures = failures
        self.calls = 0
        self.errors: list[Exception] = []

    async def __call__(self, question: str) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            error = dspy.LMServerError("injected 503", status=503)
            self.errors.append(error)
            raise error
        return "answer"


class Attempts:
    """A layer below Retry recording the attempt number of each call it sees."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    async def __call__(self, call: Any, next: Any) -> Any:
        self.seen.append(call.attempt)
        return await next(call)


class Recorder:
    """A ``uniform`` that records its arguments and returns the upper bound."""

    def __init__(self) -> None:
        self.args: list[tuple[float, float]] = []

    def __call__(self, low: float, high: float) -> float:
        self.args.append((low, high))
        return high


def test_defaults_exactly() -> None:
    assert Retry().describe() == {
        "layer": "Retry",
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
        },
    }


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


async def test_gave_up_after_max_attempts_with_exact_events() -> None:
    events: list[Event] = []
    program = Failing()
    attempts = Attempts()
    retry = Retry(3, backoff="constant", base_delay=2, jitter="none")
    pipeline = Pipeline(program, retry, attempts, name="p", listeners=[events.append])
    await asyncio.sleep(1)
    with pytest.raises(RetriesExhaustedError) as caught:
        await pipeline("q")
    assert (caught.value.attempts, caught.value.reason) == (3, "max_attempts")
    assert program.calls == 3 and attempts.seen == [1, 2, 3]
    first, second, third = program.errors
    assert events == [
        RetryScheduled(
            pipeline="p", layer="Retry", time=1.0, attempt=1, delay=2.0, reason="LMServerError", error=first
        ),
        RetryScheduled(
            pipeline="p", layer="Retry", time=3.0, attempt=2, delay=2.0, reason="LMServerError", error=second
        ),
        RetryGaveUp(pipeline="p", layer="Retry", time=5.0, attempts=3, reason="max_attempts", error=third),
    ]


async def test_a_single_attempt_gives_up_at_once() -> None:
    program = Failing()
    with pytest.raises(RetriesExhaustedError) as caught:
        await Pipeline(program, Retry(1))("q")
    assert (caught.value.attempts, caught.value.reason, program.calls) == (1, "max_attempts", 1)


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


async def test_constant_backoff_with_jitter_is_still_jittered() -> None:
    events: list[Event] = []
    program = Failing(1)
    retry = Retry(2, backoff="constant", base_delay=1, jitter="full")
    pipeline = Pipeline(program, retry, rng=random.Random(7), listeners=[events.append])
    assert await pipeline("q") == "answer"
    expected = random.Random(7).uniform(0.0, 1.0)
    assert [e.delay for e in events if isinstance(e, RetryScheduled)] == [expected]


async def test_decorrelated_jitter_feeds_each_delay_into_the_next() -> None:
    events: list[Event] = []
    program = Failing(3)
    retry = Retry(4, base_delay=1, max_delay=100, jitter="decorrelated", budget=None)
    pipeline = Pipeline(program, retry, rng=random.Random(3), listeners=[events.append])
    assert await pipeline("q") == "answer"
    rng = random.Random(3)
    expected, previous = [], 1.0
    for _ in range(3):
        previous = rng.uniform(1.0, max(1.0, previous * 3))
        expected.append(previous)
    assert [e.delay for e in events if isinstance(e, RetryScheduled)] == expected


async def test_a_delay_exactly_reaching_the_deadline_gives_up() -> None:
    program = Failing()
    pipeline = Pipeline(program, Retry(3, backoff="constant", base_delay=1, jitter="none"))
    call = pipeline.new_call({"question": "q"}, deadline=1.0)
    with pytest.raises(RetriesExhaustedError) as caught:
        await pipeline.run(call)
    assert (caught.value.attempts, caught.value.reason, program.calls) == (1, "deadline", 1)


async def test_the_budget_counts_only_real_calls_in_its_first_window() -> None:
    program = Failing()
    budget = RetryBudget(ratio=0.5, min_per_second=0.0, window=10.0)
    pipeline = Pipeline(program, Retry(5, base_delay=0, jitter="none", budget=budget))
    with pytest.raises(RetriesExhaustedError) as caught:
        await pipeline("q")  # 1 call: a first retry would need 1 <= 0.5 * 1
    assert (caught.value.attempts, caught.value.reason, program.calls) == (1, "budget", 1)
    with pytest.raises(RetriesExhaustedError) as caught:
        await pipeline("q")  # 2 calls: 1 <= 0.5 * 2 allows one retry, the second would need 2 <= 1
    assert (caught.value.attempts, caught.value.reason, program.calls) == (2, "budget", 3)


def test_budget_window_counts_a_call_while_its_slot_is_wholly_in_the_window() -> None:
    budget = RetryBudget(ratio=0.5, min_per_second=0.0, window=10.0)  # 100 slots of 0.1 s
    kept = _BudgetWindow(budget)
    kept.record_call(0.95)  # slot [0.9, 1.0)
    kept.record_call(10.85)
    assert kept.try_spend(10.85) is True  # (0.85, 10.85] holds the whole slot: 1 retry <= 0.5 * 2 calls
    dropped = _BudgetWindow(budget)
    dropped.call_ended(dropped.record_call(0.95))
    dropped.record_call(10.9)
    assert dropped.try_spend(10.9) is False  # the slot is not wholly inside (0.9, 10.9]: 1 retry > 0.5 * 1 call
    lingering = _BudgetWindow(budget)
    lingering.record_call(0.95)  # still in flight at 10.9: it keeps counting after its slot has left
    lingering.record_call(10.9)
    assert lingering.try_spend(10.9) is True


def test_budget_window_forgets_a_retry_exactly_one_window_later() -> None:
    window = _BudgetWindow(RetryBudget(ratio=0.0, min_per_second=0.1, window=10.0))  # one retry per window
    assert window.try_spend(0.5) is True
    assert window.try_spend(10.499) is False  # (0.499, 10.499] still holds the retry at 0.5
    assert window.try_spend(10.5) is True  # (0.5, 10.5] does not
