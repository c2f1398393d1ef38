"""Hedge: the first success wins, losers cancelled and awaited, non-retryable errors end the race, max_hedges, the
deadline, a learned delay, alternatives, usage of losers, and the order with Cache and RateLimiter (virtual time)."""

from __future__ import annotations

import asyncio
import warnings
from typing import Any

import dspy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_dspy import Cache, Hedge, Limit, Pipeline, RateLimitedError, RateLimiter, Timeout, UseProgram
from resilient_dspy.errors import ConfigurationError, ResilienceWarning
from resilient_dspy.events import Event, HedgeStarted, HedgeWon
from resilient_dspy.middleware.hedge import Percentile
from resilient_dspy.observe.cost import CostTracker
from resilient_dspy.testing import FaultInjectingLM, FaultStep
from tests.conftest import other_tasks, run_virtual


class Boom(Exception):
    """Classified UNKNOWN: not retryable (fails closed)."""


def server_error() -> Exception:
    return dspy.LMServerError("503", status=503)


class Scripted:
    """A program whose n-th run sleeps ``latencies[n]`` (the last one once they run out) then answers ``answer-n`` (or
    raises ``errors[n]``); it logs every start, end and cancellation."""

    def __init__(self, latencies: list[float], errors: dict[int, Exception] | None = None) -> None:
        self.latencies = latencies
        self.errors = errors or {}
        self.started: list[float] = []
        self.cancelled: list[int] = []
        self.finished: list[int] = []

    async def __call__(self, question: str) -> str:
        index = len(self.started)
        loop = asyncio.get_running_loop()
        self.started.append(loop.time())
        try:
            await asyncio.sleep(self.latencies[min(index, len(self.latencies) - 1)])
        except asyncio.CancelledError:
            self.cancelled.append(index)
            raise
        self.finished.append(index)
        if index in self.errors:
            raise self.errors[index]
        return f"answer-{index}"


def now() -> float:
    return asyncio.get_running_loop().time()


# --- the race -------------------------------------------------------------------------------------------------


async def test_a_slow_first_attempt_is_overtaken_and_the_first_success_wins() -> None:
    program = Scripted([10.0, 0.5])
    outcome = await Pipeline(program, Hedge(1.0)).invoke("q")
    assert outcome.value == "answer-1"
    assert (outcome.hedges, outcome.served_hedge, outcome.attempts) == (1, 1, 2)
    assert outcome.duration == pytest.approx(1.5)
    assert program.started == pytest.approx([0.0, 1.0], abs=1e-6)


async def test_an_attempt_that_answers_within_the_delay_starts_no_hedge() -> None:
    program = Scripted([0.5])
    outcome = await Pipeline(program, Hedge(1.0)).invoke("q")
    assert (outcome.value, outcome.hedges, outcome.served_hedge) == ("answer-0", 0, 0)
    assert len(program.started) == 1


async def test_the_loser_is_cancelled_and_awaited_before_the_answer_returns() -> None:
    program = Scripted([10.0, 0.5])
    value = await Pipeline(program, Hedge(1.0))("q")
    assert value == "answer-1"
    assert program.cancelled == [0]
    assert other_tasks() == set()


async def test_cancelling_the_caller_cancels_every_attempt() -> None:
    program = Scripted([10.0, 10.0, 10.0])
    task = asyncio.ensure_future(Pipeline(program, Hedge(1.0, max_hedges=2))("q"))
    await asyncio.sleep(2.5)
    assert len(program.started) == 3
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(program.cancelled) == [0, 1, 2]
    assert other_tasks() == set()


async def test_a_total_timeout_above_ends_the_race_with_no_attempt_left() -> None:
    program = Scripted([10.0, 10.0])
    pipeline = Pipeline(program, Timeout(3.0), Hedge(1.0))
    with pytest.raises(TimeoutError):
        await pipeline("q")
    assert sorted(program.cancelled) == [0, 1]
    assert other_tasks() == set()


