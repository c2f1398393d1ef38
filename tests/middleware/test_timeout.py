"""Timeout: total vs per-attempt deadlines, our timeout vs the caller's cancellation, no orphans, bad options."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import math
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import dspy
import pytest

from resilient_dspy import Pipeline, ResilienceError, RetriesExhaustedError, Retry, Timeout, TimeoutExceededError
from resilient_dspy.core import Call, Handler
from resilient_dspy.errors import ConfigurationError, ResilienceWarning
from resilient_dspy.events import Event, RetryGaveUp, RetryScheduled, TimeoutFired
from resilient_dspy.testing import Fault, FaultInjectingLM
from tests.conftest import other_tasks

FOREVER = 10_000.0  # "hangs": virtual seconds no test deadline comes near (and never a real wait)


def hangs_then_answers(hangs: int, calls: list[float] | None = None) -> Callable[[str], Awaitable[str]]:
    """An async program whose first ``hangs`` calls never finish (in test terms); later calls answer."""
    seen: list[float] = [] if calls is None else calls

    async def program(question: str) -> str:
        seen.append(asyncio.get_running_loop().time())
        if len(seen) <= hangs:
            await asyncio.sleep(FOREVER)
        return f"answer to {question}"

    return program


def now() -> float:
    return asyncio.get_running_loop().time()


async def test_attempt_timeouts_fire_per_attempt_and_the_call_succeeds() -> None:
    """A Timeout below Retry bounds each attempt (scope 'attempt'): two hung attempts are retried, the third answers."""
    calls: list[float] = []
    events: list[Event] = []
    pipeline = Pipeline(
        hangs_then_answers(2, calls),
        Timeout(5),
        Retry(3, base_delay=0, jitter="none"),
        Timeout(1),
        listeners=[events.append],
    )
    start = now()
    outcome = await pipeline.invoke("q")

    assert outcome.value == "answer to q"
    assert (outcome.attempts, outcome.retries, outcome.served_by) == (3, 2, "primary")
    assert outcome.duration == pytest.approx(2.0, abs=1e-3)
    assert [t - start for t in calls] == pytest.approx([0.0, 1.0, 2.0], abs=1e-3)
    fired = [e for e in events if isinstance(e, TimeoutFired)]
    assert [(e.scope, e.timeout, e.layer) for e in fired] == [("attempt", 1.0, "Timeout(attempt)")] * 2
    scheduled = [e for e in events if isinstance(e, RetryScheduled)]
    assert [(e.attempt, e.delay, e.reason) for e in scheduled] == [
        (1, 0.0, "TimeoutExceededError"),
        (2, 0.0, "TimeoutExceededError"),
    ]


def test_describe_names_timeout_scope_by_placement() -> None:
    """describe() reports the outer Timeout as scope 'total' and the one below Retry as scope 'attempt'."""
    pipeline = Pipeline(hangs_then_answers(0), Timeout(5), Retry(3, base_delay=0, jitter="none"), Timeout(1))
    described = pipeline.describe()
    assert [d["layer"] for d in described] == ["Timeout", "Retry", "Timeout", "program"]
    assert (described[0]["scope"], described[0]["options"]) == (
        "total",
        {"seconds": 5.0, "first_chunk": None, "idle": None, "name": None},
    )
    assert (described[2]["scope"], described[2]["options"]) == (
        "attempt",
        {"seconds": 1.0, "first_chunk": None, "idle": None, "name": None},
    )


async def test_total_deadline_cuts_the_retry_loop_at_exactly_its_deadline() -> None:
    """With Timeout(1.5) outside, the total deadline fires at 1.5s (scope 'total') in the middle of attempt 2."""
    calls: list[float] = []
    events: list[Event] = []
    pipeline = Pipeline(
        hangs_then_answers(2, calls),
        Timeout(1.5),
        Retry(3, base_delay=0, jitter="none"),
        Timeout(1),
        listeners=[events.append],
    )
    start = now()
    with pytest.raises(TimeoutExceededError) as raised:
        await pipeline("q")

    assert (raised.value.scope, raised.value.timeout) == ("total", 1.5)
    assert now() - start == pytest.approx(1.5, abs=1e-3)
    assert [t - start for t in calls] == pytest.approx([0.0, 1.0], abs=1e-3)
    scheduled = [e for e in events if isinstance(e, RetryScheduled)]
    assert scheduled, "the first attempt's timeout should have been retried"
    assert all(e.time + e.delay <= start + 1.5 + 1e-9 for e in scheduled)
    assert [(e.scope, e.timeout) for e in events if isinstance(e, TimeoutFired)] == [("attempt", 1.0), ("total", 1.5)]
    assert not other_tasks()


async def test_retry_gives_up_rather_than_sleep_past_the_total_deadline() -> None:
    """A backoff that would end after the total deadline stops Retry at once (reason 'deadline'), without sleeping."""
    calls: list[float] = []
    events: list[Event] = []
    pipeline = Pipeline(
        hangs_then_answers(5, calls),
        Timeout(1.5),
        Retry(3, base_delay=1, backoff="constant", jitter="none"),
        Timeout(1),
        listeners=[events.append],
    )
    start = now()
    with pytest.raises(RetriesExhaustedError) as raised:
        await pipeline("q")

    assert (raised.value.attempts, raised.value.reason) == (1, "deadline")
    assert isinstance(raised.value.last_error, TimeoutExceededError)
    assert raised.value.last_error.scope == "attempt"
    assert now() - start == pytest.approx(1.0, abs=1e-3)
    assert len(calls) == 1
    assert [e.reason for e in events if isinstance(e, RetryGaveUp)] == ["deadline"]
    assert not [e for e in events if isinstance(e, RetryScheduled)]


async def test_timeout_error_type_attributes_and_event() -> None:
    """Our timeout raises TimeoutExceededError (a TimeoutError and a ResilienceError) and emits one TimeoutFired."""
    events: list[Event] = []
    pipeline = Pipeline(hangs_then_answers(1), Timeout(2.5), name="slow", listeners=[events.append])
    start = now()
    with pytest.raises(TimeoutError) as raised:
        await pipeline("q")

    error = raised.value
    assert type(error) is TimeoutExceededError
    assert isinstance(error, ResilienceError)
    assert (error.timeout, error.scope) == (2.5, "total")
    assert str(error) == "total timeout of 2.5s exceeded"
    assert error.__cause__ is None and error.__suppress_context__
    assert len(events) == 1
    fired = events[0]
    assert isinstance(fired, TimeoutFired)
    assert (fired.pipeline, fired.layer, fired.timeout, fired.scope) == ("slow", "Timeout(total)", 2.5, "total")
    assert fired.time == pytest.approx(start + 2.5, abs=1e-3)


async def test_timeout_name_option_labels_the_event() -> None:
    """Timeout(name=...) is the layer label of its TimeoutFired event."""
    events: list[Event] = []
    pipeline = Pipeline(hangs_then_answers(1), Timeout(1, name="llm-deadline"), listeners=[events.append])
    with pytest.raises(TimeoutExceededError):
        await pipeline("q")
    assert [e.layer for e in events] == ["llm-deadline"]


async def test_timeout_without_listener_still_raises() -> None:
    """With nobody listening no event is built, and the timeout is still raised."""
    pipeline = Pipeline(hangs_then_answers(1), Timeout(1))
    with pytest.raises(TimeoutExceededError):
        await pipeline("q")


async def test_fast_call_returns_and_leaves_no_pending_cancel() -> None:
    """A call that finishes in time returns its value; the current task carries no leftover cancellation."""
    pipeline = Pipeline(hangs_then_answers(0), Timeout(1))
    assert await pipeline("q") == "answer to q"
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(5)  # the timer was disarmed: nothing cancels us later


async def test_caller_cancellation_stays_a_cancellation() -> None:
    """Cancelling the task awaiting the pipeline raises CancelledError, not TimeoutExceededError."""
    calls: list[float] = []
    pipeline = Pipeline(hangs_then_answers(1, calls), Timeout(5))
    task = asyncio.create_task(pipeline("q"))
    await asyncio.sleep(0.5)
    assert calls and not task.done()
    start = now()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert now() - start == pytest.approx(0.0, abs=1e-3)
    assert not other_tasks()


async def test_caller_own_timeout_is_not_reported_as_ours() -> None:
    """A caller's asyncio.timeout shorter than ours surfaces as the caller's plain TimeoutError."""
    pipeline = Pipeline(hangs_then_answers(1), Timeout(5))
    with pytest.raises(TimeoutError) as raised:
        async with asyncio.timeout(0.5):
            await pipeline("q")
    assert type(raised.value) is TimeoutError


async def test_our_timeout_is_not_a_cancellation() -> None:
    """Our deadline firing gives the caller TimeoutExceededError; the task is not cancelled, no cancel is pending."""
    pipeline = Pipeline(hangs_then_answers(1), Timeout(1))

    async def caller() -> BaseException | None:
        try:
            await pipeline("q")
        except BaseException as error:
            current = asyncio.current_task()
            assert current is not None and current.cancelling() == 0
            return error
        return None

    task = asyncio.create_task(caller())
    error = await task
    assert not task.cancelled()
    assert type(error) is TimeoutExceededError
    assert not isinstance(error, asyncio.CancelledError)
    assert not other_tasks()


async def test_no_orphan_tasks_after_timeout_with_hanging_lm() -> None:
    """A hanging FaultInjectingLM under dspy.Predict is cut by Timeout, and nothing keeps running afterwards."""
    lm = FaultInjectingLM(script=["hang"])
    pipeline = Pipeline(dspy.Predict("question -> answer"), Timeout(2))
    start = now()
    with dspy.context(lm=lm), pytest.raises(TimeoutExceededError):
        await pipeline("Where did it go?")
    assert now() - start == pytest.approx(2.0, abs=1e-3)
    assert [entry.fault for entry in lm.journal] == [Fault.HANG]
    assert lm.core.in_flight == 0
    assert not other_tasks()


async def test_no_orphan_tasks_after_caller_cancels_hanging_lm() -> None:
    """Cancelling a caller blocked on a hanging LM leaves no task and no request in flight."""
    lm = FaultInjectingLM(script=["hang"])
    pipeline = Pipeline(dspy.Predict("question -> answer"), Timeout(60))

    async def ask() -> dspy.Prediction:
        with dspy.context(lm=lm):
            return await pipeline("Where did it go?")

    task = asyncio.create_task(ask())
    await asyncio.sleep(0.5)
    assert lm.core.in_flight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert lm.core.in_flight == 0
    assert not other_tasks()
    await asyncio.sleep(120)  # past the Timeout: nothing left to fire
    assert not other_tasks()


async def test_inner_plain_timeout_error_passes_through_unchanged() -> None:
    """A TimeoutError the program raises itself is not ours: it leaves the Timeout layer as the same object."""
    own = TimeoutError("upstream said: took too long")

    async def program(question: str) -> str:
        raise own

    events: list[Event] = []
    pipeline = Pipeline(program, Timeout(5), listeners=[events.append])
    with pytest.raises(TimeoutError) as raised:
        await pipeline("q")
    assert raised.value is own
    assert not events


async def test_inner_asyncio_timeout_passes_through_unchanged() -> None:
    """A program's own asyncio.timeout firing inside our longer deadline stays a plain TimeoutError."""

    async def program(question: str) -> str:
        async with asyncio.timeout(0.5):
            await asyncio.sleep(FOREVER)
        return "unreachable"

    pipeline = Pipeline(program, Timeout(5))
    start = now()
    with pytest.raises(TimeoutError) as raised:
        await pipeline("q")
    assert type(raised.value) is TimeoutError
    assert now() - start == pytest.approx(0.5, abs=1e-3)


