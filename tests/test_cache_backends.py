"""Cache backends and serializer: memory LRU + TTL, disk persistence, tiered promotion, aiocache, safe decoding.

Async tests run on looptime's virtual loop clock (``--looptime`` in pyproject): ``asyncio.sleep`` is instant and
``loop.time()`` advances by exactly what was slept. Wall-clock TTLs (disk, aiocache) use an injected clock.
"""

from __future__ import annotations

import asyncio
import enum
import json
import math
import pickle
from pathlib import Path
from typing import Any

import diskcache
import dspy
import fakeredis
import looptime
import pytest
from aiocache import RedisCache, SimpleMemoryCache
from aiocache.base import BaseCache
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from resilient_dspy.core.clock import LoopClock
from resilient_dspy.errors import ConfigurationError
from resilient_dspy.middleware.cache.backends import (
    AiocacheBackend,
    DiskBackend,
    MemoryBackend,
    TieredBackend,
    is_backend,
)
from resilient_dspy.middleware.cache.serializer import (
    CacheSerializer,
    CorruptEntryError,
    UnencodableError,
    UnknownTypeError,
)


class WallClock:
    """A settable wall clock for the backends whose TTLs are wall-clock time."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Answer(BaseModel):
    text: str
    confidence: float
    tags: tuple[str, ...] = ()


class Verdict(enum.Enum):
    YES = "yes"
    NO = "no"


class Report(BaseModel):
    answers: list[Answer]
    verdict: Verdict


# ------------------------------------------------------------------------------------------------------ memory


async def test_memory_set_get_delete() -> None:
    """A stored value comes back; delete says whether it was there."""
    backend = MemoryBackend()
    assert await backend.get("ns:a") is None
    await backend.set("ns:a", b"1", None)
    assert await backend.get("ns:a") == b"1"
    assert await backend.delete("ns:a") is True
    assert await backend.delete("ns:a") is False
    assert await backend.get("ns:a") is None


async def test_memory_ttl_on_loop_time_never_serves_past_expiry() -> None:
    """ttl=10: served at 9.999 s, gone at exactly 10 s and after."""
    backend = MemoryBackend()
    await backend.set("ns:a", b"v", 10.0)
    await asyncio.sleep(9.999)
    assert await backend.get("ns:a") == b"v"
    await asyncio.sleep(0.001)
    assert await backend.get("ns:a") is None
    assert len(backend) == 0


async def test_memory_without_ttl_never_expires() -> None:
    backend = MemoryBackend()
    await backend.set("ns:a", b"v", None)
    await asyncio.sleep(10**7)
    assert await backend.get("ns:a") == b"v"
    assert await backend.get_with_ttl("ns:a") == (b"v", None)


async def test_memory_get_with_ttl_reports_the_remaining_time() -> None:
    backend = MemoryBackend()
    await backend.set("ns:a", b"v", 10.0)
    await asyncio.sleep(4.0)
    found = await backend.get_with_ttl("ns:a")
    assert found is not None
    assert found[0] == b"v"
    assert found[1] == pytest.approx(6.0)


async def test_memory_lru_evicts_the_least_recently_used() -> None:
    """max_entries=2: reading 'a' makes 'b' the eldest, so adding 'c' evicts 'b'."""
    backend = MemoryBackend(max_entries=2)
    await backend.set("ns:a", b"a", None)
    await backend.set("ns:b", b"b", None)
    assert await backend.get("ns:a") == b"a"
    await backend.set("ns:c", b"c", None)
    assert await backend.get("ns:b") is None
    assert await backend.get("ns:a") == b"a"
    assert await backend.get("ns:c") == b"c"
    assert len(backend) == 2


async def test_memory_clear_by_namespace_counts_exactly_that_namespace() -> None:
    backend = MemoryBackend()
    for key in ("one:a", "one:b", "onetwo:c", "two:d"):
        await backend.set(key, b"x", None)
    assert await backend.clear("one") == 2
    assert await backend.get("onetwo:c") == b"x"
    assert await backend.clear(None) == 2
    assert len(backend) == 0


class ManualClock(LoopClock):
    """Loop sleeping and deadlines, but ``now()`` only moves when the test says so."""

    def __init__(self) -> None:
        self.time = 0.0

    def now(self) -> float:
        return self.time


async def test_memory_uses_the_bound_clock_not_the_loop() -> None:
    """After bind_clock, expiry follows that clock: loop time passing alone does not expire the entry."""
    clock = ManualClock()
    backend = MemoryBackend()
    backend.bind_clock(clock)
    await backend.set("ns:a", b"v", 5.0)
    await asyncio.sleep(100)
    assert await backend.get("ns:a") == b"v"
    clock.time = 5.0
    assert await backend.get("ns:a") is None


def test_memory_refuses_a_second_time_base() -> None:
    backend = MemoryBackend()
    backend.bind_clock(LoopClock())
    backend.bind_clock(LoopClock())
    with pytest.raises(ConfigurationError, match="another pipeline clock"):
        backend.bind_clock(ManualClock())


def test_memory_validates_max_entries() -> None:
    with pytest.raises(ConfigurationError) as caught:
        MemoryBackend(max_entries=0)
    assert caught.value.problems[0][0] == "MemoryBackend.max_entries"


def test_is_backend_checks_the_four_async_methods() -> None:
    class Partial:
        async def get(self, key: str) -> bytes | None:
            return None

    assert is_backend(MemoryBackend())
    assert not is_backend(Partial())
    assert not is_backend(MemoryBackend)


# -------------------------------------------------------------------------------------------------------- disk


async def test_disk_persists_across_instances(tmp_path: Path) -> None:
    """What one DiskBackend stores, a new DiskBackend on the same directory reads (another process would too)."""
    first = DiskBackend(tmp_path / "cache")
    await first.set("ns:a", b"persisted", 3600.0)
    first.close()
    second = DiskBackend(tmp_path / "cache")
    assert await second.get("ns:a") == b"persisted"
    second.close()


async def test_disk_ttl_is_wall_clock_time(tmp_path: Path) -> None:
    wall = WallClock()
    backend = DiskBackend(tmp_path, wall_clock=wall)
    await backend.set("ns:a", b"v", 10.0)
    await backend.set("ns:forever", b"f", None)
    wall.now += 9.999
    assert await backend.get("ns:a") == b"v"
    found = await backend.get_with_ttl("ns:a")
    assert found is not None and found[1] == pytest.approx(0.001)
    wall.now += 0.001
    assert await backend.get("ns:a") is None
    assert await backend.get_with_ttl("ns:a") is None
    wall.now += 10**6
    assert await backend.get_with_ttl("ns:forever") == (b"f", None)
    backend.close()


async def test_disk_delete_and_clear_by_namespace(tmp_path: Path) -> None:
    backend = DiskBackend(tmp_path)
    for key in ("one:a", "one:b", "two:c"):
        await backend.set(key, b"x", None)
    assert await backend.delete("one:a") is True
    assert await backend.delete("one:a") is False
    assert await backend.clear("one") == 1
    assert await backend.get("two:c") == b"x"
    assert await backend.clear(None) == 1
    assert await backend.get("two:c") is None
    backend.close()


async def test_disk_never_unpickles_what_it_finds(tmp_path: Path) -> None:
    """A pickled value planted in the directory (by anyone) is a miss: it is never unpickled."""

    class Boom:
        def __reduce__(self) -> Any:
            return (pytest.fail, ("unpickled a planted value",))

    planted = diskcache.Cache(str(tmp_path))
    planted.set("ns:evil", Boom())
    planted.set("ns:text", "some text")
    planted.close()
    backend = DiskBackend(tmp_path)
    assert await backend.get("ns:evil") is None
    assert await backend.get("ns:text") is None
    backend.close()


async def test_disk_ignores_foreign_bytes(tmp_path: Path) -> None:
    planted = diskcache.Cache(str(tmp_path))
    planted.set("ns:foreign", b"not stamped by us")
    planted.close()
    backend = DiskBackend(tmp_path)
    assert await backend.get("ns:foreign") is None
    backend.close()


async def test_disk_stores_large_values_in_files(tmp_path: Path) -> None:
    """Values above diskcache's inline limit live in files inside the directory and read back intact."""
    backend = DiskBackend(tmp_path)
    big = bytes(range(256)) * 1000
    await backend.set("ns:big", big, None)
    assert await backend.get("ns:big") == big
    backend.close()


