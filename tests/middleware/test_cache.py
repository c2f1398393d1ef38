"""Cache: hits and misses, single-flight, TTL, what is never stored, the key, failing open, DSPy round trips.

Every async test runs on looptime's virtual loop clock (``--looptime`` in pyproject), so sleeps are free and
``loop.time()`` advances by exactly what was slept.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import dspy
import pytest
from pydantic import BaseModel

from resilient_dspy import Bulkhead, CircuitBreaker, Fallback, Pipeline, RateLimiter, Retry, Static, Timeout, UseLM
from resilient_dspy.core import LoopClock
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
from resilient_dspy.middleware.cache.backends import DiskBackend, MemoryBackend
from resilient_dspy.middleware.cache.backends.protocol import is_nowait
from resilient_dspy.middleware.cache.serializer import CacheSerializer
from resilient_dspy.testing import FaultInjectingLM

# --------------------------------------------------------------------------------------------------- helpers


def other_tasks() -> set[asyncio.Task[Any]]:
    """Tasks still alive besides the current one (for no-orphan checks; same as tests/conftest.py)."""
    current = asyncio.current_task()
    return {task for task in asyncio.all_tasks() if task is not current and not task.done()}


def now() -> float:
    return asyncio.get_running_loop().time()


class Program:
    """An async program (input ``question``) that answers a fresh Prediction after ``latency`` seconds.

    ``errors`` are raised first, one per call, in order.
    """

    def __init__(self, *errors: BaseException, latency: float = 0.0) -> None:
        self.errors = list(errors)
        self.latency = latency
        self.calls = 0

    async def __call__(self, question: str) -> dspy.Prediction:
        self.calls += 1
        if self.latency:
            await asyncio.sleep(self.latency)
        if self.errors:
            raise self.errors.pop(0)
        return dspy.Prediction(answer=f"answer to {question}", call=self.calls)


def of_type(events: list[Event], kind: type[Event]) -> list[Any]:
    return [event for event in events if isinstance(event, kind)]


class BrokenBackend(MemoryBackend):
    """A memory backend whose get and/or set raise."""

    def __init__(self, *, get: bool = True, set: bool = True) -> None:
        super().__init__()
        self.fail_get = get
        self.fail_set = set

    async def get(self, key: str) -> bytes | None:
        if self.fail_get:
            raise ConnectionError("backend down (get)")
        return await super().get(key)

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        if self.fail_set:
            raise OSError("backend down (set)")
        await super().set(key, value, ttl)


class HangingBackend:
    """A backend whose every call waits forever (a network store that stopped answering)."""

    async def get(self, key: str) -> bytes | None:
        await asyncio.Event().wait()
        return None

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        await asyncio.Event().wait()

    async def delete(self, key: str) -> bool:
        await asyncio.Event().wait()
        return False

    async def clear(self, namespace: str | None = None) -> int:
        await asyncio.Event().wait()
        return 0


# ------------------------------------------------------------------------------------------- 1. hits and misses


async def test_a_miss_runs_the_program_and_a_hit_does_not() -> None:
    program = Program()
    cache = Cache()
    events: list[Event] = []
    pipeline = Pipeline(program, cache, listeners=[events.append])

    first = await pipeline("q")
    second = await pipeline("q")

    assert program.calls == 1
    assert second == first
    assert second.answer == "answer to q"
    assert cache.stats == CacheStats(hits=1, misses=1, stores=1)
    assert [type(e) for e in events] == [CacheMiss, CacheStored, CacheHit]
    assert len({e.key for e in events}) == 1


async def test_each_hit_is_a_fresh_object() -> None:
    """Mutating what one caller got never changes what the next caller gets."""
    pipeline = Pipeline(Program(), Cache())
    first = await pipeline("q")
    hit = await pipeline("q")
    hit.answer = "mutated"
    again = await pipeline("q")
    assert again is not hit
    assert again.answer == "answer to q"
    assert first.answer == "answer to q"


async def test_different_inputs_are_different_entries() -> None:
    program = Program()
    pipeline = Pipeline(program, Cache())
    assert (await pipeline("a")).answer == "answer to a"
    assert (await pipeline("b")).answer == "answer to b"
    assert (await pipeline("a")).answer == "answer to a"
    assert program.calls == 2


# ------------------------------------------------------------------------------------------- 2. single-flight


async def test_ten_concurrent_identical_misses_make_one_call() -> None:
    program = Program(latency=1.0)
    cache = Cache()
    events: list[Event] = []
    pipeline = Pipeline(program, cache, listeners=[events.append])

    results = await asyncio.gather(*(pipeline("q") for _ in range(10)))

    assert program.calls == 1
    assert all(result == results[0] for result in results)
    assert len({id(result) for result in results}) == 10
    assert cache.stats.misses == 1
    assert cache.stats.coalesced == 9
    assert cache.stats.stores == 1
    assert len(of_type(events, CacheCoalesced)) == 9
    assert now() == pytest.approx(1.0)
    assert other_tasks() == set()


async def test_without_single_flight_every_concurrent_miss_calls() -> None:
    program = Program(latency=1.0)
    pipeline = Pipeline(program, Cache(single_flight=False))
    await asyncio.gather(*(pipeline("q") for _ in range(10)))
    assert program.calls == 10


async def test_the_leaders_error_reaches_every_follower_and_is_not_stored() -> None:
    error = dspy.LMServerError("injected 503", status=503)
    program = Program(error, latency=1.0)
    cache = Cache()
    pipeline = Pipeline(program, cache)

    results = await asyncio.gather(*(pipeline("q") for _ in range(10)), return_exceptions=True)

    assert program.calls == 1
    assert all(result is error for result in results)
    assert cache.stats.coalesced == 9
    assert cache.stats.stores == 0
    assert (await pipeline("q")).answer == "answer to q"
    assert program.calls == 2
    assert other_tasks() == set()


async def test_a_cancelled_leader_hands_over_to_a_follower() -> None:
    """The leader is cancelled at t=1: no follower sees CancelledError; one re-leads, the rest share its answer."""
    program = Program(latency=10.0)
    cache = Cache()
    pipeline = Pipeline(program, cache)
    leader = asyncio.create_task(pipeline("q"))
    await asyncio.sleep(0)
    followers = [asyncio.create_task(pipeline("q")) for _ in range(4)]
    await asyncio.sleep(1.0)

    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    results = await asyncio.gather(*followers)

    assert program.calls == 2
    assert all(result.answer == "answer to q" and result.call == 2 for result in results)
    assert now() == pytest.approx(11.0)
    assert cache.stats.misses == 2
    assert cache.stats.coalesced == 3
    assert other_tasks() == set()


async def test_a_cancelled_follower_never_cancels_the_leader() -> None:
    program = Program(latency=10.0)
    pipeline = Pipeline(program, Cache())
    leader = asyncio.create_task(pipeline("q"))
    await asyncio.sleep(0)
    follower = asyncio.create_task(pipeline("q"))
    other = asyncio.create_task(pipeline("q"))
    await asyncio.sleep(1.0)

    follower.cancel()
    with pytest.raises(asyncio.CancelledError):
        await follower
    assert (await leader).answer == "answer to q"
    assert (await other).answer == "answer to q"
    assert program.calls == 1
    assert now() == pytest.approx(10.0)
    assert other_tasks() == set()


async def test_a_follower_with_its_own_deadline_times_out_alone() -> None:
    """A follower whose deadline passes stops waiting; the leader finishes at t=5 and stores the answer."""
    program = Program(latency=5.0)
    cache = Cache()
    pipeline = Pipeline(program, cache)
    leader = asyncio.create_task(pipeline("q"))
    await asyncio.sleep(0)

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(2.0):
            await pipeline("q")

    assert now() == pytest.approx(2.0)
    assert (await leader).answer == "answer to q"
    assert now() == pytest.approx(5.0)
    assert program.calls == 1
    assert cache.stats.stores == 1
    assert other_tasks() == set()


async def test_a_follower_that_times_out_is_counted_once_as_coalesced() -> None:
    """A follower whose own timeout ends its wait made a lookup: it counts (and emits) once, as coalesced."""
    program = Program(latency=5.0)
    cache = Cache()
    events: list[Event] = []
    pipeline = Pipeline(program, cache, listeners=[events.append])
    leader = asyncio.create_task(pipeline("q"))
    await asyncio.sleep(0)

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(2.0):
            await pipeline("q")
    await leader

    assert cache.stats == CacheStats(misses=1, coalesced=1, stores=1)
    [coalesced] = of_type(events, CacheCoalesced)
    assert isinstance(coalesced.error, asyncio.CancelledError)


async def test_a_follower_re_leading_after_a_cancelled_leader_is_counted_once() -> None:
    """Leader cancelled: the follower that takes over counts as one miss, the one that follows it as coalesced."""
    program = Program(latency=10.0)
    cache = Cache()
    pipeline = Pipeline(program, cache)
    leader = asyncio.create_task(pipeline("q"))
    await asyncio.sleep(0)
    followers = [asyncio.create_task(pipeline("q")) for _ in range(2)]
    await asyncio.sleep(1.0)
    leader.cancel()
    await asyncio.gather(leader, *followers, return_exceptions=True)
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.coalesced, stats.bypassed) == (0, 2, 1, 0)


async def test_a_bypassed_call_counts_as_bypassed_not_as_a_miss() -> None:
    cache = Cache()
    pipeline = Pipeline(Program(), cache)
    await pipeline.run(pipeline.new_call({"question": "q"}, bypass_cache=True))
    await pipeline("q")
    assert cache.stats == CacheStats(hits=1, bypassed=1, stores=1)
    assert cache.stats.hit_rate == 0.5


async def test_a_reentrant_call_with_the_same_key_runs_uncached_instead_of_waiting_on_itself() -> None:
    """The program calls its own pipeline with the same inputs: the inner call runs the program uncached (it
    cannot wait for the flight its own ancestor leads); the outer answer is stored as usual."""
    calls = 0

    async def program(question: str) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            return f"outer({await pipeline(question)})"
        return "inner"

    cache = Cache()
    events: list[Event] = []
    pipeline = Pipeline(program, cache, listeners=[events.append])
    async with asyncio.timeout(600.0):
        assert await pipeline("q") == "outer(inner)"
    assert await pipeline("q") == "outer(inner)"
    assert calls == 2
    assert cache.stats == CacheStats(hits=1, misses=2, stores=1)
    assert [e.key for e in of_type(events, CacheStored)] == [cache.key_for("q")]
    assert other_tasks() == set()


async def test_a_reentrant_call_from_a_child_task_runs_uncached() -> None:
    """Child tasks of the leader's program inherit what it leads: two of them calling with its key both run."""
    calls = 0

    async def program(question: str) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            inner = await asyncio.gather(*(asyncio.create_task(pipeline(question)) for _ in range(2)))
            return f"outer({'+'.join(sorted(inner))})"
        number = calls
        await asyncio.sleep(1.0)
        return f"inner{number}"

    cache = Cache()
    pipeline = Pipeline(program, cache)
    async with asyncio.timeout(600.0):
        assert await pipeline("q") == "outer(inner2+inner3)"
    assert now() == pytest.approx(1.0)
    assert (cache.stats.misses, cache.stats.coalesced, cache.stats.stores) == (3, 0, 1)
    assert other_tasks() == set()


