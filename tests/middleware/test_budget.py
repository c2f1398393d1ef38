"""Budget: checks before spending, reservations under concurrency, reconciliation with real usage, windows and
retry_after on virtual time, lifetime budgets, dollar caps, alerts, per-key budgets, cancellation, validation.

Async tests run on looptime's virtual loop clock (``--looptime``), so ``asyncio.sleep(60)`` advances time by
exactly 60 s at no cost. Token counts come from FaultInjectingLM, which reports usage like a provider.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import dspy
import pytest

from resilient_dspy import BudgetExceededError, Pipeline, by_partition_key
from resilient_dspy.errors import ConfigurationError, RequestTooLargeError
from resilient_dspy.events import Event
from resilient_dspy.middleware.budget import Budget, BudgetAlert, BudgetRejected, BudgetSpent
from resilient_dspy.testing import FaultInjectingLM
from tests.conftest import other_tasks

QUESTION = "What is DSPy?"


def now() -> float:
    return asyncio.get_running_loop().time()


def used(lm: FaultInjectingLM) -> int:
    """Tokens the LM reported over every request it answered."""
    return sum(entry.input_tokens + entry.output_tokens for entry in lm.journal)


async def tokens_of(question: str = QUESTION) -> int:
    """What one plain ``question -> answer`` call uses, measured on a fresh LM."""
    lm = FaultInjectingLM()
    with dspy.context(lm=lm):
        await dspy.Predict("question -> answer").acall(question=question)
    return used(lm)


def fixed(tokens: int) -> Any:
    return lambda call: tokens


def budget_pipeline(budget: Budget, events: list[Event] | None = None) -> Pipeline:
    return Pipeline(dspy.Predict("question -> answer"), budget, listeners=[events.append] if events is not None else [])


# ----------------------------------------------------------------------------------------- check before spending


async def test_a_call_that_does_not_fit_is_rejected_before_it_runs() -> None:
    """spent + estimate == cap still runs; one token more is refused with zero LM requests."""
    per_call, estimate = await tokens_of(), 100
    budget = Budget(tokens=per_call + estimate, estimate_tokens=fixed(estimate))
    lm = FaultInjectingLM()
    pipeline = budget_pipeline(budget)
    with dspy.context(lm=lm):
        await pipeline(QUESTION)
        await pipeline(QUESTION)  # per_call spent + 100 estimated == the cap: fits exactly
        assert lm.requests == 2
        with pytest.raises(BudgetExceededError) as caught:
            await pipeline(QUESTION)
    assert lm.requests == 2
    assert caught.value.retry_after is None
    snapshot = budget.snapshot()
    assert snapshot.tokens is not None
    assert (snapshot.tokens.spent, snapshot.tokens.reserved, snapshot.in_flight) == (2 * per_call, 0, 0)
    assert snapshot.tokens.remaining == 0


async def test_an_estimate_larger_than_the_whole_budget_can_never_run() -> None:
    """With the LM's max_tokens above the cap, the call fails as too large (not 'try later'), without a request."""
    lm = FaultInjectingLM(max_tokens=2000)
    pipeline = budget_pipeline(Budget(tokens=1000))
    with dspy.context(lm=lm), pytest.raises(RequestTooLargeError) as caught:
        await pipeline(QUESTION)
    assert caught.value.field == "Budget.tokens"
    assert lm.requests == 0


async def test_concurrent_calls_cannot_overspend() -> None:
    """Five calls at once, 400 tokens each against 1000: two are reserved and run, three are refused at once;
    the first to finish swaps its own reservation for its usage, the other's stays."""
    lm = FaultInjectingLM(script=[{"latency": 1.0}, {"latency": 3.0}])
    budget = Budget(tokens=1000, estimate_tokens=fixed(400))
    pipeline = budget_pipeline(budget)
    with dspy.context(lm=lm):
        tasks = [asyncio.create_task(pipeline(f"question {i}")) for i in range(5)]
        await asyncio.sleep(0.5)
        both = budget.snapshot()
        rejected = [task for task in tasks if task.done()]
        await asyncio.sleep(1)
        one = budget.snapshot()
        first_usage = used(lm)
        results = await asyncio.gather(*tasks, return_exceptions=True)

    assert both.tokens is not None
    assert (both.tokens.spent, both.tokens.reserved, both.in_flight) == (0, 800, 2)
    assert one.tokens is not None
    assert (one.tokens.spent, one.tokens.reserved, one.in_flight) == (first_usage, 400, 1)
    assert len(rejected) == 3
    assert all(isinstance(task.exception(), BudgetExceededError) for task in rejected)
    assert sum(isinstance(result, dspy.Prediction) for result in results) == 2
    assert lm.requests == 2
    after = budget.snapshot()
    assert after.tokens is not None
    assert (after.tokens.spent, after.tokens.reserved, after.in_flight) == (used(lm), 0, 0)


