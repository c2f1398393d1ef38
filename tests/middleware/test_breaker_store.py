"""CircuitBreaker(store=RedisStore) against a real redis-server: one circuit per key for every process (two layers
on two stores with the same prefix and name stand for two processes; a subprocess test makes it literal), the
in-memory breaker's semantics kept, probe leases that expire, and the server stopped and restarted mid-run."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resilient_dspy import CircuitBreaker, CircuitOpenError, Pipeline, RedisStore, RetriesExhaustedError, Retry
from resilient_dspy.events import Event
from resilient_dspy.middleware.breaker import CircuitRejected, CircuitState, CircuitWaited
from resilient_dspy.store import StoreRecovered, StoreUnavailable
from tests.redis_server import free_port, redis_server

from .breaker_steps import by_prefix, program, run

pytestmark = [pytest.mark.redis, pytest.mark.looptime(False)]

ROOT = Path(__file__).resolve().parents[2]


def stores(url: str, count: int = 2, **options: float) -> list[RedisStore]:
    """``count`` stores (one per simulated process) sharing one fresh prefix."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    return [RedisStore(url, prefix=prefix, **options) for _ in range(count)]  # type: ignore[arg-type]


async def closing(*opened: RedisStore) -> None:
    for store in opened:
        await store.aclose()


async def test_a_trip_in_one_process_rejects_in_the_other_at_its_next_call(redis_url: str) -> None:
    a_store, b_store = stores(redis_url)
    try:
        a = Pipeline(program, CircuitBreaker(2, break_duration=30, store=a_store, name="cb"))
        b = Pipeline(program, CircuitBreaker(2, break_duration=30, store=b_store, name="cb"))
        other = Pipeline(program, CircuitBreaker(2, break_duration=30, store=b_store, name="another"))
        assert await run(a, "fail") == "error"
        assert await run(b, "fail") == "error"  # the second consecutive failure, counted across both: trips
        with pytest.raises(CircuitOpenError) as raised:
            await a("ok")
        assert 29 < (raised.value.retry_after or 0) <= 30
        assert await run(b, "ok") == "rejected"
        assert await run(other, "ok") == "answer"  # name= is the identity: another breaker, another circuit
    finally:
        await closing(a_store, b_store)


async def test_a_success_in_another_process_resets_the_consecutive_count(redis_url: str) -> None:
    a_store, b_store = stores(redis_url)
    try:
        a = Pipeline(program, CircuitBreaker(2, store=a_store, name="cb"))
        b = Pipeline(program, CircuitBreaker(2, store=b_store, name="cb"))
        assert [await run(a, "fail"), await run(b, "ok"), await run(a, "fail")] == ["error", "answer", "error"]
        assert await run(b, "ok") == "answer"
    finally:
        await closing(a_store, b_store)


async def test_a_count_window_judges_every_outcome_once_min_calls_are_seen_across_processes(redis_url: str) -> None:
    a_store, b_store = stores(redis_url)
    try:
        options = {"failure_rate": 0.5, "window": 4, "min_calls": 4, "name": "cb"}
        a_breaker = CircuitBreaker(store=a_store, **options)  # type: ignore[arg-type]
        a = Pipeline(program, a_breaker)
        b = Pipeline(program, CircuitBreaker(store=b_store, **options))  # type: ignore[arg-type]
        for pipeline, step in [(a, "fail"), (b, "fail"), (a, "ok")]:
            await run(pipeline, step)
        assert a_breaker.snapshot().state is CircuitState.CLOSED  # 2 of 3: below min_calls
        assert await run(b, "ok") == "answer"  # 2 of 4 = 0.5: trips on this success
        assert await run(a, "ok") == "rejected"
    finally:
        await closing(a_store, b_store)


async def test_a_time_window_forgets_failures_older_than_its_span(redis_url: str) -> None:
    (store,) = stores(redis_url, 1)
    try:
        breaker = CircuitBreaker(failure_rate=0.5, window_seconds=0.6, buckets=3, min_calls=2, store=store, name="cb")
        pipeline = Pipeline(program, breaker)
        assert await run(pipeline, "fail") == "error"
        await asyncio.sleep(1.0)  # the failure's bucket has left the window
        assert await run(pipeline, "ok") == "answer"
        assert await run(pipeline, "ok") == "answer"
        assert breaker.snapshot().failures == 0
    finally:
        await store.aclose()


