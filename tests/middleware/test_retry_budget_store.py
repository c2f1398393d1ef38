"""Retry(store=RedisStore): the retry budget's sliding ratio of retries to calls counted over every process (two
layers on two stores with the same prefix and name stand for two processes), and the server stopped mid-run."""

from __future__ import annotations

import asyncio
import uuid

import dspy
import pytest

from resilient_dspy import Pipeline, RedisStore, RetriesExhaustedError, Retry, RetryBudget
from resilient_dspy.errors import ConfigurationError
from resilient_dspy.events import Event
from resilient_dspy.store import StoreUnavailable
from tests.redis_server import free_port, redis_server

pytestmark = [pytest.mark.redis, pytest.mark.looptime(False)]


class Program:
    """Fails with a retryable 503 while ``failing``; counts the attempts that reached it."""

    def __init__(self, failing: bool = True) -> None:
        self.failing = failing
        self.attempts = 0

    async def __call__(self, question: str) -> str:
        self.attempts += 1
        if self.failing:
            raise dspy.LMServerError("injected 503", status=503)
        return "answer"


def stores(url: str, count: int = 2) -> list[RedisStore]:
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    return [RedisStore(url, prefix=prefix) for _ in range(count)]


async def closing(*opened: RedisStore) -> None:
    for store in opened:
        await store.aclose()


async def gave_up(pipeline: Pipeline) -> str:
    """The reason a failing call stopped (``budget``, ``max_attempts`` …)."""
    with pytest.raises(RetriesExhaustedError) as raised:
        await pipeline("q")
    return raised.value.reason


def retry(store: RedisStore | None, budget: RetryBudget, **options: object) -> Retry:
    return Retry(2, base_delay=0, jitter="none", budget=budget, store=store, name="r", **options)  # type: ignore[arg-type]


async def test_the_floor_of_retries_is_one_for_the_whole_cluster(redis_url: str) -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=0.3, window=10.0)  # 3 retries per 10 s, in all
    a_store, b_store = stores(redis_url)
    try:
        a = Pipeline(Program(), retry(a_store, budget))
        b = Pipeline(Program(), retry(b_store, budget))
        reasons = [await gave_up(p) for p in (a, b, a, b)]
        assert reasons == ["max_attempts", "max_attempts", "max_attempts", "budget"]
        alone = Pipeline(Program(), retry(None, budget))
        assert [await gave_up(alone) for _ in range(3)] == ["max_attempts"] * 3  # in memory: each process its own
    finally:
        await closing(a_store, b_store)


async def test_calls_through_another_process_make_room_for_retries_here(redis_url: str) -> None:
    budget = RetryBudget(ratio=0.5, min_per_second=0.0, window=10.0)
    a_store, b_store = stores(redis_url)
    try:
        b_retry = retry(b_store, budget)
        b = Pipeline(Program(), b_retry)
        assert await gave_up(b) == "budget"  # one call seen: 0.5 retries allowed
        a = Pipeline(Program(failing=False), retry(a_store, budget))
        for _ in range(4):
            await a("q")
        await asyncio.sleep(1.05)  # a process sends its calls at most every window / 10
        await a("q")
        assert await gave_up(b) == "max_attempts"  # 7 calls seen across both: room for 3 retries
        snapshot = b_retry.snapshot()
        assert snapshot is not None and (snapshot.calls, snapshot.retries) == (7, 1)
    finally:
        await closing(a_store, b_store)


async def test_an_outage_falls_back_to_this_processs_budget_or_retries_nothing() -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=0.1, window=10.0)  # one retry per 10 s
    port = free_port()
    events: list[Event] = []
    with redis_server(port) as url:
        local_store = RedisStore(url, prefix="retry-outage", timeout=0.3, retry_interval=0.2)
        reject_store = RedisStore(url, prefix="retry-outage-r", timeout=0.3, retry_interval=0.2)
        local_retry = retry(local_store, budget)
        local = Pipeline(Program(), local_retry, listeners=[events.append])
        reject = Pipeline(Program(), retry(reject_store, budget, on_store_failure="reject"))
        assert await gave_up(local) == "max_attempts"
    try:
        assert await gave_up(local) == "max_attempts"  # its own budget: this process has not retried yet
        assert await gave_up(local) == "budget"
        assert len([e for e in events if isinstance(e, StoreUnavailable)]) == 1
        health = local_retry.health()
        assert health is not None and health.status == "degraded"
        assert await gave_up(reject) == "budget"  # fail closed: no retry it cannot count
        with redis_server(port):
            await asyncio.sleep(0.3)
            assert await gave_up(reject) == "max_attempts"  # a new, empty server has room again
    finally:
        await closing(local_store, reject_store)


def test_a_store_without_a_budget_is_a_configuration_error() -> None:
    store = RedisStore("redis://127.0.0.1:1/0")
    with pytest.raises(ConfigurationError, match=r"Retry\.store"):
        Retry(budget=None, store=store)
