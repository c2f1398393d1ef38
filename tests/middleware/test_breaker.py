"""CircuitBreaker: scenario tables per mode, half-open probing under concurrency, neutrality, manual control,
partitioning, events, validation, and a hypothesis state machine against a simple model.

Async tests run on looptime's virtual loop clock (``--looptime``), so ``asyncio.sleep(10)`` advances time by
exactly 10 s at no cost.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import dspy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from resilient_dspy import (
    CircuitBreaker,
    CircuitOpenError,
    Fallback,
    Pipeline,
    RetriesExhaustedError,
    Retry,
    Static,
    Timeout,
)
from resilient_dspy.errors import ConfigurationError
from resilient_dspy.events import Event
from resilient_dspy.middleware._shared.partitions import by_model
from resilient_dspy.middleware.breaker import CircuitRejected, CircuitState, CircuitStateChanged
from resilient_dspy.testing import FaultInjectingLM
from resilient_dspy.testing import ManualClock as SteppedClock
from tests.conftest import other_tasks

from .breaker_steps import by_prefix, program, run, says, snap, transitions

CLOSED, OPEN, HALF_OPEN, ISOLATED = (
    CircuitState.CLOSED,
    CircuitState.OPEN,
    CircuitState.HALF_OPEN,
    CircuitState.ISOLATED,
)


def server_error() -> Exception:
    return dspy.LMServerError("injected 503", status=503)


class Scripted:
    """An async program whose next behaviour is set per step; counts the calls that actually ran."""

    def __init__(self) -> None:
        self.calls = 0
        self.action: Any = "ok"

    async def __call__(self, question: str) -> str:
        self.calls += 1
        action = self.action
        if isinstance(action, BaseException):
            raise action
        if isinstance(action, tuple):  # ("slow", seconds)
            await asyncio.sleep(action[1])
        return "answer"


def step_action(step: str) -> Any:
    if step == "ok":
        return "ok"
    if step == "fail":
        return server_error()
    if step == "excl":
        return dspy.LMInvalidRequestError("bad request", status=400)  # a client error: neutral by default
    if step.startswith("slow"):
        return ("slow", float(step.split(":")[1]))
    if step.startswith("rl"):  # a rate limit carrying Retry-After
        return dspy.LMRateLimitError("429", status=429, retry_after=float(step.split(":")[1]))
    raise AssertionError(step)


async def run_step(pipeline: Pipeline, program: Scripted, step: str) -> tuple[bool, str]:
    """Run one scripted step; returns (the program ran, 'ok' | 'error' | 'rejected' | 'cancelled')."""
    if step.startswith("adv:"):
        await asyncio.sleep(float(step.split(":")[1]))
        return False, "-"
    before = program.calls
    if step == "cancel":
        program.action = ("slow", 100.0)
        task = asyncio.create_task(pipeline("q"))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return program.calls > before, "cancelled"
    program.action = step_action(step)
    try:
        await pipeline("q")
    except CircuitOpenError:
        return program.calls > before, "rejected"
    except Exception:
        return program.calls > before, "error"
    return program.calls > before, "ok"


# Each scenario: breaker options, then steps as (step, expected state after, expected outcome).
# "ok"/"fail"/"excl"/"cancel"/"slow:S"/"rl:S" run a call; "adv:S" advances virtual time by S seconds.
SCENARIOS: dict[str, tuple[dict[str, Any], list[tuple[str, CircuitState, str]]]] = {
    "consecutive: a success resets the count, the third failure opens": (
        {"failure_threshold": 3, "break_duration": 10},
        [
            ("fail", CLOSED, "error"),
            ("fail", CLOSED, "error"),
            ("ok", CLOSED, "ok"),
            ("fail", CLOSED, "error"),
            ("fail", CLOSED, "error"),
            ("fail", OPEN, "error"),
            ("ok", OPEN, "rejected"),
            ("adv:9.9", OPEN, "-"),
            ("ok", OPEN, "rejected"),
            ("adv:0.1", OPEN, "-"),
            ("ok", CLOSED, "ok"),
            ("fail", CLOSED, "error"),
        ],
    ),
    "consecutive: a failed probe re-opens and restarts the timer": (
        {"failure_threshold": 1, "break_duration": 10},
        [
            ("fail", OPEN, "error"),
            ("adv:10", OPEN, "-"),
            ("fail", OPEN, "error"),
            ("adv:9", OPEN, "-"),
            ("ok", OPEN, "rejected"),
            ("adv:1", OPEN, "-"),
            ("ok", CLOSED, "ok"),
        ],
    ),
    "consecutive: excluded errors and cancellations are neutral, neither reset nor count": (
        {"failure_threshold": 3, "break_duration": 10},
        [
            ("fail", CLOSED, "error"),
            ("excl", CLOSED, "error"),
            ("fail", CLOSED, "error"),
            ("cancel", CLOSED, "cancelled"),
            ("excl", CLOSED, "error"),
            ("fail", OPEN, "error"),
        ],
    ),
    "half-open: an excluded error or a cancelled probe gives the permit back": (
        {"failure_threshold": 1, "break_duration": 10},
        [
            ("fail", OPEN, "error"),
            ("adv:10", OPEN, "-"),
            ("cancel", HALF_OPEN, "cancelled"),
            ("excl", HALF_OPEN, "error"),
            ("ok", CLOSED, "ok"),
        ],
    ),
    "count window: opens when the failure share of the last N calls reaches the rate": (
        {"failure_rate": 0.5, "window": 4, "min_calls": 4, "break_duration": 5},
        [
            ("ok", CLOSED, "ok"),
            ("fail", CLOSED, "error"),
            ("ok", CLOSED, "ok"),
            ("ok", CLOSED, "ok"),
            ("ok", CLOSED, "ok"),  # the failure slides out: [fail ok ok ok] -> [ok ok ok ok]
            ("ok", CLOSED, "ok"),
            ("fail", CLOSED, "error"),  # 1 of 4
            ("fail", OPEN, "error"),  # 2 of 4 = 0.5
            ("ok", OPEN, "rejected"),
        ],
    ),
    "count window: a success that brings the window to min_calls evaluates the rate": (
        {"failure_rate": 0.5, "window": 5, "min_calls": 5, "break_duration": 5},
        [
            ("fail", CLOSED, "error"),
            ("fail", CLOSED, "error"),
            ("fail", CLOSED, "error"),
            ("ok", CLOSED, "ok"),
            ("ok", OPEN, "ok"),  # 3 of 5 = 0.6 once min_calls is reached, on a success
            ("ok", OPEN, "rejected"),
        ],
    ),
    "time window: a success that brings the window to min_calls evaluates the rate": (
        {"failure_rate": 0.5, "window_seconds": 60, "min_calls": 5, "break_duration": 5},
        [
            ("fail", CLOSED, "error"),
            ("fail", CLOSED, "error"),
            ("fail", CLOSED, "error"),
            ("ok", CLOSED, "ok"),
            ("ok", OPEN, "ok"),
            ("ok", OPEN, "rejected"),
        ],
    ),
    "slow calls: a fast success that brings the window to min_calls evaluates the slow-call rate": (
        {"slow_call_rate": 0.5, "slow_call_duration": 2.0, "window": 4, "min_calls": 4, "break_duration": 5},
        [
            ("slow:3", CLOSED, "ok"),
            ("slow:3", CLOSED, "ok"),
            ("ok", CLOSED, "ok"),
            ("ok", OPEN, "ok"),  # 2 of 4 slow
        ],
    ),
    "count window: below min_calls nothing opens": (
        {"failure_rate": 0.5, "window": 10, "min_calls": 3, "break_duration": 5},
        [
            ("fail", CLOSED, "error"),
            ("fail", CLOSED, "error"),
            ("fail", OPEN, "error"),
        ],
    ),
    "count window: old outcomes slide out": (
        {"failure_rate": 1.0, "window": 2, "min_calls": 2, "break_duration": 5},
        [
            ("fail", CLOSED, "error"),
            ("ok", CLOSED, "ok"),  # 1 of 2
            ("fail", CLOSED, "error"),  # [ok fail]: the first failure slid out
            ("fail", OPEN, "error"),  # [fail fail]
        ],
    ),
    "time window: failures older than the window no longer count": (
        {"failure_rate": 0.6, "window_seconds": 10, "buckets": 10, "min_calls": 2, "break_duration": 5},
        [
            ("fail", CLOSED, "error"),
            ("adv:11", CLOSED, "-"),
            ("ok", CLOSED, "ok"),
            ("fail", CLOSED, "error"),  # 1 of 2 in the window: 0.5 < 0.6
            ("fail", OPEN, "error"),  # 2 of 3
        ],
    ),
    "time window: failures inside the window add up": (
        {"failure_rate": 0.5, "window_seconds": 10, "buckets": 5, "min_calls": 3, "break_duration": 5},
        [
            ("fail", CLOSED, "error"),
            ("adv:4", CLOSED, "-"),
            ("ok", CLOSED, "ok"),
            ("adv:4", CLOSED, "-"),
            ("fail", OPEN, "error"),
        ],
    ),
    "slow calls: a success that is slow counts toward the slow-call rate; the tripping call still answers": (
        {"slow_call_rate": 0.5, "slow_call_duration": 2.0, "window": 4, "min_calls": 2, "break_duration": 5},
        [
            ("slow:1", CLOSED, "ok"),  # under slow_call_duration: not slow
            ("slow:3", OPEN, "ok"),  # 1 of 2 slow
            ("ok", OPEN, "rejected"),
            ("adv:5", OPEN, "-"),
            ("slow:3", OPEN, "ok"),  # a slow probe re-opens
            ("adv:5", OPEN, "-"),
            ("ok", CLOSED, "ok"),
        ],
    ),
    "retry-after: the tripping error's Retry-After lengthens the break": (
        {"failure_threshold": 1, "break_duration": 5},
        [
            ("rl:20", OPEN, "error"),
            ("adv:6", OPEN, "-"),
            ("ok", OPEN, "rejected"),
            ("adv:14", OPEN, "-"),
            ("ok", CLOSED, "ok"),
        ],
    ),
    "growing break: each re-open doubles the break up to the cap; closing resets it": (
        {"failure_threshold": 1, "break_duration": 10, "break_multiplier": 2, "max_break_duration": 30},
        [
            ("fail", OPEN, "error"),
            ("adv:10", OPEN, "-"),
            ("fail", OPEN, "error"),  # break is now 20
            ("adv:19", OPEN, "-"),
            ("ok", OPEN, "rejected"),
            ("adv:1", OPEN, "-"),
            ("fail", OPEN, "error"),  # 40, capped to 30
            ("adv:29", OPEN, "-"),
            ("ok", OPEN, "rejected"),
            ("adv:1", OPEN, "-"),
            ("ok", CLOSED, "ok"),
            ("fail", OPEN, "error"),  # back to 10
            ("adv:10", OPEN, "-"),
            ("ok", CLOSED, "ok"),
        ],
    ),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_scenario(name: str) -> None:
    """Each step leaves the expected state, runs the program or not, and surfaces the expected outcome."""
    options, steps = SCENARIOS[name]
    breaker = CircuitBreaker(**options)
    program = Scripted()
    pipeline = Pipeline(program, breaker)
    for index, (step, state, outcome) in enumerate(steps):
        ran, got = await run_step(pipeline, program, step)
        where = f"step {index} ({step})"
        assert got == outcome, where
        assert ran == (outcome in ("ok", "error", "cancelled")), where
        assert breaker.state is state, where


@settings(max_examples=150, deadline=None)
@given(
    window=st.integers(1, 8),
    min_share=st.floats(0.0, 1.0),
    failure_rate=st.sampled_from([0.25, 0.5, 0.6, 1.0]),
    slow_call_rate=st.sampled_from([0.3, 0.5, 1.0]),
    outcomes=st.lists(st.sampled_from(["ok", "fail", "slow", "slow_fail"]), max_size=30),
)
def test_property_a_count_window_opens_at_every_outcome_that_crosses_a_rate_once_min_calls_are_seen(
    window: int, min_share: float, failure_rate: float, slow_call_rate: float, outcomes: list[str]
) -> None:
    """Every recorded outcome (success or failure, fast or slow) re-evaluates both rates once the window holds
    ``min_calls``: the circuit opens exactly at the first outcome where a reference sliding list crosses one."""
    min_calls = 1 + round(min_share * (window - 1))
    clock = SteppedClock()
    breaker = CircuitBreaker(
        failure_rate=failure_rate,
        slow_call_rate=slow_call_rate,
        slow_call_duration=1.0,
        window=window,
        min_calls=min_calls,
    )

    async def program(question: str) -> str:
        if question.startswith("slow"):
            clock.advance(2.0)
        if question.endswith("fail"):
            raise server_error()
        return "answer"

    async def scenario() -> None:
        pipeline = Pipeline(program, breaker, clock=clock)
        recent: list[str] = []
        for outcome in outcomes:
            with contextlib.suppress(dspy.LMServerError):
                await pipeline(outcome)
            recent = [*recent, outcome][-window:]
            fails = sum(o.endswith("fail") for o in recent)
            slows = sum(o.startswith("slow") for o in recent)
            crossed = len(recent) >= min_calls and (
                fails >= failure_rate * len(recent) or slows >= slow_call_rate * len(recent)
            )
            assert breaker.state is (OPEN if crossed else CLOSED), (outcome, recent)
            if crossed:
                return

    with asyncio.Runner() as runner:
        runner.run(scenario())


@settings(max_examples=100, deadline=None)
@given(
    retry_after=st.one_of(st.floats(0.0, 1e300), st.sampled_from([1e12, 3600.0, 3600.5, 7200.0])),
    break_duration=st.sampled_from([0.5, 10.0, 30.0, 5000.0]),
    cap=st.one_of(st.none(), st.sampled_from([1.0, 60.0, 86400.0])),
    reopen=st.booleans(),
)
def test_property_a_retry_after_driven_break_never_exceeds_the_cap(
    retry_after: float, break_duration: float, cap: float | None, reopen: bool
) -> None:
    """A trip's break is at least ``break_duration`` and at least the error's Retry-After, but never longer than
    ``max_break_duration`` when set, else than max(break_duration, 3600 s): a huge Retry-After cannot open a
    circuit for centuries."""
    if cap is not None and cap < break_duration:
        cap = break_duration
    clock = SteppedClock()
    events: list[Event] = []
    breaker = CircuitBreaker(1, break_duration=break_duration, max_break_duration=cap)
    limit = cap if cap is not None else max(break_duration, 3600.0)

    async def program(question: str) -> str:
        raise dspy.LMRateLimitError("429", status=429, retry_after=retry_after)

    pipeline = Pipeline(program, breaker, clock=clock, listeners=[events.append])

    async def scenario() -> None:
        with contextlib.suppress(dspy.LMRateLimitError):
            await pipeline("q")
        if reopen:  # a failing probe opens it again with the same Retry-After
            clock.advance(breaker.snapshot().retry_after or 0.0)
            with contextlib.suppress(dspy.LMRateLimitError):
                await pipeline("q")

    with asyncio.Runner() as runner:
        runner.run(scenario())
    opened = [e.retry_after for e in events if isinstance(e, CircuitStateChanged) and e.new is OPEN]
    assert len(opened) == 1 + reopen
    for duration in opened:
        assert duration is not None
        assert min(max(break_duration, retry_after), limit) <= duration <= limit
    assert breaker.state is OPEN and 0 < (breaker.snapshot().retry_after or 0) <= limit


async def test_a_huge_retry_after_opens_only_until_max_break_duration() -> None:
    breaker = CircuitBreaker(1, break_duration=10, max_break_duration=60)
    program = Scripted()
    pipeline = Pipeline(program, breaker)
    assert await run_step(pipeline, program, "rl:1e12") == (True, "error")
    await asyncio.sleep(59.9)
    assert await run_step(pipeline, program, "ok") == (False, "rejected")
    await asyncio.sleep(0.1)
    assert await run_step(pipeline, program, "ok") == (True, "ok")
    assert breaker.state is CLOSED


async def test_rejection_carries_the_time_left_and_does_not_run_the_program() -> None:
    program = Scripted()
    pipeline = Pipeline(program, CircuitBreaker(1, break_duration=30))
    program.action = server_error()
    with pytest.raises(dspy.LMServerError):
        await pipeline("q")
    await asyncio.sleep(12)
    with pytest.raises(CircuitOpenError) as caught:
        await pipeline("q")
    assert caught.value.retry_after == pytest.approx(18)
    assert program.calls == 1


async def test_the_tripping_call_raises_its_own_error() -> None:
    error = server_error()
    program = Scripted()
    program.action = error
    pipeline = Pipeline(program, CircuitBreaker(1))
    with pytest.raises(dspy.LMServerError) as caught:
        await pipeline("q")
    assert caught.value is error


# ------------------------------------------------------------------------------------------- half-open


class Gate:
    """A program that blocks every call until released; records concurrency."""

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0
        self.calls = 0
        self.release = asyncio.Event()
        self.fail_next = False
        self.outcomes: list[BaseException | None] = []

    async def __call__(self, question: str) -> str:
        self.calls += 1
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        if self.outcomes:
            outcome = self.outcomes.pop(0)
            if outcome is not None:
                raise outcome
        return "answer"


async def trip(breaker: CircuitBreaker) -> None:
    pipeline = Pipeline(Scripted(), breaker)
    pipeline.target.function.action = server_error()  # type: ignore[attr-defined]
    while breaker.state is not OPEN:
        with pytest.raises(dspy.LMServerError):
            await pipeline("q")


@pytest.mark.parametrize("probes", [1, 3])
async def test_half_open_admits_at_most_the_probe_limit_under_concurrency(probes: int) -> None:
    breaker = CircuitBreaker(1, break_duration=10, half_open_probes=probes)
    await trip(breaker)
    await asyncio.sleep(10)
    gate = Gate()
    pipeline = Pipeline(gate, breaker)
    tasks = [asyncio.create_task(pipeline("q")) for _ in range(20)]
    await asyncio.sleep(0.01)
    rejected = [t for t in tasks if t.done()]
    assert len(rejected) == 20 - probes
    assert all(isinstance(t.exception(), CircuitOpenError) for t in rejected)
    assert gate.peak == probes and breaker.state is HALF_OPEN
    gate.release.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert breaker.state is CLOSED
    assert gate.calls == probes


async def test_half_open_with_several_probes_any_failure_reopens() -> None:
    breaker = CircuitBreaker(1, break_duration=10, half_open_probes=3)
    await trip(breaker)
    await asyncio.sleep(10)
    gate = Gate()
    gate.outcomes = [None, server_error(), None]
    pipeline = Pipeline(gate, breaker)
    tasks = [asyncio.create_task(pipeline("q")) for _ in range(3)]
    await asyncio.sleep(0.01)
    gate.release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert sum(isinstance(r, dspy.LMServerError) for r in results) == 1
    assert breaker.state is OPEN


async def test_a_finished_probe_still_uses_its_permit_until_the_circuit_decides() -> None:
    """With 2 probes: one succeeded + one out = no third probe; the second's success closes the circuit."""
    breaker = CircuitBreaker(1, break_duration=10, half_open_probes=2)
    await trip(breaker)
    await asyncio.sleep(10)
    quick = Pipeline(Scripted(), breaker)
    gate = Gate()
    out = asyncio.create_task(Pipeline(gate, breaker)("q"))
    await asyncio.sleep(0.01)
    assert await quick("q") == "answer"
    assert breaker.snapshot().probes_succeeded == 1
    with pytest.raises(CircuitOpenError):
        await quick("q")
    gate.release.set()
    await out
    assert breaker.state is CLOSED