async def test_an_unrelated_identical_call_still_follows_the_leader() -> None:
    """Only the leader's own descendants skip its flight: another caller with the same key still coalesces."""
    program = Program(latency=1.0)
    cache = Cache()
    pipeline = Pipeline(program, cache)
    await asyncio.gather(pipeline("q"), pipeline("q"))
    assert (program.calls, cache.stats.misses, cache.stats.coalesced) == (1, 1, 1)


# ----------------------------------------------------------------------------------------------------- 3. TTL


async def test_an_entry_is_served_until_its_ttl_and_never_after() -> None:
    program = Program()
    pipeline = Pipeline(program, Cache(ttl=10.0))
    await pipeline("q")
    await asyncio.sleep(9.999)
    await pipeline("q")
    assert program.calls == 1
    await asyncio.sleep(0.002)
    await pipeline("q")
    assert program.calls == 2


async def test_ttl_none_keeps_the_entry() -> None:
    program = Program()
    pipeline = Pipeline(program, Cache(ttl=None))
    await pipeline("q")
    await asyncio.sleep(10**6)
    await pipeline("q")
    assert program.calls == 1


class ManualClock(LoopClock):
    """Loop sleeping and deadlines, but ``now()`` only moves when the test says so."""

    def __init__(self) -> None:
        self.time = 0.0

    def now(self) -> float:
        return self.time