def test_disk_validates_its_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as caught:
        DiskBackend(tmp_path, size_limit=0, wall_clock="now")  # type: ignore[arg-type]
    assert [field for field, _ in caught.value.problems] == ["DiskBackend.size_limit", "DiskBackend.wall_clock"]


# ------------------------------------------------------------------------------------------------------ tiered


async def test_tiered_promotes_with_the_remaining_ttl_only() -> None:
    """A far entry with 3 s left is promoted near with 3 s, not the full TTL: gone near at 10 s, as far."""
    near, far = MemoryBackend(), MemoryBackend()
    tiered = TieredBackend(near, far)
    await far.set("ns:a", b"v", 10.0)
    await asyncio.sleep(7.0)
    assert await tiered.get("ns:a") == b"v"
    promoted = await near.get_with_ttl("ns:a")
    assert promoted is not None and promoted[1] == pytest.approx(3.0)
    await asyncio.sleep(2.999)
    assert await tiered.get("ns:a") == b"v"
    await asyncio.sleep(0.001)
    assert await near.get("ns:a") is None
    assert await tiered.get("ns:a") is None


async def test_tiered_promotes_from_disk_without_extending_life(tmp_path: Path) -> None:
    wall = WallClock()
    disk = DiskBackend(tmp_path, wall_clock=wall)
    near = MemoryBackend()
    tiered = TieredBackend(near, disk)
    await disk.set("ns:a", b"v", 10.0)
    wall.now += 6.0
    assert await tiered.get("ns:a") == b"v"
    promoted = await near.get_with_ttl("ns:a")
    assert promoted is not None and promoted[1] == pytest.approx(4.0)
    await asyncio.sleep(4.0)
    assert await near.get("ns:a") is None
    disk.close()


