"""Canary: weighted and sticky routing, automatic rollback on worse errors or latency (and none when equal), promote
and rollback by hand, shadow copies that never answer, bounded in number and time, and never left behind."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

import dspy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_dspy import Canary, Fallback, Pipeline, Retry, Static, Timeout, TimeoutExceededError, UseLM, UseProgram
from resilient_dspy.errors import ConfigurationError, ResilienceWarning
from resilient_dspy.events import (
    CanaryPromoted,
    CanaryRolledBack,
    CanaryRouted,
    Event,
    ShadowCompared,
    ShadowSkipped,
)
from resilient_dspy.testing import FaultInjectingLM, FaultProfile
from tests.conftest import other_tasks, run_virtual


class Boom(Exception):
    """A provider-like failure no default predicate treats specially."""


def program(
    name: str, *, latency: float = 0.0, fails: Callable[[int], bool] = lambda i: False, error: type[Exception] = Boom
) -> Callable[..., Awaitable[str]]:
    """An async program answering '<name>: <question>' after ``latency`` virtual seconds; its i-th call (from 0)
    raises ``error`` when ``fails(i)``."""
    count = itertools.count()

    async def run(question: str) -> str:
        index = next(count)
        await asyncio.sleep(latency)
        if fails(index):
            raise error(f"{name} failed call {index}")
        return f"{name}: {question}"

    run.__qualname__ = name
    return run


def candidate(name: str = "cand", **behaviour: Any) -> UseProgram:
    return UseProgram(program(name, **behaviour), name=name)


async def served_by(pipeline: Pipeline, calls: int) -> list[str]:
    """Who served each of ``calls`` sequential calls (errors recorded as 'error')."""
    routes = []
    for index in range(calls):
        try:
            routes.append((await pipeline.invoke(f"q{index}")).served_by)
        except Boom:
            routes.append("error")
    return routes


# --- routing --------------------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(weight=st.floats(0.05, 0.5), seed=st.integers(0, 2**32 - 1))
def test_weights_hold_statistically_with_a_seeded_rng(weight: float, seed: int) -> None:
    calls = 1000

    async def scenario() -> list[str]:
        canary = Canary(candidate(), weights=(weight,), rng=random.Random(seed))
        return await served_by(Pipeline(program("stable"), canary), calls)

    share = run_virtual(scenario).count("cand") / calls
    sigma = (weight * (1 - weight) / calls) ** 0.5
    assert abs(share - weight) < 5 * sigma


async def test_two_candidates_each_get_their_share_and_stable_the_rest() -> None:
    canary = Canary(candidate("a"), candidate("b"), weights=(0.1, 0.3), rng=random.Random(7))
    routes = await served_by(Pipeline(program("stable"), canary), 3000)
    assert abs(routes.count("a") / 3000 - 0.1) < 0.03
    assert abs(routes.count("b") / 3000 - 0.3) < 0.04
    assert abs(routes.count("primary") / 3000 - 0.6) < 0.04


async def test_the_same_seed_gives_the_same_split() -> None:
    def pipeline() -> Pipeline:
        return Pipeline(program("stable"), Canary(candidate(), weights=(0.3,), rng=random.Random(11)))

    assert await served_by(pipeline(), 200) == await served_by(pipeline(), 200)


async def test_without_weights_candidates_share_ten_percent_evenly() -> None:
    canary = Canary(candidate("a"), candidate("b"), rng=random.Random(3))
    routes = await served_by(Pipeline(program("stable"), canary), 4000)
    assert abs(routes.count("a") / 4000 - 0.05) < 0.015 and abs(routes.count("b") / 4000 - 0.05) < 0.015
    assert canary.snapshot().stable_weight == pytest.approx(0.9)


def by_user(call: Any) -> str:
    return str(call.properties["user"])


async def routes_of_users(canary: Canary, users: list[str]) -> dict[str, str]:
    pipeline = Pipeline(program("stable"), canary)
    found = {}
    for user in users:
        call = pipeline.new_call({"question": "q"}, properties={"user": user})
        await pipeline.run(call)
        found[user] = call.record.served_by
    return found


@settings(max_examples=25, deadline=None)
@given(users=st.lists(st.text(max_size=12), min_size=1, max_size=20, unique=True))
def test_a_sticky_key_always_takes_the_same_route_even_in_a_new_canary(users: list[str]) -> None:
    async def scenario() -> None:
        first = await routes_of_users(Canary(candidate(), weights=(0.5,), sticky=by_user), users)
        again = await routes_of_users(Canary(candidate(), weights=(0.5,), sticky=by_user), users * 3)
        assert again == first

    run_virtual(scenario)


async def test_sticky_keys_split_by_the_weights() -> None:
    users = [f"user-{i}" for i in range(2000)]
    routes = await routes_of_users(Canary(candidate(), weights=(0.2,), sticky=by_user), users)
    assert abs(list(routes.values()).count("cand") / 2000 - 0.2) < 0.03


async def test_rolling_back_one_candidate_moves_no_key_of_another() -> None:
    users = [f"user-{i}" for i in range(300)]
    canary = Canary(candidate("a"), candidate("b"), weights=(0.3, 0.3), sticky=by_user)
    before = await routes_of_users(canary, users)
    canary.rollback("a")
    after = await routes_of_users(canary, users)
    assert {u for u, r in before.items() if r == "b"} == {u for u, r in after.items() if r == "b"}
    assert "a" not in after.values()
    assert {u for u, r in after.items() if r == "primary"} == {u for u, r in before.items() if r != "b"}


async def test_an_lm_candidate_runs_the_stack_below_under_its_lm() -> None:
    stable_lm = FaultInjectingLM("fault/stable")
    new_lm = FaultInjectingLM("fault/new")
    pipeline = Pipeline(dspy.Predict("question -> answer"), Canary(UseLM(new_lm, name="new"), weights=(0.5,)))
    with dspy.context(lm=stable_lm):
        outcomes = [await pipeline.invoke(f"q{i}") for i in range(40)]
    served = [outcome.served_by for outcome in outcomes]
    assert served.count("new") == new_lm.requests and served.count("primary") == stable_lm.requests
    assert new_lm.requests > 0 and stable_lm.requests > 0


# --- automatic rollback ------------------------------------------------------------------------------------


async def test_a_candidate_with_a_worse_error_rate_is_rolled_back_with_an_event_and_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events: list[Event] = []
    canary = Canary(
        candidate(fails=lambda i: i % 2 == 0), weights=(0.5,), rng=random.Random(1), min_calls=10, window=50
    )
    pipeline = Pipeline(program("stable"), canary, listeners=[events.append])
    with caplog.at_level(logging.WARNING, logger="resilient_dspy.canary"):
        await served_by(pipeline, 200)
    (rolled,) = [e for e in events if isinstance(e, CanaryRolledBack)]
    assert rolled.candidate == "cand" and rolled.reason == "error_rate"
    assert rolled.observed is not None and rolled.stable is not None
    assert rolled.observed.calls >= 10 and rolled.observed.error_rate > 0.3 and rolled.stable.error_rate == 0
    assert any("rolled back" in r.message for r in caplog.records if r.levelno == logging.WARNING)
    after = [e for e in events[events.index(rolled) :] if isinstance(e, CanaryRouted)]
    assert after and all(e.route == "stable" for e in after)
    snapshot = canary.snapshot()
    assert snapshot.candidates[0].status == "rolled_back" and snapshot.candidates[0].weight == 0
    assert snapshot.stable_weight == 1.0
    assert pipeline.health().layers[0].status == "degraded"


async def test_a_slower_candidate_is_rolled_back_on_its_latency_percentile() -> None:
    events: list[Event] = []
    canary = Canary(candidate(latency=3.0), weights=(0.5,), rng=random.Random(2), min_calls=10)
    pipeline = Pipeline(program("stable", latency=1.0), canary, listeners=[events.append])
    await served_by(pipeline, 100)
    (rolled,) = [e for e in events if isinstance(e, CanaryRolledBack)]
    assert rolled.reason == "latency"
    assert rolled.observed is not None and rolled.stable is not None
    assert rolled.observed.latency == pytest.approx(3.0) and rolled.stable.latency == pytest.approx(1.0)


async def test_a_candidate_within_the_margins_is_not_rolled_back() -> None:
    canary = Canary(candidate(latency=1.4), weights=(0.5,), rng=random.Random(2), min_calls=10)
    await served_by(Pipeline(program("stable", latency=1.0), canary), 200)
    assert canary.snapshot().candidates[0].status == "active"


@pytest.mark.parametrize(("confidence", "rolled_back"), [(0.95, False), (None, True)])
async def test_a_few_unlucky_errors_in_a_small_window_need_confidence_to_roll_back(
    confidence: float | None, rolled_back: bool
) -> None:
    """Two errors in the candidate's first 20 calls (10 % vs 0 %, margin 5 %): not significant at 95 %."""
    canary = Canary(
        candidate(fails=lambda i: i in (3, 11)), weights=(0.5,), rng=random.Random(3), confidence=confidence
    )
    await served_by(Pipeline(program("stable"), canary), 100)
    assert (canary.snapshot().candidates[0].status == "rolled_back") is rolled_back


