"""Listeners: no event is built without one; failing listeners (sync or async) never fail a call; AsyncListener
owns exactly one task, drains on close and leaves nothing behind."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

import resilient_dspy.middleware.breaker.layer as breaker_module
import resilient_dspy.middleware.retry as retry_module
import resilient_dspy.middleware.timeout as timeout_module
from resilient_dspy import CircuitBreaker, CircuitOpenError, Pipeline, RetriesExhaustedError, Retry, Timeout
from resilient_dspy.errors import ConfigurationError, ResilienceWarning
from resilient_dspy.events import Event, RetryScheduled
from resilient_dspy.observe import AsyncListener, LoggingListener, PriceTable, PrometheusMetrics
from tests.conftest import other_tasks
from tests.observe import Scripted, server_error


def counting(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, built: list[str]) -> None:
    cls = getattr(module, name)

    def make(**fields: Any) -> Any:
        built.append(name)
        return cls(**fields)

    monkeypatch.setattr(module, name, make)


@pytest.mark.parametrize("listening", [False, True])
async def test_no_listener_builds_no_event(monkeypatch: pytest.MonkeyPatch, listening: bool) -> None:
    built: list[str] = []
    for module, name in [
        (retry_module, "RetryScheduled"),
        (retry_module, "RetryGaveUp"),
        (timeout_module, "TimeoutFired"),
        (breaker_module, "CircuitRejected"),
    ]:
        counting(monkeypatch, module, name, built)

    async def slow(question: str) -> str:
        await asyncio.sleep(5)
        return "late"

    heard: list[Event] = []
    listeners = [heard.append] if listening else []
    breaker = CircuitBreaker(1, break_duration=120)  # longer than Retry's max_retry_after: it gives up at once
    with pytest.warns(ResilienceWarning, match="total"):  # an attempt timeout with no total one: warned at build
        pipeline = Pipeline(slow, Retry(2, base_delay=0.1), breaker, Timeout(1), listeners=listeners)
    with pytest.raises(RetriesExhaustedError):
        await pipeline("q")
    with pytest.raises(CircuitOpenError):
        await pipeline("q")
    if listening:
        assert built == ["TimeoutFired", "RetryGaveUp", "CircuitRejected"]
        assert [type(e).__name__ for e in heard] == ["TimeoutFired", "CircuitStateChanged", *built[1:]]
    else:
        assert built == []


async def test_a_raising_sync_listener_never_fails_the_call(caplog: pytest.LogCaptureFixture) -> None:
    heard: list[str] = []

    def broken(event: Event) -> None:
        raise RuntimeError("listener bug")

    pipeline = Pipeline(Scripted(server_error()), Retry(3, base_delay=0.1), listeners=[broken])
    pipeline.subscribe(lambda event: heard.append(type(event).__name__))
    assert await pipeline("q") == "ok"
    assert heard == ["RetryScheduled"]
    assert any("listener bug" in (r.exc_text or "") or r.exc_info for r in caplog.records)


async def test_a_failing_observer_never_fails_the_call(caplog: pytest.LogCaptureFixture) -> None:
    class BrokenPrices(PriceTable):
        def cost_of(self, model: str, tokens: Any) -> float | None:
            raise RuntimeError("pricing bug")

    async def program(question: str) -> str:
        import dspy

        settings_tracker = dspy.settings.usage_tracker
        settings_tracker.add_usage("m", {"prompt_tokens": 1, "completion_tokens": 1})
        return "ok"

    metrics = PrometheusMetrics(prices=BrokenPrices())
    assert await Pipeline(program, metrics)("q") == "ok"
    assert any("pricing bug" in str(r.exc_info) for r in caplog.records)


def test_async_listeners_are_rejected_with_a_pointer_to_the_adapter() -> None:
    async def handler(event: Event) -> None:
        return None

    with pytest.raises(ConfigurationError, match="AsyncListener"):
        Pipeline(Scripted(), listeners=[handler])
    pipeline = Pipeline(Scripted())
    with pytest.raises(ConfigurationError, match="AsyncListener"):
        pipeline.subscribe(handler)


async def test_async_listener_handles_events_in_order_and_survives_failures(caplog: pytest.LogCaptureFixture) -> None:
    handled: list[int] = []

    async def handler(event: Event) -> None:
        await asyncio.sleep(0.5)
        if isinstance(event, RetryScheduled) and event.attempt == 2:
            raise RuntimeError("async listener bug")
        handled.append(getattr(event, "attempt", -1))

    async with AsyncListener(handler, name="shipper") as listener:
        pipeline = Pipeline(Scripted(server_error(), server_error(), server_error()), Retry(5, base_delay=0.1))
        pipeline.subscribe(listener)
        assert await pipeline("q") == "ok"
        assert len(other_tasks()) == 1
    assert handled == [1, 3]
    assert listener.failed == 1
    assert not listener.running
    assert not other_tasks()
    assert any("async listener bug" in str(r.exc_info) for r in caplog.records)


async def test_async_listener_queue_is_bounded_and_events_before_start_wait() -> None:
    handled: list[str] = []

    async def handler(event: Event) -> None:
        handled.append(event.layer)

    listener = AsyncListener(handler, maxsize=2)
    for layer in "abc":
        listener(Event(pipeline="p", layer=layer, time=0.0))
    assert listener.dropped == 1
    await listener.start()
    await listener.aclose()
    assert handled == ["a", "b"]
    assert not other_tasks()


async def test_async_listener_accepts_events_from_other_threads() -> None:
    handled: list[str] = []

    async def handler(event: Event) -> None:
        handled.append(event.layer)

    async with AsyncListener(handler) as listener:
        await asyncio.to_thread(listener, Event(pipeline="p", layer="from-thread", time=0.0))
        await asyncio.sleep(0)
    assert handled == ["from-thread"]


async def test_a_bounded_close_cancels_a_stuck_handler_and_leaves_no_task() -> None:
    handled: list[str] = []

    async def handler(event: Event) -> None:
        if event.layer == "stuck":
            await asyncio.sleep(3600)
        handled.append(event.layer)

    listener = AsyncListener(handler)
    await listener.start()
    listener(Event(pipeline="p", layer="stuck", time=0.0))
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(5):
            await listener.aclose()
    assert not other_tasks()
    assert not listener.running

    await listener.start()
    listener(Event(pipeline="p", layer="after", time=0.0))
    await listener.aclose()
    assert handled == ["after"]
    assert not other_tasks()


async def test_logging_listener_works_through_the_async_adapter() -> None:
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("test.async_logging")
    logger.addHandler(Collect())
    logger.setLevel(logging.INFO)
    sync_listener = LoggingListener(logger)

    async def handler(event: Event) -> None:
        sync_listener(event)

    async with AsyncListener(handler) as listener:
        await Pipeline(Scripted(server_error()), Retry(2, base_delay=0.1), listeners=[listener])("q")
    assert [getattr(r, "event", None) for r in records] == ["RetryScheduled"]
