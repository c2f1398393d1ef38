"""Timeout: exact-value tests written from mutmut survivors (see docs/mutation-testing.md).

The scope before placement, the exact misplacement problem, and the reported timeout when an outer deadline
is earlier than or equal to ours. Async tests run on looptime's virtual clock, which starts at 0.
"""

from __future__ import annotations

import asyncio

import pytest

from resilient_dspy import Pipeline, Retry, Timeout, TimeoutExceededError
from resilient_dspy.errors import ConfigurationError, ResilienceWarning
from resilient_dspy.events import Event, TimeoutFired


async def hangs(question: str) -> str:
    await asyncio.sleep(10_000)
    return "late"


def test_an_unplaced_timeout_describes_its_scope_as_total() -> None:
    assert Timeout(5).describe() == {
        "layer": "Timeout",
        "name": "Timeout(total)",
        "scope": "total",
        "options": {"seconds": 5.0, "name": None},
    }
    assert Timeout(5).scope == "total"


def test_one_instance_cannot_bound_both_the_total_and_an_attempt() -> None:
    timeout = Timeout(5)
    Pipeline(hangs, timeout)
    with pytest.raises(ConfigurationError) as caught, pytest.warns(ResilienceWarning):
        Pipeline(hangs, Retry(2), timeout)
    assert caught.value.problems == (
        ("Timeout", "this instance bounds the total elsewhere; use a new Timeout for the attempt"),
    )


async def test_an_earlier_outer_deadline_is_reported_as_the_time_left() -> None:
    events: list[Event] = []
    pipeline = Pipeline(hangs, Timeout(5), name="p", listeners=[events.append])
    await asyncio.sleep(10)
    with pytest.raises(TimeoutExceededError) as caught:
        await pipeline.run(pipeline.new_call({"question": "q"}, deadline=12.0))
    assert (caught.value.timeout, caught.value.scope) == (2.0, "total")
    assert events == [TimeoutFired(pipeline="p", layer="Timeout(total)", time=12.0, timeout=2.0, scope="total")]


async def test_an_equal_outer_deadline_keeps_our_own_seconds() -> None:
    pipeline = Pipeline(hangs, Timeout(0.2))
    await asyncio.sleep(0.1)
    started = asyncio.get_running_loop().time()
    deadline = started + 0.2
    assert deadline - started != 0.2  # float rounding: recomputing the seconds would not give 0.2 back
    with pytest.raises(TimeoutExceededError) as caught:
        await pipeline.run(pipeline.new_call({"question": "q"}, deadline=deadline))
    assert caught.value.timeout == 0.2
