"""Prometheus: a scenario (retries, a breaker opening and closing, a cache, tokens, cost), checked on the parsed
text exposition; registries are explicit and the global one is never touched."""

from __future__ import annotations

import asyncio
from typing import Any

import dspy
import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from resilient_dspy import AdaptiveConcurrency, CircuitBreaker, CircuitOpenError, Pipeline, RetriesExhaustedError, Retry
from resilient_dspy.faults import Fault, fault_error
from resilient_dspy.middleware.cache import Cache
from resilient_dspy.observe import PriceTable, PrometheusMetrics, make_asgi_app
from resilient_dspy.testing import FaultInjectingLM
from tests.observe import Scripted, server_error


def samples(metrics: PrometheusMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the text exposition by (sample name, labels)."""
    parsed = {}
    for family in text_string_to_metric_families(metrics.text()):
        for sample in family.samples:
            parsed[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return parsed


def value(metrics: PrometheusMetrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, frozenset(labels.items())))


def test_the_circuit_state_gauge_is_seeded_from_breakers_only() -> None:
    """Other stateful layers have snapshots() too (Budget, Bulkhead): they are no circuits and get no series."""
    from resilient_dspy import Budget, Bulkhead

    async def echo(question: str) -> str:
        return question

    metrics = PrometheusMetrics()
    Pipeline(echo, metrics, Budget(tokens=100), Bulkhead(2), CircuitBreaker(2), name="qa")
    series = {labels for (name, labels) in samples(metrics) if name == "resilient_dspy_circuit_state"}
    assert series == {frozenset({"pipeline": "qa", "layer": "CircuitBreaker", "key": ""}.items())}


class Switch:
    """An async program that fails with a 503 while ``failing`` is set."""

    def __init__(self) -> None:
        self.failing = True

    async def __call__(self, question: str) -> str:
        if self.failing:
            raise server_error()
        return "ok"


async def test_retries_and_a_breaker_opening_then_closing() -> None:
    metrics = PrometheusMetrics()
    program = Switch()
    breaker = CircuitBreaker(2, break_duration=30)
    retry = Retry(3, base_delay=0.1, jitter="none", max_retry_after=10.0)  # the 30 s break outlasts it
    pipeline = Pipeline(program, metrics, retry, breaker, name="qa")
    assert value(metrics, "resilient_dspy_circuit_state", pipeline="qa", layer="CircuitBreaker", key="") == 0

    with pytest.raises(RetriesExhaustedError):
        await pipeline("q")  # the second failure opens the circuit: Retry gives up instead of sleeping for nothing
    with pytest.raises(CircuitOpenError):
        await pipeline("q")
    assert value(metrics, "resilient_dspy_calls_total", pipeline="qa", outcome="error") == 1
    assert value(metrics, "resilient_dspy_calls_total", pipeline="qa", outcome="rejected") == 1
    assert value(metrics, "resilient_dspy_attempts_total", pipeline="qa") == 2
    assert value(metrics, "resilient_dspy_retries_total", pipeline="qa", reason="LMServerError") == 1
    rejected = {"pipeline": "qa", "layer": "CircuitBreaker", "reason": "open"}
    assert value(metrics, "resilient_dspy_rejections_total", **rejected) == 1
    circuit = {"pipeline": "qa", "layer": "CircuitBreaker", "key": ""}
    assert value(metrics, "resilient_dspy_circuit_state", **circuit) == 2
    assert value(metrics, "resilient_dspy_circuit_transitions_total", **circuit, to="open") == 1

    await asyncio.sleep(31)
    program.failing = False
    assert await pipeline("q") == "ok"
    assert value(metrics, "resilient_dspy_circuit_state", **circuit) == 0
    assert value(metrics, "resilient_dspy_circuit_transitions_total", **circuit, to="half_open") == 1
    assert value(metrics, "resilient_dspy_circuit_transitions_total", **circuit, to="closed") == 1
    assert value(metrics, "resilient_dspy_calls_total", pipeline="qa", outcome="success") == 1
    assert value(metrics, "resilient_dspy_attempts_total", pipeline="qa") == 3
    assert value(metrics, "resilient_dspy_call_duration_seconds_count", pipeline="qa", outcome="rejected") == 1
    assert (
        value(metrics, "resilient_dspy_call_duration_seconds_bucket", pipeline="qa", outcome="success", le="0.05") == 1
    )


async def test_gave_up_is_an_error_and_durations_land_in_buckets() -> None:
    metrics = PrometheusMetrics()
    pipeline = Pipeline(Scripted(*[server_error()] * 3), metrics, Retry(3, base_delay=1.0, jitter="none"), name="qa")
    with pytest.raises(RetriesExhaustedError):
        await pipeline("q")
    assert value(metrics, "resilient_dspy_calls_total", pipeline="qa", outcome="error") == 1
    labels = {"pipeline": "qa", "outcome": "error"}
    assert value(metrics, "resilient_dspy_call_duration_seconds_sum", **labels) == pytest.approx(3.0, abs=0.01)
    assert value(metrics, "resilient_dspy_call_duration_seconds_bucket", **labels, le="2.5") == 0
    assert value(metrics, "resilient_dspy_call_duration_seconds_bucket", **labels, le="5.0") == 1


async def test_cache_tokens_and_cost_from_dspy_calls() -> None:
    prices = PriceTable({"fault/local": (2.0, 8.0)}, defaults=False, litellm=False)
    metrics = PrometheusMetrics(prices=prices)
    lm = FaultInjectingLM()
    pipeline = Pipeline(dspy.Predict("question -> answer"), metrics, Cache(), name="qa")
    with dspy.context(lm=lm):
        await pipeline("What is DSPy?")
        await pipeline("What is DSPy?")
        await pipeline("What is a circuit breaker?")
    assert value(metrics, "resilient_dspy_cache_requests_total", pipeline="qa", layer="Cache", result="miss") == 2
    assert value(metrics, "resilient_dspy_cache_requests_total", pipeline="qa", layer="Cache", result="hit") == 1
    first, second = lm.journal
    saved = value(metrics, "resilient_dspy_cache_saved_tokens_total", pipeline="qa", layer="Cache")
    assert saved == first.input_tokens + first.output_tokens
    model = "custom/fault/local"
    input_tokens = first.input_tokens + second.input_tokens
    output_tokens = first.output_tokens + second.output_tokens
    assert value(metrics, "resilient_dspy_tokens_total", pipeline="qa", model=model, kind="input") == input_tokens
    assert value(metrics, "resilient_dspy_tokens_total", pipeline="qa", model=model, kind="output") == output_tokens
    cost = value(metrics, "resilient_dspy_cost_usd_total", pipeline="qa", model=model)
    assert cost == pytest.approx((input_tokens * 2.0 + output_tokens * 8.0) / 1e6)
    assert value(metrics, "resilient_dspy_attempts_total", pipeline="qa") == 2


async def test_asgi_app_serves_the_given_registry() -> None:
    metrics = PrometheusMetrics()
    await Pipeline(Scripted(), metrics, name="qa")("q")
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/metrics", "query_string": b"", "headers": []}
    await make_asgi_app(metrics)(scope, receive, send)
    assert sent[0]["status"] == 200
    body = b"".join(m.get("body", b"") for m in sent).decode()
    assert 'resilient_dspy_calls_total{outcome="success",pipeline="qa"} 1.0' in body


def test_registries_are_explicit() -> None:
    before = {name for name in REGISTRY._names_to_collectors if name.startswith("resilient_dspy")}
    assert not before
    mine = CollectorRegistry()
    metrics = PrometheusMetrics(mine)
    assert metrics.registry is mine
    assert PrometheusMetrics().registry is not mine
    assert not {name for name in REGISTRY._names_to_collectors if name.startswith("resilient_dspy")}
    with pytest.raises(ValueError, match="Duplicated"):
        PrometheusMetrics(mine)


async def test_tokens_off_measures_no_usage() -> None:
    metrics = PrometheusMetrics(tokens=False, prices=PriceTable({"fault/local": (1.0, 1.0)}, litellm=False))
    pipeline = Pipeline(dspy.Predict("question -> answer"), metrics, name="qa")
    with dspy.context(lm=FaultInjectingLM()):
        await pipeline("What is DSPy?")
    names = {name for name, _ in samples(metrics)}
    assert "resilient_dspy_calls_total" in names
    assert "resilient_dspy_tokens_total" not in names
    assert "resilient_dspy_cost_usd_total" not in names


def test_events_are_routed_by_type_and_a_rejection_of_ones_own_is_counted_by_its_base_class() -> None:
    from dataclasses import dataclass

    from resilient_dspy.events import Event, Rejected
    from resilient_dspy.middleware.budget import BudgetRejected
    from resilient_dspy.middleware.bulkhead import BulkheadRejected
    from resilient_dspy.middleware.cache.events import CacheMiss
    from resilient_dspy.middleware.chaos import ChaosInjected
    from resilient_dspy.middleware.guard import GuardRejectedInput

    @dataclass(frozen=True, slots=True, kw_only=True)
    class QuotaRefusal(Rejected):  # any name: it is counted because it is a Rejected
        reason: str

    @dataclass(frozen=True, slots=True, kw_only=True)
    class SomethingRejected(Event):  # a name alone no longer makes a rejection
        reason: str

    metrics = PrometheusMetrics()
    for event in (
        BudgetRejected(
            pipeline="qa",
            layer="Budget",
            time=0.0,
            key=None,
            unit="dollars",
            limit=1.0,
            spent=1.0,
            reserved=0.0,
            estimate=0.1,
            retry_after=None,
        ),
        GuardRejectedInput(pipeline="qa", layer="Guard", time=0.0, field="q", rule="free text", problems=()),
        BulkheadRejected(pipeline="qa", layer="Bulkhead", time=0.0, key=None, reason="queue_full", waited=0.0),
        QuotaRefusal(pipeline="qa", layer="Quota", time=0.0, reason="monthly"),
        SomethingRejected(pipeline="qa", layer="Other", time=0.0, reason="ignored"),
        ChaosInjected(pipeline="qa", layer="Chaos", time=0.0, kind="latency", detail="2.0 s"),
        CacheMiss(pipeline="qa", layer="Cache", time=0.0, key="k", bypassed=True),
    ):
        metrics.on_event(event)
    rejections = {
        labels["layer"]: (labels["reason"], count)
        for (name, frozen), count in samples(metrics).items()
        if name == "resilient_dspy_rejections_total"
        for labels in [dict(frozen)]
    }
    assert rejections == {
        "Budget": ("dollars", 1),
        "Guard": ("input", 1),
        "Bulkhead": ("queue_full", 1),
        "Quota": ("monthly", 1),
    }
    assert value(metrics, "resilient_dspy_chaos_injected_total", pipeline="qa", layer="Chaos", kind="latency") == 1
    assert value(metrics, "resilient_dspy_cache_requests_total", pipeline="qa", layer="Cache", result="bypass") == 1


async def test_a_call_the_cache_answered_is_labelled_cached_not_a_provider_success() -> None:
    metrics = PrometheusMetrics()
    pipeline = Pipeline(Scripted(), metrics, Retry(2), Cache(), name="qa")
    await pipeline("q")
    await pipeline("q")
    assert value(metrics, "resilient_dspy_calls_total", pipeline="qa", outcome="success") == 1
    assert value(metrics, "resilient_dspy_calls_total", pipeline="qa", outcome="cached") == 1
    assert value(metrics, "resilient_dspy_attempts_total", pipeline="qa") == 1


async def test_an_adaptive_limit_is_a_gauge_that_follows_its_changes() -> None:
    """Each ConcurrencyLimitChanged sets resilient_dspy_concurrency_limit for its layer and key."""

    async def failing(question: str) -> str:
        raise fault_error(Fault.SERVER_ERROR, status=503) or AssertionError

    metrics = PrometheusMetrics()
    layer = AdaptiveConcurrency("aimd", initial_limit=10, backoff=0.5)
    pipeline = Pipeline(failing, metrics, layer, name="qa")
    with pytest.raises(dspy.LMServerError):
        await pipeline(question="q")
    line = [row for row in metrics.text().splitlines() if row.startswith("resilient_dspy_concurrency_limit{")]
    assert line == ['resilient_dspy_concurrency_limit{key="",layer="AdaptiveConcurrency",pipeline="qa"} 5.0']
