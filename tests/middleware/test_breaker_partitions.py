"""A partitioned CircuitBreaker under key churn: a circuit with calls in flight or that still protects (open, even
with its break over; a failure count) is never evicted, and memory stays bounded anyway. Virtual time (looptime).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

import dspy
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_dspy import CircuitBreaker, CircuitOpenError, Pipeline
from resilient_dspy.middleware.breaker import CircuitState
from tests.conftest import run_virtual

from .breaker_steps import CLOSED, HALF_OPEN, ISOLATED, OPEN, by_prefix, program, run, says, snap


class Tenants:
    """A program whose question is ``tenant|step``; counts the requests that reached each tenant's provider."""

    def __init__(self) -> None:
        self.reached: Counter[str] = Counter()

    async def __call__(self, question: str) -> str:
        tenant, step = question.split("|")
        self.reached[tenant] += 1
        if step.startswith("sleep:"):
            _, seconds, step = step.split(":")
            await asyncio.sleep(float(seconds))
        if step == "fail":
            raise dspy.LMServerError("503", status=503)
        return "answer"


def by_tenant(call: Any) -> str:
    return str(call.inputs["question"].split("|")[0])


async def outcome(pipeline: Pipeline, question: str) -> str:
    try:
        await pipeline(question)
    except CircuitOpenError:
        return "rejected"
    except dspy.LMError:
        return "error"
    return "ok"