async def test_neutral_outcomes_count_for_nothing(redis_url: str) -> None:
    (store,) = stores(redis_url, 1)
    try:
        breaker = CircuitBreaker(1, store=store, name="cb")
        pipeline = Pipeline(program, breaker)
        for _ in range(3):
            assert await run(pipeline, "excl") == "error"  # a client error: neither success nor failure
        assert breaker.snapshot().state is CircuitState.CLOSED
        assert breaker.snapshot().calls == 0
    finally:
        await store.aclose()


async def test_half_open_admits_at_most_the_probes_across_processes(redis_url: str) -> None:
    opened = stores(redis_url, 3)
    try:
        breakers = [CircuitBreaker(1, break_duration=0.3, half_open_probes=2, store=s, name="cb") for s in opened]
        pipelines = [Pipeline(program, b) for b in breakers]
        assert await run(pipelines[0], "fail") == "error"
        await asyncio.sleep(0.4)
        answers = await asyncio.gather(*(run(p, "sleep:0.2:ok") for p in pipelines for _ in range(3)))
        assert sorted(answers).count("answer") == 2  # two probes in the cluster, the seven others refused
        assert await run(pipelines[2], "ok") == "answer"  # both probes succeeded: closed everywhere
    finally:
        await closing(*opened)


async def test_a_hung_probe_gives_its_lease_back_one_break_later(redis_url: str) -> None:
    a_store, b_store = stores(redis_url)
    try:
        a = Pipeline(program, CircuitBreaker(1, break_duration=0.3, store=a_store, name="cb"))
        b_breaker = CircuitBreaker(1, break_duration=0.3, store=b_store, name="cb")
        b = Pipeline(program, b_breaker)
        assert await run(a, "fail") == "error"
        await asyncio.sleep(0.35)
        hung = asyncio.create_task(run(a, "sleep:5:ok"))  # stands for a prober that crashed: it never reports
        await asyncio.sleep(0.1)
        assert await run(b, "ok") == "rejected"
        await asyncio.sleep(0.3)
        assert await run(b, "ok") == "answer"  # the lease expired on the server: B probed and closed it
        assert b_breaker.snapshot().state is CircuitState.CLOSED
        hung.cancel()
        with pytest.raises(asyncio.CancelledError):
            await hung
    finally:
        await closing(a_store, b_store)


async def test_a_failed_probe_reopens_with_the_break_grown_for_every_process(redis_url: str) -> None:
    a_store, b_store = stores(redis_url)
    try:
        options = {"break_duration": 0.3, "break_multiplier": 3.0, "name": "cb"}
        a = Pipeline(program, CircuitBreaker(1, store=a_store, **options))  # type: ignore[arg-type]
        b = Pipeline(program, CircuitBreaker(1, store=b_store, **options))  # type: ignore[arg-type]
        assert await run(a, "fail") == "error"
        await asyncio.sleep(0.35)
        assert await run(b, "fail") == "error"  # the probe
        with pytest.raises(CircuitOpenError) as raised:
            await a("ok")
        assert 0.8 < (raised.value.retry_after or 0) <= 0.9
    finally:
        await closing(a_store, b_store)


async def test_the_trip_tells_an_outer_retry_when_the_circuit_lets_calls_through(redis_url: str) -> None:
    (store,) = stores(redis_url, 1)
    try:
        breaker = CircuitBreaker(1, break_duration=30, store=store, name="cb")
        pipeline = Pipeline(program, Retry(3, base_delay=0, max_retry_after=1.0), breaker)
        with pytest.raises(RetriesExhaustedError) as raised:
            await pipeline("fail")
        assert raised.value.reason == "circuit_open"
    finally:
        await store.aclose()