@pytest.mark.parametrize(("floor", "rolled_back"), [(0.05, False), (0.0, True)])
async def test_a_latency_ratio_over_a_few_milliseconds_needs_the_absolute_increase_too(
    floor: float, rolled_back: bool
) -> None:
    canary = Canary(candidate(latency=0.03), weights=(0.5,), rng=random.Random(3), min_latency_increase=floor)
    await served_by(Pipeline(program("stable", latency=0.01), canary), 100)
    assert (canary.snapshot().candidates[0].status == "rolled_back") is rolled_back


@settings(max_examples=15, deadline=None)
@given(
    period=st.integers(2, 10),
    latency=st.floats(0.01, 5.0),
    weight=st.floats(0.2, 0.8),
    seed=st.integers(0, 2**16),
)
def test_a_candidate_equal_to_stable_is_never_rolled_back(
    period: int, latency: float, weight: float, seed: int
) -> None:
    """Both routes fail every ``period``-th call and take the same time: whatever the split, no rollback."""

    def fails(i: int) -> bool:
        return i % period == 0

    async def scenario() -> Canary:
        canary = Canary(
            candidate(latency=latency, fails=fails), weights=(weight,), rng=random.Random(seed), min_calls=30
        )
        await served_by(Pipeline(program("stable", latency=latency, fails=fails), canary), 300)
        return canary

    assert run_virtual(scenario).snapshot().candidates[0].status == "active"