async def test_inner_deadline_is_the_earlier_of_ours_and_the_callers() -> None:
    """An inner Timeout(10) under an outer Timeout(1) sees (and is bounded by) the outer deadline."""
    seen: list[float | None] = []

    class Probe:
        async def __call__(self, call: Call, next: Handler) -> Any:
            seen.append(call.remaining())
            return await next(call)

    pipeline = Pipeline(hangs_then_answers(1), Timeout(1), Timeout(10), Probe())
    start = now()
    with pytest.raises(TimeoutExceededError) as raised:
        await pipeline("q")
    assert seen == [pytest.approx(1.0, abs=1e-6)]
    assert raised.value.timeout == 1.0
    assert now() - start == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("seconds", [0, -1, math.inf, math.nan])
def test_bad_seconds_is_a_configuration_error(seconds: float) -> None:
    """Timeout(seconds) must be a positive finite number; the error names Timeout.seconds."""
    with pytest.raises(ConfigurationError) as raised:
        Timeout(seconds)
    assert [field for field, _ in raised.value.problems] == ["Timeout.seconds"]
    assert "Timeout.seconds" in str(raised.value)


def test_unknown_option_type_is_a_configuration_error() -> None:
    """A non-number for seconds is rejected at build time, naming Timeout.seconds."""
    with pytest.raises(ConfigurationError) as raised:
        Timeout("soon")  # type: ignore[arg-type]
    assert [field for field, _ in raised.value.problems] == ["Timeout.seconds"]