async def test_tiered_writes_through_and_deletes_both() -> None:
    near, far = MemoryBackend(), MemoryBackend()
    tiered = TieredBackend(near, far)
    await tiered.set("ns:a", b"v", 5.0)
    assert await near.get("ns:a") == b"v"
    assert await far.get("ns:a") == b"v"
    assert await tiered.delete("ns:a") is True
    assert await near.get("ns:a") is None
    assert await far.get("ns:a") is None
    await tiered.set("ns:b", b"v", None)
    await far.set("ns:c", b"v", None)
    assert await tiered.clear("ns") == 2


async def test_a_far_tier_without_a_ttl_read_holds_values_stamped_with_their_expiry() -> None:
    """The far tier cannot tell the remaining TTL, so the tiered backend stamps what it writes there: a far hit is
    promoted with what is left of it; a value someone else wrote there unstamped cannot be proven live: a miss."""
    near, far = MemoryBackend(), TtlKeepingOpaque(honours_ttl=False)
    tiered = TieredBackend(near, far, wall_clock=loop_wall)
    await tiered.set("ns:a", b"v", 10.0)
    await near.delete("ns:a")
    await asyncio.sleep(7.0)
    assert await tiered.get("ns:a") == b"v"
    promoted = await near.get_with_ttl("ns:a")
    assert promoted is not None and promoted[1] == pytest.approx(3.0)

    await far.set("ns:foreign", b"v", 10.0)
    assert await tiered.get("ns:foreign") is None
    assert await near.get("ns:foreign") is None