async def test_a_non_retryable_error_ends_the_race_at_once_and_cancels_the_others() -> None:
    program = Scripted([10.0, 0.5], errors={1: Boom("bad request")})
    with pytest.raises(Boom):
        await Pipeline(program, Hedge(1.0))("q")
    assert now() == pytest.approx(1.5)
    assert program.cancelled == [0]
    assert other_tasks() == set()


async def test_a_non_retryable_error_of_the_first_attempt_is_never_hedged() -> None:
    program = Scripted([0.2], errors={0: Boom("bad request")})
    with pytest.raises(Boom):
        await Pipeline(program, Hedge(1.0))("q")
    assert len(program.started) == 1


async def test_a_retryable_failure_starts_the_next_hedge_at_once() -> None:
    program = Scripted([0.2, 0.3], errors={0: server_error()})
    heard: list[Event] = []
    outcome = await Pipeline(program, Hedge(5.0), listeners=[heard.append]).invoke("q")
    assert outcome.value == "answer-1"
    assert program.started == pytest.approx([0.0, 0.2], abs=1e-6)
    started = [event for event in heard if isinstance(event, HedgeStarted)]
    assert [(event.hedge, event.reason) for event in started] == [(1, "failure")]


async def test_when_every_attempt_fails_retryably_the_last_error_is_raised() -> None:
    errors = {0: dspy.LMServerError("first", status=503), 1: dspy.LMServerError("last", status=502)}
    program = Scripted([0.5, 0.5], errors=errors)
    with pytest.raises(dspy.LMServerError, match="last"):
        await Pipeline(program, Hedge(1.0))("q")
    assert other_tasks() == set()


async def test_a_hedge_rejected_below_leaves_the_first_attempt_running() -> None:
    calls = 0

    async def program(question: str) -> str:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RateLimitedError("limited below", retry_after=1.0)
        await asyncio.sleep(3.0)
        return "first"

    outcome = await Pipeline(program, Hedge(1.0, max_hedges=2)).invoke("q")
    assert (outcome.value, outcome.served_hedge) == ("first", 0)
    assert now() == pytest.approx(3.0)


async def test_no_hedge_starts_at_or_after_the_deadline() -> None:
    program = Scripted([1.5, 0.1])
    outcome = await Pipeline(program, Timeout(2.0), Hedge(2.0)).invoke("q")
    assert (outcome.value, outcome.hedges) == ("answer-0", 0)
    assert len(program.started) == 1


def started_at(latencies: list[float], delay: float, max_hedges: int) -> list[float]:
    """The model: attempt i starts at i*delay, unless an earlier attempt has answered by then."""
    starts = [0.0]
    for i in range(1, max_hedges + 1):
        at = i * delay
        if min(s + latencies[j] for j, s in enumerate(starts)) <= at:
            break
        starts.append(at)
    return starts


@settings(max_examples=40, deadline=None)
@given(
    latencies=st.lists(st.integers(1, 40).map(lambda tenth: tenth / 10), min_size=4, max_size=4),
    delay_tenths=st.integers(1, 20),
    max_hedges=st.integers(1, 3),
)
def test_the_race_matches_the_model_within_max_hedges(
    latencies: list[float], delay_tenths: int, max_hedges: int
) -> None:
    """Attempts <= 1 + max_hedges, the answer is one the program gave, the first to finish wins, nothing is left."""
    delay = delay_tenths / 10 + 0.05  # off the latency grid: no tie between a start and an answer

    async def scenario() -> tuple[Any, Scripted, float, set[asyncio.Task[object]]]:
        program = Scripted(list(latencies))
        outcome = await Pipeline(program, Hedge(delay, max_hedges=max_hedges)).invoke("q")
        return outcome, program, now(), other_tasks()

    outcome, program, ended, left = run_virtual(scenario)
    starts = started_at(latencies, delay, max_hedges)
    finish = [start + latencies[i] for i, start in enumerate(starts)]
    winner = min(range(len(starts)), key=lambda i: (finish[i], i))
    assert len(program.started) == len(starts) <= 1 + max_hedges
    assert outcome.value == f"answer-{winner}" and outcome.value in {f"answer-{i}" for i in program.finished}
    assert (outcome.served_hedge, outcome.hedges) == (winner, len(starts) - 1)
    assert ended == pytest.approx(finish[winner], abs=1e-6)
    assert left == set()