async def test_nothing_is_judged_before_min_calls() -> None:
    canary = Canary(candidate(fails=lambda i: True), weights=(0.5,), rng=random.Random(4), min_calls=20)
    routes = await served_by(Pipeline(program("stable"), canary), 30)
    assert routes.count("error") < 20 and canary.snapshot().candidates[0].status == "active"


async def test_outcomes_older_than_the_time_window_are_forgotten() -> None:
    canary = Canary(candidate(), weights=(0.5,), rng=random.Random(5), window_seconds=10.0)
    pipeline = Pipeline(program("stable", latency=1.0), canary)
    await served_by(pipeline, 8)
    assert canary.snapshot().stable.calls + canary.snapshot().candidates[0].window.calls == 8
    await asyncio.sleep(20)
    assert canary.snapshot().stable.calls == 0 and canary.snapshot().candidates[0].window.calls == 0


# --- served_by, errors and user mistakes ----------------------------------------------------------------


async def test_the_outcome_names_the_route_that_served() -> None:
    canary = Canary(candidate(), weights=(0.5,), rng=random.Random(6))
    pipeline = Pipeline(program("stable"), canary)
    outcomes = [await pipeline.invoke("q") for _ in range(50)]
    assert {o.served_by for o in outcomes} == {"primary", "cand"}
    assert all(o.value.startswith("cand") == (o.served_by == "cand") for o in outcomes)


async def test_a_candidates_error_is_the_callers_and_a_fallback_above_serves_it() -> None:
    pipeline = Pipeline(
        program("stable"),
        Fallback(Static(answer="sorry"), on=Boom),
        Canary(candidate(fails=lambda i: True), weights=(1.0,), min_calls=50, window=50),
    )
    outcome = await pipeline.invoke("q")
    assert outcome.served_by == "static" and outcome.value.answer == "sorry"


async def test_a_user_mistake_in_a_candidate_is_raised_and_counts_against_it() -> None:
    canary = Canary(candidate(fails=lambda i: True, error=TypeError), weights=(1.0,), min_calls=1, window=5)
    pipeline = Pipeline(program("stable"), canary)
    with pytest.raises(TypeError):
        await pipeline("q")
    snapshot = canary.snapshot()
    assert snapshot.candidates[0].window.errors == 1
    assert pipeline.health().status == "down"  # the pipeline reports the mistake: it is not hidden


