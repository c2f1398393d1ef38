"""CircuitBreaker(wait_for_half_open=True): a call that finds the circuit open waits for the break to end (bounded
by max_wait and its deadline), then competes for the probe; waiters beyond the probes wait for its outcome.

On looptime's virtual clock: every figure is an exact number of virtual seconds.
"""

from __future__ import annotations

import asyncio

import pytest

from resilient_dspy import CircuitBreaker, CircuitOpenError, Pipeline, Timeout
from resilient_dspy.errors import ConfigurationError
from resilient_dspy.events import Event
from resilient_dspy.middleware.breaker import CircuitRejected, CircuitState, CircuitWaited, CircuitWaiting
from tests.conftest import other_tasks

from .breaker_steps import program, run


def waiting_breaker(max_wait: float | None = 20.0, probes: int = 1) -> CircuitBreaker:
    return CircuitBreaker(
        1, break_duration=10.0, half_open_probes=probes, wait_for_half_open=True, max_wait=max_wait, name="cb"
    )


async def tripped(breaker: CircuitBreaker, events: list[Event] | None = None) -> Pipeline:
    pipeline = Pipeline(program, breaker, listeners=[] if events is None else [events.append])
    assert await run(pipeline, "fail") == "error"
    assert breaker.state is CircuitState.OPEN
    return pipeline


async def test_a_call_finding_the_circuit_open_waits_for_the_break_and_becomes_the_probe() -> None:
    events: list[Event] = []
    breaker = waiting_breaker()
    pipeline = await tripped(breaker, events)
    loop = asyncio.get_running_loop()
    await asyncio.sleep(4)
    started = loop.time()
    assert await run(pipeline, "ok") == "answer"
    assert loop.time() - started == pytest.approx(6.0)  # the 6 s left of the 10 s break, not a second more
    assert breaker.state is CircuitState.CLOSED
    waiting = [e for e in events if isinstance(e, CircuitWaiting)]
    waited = [e for e in events if isinstance(e, CircuitWaited)]
    assert [(e.state, e.retry_after) for e in waiting] == [(CircuitState.OPEN, pytest.approx(6.0))]
    assert [(e.waited, e.admitted) for e in waited] == [(pytest.approx(6.0), True)]


async def test_without_the_option_the_same_call_is_refused_at_once() -> None:
    breaker = CircuitBreaker(1, break_duration=10.0)
    pipeline = await tripped(breaker)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await run(pipeline, "ok") == "rejected"
    assert loop.time() == started


async def test_a_break_longer_than_max_wait_is_refused_at_once_with_the_time_left() -> None:
    events: list[Event] = []
    breaker = waiting_breaker(max_wait=3.0)
    pipeline = await tripped(breaker, events)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(CircuitOpenError) as raised:
        await pipeline("ok")
    assert loop.time() == started  # waiting 3 s could only end in the same refusal
    assert raised.value.retry_after == pytest.approx(10.0)
    assert [e.state for e in events if isinstance(e, CircuitRejected)] == [CircuitState.OPEN]
    assert not [e for e in events if isinstance(e, CircuitWaiting)]


async def test_the_deadline_bounds_the_wait_as_max_wait_does() -> None:
    breaker = waiting_breaker(max_wait=None)
    pipeline = Pipeline(program, Timeout(5.0), breaker)
    assert await run(pipeline, "fail") == "error"
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await run(pipeline, "ok") == "rejected"  # 10 s of break, 5 s of deadline: refused at once
    assert loop.time() == started
    await asyncio.sleep(7)
    assert await run(pipeline, "ok") == "answer"  # 3 s left, within the deadline: waits, then probes
    assert loop.time() - started == pytest.approx(10.0)


async def test_waiters_beyond_the_probe_wait_for_its_success_and_all_run_when_it_closes() -> None:
    breaker = waiting_breaker(max_wait=30.0)
    pipeline = await tripped(breaker)
    loop = asyncio.get_running_loop()
    started = loop.time()
    probe = asyncio.create_task(run(pipeline, "sleep:4:ok"))
    await asyncio.sleep(0)
    others = [asyncio.create_task(run(pipeline, "ok")) for _ in range(3)]
    answers = await asyncio.gather(probe, *others)
    assert answers == ["answer"] * 4
    # the break ends at 10 s; the probe (the first waiter) runs 4 s; the others run the moment it closes the circuit
    assert loop.time() - started == pytest.approx(14.0)
    assert breaker.state is CircuitState.CLOSED


async def test_waiters_are_refused_when_the_probe_fails_and_the_new_break_outlasts_their_wait() -> None:
    events: list[Event] = []
    breaker = waiting_breaker(max_wait=15.0)
    pipeline = await tripped(breaker, events)
    loop = asyncio.get_running_loop()
    started = loop.time()
    probe = asyncio.create_task(run(pipeline, "sleep:2:fail"))
    await asyncio.sleep(0)
    other = asyncio.create_task(run(pipeline, "ok"))
    assert await probe == "error"
    assert await other == "rejected"
    # refused at the re-open (12 s): the new 10 s break ends at 22 s, past its max_wait (15 s)
    assert loop.time() - started == pytest.approx(12.0)
    ended = [(e.waited, e.admitted) for e in events if isinstance(e, CircuitWaited)]
    assert ended == [(pytest.approx(10.0), True), (pytest.approx(12.0), False)]


async def test_a_waiter_whose_time_runs_out_while_the_probe_runs_is_refused_then() -> None:
    breaker = waiting_breaker(max_wait=12.0)
    pipeline = await tripped(breaker)
    loop = asyncio.get_running_loop()
    started = loop.time()
    probe = asyncio.create_task(run(pipeline, "sleep:5:ok"))
    await asyncio.sleep(0)
    assert await run(pipeline, "ok") == "rejected"
    assert loop.time() - started == pytest.approx(12.0)
    assert await probe == "answer"


async def test_a_cancelled_waiter_leaves_no_task_and_takes_no_probe() -> None:
    breaker = waiting_breaker()
    pipeline = await tripped(breaker)
    waiter = asyncio.create_task(run(pipeline, "ok"))
    await asyncio.sleep(3)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not other_tasks()
    await asyncio.sleep(7)
    assert await run(pipeline, "ok") == "answer"  # the probe permit is still there
    assert breaker.state is CircuitState.CLOSED


async def test_an_isolated_circuit_is_refused_at_once_even_when_waiting() -> None:
    breaker = waiting_breaker()
    pipeline = Pipeline(program, breaker)
    breaker.isolate()
    assert await run(pipeline, "ok") == "rejected"


async def test_a_partitioned_waiter_waits_for_its_own_key() -> None:
    breaker = CircuitBreaker(
        1, break_duration=10.0, wait_for_half_open=True, key=lambda call: call.inputs["question"].split("|")[0]
    )
    pipeline = Pipeline(program, breaker)
    assert await run(pipeline, "a|fail") == "error"
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await run(pipeline, "b|ok") == "answer"  # another key: closed, no wait
    assert loop.time() == started
    assert await run(pipeline, "a|ok") == "answer"
    assert loop.time() - started == pytest.approx(10.0)


def test_max_wait_without_waiting_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match=r"CircuitBreaker\.max_wait"):
        CircuitBreaker(max_wait=5.0)
    with pytest.raises(ConfigurationError, match=r"CircuitBreaker\.max_wait"):
        CircuitBreaker(wait_for_half_open=True, max_wait=-1.0)