async def test_a_waiter_in_one_process_waits_for_the_break_another_process_started(redis_url: str) -> None:
    a_store, b_store = stores(redis_url)
    try:
        a = Pipeline(program, CircuitBreaker(1, break_duration=0.5, store=a_store, name="cb"))
        events: list[Event] = []
        b_breaker = CircuitBreaker(
            1, break_duration=0.5, wait_for_half_open=True, max_wait=2.0, store=b_store, name="cb"
        )
        b = Pipeline(program, b_breaker, listeners=[events.append])
        assert await run(a, "fail") == "error"
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await run(b, "ok") == "answer"
        assert 0.4 < loop.time() - started < 1.5
        assert [e.admitted for e in events if isinstance(e, CircuitWaited)] == [True]
        assert b_breaker.snapshot().state is CircuitState.CLOSED
    finally:
        await closing(a_store, b_store)


async def test_partitions_are_separate_circuits_on_the_store(redis_url: str) -> None:
    (store,) = stores(redis_url, 1)
    try:
        breaker = CircuitBreaker(1, key=by_prefix, store=store, name="cb")
        pipeline = Pipeline(program, breaker)
        assert await run(pipeline, "a|fail") == "error"
        assert await run(pipeline, "a|ok") == "rejected"
        assert await run(pipeline, "b|ok") == "answer"
        assert breaker.snapshot("a").state is CircuitState.OPEN
        await breaker.areset("a")
        assert await run(pipeline, "a|ok") == "answer"
    finally:
        await store.aclose()


async def test_isolation_on_the_store_refuses_in_every_process(redis_url: str) -> None:
    a_store, b_store = stores(redis_url)
    try:
        a_breaker = CircuitBreaker(store=a_store, name="cb")
        b = Pipeline(program, CircuitBreaker(store=b_store, name="cb"))
        await a_breaker.aisolate()
        assert await run(b, "ok") == "rejected"
        await a_breaker.areset()
        assert await run(b, "ok") == "answer"
        with pytest.raises(RuntimeError, match="areset"):
            a_breaker.reset()
    finally:
        await closing(a_store, b_store)


async def test_local_mode_serves_on_in_process_state_through_an_outage_and_shares_again_after() -> None:
    port = free_port()
    events: list[Event] = []
    with redis_server(port) as url:
        store = RedisStore(url, prefix="outage-local", timeout=0.3, retry_interval=0.2)
        breaker = CircuitBreaker(2, break_duration=30, store=store, name="cb")
        pipeline = Pipeline(program, breaker, listeners=[events.append])
        assert await run(pipeline, "ok") == "answer"
        assert breaker.health().status == "ok"
    try:
        # the server is gone: calls go on, judged by this process alone
        assert await run(pipeline, "ok") == "answer"
        assert breaker.health().status == "degraded"
        assert [await run(pipeline, "fail") for _ in range(2)] == ["error", "error"]
        assert await run(pipeline, "ok") == "rejected"  # the local circuit tripped
        assert len([e for e in events if isinstance(e, StoreUnavailable)]) == 1  # once per outage
        with redis_server(port):
            await asyncio.sleep(0.3)
            assert await run(pipeline, "ok") == "answer"  # a new, empty server: closed, shared again
            assert [e.store for e in events if isinstance(e, StoreRecovered)] == [store.name]
            assert breaker.health().status == "ok"
    finally:
        await store.aclose()


async def test_reject_mode_refuses_with_the_stores_retry_interval_during_an_outage() -> None:
    port = free_port()
    events: list[Event] = []
    with redis_server(port) as url:
        store = RedisStore(url, prefix="outage-reject", timeout=0.3, retry_interval=0.5)
        breaker = CircuitBreaker(store=store, on_store_failure="reject", name="cb")
        pipeline = Pipeline(program, breaker, listeners=[events.append])
        assert await run(pipeline, "ok") == "answer"
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        for _ in range(5):
            with pytest.raises(CircuitOpenError) as raised:
                await pipeline("ok")
            assert raised.value.retry_after == 0.5
        assert loop.time() - started < 1.0  # one timeout at most, then at once: never hangs
        assert breaker.health().status == "down"
        assert len([e for e in events if isinstance(e, CircuitRejected)]) == 5
        with redis_server(port):
            await asyncio.sleep(0.6)
            assert await run(pipeline, "ok") == "answer"
    finally:
        await store.aclose()


