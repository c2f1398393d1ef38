"""Cost accounting: totals against hand-computed values from the fault-injecting LM's journal, per pipeline, key
and model; failed attempts billed; cache savings; unknown models; price lookup and litellm's map."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import dspy
import pytest

from resilient_dspy import Pipeline, RetriesExhaustedError, Retry
from resilient_dspy.events import Event
from resilient_dspy.middleware.cache import Cache
from resilient_dspy.observe import DEFAULT_PRICES, CallCost, CostTotals, CostTracker, ModelPrice, PriceTable, TokenUsage
from resilient_dspy.testing import FaultInjectingLM

MODEL = "custom/fault/local"
PRICES = PriceTable({"fault/local": ModelPrice(input=2.0, output=10.0)}, defaults=False, litellm=False)


def dollars(input_tokens: int, output_tokens: int) -> float:
    return (input_tokens * 2.0 + output_tokens * 10.0) / 1_000_000


async def test_totals_per_pipeline_key_and_model_match_the_journal() -> None:
    seen: list[CallCost] = []
    tracker = CostTracker(PRICES, key=lambda call: next(iter(call.inputs.values())).split()[0], on_call=seen.append)
    qa = Pipeline(dspy.Predict("question -> answer"), tracker, name="qa")
    summary = Pipeline(dspy.Predict("text -> summary"), tracker, name="summary")
    lm = FaultInjectingLM()
    with dspy.context(lm=lm):
        await qa("alice asks: what is DSPy?")
        await qa("bob asks: what is a bulkhead?")
        await summary(text="alice wants a summary of this text")
    j = lm.journal
    assert len(j) == 3
    total_in, total_out = sum(e.input_tokens for e in j), sum(e.output_tokens for e in j)
    assert tracker.total() == CostTotals(
        calls=3, input_tokens=total_in, output_tokens=total_out, cost=pytest.approx(dollars(total_in, total_out))
    )
    by_pipeline = tracker.by_pipeline()
    assert by_pipeline["qa"].calls == 2
    assert by_pipeline["qa"].cost == pytest.approx(
        dollars(j[0].input_tokens + j[1].input_tokens, j[0].output_tokens + j[1].output_tokens)
    )
    assert by_pipeline["summary"].cost == pytest.approx(dollars(j[2].input_tokens, j[2].output_tokens))
    by_key = tracker.by_key()
    assert set(by_key) == {"alice", "bob"}
    assert by_key["alice"].calls == 2
    assert by_key["alice"].input_tokens == j[0].input_tokens + j[2].input_tokens
    assert by_key["bob"].cost == pytest.approx(dollars(j[1].input_tokens, j[1].output_tokens))
    assert tracker.by_model()[MODEL].tokens == total_in + total_out
    assert [c.key for c in seen] == ["alice", "bob", "alice"]
    assert seen[1] == CallCost(
        "qa",
        "bob",
        "success",
        {MODEL: TokenUsage(j[1].input_tokens, j[1].output_tokens)},
        pytest.approx(dollars(j[1].input_tokens, j[1].output_tokens)),
    )


async def test_failed_attempts_are_billed_too() -> None:
    tracker = CostTracker(PRICES)
    lm = FaultInjectingLM(script=["malformed"] * 4)
    pipeline = Pipeline(dspy.Predict("question -> answer"), tracker, Retry(2, base_delay=0.1))
    with dspy.context(lm=lm), pytest.raises(RetriesExhaustedError):
        await pipeline("What is DSPy?")
    billed_in = sum(e.input_tokens for e in lm.journal)
    billed_out = sum(e.output_tokens for e in lm.journal)
    assert billed_in > 0
    totals = tracker.total()
    assert (totals.calls, totals.input_tokens, totals.output_tokens) == (1, billed_in, billed_out)
    assert totals.cost == pytest.approx(dollars(billed_in, billed_out))


async def test_cache_hits_count_as_saved() -> None:
    tracker = CostTracker(PRICES)
    lm = FaultInjectingLM()
    pipeline = Pipeline(dspy.Predict("question -> answer"), tracker, Cache(), name="qa")
    with dspy.context(lm=lm):
        await pipeline("What is DSPy?")
        await pipeline("What is DSPy?")
    [entry] = lm.journal
    totals = tracker.total()
    assert totals.calls == 2
    assert totals.tokens == entry.input_tokens + entry.output_tokens
    assert totals.saved_tokens == entry.input_tokens + entry.output_tokens
    assert tracker.by_pipeline()["qa"].saved_tokens == totals.saved_tokens
    assert totals.saved_cost == pytest.approx(dollars(entry.input_tokens, entry.output_tokens))
    assert totals.saved_cost == pytest.approx(totals.cost)  # the hit saved exactly what the miss cost


def test_saved_usage_or_cost_on_an_event_is_priced() -> None:
    @dataclass(frozen=True, slots=True, kw_only=True)
    class CacheHit(Event):
        key: str
        saved_tokens: int
        saved_usage: dict[str, Any]

    tracker = CostTracker(PRICES)
    usage = {MODEL: {"prompt_tokens": 1000, "completion_tokens": 100}}
    tracker.on_event(CacheHit(pipeline="qa", layer="Cache", time=0.0, key="k", saved_tokens=1100, saved_usage=usage))
    assert tracker.total().saved_tokens == 1100
    assert tracker.total().saved_cost == pytest.approx(dollars(1000, 100))
    assert tracker.by_pipeline()["qa"].saved_cost == pytest.approx(dollars(1000, 100))


async def test_unknown_model_counts_tokens_warns_once_and_never_fails(caplog: pytest.LogCaptureFixture) -> None:
    tracker = CostTracker(PriceTable(defaults=False, litellm=False))
    lm = FaultInjectingLM("mystery-model")
    pipeline = Pipeline(dspy.Predict("question -> answer"), tracker)
    with caplog.at_level(logging.WARNING, "resilient_dspy.cost"), dspy.context(lm=lm):
        await pipeline("one")
        await pipeline("two")
    totals = tracker.total()
    assert totals.cost == 0.0
    assert totals.unpriced_tokens == totals.tokens == sum(e.input_tokens + e.output_tokens for e in lm.journal)
    assert [r.getMessage() for r in caplog.records] == [
        "no price for model 'custom/mystery-model': its tokens are counted but not priced"
    ]


async def test_a_failing_on_call_or_key_function_never_fails_the_call(caplog: pytest.LogCaptureFixture) -> None:
    def explode(value: object) -> None:
        raise RuntimeError("observer bug")

    tracker = CostTracker(PRICES, key=explode, on_call=explode)
    pipeline = Pipeline(dspy.Predict("question -> answer"), tracker)
    with dspy.context(lm=FaultInjectingLM()):
        result = await pipeline("q")
    assert result.answer
    assert tracker.total().calls == 1
    assert tracker.by_key() == {}
    assert sum("observer bug" in (r.exc_text or str(r.exc_info)) for r in caplog.records) == 2


async def test_user_tracking_still_gets_its_usage() -> None:
    tracker = CostTracker(PRICES)
    pipeline = Pipeline(dspy.Predict("question -> answer"), tracker)
    lm = FaultInjectingLM()
    with dspy.context(lm=lm, track_usage=True):
        result = await pipeline("q")
    [entry] = lm.journal
    assert result.get_lm_usage()[MODEL]["prompt_tokens"] == entry.input_tokens
    with dspy.context(lm=lm), dspy.track_usage() as outer:
        await pipeline("q2")
    assert outer.get_total_tokens()[MODEL]["prompt_tokens"] == lm.journal[-1].input_tokens
    assert tracker.total().calls == 2


def test_price_lookup_prefixes_dates_overrides_and_litellm(monkeypatch: pytest.MonkeyPatch) -> None:
    table = PriceTable(litellm=False)
    assert table.lookup("openai/gpt-4o-mini") == DEFAULT_PRICES["gpt-4o-mini"]
    assert table.lookup("openrouter/openai/gpt-4o-mini-2024-07-18") == DEFAULT_PRICES["gpt-4o-mini"]
    assert table.lookup("anthropic/claude-sonnet-4-5-20250929") == DEFAULT_PRICES["claude-sonnet-4-5"]
    assert table.lookup("nobody/knows") is None
    custom = table.with_prices({"gpt-4o-mini": (1.0, 1.0)})
    assert custom.lookup("openai/gpt-4o-mini") == ModelPrice(1.0, 1.0)
    assert PriceTable(defaults=False, litellm=False).lookup("gpt-4o-mini") is None
    assert table({MODEL: {"prompt_tokens": 5}, "gpt-4o": {"prompt_tokens": 1_000_000}}) == pytest.approx(2.5)

    fake = SimpleNamespace(model_cost={"mystery": {"input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05}})
    monkeypatch.setitem(sys.modules, "litellm", fake)
    assert PriceTable().lookup("vendor/mystery") == ModelPrice(pytest.approx(3.0), pytest.approx(15.0))
    assert PriceTable(litellm=False).lookup("vendor/mystery") is None
    monkeypatch.delitem(sys.modules, "litellm")
    assert PriceTable().lookup("vendor/mystery") is None
    with pytest.raises(ValueError, match=">= 0"):
        PriceTable({"bad": (-1.0, 1.0)})


async def test_concurrent_calls_under_a_shared_tracker_are_not_double_counted() -> None:
    import asyncio

    from resilient_dspy.observe import PrometheusMetrics

    tracker = CostTracker(PRICES)
    metrics = PrometheusMetrics(prices=PRICES)
    pipeline = Pipeline(dspy.Predict("question -> answer"), tracker, metrics, name="qa")
    lm = FaultInjectingLM(profile={"latency": (0.1, 0.5)})
    with dspy.context(lm=lm), dspy.track_usage() as outer:
        await asyncio.gather(*(pipeline(f"question {i}") for i in range(5)))
    total_in = sum(e.input_tokens for e in lm.journal)
    assert len(lm.journal) == 5
    assert tracker.total().input_tokens == total_in
    assert outer.get_total_tokens()[MODEL]["prompt_tokens"] == total_in
    counted = metrics.tokens.labels("qa", MODEL, "input")._value.get()
    assert counted == total_in