async def test_a_probe_is_reclaimed_exactly_one_break_after_it_started() -> None:
    breaker = CircuitBreaker(1, break_duration=10)
    await trip(breaker)
    await asyncio.sleep(10)
    gate = Gate()
    hung = asyncio.create_task(Pipeline(gate, breaker)("q"))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    quick = Pipeline(Scripted(), breaker)
    await asyncio.sleep(9.999)
    with pytest.raises(CircuitOpenError):
        await quick("q")
    await asyncio.sleep(0.001)
    assert await quick("q") == "answer"
    hung.cancel()
    await asyncio.gather(hung, return_exceptions=True)


async def test_a_hung_probe_is_replaced_one_break_later_and_its_late_outcome_is_ignored() -> None:
    breaker = CircuitBreaker(1, break_duration=10)
    await trip(breaker)
    await asyncio.sleep(10)
    gate = Gate()
    gate.outcomes = [server_error()]
    hung = asyncio.create_task(Pipeline(gate, breaker)("q"))
    await asyncio.sleep(0.01)
    assert breaker.state is HALF_OPEN
    quick = Scripted()
    pipeline = Pipeline(quick, breaker)
    with pytest.raises(CircuitOpenError) as caught:
        await pipeline("q")
    assert caught.value.retry_after == pytest.approx(10 - 0.01)
    await asyncio.sleep(10)
    assert await pipeline("q") == "answer"
    assert breaker.state is CLOSED
    gate.release.set()
    with pytest.raises(dspy.LMServerError):
        await hung
    assert breaker.state is CLOSED


