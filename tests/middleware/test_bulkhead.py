"""Bulkhead: the concurrency bound, the queue bound, FIFO hand-off, max_wait and deadlines, cancellation without
permit leaks, partitions, events, validation, what it reports (describe, snapshots, health, rejections), and a
hypothesis property over random arrivals and cancellations.

Async tests run on looptime's virtual loop clock (``--looptime``); the property test builds its own looptime loop
per example.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import looptime
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from resilient_dspy import BulkheadFullError, Pipeline, Retry, Timeout
from resilient_dspy.core.call import Call, Handler, leases_lent, lend_leases, reclaim_leases
from resilient_dspy.core.health import LayerHealth
from resilient_dspy.errors import ConfigurationError
from resilient_dspy.events import Event
from resilient_dspy.middleware.bulkhead import (
    Bulkhead,
    BulkheadAcquired,
    BulkheadQueued,
    BulkheadRejected,
    BulkheadSnapshot,
)
from tests.conftest import other_tasks


def now() -> float:
    return asyncio.get_running_loop().time()


class Gate:
    """An async program that blocks until released, and records concurrency and the order calls started in."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.active = 0
        self.max_active = 0
        self.release_all = asyncio.Event()

    async def __call__(self, question: str) -> str:
        self.started.append(question)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await self.release_all.wait()
        finally:
            self.active -= 1
        return question


class AfterCall:
    """A middleware placed above the bulkhead: runs ``hooks[question]()`` right after that call's permit is released,
    in the same task step, so a test can act before any woken waiter runs."""

    def __init__(self) -> None:
        self.hooks: dict[str, Callable[[], None]] = {}

    async def __call__(self, call: Call, next: Handler) -> Any:
        try:
            return await next(call)
        finally:
            hook = self.hooks.pop(call.inputs["question"], None)
            if hook is not None:
                hook()


async def settle() -> None:
    """Let every ready task run (no time passes)."""
    for _ in range(5):
        await asyncio.sleep(0)


def spawn(pipeline: Pipeline, question: str) -> asyncio.Task[Any]:
    return asyncio.create_task(pipeline(question=question))


# ------------------------------------------------------------------------------------------------ 1. the bound


async def test_in_flight_never_exceeds_max_concurrent_under_many_calls() -> None:
    """60 concurrent calls through Bulkhead(5): at most 5 run at once, exactly 5 at the peak, all succeed."""
    active = peak = 0

    async def program(question: str) -> str:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.1 + (int(question) % 7) / 10)
        active -= 1
        return question

    bulkhead = Bulkhead(5, max_queue=100)
    pipeline = Pipeline(program, bulkhead)
    results = await asyncio.gather(*(pipeline(question=str(i)) for i in range(60)))

    assert results == [str(i) for i in range(60)]
    assert peak == 5
    assert bulkhead.snapshot() == BulkheadSnapshot(None, 0, 0, 5, 100)


async def test_call_beyond_slots_and_queue_is_rejected_at_once_without_running() -> None:
    """With 2 slots and a queue of 3 all taken, the 6th call fails immediately and the program never sees it."""
    gate = Gate()
    bulkhead = Bulkhead(2, max_queue=3)
    pipeline = Pipeline(gate, bulkhead)
    tasks = [spawn(pipeline, str(i)) for i in range(5)]
    await settle()
    assert bulkhead.snapshot() == BulkheadSnapshot(None, 2, 3, 2, 3)

    started = now()
    with pytest.raises(BulkheadFullError) as caught:
        await pipeline(question="sixth")
    assert now() == started
    assert gate.started == ["0", "1"]
    assert caught.value.retry_after is None
    assert "queue full" in str(caught.value)

    gate.release_all.set()
    assert await asyncio.gather(*tasks) == [str(i) for i in range(5)]
    assert gate.started == ["0", "1", "2", "3", "4"]


async def test_max_queue_zero_rejects_as_soon_as_the_slots_are_taken() -> None:
    """max_queue=0: the (max_concurrent + 1)th concurrent call is rejected, the others run."""
    gate = Gate()
    pipeline = Pipeline(gate, Bulkhead(3, max_queue=0))
    tasks = [spawn(pipeline, str(i)) for i in range(3)]
    await settle()
    with pytest.raises(BulkheadFullError):
        await pipeline(question="extra")
    gate.release_all.set()
    await asyncio.gather(*tasks)
    assert gate.max_active == 3
    assert await pipeline(question="later") == "later"