async def test_the_default_backend_measures_ttl_on_the_pipeline_clock() -> None:
    clock = ManualClock()
    program = Program()
    pipeline = Pipeline(program, Cache(ttl=5.0), clock=clock)
    await pipeline("q")
    await asyncio.sleep(100)
    await pipeline("q")
    assert program.calls == 1
    clock.time = 5.0
    await pipeline("q")
    assert program.calls == 2


# ---------------------------------------------------------------------------------- 4. never stored: errors, fallback


async def test_errors_are_never_cached() -> None:
    program = Program(ValueError("bug"))
    cache = Cache()
    pipeline = Pipeline(program, cache)
    with pytest.raises(ValueError, match="bug"):
        await pipeline("q")
    assert (await pipeline("q")).answer == "answer to q"
    assert program.calls == 2
    assert cache.stats.stores == 1


async def test_a_fallback_answer_is_never_cached() -> None:
    """Cache outside a Fallback: the static answer is returned but not stored; the next call runs the program."""
    program = Program(dspy.LMServerError("down", status=503))
    cache = Cache()
    events: list[Event] = []
    pipeline = Pipeline(program, cache, Fallback(Static(answer="sorry")), listeners=[events.append])

    outcome = await pipeline.invoke("q")
    assert (outcome.value.answer, outcome.served_by) == ("sorry", "static")
    assert [e.reason for e in of_type(events, CacheNotStored)] == ["fallback"]
    assert cache.stats.stores == 0

    assert (await pipeline("q")).answer == "answer to q"
    assert (await pipeline("q")).answer == "answer to q"
    assert program.calls == 2


async def test_inside_a_uselm_fallback_the_backup_answer_is_keyed_by_the_backup_lm() -> None:
    """Cache below Fallback(UseLM): the backup's answer is stored under the backup LM's key, so a later call on
    the recovered primary LM gets the primary's own answer, never the backup's."""
    primary = FaultInjectingLM("fault/primary", script=["server_error"])
    backup = FaultInjectingLM("fault/backup", answers=lambda q: "backup answer")
    cache = Cache()
    pipeline = Pipeline(dspy.Predict("question -> answer"), Fallback(UseLM(backup, name="backup")), cache)
    with dspy.context(lm=primary):
        first = await pipeline.invoke("Which LM?")
        second = await pipeline.invoke("Which LM?")
        third = await pipeline.invoke("Which LM?")
    assert (first.served_by, first.value.answer) == ("backup", "backup answer")
    assert second.served_by == "primary"
    assert second.value.answer != "backup answer"
    assert third.value == second.value
    assert (primary.requests, backup.requests) == (2, 1)
    assert (cache.stats.stores, cache.stats.hits) == (2, 1)


async def test_followers_of_a_fallback_answer_learn_who_served_it() -> None:
    program = Program(dspy.LMServerError("down", status=503), latency=1.0)
    pipeline = Pipeline(program, Cache(), Fallback(Static(answer="sorry")))
    outcomes = await asyncio.gather(*(pipeline.invoke("q") for _ in range(3)))
    assert program.calls == 1
    assert [(o.value.answer, o.served_by) for o in outcomes] == [("sorry", "static")] * 3


async def test_an_unencodable_answer_is_returned_not_stored_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    class Opaque:
        pass

    calls = 0

    async def program(question: str) -> Any:
        nonlocal calls
        calls += 1
        return Opaque()

    events: list[Event] = []
    pipeline = Pipeline(program, Cache(), listeners=[events.append])
    with caplog.at_level(logging.WARNING, logger="resilient_dspy.cache"):
        assert isinstance(await pipeline("q"), Opaque)
        assert isinstance(await pipeline("q"), Opaque)
    assert calls == 2
    assert [e.reason for e in of_type(events, CacheNotStored)] == ["unencodable", "unencodable"]
    assert len([r for r in caplog.records if "Opaque" in r.getMessage()]) == 1


# -------------------------------------------------------------------------------------------------- 5. the key


def keyed(program: Any, **options: Any) -> Cache:
    cache = Cache(**options)
    Pipeline(program, cache)
    return cache


def test_the_key_is_the_namespace_and_a_sha256() -> None:
    cache = keyed(dspy.Predict("question -> answer"), namespace="qa/v2")
    with dspy.context(lm=FaultInjectingLM()):
        key = cache.key_for("What is DSPy?")
        assert key == cache.key_for(question="What is DSPy?")
    namespace, digest = key.split(":")
    assert namespace == "qa/v2"
    assert len(digest) == 64 and int(digest, 16) >= 0


