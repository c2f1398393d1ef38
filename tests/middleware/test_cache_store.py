"""The Cache on a real redis-server (RedisBackend on a RedisStore): entries shared between processes, TTL, size
limits, invalidation, single-flight across processes with leases, and failing open through an outage."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from resilient_dspy import Bulkhead, Cache, CircuitBreaker, Pipeline, Timeout
from resilient_dspy.errors import ConfigurationError
from resilient_dspy.events import CacheNotStored, Event
from resilient_dspy.middleware.cache.backends import MemoryBackend, RedisBackend, TieredBackend
from resilient_dspy.store import RedisStore, StoreRecovered, StoreUnavailable
from tests.conftest import other_tasks
from tests.redis_server import free_port, redis_server

pytestmark = [pytest.mark.redis, pytest.mark.looptime(False)]  # real sockets: virtual time would fire timeouts at once


class Program:
    """An ``async def``-like target that counts its calls and answers after ``latency`` seconds."""

    def __init__(self, latency: float = 0.0, fail: BaseException | None = None) -> None:
        self.latency = latency
        self.fail = fail
        self.calls = 0

    async def __call__(self, question: str) -> str:
        self.calls += 1
        await asyncio.sleep(self.latency)
        if self.fail is not None:
            raise self.fail
        return f"answer to {question}"


async def answer(question: str) -> str:
    return f"answer to {question}"


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    """A store of this test's own prefix, patient enough for a busy machine (the outage tests set their own)."""
    made = RedisStore(redis_url, prefix=f"test-{uuid.uuid4().hex[:12]}", timeout=2.0, retry_interval=0.05)
    yield made
    await made.aclose()


@pytest.fixture
async def peer(store: RedisStore, redis_url: str) -> AsyncIterator[RedisStore]:
    """Another process's store: its own connection pool, the same prefix."""
    made = RedisStore(redis_url, prefix=store.options.prefix, timeout=2.0, retry_interval=0.05)
    yield made
    await made.aclose()


BACKEND_OPTIONS = ("max_entries", "max_value_bytes", "lease_ttl", "max_wait")
BUILT: list[Cache] = []


@pytest.fixture(autouse=True)
async def drained(store: RedisStore) -> AsyncIterator[None]:
    """Every Cache a test built has its background stores done before the stores are closed."""
    yield
    caches, BUILT[:] = list(BUILT), []
    for cache in caches:
        await cache.drain()


def build(store: RedisStore, program: Any, *layers: Any, **options: Any) -> tuple[Pipeline, Cache]:
    """A pipeline of ``layers`` then a Cache on a RedisBackend of ``store`` (backend options picked out)."""
    backend = RedisBackend(store, **{name: options.pop(name) for name in BACKEND_OPTIONS if name in options})
    cache = Cache(backend, **options)
    BUILT.append(cache)
    return Pipeline(program, *layers, cache), cache


async def test_an_answer_stored_by_one_process_is_a_hit_in_another_and_expires_on_the_server(
    store: RedisStore, peer: RedisStore
) -> None:
    first_program, second_program = Program(), Program()
    first, first_cache = build(store, first_program, ttl=0.3)
    second, second_cache = build(peer, second_program, ttl=0.3)
    assert await first("What is DSPy?") == "answer to What is DSPy?"
    await first_cache.drain()
    assert await second("What is DSPy?") == "answer to What is DSPy?"
    assert (first_program.calls, second_program.calls, second_cache.snapshot().hits) == (1, 0, 1)
    await asyncio.sleep(0.4)
    await second("What is DSPy?")
    assert second_program.calls == 1  # expired on the server: a miss again


async def test_invalidation_by_key_by_namespace_and_clear_touch_only_this_stores_entries(
    store: RedisStore, redis_url: str
) -> None:
    program = Program()
    qa, qa_cache = build(store, program, namespace="qa")
    other, other_cache = build(store, program, namespace="other")
    # a prefix that the first one matches as a glob must not be touched ("?" escaped)
    lookalike = RedisStore(redis_url, prefix=store.options.prefix[:-1] + "?", timeout=2.0)
    glob, glob_cache = build(lookalike, program, namespace="qa")
    try:
        for question in ("a", "b", "c"):
            await qa(question)
            await other(question)
        await glob("a")
        for cache in (qa_cache, other_cache, glob_cache):
            await cache.drain()
        assert await qa_cache.invalidate(qa_cache.key_for("a")) is True
        assert await qa_cache.invalidate(qa_cache.key_for("a")) is False
        assert await qa_cache.invalidate_namespace() == 2
        assert await other_cache.invalidate_namespace("qa") == 0
        calls = program.calls
        await other("b")
        assert program.calls == calls  # the other namespace survived
        assert await qa_cache.clear() == 3
        await other("b")
        await glob("a")
        assert program.calls == calls + 1  # cleared; the look-alike prefix's entry is still there
        assert await glob_cache.clear() == 1
    finally:
        await lookalike.aclose()