# ----------------------------------------------------------------------------------------- reconciliation


async def test_the_default_estimate_is_reconciled_with_real_usage() -> None:
    """Estimate = (input + instruction characters) / 4 + the LM's max_tokens; the actual usage replaces it."""
    events: list[Event] = []
    lm = FaultInjectingLM(max_tokens=50)
    program = dspy.Predict("question -> answer")
    budget = Budget(tokens=10_000)
    pipeline = Pipeline(program, budget, listeners=[events.append])
    with dspy.context(lm=lm):
        await pipeline(QUESTION)

    [spent] = [event for event in events if isinstance(event, BudgetSpent)]
    assert spent.estimated_tokens == (len(QUESTION) + len(program.signature.instructions)) // 4 + 50
    assert spent.tokens == used(lm) > 0
    assert (spent.estimated_dollars, spent.dollars) == (None, None)
    snapshot = budget.snapshot()
    assert snapshot.tokens is not None
    assert (snapshot.tokens.spent, snapshot.tokens.reserved) == (used(lm), 0)


async def test_a_pinned_lm_sets_the_completion_estimate() -> None:
    """A predictor's own LM is what runs, so its max_tokens (not the context LM's) goes into the estimate."""
    events: list[Event] = []
    program = dspy.Predict("question -> answer")
    program.lm = FaultInjectingLM(max_tokens=30)
    pipeline = Pipeline(program, Budget(tokens=10_000), listeners=[events.append])
    with dspy.context(lm=FaultInjectingLM(max_tokens=500)):
        await pipeline(QUESTION)
    [spent] = [event for event in events if isinstance(event, BudgetSpent)]
    assert spent.estimated_tokens == (len(QUESTION) + len(program.signature.instructions)) // 4 + 30


async def test_a_failed_call_is_charged_what_it_used_and_one_without_usage_nothing() -> None:
    """Malformed answers were billed (two requests, then a parse error); a 503 returned no usage."""
    budget = Budget(tokens=10_000, estimate_tokens=fixed(500))
    pipeline = budget_pipeline(budget)
    lm = FaultInjectingLM(script=["server_error"])
    with dspy.context(lm=lm), pytest.raises(dspy.LMServerError):
        await pipeline(QUESTION)
    snapshot = budget.snapshot()
    assert snapshot.tokens is not None
    assert (snapshot.tokens.spent, snapshot.tokens.reserved) == (0, 0)

    lm = FaultInjectingLM(script=["malformed", "malformed"])
    with dspy.context(lm=lm), pytest.raises(dspy.AdapterParseError):
        await pipeline(QUESTION)
    snapshot = budget.snapshot()
    assert snapshot.tokens is not None
    assert lm.requests == 2
    assert (snapshot.tokens.spent, snapshot.tokens.reserved) == (used(lm), 0)
    assert used(lm) > 0


async def test_the_usage_is_handed_back_to_a_caller_tracking_usage() -> None:
    """The Budget's own usage scope does not hide the prediction's usage from a caller with track_usage on."""
    lm = FaultInjectingLM()
    with dspy.context(lm=lm, track_usage=True):
        result = await budget_pipeline(Budget(tokens=10_000))(QUESTION)
    usage = result.get_lm_usage()
    assert usage is not None
    assert usage[lm.model]["total_tokens"] == used(lm)


# ----------------------------------------------------------------------------------------- windows