async def test_a_failing_call_gives_its_slot_back() -> None:
    """Errors pass through unchanged and free the slot."""

    async def program(question: str) -> str:
        raise ValueError(question)

    bulkhead = Bulkhead(1, max_queue=0)
    pipeline = Pipeline(program, bulkhead)
    for _ in range(3):
        with pytest.raises(ValueError, match="boom"):
            await pipeline(question="boom")
    assert bulkhead.snapshot().in_flight == 0


# ------------------------------------------------------------------------------------------------ 2. FIFO


async def test_queued_calls_are_admitted_in_arrival_order() -> None:
    """Bulkhead(1, max_queue=10): the program sees the calls in exactly the order they arrived."""
    order: list[str] = []

    async def program(question: str) -> str:
        order.append(question)
        await asyncio.sleep(1)
        return question

    pipeline = Pipeline(program, Bulkhead(1, max_queue=10))
    tasks = []
    for i in range(8):
        tasks.append(spawn(pipeline, str(i)))
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == [str(i) for i in range(8)]


async def test_a_released_permit_goes_to_the_waiter_not_to_a_newcomer() -> None:
    """No barging: a call arriving right after a release, before the woken waiter ran, still goes after it."""
    gate = Gate()
    after = AfterCall()
    bulkhead = Bulkhead(1, max_queue=5)
    pipeline = Pipeline(gate, after, bulkhead)
    first = spawn(pipeline, "first")
    await settle()
    waiter = spawn(pipeline, "waiter")
    await settle()
    newcomer: list[asyncio.Task[Any]] = []

    def arrive() -> None:
        assert bulkhead.snapshot().in_flight == 1  # handed over, not freed
        newcomer.append(spawn(pipeline, "newcomer"))

    after.hooks["first"] = arrive
    gate.release_all.set()
    await asyncio.gather(first, waiter, *newcomer)
    await asyncio.gather(*newcomer)
    assert gate.started == ["first", "waiter", "newcomer"]


# ------------------------------------------------------------------------------------------------ 3. max_wait, deadline


async def test_max_wait_rejects_a_queued_call_after_exactly_max_wait() -> None:
    """A queued call waits max_wait seconds, then fails with BulkheadFullError; it never ran."""
    gate = Gate()
    events: list[Event] = []
    bulkhead = Bulkhead(1, max_queue=5, max_wait=2.0)
    pipeline = Pipeline(gate, bulkhead, listeners=[events.append])
    holder = spawn(pipeline, "holder")
    await settle()

    started = now()
    with pytest.raises(BulkheadFullError, match="max_wait"):
        await pipeline(question="late")
    assert now() - started == pytest.approx(2.0)
    assert gate.started == ["holder"]
    assert bulkhead.snapshot().queued == 0
    rejected = [e for e in events if isinstance(e, BulkheadRejected)]
    assert [e.reason for e in rejected] == ["max_wait"]
    assert rejected[0].waited == pytest.approx(2.0)

    gate.release_all.set()
    await holder
    assert bulkhead.snapshot() == BulkheadSnapshot(None, 0, 0, 1, 5)


async def test_a_waiter_admitted_before_max_wait_runs() -> None:
    """A slot that frees up within max_wait is handed over; the waiter runs and the acquired event says how long."""
    events: list[Event] = []

    async def program(question: str) -> str:
        await asyncio.sleep(1.5)
        return question

    pipeline = Pipeline(program, Bulkhead(1, max_queue=1, max_wait=2.0), listeners=[events.append])
    assert list(await asyncio.gather(pipeline(question="a"), pipeline(question="b"))) == ["a", "b"]
    queued = [e for e in events if isinstance(e, BulkheadQueued)]
    acquired = [e for e in events if isinstance(e, BulkheadAcquired)]
    assert [e.position for e in queued] == [1]
    assert [e.waited for e in acquired] == [pytest.approx(1.5)]
    assert not [e for e in events if isinstance(e, BulkheadRejected)]


async def test_the_call_deadline_bounds_the_queue_wait() -> None:
    """Without max_wait, a queued call gives up at its deadline; one whose deadline has passed is rejected at once."""
    gate = Gate()
    events: list[Event] = []
    pipeline = Pipeline(gate, Bulkhead(1, max_queue=5), listeners=[events.append])
    holder = spawn(pipeline, "holder")
    await settle()

    started = now()
    with pytest.raises(BulkheadFullError, match="deadline"):
        await pipeline.run(pipeline.new_call({"question": "q"}, deadline=started + 3.0))
    assert now() - started == pytest.approx(3.0)

    started = now()
    with pytest.raises(BulkheadFullError, match="deadline"):
        await pipeline.run(pipeline.new_call({"question": "q"}, deadline=started - 1.0))
    assert now() == started
    assert [e.reason for e in events if isinstance(e, BulkheadRejected)] == ["deadline", "deadline"]
    assert not [e for e in events if isinstance(e, BulkheadQueued) and e.time == started]

    gate.release_all.set()
    await holder


