"""A listener that raises, at any event of any resource-holding layer, never leaks a permit, slot, probe, queue place,
reservation or single-flight entry: every later call still runs. A listener's ``Exception`` is swallowed (the call
goes on); any other ``BaseException`` propagates out of the call that emitted the event.

Async tests run on looptime's virtual clock: a leaked permit shows as a call that never finishes (``wait_for``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from resilient_dspy import (
    Budget,
    BudgetExceededError,
    Bulkhead,
    BulkheadFullError,
    Cache,
    CircuitBreaker,
    CircuitOpenError,
    Limit,
    Pipeline,
    RateLimitedError,
    RateLimiter,
)
from resilient_dspy.events import Event, deliver
from resilient_dspy.middleware.breaker import CircuitRejected, CircuitState, CircuitStateChanged
from resilient_dspy.middleware.budget import BudgetRejected, BudgetSpent
from resilient_dspy.middleware.bulkhead import BulkheadAcquired, BulkheadQueued, BulkheadRejected
from resilient_dspy.middleware.cache import CacheCoalesced, CacheHit, CacheMiss, CacheStored
from resilient_dspy.middleware.ratelimit import RateLimitRejected, RateLimitWaited
from tests.conftest import other_tasks

HANG = 1_000.0  # virtual seconds: a call still running by then waits forever on a leaked resource


class ListenerStop(BaseException):
    """A listener's own BaseException subclass: not an error report, so it propagates."""


@dataclass
class Raiser:
    """A listener that raises ``error`` on every event of type ``kind`` while ``armed``."""

    kind: type[Event]
    error: Callable[[], BaseException]
    armed: bool = True
    raised: int = 0

    def __call__(self, event: Event) -> None:
        if self.armed and isinstance(event, self.kind):
            self.raised += 1
            raise self.error()