async def test_calls_started_before_the_circuit_opened_do_not_count_after() -> None:
    """A slow call from the closed era that fails after the circuit opened must not touch the new state."""
    breaker = CircuitBreaker(2, break_duration=10)
    gate = Gate()
    gate.outcomes = [server_error()]
    straggler = asyncio.create_task(Pipeline(gate, breaker)("q"))
    await asyncio.sleep(0.01)
    await trip(breaker)
    await asyncio.sleep(10)
    quick = Pipeline(Scripted(), breaker)
    assert await quick("q") == "answer"
    gate.release.set()
    with pytest.raises(dspy.LMServerError):
        await straggler
    assert breaker.state is CLOSED and breaker.snapshot().consecutive_failures == 0


# ------------------------------------------------------------------------------------------- half-open, exactly


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
    says(caught.value, "half-open")
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


async def test_a_rejection_names_the_circuit_and_its_state() -> None:
    breaker = CircuitBreaker(1, break_duration=10, key=by_prefix)
    pipeline = Pipeline(program, breaker)
    await run(pipeline, "a|fail")
    with pytest.raises(CircuitOpenError) as caught:
        await pipeline("a|ok")
    says(caught.value, "'a'", "open")
    assert caught.value.retry_after == 10.0
    breaker.isolate("b")
    with pytest.raises(CircuitOpenError) as caught:
        await pipeline("b|ok")
    says(caught.value, "'b'", "isolated")
    assert caught.value.retry_after is None


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