async def test_max_wait_shorter_than_the_deadline_wins() -> None:
    """The earlier of max_wait and the deadline ends the wait, and names the reason."""
    gate = Gate()
    pipeline = Pipeline(gate, Bulkhead(1, max_queue=5, max_wait=1.0))
    holder = spawn(pipeline, "holder")
    await settle()
    started = now()
    with pytest.raises(BulkheadFullError, match="max_wait"):
        await pipeline.run(pipeline.new_call({"question": "q"}, deadline=started + 10.0))
    assert now() - started == pytest.approx(1.0)
    with pytest.raises(BulkheadFullError, match="deadline"):
        await pipeline.run(pipeline.new_call({"question": "q"}, deadline=now() + 0.5))
    gate.release_all.set()
    await holder


# ------------------------------------------------------------------------------------------------ 4. cancellation


async def test_cancelled_waiter_leaves_the_queue_and_leaks_no_permit() -> None:
    """Cancel a queued call: it raises CancelledError, the next waiter runs, and all slots are usable afterwards."""
    gate = Gate()
    bulkhead = Bulkhead(2, max_queue=5)
    pipeline = Pipeline(gate, bulkhead)
    holders = [spawn(pipeline, f"h{i}") for i in range(2)]
    await settle()
    doomed = spawn(pipeline, "doomed")
    survivor = spawn(pipeline, "survivor")
    await settle()
    assert bulkhead.snapshot().queued == 2

    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert bulkhead.snapshot().queued == 1

    gate.release_all.set()
    await asyncio.gather(*holders, survivor)
    assert gate.started == ["h0", "h1", "survivor"]
    assert bulkhead.snapshot() == BulkheadSnapshot(None, 0, 0, 2, 5)

    gate.release_all.clear()
    again = [spawn(pipeline, f"again{i}") for i in range(2)]
    await settle()
    assert gate.active == 2  # both slots free: neither had to queue
    gate.release_all.set()
    await asyncio.gather(*again)
    assert not other_tasks()


async def test_waiter_cancelled_after_hand_off_passes_the_permit_on() -> None:
    """A waiter handed a permit and cancelled before it resumed gives the permit to the next waiter."""
    gate = Gate()
    after = AfterCall()
    bulkhead = Bulkhead(1, max_queue=5)
    pipeline = Pipeline(gate, after, bulkhead)
    first = spawn(pipeline, "first")
    await settle()
    handed = spawn(pipeline, "handed")
    next_in_line = spawn(pipeline, "next")
    await settle()

    def cancel_handed() -> None:
        assert bulkhead.snapshot().in_flight == 1 and bulkhead.snapshot().queued == 1
        handed.cancel()

    after.hooks["first"] = cancel_handed
    gate.release_all.set()
    assert await first == "first"
    with pytest.raises(asyncio.CancelledError):
        await handed
    assert await asyncio.wait_for(next_in_line, timeout=5) == "next"
    assert gate.started == ["first", "next"]
    assert bulkhead.snapshot() == BulkheadSnapshot(None, 0, 0, 1, 5)
    assert await pipeline(question="free") == "free"


async def test_cancelling_a_running_call_frees_its_slot() -> None:
    """Cancellation of the call inside the program propagates and releases the slot to the next waiter."""
    gate = Gate()
    bulkhead = Bulkhead(1, max_queue=1)
    pipeline = Pipeline(gate, bulkhead)
    running = spawn(pipeline, "running")
    await settle()
    waiting = spawn(pipeline, "waiting")
    await settle()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    await settle()
    assert gate.started == ["running", "waiting"]
    gate.release_all.set()
    assert await waiting == "waiting"
    assert bulkhead.snapshot().in_flight == 0


async def test_rejection_is_not_retried() -> None:
    """BulkheadFullError is a rejection: a Retry above does not retry it."""
    gate = Gate()
    pipeline = Pipeline(gate, Retry(3, base_delay=0.01), Bulkhead(1, max_queue=0))
    holder = spawn(pipeline, "holder")
    await settle()
    with pytest.raises(BulkheadFullError):
        await pipeline(question="q")
    assert gate.started == ["holder"]
    gate.release_all.set()
    await holder


# ------------------------------------------------------------------------------------------------ 5. partitions