def race_model(plan: list[tuple[float, str]], delay: float, max_hedges: int) -> tuple[str, int, float, int]:
    """The rules, as a simulation: (how it ended, the deciding attempt, when, attempts started). An attempt is
    (latency, "ok" | "retryable" | "fatal"); a retryable failure starts the next hedge at once."""
    starts, judged, next_at, last = [0.0], set(), delay, -1
    while True:
        pending = {i: start + plan[i][0] for i, start in enumerate(starts) if i not in judged}
        can_hedge = len(starts) - 1 < max_hedges
        first_end = min(pending.values(), default=float("inf"))
        if can_hedge and next_at < first_end:
            starts.append(next_at)
            next_at += delay
            continue
        index = min(pending, key=pending.__getitem__)
        judged.add(index)
        kind = plan[index][1]
        if kind != "retryable":
            return kind, index, first_end, len(starts)
        last = index
        if can_hedge:
            starts.append(first_end)
            next_at = first_end + delay
        elif len(judged) == len(starts):
            return "failed", last, first_end, len(starts)


@settings(max_examples=60, deadline=None)
@given(
    plan=st.lists(
        st.tuples(st.integers(1, 30), st.sampled_from(["ok", "ok", "retryable", "fatal"])), min_size=4, max_size=4
    ),
    delay_tenths=st.integers(1, 20),
    max_hedges=st.integers(1, 3),
)
def test_failures_end_or_carry_on_the_race_as_the_model_says(
    plan: list[tuple[int, str]], delay_tenths: int, max_hedges: int
) -> None:
    """Non-retryable ends it at once, retryable starts the next hedge at once, the last failure is the error."""
    timed = [(tenths / 10 + 0.0001 * 2**i, kind) for i, (tenths, kind) in enumerate(plan)]  # distinct: no ties
    delay = delay_tenths / 10 + 0.05
    errors: dict[int, Exception] = {
        i: server_error() if kind == "retryable" else Boom(str(i)) for i, (_, kind) in enumerate(timed) if kind != "ok"
    }

    async def scenario() -> tuple[str, int, float, int, set[asyncio.Task[object]]]:
        program = Scripted([latency for latency, _ in timed], errors)
        try:
            outcome = await Pipeline(program, Hedge(delay, max_hedges=max_hedges)).invoke("q")
            ended = ("ok", outcome.served_hedge)
        except Exception as error:
            ended = ("fatal" if isinstance(error, Boom) else "failed", next(i for i, e in errors.items() if e is error))
        return *ended, now(), len(program.started), other_tasks()

    kind, index, ended, started, left = run_virtual(scenario)
    expected_kind, expected_index, expected_end, expected_started = race_model(timed, delay, max_hedges)
    assert (kind, index, started) == (expected_kind, expected_index, expected_started)
    assert ended == pytest.approx(expected_end, abs=1e-6)
    assert started <= 1 + max_hedges and left == set()


# --- the delay -------------------------------------------------------------------------------------------------


async def test_the_delay_is_learned_from_a_percentile_of_recent_successes() -> None:
    hedge = Hedge(Percentile(0.9, window=10, min_samples=5, floor=0.05, ceiling=3.0))
    latencies = [0.1 * (10 - i) for i in range(10)]  # 1.0 .. 0.1: each below what was learned, so none is hedged
    program = Scripted(latencies)
    pipeline = Pipeline(program, hedge)
    assert hedge.current_delay() == 3.0  # nothing learned yet: the ceiling
    for _ in range(4):
        await pipeline("q")
    assert hedge.snapshot().learned is False and hedge.current_delay() == 3.0
    for _ in range(6):
        await pipeline("q")
    snapshot = hedge.snapshot()
    assert snapshot.learned and snapshot.delay == pytest.approx(0.9)  # nearest rank 9 of 10
    assert snapshot.hedges == 0 and snapshot.calls == 10