# ------------------------------------------------------------------------------------------- classification


@pytest.mark.parametrize(
    ("error", "counts"),
    [
        (server_error(), True),
        (dspy.LMRateLimitError("429", status=429), True),
        (dspy.LMTimeoutError("t"), True),
        (TimeoutError(), True),
        (ConnectionError(), True),
        (RuntimeError("a bug"), True),
        (dspy.LMAuthError("401", status=401), False),
        (dspy.LMInvalidRequestError("400", status=400), False),
        (CircuitOpenError("inner"), False),
    ],
)
async def test_default_classification_of_failures(error: Exception, counts: bool) -> None:
    breaker = CircuitBreaker(1)
    assert (breaker.counts_as_failure(error) is True) is counts


async def test_failure_on_and_exclude() -> None:
    breaker = CircuitBreaker(1, failure_on=ValueError, exclude=[KeyError])
    assert breaker.counts_as_failure(ValueError()) is True
    assert breaker.counts_as_failure(server_error()) is None
    breaker = CircuitBreaker(1, exclude=lambda e: "ignore" in str(e))
    assert breaker.counts_as_failure(RuntimeError("ignore me")) is None
    assert breaker.counts_as_failure(RuntimeError("count me")) is True


async def test_breaker_outside_retry_sees_one_failure_per_exhausted_call() -> None:
    program = Scripted()
    program.action = server_error()
    breaker = CircuitBreaker(2, break_duration=10)
    pipeline = Pipeline(program, breaker, Retry(3, base_delay=0, jitter="none", budget=None))
    with pytest.raises(RetriesExhaustedError):
        await pipeline("q")
    assert breaker.state is CLOSED and program.calls == 3
    with pytest.raises(RetriesExhaustedError):
        await pipeline("q")
    assert breaker.state is OPEN
    with pytest.raises(CircuitOpenError):
        await pipeline("q")
    assert program.calls == 6