async def test_keys_have_independent_compartments() -> None:
    """key=: each tenant gets its own slots and queue."""
    gate = Gate()
    bulkhead = Bulkhead(1, key=lambda call: call.inputs["question"].split(":")[0], max_queue=0)
    pipeline = Pipeline(gate, bulkhead)
    a1 = spawn(pipeline, "a:1")
    b1 = spawn(pipeline, "b:1")
    await settle()
    assert gate.started == ["a:1", "b:1"]
    with pytest.raises(BulkheadFullError, match="'a'"):
        await pipeline(question="a:2")
    assert bulkhead.snapshot("a") == BulkheadSnapshot("a", 1, 0, 1, 0)
    assert bulkhead.snapshot("b").in_flight == 1
    assert bulkhead.snapshot("c") == BulkheadSnapshot("c", 0, 0, 1, 0)
    gate.release_all.set()
    await asyncio.gather(a1, b1)


async def test_idle_keys_are_evicted_and_busy_ones_kept() -> None:
    """Beyond max_keys, idle compartments are dropped (LRU); a busy one survives."""
    release = asyncio.Event()

    async def program(question: str) -> str:
        if question == "busy":
            await release.wait()
        return question

    bulkhead = Bulkhead(1, key=lambda call: call.inputs["question"], max_keys=2, max_queue=0)
    pipeline = Pipeline(program, bulkhead)
    busy = spawn(pipeline, "busy")
    await settle()
    for name in ("k1", "k2", "k3", "k4"):
        await pipeline(question=name)
    assert set(bulkhead.snapshots()) == {"busy", "k4"}
    assert bulkhead.snapshot("busy").in_flight == 1
    release.set()
    await busy


async def test_a_new_key_stays_limited_when_every_other_key_is_busy() -> None:
    """Regression: with max_keys reached by busy keys, the compartment created for a new key must not be evicted
    by the very lookup that created it (its calls would then run on a forgotten compartment, unbounded)."""
    gate = Gate()
    bulkhead = Bulkhead(1, key=lambda call: call.inputs["question"].split(":")[0], max_keys=1, max_queue=0)
    pipeline = Pipeline(gate, bulkhead)
    busy = spawn(pipeline, "a:1")
    await settle()
    first_b = spawn(pipeline, "b:1")
    await settle()
    with pytest.raises(BulkheadFullError):
        await asyncio.wait_for(pipeline(question="b:2"), timeout=1.0)
    assert gate.max_active == 2  # one per key
    assert bulkhead.snapshot("b").in_flight == 1
    gate.release_all.set()
    await asyncio.gather(busy, first_b)


async def test_idle_keys_expire_after_idle_after() -> None:
    """A compartment unused for idle_after seconds is dropped at a later call."""

    async def program(question: str) -> str:
        return question

    bulkhead = Bulkhead(1, key=lambda call: call.inputs["question"], idle_after=10, max_queue=0)
    pipeline = Pipeline(program, bulkhead)
    await pipeline(question="old")
    await asyncio.sleep(11)
    await pipeline(question="new")
    assert set(bulkhead.snapshots()) == {"new"}


# ------------------------------------------------------------------------------------------------ 6. options, events