def test_tiered_validates_its_tiers() -> None:
    with pytest.raises(ConfigurationError) as caught:
        TieredBackend(object(), MemoryBackend())  # type: ignore[arg-type]
    assert caught.value.problems[0][0] == "TieredBackend.near"
    with pytest.raises(ConfigurationError) as caught:
        TieredBackend(MemoryBackend(), MemoryBackend(), wall_clock="now")  # type: ignore[arg-type]
    assert [field for field, _ in caught.value.problems] == ["TieredBackend.wall_clock"]


# ---------------------------------------------------------------------------------------------------- aiocache


async def test_aiocache_round_trip_delete_and_namespaces() -> None:
    """Keys go under the aiocache cache's own namespace; clear(ns) removes exactly our namespace."""
    store = SimpleMemoryCache(namespace="app|")
    backend = AiocacheBackend(store)
    await backend.set("one:a", b"1", 60.0)
    await backend.set("one:b", b"2", None)
    await backend.set("onetwo:c", b"3", None)
    await store.set("one:not-ours", "x", namespace="other|")
    assert await backend.get("one:a") == b"1"
    assert sorted(store._cache) == ["app|one:a", "app|one:b", "app|onetwo:c", "other|one:not-ours"]
    assert await backend.delete("one:a") is True
    assert await backend.delete("one:a") is False
    assert await backend.clear("one") == 1
    assert await backend.get("onetwo:c") == b"3"
    assert await backend.clear(None) == 1
    assert sorted(store._cache) == ["other|one:not-ours"]


async def test_aiocache_ttl_is_checked_on_read_and_rounded_up_in_the_store() -> None:
    """The stored expiry decides (wall clock); the store's own TTL is whole seconds, rounded up."""
    wall = WallClock()
    store = SimpleMemoryCache()
    backend = AiocacheBackend(store, wall_clock=wall)
    await backend.set("ns:a", b"v", 0.25)
    wall.now += 0.2499
    assert await backend.get("ns:a") == b"v"
    wall.now += 0.0001
    assert await backend.get("ns:a") is None
    assert "ns:a" in store._cache
    await asyncio.sleep(1.0)
    assert "ns:a" not in store._cache


async def test_aiocache_ignores_foreign_values() -> None:
    store = SimpleMemoryCache()
    backend = AiocacheBackend(store)
    await store.set("ns:a", {"planted": True})
    await store.set("ns:b", b"raw bytes")
    assert await backend.get("ns:a") is None
    assert await backend.get("ns:b") is None


@pytest.mark.filterwarnings("ignore:Call to deprecated setex")  # aiocache 0.12 on redis-py 5+
async def test_aiocache_redis_round_trip_and_clear_scans_exactly_our_prefix() -> None:
    """On Redis, clear(ns) walks SCAN in batches of 500 and deletes only our keys, glob characters escaped."""
    store = RedisCache(namespace="app|")
    store.client = fakeredis.FakeAsyncRedis()
    backend = AiocacheBackend(store)
    await backend.set("one:a", b'{"rdc": 1}', 60.0)
    assert await backend.get("one:a") == b'{"rdc": 1}'
    for index in range(1200):
        await backend.set(f"one:{index}", b"v", None)
    await backend.set("o*e:x", b"v", None)  # "o*e" would match "one" as a glob
    await backend.set("onetwo:c", b"v", None)
    await store.client.set("other|one:not-ours", b"x")
    assert await backend.clear("o*e") == 1
    assert await backend.clear("one") == 1201
    assert await backend.get("onetwo:c") == b"v"
    assert await backend.clear(None) == 1
    assert await store.client.keys("*") == [b"other|one:not-ours"]