def test_the_key_is_the_digest_of_version_identity_and_canonical_inputs() -> None:
    """The fast paths (a function's identity assembled as text, flat inputs not walked) hash the same bytes."""
    import hashlib

    from resilient_dspy.middleware.cache.keys import KEY_VERSION, _canonical, _dumps

    async def ask(question: str, context: Any = None) -> str:
        return question

    def expected(cache: Cache, inputs: dict[str, Any]) -> str:
        keys = cache._keys
        assert keys is not None
        identity = keys._identity(keys.target, dspy.settings.lm, dspy.settings.adapter)
        text = _dumps([KEY_VERSION, identity, _canonical(inputs)])
        return f"default:{hashlib.sha256(text.encode()).hexdigest()}"

    for cache, needs_lm in ((keyed(ask), False), (keyed(dspy.Predict("question, context -> answer")), True)):
        for inputs in ({"question": "q"}, {"question": "q", "context": ["a", ("b",)]}, {"question": 1.5}):
            if not needs_lm:  # a DSPy program's key needs the LM in context
                assert cache.key_for(**inputs) == expected(cache, inputs)
            with dspy.context(lm=FaultInjectingLM(temperature=0.2), adapter=dspy.JSONAdapter()):
                assert cache.key_for(**inputs) == expected(cache, inputs)


def test_the_key_follows_the_lm_model_endpoint_and_sampling_kwargs_but_not_secrets() -> None:
    cache = keyed(dspy.Predict("question -> answer"))

    def key_with(lm: dspy.BaseLM) -> str:
        with dspy.context(lm=lm):
            return cache.key_for("q")

    base = dspy.LM("openai/gpt-4o-mini", api_base="http://a.local/v1", api_key="k1", temperature=0.0)
    keys = {
        "base": key_with(base),
        "model": key_with(dspy.LM("openai/gpt-4o", api_base="http://a.local/v1", api_key="k1", temperature=0.0)),
        "endpoint": key_with(
            dspy.LM("openai/gpt-4o-mini", api_base="http://b.local/v1", api_key="k1", temperature=0.0)
        ),
        "temperature": key_with(
            dspy.LM("openai/gpt-4o-mini", api_base="http://a.local/v1", api_key="k1", temperature=0.7)
        ),
        "max_tokens": key_with(
            dspy.LM("openai/gpt-4o-mini", api_base="http://a.local/v1", api_key="k1", temperature=0.0, max_tokens=9)
        ),
        "rollout": key_with(base.copy(rollout_id=1)),
    }
    assert len(set(keys.values())) == len(keys)
    assert (
        key_with(dspy.LM("openai/gpt-4o-mini", api_base="http://a.local/v1", api_key="k2", temperature=0.0))
        == (keys["base"])
    )
    assert key_with(FaultInjectingLM("fault/a")) != key_with(FaultInjectingLM("fault/b"))


def test_the_key_follows_lm_kwargs_changed_in_place() -> None:
    """An LM's identity is memoised, but re-checked: editing ``lm.kwargs`` in place changes the key."""
    cache = keyed(dspy.Predict("question -> answer"))
    lm = FaultInjectingLM(temperature=0.0)
    with dspy.context(lm=lm):
        cold = cache.key_for("q")
        lm.kwargs["temperature"] = 0.9
        warm = cache.key_for("q")
        lm.kwargs["temperature"] = 0.0
        assert cache.key_for("q") == cold
    assert warm != cold


def test_the_key_follows_demos_reassigned_or_appended_in_place() -> None:
    program = dspy.Predict("question -> answer")
    cache = keyed(program)
    with dspy.context(lm=FaultInjectingLM()):
        bare = cache.key_for("q")
        program.demos = [dspy.Example(question="1+1?", answer="2")]
        compiled = cache.key_for("q")
        program.demos.append(dspy.Example(question="2+2?", answer="4"))
        appended = cache.key_for("q")
        program.demos[1] = dspy.Example(question="2+2?", answer="four")
        replaced = cache.key_for("q")
        program.demos = [dspy.Example(question="1+1?", answer="2")]
        again = cache.key_for("q")
    assert len({bare, compiled, appended, replaced}) == 4
    assert again == compiled


def test_the_key_follows_instructions_and_output_types() -> None:
    program = dspy.Predict("question -> answer")
    cache = keyed(program)
    with dspy.context(lm=FaultInjectingLM()):
        plain = cache.key_for("q")
        program.signature = program.signature.with_instructions("Answer in one word.")
        reassigned = cache.key_for("q")
        program.signature.instructions = "Answer in two words."
        in_place = cache.key_for("q")
        program.signature = dspy.Signature("question -> answer: int")
        typed = cache.key_for("q")
    assert len({plain, reassigned, in_place, typed}) == 4


def test_the_key_follows_a_predictors_own_lm_and_the_adapter() -> None:
    program = dspy.Predict("question -> answer")
    cache = keyed(program)
    with dspy.context(lm=FaultInjectingLM("fault/settings")):
        settings_lm = cache.key_for("q")
        with dspy.context(adapter=dspy.JSONAdapter()):
            json_adapter = cache.key_for("q")
        program.lm = FaultInjectingLM("fault/pinned")
        pinned = cache.key_for("q")
    with dspy.context(lm=FaultInjectingLM("fault/other")):
        pinned_other_settings = cache.key_for("q")
    assert len({settings_lm, json_adapter, pinned}) == 3
    assert pinned_other_settings == pinned


def test_the_key_follows_inputs_exactly() -> None:
    cache = keyed(dspy.Predict("question, context -> answer"))
    with dspy.context(lm=FaultInjectingLM()):
        keys = {
            cache.key_for("q", context=["a", "b"]),
            cache.key_for("q", context=["b", "a"]),
            cache.key_for("q", context=("a", "b")),
            cache.key_for("q ", context=["a", "b"]),
            cache.key_for("q", context={"$tuple": ["a", "b"]}),
            cache.key_for("q", context=None),
        }
        assert cache.key_for("q", context={"x": 1, "y": 2}) == cache.key_for("q", context={"y": 2, "x": 1})
    assert len(keys) == 6