async def waves_against_a_dead_tenant(
    breaker: CircuitBreaker, program: Tenants, waves: int, size: int, others: int, other_step: str
) -> list[int]:
    """Tenant A sends ``waves`` waves of ``size`` concurrent calls that fail after 1 s while ``others`` tenants make
    quick calls; returns the number of states live while each wave was in flight."""
    pipeline = Pipeline(program, breaker)
    live: list[int] = []
    other = 0
    for _ in range(waves):
        wave = [asyncio.create_task(outcome(pipeline, "A|sleep:1:fail")) for _ in range(size)]
        await asyncio.sleep(0)
        for _ in range(others // waves):
            await outcome(pipeline, f"t{other}|{other_step}")
            other += 1
        live.append(len(breaker.snapshots()))
        await asyncio.gather(*wave)
    return live


async def test_a_tenant_circuit_keeps_protecting_while_many_other_tenants_churn() -> None:
    """Issue 13 item 9: with 200 other tenants and max_keys=4, A's first wave opens its circuit and the other four
    waves are refused; before the fix 25 requests reached A's dead provider and A's circuit recorded nothing."""
    program = Tenants()
    breaker = CircuitBreaker(failure_threshold=3, key=by_tenant, max_keys=4)
    await waves_against_a_dead_tenant(breaker, program, waves=5, size=5, others=200, other_step="ok")
    assert program.reached["A"] == 5
    assert breaker.snapshot("A").state is CircuitState.OPEN
    assert len(breaker.snapshots()) <= 4
    assert breaker.health().details["evicted_protecting"] == 0


async def test_every_admitted_call_gives_its_hold_back_however_it_ends() -> None:
    """Calls that end after the circuit changed state, cancelled calls and excluded errors all release the circuit:
    once reset, A is an ordinary harmless circuit that churn evicts (a leaked in-flight count would pin it)."""
    program = Tenants()
    breaker = CircuitBreaker(failure_threshold=2, key=by_tenant, max_keys=2, exclude=dspy.LMServerError)
    pipeline = Pipeline(program, breaker)
    cancelled = asyncio.create_task(outcome(pipeline, "A|sleep:5:ok"))
    excluded = asyncio.create_task(outcome(pipeline, "A|sleep:1:fail"))
    await asyncio.sleep(0)
    breaker.isolate("A")  # the two calls now end in another era
    await asyncio.sleep(2)
    cancelled.cancel()
    await asyncio.gather(cancelled, excluded, return_exceptions=True)
    breaker.reset("A")
    for index in range(3):
        await outcome(pipeline, f"t{index}|ok")
    assert "A" not in breaker.snapshots()


@settings(max_examples=40, deadline=None)
@given(
    max_keys=st.integers(2, 6),  # A and the tenant being served: with max_keys=1 the bound evicts A on purpose
    threshold=st.integers(1, 5),
    size=st.integers(1, 6),
    waves=st.integers(1, 5),
    others=st.integers(0, 60),
)
def test_property_a_circuit_with_calls_in_flight_or_open_is_never_evicted_by_churn(
    max_keys: int, threshold: int, size: int, waves: int, others: int
) -> None:
    """Whatever the churn of healthy tenants: A's provider sees only its first wave (then the circuit is open,
    and stays open: it is never evicted), and the live states never exceed max_keys plus A's in-flight circuit."""
    program = Tenants()
    breaker = CircuitBreaker(failure_threshold=threshold, key=by_tenant, max_keys=max_keys)

    async def scenario() -> None:
        live = await waves_against_a_dead_tenant(breaker, program, waves, size, others, "ok")
        assert all(count <= max_keys + 1 for count in live), live
        assert len(breaker.snapshots()) <= max_keys + 1  # the last wave may have ended after the last lookup

    run_virtual(scenario)
    if size >= threshold:
        assert program.reached["A"] == size
        assert breaker.snapshot("A").state is CircuitState.OPEN
    else:  # never enough failures in one wave: A keeps its count across waves, as if alone
        assert breaker.snapshot("A").state is (CircuitState.OPEN if size * waves >= threshold else CircuitState.CLOSED)
        assert program.reached["A"] == min(size * waves, size * -(-threshold // size))


async def test_two_thousand_tenants_that_failed_once_stay_bounded_and_health_says_so() -> None:
    """Memory stays bounded when every key still protects: the oldest protective circuits go, counted, and the
    layer reports degraded until idle_after has passed without another such eviction."""
    program = Tenants()
    breaker = CircuitBreaker(failure_threshold=3, key=by_tenant, max_keys=16, idle_after=600)
    pipeline = Pipeline(program, breaker)
    for index in range(2000):
        assert await outcome(pipeline, f"t{index}|fail") == "error"
    assert len(breaker.snapshots()) == 16
    health = breaker.health()
    assert health.status == "degraded" and health.details["evicted_protecting"] == 2000 - 16
    await asyncio.sleep(600)
    assert breaker.health().status == "ok"


async def test_an_open_circuit_whose_break_is_over_is_not_evicted_the_next_calls_get_one_probe() -> None:
    """Issue 13 item 5: open, its break over, unused past idle_after and others churning, the circuit stays; the
    next burst is one probe and refusals, not a fresh closed circuit letting the burst through."""
    program = Tenants()
    breaker = CircuitBreaker(1, break_duration=10, key=by_tenant, max_keys=4, idle_after=5)
    pipeline = Pipeline(program, breaker)
    assert await outcome(pipeline, "A|fail") == "error"
    await asyncio.sleep(700)
    for index in range(20):
        await outcome(pipeline, f"t{index}|ok")
    burst = await asyncio.gather(*(outcome(pipeline, "A|sleep:1:fail") for _ in range(5)))
    assert sorted(burst) == ["error", "rejected", "rejected", "rejected", "rejected"]
    assert program.reached["A"] == 2


async def test_a_grown_break_survives_idle_after() -> None:
    """Issue 13 item 5: the growing break of a circuit that re-opened is not forgotten while it waits."""
    program = Tenants()
    breaker = CircuitBreaker(1, break_duration=10, break_multiplier=2, key=by_tenant, idle_after=5)
    pipeline = Pipeline(program, breaker)
    await outcome(pipeline, "A|fail")
    await asyncio.sleep(10)
    await outcome(pipeline, "A|fail")  # the probe fails: break 20
    await asyncio.sleep(700)
    for index in range(10):
        await outcome(pipeline, f"t{index}|ok")
    assert breaker.snapshot("A").break_duration == 20
    await outcome(pipeline, "A|fail")  # the probe fails again: 40
    assert breaker.snapshot("A").break_duration == 40


# ------------------------------------------------------------------------------------------- eviction, exactly


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
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    says(record.getMessage(), "cb['a']", "closed", "max_keys=1")


async def test_health_is_degraded_for_idle_after_seconds_after_a_protecting_circuit_is_evicted() -> None:
    breaker = CircuitBreaker(2, key=by_prefix, max_keys=1, idle_after=600)
    pipeline = Pipeline(program, breaker)
    await asyncio.sleep(400)
    await run(pipeline, "a|fail")
    await run(pipeline, "b|ok")  # a still protects (a failure count): evicted beyond max_keys, counted
    assert breaker.health().status == "degraded" and breaker.health().details["evicted_protecting"] == 1
    await asyncio.sleep(599)
    assert breaker.health().status == "degraded"
    await asyncio.sleep(1)
    assert breaker.health().status == "ok"