async def test_retry_does_not_retry_an_open_circuit_and_fallback_answers() -> None:
    program = Scripted()
    program.action = server_error()
    breaker = CircuitBreaker(1, break_duration=60)
    pipeline = Pipeline(
        program, Fallback(Static(answer="later")), Timeout(30), Retry(5, base_delay=0.1, budget=None), breaker
    )
    outcome = await pipeline.invoke("q")
    assert outcome.value.answer == "later" and program.calls == 1


# ------------------------------------------------------------------------------------------- manual, snapshot, events


async def test_isolate_rejects_until_reset() -> None:
    program = Scripted()
    breaker = CircuitBreaker(3)
    pipeline = Pipeline(program, breaker)
    breaker.isolate()
    await asyncio.sleep(3600)
    with pytest.raises(CircuitOpenError) as caught:
        await pipeline("q")
    assert caught.value.retry_after is None and program.calls == 0
    assert breaker.state is ISOLATED
    breaker.reset()
    assert await pipeline("q") == "answer"


async def test_snapshot_reports_counts_and_time_left() -> None:
    program = Scripted()
    breaker = CircuitBreaker(failure_rate=0.5, window=10, min_calls=4, break_duration=20)
    pipeline = Pipeline(program, breaker)
    for step in ("ok", "fail", "ok"):
        await run_step(pipeline, program, step)
    snap = breaker.snapshot()
    assert (snap.state, snap.calls, snap.failures) == (CLOSED, 3, 1)
    assert snap.failure_rate == pytest.approx(1 / 3)
    await run_step(pipeline, program, "fail")
    await asyncio.sleep(5)
    snap = breaker.snapshot()
    assert snap.state is OPEN and snap.retry_after == pytest.approx(15)