async def test_a_clamped_deadline_reports_the_time_it_really_allowed() -> None:
    """Regression: under an earlier outside deadline the error said the configured 5s, not the 0.3s allowed."""
    from resilient_dspy import Pipeline, Timeout, TimeoutExceededError

    async def hang(question: str) -> str:
        await asyncio.sleep(100)
        return question

    pipeline = Pipeline(hang, Timeout(5))
    loop = asyncio.get_running_loop()
    call = pipeline.new_call({"question": "q"}, deadline=loop.time() + 0.3)
    with pytest.raises(TimeoutExceededError) as raised:
        await pipeline.run(call)
    assert raised.value.timeout == pytest.approx(0.3, abs=1e-6)


def test_one_timeout_instance_cannot_be_both_total_and_attempt() -> None:
    """Regression: a shared instance silently took the scope of the last pipeline built."""
    from resilient_dspy import Pipeline, Retry, Timeout
    from resilient_dspy.errors import ConfigurationError

    async def program(question: str) -> str:
        return question

    shared = Timeout(1)
    Pipeline(program, shared)
    Pipeline(program, shared)  # same placement again is fine
    with pytest.raises(ConfigurationError, match="use a new Timeout"), pytest.warns(ResilienceWarning):
        Pipeline(program, Retry(), shared)


