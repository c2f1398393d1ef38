"""The retry budget is a true sliding bound: at every retry, the retries of the last ``window`` seconds stay within
``ratio`` * the calls of those seconds + ``min_per_second`` * ``window``. Virtual time (looptime) throughout."""

from __future__ import annotations

import asyncio
import math

from hypothesis import example, given, settings
from hypothesis import strategies as st

from resilient_dspy import Pipeline, RetriesExhaustedError, Retry, RetryBudget
from resilient_dspy.events import Event, RetryScheduled
from tests.conftest import run_virtual

EPSILON = 1e-9


class AlwaysFailing:
    """A program whose every attempt fails with a retryable 503-like error, after ``latency`` seconds."""

    def __init__(self, latency: float = 0.0) -> None:
        self.latency = latency

    async def __call__(self, question: str) -> str:
        if self.latency:
            await asyncio.sleep(self.latency)
        raise ConnectionError("dropped")


def over_budget(
    calls: list[float], retries: list[float], budget: RetryBudget, ends: list[float] | None = None
) -> list[str]:
    """Every retry at t whose window (t - window, t] holds more retries than the budget allows there: calls that
    started in the window, and (given their ``ends``) earlier calls still in flight at t, count."""
    found = []
    for at in retries:
        opened = at - budget.window
        recent = sum(1 for t in retries if opened < t <= at + EPSILON)
        seen = sum(1 for t in calls if opened < t <= at + EPSILON)
        if ends is not None:
            seen += sum(1 for t, end in zip(calls, ends, strict=True) if t <= opened and end >= at - EPSILON)
        allowed = budget.ratio * seen + budget.min_per_second * budget.window
        if recent > allowed + EPSILON:
            found.append(f"{recent} retries in ({opened:g}, {at:g}] > {allowed:g} ({seen} calls)")
    return found


async def test_retries_spent_late_in_one_window_still_count_early_in_the_next() -> None:
    """min 1/s over 10 s = 10 retries per 10 s: 10 spent at t=0.95 leave none at t=10.05 (only 9.1 s later)."""
    budget = RetryBudget(ratio=0.0, min_per_second=1.0, window=10.0)
    events: list[Event] = []
    pipeline = Pipeline(
        AlwaysFailing(), Retry(2, base_delay=0, jitter="none", budget=budget), listeners=[events.append]
    )
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def wave(at: float) -> list[BaseException | str]:
        await asyncio.sleep(start + at - loop.time())
        return await asyncio.gather(*(pipeline(str(i)) for i in range(10)), return_exceptions=True)

    first = await wave(0.95)
    second = await wave(10.05)
    assert [error.reason for error in first if isinstance(error, RetriesExhaustedError)] == ["max_attempts"] * 10
    assert [error.reason for error in second if isinstance(error, RetriesExhaustedError)] == ["budget"] * 10
    assert len([event for event in events if isinstance(event, RetryScheduled)]) == 10
    third = await wave(10.96)  # now the first wave's retries are more than 10 s old
    assert [error.reason for error in third if isinstance(error, RetriesExhaustedError)] == ["max_attempts"] * 10


@settings(max_examples=80, deadline=None)
@example(  # the case: 10 retries late in one 1 s bucket, 10 more early in the bucket a window later
    ratio=0.0,
    min_per_second=1.0,
    window=10.0,
    max_attempts=2,
    base_delay=0.0,
    latency=0.0,
    gaps=[0.95] + [0.0] * 9 + [9.1] + [0.0] * 9,
)
@given(
    ratio=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    min_per_second=st.sampled_from([0.0, 0.3, 1.0, 2.0]),
    window=st.sampled_from([0.5, 1.0, 3.0, 10.0]),
    max_attempts=st.integers(2, 5),
    base_delay=st.sampled_from([0.0, 0.05, 0.4, 1.3]),
    latency=st.sampled_from([0.0, 0.1, 0.7]),
    gaps=st.lists(st.sampled_from([0.0, 0.0, 0.0, 0.05, 0.3, 0.95, 2.5, 9.1]), min_size=1, max_size=40),
)
def test_every_window_keeps_retries_within_the_budget(
    ratio: float,
    min_per_second: float,
    window: float,
    max_attempts: int,
    base_delay: float,
    latency: float,
    gaps: list[float],
) -> None:
    """Any arrivals, delays and latencies: at every retry, retries in the last window <= ratio * calls there +
    min_per_second * window."""
    budget = RetryBudget(ratio=ratio, min_per_second=min_per_second, window=window)
    calls: list[float] = []
    retries: list[float] = []

    def listen(event: Event) -> None:
        if isinstance(event, RetryScheduled):
            retries.append(event.time)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pipeline = Pipeline(
            AlwaysFailing(latency),
            Retry(max_attempts, base_delay=base_delay, jitter="none", budget=budget),
            listeners=[listen],
        )
        tasks = []
        for index, gap in enumerate(gaps):
            await asyncio.sleep(gap)
            calls.append(loop.time())
            ends.append(math.inf)
            task = asyncio.create_task(pipeline(str(index)))
            task.add_done_callback(lambda _, i=index: ends.__setitem__(i, loop.time()))
            tasks.append(task)
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(outcome, RetriesExhaustedError) for outcome in outcomes)

    ends: list[float] = []
    run_virtual(scenario)
    assert over_budget(calls, retries, budget, ends) == []