async def test_aiocache_clear_on_a_store_without_a_key_listing_names_the_field() -> None:
    class KeylessBackend(BaseCache):  # type: ignore[misc]
        """Like memcached: get and set, but no way to list keys."""

    backend = AiocacheBackend(KeylessBackend())
    with pytest.raises(ConfigurationError) as caught:
        await backend.clear("one")
    assert caught.value.problems == (
        (
            "AiocacheBackend.cache",
            "clear() needs a store that lists its keys (SimpleMemoryCache, RedisCache); KeylessBackend cannot",
        ),
    )


def test_aiocache_validates_the_cache() -> None:
    with pytest.raises(ConfigurationError) as caught:
        AiocacheBackend({})  # type: ignore[arg-type]
    assert caught.value.problems[0][0] == "AiocacheBackend.cache"


# -------------------------------------------------------------------------------------------------- serializer


def round_trip(serializer: CacheSerializer, value: Any) -> Any:
    return serializer.loads(serializer.dumps(value)).value


@pytest.mark.parametrize(
    "value",
    [
        "text",
        ["a", "b"],
        [{"role": "assistant", "content": "hi"}],
        {"n": 1, "x": 2.5, "none": None, "flag": True, "nested": {"list": [1, [2, [3]]]}},
        (1, "two", (3.0, None)),
        {1: "int key", (2, 3): "tuple key"},
        {"$t": "looks like a tag", "v": 1},
        {"s": {1, 2, 3}, "f": frozenset({"a"})},
        b"\x00\xffbytes",
        float("inf"),
    ],
)
def test_plain_values_round_trip_exactly(value: Any) -> None:
    decoded = round_trip(CacheSerializer(), value)
    assert decoded == value
    assert type(decoded) is type(value)


def test_prediction_round_trip_with_nested_fields_models_and_usage() -> None:
    serializer = CacheSerializer([Report])
    report = Report(answers=[Answer(text="a", confidence=0.5, tags=("x",))], verdict=Verdict.YES)
    prediction = dspy.Prediction(answer="42", report=report, steps=[("a", 1), {"b": (2,)}], base="field named base")
    usage = {"openai/x": {"prompt_tokens": 10, "completion_tokens": 5, "details": None}}
    entry = serializer.loads(serializer.dumps(prediction, usage, 15))
    decoded = entry.value
    assert type(decoded) is dspy.Prediction
    assert decoded is not prediction
    assert dict(decoded.items()) == dict(prediction.items())
    assert isinstance(decoded.report.answers[0], Answer)
    assert decoded.report.answers[0].tags == ("x",)
    assert decoded.report.verdict is Verdict.YES
    assert decoded.steps == [("a", 1), {"b": (2,)}]
    assert entry.usage == usage
    assert entry.tokens == 15


def test_prediction_completions_round_trip() -> None:
    prediction = dspy.Prediction.from_completions([{"answer": "a"}, {"answer": "b"}])
    decoded = round_trip(CacheSerializer(), prediction)
    assert decoded.answer == "a"
    assert decoded.completions is not None
    assert decoded.completions.answer == ["a", "b"]
    assert len(decoded.completions) == 2


def test_example_keeps_its_inputs() -> None:
    example = dspy.Example(question="q", answer="a").with_inputs("question")
    decoded = round_trip(CacheSerializer(), example)
    assert decoded == example
    assert decoded.inputs().keys() == ["question"]


def test_a_model_off_the_allowlist_is_not_encodable() -> None:
    with pytest.raises(UnencodableError, match="Answer"):
        CacheSerializer().dumps(Answer(text="a", confidence=1.0))


def test_an_arbitrary_object_is_not_encodable() -> None:
    with pytest.raises(UnencodableError):
        CacheSerializer().dumps({"x": object()})