def test_the_timeout_name_shows_in_describe() -> None:
    """A named Timeout is labelled in describe()."""
    from resilient_dspy import Pipeline, Timeout

    async def program(question: str) -> str:
        return question

    assert Pipeline(program, Timeout(1, name="llm-budget")).describe()[0]["name"] == "llm-budget"


def test_an_unplaced_timeout_describes_its_scope_as_total() -> None:
    assert Timeout(5).describe() == {
        "layer": "Timeout",
        "name": "Timeout(total)",
        "scope": "total",
        "options": {"seconds": 5.0, "first_chunk": None, "idle": None, "name": None},
    }
    assert Timeout(5).scope == "total"


async def test_our_deadline_and_the_callers_cancellation_at_once_let_the_bodys_own_error_through() -> None:
    """The body answers the cancellation with an error of its own while the caller also cancels: that error is the
    caller's business, not our timeout (the deadline's cancellation is not the only one pending)."""

    async def stubborn(question: str) -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None
        return question

    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(Pipeline(stubborn, Timeout(1)).invoke("q"))
    loop.call_at(loop.time() + 1, task.cancel)  # the same instant as the Timeout's deadline
    with pytest.raises(RuntimeError, match="cleanup failed"):
        await task


def test_a_timeout_refused_for_a_second_scope_names_itself_and_keeps_its_first_scope() -> None:
    timeout = Timeout(5)
    Pipeline(hangs_then_answers(1), timeout)
    with pytest.raises(ConfigurationError) as caught, pytest.warns(ResilienceWarning):
        Pipeline(hangs_then_answers(1), Retry(2), timeout)
    [(field, rule)] = caught.value.problems
    assert field == "Timeout" and "total" in rule and "attempt" in rule
    assert timeout.scope == "total"