async def test_a_period_resets_and_retry_after_is_the_time_left() -> None:
    """per=60: the window opens at the first call; a refusal 20 s in says 40 s; at 60 s the budget is back."""
    per_call, estimate = await tokens_of(), 10
    lm = FaultInjectingLM()
    budget = Budget(tokens=per_call + estimate - 1, per=60.0, estimate_tokens=fixed(estimate))
    pipeline = budget_pipeline(budget)
    start = now()
    with dspy.context(lm=lm):
        await pipeline(QUESTION)
        await asyncio.sleep(20)
        with pytest.raises(BudgetExceededError) as first:
            await pipeline(QUESTION)
        await asyncio.sleep(39.5)
        with pytest.raises(BudgetExceededError) as second:
            await pipeline(QUESTION)
        await asyncio.sleep(0.5)
        await pipeline(QUESTION)
    assert first.value.retry_after == pytest.approx(40.0, abs=1e-9)
    assert second.value.retry_after == pytest.approx(0.5, abs=1e-9)
    assert lm.requests == 2
    snapshot = budget.snapshot()
    assert snapshot.tokens is not None
    assert snapshot.tokens.spent == per_call
    assert snapshot.resets_at == pytest.approx(start + 120.0, abs=1e-9)
    assert snapshot.resets_in == pytest.approx(60.0, abs=1e-9)


async def test_a_call_in_flight_at_the_reset_keeps_its_reservation_in_the_next_window() -> None:
    """A 70 s call admitted at 0 (per=60) still reserves at 65 s, in the window that followed on at 60 s."""
    lm = FaultInjectingLM(script=[{"latency": 70.0}])
    budget = Budget(tokens=799, per=60.0, estimate_tokens=fixed(400))
    pipeline = budget_pipeline(budget)
    start = now()
    with dspy.context(lm=lm):
        slow = asyncio.create_task(pipeline(QUESTION))
        await asyncio.sleep(65)
        with pytest.raises(BudgetExceededError) as caught:
            await pipeline(QUESTION)
        await slow
    assert caught.value.retry_after == pytest.approx(55.0, abs=1e-9)
    snapshot = budget.snapshot()
    assert snapshot.tokens is not None
    assert (snapshot.tokens.spent, snapshot.tokens.reserved) == (used(lm), 0)
    assert snapshot.resets_at == pytest.approx(start + 120.0, abs=1e-9)


async def test_a_lifetime_budget_never_resets_on_its_own() -> None:
    """Without per= the refusal has retry_after None, time changes nothing, reset() brings the budget back."""
    lm = FaultInjectingLM()
    budget = Budget(tokens=1, estimate_tokens=fixed(1))
    pipeline = budget_pipeline(budget)
    with dspy.context(lm=lm):
        await pipeline(QUESTION)
        await asyncio.sleep(1_000_000)
        with pytest.raises(BudgetExceededError) as caught:
            await pipeline(QUESTION)
        assert budget.snapshot().resets_at is None
        budget.reset()
        await pipeline(QUESTION)
    assert caught.value.retry_after is None
    assert lm.requests == 2


# ----------------------------------------------------------------------------------------- dollars


async def test_a_dollar_cap_prices_the_estimate_and_the_actual_usage() -> None:
    """The estimate is priced on the current LM's model; actual usage is priced after; the dollars cap refuses."""
    priced: list[dict[str, Any]] = []

    def price(usage: Mapping[str, Mapping[str, Any]]) -> float:
        priced.append({model: dict(entry) for model, entry in usage.items()})
        return float(sum(entry["prompt_tokens"] * 1e-3 + entry["completion_tokens"] * 2e-3 for entry in usage.values()))

    per_call = await tokens_of()
    events: list[Event] = []
    lm = FaultInjectingLM()
    budget = Budget(dollars=1.0, price=price, estimate_tokens=lambda call: (40, 60))
    pipeline = budget_pipeline(budget, events)
    with dspy.context(lm=lm):
        await pipeline(QUESTION)
        [entry] = lm.journal
        actual = entry.input_tokens * 1e-3 + entry.output_tokens * 2e-3
        while budget.snapshot().dollars.spent + 0.16 <= 1.0:  # type: ignore[union-attr]
            await pipeline(QUESTION)
        with pytest.raises(BudgetExceededError):
            await pipeline(QUESTION)

    assert priced[0] == {lm.model: {"prompt_tokens": 40, "completion_tokens": 60, "total_tokens": 100}}
    spent = [event for event in events if isinstance(event, BudgetSpent)]
    assert spent[0].estimated_dollars == pytest.approx(0.16)
    assert spent[0].dollars == pytest.approx(actual)
    assert spent[0].tokens == per_call
    [rejected] = [event for event in events if isinstance(event, BudgetRejected)]
    assert rejected.unit == "dollars"
    assert rejected.spent == pytest.approx(actual * lm.requests)
    assert rejected.spent + 0.16 > 1.0