async def test_transition_and_rejection_events_in_order() -> None:
    events: list[Event] = []
    program = Scripted()
    breaker = CircuitBreaker(1, break_duration=10, name="llm-breaker")
    pipeline = Pipeline(program, breaker, listeners=[events.append])
    for step in ("fail", "ok", "adv:10", "ok"):
        await run_step(pipeline, program, step)
    breaker.isolate()
    summary = [
        (type(e).__name__, getattr(e, "old", None), getattr(e, "new", getattr(e, "state", None)), e.layer)
        for e in events
    ]
    assert summary == [
        ("CircuitStateChanged", CLOSED, OPEN, "llm-breaker"),
        ("CircuitRejected", None, OPEN, "llm-breaker"),
        ("CircuitStateChanged", OPEN, HALF_OPEN, "llm-breaker"),
        ("CircuitStateChanged", HALF_OPEN, CLOSED, "llm-breaker"),
        ("CircuitStateChanged", CLOSED, ISOLATED, "llm-breaker"),
    ]
    opened = events[0]
    assert isinstance(opened, CircuitStateChanged)
    assert (opened.reason, opened.retry_after) == ("failure_threshold", 10)
    rejected = events[1]
    assert isinstance(rejected, CircuitRejected) and rejected.retry_after == pytest.approx(10)


# ------------------------------------------------------------------------------------------- partitions


async def test_circuits_per_model_are_independent() -> None:
    bad = FaultInjectingLM(model="bad")
    good = FaultInjectingLM(model="good")
    bad.push(*["server_error"] * 5)
    breaker = CircuitBreaker(2, break_duration=60, key=by_model)
    pipeline = Pipeline(dspy.Predict("question -> answer"), breaker)
    with dspy.context(lm=bad):
        for _ in range(2):
            with pytest.raises(dspy.LMServerError):
                await pipeline("q")
        with pytest.raises(CircuitOpenError):
            await pipeline("q")
    with dspy.context(lm=good):
        assert (await pipeline("q")).answer
    assert breaker.snapshot("custom/bad").state is OPEN
    assert breaker.snapshot("custom/good").state is CLOSED
    assert set(breaker.snapshots()) == {"custom/bad", "custom/good"}
    breaker.reset("custom/bad")
    assert breaker.snapshot("custom/bad").state is CLOSED


async def test_idle_keys_are_evicted_but_open_ones_are_kept() -> None:
    program = Scripted()
    breaker = CircuitBreaker(1, break_duration=1000, key=lambda call: call.inputs["question"], max_keys=3)
    pipeline = Pipeline(program, breaker)
    program.action = server_error()
    with pytest.raises(dspy.LMServerError):
        await pipeline("down")
    program.action = "ok"
    for index in range(50):
        await pipeline(f"q{index}")
    live = breaker.snapshots()
    assert len(live) <= 3
    assert live["down"].state is OPEN


# ------------------------------------------------------------------------------------------- no orphans, cancellation


async def test_cancelling_the_caller_leaves_no_task_and_does_not_count() -> None:
    breaker = CircuitBreaker(1)
    gate = Gate()
    task = asyncio.create_task(Pipeline(gate, breaker)("q"))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.state is CLOSED and not other_tasks()


