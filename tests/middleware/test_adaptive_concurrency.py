"""AdaptiveConcurrency: goodput near the knee of a provider that slows past it (both algorithms), the limit within
its bounds (hypothesis), the queue (FIFO, rejection, max_wait, deadline), cancellation without slot leaks
(hypothesis), neutral outcomes, partitions, events, validation, and what it reports.

Async tests run on looptime's virtual clock (``--looptime``); property tests build a looptime loop per example.
"""

from __future__ import annotations

import asyncio
from typing import Any

import dspy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_dspy import Bulkhead, BulkheadFullError, Cache, Pipeline, RejectedError, Retry, Timeout
from resilient_dspy.core.call import Call, Handler
from resilient_dspy.errors import ConfigurationError
from resilient_dspy.events import Event, Rejected
from resilient_dspy.faults import Fault, fault_error
from resilient_dspy.middleware.adaptive_concurrency import (
    AdaptiveConcurrency,
    AdaptiveConcurrencyRejected,
    ConcurrencyLimitChanged,
)
from resilient_dspy.testing.overload import KneeProvider, offer
from tests.conftest import other_tasks, run_virtual

ALGORITHMS = {"aimd": {"latency_threshold": 1.5}, "gradient": {}}


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


class Scripted:
    """A program whose question says what it does: ``"<latency>"`` answers after that long, ``"<latency>:503"``
    fails with a 503 after it, ``"<latency>:400"`` with a client error (``#tag`` after either part is ignored); it
    records the peak concurrency."""

    def __init__(self) -> None:
        self.active = 0
        self.peak = 0
        self.started: list[str] = []

    async def __call__(self, question: str) -> str:
        self.started.append(question)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            latency, _, fault = question.partition(":")
            fault = fault.split("#")[0]
            await asyncio.sleep(float(latency.split("#")[0]))
        finally:
            self.active -= 1
        if fault == "503":
            raise fault_error(Fault.SERVER_ERROR, status=503) or AssertionError
        if fault == "400":
            raise dspy.LMInvalidRequestError("bad request")
        return question


async def attempt(pipeline: Pipeline, question: str) -> str:
    try:
        return str(await pipeline(question=question))
    except Exception as error:
        return type(error).__name__


# ------------------------------------------------------------------------------------------------ 1. the knee


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
async def test_goodput_stays_near_the_knee_where_a_fixed_high_limit_collapses(algorithm: str) -> None:
    """12 calls/s offered to a provider that serves 8 at a time in 1 s and slows as (n/8)² past that (its best is
    8 answers/s): the adaptive limit keeps at least 60 % of that best, a Bulkhead(64) gets under 5 %."""
    seconds = 200

    async def goodput(layer: Any) -> float:
        provider = KneeProvider(knee=8, base=1.0, power=2.0)
        offered = await offer(Pipeline(provider, Timeout(10.0), layer), rate=12, duration=seconds)
        return offered.goodput(seconds)

    adaptive = AdaptiveConcurrency(algorithm, max_wait=2.0, **ALGORITHMS[algorithm])  # type: ignore[arg-type]
    learnt = await goodput(adaptive)
    fixed = await goodput(Bulkhead(64, max_wait=2.0))

    assert learnt >= 0.6 * 8
    assert fixed < 0.05 * 8
    assert 4 <= adaptive.snapshot().limit <= 16  # it settled around the knee, not at a bound
    assert not other_tasks()


# ------------------------------------------------------------------------------------------------ 2. bounds


@settings(max_examples=25, deadline=None)
@given(
    algorithm=st.sampled_from(sorted(ALGORITHMS)),
    bounds=st.tuples(st.integers(1, 6), st.integers(0, 6), st.integers(0, 12)).map(
        lambda t: (t[0], t[0] + t[1], t[0] + t[1] + t[2])
    ),
    waves=st.lists(
        st.lists(st.tuples(st.sampled_from([0.1, 1.0, 3.0]), st.sampled_from(["", ":503", ":400"])), max_size=12),
        min_size=1,
        max_size=8,
    ),
)
def test_the_limit_stays_within_its_bounds(
    algorithm: str, bounds: tuple[int, int, int], waves: list[list[tuple[float, str]]]
) -> None:
    """Whatever the latencies and errors, every limit it reports (snapshot, events) is within min..max, and it
    never runs more calls than the limit it had when each started."""
    low, initial, high = bounds

    async def scenario() -> None:
        program = Scripted()
        events: list[Event] = []
        extra = {"latency_threshold": 1.5} if algorithm == "aimd" else {"short_window": 2, "long_window": 20}
        layer = AdaptiveConcurrency(
            algorithm,  # type: ignore[arg-type]
            min_limit=low,
            initial_limit=initial,
            max_limit=high,
            **extra,  # type: ignore[arg-type]
        )
        pipeline = Pipeline(program, layer, listeners=[events.append])
        for number, wave in enumerate(waves):
            calls = [attempt(pipeline, f"{latency}#{number}.{i}{fault}") for i, (latency, fault) in enumerate(wave)]
            await asyncio.gather(*calls)
            assert low <= layer.snapshot().limit <= high
        changes = [e for e in events if isinstance(e, ConcurrencyLimitChanged)]
        assert all(low <= e.new <= high and low <= e.old <= high for e in changes)
        assert program.peak <= max([initial, *(e.new for e in changes)])
        assert layer.snapshot().in_flight == 0

    run_virtual(scenario)