async def test_a_namespace_keeps_at_most_max_entries_evicting_the_soonest_to_expire(store: RedisStore) -> None:
    program = Program()
    pipeline, cache = build(store, program, max_entries=3, ttl=60.0)
    for question in ("first", "second", "third", "fourth", "fifth"):
        await pipeline(question)
        await cache.drain()
    calls = program.calls
    for question in ("third", "fourth", "fifth"):
        await pipeline(question)
    assert program.calls == calls  # the three written last are there
    await pipeline("first")
    assert program.calls == calls + 1  # the first written (soonest to expire) was evicted


async def test_an_answer_over_max_value_bytes_is_not_stored_and_frees_its_lease(
    store: RedisStore, peer: RedisStore
) -> None:
    program = Program()
    events: list[Event] = []
    pipeline, cache = build(store, program, max_value_bytes=64)
    pipeline.subscribe(events.append)
    other, _ = build(peer, program, max_wait=5.0)
    await pipeline("x" * 100)
    await cache.drain()
    assert [e.reason for e in events if isinstance(e, CacheNotStored)] == ["too_large"]
    started = time.monotonic()
    await other("x" * 100)  # no entry, no lease left behind: it runs at once
    assert program.calls == 2 and time.monotonic() - started < 1.0


async def test_concurrent_identical_misses_in_two_processes_make_one_call_and_are_neutral_for_the_breaker(
    store: RedisStore, peer: RedisStore
) -> None:
    program = Program(latency=0.3)
    leader, _ = build(store, program)
    follower, follower_cache = build(peer, program, CircuitBreaker(failure_threshold=1))
    first = asyncio.create_task(leader.invoke("same"))
    await asyncio.sleep(0.05)  # the leader holds the lease
    followed = await follower.invoke("same")
    led = await first
    assert program.calls == 1
    assert followed.value == led.value == "answer to same"
    assert (led.attempts, followed.attempts) == (1, 0)  # the follower reached no provider: no outcome to count
    assert follower_cache.snapshot().coalesced == 1


async def test_a_waiter_polls_on_a_computed_schedule_not_in_a_busy_loop(store: RedisStore, peer: RedisStore) -> None:
    slow = Program(latency=1.0)
    leader, leader_cache = build(peer, slow)
    follower_program = Program()
    follower, cache = build(store, follower_program)
    before = await lookups(peer)
    leading = asyncio.create_task(leader("slow"))
    await asyncio.sleep(0.05)  # the leader holds the lease
    assert await follower("slow") == "answer to slow"
    await leading
    await leader_cache.drain()
    polls = await lookups(peer) - before - 2  # less the leader's lookup and store
    assert (slow.calls, follower_program.calls, cache.snapshot().coalesced) == (1, 0, 1)
    assert 3 <= polls <= 40  # about 25 looks in a second (5 ms growing to 100 ms apart), not thousands


async def lookups(store: RedisStore) -> int:
    """Scripts clients have run on the server so far."""
    return int((await store.client.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0))


async def test_without_single_flight_a_redis_cache_takes_no_lease(store: RedisStore, peer: RedisStore) -> None:
    program = Program(latency=0.3)
    first, _ = build(store, program, single_flight=False)
    second, _ = build(peer, program, single_flight=False)
    await asyncio.gather(first("q"), second("q"))
    assert program.calls == 2  # both ran: nothing waited on the other


async def test_a_waiter_lends_its_bulkhead_slot_while_another_process_leads(
    store: RedisStore, peer: RedisStore
) -> None:
    slow = Program(latency=0.6)
    leader, _ = build(peer, slow)
    program = Program()
    pipeline, _ = build(store, program, Bulkhead(1))
    leading = asyncio.create_task(leader("shared"))
    await asyncio.sleep(0.05)
    waiting = asyncio.create_task(pipeline("shared"))  # holds the one slot, then waits on the other process
    await asyncio.sleep(0.1)
    started = time.monotonic()
    assert await pipeline("unrelated") == "answer to unrelated"  # not stuck behind the waiter
    assert time.monotonic() - started < 0.3
    assert await waiting == "answer to shared" and program.calls == 1
    await leading