def test_bad_options_name_every_field() -> None:
    """One ConfigurationError lists each bad setting by name."""
    with pytest.raises(ConfigurationError) as caught:
        Bulkhead(0, max_queue=-1, max_wait=0, max_keys=0, idle_after=-1)
    fields = {field for field, _ in caught.value.problems}
    assert fields == {
        "Bulkhead.max_concurrent",
        "Bulkhead.max_queue",
        "Bulkhead.max_wait",
        "Bulkhead.max_keys",
        "Bulkhead.idle_after",
    }


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_concurrent": 2.5}, "Bulkhead.max_concurrent"),
        ({"max_concurrent": True}, "Bulkhead.max_concurrent"),
        ({"max_wait": float("inf")}, "Bulkhead.max_wait"),
        ({"max_wait": -1.0}, "Bulkhead.max_wait"),
        ({"key": "tenant"}, "Bulkhead.key"),
    ],
)
def test_each_bad_option_is_rejected(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Bulkhead(**kwargs)
    assert [f for f, _ in caught.value.problems] == [field]


def test_describe_lists_the_options() -> None:
    described = Bulkhead(4, max_queue=2, max_wait=1.5, name="llm").describe()
    assert described["layer"] == "Bulkhead"
    assert described["name"] == "llm"
    assert described["options"]["max_concurrent"] == 4
    assert described["options"]["max_queue"] == 2
    assert described["options"]["max_wait"] == 1.5


async def test_events_carry_pipeline_layer_key_and_position() -> None:
    """Queued events give 1-based positions; the layer is the bulkhead's name; nothing is built without listeners."""
    gate = Gate()
    events: list[Event] = []
    pipeline = Pipeline(gate, Bulkhead(1, max_queue=2, name="llm-slots"), name="p", listeners=[events.append])
    tasks = [spawn(pipeline, str(i)) for i in range(3)]
    await settle()
    with pytest.raises(BulkheadFullError):
        await pipeline(question="x")
    gate.release_all.set()
    await asyncio.gather(*tasks)
    queued = [e for e in events if isinstance(e, BulkheadQueued)]
    assert [e.position for e in queued] == [1, 2]
    assert {(e.pipeline, e.layer) for e in events} == {("p", "llm-slots")}
    assert {e.key for e in events if isinstance(e, BulkheadQueued | BulkheadRejected | BulkheadAcquired)} == {None}
    assert [e.reason for e in events if isinstance(e, BulkheadRejected)] == ["queue_full"]
    assert len([e for e in events if isinstance(e, BulkheadAcquired)]) == 2


# ------------------------------------------------------------------------------------------------ 7. what it reports


async def sleeper(question: str) -> str:
    """Sleeps the seconds after the ``key|`` prefix, then answers."""
    await asyncio.sleep(float(question.split("|")[-1]))
    return question


def by_prefix(call: Any) -> str:
    key: str = call.inputs["question"].split("|")[0]
    return key


def says(error: BaseException, *facts: str) -> None:
    """The message carries these facts (the layer and key, the occupancy), whatever its wording."""
    for fact in facts:
        assert fact in str(error), (fact, str(error))


class Coalescing:
    """A layer that says calls through it may wait for another call's work (as a single-flight Cache does)."""

    coalesces = True

    async def __call__(self, call: Call, next: Handler) -> Any:
        return await next(call)


DEFAULT_OPTIONS: dict[str, Any] = {
    "key": None,
    "max_keys": 1024,
    "idle_after": 600.0,
    "max_concurrent": 10,
    "max_queue": 1000,
    "max_wait": None,
    "name": None,
}


def test_describe_gives_the_name_every_option_and_whether_it_lends_permits() -> None:
    assert Bulkhead().describe() == {
        "layer": "Bulkhead",
        "name": "Bulkhead",
        "options": DEFAULT_OPTIONS,
        "lends_permits": False,
    }
    named = Bulkhead(2, name="db")
    Pipeline(sleeper, named, Coalescing())
    assert named.describe() == {
        "layer": "Bulkhead",
        "name": "db",
        "options": {**DEFAULT_OPTIONS, "max_concurrent": 2, "name": "db"},
        "lends_permits": True,
    }


class Plain:
    """A layer that says nothing about coalescing (no ``coalesces`` attribute at all)."""

    async def __call__(self, call: Call, next: Handler) -> Any:
        return await next(call)


def test_only_a_coalescing_layer_below_makes_it_lend_permits() -> None:
    above = Bulkhead()
    Pipeline(sleeper, Coalescing(), above)
    assert above.describe()["lends_permits"] is False
    over_plain = Bulkhead()
    Pipeline(sleeper, over_plain, Plain(), Timeout(5))
    assert over_plain.describe()["lends_permits"] is False


class Follower:
    """Below the bulkhead, as a single-flight Cache's follower: a ``follow`` call lends its permit while it waits
    for ``release``, then takes one back before it runs."""

    coalesces = True

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.lent: list[bool] = []

    async def __call__(self, call: Call, next: Handler) -> Any:
        if call.inputs["question"].startswith("follow"):
            lend_leases(call)
            self.lent.append(leases_lent(call))
            await self.release.wait()
            await reclaim_leases(call)
        return await next(call)


async def test_a_follower_lends_its_permit_while_it_waits_and_takes_one_back_before_it_runs() -> None:
    """1 slot: the follower's lent slot lets another call run at once; released at t=0.5, the follower queues for
    a slot again (busy until t=2) and runs after, so no more than one call ever runs below the bulkhead."""
    follower = Follower()
    bulkhead = Bulkhead(1, max_queue=5)
    pipeline = Pipeline(sleeper, bulkhead, follower)
    first = asyncio.create_task(pipeline("follow|1"))
    await settle()
    assert bulkhead.snapshot() == BulkheadSnapshot(None, 0, 0, 1, 5) and follower.lent == [True]
    other = asyncio.create_task(pipeline("other|2"))
    await settle()
    assert bulkhead.snapshot() == BulkheadSnapshot(None, 1, 0, 1, 5)  # ran at once, in the lent slot
    await asyncio.sleep(0.5)
    follower.release.set()
    await settle()
    assert bulkhead.snapshot() == BulkheadSnapshot(None, 1, 1, 1, 5)  # the follower queues to take a slot back
    assert await other == "other|2" and now() == 2.0
    assert await first == "follow|1" and now() == 3.0
    assert bulkhead.snapshot() == BulkheadSnapshot(None, 0, 0, 1, 5)


def by_key_after_follow(call: Any) -> str:
    key: str = call.inputs["question"].split("|")[0].removeprefix("follow-")
    return key


async def test_a_keyed_follower_takes_a_permit_back_in_its_own_compartment() -> None:
    """Key a, 1 slot: the follower's slot goes to a|2 while it waits; released at t=0.5 it queues in a's
    compartment (not another's) behind a|2, so it runs from t=2 to t=3."""
    follower = Follower()
    events: list[Event] = []
    bulkhead = Bulkhead(1, max_queue=5, key=by_key_after_follow)
    pipeline = Pipeline(sleeper, bulkhead, follower, listeners=[events.append])
    assert await pipeline("b|0") == "b|0"  # another key exists: a's lookups sweep past it
    first = asyncio.create_task(pipeline("follow-a|1"))
    await settle()
    other = asyncio.create_task(pipeline("a|2"))
    await settle()
    assert bulkhead.snapshot("a") == BulkheadSnapshot("a", 1, 0, 1, 5)
    await asyncio.sleep(0.5)
    follower.release.set()
    await settle()
    assert bulkhead.snapshot("a") == BulkheadSnapshot("a", 1, 1, 1, 5)
    assert set(bulkhead.snapshots()) == {"a", "b"}
    assert await other == "a|2" and now() == 2.0
    assert await first == "follow-a|1" and now() == 3.0
    assert [(type(e), e.key) for e in events] == [(BulkheadQueued, "a"), (BulkheadAcquired, "a")]  # type: ignore[attr-defined]


async def test_a_follower_takes_a_free_slot_back_at_once_beside_a_running_call() -> None:
    follower = Follower()
    bulkhead = Bulkhead(2, max_queue=5)
    pipeline = Pipeline(sleeper, bulkhead, follower)
    first = asyncio.create_task(pipeline("follow|1"))
    await settle()
    other = asyncio.create_task(pipeline("other|5"))
    await settle()
    follower.release.set()
    await settle()
    assert bulkhead.snapshot() == BulkheadSnapshot(None, 2, 0, 2, 5)
    assert await first == "follow|1" and now() == 1.0
    assert await other == "other|5"


async def test_a_follower_below_two_bulkheads_lends_both_permits() -> None:
    follower = Follower()
    outer, inner = Bulkhead(1, max_queue=5), Bulkhead(1, max_queue=5)
    pipeline = Pipeline(sleeper, outer, inner, follower)
    first = asyncio.create_task(pipeline("follow|1"))
    await settle()
    assert outer.snapshot().in_flight == inner.snapshot().in_flight == 0
    other = asyncio.create_task(pipeline("other|2"))
    await settle()
    assert outer.snapshot().in_flight == inner.snapshot().in_flight == 1  # through both lent slots at once
    follower.release.set()
    assert await other == "other|2" and await first == "follow|1" and now() == 3.0


async def test_a_full_queue_rejects_at_once_naming_the_layer_and_its_occupancy() -> None:
    events: list[Event] = []
    bulkhead = Bulkhead(1, max_queue=0, name="bh")
    pipeline = Pipeline(sleeper, bulkhead, name="p", listeners=[events.append])
    running = asyncio.create_task(pipeline("5"))
    await asyncio.sleep(1)
    with pytest.raises(BulkheadFullError) as caught:
        await pipeline("0")
    says(caught.value, "bh:", "1/1", "0 queued")  # no key to show
    assert caught.value.retry_after is None
    assert events == [BulkheadRejected(pipeline="p", layer="bh", time=1.0, key=None, reason="queue_full", waited=0.0)]
    assert await running == "5"


async def test_partitioned_queue_events_and_max_wait_rejections_carry_the_key() -> None:
    events: list[Event] = []
    bulkhead = Bulkhead(1, max_queue=2, max_wait=3, key=by_prefix)
    pipeline = Pipeline(sleeper, bulkhead, name="p", listeners=[events.append])
    running = asyncio.create_task(pipeline("a|10"))
    await asyncio.sleep(1)
    first = asyncio.create_task(pipeline("a|0"))
    await asyncio.sleep(1)
    second = asyncio.create_task(pipeline("a|0"))
    await settle()
    assert bulkhead.snapshot("a") == BulkheadSnapshot("a", 1, 2, 1, 2)
    assert bulkhead.snapshot("zz") == BulkheadSnapshot("zz", 0, 0, 1, 2)
    assert bulkhead.snapshots() == {"a": BulkheadSnapshot("a", 1, 2, 1, 2)}
    with pytest.raises(BulkheadFullError) as caught:
        await first
    says(caught.value, "Bulkhead['a']:", "1/1", "1 queued")
    with pytest.raises(BulkheadFullError):
        await second
    assert events == [
        BulkheadQueued(pipeline="p", layer="Bulkhead", time=1.0, key="a", position=1),
        BulkheadQueued(pipeline="p", layer="Bulkhead", time=2.0, key="a", position=2),
        BulkheadRejected(pipeline="p", layer="Bulkhead", time=4.0, key="a", reason="max_wait", waited=3.0),
        BulkheadRejected(pipeline="p", layer="Bulkhead", time=5.0, key="a", reason="max_wait", waited=3.0),
    ]
    assert await running == "a|10"


async def test_the_acquired_event_reports_the_time_spent_queued() -> None:
    events: list[Event] = []
    bulkhead = Bulkhead(1, max_queue=1, name="bh")
    pipeline = Pipeline(sleeper, bulkhead, name="p", listeners=[events.append])
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
async def test_whichever_of_max_wait_and_the_deadline_ends_first_is_the_reason(
    max_wait: Any, deadline: float, reason: str, waited: float
) -> None:
    events: list[Event] = []
    bulkhead = Bulkhead(1, max_queue=1, max_wait=max_wait, name="bh")
    pipeline = Pipeline(sleeper, bulkhead, name="p", listeners=[events.append])
    running = asyncio.create_task(pipeline("10"))
    await asyncio.sleep(1)
    call = pipeline.new_call({"question": "0"}, deadline=deadline)
    with pytest.raises(BulkheadFullError) as caught:
        await pipeline.run(call)
    says(caught.value, "bh:", reason, "1/1", "0 queued")
    assert events[-1] == BulkheadRejected(
        pipeline="p", layer="bh", time=1.0 + waited, key=None, reason=reason, waited=waited
    )
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running


async def test_a_deadline_already_reached_is_rejected_at_once_without_queueing() -> None:
    events: list[Event] = []
    bulkhead = Bulkhead(1, max_queue=1, name="bh")
    pipeline = Pipeline(sleeper, bulkhead, name="p", listeners=[events.append])
    running = asyncio.create_task(pipeline("10"))
    await asyncio.sleep(1)
    with pytest.raises(BulkheadFullError) as caught:
        await pipeline.run(pipeline.new_call({"question": "0"}, deadline=1.0))
    says(caught.value, "bh:", "deadline", "1/1", "0 queued")
    assert events == [BulkheadRejected(pipeline="p", layer="bh", time=1.0, key=None, reason="deadline", waited=0.0)]
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running


async def test_health_is_degraded_while_a_compartment_is_full() -> None:
    bulkhead = Bulkhead(1, max_queue=1, name="bh")
    pipeline = Pipeline(sleeper, bulkhead)
    ok = {"*": {"in_flight": 0, "queued": 0, "max_concurrent": 1}}
    assert bulkhead.health() == LayerHealth("bh", "ok", {"compartments": ok})
    running = asyncio.create_task(pipeline("5"))
    queued = asyncio.create_task(pipeline("0"))
    await settle()
    full = {"*": {"in_flight": 1, "queued": 1, "max_concurrent": 1}}
    assert bulkhead.health() == LayerHealth("bh", "degraded", {"compartments": full})
    assert bulkhead.snapshots() == {None: BulkheadSnapshot(None, 1, 1, 1, 1)}
    assert await running == "5" and await queued == "0"

    keyed = Bulkhead(2, key=by_prefix)
    pipeline = Pipeline(sleeper, keyed)
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
    pipeline = Pipeline(sleeper, bulkhead)
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
    pipeline = Pipeline(sleeper, bulkhead, name="p", listeners=[events.append])
    running = asyncio.create_task(pipeline("a|5"))
    await asyncio.sleep(1)
    with pytest.raises(BulkheadFullError) as caught:
        await pipeline.run(pipeline.new_call({"question": "a|0"}, deadline=1.0))
    says(caught.value, "bh['a']:", "deadline", "1/1", "0 queued")
    assert await pipeline("a|0") == "a|0"
    assert await running == "a|5"
    assert events == [
        BulkheadRejected(pipeline="p", layer="bh", time=1.0, key="a", reason="deadline", waited=0.0),
        BulkheadQueued(pipeline="p", layer="bh", time=1.0, key="a", position=1),
        BulkheadAcquired(pipeline="p", layer="bh", time=5.0, key="a", waited=4.0),
    ]


# ------------------------------------------------------------------------------------------------ 8. property


Arrival = tuple[float, float, float | None]  # gap before arriving, run time, cancel after (None = never)


@settings(max_examples=120, deadline=None)
@example(  # a waiter handed a permit at t=1 and a newcomer admitted to a slot freed at t=1 resume in one step
    max_concurrent=4,
    max_queue=2,
    max_wait=None,
    arrivals=[(0.0, 1.0, None)] * 3 + [(0.0, 2.0, None), (0.5, 0.1, None), (0.0, 0.1, None), (0.5, 0.1, None)],
)
@given(
    max_concurrent=st.integers(1, 4),
    max_queue=st.integers(0, 6),
    max_wait=st.none() | st.sampled_from([0.5, 1.0, 3.0]),
    arrivals=st.lists(
        st.tuples(
            st.sampled_from([0.0, 0.0, 0.1, 0.25, 0.5]),
            st.sampled_from([0.1, 0.3, 1.0, 2.0]),
            st.none() | st.sampled_from([0.0, 0.2, 0.7, 1.5]),
        ),
        min_size=1,
        max_size=25,
    ),
)
def test_property_bound_fifo_and_no_leak(
    max_concurrent: int, max_queue: int, max_wait: float | None, arrivals: list[Arrival]
) -> None:
    """Any arrivals, run times and cancellations: never more than max_concurrent running, permits granted in
    arrival order (waiters start in order; nobody is admitted at once while an earlier call still waits), every
    call accounted for, and the full capacity usable at the end.

    Program start order alone is not the grant order: a waiter handed a permit resumes one loop step later, so a
    newcomer that takes a slot freed in that same step (hypothesis found this) may start first without barging.
    """

    async def scenario() -> None:
        active = peak = 0
        started: list[int] = []
        waited: set[int] = set()
        barged: list[tuple[int, int]] = []

        class ArrivalSpy:
            """Directly above the bulkhead: sees its occupancy in the same step as its admission decision."""

            async def __call__(self, call: Call, next: Handler) -> Any:
                index = int(call.inputs["question"])
                snapshot = bulkhead.snapshot()
                if snapshot.in_flight >= max_concurrent:
                    waited.add(index)
                elif snapshot.queued:
                    barged.append((index, snapshot.queued))
                return await next(call)

        async def program(question: str) -> str:
            nonlocal active, peak
            index = int(question)
            started.append(index)
            active += 1
            peak = max(peak, active)
            try:
                await asyncio.sleep(arrivals[index][1])
            finally:
                active -= 1
            return question

        bulkhead = Bulkhead(max_concurrent, max_queue=max_queue, max_wait=max_wait)
        pipeline = Pipeline(program, ArrivalSpy(), bulkhead)
        tasks: list[asyncio.Task[Any]] = []
        cancels: list[Awaitable[None]] = []

        async def cancel_later(task: asyncio.Task[Any], after: float) -> None:
            await asyncio.sleep(after)
            task.cancel()

        for index, (gap, _, cancel_after) in enumerate(arrivals):
            await asyncio.sleep(gap)
            task = asyncio.create_task(pipeline(question=str(index)))
            tasks.append(task)
            if cancel_after is not None:
                cancels.append(cancel_later(task, cancel_after))
        await asyncio.gather(*cancels)
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)

        for index, outcome in enumerate(outcomes):
            assert outcome == str(index) or isinstance(outcome, BulkheadFullError | asyncio.CancelledError)
            if isinstance(outcome, BulkheadFullError):
                assert index not in started
        assert peak <= max_concurrent
        assert barged == []  # admitted at once only when nobody earlier is still waiting
        queued_starts = [index for index in started if index in waited]
        assert queued_starts == sorted(queued_starts)  # each call arrives after the previous one: FIFO
        assert bulkhead.snapshot() == BulkheadSnapshot(None, 0, 0, max_concurrent, max_queue)

        release = asyncio.Event()

        async def hold(question: str) -> str:
            await release.wait()
            return question

        full = Pipeline(hold, bulkhead)
        holders = [asyncio.create_task(full(question=str(i))) for i in range(max_concurrent)]
        for _ in range(3):
            await asyncio.sleep(0)
        assert bulkhead.snapshot().in_flight == max_concurrent
        assert bulkhead.snapshot().queued == 0
        release.set()
        await asyncio.gather(*holders)

    loop = looptime.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(scenario(), timeout=100_000))  # virtual: a hang fails at once
    finally:
        loop.close()