# ----------------------------------------------------------------------------------------- alerts


async def test_alerts_fire_once_per_threshold_per_window() -> None:
    """At 50 % and 80 % of the cap, once each; after the window resets they fire again."""
    per_call = await tokens_of()
    alerts: list[BudgetAlert] = []
    events: list[Event] = []
    budget = Budget(
        tokens=4 * per_call, per=60.0, estimate_tokens=fixed(1), alert_at=(0.8, 0.5), on_alert=alerts.append
    )
    pipeline = budget_pipeline(budget, events)
    with dspy.context(lm=FaultInjectingLM()):
        fired = []
        for _ in range(4):
            await pipeline(QUESTION)
            fired.append([alert.threshold for alert in alerts])
        with pytest.raises(BudgetExceededError):
            await pipeline(QUESTION)
        await asyncio.sleep(60)
        await pipeline(QUESTION)
        await pipeline(QUESTION)

    assert fired == [[], [0.5], [0.5], [0.5, 0.8]]  # 25 %, 50 %, 75 %, 100 %
    assert [alert.threshold for alert in alerts] == [0.5, 0.8, 0.5]
    assert [(alert.unit, alert.spent, alert.limit) for alert in alerts[:2]] == [
        ("tokens", 2 * per_call, 4 * per_call),
        ("tokens", 4 * per_call, 4 * per_call),
    ]
    assert [event for event in events if isinstance(event, BudgetAlert)] == alerts


async def test_a_failing_on_alert_is_logged_and_never_fails_the_call(caplog: pytest.LogCaptureFixture) -> None:
    def explode(alert: BudgetAlert) -> None:
        raise RuntimeError("pager is down")

    pipeline = budget_pipeline(Budget(tokens=1000, estimate_tokens=fixed(1), alert_at=(0.01,), on_alert=explode))
    with caplog.at_level(logging.ERROR, logger="resilient_dspy.budget"), dspy.context(lm=FaultInjectingLM()):
        result = await pipeline(QUESTION)
    assert isinstance(result, dspy.Prediction)
    assert "on_alert failed" in caplog.text
    assert "pager is down" in caplog.text


# ----------------------------------------------------------------------------------------- keys, cancellation


async def test_per_key_budgets_are_independent() -> None:
    """Tenant a spends its budget; tenant b still has all of its own."""
    per_call = await tokens_of()
    budget = Budget(tokens=per_call, estimate_tokens=fixed(1), key=by_partition_key)
    pipeline = budget_pipeline(budget)
    lm = FaultInjectingLM()

    async def ask(tenant: str) -> Any:
        return await pipeline.run(pipeline.new_call({"question": QUESTION}, partition_key=tenant))

    with dspy.context(lm=lm):
        await ask("a")
        with pytest.raises(BudgetExceededError, match=r"\['a'\]"):
            await ask("a")
        await ask("b")
    assert lm.requests == 2
    snapshots = budget.snapshots()
    assert set(snapshots) == {"a", "b"}
    for tenant in ("a", "b"):
        tokens = snapshots[tenant].tokens
        assert tokens is not None
        assert (tokens.spent, tokens.remaining) == (per_call, 0)
    unseen = budget.snapshot("c").tokens
    assert unseen is not None
    assert (unseen.spent, unseen.remaining) == (0, per_call)
    budget.reset("a")
    with dspy.context(lm=lm):
        await ask("a")
    assert lm.requests == 3