async def test_aimd_grows_while_fast_and_backs_off_on_overload() -> None:
    """Fast successes with the limit in use raise it; a 503 cuts it by ``backoff``, with one event per move."""
    events: list[Event] = []
    layer = AdaptiveConcurrency("aimd", initial_limit=4, latency_threshold=1.0, backoff=0.5)
    pipeline = Pipeline(Scripted(), layer, listeners=[events.append])
    for round_ in range(8):
        await asyncio.gather(*(pipeline(question=f"0.1#{round_}.{i}") for i in range(4)))
    grown = layer.snapshot().limit
    assert grown > 4

    assert await attempt(pipeline, "0.1:503") == "LMServerError"
    assert layer.snapshot().limit == int(grown * 0.5) or layer.snapshot().limit < grown
    moves = [e for e in events if isinstance(e, ConcurrencyLimitChanged)]
    assert moves[0].reason == "increase" and moves[-1].reason == "drop" and moves[-1].new < moves[-1].old


async def test_aimd_backs_off_on_a_success_slower_than_the_threshold() -> None:
    layer = AdaptiveConcurrency("aimd", initial_limit=10, latency_threshold=1.0)
    pipeline = Pipeline(Scripted(), layer)
    await asyncio.gather(*(pipeline(question=f"2.0#{i}") for i in range(10)))
    assert layer.snapshot().limit < 10


async def test_the_gradient_cuts_the_limit_when_latency_rises_under_load() -> None:
    """Ten rounds at the baseline latency, then the same load twice as slow: the limit goes down."""
    layer = AdaptiveConcurrency("gradient", initial_limit=10, short_window=5, long_window=50)
    pipeline = Pipeline(Scripted(), layer)
    for round_ in range(10):
        await asyncio.gather(*(pipeline(question=f"1.0#{round_}.{i}") for i in range(10)))
    before = layer.snapshot()
    for round_ in range(10):
        await asyncio.gather(*(pipeline(question=f"3.0#{round_}.{i}") for i in range(before.limit)))
    after = layer.snapshot()
    assert after.limit < before.limit
    assert after.short_rtt is not None and after.long_rtt is not None and after.short_rtt > after.long_rtt


# ------------------------------------------------------------------------------------------------ 3. neutral


