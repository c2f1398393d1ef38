"""What a Cache reports, field by field: its events (times on the pipeline clock), its log lines (the layer, the
operation, the key, the error), its counts (``snapshot()``, and ``stats``, the older spelling), ``health()`` and
``describe()``, its defaults and the mistakes it refuses when a pipeline is built.

Every async test runs on looptime's virtual loop clock, so latencies and the backend timeout cost no real time.
"""

from __future__ import annotations

import asyncio
import datetime
import enum
import logging
from typing import Any

import pytest
from pydantic import BaseModel

from resilient_dspy import Pipeline
from resilient_dspy.errors import ConfigurationError
from resilient_dspy.events import Event
from resilient_dspy.middleware.cache import (
    Cache,
    CacheBackendFailed,
    CacheCoalesced,
    CacheHit,
    CacheMiss,
    CacheNotStored,
    CacheStats,
    CacheStored,
)
from resilient_dspy.middleware.cache.backends import MemoryBackend

from .test_cache import BrokenBackend, HangingBackend, NowaitOnly, Program, of_type

HERE = __name__


def names(message: str, layer: str, *facts: str) -> bool:
    """A log line names its layer first, then every fact given (an operation, a key, an error)."""
    return message.startswith(f"{layer}: ") and all(fact in message for fact in facts)


class Color(enum.Enum):
    RED = "red"


class Point(BaseModel):
    x: int
    when: datetime.date


# ------------------------------------------------------------------------------------------------ events and logs


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


async def test_a_failing_backend_is_logged_and_emitted_with_its_operation_key_and_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = Cache(BrokenBackend(), name="c")
    events: list[Event] = []
    pipeline = Pipeline(Program(), cache, listeners=[events.append], name="p")
    with caplog.at_level(logging.WARNING, logger="resilient_dspy.cache"):
        assert (await pipeline("q")).answer == "answer to q"
    key = cache.key_for("q")
    get_line, set_line = (r.getMessage() for r in caplog.records)
    assert names(get_line, "c", " get ", key, "ConnectionError('backend down (get)')")
    assert names(set_line, "c", " set ", key, "OSError('backend down (set)')")
    assert [r.levelno for r in caplog.records] == [logging.WARNING] * 2
    get, set_ = of_type(events, CacheBackendFailed)
    assert (get.pipeline, get.layer, get.key, get.operation, get.timed_out) == ("p", "c", key, "get", False)
    assert str(get.error) == "backend down (get)"
    assert (set_.key, set_.operation, set_.timed_out) == (key, "set", False)
    assert cache.stats.errors == 2 and cache.stats.stores == 0 and cache.stats.misses == 1


async def test_a_hanging_backend_is_logged_with_the_time_it_was_given(caplog: pytest.LogCaptureFixture) -> None:
    cache = Cache(HangingBackend(), backend_timeout=0.25, name="c")
    events: list[Event] = []
    pipeline = Pipeline(Program(), cache, listeners=[events.append])
    with caplog.at_level(logging.WARNING, logger="resilient_dspy.cache"):
        await pipeline("q")
        await cache.drain()
    key = cache.key_for("q")
    get_line, set_line = (r.getMessage() for r in caplog.records)
    assert names(get_line, "c", " get ", "0.25s", key) and names(set_line, "c", " set ", "0.25s", key)
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
    assert any(names(r.getMessage(), "c", " str ", key) for r in caplog.records)
    assert (cache.stats.hits, cache.stats.misses, cache.stats.stores) == (0, 1, 1)


async def test_a_corrupt_entry_is_a_miss_logged_with_its_key_and_the_reason(caplog: pytest.LogCaptureFixture) -> None:
    backend = MemoryBackend()
    cache = Cache(backend, name="c")
    pipeline = Pipeline(Program(), cache)
    key = cache.key_for("q")
    await backend.set(key, b"garbage", None)
    with caplog.at_level(logging.WARNING, logger="resilient_dspy.cache"):
        await pipeline("q")
    [message] = [r.getMessage() for r in caplog.records]
    assert names(message, "c", key, "not JSON")
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


async def test_event_times_are_the_pipeline_clock() -> None:
    cache = Cache(name="c")
    events: list[Event] = []
    pipeline = Pipeline(Program(latency=2.0), cache, listeners=[events.append], name="p")
    await asyncio.sleep(3.0)
    await asyncio.gather(pipeline("q"), pipeline("q"))
    await asyncio.sleep(1.0)
    await pipeline("q")
    [miss] = of_type(events, CacheMiss)
    [stored] = of_type(events, CacheStored)
    [coalesced] = of_type(events, CacheCoalesced)
    [hit] = of_type(events, CacheHit)
    assert (miss.time, stored.time, coalesced.time, hit.time) == (3.0, 5.0, 5.0, 6.0)


async def test_backend_failure_and_not_stored_events_carry_every_field() -> None:
    class Opaque:
        pass

    async def opaque(question: str) -> Any:
        await asyncio.sleep(1.0)
        return Opaque()

    events: list[Event] = []
    cache = Cache(NowaitOnly(fail=True), name="c")
    pipeline = Pipeline(opaque, cache, listeners=[events.append], name="p")
    await asyncio.sleep(2.0)
    await pipeline("q")
    key = cache.key_for("q")
    [get] = of_type(events, CacheBackendFailed)  # unencodable: nothing to set
    assert (get.pipeline, get.layer, get.time, get.key, get.operation) == ("p", "c", 2.0, key, "get")
    [not_stored] = of_type(events, CacheNotStored)
    assert (not_stored.pipeline, not_stored.layer, not_stored.time, not_stored.key, not_stored.reason) == (
        "p",
        "c",
        3.0,
        key,
        "unencodable",
    )


