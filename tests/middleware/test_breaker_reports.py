"""What a CircuitBreaker reports: ``describe()``, snapshots of one circuit and of every one, the events of its
transitions and rejections (and to which pipelines they go), its log lines and ``health()``. Async tests run on
looptime's virtual clock, which starts at 0 and moves only on sleeps.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from resilient_dspy import CircuitBreaker, Pipeline
from resilient_dspy.core.health import LayerHealth
from resilient_dspy.events import Event
from resilient_dspy.middleware.breaker import CircuitRejected

from .breaker_steps import CLOSED, HALF_OPEN, ISOLATED, OPEN, by_prefix, changed, program, run, says, snap

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
    "wait_for_half_open": False,
    "max_wait": None,
    "store": None,
    "on_store_failure": "local",
    "name": None,
    "mode": "consecutive",
    "partitioned": False,
}


def test_describe_gives_every_option_but_the_filters_with_the_mode_and_partitioning() -> None:
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
    assert breaker.snapshots() == {None: breaker.snapshot()}
    assert breaker.state is OPEN  # the alias of snapshot().state


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


async def test_transitions_are_logged_opening_at_warning_naming_the_circuit(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="resilient_dspy.breaker")
    plain = Pipeline(program, CircuitBreaker(1, break_duration=10, name="cb"))
    keyed = Pipeline(program, CircuitBreaker(1, break_duration=10, key=by_prefix))
    await run(plain, "fail")
    await run(keyed, "a|fail")
    await asyncio.sleep(10)
    await run(plain, "ok")
    records = [r for r in caplog.records if r.name == "resilient_dspy.breaker"]
    assert [r.levelno for r in records] == [logging.WARNING, logging.WARNING, logging.INFO, logging.INFO]
    facts = [
        ("cb:", "closed", "open", "failure_threshold"),  # an unpartitioned circuit has no key to show
        ("CircuitBreaker['a']:", "closed", "open", "failure_threshold"),
        ("cb:", "open", "half_open", "break_elapsed"),
        ("cb:", "half_open", "closed", "probes_succeeded"),
    ]
    for record, fact in zip(records, facts, strict=True):
        says(record.getMessage(), *fact)


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