async def test_a_call_that_never_reached_the_program_judges_no_route() -> None:
    async def rejecting(call: Any, next: Any) -> Any:
        raise Boom("rejected before the program")

    class Reject:
        async def __call__(self, call: Any, next: Any) -> Any:
            return await rejecting(call, next)

    canary = Canary(candidate(), weights=(0.5,), rng=random.Random(8), min_calls=1)
    pipeline = Pipeline(program("stable"), canary, Reject())
    await served_by(pipeline, 20)
    assert canary.snapshot().stable.calls == 0


# --- by hand ------------------------------------------------------------------------------------------


async def test_promote_sends_every_call_to_the_candidate_and_rollback_sends_them_back() -> None:
    events: list[Event] = []
    canary = Canary(candidate(), weights=(0.1,), rng=random.Random(9))
    pipeline = Pipeline(program("stable"), canary, listeners=[events.append])
    canary.promote()
    assert set(await served_by(pipeline, 30)) == {"cand"}
    assert [type(e) for e in events if not isinstance(e, CanaryRouted)] == [CanaryPromoted]
    assert canary.snapshot().candidates[0].status == "promoted" and canary.snapshot().stable_weight == 0
    canary.rollback()
    assert set(await served_by(pipeline, 30)) == {"primary"}
    (rolled,) = [e for e in events if isinstance(e, CanaryRolledBack)]
    assert rolled.reason == "manual" and rolled.candidate == "cand"
    assert pipeline.health().layers[0].status == "ok"  # a decision by hand is not a failed release


async def test_promote_one_of_several_needs_its_name_and_supersedes_the_others() -> None:
    canary = Canary(candidate("a"), candidate("b"), weights=(0.2, 0.2))
    pipeline = Pipeline(program("stable"), canary)
    with pytest.raises(ValueError, match="name one of"):
        canary.promote()
    canary.promote("b")
    assert set(await served_by(pipeline, 20)) == {"b"}
    assert {c.name: c.status for c in canary.snapshot().candidates} == {"a": "rolled_back", "b": "promoted"}


def test_state_is_in_describe_and_health() -> None:
    canary = Canary(candidate(), weights=(0.25,), name="release-42")
    Pipeline(program("stable"), canary)
    described = canary.describe()
    assert described["name"] == "release-42" and [c["name"] for c in described["options"]["candidates"]] == ["cand"]
    assert described["routes"] == {"cand": "active"}
    assert canary.health().details["candidates"]["cand"]["weight"] == 0.25
    canary.rollback()
    assert canary.describe()["routes"] == {"cand": "rolled_back"}


# --- shadow mode ----------------------------------------------------------------------------------------


async def test_a_shadow_never_answers_and_its_errors_never_reach_the_caller() -> None:
    events: list[Event] = []
    canary = Canary(candidate(fails=lambda i: i % 2 == 0), mode="shadow", weights=(1.0,), min_calls=100)
    pipeline = Pipeline(program("stable"), canary, listeners=[events.append])
    outcomes = [await pipeline.invoke(f"q{i}") for i in range(10)]
    await canary.drain()
    assert all(o.value == f"stable: q{i}" and o.served_by == "primary" for i, o in enumerate(outcomes))
    compared = [e for e in events if isinstance(e, ShadowCompared)]
    assert len(compared) == 10
    assert sum(isinstance(e.error, Boom) for e in compared) == 5
    assert canary.snapshot().candidates[0].window.errors == 5


async def test_a_shadows_user_mistake_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    canary = Canary(candidate(fails=lambda i: True, error=TypeError), mode="shadow", weights=(1.0,))
    pipeline = Pipeline(program("stable"), canary)
    with caplog.at_level(logging.ERROR, logger="resilient_dspy.canary"):
        assert await pipeline("q") == "stable: q"
        await canary.drain()
    assert [r.levelno for r in caplog.records] == [logging.ERROR]


async def test_a_slow_shadow_never_delays_the_callers_answer() -> None:
    canary = Canary(candidate(latency=10.0), mode="shadow", weights=(1.0,))
    pipeline = Pipeline(program("stable", latency=1.0), canary)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await pipeline("q") == "stable: q"
    assert loop.time() - started == pytest.approx(1.0)
    assert canary.snapshot().shadows_in_flight == 1
    await canary.drain()
    assert canary.snapshot().shadows_in_flight == 0 and not other_tasks()


