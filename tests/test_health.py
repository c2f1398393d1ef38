"""pipeline.health(): each stateful layer's status and figures, the worst one as the pipeline's, readiness."""

from __future__ import annotations

import asyncio
import json

import dspy
import pytest

from resilient_dspy import Budget, Bulkhead, Cache, CircuitBreaker, Pipeline, RateLimiter, Retry, Timeout
from resilient_dspy.core.health import worst


async def answer(question: str) -> str:
    await asyncio.sleep(1)
    return question


def test_worst() -> None:
    assert worst([]) == "ok"
    assert worst(["ok", "degraded", "ok"]) == "degraded"
    assert worst(["degraded", "down", "ok"]) == "down"


async def test_a_quiet_pipeline_is_ok_and_lists_only_stateful_layers() -> None:
    pipeline = Pipeline(answer, Timeout(10), Retry(3), CircuitBreaker(3), Bulkhead(2), Cache(), name="qa")
    health = pipeline.health()
    assert health.ready and health.status == "ok"
    assert [layer.layer for layer in health.layers] == ["CircuitBreaker", "Bulkhead", "Cache"]
    json.dumps(health.to_dict())


async def test_an_open_circuit_makes_the_pipeline_not_ready_until_the_break_passes() -> None:
    async def failing(question: str) -> str:
        raise dspy.LMServerError("503", status=503)

    breaker = CircuitBreaker(1, break_duration=10)
    pipeline = Pipeline(failing, breaker)
    with pytest.raises(dspy.LMServerError):
        await pipeline("q")
    health = pipeline.health()
    assert not health.ready and health.layers[0].details["refusing"] == ["*"]
    await asyncio.sleep(10)
    assert pipeline.health().ready  # the next call would be admitted as a probe


async def test_a_partly_open_partitioned_breaker_is_degraded() -> None:
    async def flaky(question: str) -> str:
        if question == "bad":
            raise dspy.LMServerError("503", status=503)
        return question

    pipeline = Pipeline(flaky, CircuitBreaker(1, key=lambda call: call.inputs["question"]))
    await pipeline("good")
    with pytest.raises(dspy.LMServerError):
        await pipeline("bad")
    health = pipeline.health()
    assert health.status == "degraded" and health.ready
    assert health.layers[0].details["circuits"] == {"good": "closed", "bad": "open"}


async def test_a_full_bulkhead_and_a_queueing_limiter_are_degraded() -> None:
    pipeline = Pipeline(answer, RateLimiter(requests=2, per=10.0), Bulkhead(1, max_queue=5))
    tasks = [asyncio.create_task(pipeline(f"q{i}")) for i in range(3)]
    await asyncio.sleep(0.5)
    limiter, bulkhead = pipeline.health().layers
    assert bulkhead.status == "degraded" and bulkhead.details["compartments"]["*"]["queued"] == 1
    assert limiter.status == "degraded" and limiter.details["lanes"]["*"]["queued"] == 1
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_cache_hit_rate() -> None:
    pipeline = Pipeline(answer, Cache())
    await pipeline("a")
    await pipeline("a")
    await pipeline("a")
    await pipeline("b")
    cache = pipeline.health().layers[0]
    assert cache.status == "ok" and cache.details["hit_rate"] == pytest.approx(0.5)


async def test_a_budget_is_ok_then_degraded_past_its_alert_then_down_when_spent() -> None:
    from resilient_dspy.testing import FaultInjectingLM

    budget = Budget(tokens=400, estimate_tokens=lambda call: 1)  # the fault LM spends ~160 tokens per answer
    pipeline = Pipeline(dspy.Predict("question -> answer"), budget)
    seen = []
    with dspy.context(lm=FaultInjectingLM()):
        for index in range(3):
            await pipeline(f"Question number {index}?")
            spent = budget.snapshot().tokens.spent  # type: ignore[union-attr]
            seen.append((pipeline.health().status, spent >= 320, spent >= 400))
    assert seen == [("ok", False, False), ("degraded", True, False), ("down", True, True)]


# --- user mistakes: logged once, not ready until a call succeeds ---------------------------------------


async def test_a_user_mistake_is_logged_once_and_the_pipeline_is_not_ready_until_a_call_succeeds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A programming error propagates, is logged once at ERROR (per error type, not per call), and health() says
    down, naming it, until a later call succeeds."""
    import logging

    broken = True

    async def program(question: str) -> str:
        if broken:
            raise TypeError("unsupported operand")
        return question

    pipeline = Pipeline(program, CircuitBreaker(2), name="qa")
    with caplog.at_level(logging.ERROR, logger="resilient_dspy"):
        for _ in range(3):
            with pytest.raises(TypeError):
                await pipeline("q")
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "TypeError" in r.getMessage()]
    assert len(errors) == 1
    health = pipeline.health()
    assert not health.ready and health.status == "down"
    (program_report,) = [layer for layer in health.layers if layer.layer == "program"]
    assert "TypeError" in program_report.details["error"]
    breaker_report = next(layer for layer in health.layers if layer.layer == "CircuitBreaker")
    assert breaker_report.status == "ok"  # a user mistake is neutral for the breaker: no trip after 3 of them
    json.dumps(health.to_dict())

    broken = False
    assert await pipeline("q") == "q"
    assert pipeline.health().ready


async def test_a_user_mistake_is_never_retried() -> None:
    """Retry never repeats a configuration or programming error: one attempt, the error as it is."""
    calls = 0

    async def program(question: str) -> str:
        nonlocal calls
        calls += 1
        raise AttributeError("no attribute 'answer'")

    pipeline = Pipeline(program, Retry(3, base_delay=0, jitter="none"))
    with pytest.raises(AttributeError):
        await pipeline("q")
    assert calls == 1
