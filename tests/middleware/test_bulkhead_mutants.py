"""Bulkhead: exact-value tests written from mutmut survivors (see docs/mutation-testing.md).

Exact rejection messages and event fields, ``describe()``, ``health()``, partitioned snapshots and the
``max_wait`` vs deadline boundaries. Async tests run on looptime's virtual clock, which starts at 0.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from resilient_dspy import BulkheadFullError, Pipeline
from resilient_dspy.core.health import LayerHealth
from resilient_dspy.events import Event
from resilient_dspy.middleware.bulkhead import (
    Bulkhead,
    BulkheadAcquired,
    BulkheadQueued,
    BulkheadRejected,
    BulkheadSnapshot,
)


async def program(question: str) -> str:
    """Sleeps the seconds after the ``key|`` prefix, then answers."""
    await asyncio.sleep(float(question.split("|")[-1]))
    return question


def by_prefix(call: Any) -> str:
    return call.inputs["question"].split("|")[0]


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def test_describe_defaults_and_name() -> None:
    options = {
        "key": None,
        "max_keys": 1024,
        "idle_after": 600.0,
        "max_concurrent": 10,
        "max_queue": 1000,
        "max_wait": None,
    }
    assert Bulkhead().describe() == {"layer": "Bulkhead", "options": {**options, "name": None}}
    assert Bulkhead().name == "Bulkhead"
    named = Bulkhead(2, name="db").describe()
    assert named == {"layer": "Bulkhead", "options": {**options, "max_concurrent": 2, "name": "db"}, "name": "db"}


async def test_queue_full_rejection_message_and_event() -> None:
    events: list[Event] = []
    bulkhead = Bulkhead(1, max_queue=0, name="bh")
    pipeline = Pipeline(program, bulkhead, name="p", listeners=[events.append])
    running = asyncio.create_task(pipeline("5"))
    await asyncio.sleep(1)
    with pytest.raises(BulkheadFullError) as caught:
        await pipeline("0")
    assert str(caught.value) == "bh: queue full (1/1 running, 0 queued)"
    assert events == [BulkheadRejected(pipeline="p", layer="bh", time=1.0, key=None, reason="queue_full", waited=0.0)]
    assert await running == "5"


async def test_partitioned_queue_events_and_max_wait_rejection() -> None:
    events: list[Event] = []
    bulkhead = Bulkhead(1, max_queue=2, max_wait=3, key=by_prefix)
    pipeline = Pipeline(program, bulkhead, name="p", listeners=[events.append])
    running = asyncio.create_task(pipeline("a|10"))
    await asyncio.sleep(1)
    first = asyncio.create_task(pipeline("a|0"))
    await asyncio.sleep(1)
    second = asyncio.create_task(pipeline("a|0"))
    await settle()
    assert bulkhead.snapshot("a") == BulkheadSnapshot("a", 1, 2, 1, 2)
    assert bulkhead.snapshot("zz") == BulkheadSnapshot("zz", 0, 0, 1, 2)
    with pytest.raises(BulkheadFullError) as caught:
        await first
    assert str(caught.value) == "Bulkhead['a']: max_wait passed (1/1 running, 1 queued)"
    with pytest.raises(BulkheadFullError):
        await second
    assert events == [
        BulkheadQueued(pipeline="p", layer="Bulkhead", time=1.0, key="a", position=1),
        BulkheadQueued(pipeline="p", layer="Bulkhead", time=2.0, key="a", position=2),
        BulkheadRejected(pipeline="p", layer="Bulkhead", time=4.0, key="a", reason="max_wait", waited=3.0),
        BulkheadRejected(pipeline="p", layer="Bulkhead", time=5.0, key="a", reason="max_wait", waited=3.0),
    ]
    assert await running == "a|10"


async def test_acquired_event_reports_the_wait() -> None:
    events: list[Event] = []
    bulkhead = Bulkhead(1, max_queue=1, name="bh")
    pipeline = Pipeline(program, bulkhead, name="p", listeners=[events.append])
    running = asyncio.create_task(pipeline("5"))
    await asyncio.sleep(2)
    assert await pipeline("0") == "0"
    assert await running == "5"
    assert events == [
        BulkheadQueued(pipeline="p", layer="bh", time=2.0, key=None, position=1),
        BulkheadAcquired(pipeline="p", layer="bh", time=5.0, key=None, waited=3.0),
    ]


@pytest.mark.parametrize(
    ("max_wait", "deadline", "reason", "waited"),
    [
        (3.0, 5.0, "max_wait", 3.0),  # max_wait (t=4) ends before the deadline
        (3.0, 4.0, "deadline", 3.0),  # both at t=4: the deadline is the reason
        (None, 3.0, "deadline", 2.0),
    ],
)
async def test_whichever_ends_first_is_the_reason(max_wait: Any, deadline: float, reason: str, waited: float) -> None:
    events: list[Event] = []
    bulkhead = Bulkhead(1, max_queue=1, max_wait=max_wait, name="bh")
    pipeline = Pipeline(program, bulkhead, name="p", listeners=[events.append])
    running = asyncio.create_task(pipeline("10"))
    await asyncio.sleep(1)
    call = pipeline.new_call({"question": "0"}, deadline=deadline)
    with pytest.raises(BulkheadFullError) as caught:
        await pipeline.run(call)
    what = {"max_wait": "max_wait passed", "deadline": "deadline passed"}[reason]
    assert str(caught.value) == f"bh: {what} (1/1 running, 0 queued)"
    assert events[-1] == BulkheadRejected(
        pipeline="p", layer="bh", time=1.0 + waited, key=None, reason=reason, waited=waited
    )
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running


async def test_a_deadline_already_reached_is_rejected_at_once() -> None:
    events: list[Event] = []
    bulkhead = Bulkhead(1, max_queue=1, name="bh")
    pipeline = Pipeline(program, bulkhead, name="p", listeners=[events.append])
    running = asyncio.create_task(pipeline("10"))
    await asyncio.sleep(1)
    with pytest.raises(BulkheadFullError) as caught:
        await pipeline.run(pipeline.new_call({"question": "0"}, deadline=1.0))
    assert str(caught.value) == "bh: deadline passed (1/1 running, 0 queued)"
    assert events == [BulkheadRejected(pipeline="p", layer="bh", time=1.0, key=None, reason="deadline", waited=0.0)]
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running


async def test_health_unpartitioned_and_partitioned() -> None:
    bulkhead = Bulkhead(1, max_queue=1, name="bh")
    pipeline = Pipeline(program, bulkhead)
    ok = {"*": {"in_flight": 0, "queued": 0, "max_concurrent": 1}}
    assert bulkhead.health() == LayerHealth("bh", "ok", {"compartments": ok})
    running = asyncio.create_task(pipeline("5"))
    queued = asyncio.create_task(pipeline("0"))
    await settle()
    full = {"*": {"in_flight": 1, "queued": 1, "max_concurrent": 1}}
    assert bulkhead.health() == LayerHealth("bh", "degraded", {"compartments": full})
    assert await running == "5" and await queued == "0"

    keyed = Bulkhead(2, key=by_prefix)
    pipeline = Pipeline(program, keyed)
    tasks = [asyncio.create_task(pipeline(q)) for q in ("a|5", "b|5", "b|5")]
    await settle()
    details = {
        "a": {"in_flight": 1, "queued": 0, "max_concurrent": 2},
        "b": {"in_flight": 2, "queued": 0, "max_concurrent": 2},
    }
    assert keyed.health() == LayerHealth("Bulkhead", "degraded", {"compartments": details})
    await asyncio.gather(*tasks)
    assert keyed.health().status == "ok"


async def test_a_cancelled_waiter_not_yet_cleaned_up_does_not_fill_the_queue() -> None:
    bulkhead = Bulkhead(1, max_queue=1)
    pipeline = Pipeline(program, bulkhead)
    running = asyncio.create_task(pipeline("5"))
    await asyncio.sleep(1)
    waiter = asyncio.create_task(pipeline("0"))
    await settle()
    waiter.cancel()  # its future is cancelled now; its task removes it from the queue only when it next runs
    assert await pipeline("0") == "0"  # runs before that cleanup: queues behind `running`, not rejected
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert await running == "5"


async def test_partitioned_deadline_rejection_and_acquired_events_carry_the_key() -> None:
    events: list[Event] = []
    bulkhead = Bulkhead(1, max_queue=1, key=by_prefix, name="bh")
    pipeline = Pipeline(program, bulkhead, name="p", listeners=[events.append])
    running = asyncio.create_task(pipeline("a|5"))
    await asyncio.sleep(1)
    with pytest.raises(BulkheadFullError) as caught:
        await pipeline.run(pipeline.new_call({"question": "a|0"}, deadline=1.0))
    assert str(caught.value) == "bh['a']: deadline passed (1/1 running, 0 queued)"
    assert await pipeline("a|0") == "a|0"
    assert await running == "a|5"
    assert events == [
        BulkheadRejected(pipeline="p", layer="bh", time=1.0, key="a", reason="deadline", waited=0.0),
        BulkheadQueued(pipeline="p", layer="bh", time=1.0, key="a", position=1),
        BulkheadAcquired(pipeline="p", layer="bh", time=5.0, key="a", waited=4.0),
    ]