async def test_an_earlier_outer_deadline_is_reported_as_the_time_left() -> None:
    events: list[Event] = []
    pipeline = Pipeline(hangs_then_answers(1), Timeout(5), name="p", listeners=[events.append])
    await asyncio.sleep(10)
    with pytest.raises(TimeoutExceededError) as caught:
        await pipeline.run(pipeline.new_call({"question": "q"}, deadline=12.0))
    assert (caught.value.timeout, caught.value.scope) == (2.0, "total")
    assert events == [TimeoutFired(pipeline="p", layer="Timeout(total)", time=12.0, timeout=2.0, scope="total")]


async def test_an_equal_outer_deadline_keeps_our_own_seconds() -> None:
    pipeline = Pipeline(hangs_then_answers(1), Timeout(0.2))
    await asyncio.sleep(0.1)
    started = asyncio.get_running_loop().time()
    deadline = started + 0.2
    assert deadline - started != 0.2  # float rounding: recomputing the seconds would not give 0.2 back
    with pytest.raises(TimeoutExceededError) as caught:
        await pipeline.run(pipeline.new_call({"question": "q"}, deadline=deadline))
    assert caught.value.timeout == 0.2


async def _answers_cancellation_with(error: Exception) -> None:
    """A child task that, when cancelled, raises ``error`` instead (as a wrapper around a client may do)."""
    try:
        await asyncio.sleep(FOREVER)
    except asyncio.CancelledError:
        raise error from None


def task_group_program(error: Exception | None, calls: list[float] | None = None) -> Callable[[str], Awaitable[str]]:
    """A program that fans out in a TaskGroup; its first run hangs, and a child answers cancellation with ``error``."""
    seen: list[float] = [] if calls is None else calls

    async def program(question: str) -> str:
        seen.append(now())
        if len(seen) > 1:
            return f"answer to {question}"
        async with asyncio.TaskGroup() as group:
            group.create_task(asyncio.sleep(FOREVER))
            if error is not None:
                group.create_task(_answers_cancellation_with(error))
        return "unreachable"

    return program


@pytest.mark.parametrize(
    "error", [ConnectionError("aborted"), ValueError("cleanup failed"), None], ids=["transport", "bug", "none"]
)
async def test_a_task_group_cut_by_the_timeout_raises_timeout_exceeded(error: Exception | None) -> None:
    """A TaskGroup whose children answer our cancellation with errors surfaces TimeoutExceededError, not a group."""
    events: list[Event] = []
    pipeline = Pipeline(task_group_program(error), Timeout(1), listeners=[events.append])
    start = now()
    with pytest.raises(TimeoutExceededError) as raised:
        await pipeline("q")
    assert raised.value.scope == "total"
    assert now() - start == pytest.approx(1.0, abs=1e-3)
    assert [type(event) for event in events] == [TimeoutFired]
    assert not other_tasks()