def test_the_key_of_a_function_is_its_name_and_the_lm_in_effect() -> None:
    async def first(question: str) -> str:
        return question

    async def second(question: str) -> str:
        return question

    one, two = keyed(first), keyed(second)
    with dspy.context(lm=FaultInjectingLM("fault/a")):
        a = one.key_for("q")
        assert a != two.key_for("q")
    with dspy.context(lm=FaultInjectingLM("fault/b")):
        assert one.key_for("q") != a


def test_the_key_of_an_lm_target_is_the_lm_and_its_inputs() -> None:
    cache = keyed(FaultInjectingLM("fault/a", temperature=0.0))
    other = keyed(FaultInjectingLM("fault/a", temperature=1.0))
    assert cache.key_for("hello") != other.key_for("hello")
    assert cache.key_for("hello") != cache.key_for("hello", temperature=0.5)


class EndpointLM(dspy.BaseLM):  # type: ignore[misc]
    """An LM that keeps its endpoint as an attribute (not in ``kwargs``), as some clients do."""

    def __init__(self, base_url: str, api_key: str) -> None:
        super().__init__(model="openai/local")
        self.base_url = base_url
        self.api_key = api_key


def test_the_key_follows_an_endpoint_kept_as_an_attribute() -> None:
    a = keyed(EndpointLM("http://a.local/v1", "k1")).key_for("hello")
    b = keyed(EndpointLM("http://b.local/v1", "k1")).key_for("hello")
    a_other_secret = keyed(EndpointLM("http://a.local/v1", "k2")).key_for("hello")
    assert a != b
    assert a == a_other_secret


def test_a_key_function_replaces_the_computed_key() -> None:
    cache = keyed(dspy.Predict("question -> answer"), key=lambda call: call.inputs["question"].strip().lower())
    assert cache.key_for("What?") == cache.key_for("  what? ")
    assert cache.key_for("What?").startswith("default:")


def test_key_for_needs_a_pipeline() -> None:
    with pytest.raises(RuntimeError, match="not part of a pipeline"):
        Cache().key_for("q")


KEY_SCRIPT = textwrap.dedent(
    """
    import dspy
    from resilient_dspy import Pipeline
    from resilient_dspy.middleware.cache import Cache
    from resilient_dspy.testing import FaultInjectingLM

    program = dspy.ChainOfThought("question, hints: set[str] -> answer: int")
    program.predict.demos = [dspy.Example(question="1+1?", hints={"b", "a", "c"}, reasoning="r", answer=2)]
    cache = Cache(namespace="stable")
    Pipeline(program, cache)
    with dspy.context(lm=FaultInjectingLM("fault/stable", temperature=0.3)):
        print(cache.key_for("2+2?", hints={"x", "y", "z", "w"}))
    """
)


def test_the_key_is_stable_across_processes() -> None:
    """Another interpreter with another hash seed computes the same key (no id(), hash() or set order)."""
    namespace: dict[str, Any] = {}
    exec(KEY_SCRIPT.replace("print(", "result = ("), namespace)
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    child = subprocess.run(
        [sys.executable, "-c", KEY_SCRIPT], capture_output=True, text=True, env=env, timeout=120, check=True
    )
    assert child.stdout.strip() == namespace["result"]


# ----------------------------------------------------------------------------------------------- 6. fail open


async def test_a_backend_that_raises_fails_open(caplog: pytest.LogCaptureFixture) -> None:
    program = Program()
    cache = Cache(BrokenBackend())
    events: list[Event] = []
    pipeline = Pipeline(program, cache, listeners=[events.append])
    with caplog.at_level(logging.WARNING, logger="resilient_dspy.cache"):
        assert (await pipeline("q")).answer == "answer to q"
        assert (await pipeline("q")).answer == "answer to q"
    assert program.calls == 2
    assert cache.stats.errors == 4
    assert cache.stats.stores == 0
    failures = of_type(events, CacheBackendFailed)
    assert [(f.operation, type(f.error), f.timed_out) for f in failures[:2]] == [
        ("get", ConnectionError, False),
        ("set", OSError, False),
    ]
    assert sum("backend get failed" in r.getMessage() for r in caplog.records) == 2


class NowaitOnly:
    """A non-blocking backend whose async get/set must never be awaited: the Cache calls the nowait pair."""

    blocking = False

    def __init__(self, *, fail: bool = False) -> None:
        self.entries: dict[str, bytes] = {}
        self.fail = fail

    def get_nowait(self, key: str) -> bytes | None:
        if self.fail:
            raise ConnectionError("backend down (get_nowait)")
        return self.entries.get(key)

    def set_nowait(self, key: str, value: bytes, ttl: float | None) -> None:
        if self.fail:
            raise OSError("backend down (set_nowait)")
        self.entries[key] = value

    async def get(self, key: str) -> bytes | None:
        raise AssertionError("the Cache awaited get() of a backend with get_nowait()")

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        raise AssertionError("the Cache awaited set() of a backend with set_nowait()")

    async def delete(self, key: str) -> bool:
        return self.entries.pop(key, None) is not None

    async def clear(self, namespace: str | None = None) -> int:
        count = len(self.entries)
        self.entries.clear()
        return count


async def test_a_nowait_backend_is_read_and_written_without_await() -> None:
    program = Program()
    backend = NowaitOnly()
    events: list[Event] = []
    pipeline = Pipeline(program, Cache(backend), listeners=[events.append])
    assert (await pipeline("q")).answer == "answer to q"
    assert (await pipeline("q")).answer == "answer to q"
    assert program.calls == 1
    assert len(backend.entries) == 1
    assert [type(e) for e in events] == [CacheMiss, CacheStored, CacheHit]


