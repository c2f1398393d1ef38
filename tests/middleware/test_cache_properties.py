"""Cache properties under concurrency: every lookup counted exactly once, whatever is cancelled or times out.

Each hypothesis example runs on its own looptime loop (virtual time: sleeps are free, a hang fails at once).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_dspy import Pipeline, Retry, Timeout
from resilient_dspy.core.call import Call, Handler
from resilient_dspy.events import Event
from resilient_dspy.middleware.cache import Cache, CacheCoalesced, CacheHit, CacheMiss
from resilient_dspy.middleware.cache.backends import MemoryBackend
from tests.conftest import other_tasks, run_virtual


class SlowBackend(MemoryBackend):
    """A blocking memory backend whose reads and writes take ``latency`` seconds (a network store)."""

    blocking = True

    def __init__(self, latency: float) -> None:
        super().__init__()
        self.latency = latency

    async def get(self, key: str) -> bytes | None:
        await asyncio.sleep(self.latency)
        return await super().get(key)

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        await asyncio.sleep(self.latency)
        await super().set(key, value, ttl)


class LookupSpy:
    """Directly above the Cache: counts the calls that reach it (each one is a lookup)."""

    def __init__(self) -> None:
        self.lookups = 0

    async def __call__(self, call: Call, next: Handler) -> Any:
        self.lookups += 1
        return await next(call)


# (gap before arriving, question, cancel after, own timeout, bypass the cache)
Arrival = tuple[float, str, float | None, float | None, bool]


@settings(max_examples=150, deadline=None)
@given(
    backend_latency=st.none() | st.sampled_from([0.0, 0.2, 0.6]),
    program_latency=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    ttl=st.none() | st.sampled_from([0.3, 1.5]),
    attempt_timeout=st.none() | st.sampled_from([0.4, 1.2]),
    arrivals=st.lists(
        st.tuples(
            st.sampled_from([0.0, 0.0, 0.1, 0.4, 1.0]),
            st.sampled_from(["a", "a", "b", "boom"]),
            st.none() | st.sampled_from([0.0, 0.1, 0.3, 0.9]),
            st.none() | st.sampled_from([0.05, 0.25, 0.7, 1.5]),
            st.booleans(),
        ),
        min_size=1,
        max_size=20,
    ),
)
def test_every_lookup_is_counted_exactly_once(
    backend_latency: float | None,
    program_latency: float,
    ttl: float | None,
    attempt_timeout: float | None,
    arrivals: list[Arrival],
) -> None:
    """Any mix of identical and different calls, failures, bypasses, cancellations and own timeouts:
    hits + misses + coalesced + bypassed == lookups made, and each lookup emits one hit, miss or coalesced event."""

    async def scenario() -> None:
        async def program(question: str) -> str:
            if program_latency:
                await asyncio.sleep(program_latency)
            if question == "boom":
                raise ValueError("boom")
            return f"answer to {question}"

        backend = MemoryBackend() if backend_latency is None else SlowBackend(backend_latency)
        cache = Cache(backend, ttl=ttl)
        spy = LookupSpy()
        events: list[Event] = []
        timeout = [] if attempt_timeout is None else [Timeout(attempt_timeout)]
        pipeline = Pipeline(program, *timeout, spy, cache, listeners=[events.append])

        async def one(question: str, own_timeout: float | None, bypass: bool) -> Any:
            async with asyncio.timeout(own_timeout):
                return await pipeline.run(pipeline.new_call({"question": question}, bypass_cache=bypass))

        async def cancel_later(task: asyncio.Task[Any], after: float) -> None:
            await asyncio.sleep(after)
            task.cancel()

        tasks: list[asyncio.Task[Any]] = []
        cancels: list[Awaitable[None]] = []
        for gap, question, cancel_after, timeout, bypass in arrivals:
            await asyncio.sleep(gap)
            task = asyncio.create_task(one(question, timeout, bypass))
            tasks.append(task)
            if cancel_after is not None:
                cancels.append(cancel_later(task, cancel_after))
        await asyncio.gather(*cancels)
        await asyncio.gather(*tasks, return_exceptions=True)
        await cache.drain()
        assert other_tasks() == set()

        stats = cache.stats
        assert stats.hits + stats.misses + stats.coalesced + stats.bypassed == spy.lookups
        looked_up = [e for e in events if isinstance(e, CacheHit | CacheMiss | CacheCoalesced)]
        assert len(looked_up) == spy.lookups
        assert sum(isinstance(e, CacheMiss) and e.bypassed for e in looked_up) == stats.bypassed

    run_virtual(scenario)


class LatencyBackend(MemoryBackend):
    """A blocking memory backend whose get and set take the given seconds, or hang forever (None)."""

    blocking = True

    def __init__(self, get_latency: float | None, set_latency: float | None) -> None:
        super().__init__()
        self.get_latency = get_latency
        self.set_latency = set_latency

    @staticmethod
    async def _wait(latency: float | None) -> None:
        if latency is None:
            await asyncio.Event().wait()
        await asyncio.sleep(latency)

    async def get(self, key: str) -> bytes | None:
        await self._wait(self.get_latency)
        return await super().get(key)

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        await self._wait(self.set_latency)
        await super().set(key, value, ttl)


LATENCIES = st.none() | st.sampled_from([0.0, 0.05, 0.5, 1.0, 3.0])


@settings(max_examples=100, deadline=None)
@given(
    get_latency=LATENCIES,
    set_latency=LATENCIES,
    program_latency=st.sampled_from([0.0, 0.3, 0.85]),
    arrivals=st.lists(st.tuples(st.sampled_from([0.0, 0.2, 1.0]), st.sampled_from("abc")), min_size=1, max_size=15),
)
def test_a_slow_or_hanging_backend_never_fails_or_delays_a_call_past_its_read_share(
    get_latency: float | None,
    set_latency: float | None,
    program_latency: float,
    arrivals: list[tuple[float, str]],
) -> None:
    """Under Timeout(1.0) per attempt, whatever the backend's get and set latencies (hangs included): every call
    answers on its first attempt, within a tenth of the attempt's time plus the program's own time."""

    async def scenario() -> None:
        async def program(question: str) -> str:
            await asyncio.sleep(program_latency)
            return f"answer to {question}"

        cache = Cache(LatencyBackend(get_latency, set_latency))
        pipeline = Pipeline(program, Timeout(30.0), Retry(3, base_delay=0.1), Timeout(1.0), cache)

        async def one(question: str) -> tuple[str, float]:
            loop = asyncio.get_running_loop()
            start = loop.time()
            outcome = await pipeline.invoke(question)
            assert outcome.retries == 0 and outcome.attempts <= 1  # a follower or a hit runs nothing
            return outcome.value, loop.time() - start

        tasks = []
        for gap, question in arrivals:
            await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(question)))
        for (_, question), (answer, took) in zip(arrivals, await asyncio.gather(*tasks), strict=True):
            assert answer == f"answer to {question}"
            assert took <= 0.1 + program_latency + 1e-9
        await cache.drain()
        assert other_tasks() == set()

    run_virtual(scenario)