async def test_a_cancelled_call_releases_its_reservation_and_propagates() -> None:
    lm = FaultInjectingLM(script=["hang"])
    budget = Budget(tokens=500, estimate_tokens=fixed(400))
    pipeline = budget_pipeline(budget)
    with dspy.context(lm=lm):
        task = asyncio.create_task(pipeline(QUESTION))
        await asyncio.sleep(1)
        midway = budget.snapshot().tokens
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        after = budget.snapshot()
        await pipeline(QUESTION)  # the 400 reserved are back
    assert midway is not None
    assert midway.reserved == 400
    assert after.tokens is not None
    assert (after.tokens.spent, after.tokens.reserved, after.in_flight) == (0, 0, 0)
    assert not other_tasks()


# ----------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({}, "Budget.tokens"),
        ({"tokens": 0}, "Budget.tokens"),
        ({"dollars": -1.0, "price": lambda usage: 0.0}, "Budget.dollars"),
        ({"dollars": 5.0}, "Budget.price"),
        ({"tokens": 10, "price": lambda usage: 0.0}, "Budget.price"),
        ({"tokens": 10, "per": 0}, "Budget.per"),
        ({"tokens": 10, "alert_at": (0.5, 1.5)}, "Budget.alert_at"),
        ({"tokens": 10, "alert_at": (0.0,)}, "Budget.alert_at"),
        ({"tokens": 10, "on_alert": "page me"}, "Budget.on_alert"),
        ({"tokens": 10, "max_keys": 0}, "Budget.max_keys"),
    ],
)
def test_bad_options_name_the_field(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Budget(**options)
    assert [name for name, _ in caught.value.problems] == [field]


def test_an_async_on_alert_is_refused() -> None:
    async def page(alert: BudgetAlert) -> None:
        return None

    with pytest.raises(ConfigurationError, match=r"Budget\.on_alert: must be a sync callable"):
        Budget(tokens=10, on_alert=page)


def test_every_bad_field_is_reported_at_once() -> None:
    with pytest.raises(ConfigurationError) as caught:
        Budget(tokens=-1, per=-1.0, alert_at=[2.0])
    assert {name for name, _ in caught.value.problems} == {"Budget.tokens", "Budget.per", "Budget.alert_at"}


def test_describe_names_the_caps_and_functions() -> None:
    def my_price(usage: Mapping[str, Mapping[str, Any]]) -> float:
        return 0.0

    [described, _] = budget_pipeline(Budget(tokens=100, dollars=2.0, per=3600.0, price=my_price)).describe()
    assert described["layer"] == "Budget"
    options = described["options"]
    assert (options["tokens"], options["dollars"], options["per"]) == (100, 2.0, 3600.0)
    assert options["price"].endswith("my_price")
    assert (options["estimate_tokens"], options["partitioned"]) == ("default", False)


def test_a_dollar_budget_whose_price_table_does_not_know_a_pinned_model_is_refused_at_build() -> None:
    from resilient_dspy.errors import ConfigurationError
    from resilient_dspy.observe import PriceTable

    program = dspy.Predict("question -> answer")
    program.lm = FaultInjectingLM("no-such-model")
    prices = PriceTable(defaults=False, litellm=False)
    with pytest.raises(ConfigurationError) as caught:
        Pipeline(program, Budget(dollars=5.0, price=prices))
    [(field, rule)] = caught.value.problems
    assert field == "Budget.price" and "no-such-model" in rule
    known = PriceTable({"custom/no-such-model": (1.0, 2.0)}, defaults=False, litellm=False)
    Pipeline(program, Budget(dollars=5.0, price=known))  # priced: builds


async def test_a_model_the_price_table_does_not_know_is_reported_once_at_error_level(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from resilient_dspy.observe import PriceTable

    budget = Budget(dollars=5.0, price=PriceTable(defaults=False, litellm=False))
    pipeline = Pipeline(dspy.Predict("question -> answer"), budget)
    with dspy.context(lm=FaultInjectingLM("unpriced")), caplog.at_level(logging.ERROR, "resilient_dspy"):
        for _ in range(3):
            await pipeline("q")
    unpriced = [r for r in caplog.records if "custom/unpriced" in r.getMessage()]
    assert len(unpriced) == 1 and unpriced[0].levelno == logging.ERROR