async def test_shadows_in_flight_are_bounded_and_the_excess_is_skipped_and_counted() -> None:
    events: list[Event] = []
    running = peak = 0

    async def slow(question: str) -> str:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await asyncio.sleep(10.0)
            return "shadow"
        finally:
            running -= 1

    canary = Canary(UseProgram(slow, name="cand"), mode="shadow", weights=(1.0,), max_shadows=2)
    pipeline = Pipeline(program("stable", latency=1.0), canary, listeners=[events.append])
    answers = await asyncio.gather(*(pipeline(f"q{i}") for i in range(5)))
    assert answers == [f"stable: q{i}" for i in range(5)]
    await canary.drain()
    assert peak == 2
    assert len([e for e in events if isinstance(e, ShadowSkipped)]) == 3
    assert canary.snapshot().candidates[0].shadows_skipped == 3
    assert len([e for e in events if isinstance(e, ShadowCompared)]) == 2


async def test_a_hanging_shadow_ends_at_its_time_bound_and_leaves_no_task() -> None:
    events: list[Event] = []
    hang = candidate(latency=10_000.0)
    canary = Canary(hang, mode="shadow", weights=(1.0,), shadow_timeout=5.0)
    pipeline = Pipeline(program("stable", latency=1.0), canary, listeners=[events.append])
    await pipeline("q")
    await asyncio.sleep(5.0)
    await asyncio.sleep(0)
    assert not other_tasks()
    (compared,) = [e for e in events if isinstance(e, ShadowCompared)]
    assert isinstance(compared.error, TimeoutExceededError) and compared.latency == pytest.approx(5.0)


async def test_a_cancelled_caller_takes_its_shadow_with_it() -> None:
    canary = Canary(candidate(latency=10.0), mode="shadow", weights=(1.0,))
    pipeline = Pipeline(program("stable", latency=5.0), canary)
    task = asyncio.create_task(pipeline("q"))
    await asyncio.sleep(1.0)
    assert canary.snapshot().shadows_in_flight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    assert not other_tasks() and canary.snapshot().shadows_in_flight == 0


async def test_aclose_cancels_every_shadow_in_flight() -> None:
    canary = Canary(candidate(latency=100.0), mode="shadow", weights=(1.0,))
    pipeline = Pipeline(program("stable"), canary)
    await asyncio.gather(*(pipeline(f"q{i}") for i in range(3)))
    assert canary.snapshot().shadows_in_flight == 3
    await canary.aclose()
    assert not other_tasks() and canary.snapshot().shadows_in_flight == 0


async def test_compare_reports_whether_the_shadow_answered_the_same() -> None:
    events: list[Event] = []
    echo = UseProgram(program("stable"), name="same")
    other = candidate("other")
    canary = Canary(echo, other, mode="shadow", weights=(0.5, 0.5), compare=lambda a, b: a == b, rng=random.Random(1))
    pipeline = Pipeline(program("stable"), canary, listeners=[events.append])
    for i in range(20):
        await pipeline(f"q{i}")
    await canary.drain()
    compared = [e for e in events if isinstance(e, ShadowCompared)]
    assert compared and all(e.matched is (e.candidate == "same") for e in compared)
    mismatches = {c.name: c.mismatches for c in canary.snapshot().candidates}
    assert mismatches["same"] == 0 and mismatches["other"] == sum(e.candidate == "other" for e in compared)


async def test_a_worse_shadow_is_rolled_back_and_gets_no_more_copies() -> None:
    events: list[Event] = []
    canary = Canary(candidate(fails=lambda i: True), mode="shadow", weights=(1.0,), min_calls=5, window=10)
    pipeline = Pipeline(program("stable"), canary, listeners=[events.append])
    for i in range(20):
        await pipeline(f"q{i}")
        await canary.drain()
    (rolled,) = [e for e in events if isinstance(e, CanaryRolledBack)]
    assert rolled.reason == "error_rate"
    assert len([e for e in events if isinstance(e, ShadowCompared)]) == 5


