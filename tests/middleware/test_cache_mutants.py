"""Exact-value tests written from mutmut's survivors on cache.py: event fields, log messages, health, describe.

Every async test runs on looptime's virtual loop clock, so the backend timeout costs no real time.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from resilient_dspy import Event, Pipeline
from resilient_dspy.cache_backends import MemoryBackend
from resilient_dspy.middleware.cache import (
    Cache,
    CacheBackendFailed,
    CacheCoalesced,
    CacheHit,
    CacheMiss,
    CacheStored,
)

from .test_cache import BrokenBackend, HangingBackend, Program, of_type


async def test_miss_store_and_hit_events_carry_every_field() -> None:
    cache = Cache(ttl=30.0, name="answers")
    events: list[Event] = []
    pipeline = Pipeline(Program(), cache, listeners=[events.append], name="qa")
    await pipeline("q")
    await pipeline("q")
    [miss] = of_type(events, CacheMiss)
    [stored] = of_type(events, CacheStored)
    [hit] = of_type(events, CacheHit)
    key = cache.key_for("q")
    assert (miss.pipeline, miss.layer, miss.key, miss.bypassed) == ("qa", "answers", key, False)
    assert (stored.pipeline, stored.layer, stored.key, stored.ttl) == ("qa", "answers", key, 30.0)
    assert stored.size == len(await cache.backend.get(key))
    assert (hit.pipeline, hit.layer, hit.key, hit.saved_tokens, hit.saved_usage) == ("qa", "answers", key, 0, {})


async def test_a_failing_backend_logs_exact_messages_and_emits_full_events(caplog: pytest.LogCaptureFixture) -> None:
    cache = Cache(BrokenBackend(), name="c")
    events: list[Event] = []
    pipeline = Pipeline(Program(), cache, listeners=[events.append], name="p")
    with caplog.at_level(logging.WARNING, logger="resilient_dspy.cache"):
        assert (await pipeline("q")).answer == "answer to q"
    key = cache.key_for("q")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        f"c: backend get failed for {key} (ConnectionError('backend down (get)')); going on without it",
        f"c: backend set failed for {key} (OSError('backend down (set)')); going on without it",
    ]
    get, set_ = of_type(events, CacheBackendFailed)
    assert (get.pipeline, get.layer, get.key, get.operation, get.timed_out) == ("p", "c", key, "get", False)
    assert str(get.error) == "backend down (get)"
    assert (set_.key, set_.operation, set_.timed_out) == (key, "set", False)
    assert cache.stats.errors == 2 and cache.stats.stores == 0 and cache.stats.misses == 1


async def test_a_hanging_backend_logs_the_timeout(caplog: pytest.LogCaptureFixture) -> None:
    cache = Cache(HangingBackend(), backend_timeout=0.25, name="c")
    events: list[Event] = []
    pipeline = Pipeline(Program(), cache, listeners=[events.append])
    with caplog.at_level(logging.WARNING, logger="resilient_dspy.cache"):
        await pipeline("q")
    key = cache.key_for("q")
    assert [r.getMessage() for r in caplog.records] == [
        f"c: backend get took over 0.25s for {key}; going on without it",
        f"c: backend set took over 0.25s for {key}; going on without it",
    ]
    failures = of_type(events, CacheBackendFailed)
    assert [(f.key, f.operation, f.timed_out, type(f.error)) for f in failures] == [
        (key, "get", True, TimeoutError),
        (key, "set", True, TimeoutError),
    ]


async def test_a_non_bytes_entry_is_a_miss_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    class StrBackend(MemoryBackend):
        async def get(self, key: str) -> Any:
            return "not bytes"

    program = Program()
    cache = Cache(StrBackend(), name="c")
    pipeline = Pipeline(program, cache)
    with caplog.at_level(logging.WARNING, logger="resilient_dspy.cache"):
        assert (await pipeline("q")).answer == "answer to q"
    key = cache.key_for("q")
    assert program.calls == 1
    assert f"c: backend returned a str for {key}; treated as a miss" in [r.getMessage() for r in caplog.records]
    assert (cache.stats.hits, cache.stats.misses, cache.stats.stores) == (0, 1, 1)


async def test_a_corrupt_entry_is_logged_with_its_key(caplog: pytest.LogCaptureFixture) -> None:
    backend = MemoryBackend()
    cache = Cache(backend, name="c")
    pipeline = Pipeline(Program(), cache)
    key = cache.key_for("q")
    await backend.set(key, b"garbage", None)
    with caplog.at_level(logging.WARNING, logger="resilient_dspy.cache"):
        await pipeline("q")
    [message] = [r.getMessage() for r in caplog.records]
    assert message.startswith(f"c: unreadable entry {key} (") and message.endswith("); treated as a miss")
    assert cache.stats.misses == 1 and cache.stats.stores == 1


async def test_followers_share_one_call_and_get_their_own_copy() -> None:
    program = Program(latency=1.0)
    cache = Cache(name="c")
    events: list[Event] = []
    pipeline = Pipeline(program, cache, listeners=[events.append], name="p")
    first, second, third = await asyncio.gather(pipeline("q"), pipeline("q"), pipeline("q"))
    assert program.calls == 1
    assert first.answer == second.answer == third.answer == "answer to q"
    assert second is not first and third is not second
    assert (cache.stats.coalesced, cache.stats.misses, cache.stats.stores) == (2, 1, 1)
    key = cache.key_for("q")
    coalesced = of_type(events, CacheCoalesced)
    assert [(e.pipeline, e.layer, e.key, e.error, e.saved_tokens, e.saved_usage) for e in coalesced] == [
        ("p", "c", key, None, 0, {})
    ] * 2


def test_health_details_and_state() -> None:
    cache = Cache(name="c")
    Pipeline(Program(), cache)
    health = cache.health()
    assert health.status == "ok"
    assert health.details == {
        "hit_rate": 0.0,
        "hits": 0,
        "misses": 0,
        "coalesced": 0,
        "backend_errors": 0,
        "saved_tokens": 0,
        "saved_cost": 0.0,
    }


async def test_health_after_hits_coalesced_and_errors() -> None:
    cache = Cache(BrokenBackend(get=False, set=True), name="c")
    pipeline = Pipeline(Program(latency=1.0), cache)
    await asyncio.gather(pipeline("q"), pipeline("q"))
    health = cache.health()
    assert health.status == "degraded"
    assert health.details["hit_rate"] == pytest.approx(0.5)
    assert (health.details["misses"], health.details["coalesced"], health.details["backend_errors"]) == (1, 1, 1)


def test_describe_is_exact() -> None:
    def my_key(call: Any) -> str:
        return "k"

    def my_price(usage: Any) -> float:
        return 0.0

    cache = Cache(ttl=5.0, namespace="n", key=my_key, price=my_price, single_flight=False, backend_timeout=2.0)
    [described, _] = Pipeline(Program(), cache).describe()
    options = described["options"]
    assert options["ttl"] == 5.0 and options["namespace"] == "n"
    assert "my_key" in options["key"] and "my_price" in options["price"]
    assert options["single_flight"] is False and options["backend_timeout"] == 2.0
    assert isinstance(options["types"], list)
    [plain, _] = Pipeline(Program(), Cache()).describe()
    assert plain["options"]["key"] is None and plain["options"]["price"] is None
    assert plain["options"]["single_flight"] is True