async def test_a_crashed_leaders_lease_expires_and_one_waiter_takes_over(store: RedisStore, peer: RedisStore) -> None:
    program = Program()
    crashed = RedisBackend(peer)
    pipeline, cache = build(store, program)
    claim = await crashed.lookup(cache.key_for("orphan"), 0.4)  # a process took the lease and died
    assert claim.token is not None
    started = time.monotonic()
    results = await asyncio.gather(*(pipeline("orphan") for _ in range(3)))
    waited = time.monotonic() - started
    assert results == ["answer to orphan"] * 3
    assert program.calls == 1  # one waiter took over; the others in this process followed it
    assert 0.3 <= waited < 1.5


async def test_a_waiter_runs_the_call_itself_after_max_wait(store: RedisStore, peer: RedisStore) -> None:
    program = Program()
    hung = RedisBackend(peer)
    pipeline, cache = build(store, program, max_wait=0.3)
    assert (await hung.lookup(cache.key_for("stuck"), 30.0)).token is not None  # a leader that never answers
    started = time.monotonic()
    assert await pipeline("stuck") == "answer to stuck"
    assert program.calls == 1 and 0.25 <= time.monotonic() - started < 1.0


async def test_a_waiter_never_waits_past_its_deadline(store: RedisStore, peer: RedisStore) -> None:
    program = Program()
    hung = RedisBackend(peer)
    # 2 s, not less: the lookup's own share is a tenth of the time left, and on a loaded machine a shorter share
    # can run out, which makes the call a miss that runs itself (fail open) instead of a waiter
    pipeline, cache = build(store, program, Timeout(2.0))
    assert (await hung.lookup(cache.key_for("stuck"), 30.0)).token is not None
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await pipeline("stuck")
    assert time.monotonic() - started < 2.5
    assert program.calls == 0


async def test_a_leader_that_fails_or_is_cancelled_frees_its_lease_at_once(store: RedisStore, peer: RedisStore) -> None:
    failing = Program(latency=0.2, fail=RuntimeError("provider down"))
    leader, _ = build(store, failing)
    good = Program()
    waiter, _ = build(peer, good)
    first = asyncio.create_task(leader("q"))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    assert await waiter("q") == "answer to q"  # took over when the lease was freed, not after lease_ttl (30 s)
    assert time.monotonic() - started < 1.0
    with pytest.raises(RuntimeError):
        await first
    slow = Program(latency=10.0)
    leader, _ = build(store, slow)
    first = asyncio.create_task(leader("r"))
    await asyncio.sleep(0.05)
    second = asyncio.create_task(waiter("r"))
    await asyncio.sleep(0.05)
    first.cancel()
    started = time.monotonic()
    assert await asyncio.wait_for(second, 2.0) == "answer to r"
    assert time.monotonic() - started < 1.0
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_tiered_in_front_of_redis_copies_a_far_hit_near_with_its_remaining_ttl(
    store: RedisStore,
) -> None:
    far = RedisBackend(store)
    await far.set("ns:k", b"value", 30.0)
    near = MemoryBackend()
    tiered = TieredBackend(near, far)
    found = await tiered.get_with_ttl("ns:k")
    assert found is not None and found[0] == b"value" and 29.0 < (found[1] or 0) <= 30.0
    assert await near.get("ns:k") == b"value"


async def test_describe_names_the_store_without_secrets(redis_url: str) -> None:
    store = RedisStore(redis_url.replace("redis://", "redis://user:s3cret@"), prefix="describe")
    cache = Cache(RedisBackend(store, max_entries=10))
    Pipeline(answer, cache)
    described = cache.describe()
    assert described["backend_state"]["store"]["store"] == "RedisStore"
    assert described["backend_state"]["max_entries"] == 10
    assert "s3cret" not in str(described)
    await store.aclose()


def test_bad_options_are_named(store: RedisStore) -> None:
    with pytest.raises(ConfigurationError, match=r"RedisBackend\.max_entries"):
        RedisBackend(store, max_entries=0)
    with pytest.raises(ConfigurationError, match=r"RedisBackend\.store"):
        RedisBackend(object())  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- failing open