async def test_a_learned_delay_hedges_the_slow_tail_and_forgets_old_latencies() -> None:
    hedge = Hedge("p50")
    fast = [0.2] * 10
    program = Scripted([*fast, 5.0, 0.2, 1.0])
    pipeline = Pipeline(program, hedge)
    for _ in range(10):
        await pipeline("q")
    assert hedge.current_delay() == pytest.approx(0.2)
    outcome = await pipeline.invoke("q")  # 5 s: hedged after 0.2 s, the hedge answers in 0.2 s
    assert (outcome.value, outcome.duration) == ("answer-11", pytest.approx(0.4))
    for _ in range(100):
        await pipeline("q")
    assert hedge.current_delay() == pytest.approx(1.0)  # the window holds only the last 100


def test_a_learned_delay_stays_within_its_floor_and_ceiling() -> None:
    async def scenario() -> tuple[float, float]:
        low = Hedge(Percentile(0.5, min_samples=1, floor=0.3, ceiling=0.6))
        await Pipeline(Scripted([0.01]), low)("q")
        high = Hedge(Percentile(0.5, min_samples=1, floor=0.0, ceiling=0.6))
        await Pipeline(Scripted([0.59]), high)("q")
        return low.current_delay(), high.current_delay()

    assert run_virtual(scenario) == pytest.approx((0.3, 0.59))


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"delay": -0.1}, "Hedge.delay"),
        ({"delay": float("nan")}, "Hedge.delay"),
        ({"delay": "p100"}, "Hedge.delay"),
        ({"delay": "fast"}, "Hedge.delay"),
        ({"max_hedges": 0}, "Hedge.max_hedges"),
        ({"alternatives": [UseProgram(Scripted([0.1]))], "max_hedges": 2}, "Hedge.max_hedges"),
        ({"alternatives": ["not a program"]}, "Hedge.alternatives[0]"),
        ({"alternatives": [UseProgram(Scripted([0.1]), on=(Boom,))]}, "Hedge.alternatives[0]"),
        ({"name": 3}, "Hedge.name"),
    ],
)
def test_bad_options_are_a_configuration_error_naming_the_field(arguments: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Hedge(**arguments)
    assert field in {name for name, _ in caught.value.problems}


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"q": 1.0}, "Percentile.q"),
        ({"q": 0.9, "floor": 2.0, "ceiling": 1.0}, "Percentile.floor"),
        ({"q": 0.9, "window": 5, "min_samples": 6}, "Percentile.min_samples"),
        ({"q": 0.9, "window": 0}, "Percentile.window"),
    ],
)
def test_bad_percentiles_are_a_configuration_error_naming_the_field(arguments: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Percentile(**arguments)
    assert field in {name for name, _ in caught.value.problems}


# --- alternatives, events, state ------------------------------------------------------------------------------


async def test_hedge_n_runs_the_nth_alternative_and_the_outcome_names_it() -> None:
    primary, backup = Scripted([10.0]), Scripted([0.3])
    pipeline = Pipeline(primary, Hedge(1.0, alternatives=[UseProgram(backup, name="backup")]))
    outcome = await pipeline.invoke("q")
    assert (outcome.value, outcome.served_by, outcome.served_hedge) == ("answer-0", "backup", 1)
    assert len(backup.started) == 1 and primary.cancelled == [0]


async def test_events_snapshot_and_health_report_the_hedges() -> None:
    heard: list[Event] = []
    hedge = Hedge(1.0, max_hedges=2)
    pipeline = Pipeline(Scripted([10.0, 10.0, 0.5, 0.2]), hedge, listeners=[heard.append])
    await pipeline("q")
    await pipeline("q")
    kinds = [(type(e).__name__, getattr(e, "hedge", getattr(e, "attempt", None))) for e in heard]
    assert kinds == [("HedgeStarted", 1), ("HedgeStarted", 2), ("HedgeWon", 2), ("HedgeWon", 0)]
    won = next(event for event in heard if isinstance(event, HedgeWon))
    assert (won.hedges, won.latency) == (2, pytest.approx(0.5))
    snapshot = hedge.snapshot()
    assert (snapshot.calls, snapshot.hedged_calls, snapshot.hedges, snapshot.wins) == (2, 1, 2, {0: 1, 2: 1})
    health = hedge.health()
    assert health.status == "ok" and health.details["hedges"] == 2
    assert pipeline.describe()[0]["options"]["delay"] == 1.0


# --- usage, cache, rate limiter -------------------------------------------------------------------------------


class TwoSteps(dspy.Module):
    """Two LM requests in a row: a loser cancelled in its second has already used the first's tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.draft = dspy.Predict("question -> answer")
        self.polish = dspy.Predict("question -> answer")

    async def aforward(self, question: str) -> dspy.Prediction:
        draft = await self.draft.acall(question=question)
        return await self.polish.acall(question=draft.answer)


def two_step_lm() -> FaultInjectingLM:
    """The first attempt's draft answers at once and its polish hangs 10 s; the hedge's two requests answer at once."""
    return FaultInjectingLM(script=[FaultStep(latency=0.0), FaultStep(latency=10.0), None, None])


def answered_tokens(lm: FaultInjectingLM) -> int:
    answered = [entry for entry in lm.journal if entry.detail == ""]
    assert len(answered) == 3  # the loser's draft, the hedge's draft and polish; the loser's polish was cancelled
    return sum(entry.input_tokens + entry.output_tokens for entry in answered)


async def test_a_cancelled_losers_usage_reaches_the_answers_lm_usage() -> None:
    lm = two_step_lm()
    with dspy.context(lm=lm, track_usage=True):
        prediction = await Pipeline(TwoSteps(), Hedge(1.0))("What is hedging?")
    usage = prediction.get_lm_usage()
    assert sum(model["total_tokens"] for model in usage.values()) == answered_tokens(lm)
    assert other_tasks() == set()


async def test_a_cancelled_losers_usage_reaches_the_cost() -> None:
    lm = two_step_lm()
    tracker = CostTracker()
    with dspy.context(lm=lm):
        await Pipeline(TwoSteps(), tracker, Hedge(1.0))("What is hedging?")
    assert tracker.total().tokens == answered_tokens(lm)


async def test_a_cache_above_the_hedge_serves_a_hit_without_hedging() -> None:
    hedge = Hedge(1.0)
    program = Scripted([10.0, 0.5])
    pipeline = Pipeline(program, Cache(), hedge)
    first = await pipeline.invoke("q")
    again = await pipeline.invoke("q")
    assert first.hedges == 1 and (again.value, again.hedges, again.attempts) == (first.value, 0, 0)
    assert hedge.snapshot().calls == 1 and len(program.started) == 2


def test_a_hedge_above_a_cache_or_below_a_rate_limiter_warns() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Pipeline(Scripted([0.1]), Hedge(1.0), Cache())
        Pipeline(Scripted([0.1]), RateLimiter(requests=10, per=1.0), Hedge(1.0))
        Pipeline(Scripted([0.1]), Cache(), Hedge(1.0), RateLimiter(requests=10, per=1.0))
    messages = [str(w.message) for w in caught if issubclass(w.category, ResilienceWarning)]
    assert len(messages) == 2
    assert "Cache" in messages[0] and "ratelimit" in messages[1]


async def test_each_hedge_takes_its_own_rate_limiter_admission() -> None:
    limiter = RateLimiter(Limit.requests(10, per=60.0))
    program = Scripted([10.0, 10.0, 0.5])
    await Pipeline(program, Hedge(1.0, max_hedges=2), limiter)("q")
    assert limiter.snapshot().limits[0].used == 3


async def test_a_rate_limiter_that_refuses_a_hedge_leaves_the_call_to_its_first_attempt() -> None:
    limiter = RateLimiter(Limit.requests(1, per=60.0), max_wait=0.1)
    program = Scripted([3.0])
    outcome = await Pipeline(program, Hedge(1.0), limiter).invoke("q")
    assert (outcome.value, outcome.hedges, outcome.served_hedge) == ("answer-0", 1, 0)
    assert len(program.started) == 1


async def test_a_timeout_below_the_hedge_bounds_each_attempt_and_its_expiry_starts_the_next_hedge() -> None:
    program = Scripted([10.0, 0.5])
    timeout = Timeout(1.0)
    outcome = await Pipeline(program, Hedge(5.0), timeout).invoke("q")
    assert (outcome.value, outcome.served_hedge) == ("answer-1", 1)
    assert outcome.duration == pytest.approx(1.5)
    assert timeout.describe()["scope"] == "attempt"


async def test_a_retry_below_the_hedge_retries_within_each_attempt() -> None:
    from resilient_dspy import Retry

    program = Scripted([0.1, 10.0, 0.2], errors={0: server_error()})
    outcome = await Pipeline(program, Hedge(1.0), Retry(2, base_delay=0.0, jitter="none")).invoke("q")
    assert (outcome.value, outcome.retries, outcome.served_hedge) == ("answer-2", 1, 1)
    assert outcome.duration == pytest.approx(1.2)


def test_a_stack_config_builds_a_hedge_with_a_learned_delay() -> None:
    config = {
        "program": {"signature": "question -> answer"},
        "layers": [
            {"layer": "Cache"},
            {"layer": "Hedge", "delay": {"kind": "Percentile", "q": 0.9, "ceiling": 2.0}, "max_hedges": 2},
            {"layer": "Timeout", "seconds": 5},
        ],
    }
    by_hand = Pipeline(dspy.Predict("question -> answer"), Cache(), Hedge(Percentile(0.9, ceiling=2.0), max_hedges=2))
    built = Pipeline.from_config(config)
    assert built.describe()[1] == by_hand.describe()[1]
    delay = Pipeline.from_config({**config, "layers": [{"layer": "Hedge", "delay": "p95"}]}).describe()[0]["options"]
    assert delay["delay"]["kind"] == "Percentile" and delay["delay"]["q"] == 0.95


async def test_a_streamed_call_is_never_hedged() -> None:
    from tests.test_streaming import stream

    lm = FaultInjectingLM(script=[FaultStep(latency=3.0)])
    hedge = Hedge(0.5)
    with dspy.context(lm=lm):
        chunks, final = await stream(Pipeline(dspy.Predict("question -> answer"), hedge).as_module(), question="q")
    assert "".join(chunks) == final.answer
    assert lm.requests == 1 and hedge.snapshot().hedges == 0


async def test_health_is_degraded_while_most_recent_calls_are_hedged() -> None:
    hedge = Hedge(0.5)
    slow = Pipeline(Scripted([1.0]), hedge)  # every call outlasts the delay: hedged
    for _ in range(20):
        await slow("q")
    assert hedge.health().status == "degraded"
    fast = Pipeline(Scripted([0.1]), hedge)
    for _ in range(100):
        await fast("q")
    assert hedge.health().status == "ok" and hedge.snapshot().hedged_calls == 20


async def test_a_uselm_hedge_runs_the_same_stack_under_the_other_lm_in_its_own_task() -> None:
    from resilient_dspy import UseLM

    primary = FaultInjectingLM("fault/primary", script=[FaultStep(latency=10.0)])
    backup = FaultInjectingLM("fault/backup")
    pipeline = Pipeline(dspy.Predict("question -> answer"), Hedge(1.0, alternatives=[UseLM(backup, name="backup")]))
    with dspy.context(lm=primary):
        outcome = await pipeline.invoke("Which model answers?")
        assert dspy.settings.lm is primary  # the hedge's LM stayed in its own task
    assert (outcome.served_by, outcome.served_hedge, outcome.duration) == ("backup", 1, pytest.approx(1.0))
    assert (primary.requests, backup.requests) == (1, 1)
    assert other_tasks() == set()