def test_allow_annotation_walks_generics_and_model_fields() -> None:
    """``list[Report] | None`` allows Report and, through its fields, Answer and Verdict."""
    serializer = CacheSerializer()
    serializer.allow_annotation(list[Report] | None)
    assert serializer.knows(Report) and serializer.knows(Answer) and serializer.knows(Verdict)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x80\x04\x95pickle",
        b"{not json",
        b"[]",
        b'{"rdc": 99, "value": 1}',
        b'{"rdc": 1}',
        b'{"rdc": 1, "value": {"$t": "unknown"}}',
        b'{"rdc": 1, "value": {"$t": "tuple", "v": 3}}',
        b'{"rdc": 1, "value": {"$t": "bytes", "v": "***"}}',
        b'{"rdc": 1, "value": 1, "usage": [], "tokens": 0}',
        b'{"rdc": 1, "value": {"$t": "model", "n": "tests.test_cache_backends.Answer", "v": {"text": 1}}}',
        b"[" * 100_000,
    ],
)
def test_corrupt_or_foreign_bytes_raise_corrupt_entry_only(data: bytes) -> None:
    with pytest.raises(CorruptEntryError):
        CacheSerializer([Answer]).loads(data)


def test_a_class_named_by_stored_data_is_never_imported() -> None:
    """An entry naming ``os.system`` (or any class not on the allowlist) is refused, not resolved."""
    data = json.dumps({"rdc": 1, "value": {"$t": "model", "n": "os.system", "v": {}}}).encode()
    with pytest.raises(UnknownTypeError, match=r"os\.system"):
        CacheSerializer().loads(data)
    data = json.dumps({"rdc": 1, "value": {"$t": "enum", "n": "tests.test_cache_backends.Verdict", "v": "yes"}})
    with pytest.raises(UnknownTypeError):
        CacheSerializer().loads(data.encode())


def test_the_envelope_is_json_not_pickle() -> None:
    data = CacheSerializer().dumps(dspy.Prediction(answer="a"))
    envelope = json.loads(data)
    assert envelope["rdc"] == 1
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(data)


class TtlKeepingOpaque:
    """A far tier without ``get_with_ttl``: it honours each entry's TTL itself (on the loop clock) but cannot
    tell how much of it is left; with ``honours_ttl=False`` it keeps entries forever (a store that ignores TTLs)."""

    def __init__(self, *, honours_ttl: bool = True) -> None:
        self.data: dict[str, tuple[float | None, bytes]] = {}
        self.honours_ttl = honours_ttl

    async def get(self, key: str) -> bytes | None:
        found = self.data.get(key)
        if found is None:
            return None
        expires_at, value = found
        if self.honours_ttl and expires_at is not None and asyncio.get_running_loop().time() >= expires_at:
            return None
        return value

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        now = asyncio.get_running_loop().time()
        self.data[key] = (None if ttl is None else now + ttl, value)

    async def delete(self, key: str) -> bool:
        return self.data.pop(key, None) is not None

    async def clear(self, namespace: str | None = None) -> int:
        count = len(self.data)
        self.data.clear()
        return count


def loop_wall() -> float:
    """A wall clock that follows the (virtual) loop time, so wall-clock TTLs and the memory tiers agree."""
    return asyncio.get_running_loop().time()


async def test_nested_tiers_over_a_far_tier_without_a_ttl_read_never_extend_an_entry() -> None:
    """ttl=10, both near tiers lose the entry at 5 s: the far copy is promoted with its 5 s left, not forever."""
    near, middle = MemoryBackend(max_entries=1), MemoryBackend(max_entries=1)
    tiered = TieredBackend(near, TieredBackend(middle, TtlKeepingOpaque(), wall_clock=loop_wall), wall_clock=loop_wall)
    await tiered.set("ns:a", b"v", 10.0)
    await asyncio.sleep(5.0)
    await near.set("ns:evict", b"x", None)
    await middle.set("ns:evict", b"x", None)

    assert await tiered.get("ns:a") == b"v"
    found = await tiered.get_with_ttl("ns:a")
    assert found is not None and found[1] == pytest.approx(5.0)
    await asyncio.sleep(5.0)
    assert await tiered.get("ns:a") is None
    await asyncio.sleep(95.0)
    assert await tiered.get("ns:a") is None


