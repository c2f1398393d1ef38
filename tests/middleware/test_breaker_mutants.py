"""CircuitBreaker: exact-value tests written from mutmut survivors (see docs/mutation-testing.md).

They pin what test_breaker.py checks only loosely: the exact validation problems, ``describe()`` and snapshot
contents, event fields and log lines, ``>=`` boundaries, partition eviction, and slow-call counting in both
window kinds. Async tests run on looptime's virtual clock, which starts at 0 and moves only on sleeps.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import dspy
import pytest

from resilient_dspy import CircuitBreaker, CircuitOpenError, Pipeline
from resilient_dspy.core.health import LayerHealth
from resilient_dspy.errors import ConfigurationError
from resilient_dspy.events import Event
from resilient_dspy.middleware.breaker import CircuitRejected, CircuitSnapshot, CircuitState, CircuitStateChanged
from resilient_dspy.middleware.breaker.windows import _FAILED, _TimeWindow

CLOSED, OPEN, HALF_OPEN, ISOLATED = (
    CircuitState.CLOSED,
    CircuitState.OPEN,
    CircuitState.HALF_OPEN,
    CircuitState.ISOLATED,
)


async def program(question: str) -> str:
    """Behaviour from the question, after an optional ``key|`` prefix: ok, fail, excl, rl:R, sleep:S[:then]."""
    step = question.split("|")[-1]
    if step.startswith("sleep:"):
        _, seconds, *then = step.split(":", 2)
        await asyncio.sleep(float(seconds))
        step = then[0] if then else "ok"
    if step == "ok":
        return "answer"
    if step == "fail":
        raise dspy.LMServerError("injected 503", status=503)
    if step == "excl":
        raise dspy.LMInvalidRequestError("bad request", status=400)
    if step.startswith("rl:"):
        raise dspy.LMRateLimitError("429", status=429, retry_after=float(step.split(":")[1]))
    raise AssertionError(step)


def by_prefix(call: Any) -> str:
    return call.inputs["question"].split("|")[0]


async def run(pipeline: Pipeline, question: str) -> str:
    try:
        return await pipeline(question)
    except CircuitOpenError:
        return "rejected"
    except dspy.LMError:
        return "error"


def snap(**fields: Any) -> CircuitSnapshot:
    """A snapshot with the defaults of a fresh, unpartitioned, closed circuit, overridden by ``fields``."""
    base: dict[str, Any] = {
        "key": None,
        "state": CLOSED,
        "calls": 0,
        "failures": 0,
        "slow_calls": 0,
        "consecutive_failures": 0,
        "retry_after": None,
        "break_duration": 30.0,
        "probes_in_flight": 0,
        "probes_succeeded": 0,
    }
    return CircuitSnapshot(**{**base, **fields})


def changed(old: CircuitState, new: CircuitState, reason: str, **fields: Any) -> CircuitStateChanged:
    base: dict[str, Any] = {"pipeline": "p", "layer": "cb", "time": 0.0, "key": None, "retry_after": None}
    return CircuitStateChanged(old=old, new=new, reason=reason, **{**base, **fields})


def transitions(events: list[Event]) -> list[tuple[Any, ...]]:
    return [(e.old, e.new, e.reason, e.retry_after) for e in events if isinstance(e, CircuitStateChanged)]


# ------------------------------------------------------------------------------------------- validation

FILTER_RULE = "must be exception types or a predicate of the exception"


@pytest.mark.parametrize(
    ("value", "shown"),
    [([], "[]"), ([int], "[<class 'int'>]"), ((ValueError, int), "(<class 'ValueError'>, <class 'int'>)"), (42, "42")],
)
@pytest.mark.parametrize("field", ["exclude", "failure_on"])
def test_a_bad_error_filter_is_one_exact_problem(field: str, value: Any, shown: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        CircuitBreaker(**{field: value})
    assert caught.value.problems == ((f"CircuitBreaker.{field}", f"{FILTER_RULE} (got {shown})"),)


def test_good_error_filters_are_normalised_to_tuples_or_kept_callable() -> None:
    def predicate(error: BaseException) -> bool:
        return "boom" in str(error)

    breaker = CircuitBreaker(exclude=KeyError, failure_on=[ValueError, OSError])
    assert breaker.options.exclude == (KeyError,) and breaker.options.failure_on == (ValueError, OSError)
    assert CircuitBreaker(failure_on=predicate).options.failure_on is predicate


def test_a_predicate_failure_on_is_called_with_the_error() -> None:
    seen: list[BaseException] = []

    def predicate(error: BaseException) -> bool:
        seen.append(error)
        return "boom" in str(error)

    breaker = CircuitBreaker(failure_on=predicate)
    boom, other = RuntimeError("boom"), RuntimeError("other")
    assert breaker.counts_as_failure(boom) is True
    assert breaker.counts_as_failure(other) is None
    assert seen == [boom, other]


# ------------------------------------------------------------------------------------------- describe()

DEFAULT_OPTIONS: dict[str, Any] = {
    "max_keys": 1024,
    "idle_after": 600.0,
    "failure_threshold": None,
    "failure_rate": None,
    "slow_call_rate": None,
    "slow_call_duration": None,
    "window": None,
    "window_seconds": None,
    "buckets": 10,
    "min_calls": 10,
    "break_duration": 30.0,
    "break_multiplier": 1.0,
    "max_break_duration": None,
    "half_open_probes": 1,
    "name": None,
    "mode": "consecutive",
    "partitioned": False,
}


def test_describe_defaults_exactly() -> None:
    assert CircuitBreaker().describe() == {
        "layer": "CircuitBreaker",
        "name": "CircuitBreaker",
        "options": DEFAULT_OPTIONS,
    }
    assert CircuitBreaker().name == "CircuitBreaker"


def test_describe_a_partitioned_rate_breaker_without_filters_or_key_function() -> None:
    breaker = CircuitBreaker(
        failure_rate=0.5, window=20, key=by_prefix, exclude=KeyError, failure_on=lambda e: True, name="llm"
    )
    options = {**DEFAULT_OPTIONS, "failure_rate": 0.5, "window": 20, "name": "llm", "mode": "rate"}
    options["partitioned"] = True
    assert breaker.describe() == {"layer": "CircuitBreaker", "name": "llm", "options": options}


# ------------------------------------------------------------------------------------------- snapshots


async def test_snapshot_of_a_fresh_and_of_an_open_consecutive_circuit() -> None:
    breaker = CircuitBreaker(2, break_duration=10)
    pipeline = Pipeline(program, breaker)
    assert breaker.snapshot() == snap(break_duration=10.0)
    await run(pipeline, "fail")
    assert breaker.snapshot() == snap(break_duration=10.0, consecutive_failures=1, calls=1, failures=1)
    await run(pipeline, "fail")
    assert breaker.snapshot() == snap(state=OPEN, break_duration=10.0, retry_after=10.0)
    await asyncio.sleep(9.5)
    assert breaker.snapshot().retry_after == pytest.approx(0.5)
    await asyncio.sleep(1)
    assert breaker.snapshot() == snap(state=OPEN, break_duration=10.0, retry_after=0.0)


async def test_snapshot_of_an_unseen_key_is_a_fresh_circuit_for_that_key() -> None:
    breaker = CircuitBreaker(2, key=by_prefix)
    Pipeline(program, breaker)
    assert breaker.snapshot("never") == snap(key="never")
    assert breaker.snapshots() == {}


async def test_partitioned_circuits_know_their_key() -> None:
    events: list[Event] = []
    breaker = CircuitBreaker(1, break_duration=10, key=by_prefix, name="cb")
    pipeline = Pipeline(program, breaker, name="p", listeners=[events.append])
    await asyncio.sleep(5)
    assert await run(pipeline, "a|fail") == "error"
    assert await run(pipeline, "a|ok") == "rejected"
    assert breaker.snapshot("a") == snap(key="a", state=OPEN, break_duration=10.0, retry_after=10.0)
    assert events == [
        changed(CLOSED, OPEN, "failure_threshold", key="a", time=5.0, retry_after=10.0),
        CircuitRejected(pipeline="p", layer="cb", time=5.0, key="a", state=OPEN, retry_after=10.0),
    ]
    await asyncio.sleep(10)
    assert await run(pipeline, "a|ok") == "answer"
    assert events[2:] == [
        changed(OPEN, HALF_OPEN, "break_elapsed", key="a", time=15.0),
        changed(HALF_OPEN, CLOSED, "probes_succeeded", key="a", time=15.0),
    ]


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


def test_time_window_bucket_of_a_float_boundary() -> None:
    window = _TimeWindow(1.0, 10)  # 0.1 s buckets: 1.0 // 0.1 == 9.0, but 1.0 / 0.1 == 10.0
    window.add(_FAILED, 1.0)
    assert window.totals(1.0) == (1, 1, 0)
    assert window.totals(1.95) == (0, 0, 0)  # 1.95 // 0.1 == 19: bucket 9 is one window old
    early = _TimeWindow(1.0, 10)
    early.add(_FAILED, 0.05)  # bucket 0
    assert early.totals(1.0) == (1, 1, 0)  # bucket 0 is still inside the last second


# ------------------------------------------------------------------------------------------- half-open


async def test_half_open_rejection_when_the_probe_is_out_carries_the_reclaim_time() -> None:
    breaker = CircuitBreaker(1, break_duration=10)
    pipeline = Pipeline(program, breaker)
    await run(pipeline, "fail")
    await asyncio.sleep(10)
    probe = asyncio.create_task(pipeline("sleep:100"))
    await asyncio.sleep(9.5)
    with pytest.raises(CircuitOpenError) as caught:
        await pipeline("ok")
    assert caught.value.retry_after == pytest.approx(0.5)
    assert str(caught.value) == "circuit None is half-open and its probes are out (retry after 0.5s)"
    assert breaker.snapshot() == snap(state=HALF_OPEN, break_duration=10.0, probes_in_flight=1)
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe


async def test_cancelling_a_reclaimed_probe_is_neutral() -> None:
    breaker = CircuitBreaker(1, break_duration=10)
    pipeline = Pipeline(program, breaker)
    await run(pipeline, "fail")
    await asyncio.sleep(10)
    hung = asyncio.create_task(pipeline("sleep:100"))
    await asyncio.sleep(10)
    second = asyncio.create_task(pipeline("sleep:100"))  # reclaims the hung probe's permit
    await asyncio.sleep(1)
    hung.cancel()
    with pytest.raises(asyncio.CancelledError):
        await hung
    assert breaker.snapshot().probes_in_flight == 1
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    assert breaker.snapshot() == snap(state=HALF_OPEN, break_duration=10.0)


@pytest.mark.parametrize(
    ("question", "reason", "retry_after", "break_duration"),
    [
        ("fail", "probe_failed", 20.0, 20.0),
        ("rl:50", "probe_failed", 50.0, 20.0),
        ("sleep:2", "probe_slow", 20.0, 20.0),
    ],
)
async def test_a_probe_reopens_with_its_reason_and_the_grown_break(
    question: str, reason: str, retry_after: float, break_duration: float
) -> None:
    events: list[Event] = []
    breaker = CircuitBreaker(
        failure_rate=1.0, slow_call_rate=1.0, slow_call_duration=2, window=1, min_calls=1, break_duration=10,
        break_multiplier=2, name="cb",
    )  # fmt: skip
    pipeline = Pipeline(program, breaker, name="p", listeners=[events.append])
    await run(pipeline, "fail")
    await asyncio.sleep(10)
    await run(pipeline, question)
    assert transitions(events) == [
        (CLOSED, OPEN, "failure_rate", 10.0),
        (OPEN, HALF_OPEN, "break_elapsed", None),
        (HALF_OPEN, OPEN, reason, retry_after),
    ]
    assert breaker.snapshot().break_duration == break_duration
    assert breaker.snapshot().retry_after == pytest.approx(retry_after)  # reopened as the probe ended


async def test_rejection_messages_name_the_circuit_and_state() -> None:
    breaker = CircuitBreaker(1, break_duration=10, key=by_prefix)
    pipeline = Pipeline(program, breaker)
    await run(pipeline, "a|fail")
    with pytest.raises(CircuitOpenError) as caught:
        await pipeline("a|ok")
    assert str(caught.value) == "circuit 'a' is open (retry after 10s)"
    breaker.isolate("b")
    with pytest.raises(CircuitOpenError) as caught:
        await pipeline("b|ok")
    assert str(caught.value) == "circuit 'b' is isolated" and caught.value.retry_after is None


# ------------------------------------------------------------------------------------------- generations


async def test_a_call_started_two_transitions_ago_does_not_count() -> None:
    breaker = CircuitBreaker(1, break_duration=10)
    pipeline = Pipeline(program, breaker)
    breaker.isolate()
    breaker.reset()
    late = asyncio.create_task(pipeline("sleep:5:fail"))
    await asyncio.sleep(1)
    breaker.isolate()
    breaker.reset()
    with pytest.raises(dspy.LMServerError):
        await late
    assert breaker.snapshot() == snap(break_duration=10.0)


# ------------------------------------------------------------------------------------------- events and logs


async def test_transition_events_go_to_the_calling_pipeline_only() -> None:
    first: list[Event] = []
    second: list[Event] = []
    breaker = CircuitBreaker(1, break_duration=10, name="cb")
    one = Pipeline(program, breaker, name="p", listeners=[first.append])
    two = Pipeline(program, breaker, name="q", listeners=[second.append])  # kept alive: the breaker holds it weakly
    await asyncio.sleep(3)
    await run(one, "fail")
    await asyncio.sleep(10)
    await run(one, "ok")
    assert first == [
        changed(CLOSED, OPEN, "failure_threshold", time=3.0, retry_after=10.0),
        changed(OPEN, HALF_OPEN, "break_elapsed", time=13.0),
        changed(HALF_OPEN, CLOSED, "probes_succeeded", time=13.0),
    ]
    assert second == [] and two.name == "q"


async def test_manual_control_is_announced_to_every_pipeline_once() -> None:
    first: list[Event] = []
    second: list[Event] = []
    breaker = CircuitBreaker(1, key=by_prefix, name="cb")
    pipelines = [  # kept alive: the breaker holds its pipelines weakly
        Pipeline(program, breaker, name="p", listeners=[first.append]),
        Pipeline(program, breaker, name="q", listeners=[second.append]),
    ]
    await asyncio.sleep(7)
    breaker.isolate("a")
    breaker.isolate("a")  # already isolated: nothing
    breaker.reset("a")
    breaker.reset("a")  # already closed: nothing
    expected = [
        changed(CLOSED, ISOLATED, "isolate", key="a", time=7.0),
        changed(ISOLATED, CLOSED, "reset", key="a", time=7.0),
    ]
    assert first == expected
    assert second == [
        changed(CLOSED, ISOLATED, "isolate", key="a", time=7.0, pipeline="q"),
        changed(ISOLATED, CLOSED, "reset", key="a", time=7.0, pipeline="q"),
    ]
    assert len(pipelines) == 2


async def test_isolate_and_reset_touch_only_the_given_key_or_all() -> None:
    breaker = CircuitBreaker(1, key=by_prefix)
    pipeline = Pipeline(program, breaker)
    await run(pipeline, "a|ok")
    await run(pipeline, "b|ok")
    breaker.isolate("a")
    assert {k: s.state for k, s in breaker.snapshots().items()} == {"a": ISOLATED, "b": CLOSED}
    breaker.isolate()
    assert {k: s.state for k, s in breaker.snapshots().items()} == {"a": ISOLATED, "b": ISOLATED}
    breaker.reset("b")
    assert {k: s.state for k, s in breaker.snapshots().items()} == {"a": ISOLATED, "b": CLOSED}
    breaker.reset()
    assert {k: s.state for k, s in breaker.snapshots().items()} == {"a": CLOSED, "b": CLOSED}


def test_manual_control_outside_a_loop_uses_time_zero() -> None:
    events: list[Event] = []
    breaker = CircuitBreaker(1, name="cb")
    pipeline = Pipeline(program, breaker, name="p", listeners=[events.append])  # kept alive (held weakly)
    breaker.isolate()
    assert breaker.snapshot() == snap(state=ISOLATED)
    breaker.reset()
    assert events == [changed(CLOSED, ISOLATED, "isolate"), changed(ISOLATED, CLOSED, "reset")]
    assert pipeline.name == "p"


async def test_log_lines_and_levels(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="resilient_dspy.breaker")
    plain = Pipeline(program, CircuitBreaker(1, break_duration=10, name="cb"))
    keyed = Pipeline(program, CircuitBreaker(1, break_duration=10, key=by_prefix))
    await run(plain, "fail")
    await run(keyed, "a|fail")
    await asyncio.sleep(10)
    await run(plain, "ok")
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "resilient_dspy.breaker"]
    assert records == [
        (logging.WARNING, "circuit cb: closed -> open (failure_threshold)"),
        (logging.WARNING, "circuit CircuitBreaker['a']: closed -> open (failure_threshold)"),
        (logging.INFO, "circuit cb: open -> half_open (break_elapsed)"),
        (logging.INFO, "circuit cb: half_open -> closed (probes_succeeded)"),
    ]


# ------------------------------------------------------------------------------------------- partition eviction


async def test_a_closed_circuit_with_failures_is_not_evicted_but_a_clean_one_is() -> None:
    breaker = CircuitBreaker(2, key=by_prefix, max_keys=2)
    pipeline = Pipeline(program, breaker)
    await run(pipeline, "a|fail")
    await run(pipeline, "b|ok")
    assert set(breaker.snapshots()) == {"a", "b"}
    assert breaker.snapshot("a").consecutive_failures == 1
    await run(pipeline, "c|ok")  # evicts b (clean), keeps a
    assert set(breaker.snapshots()) == {"a", "c"}
    await run(pipeline, "a|fail")
    assert breaker.snapshot("a").state is OPEN


async def test_a_time_window_circuit_with_failures_is_not_evicted() -> None:
    breaker = CircuitBreaker(failure_rate=0.5, window_seconds=10, key=by_prefix, max_keys=2)
    pipeline = Pipeline(program, breaker)
    await asyncio.sleep(20)
    await run(pipeline, "a|fail")
    await run(pipeline, "a|ok")  # no consecutive failures left: only the window remembers the failure
    await run(pipeline, "b|ok")
    assert set(breaker.snapshots()) == {"a", "b"}
    assert breaker.snapshot("a") == snap(key="a", calls=2, failures=1)
    await run(pipeline, "c|ok")
    assert set(breaker.snapshots()) == {"a", "c"}


async def test_an_isolated_or_half_open_circuit_is_not_evicted() -> None:
    breaker = CircuitBreaker(1, break_duration=10, key=by_prefix, max_keys=1)
    pipeline = Pipeline(program, breaker)
    breaker.isolate("i")
    await run(pipeline, "h|fail")
    await asyncio.sleep(10)
    probe = asyncio.create_task(pipeline("h|sleep:5"))
    await asyncio.sleep(1)
    await run(pipeline, "x|ok")
    assert {k: s.state for k, s in breaker.snapshots().items()} == {"i": ISOLATED, "h": HALF_OPEN, "x": CLOSED}
    assert await probe == "answer"


async def test_an_open_circuit_is_kept_after_its_break_until_a_probe_closes_it() -> None:
    breaker = CircuitBreaker(1, break_duration=10, key=by_prefix, max_keys=2, idle_after=5)
    pipeline = Pipeline(program, breaker)
    await run(pipeline, "a|fail")
    await asyncio.sleep(100)
    await run(pipeline, "b|ok")
    await run(pipeline, "c|ok")
    assert set(breaker.snapshots()) == {"a", "c"}  # b was clean; a is open, its break long over
    assert await run(pipeline, "a|ok") == "answer"
    await asyncio.sleep(100)
    await run(pipeline, "d|ok")
    assert set(breaker.snapshots()) == {"d"}  # closed by the probe, clean, unused past idle_after


async def test_beyond_max_keys_the_oldest_protecting_circuit_goes_and_is_logged(caplog: Any) -> None:
    breaker = CircuitBreaker(2, key=by_prefix, max_keys=1, name="cb")
    pipeline = Pipeline(program, breaker)
    await run(pipeline, "a|fail")
    with caplog.at_level(logging.WARNING, logger="resilient_dspy.breaker"):
        await run(pipeline, "b|ok")
    assert set(breaker.snapshots()) == {"b"}
    assert [r.getMessage() for r in caplog.records] == [
        "circuit cb['a'] evicted while still protecting (closed): more than max_keys=1 circuits remember failures"
    ]


# ------------------------------------------------------------------------------------------- health


async def test_health_unpartitioned_ok_then_down() -> None:
    breaker = CircuitBreaker(1, break_duration=10, name="cb")
    pipeline = Pipeline(program, breaker)
    assert breaker.health() == LayerHealth("cb", "ok", {"circuits": {"*": "closed"}, "refusing": []})
    await run(pipeline, "fail")
    assert breaker.health() == LayerHealth("cb", "down", {"circuits": {"*": "open"}, "refusing": ["*"]})
    await asyncio.sleep(9.5)  # half a second left: still refusing
    assert breaker.health() == LayerHealth("cb", "down", {"circuits": {"*": "open"}, "refusing": ["*"]})
    await asyncio.sleep(0.5)  # still open, but the break is over: it would admit a probe
    assert breaker.health() == LayerHealth("cb", "ok", {"circuits": {"*": "open"}, "refusing": []})
    breaker.isolate()
    assert breaker.health() == LayerHealth("cb", "down", {"circuits": {"*": "isolated"}, "refusing": ["*"]})


async def test_health_partitioned_is_degraded_even_when_every_circuit_refuses() -> None:
    breaker = CircuitBreaker(1, break_duration=10, key=by_prefix)
    pipeline = Pipeline(program, breaker)
    await run(pipeline, "b|fail")
    await run(pipeline, "a|ok")
    details = {"circuits": {"b": "open", "a": "closed"}, "refusing": ["b"], "evicted_protecting": 0}
    assert breaker.health() == LayerHealth("CircuitBreaker", "degraded", details)
    breaker.isolate("a")
    details = {"circuits": {"b": "open", "a": "isolated"}, "refusing": ["a", "b"], "evicted_protecting": 0}
    assert breaker.health() == LayerHealth("CircuitBreaker", "degraded", details)