# ------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("options", "field", "rule"),
    [
        ({"failure_rate": 0}, "CircuitBreaker.failure_rate", "greater than 0"),
        ({"failure_rate": 1.5}, "CircuitBreaker.failure_rate", "less than or equal to 1"),
        ({"failure_rate": 0.5, "window": 0}, "CircuitBreaker.window", "greater than or equal to 1"),
        ({"failure_rate": 0.5, "window_seconds": -1}, "CircuitBreaker.window_seconds", "greater than 0"),
        ({"half_open_probes": 0}, "CircuitBreaker.half_open_probes", "greater than or equal to 1"),
        ({"failure_threshold": 0}, "CircuitBreaker.failure_threshold", "greater than or equal to 1"),
        ({"break_duration": 0}, "CircuitBreaker.break_duration", "greater than 0"),
        ({"failure_rate": 0.5, "window": 5, "min_calls": 6}, "CircuitBreaker.min_calls", "must be <= window (5)"),
        ({"failure_threshold": 3, "failure_rate": 0.5}, "CircuitBreaker.failure_threshold", "not both"),
        ({"slow_call_rate": 0.5}, "CircuitBreaker.slow_call_duration", "slow_call_rate and slow_call_duration go"),
        ({"window": 10}, "CircuitBreaker.window", "needs failure_rate or slow_call_rate"),
        ({"exclude": 42}, "CircuitBreaker.exclude", "exception types or a predicate"),
        ({"break_duration": 10, "max_break_duration": 5}, "CircuitBreaker.max_break_duration", "must be >= break"),
    ],
)
def test_bad_options_name_the_field_and_the_rule(options: dict[str, Any], field: str, rule: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        CircuitBreaker(**options)
    assert any(f == field and rule in r for f, r in caught.value.problems), caught.value.problems


def test_several_bad_options_are_reported_at_once() -> None:
    with pytest.raises(ConfigurationError) as caught:
        CircuitBreaker(failure_threshold=0, half_open_probes=0, break_duration=-1)
    assert len(caught.value.problems) == 3


def predicate_failure(error: BaseException) -> bool:
    return "boom" in str(error)


@pytest.mark.parametrize(
    ("value", "shown"),
    [([], "[]"), ([int], "[<class 'int'>]"), ((ValueError, int), "(<class 'ValueError'>, <class 'int'>)"), (42, "42")],
)
@pytest.mark.parametrize("field", ["exclude", "failure_on"])
def test_a_bad_error_filter_is_one_problem_showing_the_value(field: str, value: Any, shown: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        CircuitBreaker(**{field: value})
    [(name, rule)] = caught.value.problems
    assert name == f"CircuitBreaker.{field}" and shown in rule and "exception types" in rule


def test_good_error_filters_are_normalised_to_tuples_or_kept_callable() -> None:
    breaker = CircuitBreaker(exclude=KeyError, failure_on=[ValueError, OSError])
    assert breaker.options.exclude == (KeyError,) and breaker.options.failure_on == (ValueError, OSError)
    assert CircuitBreaker(failure_on=predicate_failure).options.failure_on is predicate_failure


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


def test_describe() -> None:
    described = Pipeline(Scripted(), CircuitBreaker(failure_rate=0.5, window_seconds=30)).describe()[0]
    assert described["layer"] == "CircuitBreaker"
    assert described["options"]["mode"] == "rate" and described["options"]["window_seconds"] == 30


# ------------------------------------------------------------------------------------------- model-based


class ManualClock:
    """A clock moved only by the test: the state machine drives time itself."""

    def __init__(self) -> None:
        self.time = 1000.0

    def now(self) -> float:
        return self.time

    async def sleep(self, seconds: float) -> None:
        self.time += seconds

    def deadline(self, when: float) -> Any:
        return asyncio.timeout_at(None)


@dataclass
class ModelProbe:
    started: float


class BreakerModel:
    """The consecutive-failure breaker written the obvious way: the specification the real one must match."""

    def __init__(self, threshold: int, brk: float, probes: int, multiplier: float, cap: float) -> None:
        self.threshold, self.base, self.limit, self.multiplier, self.cap = threshold, brk, probes, multiplier, cap
        self.state = CLOSED
        self.failures = 0
        self.until = 0.0
        self.brk = brk
        self.era = 0
        self.in_flight: dict[int, ModelProbe] = {}
        self.successes = 0

    def admit(self, now: float, ident: int) -> tuple[bool, int]:
        if self.state is CLOSED:
            return True, self.era
        if self.state is OPEN:
            if now < self.until:
                return False, -1
            self.state, self.era, self.in_flight, self.successes = HALF_OPEN, self.era + 1, {}, 0
        self.in_flight = {i: p for i, p in self.in_flight.items() if now - p.started < self.brk}
        if len(self.in_flight) + self.successes >= self.limit:
            return False, -1
        self.in_flight[ident] = ModelProbe(now)
        return True, self.era

    def _open(self, now: float, retry_after: float | None) -> None:
        self.state, self.era, self.failures = OPEN, self.era + 1, 0
        self.until = now + max(self.brk, min(retry_after or 0.0, self.cap))  # Retry-After capped by the max break
        self.in_flight, self.successes = {}, 0

    def finish(self, ident: int, era: int, outcome: str, now: float, retry_after: float | None) -> None:
        if era != self.era:
            return
        if self.state is HALF_OPEN:
            if ident not in self.in_flight:
                return
            if outcome == "neutral":
                del self.in_flight[ident]
            elif outcome == "ok":
                del self.in_flight[ident]
                self.successes += 1
                if self.successes >= self.limit:
                    self.state, self.era, self.brk, self.failures = CLOSED, self.era + 1, self.base, 0
                    self.in_flight, self.successes = {}, 0
            else:
                self.brk = min(self.brk * self.multiplier, self.cap)
                self._open(now, retry_after)
        elif self.state is CLOSED:
            if outcome == "ok":
                self.failures = 0
            elif outcome == "fail":
                self.failures += 1
                if self.failures >= self.threshold:
                    self._open(now, retry_after)


class BreakerMachine(RuleBasedStateMachine):
    """Random interleavings of call starts, finishes (ok / fail / neutral / cancelled) and time steps."""

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.clock = ManualClock()
        self.pending: dict[int, tuple[asyncio.Task[Any], asyncio.Future[Any], int]] = {}
        self.next_id = 0

    @initialize(
        threshold=st.integers(1, 4),
        brk=st.sampled_from([1.0, 5.0, 10.0]),
        probes=st.integers(1, 3),
        multiplier=st.sampled_from([1.0, 2.0]),
    )
    def build(self, threshold: int, brk: float, probes: int, multiplier: float) -> None:
        cap = brk * 4
        self.breaker = CircuitBreaker(
            threshold, break_duration=brk, half_open_probes=probes, break_multiplier=multiplier, max_break_duration=cap
        )
        self.model = BreakerModel(threshold, brk, probes, multiplier, cap)

        async def program(question: str) -> str:
            future = self.futures[int(question)]
            return await future  # type: ignore[no-any-return]

        self.futures: dict[int, asyncio.Future[Any]] = {}
        self.pipeline = Pipeline(program, self.breaker, clock=self.clock)

    def teardown(self) -> None:
        for task, _, _ in self.pending.values():
            task.cancel()
        self.runner.close()

    @rule()
    def start(self) -> None:
        ident = self.next_id
        self.next_id += 1
        admitted, era = self.model.admit(self.clock.time, ident)

        async def begin() -> tuple[asyncio.Task[Any], asyncio.Future[Any]]:
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self.futures[ident] = future
            task = asyncio.create_task(self.pipeline(str(ident)))
            await asyncio.sleep(0)
            return task, future

        task, future = self.runner.run(begin())
        if admitted:
            assert not task.done(), "the model admitted a call the breaker refused"
            self.pending[ident] = (task, future, era)
        else:
            assert task.done() and isinstance(task.exception(), CircuitOpenError), "the breaker admitted a refused call"

    @precondition(lambda self: bool(self.pending))
    @rule(data=st.data(), outcome=st.sampled_from(["ok", "fail", "neutral", "cancel", "retry_after"]))
    def finish(self, data: st.DataObject, outcome: str) -> None:
        ident = data.draw(st.sampled_from(sorted(self.pending)))
        task, future, era = self.pending.pop(ident)
        retry_after = None
        if outcome == "ok":
            future.set_result("answer")
        elif outcome == "fail":
            future.set_exception(server_error())
        elif outcome == "retry_after":
            retry_after = 7.0
            future.set_exception(dspy.LMRateLimitError("429", status=429, retry_after=retry_after))
        elif outcome == "neutral":
            future.set_exception(dspy.LMAuthError("401", status=401))
        else:
            task.cancel()

        async def settle() -> None:
            await asyncio.gather(task, return_exceptions=True)

        self.runner.run(settle())
        kind = {"ok": "ok", "fail": "fail", "retry_after": "fail"}.get(outcome, "neutral")
        self.model.finish(ident, era, kind, self.clock.time, retry_after)

    @rule(seconds=st.sampled_from([0.5, 1.0, 3.0, 10.0]))
    def advance(self, seconds: float) -> None:
        self.clock.time += seconds

    @invariant()
    def same_state(self) -> None:
        if hasattr(self, "model"):
            snapshot = self.breaker.snapshot()
            model = self.model
            expected = model.state
            assert snapshot.state is expected, (snapshot, vars(model))
            if expected is CLOSED:
                assert snapshot.consecutive_failures == model.failures
            if expected is HALF_OPEN:
                assert snapshot.probes_succeeded == model.successes
                assert snapshot.probes_in_flight <= model.limit


BreakerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)
TestBreakerAgainstModel = BreakerMachine.TestCase


def test_partition_keys_are_hashable_and_default_is_none() -> None:
    key: Hashable = CircuitBreaker(1).snapshot().key
    assert key is None


async def test_a_consecutive_mode_snapshot_counts_the_calls_and_failures_since_the_last_state_change() -> None:
    program = Scripted()
    breaker = CircuitBreaker(failure_threshold=5)
    pipeline = Pipeline(program, breaker)
    for action in ["ok", server_error(), "ok", "ok", server_error(), "ok", "ok"]:
        program.action = action
        await asyncio.gather(pipeline("q"), return_exceptions=True)
    snapshot = breaker.snapshot()
    assert (snapshot.calls, snapshot.failures, snapshot.consecutive_failures) == (7, 2, 0)
    assert snapshot.failure_rate == pytest.approx(2 / 7)
    keyed = CircuitBreaker(failure_threshold=2, key=lambda call: "k")
    keyed_pipeline = Pipeline(program, keyed)
    program.action = server_error()
    for _ in range(2):
        with pytest.raises(dspy.LMServerError):
            await keyed_pipeline("q")
    assert (keyed.snapshot("k").state, keyed.snapshot("k").calls) == (OPEN, 0)  # counts restart at each change
