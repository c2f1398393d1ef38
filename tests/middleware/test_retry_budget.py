"""The retry budget is a true sliding bound: at every retry, the retries of the last ``window`` seconds stay within
``ratio`` * the calls of those seconds + ``min_per_second`` * ``window``. Virtual time (looptime) throughout."""

from __future__ import annotations

import asyncio
import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from resilient_dspy import Pipeline, RetriesExhaustedError, Retry, RetryBudget
from resilient_dspy.events import Event, RetryScheduled
from resilient_dspy.middleware.retry import RetrySnapshot
from resilient_dspy.testing.plugin import ManualClock
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


# --- the window's edges, exactly, on a clock moved by hand -----------------------------------------------


class Held:
    """A program: "hold" waits until ``release`` is set (a call in flight), "ok" answers, anything else fails
    with a retryable error."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def __call__(self, question: str) -> str:
        if question == "hold":
            await self.release.wait()
        elif question != "ok":
            raise ConnectionError("dropped")
        return question


async def reason_of(pipeline: Pipeline, question: str = "fail") -> tuple[str, int]:
    try:
        await pipeline(question)
    except RetriesExhaustedError as error:
        return error.reason, error.attempts
    raise AssertionError("the call did not give up")


def on_hand_clock(budget: RetryBudget, at: float) -> tuple[Pipeline, Retry, ManualClock, Held]:
    clock = ManualClock(at)
    program = Held()
    retry = Retry(2, base_delay=0, jitter="none", budget=budget)
    return Pipeline(program, retry, clock=clock), retry, clock, program


async def test_the_budget_counts_only_real_calls_in_its_first_window() -> None:
    budget = RetryBudget(ratio=0.5, min_per_second=0.0, window=10.0)
    pipeline = Pipeline(AlwaysFailing(), Retry(5, base_delay=0, jitter="none", budget=budget))
    with pytest.raises(RetriesExhaustedError) as caught:
        await pipeline("q")  # 1 call: a first retry would need 1 <= 0.5 * 1
    assert (caught.value.attempts, caught.value.reason) == (1, "budget")
    with pytest.raises(RetriesExhaustedError) as caught:
        await pipeline("q")  # 2 calls: 1 <= 0.5 * 2 allows one retry, the second would need 2 <= 1
    assert (caught.value.attempts, caught.value.reason) == (2, "budget")


async def test_a_call_counts_while_its_slot_lies_wholly_in_the_window() -> None:
    """Calls are counted in slots of window/100 (0.1 s here): the call at 0.95 is in slot [0.9, 1.0), wholly inside
    (0.85, 10.85], so one retry at 10.85 is within 0.5 * 2 calls."""
    pipeline, retry, clock, _ = on_hand_clock(RetryBudget(ratio=0.5, min_per_second=0.0, window=10.0), 0.95)
    assert await pipeline("ok") == "ok"
    clock.time = 10.85
    assert retry.snapshot() == RetrySnapshot(time=10.85, window=10.0, calls=1, retries=0, allowed=0.5)
    assert await reason_of(pipeline) == ("max_attempts", 2)  # the retry was made, its attempt failed too


async def test_an_ended_call_stops_counting_once_its_slot_leaves_the_window() -> None:
    pipeline, retry, clock, _ = on_hand_clock(RetryBudget(ratio=0.5, min_per_second=0.0, window=10.0), 0.95)
    assert await pipeline("ok") == "ok"
    clock.time = 10.9  # (0.9, 10.9] no longer holds the whole slot [0.9, 1.0)
    assert retry.snapshot().calls == 0  # type: ignore[union-attr]
    assert await reason_of(pipeline) == ("budget", 1)  # 1 retry > 0.5 * 1 call


async def test_a_call_still_in_flight_keeps_counting_after_its_slot_has_left() -> None:
    pipeline, retry, clock, program = on_hand_clock(RetryBudget(ratio=0.5, min_per_second=0.0, window=10.0), 0.95)
    held = asyncio.create_task(pipeline("hold"))
    await asyncio.sleep(0)
    clock.time = 10.9
    assert retry.snapshot().calls == 1  # type: ignore[union-attr]
    assert await reason_of(pipeline) == ("max_attempts", 2)
    program.release.set()
    assert await held == "hold"
    assert retry.snapshot().calls == 1  # type: ignore[union-attr]  # the failing call's own slot is inside


async def test_a_retry_is_forgotten_exactly_one_window_after_it_was_spent() -> None:
    """One retry per 10 s window: the retry spent at 0.5 still counts in (0.499, 10.499], not in (0.5, 10.5]."""
    pipeline, retry, clock, _ = on_hand_clock(RetryBudget(ratio=0.0, min_per_second=0.1, window=10.0), 0.5)
    assert await reason_of(pipeline) == ("max_attempts", 2)
    clock.time = 10.499
    snapshot = retry.snapshot()
    assert snapshot is not None and (snapshot.retries, snapshot.allowed, snapshot.exhausted) == (1, 1.0, True)
    assert await reason_of(pipeline) == ("budget", 1)
    clock.time = 10.5
    assert retry.snapshot().retries == 0  # type: ignore[union-attr]
    assert await reason_of(pipeline) == ("max_attempts", 2)


# --- snapshot() and health() ------------------------------------------------------------------------------


async def test_the_snapshot_shows_the_calls_and_retries_of_the_window() -> None:
    retry = Retry(3, base_delay=0, jitter="none", budget=RetryBudget(ratio=0.5, min_per_second=0.2, window=10.0))
    pipeline = Pipeline(AlwaysFailing(), retry)
    assert retry.snapshot() == RetrySnapshot(time=0.0, window=10.0, calls=0, retries=0, allowed=2.0)
    await asyncio.sleep(1)
    results = await asyncio.gather(*(pipeline(str(i)) for i in range(2)), return_exceptions=True)
    assert all(isinstance(result, RetriesExhaustedError) for result in results)
    assert retry.snapshot() == RetrySnapshot(time=1.0, window=10.0, calls=2, retries=3, allowed=3.0)
    await asyncio.sleep(10)
    assert retry.snapshot() == RetrySnapshot(time=11.0, window=10.0, calls=0, retries=0, allowed=2.0)


def test_a_retry_without_a_budget_has_no_state() -> None:
    retry = Retry(budget=None)
    assert retry.snapshot() is None and retry.health() is None


def test_an_unbuilt_retry_snapshots_its_empty_budget() -> None:
    assert Retry().snapshot() == RetrySnapshot(time=0.0, window=10.0, calls=0, retries=0, allowed=10.0)


async def test_health_is_degraded_while_the_budget_is_spent_and_silent_otherwise() -> None:
    retry = Retry(5, base_delay=0, jitter="none", budget=RetryBudget(ratio=0.0, min_per_second=0.2, window=10.0))
    pipeline = Pipeline(AlwaysFailing(), retry, name="qa")
    assert retry.health() is None and [layer.layer for layer in pipeline.health().layers] == []
    with pytest.raises(RetriesExhaustedError):
        await pipeline("q")
    health = pipeline.health()
    assert (health.status, health.ready) == ("degraded", True)
    (report,) = health.layers
    assert (report.layer, report.status) == ("Retry", "degraded")
    assert report.details == {"budget_calls": 1, "budget_retries": 2, "allowed": 2.0}
    await asyncio.sleep(10)
    assert retry.health() is None


def test_a_snapshot_taken_outside_the_loop_is_as_of_the_latest_call() -> None:
    """The loop clock cannot be read outside a running loop: the snapshot is then taken at the latest time the
    budget saw (here the slot of the call at 8, later than the retry at 5; slots of 0.5 s)."""
    retry = Retry(2, base_delay=0, jitter="none", budget=RetryBudget(ratio=0.0, min_per_second=1.0, window=50.0))
    pipeline = Pipeline(Held(), retry)

    async def scenario() -> None:
        await asyncio.sleep(2)
        assert await pipeline("ok") == "ok"
        await asyncio.sleep(3)
        with pytest.raises(RetriesExhaustedError):
            await pipeline("fail")
        await asyncio.sleep(3)
        assert await pipeline("ok") == "ok"

    run_virtual(scenario)
    assert retry.snapshot() == RetrySnapshot(time=8.0, window=50.0, calls=3, retries=1, allowed=50.0)


def test_a_budget_with_no_room_yet_but_no_retry_spent_is_not_reported() -> None:
    retry = Retry(budget=RetryBudget(ratio=0.5, min_per_second=0.0))
    assert retry.snapshot().exhausted and retry.health() is None  # type: ignore[union-attr]


async def test_a_slot_starting_exactly_one_window_ago_no_longer_counts() -> None:
    """Slots of 1 s (window 100): the call at 3 is in slot [3, 4), which (3, 103] does not hold whole."""
    pipeline, retry, clock, _ = on_hand_clock(RetryBudget(ratio=0.5, min_per_second=0.0, window=100.0), 3.0)
    assert await pipeline("ok") == "ok"
    clock.time = 102.0
    assert retry.snapshot().calls == 1  # type: ignore[union-attr]
    clock.time = 103.0
    assert retry.snapshot().calls == 0  # type: ignore[union-attr]
    assert await reason_of(pipeline) == ("budget", 1)


async def test_calls_in_consecutive_slots_are_counted_apart() -> None:
    """The calls at 0 and 1 fill two slots: at 100.5 the first has left the window, the second still counts."""
    pipeline, retry, clock, _ = on_hand_clock(RetryBudget(ratio=0.5, min_per_second=0.0, window=100.0), 0.0)
    assert await pipeline("ok") == "ok"
    clock.time = 1.0
    assert await pipeline("ok") == "ok"
    clock.time = 100.5
    assert retry.snapshot().calls == 1  # type: ignore[union-attr]


async def test_every_call_still_in_flight_from_slots_that_left_together_keeps_counting() -> None:
    pipeline, retry, clock, program = on_hand_clock(RetryBudget(ratio=0.34, min_per_second=0.0, window=100.0), 1.0)
    held = [asyncio.create_task(pipeline("hold"))]
    await asyncio.sleep(0)
    clock.time = 2.0
    held.append(asyncio.create_task(pipeline("hold")))
    await asyncio.sleep(0)
    clock.time = 103.0
    assert await reason_of(pipeline) == ("max_attempts", 2)  # 1 retry <= 0.34 * 3 calls: both held ones count
    assert retry.snapshot().calls == 3  # type: ignore[union-attr]
    program.release.set()
    assert await asyncio.gather(*held) == ["hold", "hold"]
    assert retry.snapshot().calls == 1  # type: ignore[union-attr]


async def test_one_failure_shared_by_several_attempts_is_paid_for_once() -> None:
    """A single-flight cache hands its followers the leader's error object itself: retrying that one failure again
    spends nothing, while a fresh failure needs room (one retry per window here)."""
    shared = ConnectionError("dropped")

    async def program(question: str) -> str:
        raise shared if question == "shared" else ConnectionError("dropped")

    retry = Retry(3, base_delay=0, jitter="none", budget=RetryBudget(ratio=0.0, min_per_second=0.1, window=10.0))
    pipeline = Pipeline(program, retry)
    for _ in range(2):
        with pytest.raises(RetriesExhaustedError) as caught:
            await pipeline("shared")
        assert (caught.value.reason, caught.value.attempts) == ("max_attempts", 3)
    assert retry.snapshot().retries == 1  # type: ignore[union-attr]
    with pytest.raises(RetriesExhaustedError) as caught:
        await pipeline("fresh")
    assert (caught.value.reason, caught.value.attempts) == ("budget", 1)