async def test_a_failing_nowait_set_names_its_key() -> None:
    class SetFails(NowaitOnly):
        def set_nowait(self, key: str, value: bytes, ttl: float | None) -> None:
            raise OSError("full")

        async def set(self, key: str, value: bytes, ttl: float | None) -> None:
            raise AssertionError("the Cache awaited set() of a backend with set_nowait()")

    events: list[Event] = []
    cache = Cache(SetFails(), name="c")
    pipeline = Pipeline(Program(), cache, listeners=[events.append], name="p")
    await asyncio.sleep(4.0)
    await pipeline("q")
    [failed] = of_type(events, CacheBackendFailed)
    assert (failed.time, failed.key, failed.operation, str(failed.error)) == (4.0, cache.key_for("q"), "set", "full")


async def test_bypassed_calls_are_counted_and_keyed() -> None:
    cache = Cache()
    events: list[Event] = []
    pipeline = Pipeline(Program(), cache, listeners=[events.append])
    for _ in range(2):
        await pipeline.run(pipeline.new_call({"question": "q"}, bypass_cache=True))
    key = cache.key_for("q")
    assert cache.stats.bypassed == 2
    assert [(e.key, e.bypassed) for e in of_type(events, CacheMiss)] == [(key, True), (key, True)]


async def test_followers_of_a_failed_leader_get_its_error_in_their_events() -> None:
    error = ValueError("leader failed")
    cache = Cache(name="c")
    events: list[Event] = []
    pipeline = Pipeline(Program(error, latency=2.0), cache, listeners=[events.append], name="p")
    results = await asyncio.gather(pipeline("q"), pipeline("q"), pipeline("q"), return_exceptions=True)
    assert list(results) == [error, error, error]
    key = cache.key_for("q")
    coalesced = of_type(events, CacheCoalesced)
    assert [(e.pipeline, e.layer, e.time, e.key, e.error, e.saved_tokens, e.saved_usage) for e in coalesced] == [
        ("p", "c", 2.0, key, error, 0, {})
    ] * 2


# -------------------------------------------------------------------- state: snapshot, health, describe, defaults


def test_snapshot_and_stats_are_the_same_counts() -> None:
    cache = Cache()
    assert cache.snapshot() == cache.stats == CacheStats()


async def test_snapshot_counts_every_lookup_once() -> None:
    cache = Cache()
    pipeline = Pipeline(Program(latency=1.0), cache)
    await asyncio.gather(pipeline("q"), pipeline("q"))
    await pipeline("q")
    await pipeline.run(pipeline.new_call({"question": "q"}, bypass_cache=True))
    assert cache.snapshot() == CacheStats(hits=1, misses=1, coalesced=1, bypassed=1, stores=2)
    assert cache.snapshot() == cache.stats


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
        "bypassed": 0,
        "backend_errors": 0,
        "backend_timeouts": 0,
        "stores_pending": 0,
        "stores_skipped": 0,
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


def test_describe_says_the_layer_its_options_and_what_it_learned_from_the_pipeline() -> None:
    cache = Cache(ttl=5.0, name="answers")
    before = cache.describe()
    assert set(before) == {"layer", "name", "options", "backend", "stores", "program"}
    assert (before["layer"], before["name"], before["program"], before["stores"]) == (
        "Cache",
        "answers",
        None,
        "inline",
    )
    assert before["backend"].startswith("MemoryBackend(")
    assert before["options"]["name"] == "answers" and "backend" not in before["options"]
    Pipeline(Program(), cache, name="qa")
    assert cache.describe()["program"] == "Program"
    assert Cache(HangingBackend()).describe()["stores"] == "background"  # a blocking backend: stores in a task


def test_the_cache_takes_the_cache_role_and_coalesces_with_single_flight() -> None:
    assert Cache.placement == "cache"
    assert Cache().coalesces is True and Cache(single_flight=False).coalesces is False


def test_defaults_name_and_types_are_exact() -> None:
    cache = Cache()
    assert (cache.options.ttl, cache.options.backend_timeout, cache.name) == (3600.0, 1.0, "Cache")
    assert isinstance(cache.backend, MemoryBackend) and cache.options.backend is cache.backend
    assert Cache().backend is not cache.backend  # a new MemoryBackend per Cache
    Pipeline(Program(), cache)
    assert cache.health().layer == "Cache"
    assert Cache(name="c").health().layer == "c" and Cache(name="c").name == "c"
    typed = Cache(types=[Point, Color])
    assert typed.options.types == (Point, Color)
    assert typed.describe()["options"]["types"] == [f"{HERE}.Point", f"{HERE}.Color"]
    with pytest.raises(ConfigurationError, match="types"):
        Cache(types=Point)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="backend"):
        Cache(backend=object())


def test_one_cache_per_pipeline_is_explained() -> None:
    cache = Cache()
    Pipeline(Program(), cache, name="first")
    with pytest.raises(ConfigurationError) as raised:
        Pipeline(Program(), cache, name="second")
    [(field, rule)] = raised.value.problems
    assert field == "Cache" and "'first'" in rule


def test_key_for_before_a_pipeline_says_how_to_build_one() -> None:
    with pytest.raises(RuntimeError, match="Pipeline"):
        Cache().key_for("q")