async def test_a_nowait_backend_that_raises_fails_open() -> None:
    program = Program()
    cache = Cache(NowaitOnly(fail=True))
    events: list[Event] = []
    pipeline = Pipeline(program, cache, listeners=[events.append])
    assert (await pipeline("q")).answer == "answer to q"
    assert program.calls == 1
    assert (cache.stats.errors, cache.stats.stores) == (2, 0)
    failures = of_type(events, CacheBackendFailed)
    assert [(f.operation, type(f.error), f.timed_out) for f in failures] == [
        ("get", ConnectionError, False),
        ("set", OSError, False),
    ]


def test_the_nowait_pair_is_used_only_where_the_class_defines_it_with_get_and_set() -> None:
    assert is_nowait(MemoryBackend())
    assert is_nowait(NowaitOnly())
    assert not is_nowait(BrokenBackend())  # overrides get/set only: its overrides must run
    blocking = type("Blocking", (NowaitOnly,), {"blocking": True})
    assert not is_nowait(blocking())


async def test_a_backend_that_raises_only_on_set_still_serves_nothing_stale() -> None:
    program = Program()
    cache = Cache(BrokenBackend(get=False, set=True))
    pipeline = Pipeline(program, cache)
    await pipeline("q")
    await pipeline("q")
    assert program.calls == 2
    assert (cache.stats.errors, cache.stats.misses, cache.stats.hits) == (2, 2, 0)


async def test_a_hanging_backend_costs_at_most_backend_timeout_per_operation() -> None:
    program = Program()
    cache = Cache(HangingBackend(), backend_timeout=0.5)
    events: list[Event] = []
    pipeline = Pipeline(program, cache, listeners=[events.append])
    start = now()

    assert (await pipeline("q")).answer == "answer to q"

    assert now() - start == pytest.approx(0.5)  # the read; the store goes on in the background
    await cache.drain()
    assert now() - start == pytest.approx(1.0)
    assert [(f.operation, f.timed_out) for f in of_type(events, CacheBackendFailed)] == [("get", True), ("set", True)]
    assert cache.stats.errors == 2
    assert other_tasks() == set()


class SlowSetBackend(MemoryBackend):
    """A blocking memory backend whose reads are instant and whose writes take ``set_latency`` (or hang: None)."""

    blocking = True

    def __init__(self, set_latency: float | None) -> None:
        super().__init__()
        self.set_latency = set_latency

    async def get(self, key: str) -> bytes | None:
        return await super().get(key)

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        if self.set_latency is None:
            await asyncio.Event().wait()
        await asyncio.sleep(self.set_latency)
        await super().set(key, value, ttl)


def recommended_stack(program: Any, cache: Cache, **options: Any) -> Pipeline:
    """The stack of docs/concepts/order-of-layers.md (minus Fallback, so a failure shows), 1 s per attempt."""
    return Pipeline(
        program,
        Timeout(20.0),
        RateLimiter(requests=100, per=1.0),
        Retry(3, base_delay=0.1),
        CircuitBreaker(failure_rate=0.5, window=20, min_calls=10),
        Bulkhead(8, max_queue=32),
        Timeout(1.0),
        cache,
        **options,
    )


async def test_a_hanging_backend_fails_no_call_in_the_recommended_stack() -> None:
    """get and set hang forever, Timeout(1.0) per attempt: every call answers, on its first attempt; the read
    gets a tenth of the attempt's time, the store runs in the background, bounded by backend_timeout."""
    program = Program(latency=0.5)
    cache = Cache(HangingBackend())
    events: list[Event] = []
    pipeline = recommended_stack(program, cache, listeners=[events.append])
    start = now()

    answers = await asyncio.gather(*(pipeline(f"q{i % 4}") for i in range(12)))

    assert [a.answer for a in answers] == [f"answer to q{i % 4}" for i in range(12)]
    assert now() - start == pytest.approx(0.6)
    assert program.calls == 4
    assert cache.stats.misses == 4
    assert cache.stats.hits + cache.stats.coalesced == 8  # the 4 queued in the bulkhead read the pending stores
    await cache.drain()
    assert now() - start == pytest.approx(1.6)
    assert (cache.stats.errors, cache.stats.timeouts, cache.stats.stores) == (12, 12, 0)  # 8 reads, 4 stores
    assert other_tasks() == set()


async def test_a_slow_store_never_delays_the_answer_and_later_calls_read_it() -> None:
    """The store takes 5 s: the call answers after the program's 1 s; an identical call meanwhile is a hit."""
    program = Program(latency=1.0)
    backend = SlowSetBackend(5.0)
    cache = Cache(backend, backend_timeout=10.0)
    pipeline = Pipeline(program, cache)

    assert (await pipeline("q")).answer == "answer to q"
    assert now() == pytest.approx(1.0)
    assert (await pipeline("q")).answer == "answer to q"
    assert program.calls == 1
    assert cache.stats == CacheStats(hits=1, misses=1)
    await cache.drain()
    assert now() == pytest.approx(6.0)
    assert cache.stats.stores == 1
    assert await backend.get(cache.key_for("q")) is not None
    assert other_tasks() == set()


async def test_an_answer_waiting_to_be_stored_is_never_served_past_its_ttl() -> None:
    program = Program()
    cache = Cache(SlowSetBackend(5.0), ttl=2.0, backend_timeout=10.0)
    pipeline = Pipeline(program, cache)
    await pipeline("q")
    await asyncio.sleep(1.999)
    await pipeline("q")
    assert program.calls == 1
    await asyncio.sleep(0.001)
    await pipeline("q")
    assert program.calls == 2
    await cache.drain()


