"""What a Cache stores and serves: single-flight followers never read the backend, a blocking backend is written
with the key, bytes and TTL (a non-blocking one is waited for), hits and followers save the stored usage and cost,
followers get their own copies in the stored form, the classes an answer may hold are learned from the program even
after the pipeline was built, and an answer that cannot be stored is logged once per kind.

Every async test runs on looptime's virtual loop clock, so latencies and the backend timeout cost no real time.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import logging
from typing import Any

import dspy
import pytest
from pydantic import BaseModel, field_serializer

from resilient_dspy import Pipeline
from resilient_dspy.events import Event
from resilient_dspy.middleware.cache import Cache, CacheCoalesced, CacheHit, CacheStored
from resilient_dspy.middleware.cache.backends import MemoryBackend
from resilient_dspy.middleware.cache.serializer import UnknownTypeError
from resilient_dspy.testing import FaultInjectingLM

from .test_cache import Program, of_type
from .test_cache_reporting import names

HERE = __name__


def now() -> float:
    return asyncio.get_running_loop().time()


class Point(BaseModel):
    x: int
    when: datetime.date


class Unserializable(BaseModel):
    """A model whose JSON dump raises (its repr still works)."""

    x: int

    @field_serializer("x")
    def _fail(self, value: int) -> int:
        raise ValueError("cannot serialise x")


class Verdict(BaseModel):
    text: str
    confidence: float


class Typed(dspy.Signature):  # type: ignore[misc]
    """Answer with a verdict."""

    question: str = dspy.InputField()
    answer: Verdict = dspy.OutputField()


def verdict_lm() -> FaultInjectingLM:
    return FaultInjectingLM(answers=lambda question: '{"text": "yes", "confidence": 0.5}')


def report_usage(prompt: int, completion: int) -> None:
    dspy.settings.usage_tracker.add_usage(
        "test/model",
        {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    )


USAGE = {"test/model": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}


# -------------------------------------------------------------------------------------------------- single-flight


class CountingBackend(MemoryBackend):
    """A blocking (awaited, under backend_timeout) memory backend counting its reads, which take ``read_latency``."""

    blocking = True

    def __init__(self, read_latency: float = 0.0) -> None:
        super().__init__()
        self.reads = 0
        self.read_latency = read_latency
        self.writes: list[tuple[str, bytes, float | None]] = []

    async def get(self, key: str) -> bytes | None:
        self.reads += 1
        if self.read_latency:
            await asyncio.sleep(self.read_latency)
        return await super().get(key)

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        self.writes.append((key, value, ttl))
        await super().set(key, value, ttl)


async def test_followers_of_a_flight_in_progress_never_read_the_backend() -> None:
    backend = CountingBackend()
    program = Program(latency=1.0)
    cache = Cache(backend)
    pipeline = Pipeline(program, cache)
    await asyncio.gather(pipeline("q"), pipeline("q"), pipeline("q"))
    assert (backend.reads, program.calls, cache.stats.coalesced) == (1, 1, 2)


async def test_callers_that_read_together_share_the_first_ones_flight() -> None:
    """All three read the slow backend at once; the first to finish leads, the other two follow it."""
    backend = CountingBackend(read_latency=0.5)
    program = Program(latency=1.0)
    cache = Cache(backend)
    pipeline = Pipeline(program, cache)
    await asyncio.gather(pipeline("q"), pipeline("q"), pipeline("q"))
    assert (backend.reads, program.calls, cache.stats.misses, cache.stats.coalesced) == (3, 1, 1, 2)
    assert now() == 1.5


def test_a_flight_left_on_another_event_loop_is_not_waited_on() -> None:
    """A Cache used from a second event loop (a sync caller's new loop) never waits on a future of the first."""
    asked: list[str] = []

    async def program(question: str) -> str:
        asked.append(question)
        if len(asked) == 1:
            await asyncio.Event().wait()  # the first loop's leader never finishes
        return question

    pipeline = Pipeline(program, Cache())
    first = asyncio.new_event_loop()
    try:
        leader = first.create_task(pipeline("q"))
        for _ in range(3):
            first.run_until_complete(asyncio.sleep(0))
        assert asked == ["q"] and not leader.done()  # in flight on the first loop
        assert asyncio.run(pipeline("q")) == "q"  # on another loop: runs the program itself
        assert asked == ["q", "q"]
    finally:
        leader.cancel()
        first.run_until_complete(asyncio.gather(leader, return_exceptions=True))
        first.close()


# -------------------------------------------------------------------------------------- backends: blocking or not


async def test_a_blocking_backend_is_written_with_the_key_bytes_and_ttl() -> None:
    backend = CountingBackend()
    events: list[Event] = []
    cache = Cache(backend, ttl=30.0)
    pipeline = Pipeline(Program(), cache, listeners=[events.append])
    await pipeline("q")
    await cache.drain()
    key = cache.key_for("q")
    [(written_key, data, ttl)] = backend.writes
    assert (written_key, ttl) == (key, 30.0)
    [stored] = of_type(events, CacheStored)
    assert (stored.key, stored.size) == (key, len(data))
    assert (await pipeline("q")).answer == "answer to q"
    assert cache.stats.hits == 1


class SlowNonBlocking(CountingBackend):
    """Declares ``blocking = False`` without the nowait pair: awaited, but never cut by backend_timeout."""

    blocking = False

    async def get(self, key: str) -> bytes | None:
        await asyncio.sleep(3.0)
        return await super().get(key)

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        await asyncio.sleep(3.0)
        await super().set(key, value, ttl)


async def test_a_non_blocking_backend_is_waited_for_past_backend_timeout() -> None:
    backend = SlowNonBlocking()
    events: list[Event] = []
    cache = Cache(backend, ttl=30.0, backend_timeout=1.0)
    pipeline = Pipeline(Program(), cache, listeners=[events.append])
    await pipeline("q")
    key = cache.key_for("q")
    assert [(k, ttl) for k, _, ttl in backend.writes] == [(key, 30.0)]
    assert (await pipeline("q")).answer == "answer to q"
    assert (cache.stats.hits, cache.stats.errors) == (1, 0)
    [stored] = of_type(events, CacheStored)
    assert (stored.key, stored.size) == (key, len(backend.writes[0][1]))
    assert now() == 9.0


# ----------------------------------------------------------------------------------------- usage, cost and copies


async def usage_program(question: str) -> dspy.Prediction:
    await asyncio.sleep(1.0)
    report_usage(3, 4)
    return dspy.Prediction(answer=question, tags=[question])


async def test_hits_and_followers_save_the_stored_usage_and_cost() -> None:
    events: list[Event] = []
    cache = Cache(price=lambda usage: usage["test/model"]["total_tokens"] * 0.5, name="c")
    pipeline = Pipeline(usage_program, cache, listeners=[events.append])
    with dspy.context(track_usage=True):
        leader, follower = await asyncio.gather(pipeline("q"), pipeline("q"))
        hit = await pipeline("q")
    assert leader.get_lm_usage() == follower.get_lm_usage() == hit.get_lm_usage() == USAGE
    [coalesced] = of_type(events, CacheCoalesced)
    [cached] = of_type(events, CacheHit)
    assert (coalesced.saved_tokens, coalesced.saved_usage) == (7, USAGE)
    assert (cached.saved_tokens, cached.saved_usage) == (7, USAGE)
    assert (cache.stats.saved_tokens, cache.stats.saved_cost) == (14, 7.0)


async def test_without_a_price_usage_costs_nothing_and_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    cache = Cache()
    pipeline = Pipeline(usage_program, cache)
    with caplog.at_level(logging.DEBUG, logger="resilient_dspy.cache"):
        await asyncio.gather(pipeline("q"), pipeline("q"))
        await pipeline("q")
    assert caplog.records == []
    assert (cache.stats.saved_tokens, cache.stats.saved_cost) == (14, 0.0)


async def test_a_failing_price_function_is_logged_and_left_out(caplog: pytest.LogCaptureFixture) -> None:
    def price(usage: Any) -> float:
        raise ZeroDivisionError("no price")

    cache = Cache(price=price, name="c")
    pipeline = Pipeline(usage_program, cache)
    with caplog.at_level(logging.WARNING, logger="resilient_dspy.cache"):
        await pipeline("q")
        await pipeline("q")
    [record] = caplog.records
    assert names(record.getMessage(), "c", "price") and record.levelno == logging.ERROR
    assert record.exc_info is not None and isinstance(record.exc_info[1], ZeroDivisionError)
    assert (cache.stats.saved_tokens, cache.stats.saved_cost) == (7, 0.0)


class Opaque:
    """Not encodable: answers holding one are never stored, and followers get deep copies."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque)

    __hash__ = object.__hash__


async def test_followers_of_an_unencodable_answer_get_their_own_deep_copies(caplog: pytest.LogCaptureFixture) -> None:
    async def program(question: str) -> dspy.Prediction:
        await asyncio.sleep(1.0)
        report_usage(3, 4)
        return dspy.Prediction(answer=Opaque(), tags=[question])

    events: list[Event] = []
    cache = Cache(name="c")
    pipeline = Pipeline(program, cache, listeners=[events.append])
    with caplog.at_level(logging.WARNING, logger="resilient_dspy.cache"), dspy.context(track_usage=True):
        leader, first, second = await asyncio.gather(pipeline("q"), pipeline("q"), pipeline("q"))
    [message] = [r.getMessage() for r in caplog.records]
    assert names(message, "c", f"{HERE}.Opaque")
    for follower in (first, second):
        assert follower is not leader
        assert (follower.answer, follower.tags, follower.get_lm_usage()) == (Opaque(), ["q"], USAGE)
    first.tags.append("mutated")
    first.get_lm_usage()["test/model"]["total_tokens"] = 0
    assert leader.tags == second.tags == ["q"]
    assert second.get_lm_usage() == USAGE
    [coalesced, _] = of_type(events, CacheCoalesced)
    assert (coalesced.saved_tokens, coalesced.saved_usage) == (7, USAGE)


async def test_followers_get_the_stored_form_of_the_answer_as_hits_do() -> None:
    """The leader keeps its own object; followers and later hits get the answer as stored (decoded)."""

    async def ordered(question: str) -> Any:
        await asyncio.sleep(1.0)
        return collections.OrderedDict(answer=question)

    pipeline = Pipeline(ordered, Cache())
    leader, follower = await asyncio.gather(pipeline("q"), pipeline("q"))
    hit = await pipeline("q")
    assert type(leader) is collections.OrderedDict
    assert (type(follower), type(hit)) == (dict, dict)
    assert follower == hit == {"answer": "q"}


# -------------------------------------------------------------------------------------- types allowed after build


async def test_a_model_type_added_after_build_is_allowed_when_encoding() -> None:
    program = dspy.Predict("question -> answer")
    cache = Cache()
    pipeline = Pipeline(program, cache)
    program.signature = Typed
    lm = verdict_lm()
    with dspy.context(lm=lm):
        first = await pipeline("q")
        hit = await pipeline("q")
    assert hit.answer == first.answer == Verdict(text="yes", confidence=0.5)
    assert (lm.requests, cache.stats.stores, cache.stats.hits) == (1, 1, 1)


async def test_a_model_type_added_after_build_is_allowed_when_decoding() -> None:
    """Another cache stored a typed answer; this one learns the type only when its signature changes."""
    backend = MemoryBackend()
    lm = verdict_lm()
    writer = Pipeline(dspy.Predict(Typed), Cache(backend))
    program = dspy.Predict("question -> answer")
    reader_cache = Cache(backend)
    reader = Pipeline(program, reader_cache)
    program.signature = Typed
    with dspy.context(lm=lm):
        stored = await writer("q")
        assert (await reader("q")).answer == stored.answer
    assert (lm.requests, reader_cache.stats.hits) == (1, 1)


async def test_an_entry_of_a_type_never_allowed_is_a_logged_miss(caplog: pytest.LogCaptureFixture) -> None:
    async def point(question: str) -> Any:
        return Point(x=1, when=datetime.date(2026, 12, 3))

    backend = MemoryBackend()
    await Pipeline(point, Cache(backend, types=[Point]))("q")
    cache = Cache(backend, name="c")
    pipeline = Pipeline(point, cache)
    with caplog.at_level(logging.WARNING, logger="resilient_dspy.cache"):
        await pipeline("q")
    key = cache.key_for("q")
    unreadable, not_cached = (r.getMessage() for r in caplog.records)
    assert names(unreadable, "c", key, str(UnknownTypeError(f"{HERE}.Point")))
    assert names(not_cached, "c", f"{HERE}.Point", "types=")  # says how to allow it
    assert (cache.stats.hits, cache.stats.misses) == (0, 1)


async def test_each_unencodable_kind_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    async def program(question: str) -> Any:
        if question == "point":
            return Point(x=1, when=datetime.date(2026, 12, 3))
        if question == "model":
            return Unserializable(x=1)
        if question == "wrapped":
            return dspy.Prediction(answer=Unserializable(x=2))
        return Opaque()

    cache = Cache(name="c", types=[Unserializable])
    pipeline = Pipeline(program, cache)
    with caplog.at_level(logging.WARNING, logger="resilient_dspy.cache"):
        for question in ("point", "opaque", "model", "wrapped") * 2:
            await pipeline(question)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4
    assert names(messages[0], "c", f"{HERE}.Point", "types=") and names(messages[1], "c", f"{HERE}.Opaque")
    assert names(messages[2], "c", "PydanticSerializationError(", "cannot serialise x")
    assert names(messages[3], "c", "PydanticSerializationError(")
    assert cache.stats.stores == 0


async def test_at_most_256_unencodable_kinds_are_remembered_as_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Memory stays bounded: the first 256 kinds are logged once each, any kind after them every time."""
    kinds = [type(f"Kind{i}", (), {}) for i in range(300)]

    async def program(question: str) -> Any:
        return kinds[int(question)]()

    pipeline = Pipeline(program, Cache(name="c"))
    with caplog.at_level(logging.WARNING, logger="resilient_dspy.cache"):
        for i in range(300):
            await pipeline(str(i))
        assert len(caplog.records) == 300
        for question in ("0", "255", "256", "299"):  # nothing was stored: each runs and is encoded again
            await pipeline(question)
    again = [r.getMessage() for r in caplog.records[300:]]
    assert len(again) == 2 and "Kind256" in again[0] and "Kind299" in again[1]


async def test_answers_of_a_callable_object_and_a_nested_typed_pipeline_are_stored() -> None:
    class Service:
        def __init__(self) -> None:
            self.calls = 0

        async def __call__(self, question: str) -> Point:
            self.calls += 1
            return Point(x=self.calls, when=datetime.date(2026, 12, 3))

    service = Service()
    pipeline = Pipeline(service, Cache())
    assert (await pipeline("q")).x == 1
    assert (await pipeline("q")).x == 1

    lm = verdict_lm()
    nested = Pipeline(Pipeline(dspy.Predict(Typed)), cache := Cache())
    with dspy.context(lm=lm):
        first = await nested("q")
        assert (await nested("q")).answer == first.answer
    assert (lm.requests, cache.stats.stores) == (1, 1)


# ------------------------------------------------------------------------------------- repeated hits in memory


async def test_repeated_hits_on_a_prediction_each_get_an_object_of_their_own() -> None:
    """Hits on the same in-memory entry are equal and share nothing: mutating one hit's fields, completions or
    usage changes neither the next hit nor the stored answer."""
    pipeline = Pipeline(dspy.Predict("question -> answer"), Cache(MemoryBackend()))
    with dspy.context(lm=FaultInjectingLM(), track_usage=True):
        first = await pipeline(question="q")
        hits = [await pipeline(question="q") for _ in range(3)]
        hits[0].answer = "changed"
        hits[0].completions._completions["answer"].append("more")
        hits[0].get_lm_usage().clear()
        later = await pipeline(question="q")
    assert type(later) is dspy.Prediction
    assert later.answer == hits[1].answer == first.answer
    assert later.completions.answer == [first.answer]
    assert later.get_lm_usage() == hits[1].get_lm_usage() != {}


async def test_repeated_hits_on_containers_and_examples_are_equal_and_independent() -> None:
    """Nested dicts, lists, tuples, sets and a dspy.Example come back equal on every hit, and a hit's mutation stays
    its own."""
    stored = {
        "items": [1, [2, 3]],
        "pair": (4, ["five"]),
        "tags": {"a", "b"},
        "example": dspy.Example(question="q", answer="a").with_inputs("question"),
    }

    async def answer(question: str) -> Any:
        return stored

    pipeline = Pipeline(answer, Cache(MemoryBackend()))
    await pipeline("q")
    one, two = await pipeline("q"), await pipeline("q")
    one["items"][1].append(99)
    one["pair"][1].append("six")
    one["tags"].add("c")
    one["example"].answer = "changed"
    three = await pipeline("q")
    assert two == three == stored
    assert three["example"].inputs().toDict() == {"question": "q"}


async def test_a_hit_after_the_entry_was_replaced_serves_the_new_answer() -> None:
    """Invalidating a key and storing a new answer under it: the next hit serves the new answer, not a copy of the
    old one."""
    answers = iter(["old", "new"])

    async def program(question: str) -> str:
        return next(answers)

    cache = Cache(MemoryBackend())
    pipeline = Pipeline(program, cache)
    assert [await pipeline("q"), await pipeline("q")] == ["old", "old"]
    assert await cache.invalidate(cache.key_for("q"))
    assert [await pipeline("q"), await pipeline("q")] == ["new", "new"]
