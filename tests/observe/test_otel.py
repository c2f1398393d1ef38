"""OpenTelemetry: call and attempt spans (names, parentage, attributes, status), span events, metrics.

Providers are SDK ones with in-memory exporters, passed explicitly: no global provider is set.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import dspy
import pytest
from opentelemetry.trace import StatusCode

from resilient_dspy import (
    CircuitBreaker,
    CircuitOpenError,
    Fallback,
    Pipeline,
    RetriesExhaustedError,
    Retry,
    Static,
    Timeout,
)
from resilient_dspy.events import Rejected
from resilient_dspy.observe import OpenTelemetry, PriceTable
from resilient_dspy.testing import FaultInjectingLM
from tests.conftest import other_tasks
from tests.observe import AlwaysFailing, Otel, Scripted, server_error


def by_name(spans: list, name: str) -> list:
    return [span for span in spans if span.name == name]


async def test_call_span_with_child_attempt_spans_and_attributes() -> None:
    otel = Otel()
    telemetry = OpenTelemetry(otel.tracer_provider, otel.meter_provider)
    pipeline = Pipeline(
        Scripted(server_error("first fails")),
        telemetry,
        Timeout(30),
        Retry(3, base_delay=0.5, jitter="none"),
        telemetry.attempts(),
        name="qa",
    )
    assert await pipeline("q") == "ok"
    spans = otel.spans()
    [call] = by_name(spans, "call qa")
    attempts = sorted(by_name(spans, "attempt qa"), key=lambda s: s.attributes["resilient_dspy.attempt"])
    assert len(spans) == 3 and len(attempts) == 2
    for attempt in attempts:
        assert attempt.parent is not None and attempt.parent.span_id == call.context.span_id
        assert attempt.context.trace_id == call.context.trace_id
    assert call.parent is None
    assert dict(call.attributes) == {
        "resilient_dspy.pipeline": "qa",
        "resilient_dspy.outcome": "success",
        "resilient_dspy.served_by": "primary",
        "resilient_dspy.attempts": 2,
        "resilient_dspy.retries": 1,
        "gen_ai.usage.input_tokens": 0,
        "gen_ai.usage.output_tokens": 0,
    }
    assert call.status.status_code is StatusCode.UNSET
    first, second = attempts
    assert first.attributes["resilient_dspy.outcome"] == "error"
    assert first.attributes["error.type"] == "LMServerError"
    assert first.status.status_code is StatusCode.ERROR
    assert "first fails" in (first.status.description or "")
    assert [e.name for e in first.events] == ["exception"]
    assert second.attributes["resilient_dspy.outcome"] == "success"
    assert second.status.status_code is StatusCode.UNSET
    [retry_event] = call.events
    assert retry_event.name == "RetryScheduled"
    assert dict(retry_event.attributes) == {
        "layer": "Retry",
        "time": retry_event.attributes["time"],
        "attempt": 1,
        "delay": 0.5,
        "reason": "LMServerError",
        "error.type": "LMServerError",
        "error.message": "first fails",
    }


async def test_failed_call_has_error_status_redacted_exception_and_metrics() -> None:
    otel = Otel()
    telemetry = OpenTelemetry(otel.tracer_provider, otel.meter_provider)
    pipeline = Pipeline(
        AlwaysFailing("denied for bob@example.com"),
        telemetry,
        Retry(2, base_delay=0.1),
        telemetry.attempts(),
        name="qa",
    )
    with pytest.raises(RetriesExhaustedError):
        await pipeline("q")
    [call] = by_name(otel.spans(), "call qa")
    assert call.status.status_code is StatusCode.ERROR
    assert call.attributes["resilient_dspy.outcome"] == "error"
    assert call.attributes["error.type"] == "RetriesExhaustedError"
    [exception] = [e for e in call.events if e.name == "exception"]
    assert "bob@example.com" not in exception.attributes["exception.message"]
    assert "bob@example.com" not in exception.attributes["exception.stacktrace"]
    assert "bob@example.com" not in (call.status.description or "")
    assert "[REDACTED]" in exception.attributes["exception.message"]
    gave_up = [e for e in call.events if e.name == "RetryGaveUp"]
    assert gave_up and gave_up[0].attributes["error.message"] == "denied for [REDACTED]"
    assert otel.value("resilient_dspy.calls", pipeline="qa", outcome="error") == 1
    assert otel.value("resilient_dspy.attempts", pipeline="qa") == 2
    assert otel.value("resilient_dspy.retries", pipeline="qa", reason="LMServerError") == 1
    assert otel.value("resilient_dspy.call.duration", pipeline="qa", outcome="error") == 1


async def test_breaker_metrics_rejections_and_events_on_the_attempt_span() -> None:
    otel = Otel()
    telemetry = OpenTelemetry(otel.tracer_provider, otel.meter_provider)
    breaker = CircuitBreaker(1, break_duration=30)
    retry = Retry(2, base_delay=0.1, max_retry_after=10.0)  # the 30 s break outlasts it: Retry gives up at once
    pipeline = Pipeline(AlwaysFailing(), telemetry, retry, telemetry.attempts(), breaker, name="qa")
    assert otel.value("resilient_dspy.circuit.state", layer="CircuitBreaker", key="") == 0
    with pytest.raises(RetriesExhaustedError):
        await pipeline("q")
    with pytest.raises(CircuitOpenError):
        await pipeline("q")
    assert otel.value("resilient_dspy.circuit.state", pipeline="qa", layer="CircuitBreaker", key="") == 2
    assert otel.value("resilient_dspy.circuit.transitions", to="open") == 1
    assert otel.value("resilient_dspy.rejections", pipeline="qa", layer="CircuitBreaker", reason="open") == 1
    assert otel.value("resilient_dspy.calls", pipeline="qa", outcome="rejected") == 1
    first, second = sorted(by_name(otel.spans(), "attempt qa"), key=lambda s: s.start_time)
    assert [e.name for e in first.events] == ["CircuitStateChanged", "exception"]
    assert first.events[0].attributes["new"] == "open"
    assert [e.name for e in second.events] == ["CircuitRejected", "exception"]
    assert second.attributes["resilient_dspy.outcome"] == "rejected"

    breaker.reset()
    assert otel.value("resilient_dspy.circuit.state", pipeline="qa", layer="CircuitBreaker", key="") == 0
    assert otel.value("resilient_dspy.circuit.transitions", to="closed") == 1


async def test_tokens_cost_and_model_from_a_real_dspy_call() -> None:
    otel = Otel()
    prices = PriceTable({"fault/local": (1.0, 4.0)}, defaults=False, litellm=False)
    telemetry = OpenTelemetry(otel.tracer_provider, otel.meter_provider, prices=prices)
    lm = FaultInjectingLM()
    pipeline = Pipeline(dspy.Predict("question -> answer"), telemetry, Retry(3, base_delay=0.1), telemetry.attempts())
    with dspy.context(lm=lm):
        await pipeline("What is DSPy?")
    [entry] = lm.journal
    model = "custom/fault/local"
    [call] = by_name(otel.spans(), "call Predict")
    assert call.attributes["gen_ai.usage.input_tokens"] == entry.input_tokens
    assert call.attributes["gen_ai.usage.output_tokens"] == entry.output_tokens
    assert call.attributes["gen_ai.request.model"] == model
    expected = (entry.input_tokens * 1.0 + entry.output_tokens * 4.0) / 1e6
    assert call.attributes["resilient_dspy.cost_usd"] == pytest.approx(expected)
    [attempt] = by_name(otel.spans(), "attempt Predict")
    assert attempt.attributes["gen_ai.usage.input_tokens"] == entry.input_tokens
    assert otel.value("resilient_dspy.tokens", model=model, kind="input") == entry.input_tokens
    assert otel.value("resilient_dspy.tokens", model=model, kind="output") == entry.output_tokens
    assert otel.value("resilient_dspy.cost", model=model) == pytest.approx(expected)


async def test_fallback_timeout_and_generic_events() -> None:
    @dataclass(frozen=True, slots=True, kw_only=True)
    class QuotaRejected(Rejected):  # counted by type: any name works
        reason: str

    otel = Otel()
    telemetry = OpenTelemetry(otel.tracer_provider, otel.meter_provider)

    async def slow(question: str) -> str:
        await asyncio.sleep(10)
        return "late"

    pipeline = Pipeline(slow, telemetry, Fallback(Static(answer="static")), Timeout(1), name="qa")
    outcome = await pipeline.invoke("q")
    assert outcome.served_by == "static"
    assert otel.value("resilient_dspy.calls", outcome="fallback") == 1
    assert otel.value("resilient_dspy.timeouts", scope="total") == 1
    assert otel.value("resilient_dspy.fallbacks", alternative="static") == 1
    telemetry.on_event(QuotaRejected(pipeline="qa", layer="Quota", time=0.0, reason="monthly"))
    assert otel.value("resilient_dspy.rejections", layer="Quota", reason="monthly") == 1


async def test_cancellation_is_recorded_and_propagates_without_orphans() -> None:
    otel = Otel()
    telemetry = OpenTelemetry(otel.tracer_provider, otel.meter_provider)

    async def hang(question: str) -> str:
        await asyncio.sleep(3600)
        return "never"

    pipeline = Pipeline(hang, telemetry, Retry(2), telemetry.attempts(), name="qa")
    task = asyncio.ensure_future(pipeline("q"))
    await asyncio.sleep(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not other_tasks()
    [call] = by_name(otel.spans(), "call qa")
    assert call.attributes["resilient_dspy.outcome"] == "cancelled"
    assert call.status.status_code is StatusCode.UNSET
    assert otel.value("resilient_dspy.calls", outcome="cancelled") == 1


async def test_listening_twice_is_prevented_and_global_providers_are_untouched() -> None:
    from opentelemetry import trace

    before = trace.get_tracer_provider()
    otel = Otel()
    telemetry = OpenTelemetry(otel.tracer_provider, otel.meter_provider)
    pipeline = Pipeline(Scripted(), telemetry, listeners=[telemetry.on_event])
    assert pipeline.runtime.listeners == (telemetry.on_event,)
    assert trace.get_tracer_provider() is before


async def test_tokens_off_leaves_usage_out_of_spans() -> None:
    otel = Otel()
    telemetry = OpenTelemetry(otel.tracer_provider, otel.meter_provider, tokens=False)
    pipeline = Pipeline(dspy.Predict("question -> answer"), telemetry, Retry(2), telemetry.attempts(), name="qa")
    with dspy.context(lm=FaultInjectingLM()):
        await pipeline("What is DSPy?")
    for span in otel.spans():
        assert not any(name.startswith("gen_ai.") for name in span.attributes)
    assert otel.value("resilient_dspy.tokens") is None