async def test_pending_stores_are_bounded_and_a_store_beyond_the_bound_is_skipped_and_counted() -> None:
    program = Program()
    cache = Cache(SlowSetBackend(None), backend_timeout=1.0, max_pending_stores=2)
    events: list[Event] = []
    pipeline = Pipeline(program, cache, listeners=[events.append])
    for i in range(5):
        assert (await pipeline(f"q{i}")).answer == f"answer to q{i}"
    assert cache.stats.skipped_stores == 3
    assert cache.health().details["stores_pending"] == 2
    assert [e.reason for e in of_type(events, CacheNotStored)] == ["backlog"] * 3
    await cache.drain()
    assert now() == pytest.approx(1.0)
    assert (cache.stats.timeouts, cache.health().details["stores_pending"]) == (2, 0)
    assert other_tasks() == set()


async def test_invalidating_waits_for_a_pending_store_so_it_cannot_come_back() -> None:
    program = Program()
    cache = Cache(SlowSetBackend(0.5))
    pipeline = Pipeline(program, cache)
    await pipeline("q")
    assert await cache.invalidate(cache.key_for("q")) is True
    await pipeline("q")
    assert program.calls == 2
    await cache.drain()


async def test_a_backend_timing_out_is_logged_once_until_it_answers_again(caplog: pytest.LogCaptureFixture) -> None:
    program = Program()
    cache = Cache(HangingBackend(), backend_timeout=0.5)
    pipeline = Pipeline(program, cache)
    with caplog.at_level(logging.WARNING, logger="resilient_dspy.cache"):
        for i in range(3):
            await pipeline(f"q{i}")
        await cache.drain()
    assert [r.getMessage().split(" took")[0] for r in caplog.records] == ["Cache: backend get", "Cache: backend set"]
    assert cache.stats.timeouts == 6


async def test_the_callers_cancellation_propagates_through_a_hanging_backend() -> None:
    program = Program()
    cache = Cache(HangingBackend(), backend_timeout=30.0)
    task = asyncio.create_task(Pipeline(program, cache)("q"))
    await asyncio.sleep(1.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert program.calls == 0
    assert cache.stats.errors == 0
    assert other_tasks() == set()


async def test_corrupt_bytes_in_the_backend_are_a_miss(caplog: pytest.LogCaptureFixture) -> None:
    program = Program()
    backend = MemoryBackend()
    cache = Cache(backend)
    pipeline = Pipeline(program, cache)
    await backend.set(cache.key_for("q"), b"\x80\x04garbage", None)
    with caplog.at_level(logging.WARNING, logger="resilient_dspy.cache"):
        assert (await pipeline("q")).answer == "answer to q"
    assert any("unreadable entry" in r.getMessage() for r in caplog.records)
    await pipeline("q")
    assert program.calls == 1
    assert (cache.stats.misses, cache.stats.hits) == (1, 1)


# ------------------------------------------------------------------------------------ 7. DSPy programs, usage


class Answer(BaseModel):
    text: str
    confidence: float


async def test_a_typed_prediction_round_trips_through_the_cache_with_its_usage() -> None:
    lm = FaultInjectingLM(answers=lambda question: '{"text": "forty-two", "confidence": 0.9}')
    pipeline = Pipeline(dspy.Predict("question -> answer: Answer"), cache := Cache())
    with dspy.context(lm=lm, track_usage=True):
        first = await pipeline("What is the answer?")
        hit = await pipeline("What is the answer?")
    assert lm.requests == 1
    assert cache.stats.hits == 1
    assert isinstance(hit.answer, Answer)
    assert hit.answer == first.answer
    assert hit.answer is not first.answer
    assert hit.get_lm_usage() == first.get_lm_usage()
    usage = first.get_lm_usage()["custom/fault/local"]
    assert usage["total_tokens"] == lm.journal[0].input_tokens + lm.journal[0].output_tokens


async def test_without_usage_tracking_a_hit_carries_no_usage() -> None:
    lm = FaultInjectingLM()
    pipeline = Pipeline(dspy.Predict("question -> answer"), Cache())
    with dspy.context(lm=lm):
        first = await pipeline("q")
        hit = await pipeline("q")
    assert first.get_lm_usage() is None
    assert hit.get_lm_usage() is None


async def test_a_model_returned_by_a_function_is_allowed_by_its_return_annotation() -> None:
    calls = 0

    async def program(question: str) -> list[Answer]:
        nonlocal calls
        calls += 1
        return [Answer(text=question, confidence=1.0)]

    pipeline = Pipeline(program, Cache())
    await pipeline("q")
    assert await pipeline("q") == [Answer(text="q", confidence=1.0)]
    assert calls == 1


async def test_stats_count_saved_tokens_and_cost_on_hits() -> None:
    lm = FaultInjectingLM()
    cache = Cache(price=lambda usage: sum(u["total_tokens"] for u in usage.values()) * 1e-6)
    pipeline = Pipeline(dspy.Predict("question -> answer"), cache)
    with dspy.context(lm=lm):
        await pipeline("How many tokens?")
        for _ in range(3):
            await pipeline("How many tokens?")
    tokens = lm.journal[0].input_tokens + lm.journal[0].output_tokens
    assert lm.requests == 1
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.stores) == (3, 1, 1)
    assert stats.saved_tokens == 3 * tokens
    assert stats.saved_cost == pytest.approx(3 * tokens * 1e-6)
    assert stats.hit_rate == pytest.approx(0.75)


async def test_an_lm_target_caches_its_list_of_strings() -> None:
    lm = FaultInjectingLM()
    pipeline = Pipeline(lm, Cache())
    first = await pipeline("Say hi")
    assert await pipeline("Say hi") == first
    assert isinstance(first, list) and isinstance(first[0], str)
    assert lm.requests == 1