async def test_a_task_group_cut_by_the_attempt_timeout_is_retried() -> None:
    """Under Retry, the cut attempt is an attempt timeout (retryable): the next attempt answers."""
    calls: list[float] = []
    with pytest.warns(ResilienceWarning, match="total"):  # an attempt timeout with no total one: warned at build
        pipeline = Pipeline(
            task_group_program(ConnectionError("aborted"), calls), Retry(3, base_delay=0, jitter="none"), Timeout(1)
        )
    assert await pipeline("q") == "answer to q"
    assert len(calls) == 2
    assert not other_tasks()


async def test_a_program_answering_our_cancellation_with_its_own_error_raises_timeout_exceeded() -> None:
    """A body that turns our cancellation into its own error (no TaskGroup) still reports our timeout."""

    async def program(question: str) -> str:
        await _answers_cancellation_with(dspy.LMTransportError("connection closed"))
        return "unreachable"

    with pytest.raises(TimeoutExceededError) as raised:
        await Pipeline(program, Timeout(1))("q")
    assert isinstance(raised.value.__cause__, dspy.LMTransportError)


async def test_a_task_group_error_before_the_deadline_passes_through_unchanged() -> None:
    """A TaskGroup that fails on its own, before our deadline, keeps its ExceptionGroup."""

    async def failing() -> None:
        await asyncio.sleep(0.5)
        raise ValueError("child failed")

    async def program(question: str) -> str:
        async with asyncio.TaskGroup() as group:
            group.create_task(failing())
            group.create_task(asyncio.sleep(FOREVER))
        return "unreachable"

    with pytest.raises(ExceptionGroup) as raised:
        await Pipeline(program, Timeout(5))("q")
    assert not isinstance(raised.value, TimeoutExceededError)


async def test_caller_cancellation_of_a_task_group_program_stays_a_cancellation() -> None:
    """The caller cancelling a TaskGroup program (children answering with errors) is not reported as our timeout."""
    pipeline = Pipeline(task_group_program(ConnectionError("aborted")), Timeout(5))
    task = asyncio.create_task(pipeline("q"))
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(BaseException) as raised:
        await task
    assert not isinstance(raised.value, TimeoutExceededError)
    assert not other_tasks()


async def test_a_task_group_cut_by_both_deadlines_at_once_reports_the_total_timeout() -> None:
    """An attempt deadline clamped to the total one: both fire together, and the call's total timeout is reported."""
    with pytest.warns(ResilienceWarning, match="attempt"):  # the attempt timeout is longer than the total: warned
        pipeline = Pipeline(
            task_group_program(ConnectionError("aborted")),
            Timeout(1),
            Retry(3, base_delay=0, jitter="none"),
            Timeout(5),
        )
    with pytest.raises(TimeoutExceededError) as raised:
        await pipeline("q")
    assert raised.value.scope == "total"
    assert not other_tasks()


@pytest.mark.parametrize("limits", [{}, {"first_chunk": 1.0}, {"idle": 1.0}], ids=["plain", "first_chunk", "idle"])
async def test_the_layers_below_see_the_deadline_with_or_without_stream_limits(limits: dict[str, float]) -> None:
    seen: list[float | None] = []

    class Look:
        async def __call__(self, call: Call, next: Handler) -> Any:
            seen.append(call.remaining())
            return await next(call)

    async def answer(question: str) -> str:
        return question

    assert await Pipeline(answer, Timeout(5.0, **limits), Look())("q") == "q"
    assert seen == [pytest.approx(5.0)]