# --- configuration ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "arguments", "field"),
    [
        (1, {"weights": (0.1, 0.2)}, "Canary.weights"),
        (2, {"weights": (0.8, 0.4)}, "Canary.weights"),
        (1, {"weights": (1.5,)}, "Canary.weights"),
        (1, {"min_calls": 200}, "Canary.min_calls"),
        (1, {"compare": lambda a, b: a == b}, "Canary.compare"),
        (1, {"max_latency_ratio": 0.5}, "Canary.max_latency_ratio"),
        (1, {"max_error_rate_increase": 2.0}, "Canary.max_error_rate_increase"),
        (1, {"max_shadows": 0}, "Canary.max_shadows"),
        (1, {"mode": "dark"}, "Canary.mode"),
        (0, {}, "Canary.candidates"),
    ],
)
def test_a_bad_option_is_a_configuration_error_naming_it(count: int, arguments: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError, match=field.replace(".", r"\.")):
        Canary(*(candidate(f"c{i}") for i in range(count)), **arguments)


@pytest.mark.parametrize(
    "candidates",
    [
        [Static(answer="x")],
        [UseProgram(program("a"), name="a", on=Boom)],
        [candidate("a"), candidate("a")],
        [candidate("stable")],
        ["not a program"],
    ],
    ids=["static", "on", "duplicate", "reserved", "not-a-program"],
)
def test_a_bad_candidate_is_a_configuration_error_naming_it(candidates: list[Any]) -> None:
    with pytest.raises(ConfigurationError, match=r"Canary\.candidates\["):
        Canary(*candidates)


# --- placement --------------------------------------------------------------------------------------------


def test_a_canary_inside_a_retry_is_warned_about() -> None:
    with pytest.warns(ResilienceWarning, match="Canary is listed inside"):
        Pipeline(program("stable"), Retry(2), Canary(candidate()))


def test_a_canary_above_the_retry_is_the_recommended_place() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Pipeline(program("stable"), Fallback(Static(answer="x")), Canary(candidate()), Timeout(10), Retry(2))


async def test_a_traced_call_with_a_shadow_keeps_the_copy_out_of_its_trace(caplog: pytest.LogCaptureFixture) -> None:
    events: list[Event] = []
    canary = Canary(candidate(latency=2.0), mode="shadow", weights=(1.0,))
    pipeline = Pipeline(program("stable", latency=1.0), canary, listeners=[events.append])
    with caplog.at_level(logging.ERROR):
        outcome = await pipeline.traced("q")
        await canary.drain()
    assert outcome.value == "stable: q" and not caplog.records
    assert outcome.trace is not None
    traced_kinds = {type(event) for span in outcome.trace.spans() for event in span.events}
    assert ShadowCompared not in traced_kinds
    assert [type(e) for e in events if isinstance(e, ShadowCompared)] == [ShadowCompared]


def test_a_canary_builds_from_a_config_and_describes_itself() -> None:
    config = {
        "program": {"signature": "question -> answer"},
        "layers": [
            {
                "layer": "Canary",
                "candidates": [
                    {"kind": "UseLM", "lm": {"kind": "FaultInjectingLM", "model": "fault/new"}, "name": "new"}
                ],
                "weights": [0.2],
                "min_calls": 5,
            }
        ],
    }
    described = Pipeline.from_config(config).describe()[0]
    assert described["layer"] == "Canary" and [c["name"] for c in described["options"]["candidates"]] == ["new"]
    assert described["options"]["weights"] == (0.2,) and described["options"]["min_calls"] == 5