async def test_a_retry_after_a_parse_error_bypasses_the_read_and_stores_the_fresh_answer() -> None:
    """Retry sets bypass_cache after AdapterParseError: the next attempt skips the read, and its answer is stored."""
    lm = FaultInjectingLM(script=["malformed", "malformed"], cache=True)
    cache = Cache()
    events: list[Event] = []
    pipeline = Pipeline(dspy.Predict("question -> answer"), Retry(3, base_delay=0.01), cache, listeners=[events.append])
    question = f"parse error {uuid.uuid4()}"
    with dspy.context(lm=lm):
        outcome = await pipeline.invoke(question)
        assert (outcome.attempts, lm.requests) == (2, 3)
        assert [e.bypassed for e in of_type(events, CacheMiss)] == [False, True]
        assert cache.stats.stores == 1
        assert cache.stats.bypassed == 1
        again = await pipeline(question)
    assert again == outcome.value
    assert lm.requests == 3


async def test_a_bypass_call_skips_a_present_entry_and_replaces_it() -> None:
    program = Program()
    cache = Cache()
    pipeline = Pipeline(program, cache)
    assert (await pipeline("q")).call == 1
    assert (await pipeline.run(pipeline.new_call({"question": "q"}, bypass_cache=True))).call == 2
    assert (await pipeline("q")).call == 2
    assert program.calls == 2


# ----------------------------------------------------------------------------------------- 8. persistence


async def test_a_disk_backed_cache_serves_a_new_pipeline(tmp_path: Path) -> None:
    """A second Cache on a second DiskBackend over the same directory (another process, say) gets a hit."""
    lm = FaultInjectingLM()
    first_cache = Cache(DiskBackend(tmp_path))
    first = Pipeline(dspy.Predict("question -> answer"), first_cache)
    with dspy.context(lm=lm):
        answer = await first("Persist me")
    await first_cache.drain()  # the store runs in the background
    second_cache = Cache(DiskBackend(tmp_path))
    second = Pipeline(dspy.Predict("question -> answer"), second_cache)
    with dspy.context(lm=lm):
        assert await second("Persist me") == answer
    assert lm.requests == 1
    assert second_cache.stats.hits == 1


# ------------------------------------------------------------------------------------------- 9. invalidation


async def test_invalidate_one_key() -> None:
    program = Program()
    cache = Cache()
    pipeline = Pipeline(program, cache)
    await pipeline("a")
    await pipeline("b")
    assert await cache.invalidate(cache.key_for("a")) is True
    assert await cache.invalidate(cache.key_for("a")) is False
    await pipeline("a")
    await pipeline("b")
    assert program.calls == 3


async def test_invalidate_a_namespace_and_clear_everything() -> None:
    backend = MemoryBackend()
    program = Program()
    v1, v2 = Cache(backend, namespace="v1"), Cache(backend, namespace="v2")
    one, two = Pipeline(program, v1), Pipeline(program, v2)
    for pipeline in (one, two):
        await pipeline("a")
        await pipeline("b")
    assert await v1.invalidate_namespace() == 2
    await two("a")
    assert program.calls == 4
    await one("a")
    assert program.calls == 5
    assert await v1.invalidate_namespace("v2") == 2
    assert await v2.clear() == 1
    assert len(backend) == 0
    with pytest.raises(ValueError, match="namespace"):
        await v1.invalidate_namespace("bad:name")


# ------------------------------------------------------------------------------------ 10. options and building


def test_invalid_options_are_all_named_at_once() -> None:
    with pytest.raises(ConfigurationError) as caught:
        Cache(object(), ttl=0, namespace="a:b", backend_timeout=-1.0, types=[int])
    fields = [field for field, _ in caught.value.problems]
    assert fields == ["Cache.backend", "Cache.ttl", "Cache.namespace", "Cache.backend_timeout", "Cache.types"]


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"ttl": -1.0}, "Cache.ttl"),
        ({"ttl": float("inf")}, "Cache.ttl"),
        ({"namespace": ""}, "Cache.namespace"),
        ({"namespace": "has space"}, "Cache.namespace"),
        ({"backend_timeout": 0}, "Cache.backend_timeout"),
        ({"single_flight": "yes"}, "Cache.single_flight"),
    ],
)
def test_each_invalid_option_is_named(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Cache(**options)
    assert [f for f, _ in caught.value.problems] == [field]


def test_one_cache_per_pipeline() -> None:
    cache = Cache()
    Pipeline(Program(), cache)
    with pytest.raises(ConfigurationError, match="one Cache per pipeline"):
        Pipeline(Program(), cache)


def test_describe_lists_the_options_and_backend() -> None:
    pipeline = Pipeline(Program(), Cache(ttl=60.0, namespace="qa", name="answers"))
    [described, _] = pipeline.describe()
    assert described["layer"] == "Cache"
    assert described["name"] == "answers"
    assert described["backend"].startswith("MemoryBackend(")
    assert described["options"]["ttl"] == 60.0
    assert described["options"]["namespace"] == "qa"


def test_the_serializer_allowlist_comes_from_the_signatures() -> None:
    """Building the pipeline allows the signature's output model, so a typed answer can be stored."""
    cache = Cache()
    signature = dspy.Signature("question -> answer: list[Answer]", custom_types={"Answer": Answer})
    Pipeline(dspy.Predict(signature), cache)
    serializer: CacheSerializer = cache._serializer
    assert serializer.knows(Answer)


async def test_key_for_outside_any_lm_context_says_so_instead_of_returning_a_key_no_call_uses() -> None:
    cache = Cache()
    pipeline = Pipeline(dspy.Predict("question -> answer"), cache)
    lm = FaultInjectingLM()
    with dspy.context(lm=lm):
        await pipeline("q")
        key = cache.key_for("q")
    with pytest.raises(LookupError):
        cache.key_for("q")
    assert await cache.invalidate(key)
    pinned = dspy.Predict("question -> answer")
    pinned.lm = lm
    pinned_cache = Cache()
    Pipeline(pinned, pinned_cache)
    assert pinned_cache.key_for("q").startswith("default:")  # every predictor has its LM: no context needed