async def settle(calls: list[Awaitable[Any]]) -> list[Any]:
    """Run calls concurrently; a call that never finishes (a leak) fails the test instead of hanging it."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    _, pending = await asyncio.wait(tasks, timeout=HANG)
    for task in pending:
        task.cancel()
    assert not pending, f"{len(pending)} call(s) never finished: a resource leaked"
    return [task.exception() or task.result() for task in tasks]


def sleeper(seconds: float) -> Callable[[str], Awaitable[str]]:
    async def program(question: str) -> str:
        await asyncio.sleep(seconds)
        return f"answer to {question}"

    return program


async def spaced(pipeline: Pipeline, *at: float) -> list[Any]:
    """One call at each virtual offset from now, concurrently."""
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def one(index: int, when: float) -> str:
        await asyncio.sleep(start + when - loop.time())
        return await pipeline(str(index))  # type: ignore[no-any-return]

    return await settle([one(index, when) for index, when in enumerate(at)])


# --------------------------------------------------------------------------------------------- the scenarios


async def bulkhead_scenario(listener: Raiser) -> None:
    bulkhead = Bulkhead(2, max_queue=2)
    pipeline = Pipeline(sleeper(1.0), bulkhead, listeners=[listener])
    outcomes = await spaced(pipeline, 0, 0, 0, 0, 0, 0.1)  # 2 run, 2 queue (then acquire), 2 rejected
    assert all(isinstance(o, str | BulkheadFullError | ListenerStop) for o in outcomes)
    assert (bulkhead.snapshot().in_flight, bulkhead.snapshot().queued) == (0, 0)
    listener.armed = False
    assert all(isinstance(o, str) for o in await spaced(pipeline, *[0.0] * 4))  # 2 slots and the 2 queue places


async def breaker_scenario(listener: Raiser) -> None:
    failures = [ConnectionError("down")]

    async def program(question: str) -> str:
        await asyncio.sleep(0.1)
        if failures:
            raise failures.pop()
        return "ok"

    breaker = CircuitBreaker(1, break_duration=1.0)
    pipeline = Pipeline(program, breaker, listeners=[listener])
    # opens at 0.1, rejects at 0.5, the probe at 1.5 closes it
    outcomes = await spaced(pipeline, 0.0, 0.5, 1.5)
    assert all(isinstance(o, str | ConnectionError | CircuitOpenError | ListenerStop) for o in outcomes)
    snapshot = breaker.snapshot()
    assert snapshot.probes_in_flight == 0
    listener.armed = False
    if snapshot.state is not CircuitState.CLOSED:  # a probe cut short by the listener leaves it half-open: probe again
        assert await pipeline("probe") == "ok"
    assert breaker.snapshot().state is CircuitState.CLOSED
    assert all(isinstance(o, str) for o in await spaced(pipeline, 0.0, 0.0, 0.0))


async def rate_limiter_scenario(listener: Raiser) -> None:
    limiter = RateLimiter(Limit.requests(1, per=1.0), max_wait=1.5)
    pipeline = Pipeline(sleeper(0.1), limiter, listeners=[listener])
    outcomes = await spaced(pipeline, 0, 0, 0)  # one now, one waits 1 s, one cannot be admitted within 1.5 s
    assert all(isinstance(o, str | RateLimitedError | ListenerStop) for o in outcomes)
    assert limiter.snapshot().queued == 0
    listener.armed = False
    await asyncio.sleep(2.0)
    assert all(isinstance(o, str) for o in await spaced(pipeline, 0.0, 1.0))


async def budget_scenario(listener: Raiser) -> None:
    budget = Budget(tokens=100, estimate_tokens=lambda call: 60)
    pipeline = Pipeline(sleeper(1.0), budget, listeners=[listener])
    outcomes = await spaced(pipeline, 0, 0.1)  # the second cannot reserve 60 more
    assert all(isinstance(o, str | BudgetExceededError | ListenerStop) for o in outcomes)
    snapshot = budget.snapshot()
    assert snapshot.tokens is not None
    assert (snapshot.in_flight, snapshot.tokens.reserved) == (0, 0)
    listener.armed = False
    assert all(isinstance(o, str) for o in await spaced(pipeline, 0.0, 1.5))


async def cache_scenario(listener: Raiser) -> None:
    pipeline = Pipeline(sleeper(1.0), Cache(), listeners=[listener])

    async def ask(question: str) -> str:
        return await pipeline(question)  # type: ignore[no-any-return]

    outcomes = await settle([ask("same"), ask("same"), ask("same")])  # a miss led, two followers coalesce, stored
    outcomes += await settle([ask("same")])  # a hit
    assert all(isinstance(o, str | ListenerStop) for o in outcomes)
    listener.armed = False
    assert all(isinstance(o, str) for o in await settle([ask("same"), ask("same"), ask("other"), ask("other")]))


Scenario = Callable[[Raiser], Awaitable[None]]
CASES: list[tuple[Scenario, type[Event]]] = [
    (bulkhead_scenario, BulkheadQueued),
    (bulkhead_scenario, BulkheadAcquired),
    (bulkhead_scenario, BulkheadRejected),
    (breaker_scenario, CircuitStateChanged),
    (breaker_scenario, CircuitRejected),
    (rate_limiter_scenario, RateLimitWaited),
    (rate_limiter_scenario, RateLimitRejected),
    (budget_scenario, BudgetSpent),
    (budget_scenario, BudgetRejected),
    (cache_scenario, CacheMiss),
    (cache_scenario, CacheCoalesced),
    (cache_scenario, CacheStored),
    (cache_scenario, CacheHit),
]
ERRORS: dict[str, Callable[[], BaseException]] = {
    "base_exception": lambda: ListenerStop(),
    "exception": lambda: ValueError("listener bug"),
}


@pytest.mark.parametrize("error", list(ERRORS.values()), ids=list(ERRORS))
@pytest.mark.parametrize(("scenario", "kind"), CASES, ids=[f"{s.__name__[:-9]}-{k.__name__}" for s, k in CASES])
async def test_a_listener_raising_at_any_event_leaks_nothing(
    scenario: Scenario, kind: type[Event], error: Callable[[], BaseException]
) -> None:
    listener = Raiser(kind, error)
    await scenario(listener)
    assert listener.raised > 0, f"the scenario never emitted {kind.__name__}"
    assert not other_tasks()


async def test_a_listeners_exception_never_fails_the_call() -> None:
    listener = Raiser(BulkheadQueued, lambda: ValueError("listener bug"))
    outcomes = await spaced(Pipeline(sleeper(1.0), Bulkhead(1, max_queue=1), listeners=[listener]), 0, 0)
    assert outcomes == ["answer to 0", "answer to 1"] and listener.raised == 1


async def test_a_listeners_base_exception_ends_the_call_that_emitted_the_event() -> None:
    listener = Raiser(BulkheadQueued, ListenerStop)
    outcomes = await spaced(Pipeline(sleeper(1.0), Bulkhead(1, max_queue=1), listeners=[listener]), 0, 0)
    assert outcomes[0] == "answer to 0" and isinstance(outcomes[1], ListenerStop)


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit, ListenerStop, asyncio.CancelledError])
def test_deliver_swallows_a_listeners_exception_and_propagates_any_other_base_exception(
    error: type[BaseException],
) -> None:
    seen: list[Event] = []
    event = Event(pipeline="p", layer="l", time=0.0)

    def failing(event: Event) -> None:
        raise ValueError("listener bug")

    def stopping(event: Event) -> None:
        raise error()

    deliver((failing, seen.append), event)
    assert seen == [event]  # the failing listener did not stop the next one
    with pytest.raises(error):
        deliver((stopping, seen.append), event)