call_plans = st.lists(
    st.tuples(
        st.floats(0.0, 3.0),  # stable's latency
        st.booleans(),  # stable fails
        st.floats(0.0, 8.0),  # the shadow's latency
        st.booleans(),  # the shadow fails
        st.one_of(st.none(), st.floats(0.0, 4.0)),  # the caller cancels after this long, or never
        st.floats(0.0, 2.0),  # the call starts after this long
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=40, deadline=None)
@given(plans=call_plans, max_shadows=st.integers(1, 4), shadow_timeout=st.floats(0.5, 6.0))
def test_shadows_never_answer_never_exceed_their_bound_and_never_outlive_their_time(
    plans: list[tuple[float, bool, float, bool, float | None, float]], max_shadows: int, shadow_timeout: float
) -> None:
    """Under any schedule of latencies, failures and caller cancellations: each caller gets stable's answer, stable's
    error or its own cancellation; at most ``max_shadows`` copies run; every copy ends within ``shadow_timeout``."""

    async def scenario() -> None:
        running = peak = 0
        loop = asyncio.get_running_loop()
        lifetimes: list[float] = []

        async def stable(question: str) -> str:
            latency, fails = plans[int(question)][0:2]
            await asyncio.sleep(latency)
            if fails:
                raise Boom("stable")
            return f"stable {question}"

        async def shadow(question: str) -> str:
            nonlocal running, peak
            latency, fails = plans[int(question)][2:4]
            running += 1
            peak = max(peak, running)
            started = loop.time()
            try:
                await asyncio.sleep(latency)
                if fails:
                    raise Boom("shadow")
                return f"shadow {question}"
            finally:
                running -= 1
                lifetimes.append(loop.time() - started)

        canary = Canary(
            UseProgram(shadow, name="cand"),
            mode="shadow",
            weights=(1.0,),
            max_shadows=max_shadows,
            shadow_timeout=shadow_timeout,
            min_calls=1000,
            window=1000,
        )
        pipeline = Pipeline(stable, canary)

        async def caller(index: int) -> str:
            await asyncio.sleep(plans[index][5])
            return await pipeline(str(index))

        tasks = [asyncio.create_task(caller(i)) for i in range(len(plans))]
        for index, plan in enumerate(plans):
            if plan[4] is not None:
                loop.call_later(plan[5] + plan[4], tasks[index].cancel)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for index, result in enumerate(results):
            if isinstance(result, asyncio.CancelledError):
                assert plans[index][4] is not None
            elif plans[index][1]:
                assert isinstance(result, Boom) and str(result) == "stable"
            else:
                assert result == f"stable {index}"
        await asyncio.sleep(shadow_timeout + 1)
        assert not other_tasks() and canary.snapshot().shadows_in_flight == 0
        assert peak <= max_shadows
        assert all(lifetime <= shadow_timeout + 1e-6 for lifetime in lifetimes)

    run_virtual(scenario)


@settings(max_examples=30, deadline=None)
@given(
    outcomes=st.lists(st.tuples(st.floats(0.0, 5.0), st.booleans()), min_size=1, max_size=60),
    window=st.integers(1, 25),
    percentile=st.floats(1.0, 100.0),
)
def test_the_window_reports_the_last_calls_error_rate_and_latency_percentile(
    outcomes: list[tuple[float, bool]], window: int, percentile: float
) -> None:
    """A model check: the snapshot's figures equal those computed from scratch over the last ``window`` calls."""

    async def scenario() -> None:
        plan = iter(outcomes)

        async def stable(question: str) -> str:
            latency, fails = next(plan)
            await asyncio.sleep(latency)
            if fails:
                raise Boom("stable")
            return "ok"

        canary = Canary(candidate(), weights=(0.0,), window=window, min_calls=1, latency_percentile=percentile)
        pipeline = Pipeline(stable, canary)
        for _ in outcomes:
            with contextlib.suppress(Boom):
                await pipeline("q")
        last = outcomes[-window:]
        latencies = sorted(latency for latency, _ in last)
        expected_latency = latencies[max(1, math.ceil(percentile / 100 * len(last))) - 1]
        stats = canary.snapshot().stable
        assert (stats.calls, stats.errors) == (len(last), sum(fails for _, fails in last))
        assert stats.latency == pytest.approx(expected_latency, abs=1e-6)

    run_virtual(scenario)


async def test_an_lm_shadow_runs_in_its_own_context_and_never_answers() -> None:
    stable_lm = FaultInjectingLM("fault/stable", profile=FaultProfile(latency=(1.0, 1.0)))
    new_lm = FaultInjectingLM("fault/new", profile=FaultProfile(latency=(0.5, 0.5)))
    canary = Canary(UseLM(new_lm, name="new"), mode="shadow", weights=(1.0,))
    pipeline = Pipeline(dspy.Predict("question -> answer"), canary)
    with dspy.context(lm=stable_lm):
        outcomes = await asyncio.gather(*(pipeline.invoke(f"q{i}") for i in range(6)))
        await canary.drain()
    assert all(outcome.served_by == "primary" for outcome in outcomes)
    assert stable_lm.requests == 6 and new_lm.requests == 6
    assert sorted(entry.question for entry in new_lm.journal) == [f"q{i}" for i in range(6)]