class Below:
    """Just below the layer: ``…|hit`` is answered without reaching the program, ``…|full`` refused by an inner
    layer; anything else reaches it."""

    async def __call__(self, call: Call, next: Handler) -> Any:
        question = call.inputs["question"]
        if question.endswith("|hit"):
            return "cached"
        if question.endswith("|full"):
            raise BulkheadFullError("inner")
        return await next(call)


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
async def test_outcomes_that_never_reached_the_provider_or_blame_the_caller_move_nothing(algorithm: str) -> None:
    """Answers from below (a cache hit), inner refusals, client errors and cancellations leave the limit and the
    gradient's samples as they were; slow ones would have moved it."""
    events: list[Event] = []
    extra = {"latency_threshold": 0.5} if algorithm == "aimd" else {"short_window": 1, "long_window": 2}
    layer = AdaptiveConcurrency(algorithm, initial_limit=5, **extra)  # type: ignore[arg-type]
    pipeline = Pipeline(Scripted(), layer, Below(), listeners=[events.append])
    before = layer.snapshot()
    for question in ("1.0|hit", "1.0|full", "3.0:400", "3.0:400"):
        await attempt(pipeline, question)
    cancelled = asyncio.create_task(pipeline(question="5.0"))
    await asyncio.sleep(1.0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert layer.snapshot() == before
    assert not [e for e in events if isinstance(e, ConcurrencyLimitChanged)]


async def test_a_single_flight_follower_and_a_cache_hit_do_not_count_as_samples() -> None:
    """Below a real Cache: five identical concurrent calls (one miss, four followers) and a later hit feed one
    sample, so a short window of two has not been filled."""
    layer = AdaptiveConcurrency("gradient", short_window=2, long_window=20)
    pipeline = Pipeline(Scripted(), layer, Cache())
    await asyncio.gather(*(pipeline(question="1.0") for _ in range(5)))
    await pipeline(question="1.0")
    assert layer.snapshot().short_rtt is None
    await pipeline(question="1.0#other")
    assert layer.snapshot().short_rtt == pytest.approx(1.0)


async def test_single_flight_followers_lend_their_slot_while_they_wait() -> None:
    """Limit 2 over a single-flight Cache: one leader and three followers of one question hold one slot between
    them, so another question runs at once instead of queueing behind them; the limit is never exceeded."""
    program = Scripted()
    layer = AdaptiveConcurrency(initial_limit=2, min_limit=2, max_limit=2)
    pipeline = Pipeline(program, layer, Cache())
    same = [asyncio.create_task(pipeline(question="3.0#same")) for _ in range(4)]
    await settle()
    other = asyncio.create_task(pipeline(question="1.0#other"))
    await settle()
    assert program.started == ["3.0#same", "1.0#other"]
    assert await other == "1.0#other"
    await asyncio.gather(*same)
    assert program.peak <= 2 and layer.describe()["lends_slots"] is True
    assert (layer.snapshot().in_flight, layer.snapshot().queued) == (0, 0)


# ------------------------------------------------------------------------------------------------ 4. the queue


async def test_beyond_the_queue_a_call_is_refused_at_once_and_retry_does_not_retry_it() -> None:
    program = Scripted()
    events: list[Event] = []
    layer = AdaptiveConcurrency(initial_limit=2, min_limit=2, max_limit=2, max_queue=1)
    pipeline = Pipeline(program, Retry(3, base_delay=0.1), layer, listeners=[events.append])
    busy = [asyncio.create_task(pipeline(question=f"5.0#{i}")) for i in range(3)]
    await settle()
    started = asyncio.get_running_loop().time()
    with pytest.raises(BulkheadFullError) as caught:
        await pipeline(question="0.1#late")
    assert isinstance(caught.value, RejectedError)
    assert asyncio.get_running_loop().time() == started
    rejected = [e for e in events if isinstance(e, Rejected)]
    assert len(rejected) == 1 and isinstance(rejected[0], AdaptiveConcurrencyRejected)
    assert rejected[0].reason == "queue_full" and rejected[0].limit == 2
    await asyncio.gather(*busy)
    assert "0.1#late" not in program.started


async def test_waiters_run_in_arrival_order_and_give_up_at_max_wait() -> None:
    program = Scripted()
    events: list[Event] = []
    layer = AdaptiveConcurrency(initial_limit=1, min_limit=1, max_limit=1, max_wait=2.5)
    pipeline = Pipeline(program, Timeout(20.0), layer, listeners=[events.append])
    first = asyncio.create_task(attempt(pipeline, "2.0#first"))
    await settle()
    second = asyncio.create_task(attempt(pipeline, "0.1#second"))
    await settle()
    third = asyncio.create_task(attempt(pipeline, "0.1#third"))
    assert await first == "2.0#first"
    assert await second == "0.1#second" and await third == "0.1#third"
    assert program.started == ["2.0#first", "0.1#second", "0.1#third"]

    slow = asyncio.create_task(attempt(pipeline, "10.0#slow"))
    await settle()
    waited_from = asyncio.get_running_loop().time()
    assert await attempt(pipeline, "0.1#starved") == "BulkheadFullError"
    assert asyncio.get_running_loop().time() - waited_from == pytest.approx(2.5)
    assert [e.reason for e in events if isinstance(e, AdaptiveConcurrencyRejected)] == ["max_wait"]
    assert await slow == "10.0#slow"


async def test_the_call_deadline_bounds_the_queue_wait() -> None:
    """Without max_wait, a queued call gives up at its deadline; one whose deadline has passed is refused at once."""
    events: list[Event] = []
    layer = AdaptiveConcurrency(initial_limit=1, min_limit=1, max_limit=1)
    pipeline = Pipeline(Scripted(), layer, listeners=[events.append])
    busy = asyncio.create_task(pipeline(question="10.0#busy"))
    await settle()
    started = asyncio.get_running_loop().time()
    with pytest.raises(BulkheadFullError):
        await pipeline.run(pipeline.new_call({"question": "0.1#late"}, deadline=started + 3.0))
    assert asyncio.get_running_loop().time() - started == pytest.approx(3.0)
    with pytest.raises(BulkheadFullError):
        await pipeline.run(pipeline.new_call({"question": "0.1#past"}, deadline=started - 1.0))
    assert [e.reason for e in events if isinstance(e, AdaptiveConcurrencyRejected)] == ["deadline", "deadline"]
    await busy


async def test_a_raised_limit_wakes_waiters_in_order_before_any_newcomer() -> None:
    """AIMD at limit 1 with waiters queued: each fast success raises the limit and hands the new slots to the
    queue's head, so the calls start in arrival order."""
    program = Scripted()
    layer = AdaptiveConcurrency("aimd", initial_limit=1, latency_threshold=5.0)
    pipeline = Pipeline(program, layer)
    calls = [asyncio.create_task(pipeline(question=f"0.5#{i}")) for i in range(12)]
    await asyncio.gather(*calls)
    assert program.started == [f"0.5#{i}" for i in range(12)]
    assert layer.snapshot().limit > 1


# ------------------------------------------------------------------------------------------------ 5. cancellation


@settings(max_examples=30, deadline=None)
@given(
    algorithm=st.sampled_from(sorted(ALGORITHMS)),
    plan=st.lists(
        st.tuples(st.sampled_from([0.5, 1.0, 4.0]), st.one_of(st.none(), st.sampled_from([0.0, 0.3, 1.5, 6.0]))),
        min_size=1,
        max_size=25,
    ),
)
def test_cancelled_calls_running_or_queued_leak_no_slot(algorithm: str, plan: list[tuple[float, float | None]]) -> None:
    """Calls cancelled at any moment (queued, just handed a slot, running) leave nothing held: afterwards the
    layer is empty and a burst of ``limit`` calls runs at once; no task is left behind."""

    async def scenario() -> None:
        program = Scripted()
        extra = {"latency_threshold": 2.0} if algorithm == "aimd" else {"short_window": 2, "long_window": 20}
        layer = AdaptiveConcurrency(algorithm, initial_limit=3, max_queue=100, **extra)  # type: ignore[arg-type]
        pipeline = Pipeline(program, layer)
        tasks = [asyncio.create_task(pipeline(question=f"{latency}#{i}")) for i, (latency, _) in enumerate(plan)]

        async def cancel_later(task: asyncio.Task[Any], after: float) -> None:
            await asyncio.sleep(after)
            task.cancel()

        cancellers = [
            asyncio.create_task(cancel_later(task, after))
            for task, (_, after) in zip(tasks, plan, strict=True)
            if after is not None
        ]
        await asyncio.gather(*tasks, *cancellers, return_exceptions=True)
        snapshot = layer.snapshot()
        assert (snapshot.in_flight, snapshot.queued) == (0, 0)
        program.peak = 0
        await asyncio.gather(*(pipeline(question=f"1.0#again{i}") for i in range(snapshot.limit)))
        assert program.peak == snapshot.limit
        assert not other_tasks()

    run_virtual(scenario)


# ------------------------------------------------------------------------------------------------ 6. partitions


async def test_each_key_learns_its_own_limit() -> None:
    layer = AdaptiveConcurrency(
        "aimd", initial_limit=4, latency_threshold=1.0, key=lambda call: call.inputs["question"][-1]
    )
    pipeline = Pipeline(Scripted(), layer)
    await asyncio.gather(*(attempt(pipeline, f"0.1:503#{i}a") for i in range(4)))
    for round_ in range(6):
        await asyncio.gather(*(pipeline(question=f"0.1#{round_}.{i}b") for i in range(4)))
    assert layer.snapshot("a").limit < 4 < layer.snapshot("b").limit
    assert set(layer.snapshots()) == {"a", "b"}


# ------------------------------------------------------------------------------------------------ 7. reports


async def test_snapshot_health_and_describe_show_the_current_limit() -> None:
    layer = AdaptiveConcurrency(initial_limit=2, min_limit=2, max_limit=2, name="adaptive")
    pipeline = Pipeline(Scripted(), layer)
    assert layer.health().status == "ok"
    busy = [asyncio.create_task(pipeline(question=f"1.0#{i}")) for i in range(3)]
    await settle()
    health = layer.health()
    assert health.status == "degraded"
    assert health.details["limits"]["*"] == {"limit": 2, "in_flight": 2, "queued": 1}
    await asyncio.gather(*busy)
    assert layer.health().status == "ok"
    described = pipeline.describe()[0]
    assert described["layer"] == "AdaptiveConcurrency" and described["name"] == "adaptive"
    assert described["options"]["algorithm"] == "gradient"


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"algorithm": "vegas"}, "algorithm"),
        ({"min_limit": 5, "max_limit": 4, "initial_limit": 4}, "min_limit"),
        ({"initial_limit": 300}, "initial_limit"),
        ({"backoff": 1.5}, "backoff"),
        ({"tolerance": 0.5}, "tolerance"),
        ({"short_window": 50, "long_window": 20}, "short_window"),
        ({"latency_threshold": 1.0}, "latency_threshold"),
        ({"max_queue": -1}, "max_queue"),
    ],
)
def test_a_bad_option_is_a_configuration_error_naming_the_field(arguments: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        AdaptiveConcurrency(**arguments)
    assert f"AdaptiveConcurrency.{field}" in str(caught.value)