async def test_a_server_stopped_and_restarted_mid_run_never_fails_or_delays_a_call() -> None:
    port = free_port()
    program = Program(latency=0.01)
    with redis_server(port) as url:
        store = RedisStore(url, prefix="outage", timeout=1.0, retry_interval=0.2)
        pipeline, cache = build(store, program, Timeout(5.0))
        events: list[Event] = []
        pipeline.subscribe(events.append)
        try:
            await pipeline("warm")
            await cache.drain()
            assert await pipeline("warm") == "answer to warm" and cache.snapshot().hits == 1
        except BaseException:
            await store.aclose()
            raise
    try:
        slowest = 0.0
        for index in range(20):  # the server is gone: every call runs, none waits past the read share (0.5 s)
            started = time.monotonic()
            assert await pipeline(f"during {index % 3}") == f"answer to during {index % 3}"
            slowest = max(slowest, time.monotonic() - started)
        assert slowest < 0.01 + 0.5 + 0.1
        health = cache.health()
        assert health.status == "degraded" and health.details["store_ok"] is False
        with redis_server(port):  # a new, empty server on the same port
            await asyncio.sleep(0.25)  # past retry_interval
            await pipeline("after")
            await cache.drain()
            calls = program.calls
            assert await pipeline("after") == "answer to after"
            assert program.calls == calls  # used again: a hit
            await cache.drain()
        assert [type(e) for e in events if isinstance(e, StoreUnavailable | StoreRecovered)] == [
            StoreUnavailable,
            StoreRecovered,
        ]  # reported once for the outage, not once per call
        assert cache.health().details["store_ok"] is True
    finally:
        await store.aclose()
    assert not other_tasks()


async def test_a_hanging_server_costs_a_call_at_most_its_read_share() -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()  # hold the connection open, say nothing
        finally:
            writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = RedisStore(f"redis://127.0.0.1:{port}/0", prefix="hung", timeout=0.25, retry_interval=0.0)
    program = Program()
    pipeline, cache = build(store, program, Timeout(1.0), backend_timeout=0.5)
    try:
        for index in range(3):
            started = time.monotonic()
            assert await pipeline(f"q{index}") == f"answer to q{index}"
            assert time.monotonic() - started < 0.1 + 0.08  # the read gets a tenth of the 1 s left
        await cache.drain()  # background stores end within the store's timeout
        assert program.calls == 3 and cache.snapshot().timeouts >= 3
    finally:
        await store.aclose()
        server.close()
        await server.wait_closed()


# ---------------------------------------------------------------------------------------------- several processes

WORKERS = 4
QUESTIONS = 20
ROOT = Path(__file__).resolve().parents[2]


async def test_four_processes_asking_the_same_twenty_questions_at_once_make_twenty_requests(
    redis_url: str, store: RedisStore
) -> None:
    from resilient_dspy.testing.chaos_server import ChaosServer

    root = ROOT
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    async with ChaosServer(profile={"latency": (0.5, 0.5)}, max_hang=5.0) as server:
        processes = []
        try:
            for _ in range(WORKERS):
                processes.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-m",
                        "tests.middleware.cache_worker",
                        redis_url,
                        store.options.prefix,
                        server.api_base,
                        str(QUESTIONS),
                        cwd=root,
                        env=env,
                        stdin=asyncio.subprocess.PIPE,
                        stdout=asyncio.subprocess.PIPE,
                        stderr=asyncio.subprocess.PIPE,
                    )
                )
            for process in processes:  # each has built its pipeline and warmed its connections
                assert process.stdout is not None
                ready = await asyncio.wait_for(process.stdout.readline(), 120.0)
                assert ready.strip() == b"ready", ready
            outputs = await asyncio.wait_for(asyncio.gather(*(p.communicate(b"go\n") for p in processes)), 60.0)
        finally:
            for process in processes:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
        reports = []
        for process, (stdout, stderr) in zip(processes, outputs, strict=True):
            assert process.returncode == 0, stderr.decode()[-2000:]
            reports.append(json.loads(stdout.decode().strip().splitlines()[-1]))
        assert all(report["answers"] == QUESTIONS for report in reports), reports
        assert server.requests == QUESTIONS, reports  # not 80: one request per question, cluster-wide
        assert sum(report["misses"] for report in reports) == QUESTIONS
        assert sum(report["coalesced"] + report["hits"] for report in reports) == QUESTIONS * (WORKERS - 1)
