"""Budget(store=RedisStore) against a real redis-server: one budget for every process (two layers on two stores with
the same prefix and name stand for two processes; subprocess tests make it literal), reservations held across
processes and expiring on server time when their process dies, windows, alerts once, and outages."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import dspy
import pytest

from resilient_dspy import BudgetExceededError, Pipeline, RedisStore
from resilient_dspy.events import Event
from resilient_dspy.middleware.budget import Budget, BudgetAlert, BudgetRejected
from resilient_dspy.store import StoreUnavailable
from resilient_dspy.testing import FaultInjectingLM
from tests.redis_server import free_port, redis_server

pytestmark = [pytest.mark.redis, pytest.mark.looptime(False)]

ROOT = Path(__file__).resolve().parents[2]
WORKER = str(ROOT / "tests" / "store" / "budget_process.py")
QUESTION = "What is DSPy?"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}


def stores(url: str, count: int = 2) -> list[RedisStore]:
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    return [RedisStore(url, prefix=prefix) for _ in range(count)]


async def closing(*opened: RedisStore) -> None:
    for store in opened:
        await store.aclose()


def fixed(tokens: int) -> Any:
    return lambda call: tokens


async def tokens_of() -> int:
    lm = FaultInjectingLM()
    with dspy.context(lm=lm):
        await dspy.Predict("question -> answer").acall(question=QUESTION)
    return sum(entry.input_tokens + entry.output_tokens for entry in lm.journal)


def sleeper(seconds: float) -> Any:
    async def program(question: str) -> str:
        await asyncio.sleep(seconds)
        return "answer"

    return program


async def test_what_one_process_spent_refuses_a_call_in_the_other(redis_url: str) -> None:
    per_call = await tokens_of()
    a_store, b_store = stores(redis_url)
    try:
        options: dict[str, Any] = {"tokens": per_call + 10, "estimate_tokens": fixed(10), "name": "b"}
        a_budget, b_budget = Budget(store=a_store, **options), Budget(store=b_store, **options)
        a = Pipeline(dspy.Predict("question -> answer"), a_budget)
        b = Pipeline(dspy.Predict("question -> answer"), b_budget)
        lm = FaultInjectingLM()
        with dspy.context(lm=lm):
            await a(QUESTION)
            await b(QUESTION)  # per_call spent + 10 estimated == the cap: fits exactly
            with pytest.raises(BudgetExceededError) as raised:
                await a(QUESTION)
        assert lm.requests == 2
        assert raised.value.retry_after is None  # a lifetime budget
        snapshot = b_budget.snapshot()
        assert snapshot.tokens is not None
        assert (snapshot.tokens.spent, snapshot.tokens.reserved, snapshot.in_flight) == (2 * per_call, 0, 0)
    finally:
        await closing(a_store, b_store)


async def test_calls_in_flight_in_any_process_hold_their_estimate(redis_url: str) -> None:
    a_store, b_store = stores(redis_url)
    try:
        options: dict[str, Any] = {"tokens": 1000, "estimate_tokens": fixed(400), "name": "b"}
        a = Pipeline(sleeper(0.3), Budget(store=a_store, **options))
        b = Pipeline(sleeper(0.3), Budget(store=b_store, **options))

        async def outcome(pipeline: Pipeline) -> str:
            try:
                return str(await pipeline("q"))
            except BudgetExceededError:
                return "refused"

        results = await asyncio.gather(*(outcome(p) for p in (a, b, a, b, a)))
        assert sorted(results) == ["answer", "answer", "refused", "refused", "refused"]
        assert await outcome(b) == "answer"  # no usage reported: the reservations went back, nothing spent
    finally:
        await closing(a_store, b_store)


async def test_a_reservation_outliving_its_ttl_is_dropped_on_server_time_and_its_spending_still_counts(
    redis_url: str,
) -> None:
    a_store, b_store = stores(redis_url)
    try:
        options: dict[str, Any] = {"tokens": 1000, "estimate_tokens": fixed(600), "reservation_ttl": 0.3, "name": "b"}
        a = Pipeline(sleeper(0.8), Budget(store=a_store, **options))
        b_budget = Budget(store=b_store, **options)
        b = Pipeline(sleeper(0), b_budget)
        long_call = asyncio.create_task(a("q"))
        await asyncio.sleep(0.1)
        with pytest.raises(BudgetExceededError):
            await b("q")  # 600 held by A
        await asyncio.sleep(0.4)
        assert await b("q") == "answer"  # A's reservation expired on the server
        assert await long_call == "answer"
        snapshot = b_budget.snapshot()
        assert snapshot.tokens is not None and snapshot.tokens.reserved == 0
    finally:
        await closing(a_store, b_store)


async def test_a_window_resets_for_every_process_and_refusals_say_when(redis_url: str) -> None:
    per_call = await tokens_of()
    a_store, b_store = stores(redis_url)
    try:
        options: dict[str, Any] = {"tokens": per_call, "estimate_tokens": fixed(1), "per": 1.0, "name": "w"}
        a = Pipeline(dspy.Predict("question -> answer"), Budget(store=a_store, **options))
        b = Pipeline(dspy.Predict("question -> answer"), Budget(store=b_store, **options))
        with dspy.context(lm=FaultInjectingLM()):
            await a(QUESTION)
            with pytest.raises(BudgetExceededError) as raised:
                await b(QUESTION)
            assert 0 < (raised.value.retry_after or 0) <= 1.0
            await asyncio.sleep((raised.value.retry_after or 0) + 0.05)
            await b(QUESTION)
    finally:
        await closing(a_store, b_store)


async def test_an_alert_fires_once_for_the_whole_cluster(redis_url: str) -> None:
    per_call = await tokens_of()
    a_store, b_store = stores(redis_url)
    try:
        events: list[Event] = []
        options: dict[str, Any] = {"tokens": 4 * per_call, "estimate_tokens": fixed(1), "alert_at": (0.5,), "name": "a"}
        a = Pipeline(dspy.Predict("question -> answer"), Budget(store=a_store, **options), listeners=[events.append])
        b = Pipeline(dspy.Predict("question -> answer"), Budget(store=b_store, **options), listeners=[events.append])
        with dspy.context(lm=FaultInjectingLM()):
            for pipeline in (a, b, a, b):
                await pipeline(QUESTION)
        alerts = [e for e in events if isinstance(e, BudgetAlert)]
        assert [(e.threshold, e.spent) for e in alerts] == [(0.5, 2 * per_call)]
    finally:
        await closing(a_store, b_store)


async def test_local_mode_keeps_serving_through_an_outage_on_in_process_accounts() -> None:
    port = free_port()
    events: list[Event] = []
    with redis_server(port) as url:
        store = RedisStore(url, prefix="budget-outage", timeout=0.3, retry_interval=0.2)
        budget = Budget(tokens=1000, estimate_tokens=fixed(400), store=store, name="b")
        pipeline = Pipeline(sleeper(0), budget, listeners=[events.append])
        assert await pipeline("q") == "answer"
    try:
        assert await pipeline("q") == "answer"  # served on the process's own account
        assert budget.health().status == "degraded"
        assert len([e for e in events if isinstance(e, StoreUnavailable)]) == 1
        with redis_server(port):
            await asyncio.sleep(0.3)
            assert await pipeline("q") == "answer"
            assert budget.health().status == "ok"
    finally:
        await store.aclose()


async def test_reject_mode_refuses_with_the_stores_retry_interval_during_an_outage() -> None:
    port = free_port()
    events: list[Event] = []
    with redis_server(port) as url:
        store = RedisStore(url, prefix="budget-reject", timeout=0.3, retry_interval=0.4)
        budget = Budget(tokens=1000, estimate_tokens=fixed(10), store=store, on_store_failure="reject", name="b")
        pipeline = Pipeline(sleeper(0), budget, listeners=[events.append])
        assert await pipeline("q") == "answer"
    try:
        with pytest.raises(BudgetExceededError) as raised:
            await pipeline("q")
        assert raised.value.retry_after == 0.4
        assert [e.unit for e in events if isinstance(e, BudgetRejected)] == ["tokens"]
        assert budget.health().status == "down"
    finally:
        await store.aclose()


async def test_areset_forgets_the_spending_of_every_process(redis_url: str) -> None:
    a_store, b_store = stores(redis_url)
    try:
        options: dict[str, Any] = {"tokens": 100, "estimate_tokens": fixed(100), "name": "r"}
        a_budget = Budget(store=a_store, **options)
        b = Pipeline(dspy.Predict("question -> answer"), Budget(store=b_store, **options))
        with dspy.context(lm=FaultInjectingLM()):
            await b(QUESTION)  # spends more than the estimate: the cap is gone
            with pytest.raises(BudgetExceededError):
                await b(QUESTION)
            await a_budget.areset()
            await b(QUESTION)
        with pytest.raises(RuntimeError, match="areset"):
            a_budget.reset()
    finally:
        await closing(a_store, b_store)


def run_workers(args: list[list[str]], timeout: float = 90.0) -> list[str]:
    procs = [subprocess.Popen([sys.executable, WORKER, *a], stdout=subprocess.PIPE, text=True, env=ENV) for a in args]
    try:
        return [proc.communicate(timeout=timeout)[0].strip() for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_budget_shared_by_four_processes_never_overspends_by_more_than_one_reservation(redis_url: str) -> None:
    per_call = asyncio.run(tokens_of())
    cap = 37 * per_call + per_call // 2
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    outputs = run_workers([[redis_url, prefix, "spend", str(cap), str(per_call), "20"] for _ in range(4)])
    figures = [tuple(int(v) for v in out.split()) for out in outputs]
    admitted = sum(f[0] for f in figures)
    spent = sum(f[2] for f in figures)
    assert spent <= cap + per_call
    assert admitted == 37  # every call that fitted ran: the cap is used, not left idle
    assert sum(f[0] + f[1] for f in figures) == 80


async def test_a_process_killed_mid_call_gives_its_reservation_back_after_the_ttl(redis_url: str) -> None:
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, WORKER, redis_url, prefix, "hang", "1000", "600", "1", stdout=subprocess.PIPE, env=ENV
    )
    store = RedisStore(redis_url, prefix=prefix)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=60)
        assert line.strip() == b"started"
        proc.kill()
        await asyncio.wait_for(proc.wait(), timeout=10)
        budget = Budget(tokens=1000, estimate_tokens=fixed(600), store=store, name="shared")
        pipeline = Pipeline(sleeper(0), budget)
        with pytest.raises(BudgetExceededError):
            await pipeline("q")  # the dead process's 600 are still held
        await asyncio.sleep(1.1)
        assert await pipeline("q") == "answer"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await store.aclose()