async def test_describe_names_the_store_without_secrets(redis_url: str) -> None:
    store = RedisStore("redis://user:s3cret@127.0.0.1:1/0", prefix="p")
    breaker = CircuitBreaker(store=store, name="cb")
    described = breaker.describe()
    assert described["options"]["store"]["store"] == "RedisStore"
    assert "s3cret" not in str(described)
    await store.aclose()


def test_a_breaker_tripped_in_process_a_rejects_in_process_b(redis_url: str) -> None:
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    script = str(Path(__file__).resolve().parents[1] / "store" / "breaker_process.py")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def process(step: str) -> str:
        proc = subprocess.Popen(
            [sys.executable, script, redis_url, prefix, step], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
        )
        try:
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return out.strip()

    assert process("ok") == "answer"
    assert process("fail") == "error"  # process A trips the circuit
    assert process("ok") == "rejected"  # process B, started after, is refused on its first call


STEPS = st.lists(st.sampled_from(["ok", "fail", "excl"]), min_size=1, max_size=25)
MODES = st.sampled_from(
    [
        {"failure_threshold": 3},
        {"failure_rate": 0.5, "window": 6, "min_calls": 4},
        {"failure_rate": 0.4, "window_seconds": 60.0, "min_calls": 3},
    ]
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=STEPS, mode=MODES)
def test_on_a_store_every_outcome_and_refusal_is_the_in_memory_breakers(
    redis_url: str, steps: list[str], mode: dict[str, Any]
) -> None:
    """The same calls through an in-memory breaker and a shared one (alternating between two "processes") give
    the same answers, refusals and counts."""

    async def both() -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
        opened = stores(redis_url)
        try:
            memory = CircuitBreaker(break_duration=600, **mode)
            shared = [CircuitBreaker(break_duration=600, store=s, name="cb", **mode) for s in opened]
            local = Pipeline(program, memory)
            remote = [Pipeline(program, b) for b in shared]
            seen_memory, seen_shared = [], []
            for index, step in enumerate(steps):
                seen_memory.append((await run(local, step), counts(memory.snapshot())))
                breaker = shared[index % 2]
                seen_shared.append((await run(remote[index % 2], step), counts(breaker.snapshot())))
            return seen_memory, seen_shared
        finally:
            await closing(*opened)

    seen_memory, seen_shared = asyncio.run(both())
    assert seen_shared == seen_memory


def counts(snapshot: Any) -> tuple[Any, ...]:
    return (snapshot.state, snapshot.calls, snapshot.failures, snapshot.consecutive_failures)


class CountingStore(RedisStore):
    """A RedisStore that counts the steps it runs (one step, one round trip)."""

    steps = 0

    async def run(self, script: str, keys: Any, args: Any, *, operation: str) -> Any:
        self.steps += 1
        return await super().run(script, keys, args, operation=operation)


async def test_only_one_waiter_per_process_polls_a_half_open_circuit_whose_probe_runs_elsewhere(
    redis_url: str,
) -> None:
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    a_store, b_store = RedisStore(redis_url, prefix=prefix), CountingStore(redis_url, prefix=prefix)
    try:
        a = Pipeline(program, CircuitBreaker(1, break_duration=2.0, store=a_store, name="cb"))
        b = Pipeline(
            program,
            CircuitBreaker(1, break_duration=2.0, wait_for_half_open=True, max_wait=9, store=b_store, name="cb"),
        )
        assert await run(a, "fail") == "error"
        await asyncio.sleep(2.05)
        probe = asyncio.create_task(run(a, "sleep:1.5:ok"))  # A's probe holds the lease for 1.5 s of a 2 s lease
        await asyncio.sleep(0.05)
        answers = await asyncio.gather(*(run(b, "ok") for _ in range(12)))
        assert answers == ["answer"] * 12  # all ran once A's probe closed the circuit
        assert await probe == "answer"
        # 12 first admissions, 12 after the close and 12 records, plus the polls of a 0.2 s cadence for ~1.45 s:
        # ~7 by one watcher (~43 in all), not ~7 by each of the 12 (~120)
        assert b_store.steps < 80
    finally:
        await closing(a_store, b_store)