async def test_staggered_concurrent_calls_are_each_cut_at_their_own_deadline() -> None:
    """One Timeout serving many calls in flight, started at different times: each is cut exactly ``seconds`` after
    its own start, and calls that answer in time are not cut (the deadlines share one loop timer)."""
    cut: list[float] = []

    async def program(question: str) -> str:
        await asyncio.sleep(0.5 if question.startswith("fast") else FOREVER)
        return question

    pipeline = Pipeline(program, Timeout(2))

    async def one(question: str, delay: float) -> str:
        await asyncio.sleep(delay)
        started = now()
        try:
            return await pipeline(question)
        except TimeoutExceededError:
            cut.append(now() - started)
            return "cut"

    answers = await asyncio.gather(*(one(f"{kind}{i}", i * 0.3) for i in range(6) for kind in ("fast", "slow")))

    assert answers == [a for i in range(6) for a in (f"fast{i}", "cut")]
    assert cut == pytest.approx([2.0] * 6, abs=1e-6)
    assert other_tasks() == set()


async def test_a_deadline_earlier_than_one_in_flight_still_cuts_at_its_own_time() -> None:
    """A call whose outer deadline falls before that of a call already in flight on the same Timeout is cut at its
    outer deadline, and the call in flight still at its own."""
    timeout = Timeout(5)
    inner = Pipeline(hangs_then_answers(10), timeout)
    outer = Pipeline(inner, Timeout(1))
    started = now()
    first = asyncio.ensure_future(inner("first"))
    await asyncio.sleep(0.5)
    with pytest.raises(TimeoutExceededError):
        await outer("second")
    assert now() - started == pytest.approx(1.5, abs=1e-6)
    with pytest.raises(TimeoutExceededError):
        await first
    assert now() - started == pytest.approx(5.0, abs=1e-6)


def test_one_timeout_serves_calls_on_successive_event_loops() -> None:
    """The same pipeline run by two ``asyncio.run`` loops, one after the other: each loop's calls are bounded."""
    pipeline = Pipeline(hangs_then_answers(2), Timeout(0.01))
    for _ in range(2):
        with pytest.raises(TimeoutExceededError):
            asyncio.run(pipeline("q"))
    assert asyncio.run(pipeline("q")) == "answer to q"


async def test_calls_that_ended_behind_a_long_one_are_not_kept_alive() -> None:
    """While one call runs on towards a long deadline, the answers of many calls that ended after it started (each
    in its own task) are freed: the Timeout keeps no more than a bounded number of ended calls."""

    class Answer:
        pass

    async def program(question: str) -> Any:
        if question == "long":
            await asyncio.sleep(FOREVER)
        return Answer()

    pipeline = Pipeline(program, Timeout(100))
    long = asyncio.ensure_future(pipeline("long"))
    await asyncio.sleep(0)
    answers = [weakref.ref(await asyncio.ensure_future(pipeline(f"q{i}"))) for i in range(2_000)]
    gc.collect()
    assert sum(ref() is not None for ref in answers) <= 600
    long.cancel()
    with pytest.raises(asyncio.CancelledError):
        await long


_HELD: contextvars.ContextVar[object] = contextvars.ContextVar("_HELD")


class _Payload:
    """Something a call puts in its context (a DSPy setting, a usage scope) that must die with the call."""


@pytest.mark.looptime(False)  # the shared timer runs only on a real loop clock
async def test_the_shared_timer_keeps_nothing_of_a_finished_call_alive() -> None:
    """The loop timer a Timeout shares outlives the call that armed it (armed for 30 s here): it must not hold that
    call's context, or every object the call set there (and the pipeline behind it) lives until the timer fires."""

    async def program(question: str) -> str:
        return question

    async def call(pipeline: Pipeline) -> str:
        _HELD.set(_Payload())  # in the caller's context when the Timeout arms its timer
        return await pipeline("q")  # type: ignore[no-any-return]

    async def run() -> weakref.ref[object]:
        pipeline = Pipeline(program, Timeout(30))
        context = contextvars.copy_context()
        task = asyncio.get_running_loop().create_task(call(pipeline), context=context)
        assert await task == "q"
        return weakref.ref(context[_HELD])

    payload = await run()
    for _ in range(3):  # the loop's own handle that resumed us still holds the finished task for a turn
        await asyncio.sleep(0)
    gc.collect()
    assert payload() is None
