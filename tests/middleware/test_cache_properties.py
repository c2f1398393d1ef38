"""Cache properties under concurrency: every lookup counted exactly once, whatever is cancelled or times out.

Each hypothesis example runs on its own looptime loop (virtual time: sleeps are free, a hang fails at once).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import looptime
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_dspy import Event, Pipeline
from resilient_dspy.cache_backends import MemoryBackend
from resilient_dspy.middleware.cache import Cache, CacheCoalesced, CacheHit, CacheMiss
from resilient_dspy.pipeline import Call, Handler
from tests.conftest import other_tasks


def run_virtual(scenario: Awaitable[None]) -> None:
    """Run ``scenario`` on a fresh looptime loop (virtual time; a hang fails at once instead of blocking)."""

    async def bounded() -> None:
        async with asyncio.timeout(100_000):  # virtual: a hang fails at once
            await scenario

    loop = looptime.new_event_loop()
    try:
        loop.run_until_complete(bounded())
    finally:
        loop.close()


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
    backend_latency: float | None, program_latency: float, ttl: float | None, arrivals: list[Arrival]
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
        pipeline = Pipeline(program, spy, cache, listeners=[events.append])

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

    run_virtual(scenario())