async def test_a_far_tier_that_ignores_ttls_is_never_served_past_the_entrys_expiry() -> None:
    far = TtlKeepingOpaque(honours_ttl=False)
    tiered = TieredBackend(MemoryBackend(), far, wall_clock=loop_wall)
    await tiered.set("ns:a", b"v", 10.0)
    await asyncio.sleep(9.0)
    assert await tiered.get("ns:a") == b"v"
    await asyncio.sleep(1.0)
    assert await tiered.get("ns:a") is None
    assert await tiered.get_with_ttl("ns:a") is None


def _far_tier(kind: str) -> Any:
    if kind == "memory":
        return MemoryBackend(max_entries=2)
    if kind == "aiocache":
        return AiocacheBackend(SimpleMemoryCache(), wall_clock=loop_wall)
    return TtlKeepingOpaque(honours_ttl=kind == "opaque")


def _tiers(shape: str, far: str) -> TieredBackend:
    """Tiered backends nested in several ways, with one- or two-entry near tiers so entries get evicted."""
    if shape == "flat":
        return TieredBackend(MemoryBackend(max_entries=1), _far_tier(far), wall_clock=loop_wall)
    if shape == "nested-far":
        inner = TieredBackend(MemoryBackend(max_entries=2), _far_tier(far), wall_clock=loop_wall)
        return TieredBackend(MemoryBackend(max_entries=1), inner, wall_clock=loop_wall)
    inner = TieredBackend(MemoryBackend(max_entries=1), MemoryBackend(max_entries=2), wall_clock=loop_wall)
    return TieredBackend(inner, _far_tier(far), wall_clock=loop_wall)


# (operation, key, argument): set with a TTL, get, get_with_ttl, or let time pass
TierOp = tuple[str, str, float | None]


@settings(max_examples=200, deadline=None)
@given(
    shape=st.sampled_from(["flat", "nested-far", "nested-near"]),
    far=st.sampled_from(["memory", "aiocache", "opaque", "opaque-ignoring-ttl"]),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("set"), st.sampled_from("abc"), st.none() | st.sampled_from([0.5, 2.0, 10.0])),
            st.tuples(st.sampled_from(["get", "get_with_ttl"]), st.sampled_from("abc"), st.none()),
            st.tuples(st.just("sleep"), st.just(""), st.sampled_from([0.25, 1.0, 3.0, 20.0])),
        ),
        max_size=40,
    ),
)
def test_tiers_never_serve_an_entry_past_its_ttl(shape: str, far: str, ops: list[TierOp]) -> None:
    """Any nesting of tiers, any far tier (one that cannot tell the remaining TTL or ignores TTLs included), any
    interleaving of writes, reads, evictions and time: no value is served at or after its expiry, and no
    remaining TTL reported reaches past it."""

    async def scenario() -> None:
        tiered = _tiers(shape, far)
        expiry: dict[bytes, float] = {}
        for number, (op, key, argument) in enumerate(ops):
            now = loop_wall()
            if op == "sleep":
                assert argument is not None
                await asyncio.sleep(argument)
            elif op == "set":
                value = f"v{number}".encode()
                expiry[value] = math.inf if argument is None else now + argument
                await tiered.set(f"ns:{key}", value, argument)
            elif op == "get":
                value = await tiered.get(f"ns:{key}")
                assert value is None or now < expiry[value]
            else:
                found = await tiered.get_with_ttl(f"ns:{key}")
                if found is not None:
                    value, remaining = found
                    assert now < expiry[value]
                    assert (math.inf if remaining is None else now + remaining) <= expiry[value] + 1e-6

    loop = looptime.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(scenario(), timeout=100_000))
    finally:
        loop.close()
