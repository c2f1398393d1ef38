"""Fallback: ordered alternatives, error filters, UseLM under concurrency, Static answers, failure groups, bad input."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import dspy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_dspy import (
    Fallback,
    FallbackFailedError,
    Pipeline,
    ResilienceError,
    RetriesExhaustedError,
    Retry,
    Static,
    UseLM,
    UseProgram,
)
from resilient_dspy.core.call import Call, Handler
from resilient_dspy.errors import ConfigurationError
from resilient_dspy.events import Event, FallbackUsed
from resilient_dspy.middleware.fallback import Alternative
from resilient_dspy.testing import Fault, FaultInjectingLM, FaultProfile
from tests.conftest import other_tasks


class Boom(Exception):
    """A test error that no default predicate treats specially."""


def program(name: str, log: list[str], error: BaseException | None = None) -> Callable[..., Awaitable[str]]:
    """An async program that logs its name, then raises ``error`` or answers '<name>: <question>'."""

    async def run(question: str) -> str:
        log.append(name)
        if error is not None:
            raise error
        return f"{name}: {question}"

    run.__qualname__ = name
    return run


# --- order ---------------------------------------------------------------------------------------------


async def test_alternatives_are_tried_in_order_and_the_first_success_serves() -> None:
    """After the primary fails, 'a' (fails) then 'b' (answers) run; 'c' is never called and b is served_by."""
    log: list[str] = []
    pipeline = Pipeline(
        program("primary", log, Boom("p")),
        Fallback(
            UseProgram(program("a", log, Boom("a")), name="a"),
            UseProgram(program("b", log), name="b"),
            UseProgram(program("c", log), name="c"),
        ),
    )
    outcome = await pipeline.invoke("q")
    assert outcome.value == "b: q"
    assert outcome.served_by == "b"
    assert log == ["primary", "a", "b"]


async def test_primary_success_is_served_by_primary() -> None:
    """When the primary answers, no alternative runs and served_by is 'primary'."""
    log: list[str] = []
    pipeline = Pipeline(program("primary", log), Fallback(UseProgram(program("a", log), name="a")))
    outcome = await pipeline.invoke("q")
    assert (outcome.value, outcome.served_by, log) == ("primary: q", "primary", ["primary"])


async def test_fallback_used_event_names_alternative_and_error() -> None:
    """Each alternative tried emits FallbackUsed with its name and the error that led to it."""
    log: list[str] = []
    events: list[Event] = []
    first, second = Boom("p"), Boom("a")
    pipeline = Pipeline(
        program("primary", log, first),
        Fallback(UseProgram(program("a", log, second), name="a"), Static(answer="canned", name="canned")),
        name="fb",
        listeners=[events.append],
    )
    await pipeline("q")
    used = [e for e in events if isinstance(e, FallbackUsed)]
    assert [(e.pipeline, e.layer, e.alternative) for e in used] == [
        ("fb", "Fallback", "a"),
        ("fb", "Fallback", "canned"),
    ]
    assert used[0].error is first and used[1].error is second


async def test_fallback_used_carries_the_pipeline_clock_time() -> None:
    async def late(question: str) -> str:
        await asyncio.sleep(1.5)
        raise Boom("late")

    events: list[Event] = []
    pipeline = Pipeline(late, Fallback(Static(answer="s")), listeners=[events.append])
    started = asyncio.get_running_loop().time()
    await pipeline("q")
    [used] = events
    assert used.time == pytest.approx(started + 1.5)


# --- on= filtering -------------------------------------------------------------------------------------


async def test_unmatched_error_propagates_unchanged() -> None:
    """An error outside Fallback(on=...) leaves as the same object and no alternative runs."""
    log: list[str] = []
    error = Boom("not for us")
    pipeline = Pipeline(
        program("primary", log, error),
        Fallback(UseProgram(program("a", log), name="a"), on=dspy.LMServerError),
    )
    with pytest.raises(Boom) as raised:
        await pipeline("q")
    assert raised.value is error
    assert log == ["primary"]


async def test_fallback_on_accepts_a_predicate() -> None:
    """on= may be a predicate over the error."""
    log: list[str] = []
    pipeline = Pipeline(
        program("primary", log, Boom("retryable")),
        Fallback(Static(answer="canned"), on=lambda error: "retryable" in str(error)),
    )
    assert (await pipeline.invoke("q")).served_by == "static"
    refusing = Pipeline(
        program("primary", log, Boom("other")),
        Fallback(Static(answer="canned"), on=lambda error: "retryable" in str(error)),
    )
    with pytest.raises(Boom):
        await refusing("q")


@pytest.mark.parametrize(
    ("fault", "served_by", "big_requests"),
    [("server_error", "apology", 0), ("context_window", "big", 1)],
)
async def test_per_alternative_on_skips_unmatched_alternatives(fault: str, served_by: str, big_requests: int) -> None:
    """UseLM(big, on=ContextWindowExceededError) is skipped for a 503 and used for a context-window error."""
    small = FaultInjectingLM("fault/small", script=[fault])
    big = FaultInjectingLM("fault/big")
    pipeline = Pipeline(
        dspy.Predict("question -> answer"),
        Fallback(
            UseLM(big, name="big", on=dspy.ContextWindowExceededError),
            Static(answer="Sorry.", name="apology"),
        ),
    )
    with dspy.context(lm=small):
        outcome = await pipeline.invoke("How long is too long?")
    assert outcome.served_by == served_by
    assert small.requests == 1
    assert big.requests == big_requests


async def test_filter_matches_the_last_error_inside_retries_exhausted() -> None:
    """An alternative with on=LMServerError handles a RetriesExhaustedError whose last_error is a 503."""
    small = FaultInjectingLM("fault/small", script=["server_error", "server_error"])
    big = FaultInjectingLM("fault/big")
    events: list[Event] = []
    pipeline = Pipeline(
        dspy.Predict("question -> answer"),
        Fallback(UseLM(big, name="big", on=dspy.LMServerError), on=dspy.LMServerError),
        Retry(2, base_delay=0, jitter="none", respect_retry_after=False),
        listeners=[events.append],
    )
    with dspy.context(lm=small):
        outcome = await pipeline.invoke("Is it down?")
    assert outcome.served_by == "big"
    assert (small.requests, big.requests) == (2, 1)
    (used,) = [e for e in events if isinstance(e, FallbackUsed)]
    assert isinstance(used.error, RetriesExhaustedError)
    assert isinstance(used.error.last_error, dspy.LMServerError)


# --- UseLM ---------------------------------------------------------------------------------------------


async def test_use_lm_reruns_the_inner_stack_under_another_lm() -> None:
    """UseLM reruns Predict with the second LM: the primary LM sees one request, the fallback LM one answer."""
    primary = FaultInjectingLM("fault/primary", script=["context_window"])
    second = FaultInjectingLM("fault/second", answers={"Summarise it": "A summary"})
    pipeline = Pipeline(dspy.Predict("question -> answer"), Fallback(second))
    with dspy.context(lm=primary):
        outcome = await pipeline.invoke("Summarise it")
    assert outcome.value.answer == "A summary"
    assert outcome.served_by == "lm:custom/fault/second"
    assert [e.fault for e in primary.journal] == [Fault.CONTEXT_WINDOW]
    assert [(e.fault, e.question) for e in second.journal] == [(Fault.OK, "Summarise it")]
    assert dspy.settings.lm is None  # the fallback LM did not leak out of the call


async def test_use_lm_does_not_stick_to_the_calling_task() -> None:
    """After a call served by UseLM, the next call in the same task and context goes to the primary LM again."""
    primary = FaultInjectingLM("fault/primary", script=["context_window"])
    second = FaultInjectingLM("fault/second")
    pipeline = Pipeline(dspy.Predict("question -> answer"), Fallback(second))
    with dspy.context(lm=primary):
        first = await pipeline.invoke("one")
        assert dspy.settings.lm is primary
        then = await pipeline.invoke("two")
    assert (first.served_by, then.served_by) == ("lm:custom/fault/second", "primary")
    assert [(e.fault, e.question) for e in primary.journal] == [(Fault.CONTEXT_WINDOW, "one"), (Fault.OK, "two")]
    assert [e.question for e in second.journal] == ["one"]


async def test_use_lm_does_not_leak_into_concurrent_calls() -> None:
    """20 concurrent calls, half needing the fallback LM: each LM's journal holds exactly the expected questions."""
    primary = FaultInjectingLM(
        "fault/primary", script=["context_window", "ok"] * 10, profile=FaultProfile(latency=(0.3, 0.3))
    )
    big = FaultInjectingLM("fault/big", profile=FaultProfile(latency=(1.0, 1.0)))
    pipeline = Pipeline(dspy.Predict("question -> answer"), Fallback(UseLM(big, name="big")))

    async def ask(index: int) -> tuple[str, str]:
        await asyncio.sleep(index * 0.1)  # staggered, so fallback contexts overlap other calls' primary requests
        outcome = await pipeline.invoke(f"question {index}")
        assert outcome.value.answer.endswith(f"question {index}")
        return f"question {index}", outcome.served_by

    with dspy.context(lm=primary):
        results = await asyncio.gather(*(ask(i) for i in range(20)))

    by_big = {question for question, served in results if served == "big"}
    assert len(by_big) == 10
    assert {question for question, served in results if served == "primary"} == {
        f"question {i}" for i in range(20)
    } - by_big
    assert primary.requests == 20 and big.requests == 10
    assert sorted(e.question for e in primary.journal) == sorted(f"question {i}" for i in range(20))
    assert {e.question for e in big.journal} == by_big
    assert {e.question for e in primary.journal if e.fault is Fault.CONTEXT_WINDOW} == by_big
    assert big.core.max_in_flight > 1  # fallbacks really overlapped
    assert not other_tasks()


def test_use_lm_is_named_after_its_model_or_its_type() -> None:
    class Bare(dspy.BaseLM):  # type: ignore[misc]
        def __init__(self) -> None:  # no BaseLM.__init__: no `model` attribute
            pass

    assert UseLM(Bare()).name == "lm:Bare"
    assert UseLM(dspy.LM("openai/x", api_key="k")).name == "lm:openai/x"


def test_use_lm_rejects_a_non_lm() -> None:
    """UseLM(42) is a ConfigurationError naming UseLM.lm."""
    with pytest.raises(ConfigurationError) as raised:
        UseLM(42)
    assert [field for field, _ in raised.value.problems] == ["UseLM.lm"]


# --- Static and other alternatives ---------------------------------------------------------------------


async def test_static_answer_is_a_fresh_prediction_each_call() -> None:
    """Static(answer=...) returns a new dspy.Prediction per call: mutating one does not change the next."""
    pipeline = Pipeline(program("primary", [], Boom()), Fallback(Static(answer="canned")))
    first = await pipeline("q")
    assert isinstance(first, dspy.Prediction) and first.answer == "canned"
    first.answer = "mutated"
    second = await pipeline("q")
    assert second is not first
    assert second.answer == "canned"


async def test_static_answer_mutable_field_is_not_shared_between_calls() -> None:
    """Mutating a list inside one Static answer does not change the answer the next call gets."""
    pipeline = Pipeline(program("primary", [], Boom()), Fallback(Static(answer="canned", sources=["manual"])))
    first = await pipeline("q")
    first.sources.append("mutated")
    second = await pipeline("q")
    assert second.sources == ["manual"]


async def test_static_factory_receives_the_inputs() -> None:
    """Static(factory) answers factory(inputs) and is served_by its name."""
    seen: list[dict[str, Any]] = []

    def factory(inputs: dict[str, Any]) -> dspy.Prediction:
        seen.append(dict(inputs))
        return dspy.Prediction(answer=inputs["question"].upper())

    pipeline = Pipeline(program("primary", [], Boom()), Fallback(Static(factory, name="shout")))
    outcome = await pipeline.invoke("hello")
    assert (outcome.value.answer, outcome.served_by) == ("HELLO", "shout")
    assert seen == [{"question": "hello"}]


async def test_a_static_alternative_handles_only_the_errors_in_its_on_filter() -> None:
    pipeline = Pipeline(program("primary", [], ValueError("other")), Fallback(Static(answer="static", on=Boom)))
    with pytest.raises(FallbackFailedError) as caught:
        await pipeline("q")
    assert caught.value.tried == ("primary",)
    handled = Pipeline(program("primary", [], Boom("mine")), Fallback(Static(answer="static", on=[Boom])))
    assert (await handled("q")).answer == "static"


async def test_a_prediction_passed_directly_becomes_static() -> None:
    """Fallback(dspy.Prediction(...)) is a Static named 'static' answering a copy of that prediction."""
    canned = dspy.Prediction(answer="canned")
    fallback = Fallback(canned)
    assert isinstance(fallback.alternatives[0], Static)
    pipeline = Pipeline(program("primary", [], Boom()), fallback)
    outcome = await pipeline.invoke("q")
    assert (outcome.value.answer, outcome.served_by) == ("canned", "static")
    assert outcome.value is not canned


def test_an_empty_prediction_alternative_is_a_configuration_error() -> None:
    """Fallback(dspy.Prediction()) has no answer to give: it is rejected, naming Fallback.alternatives[0]."""
    with pytest.raises(ConfigurationError) as raised:
        Fallback(dspy.Prediction())
    assert [field for field, _ in raised.value.problems] == ["Fallback.alternatives[0]"]


async def test_async_def_module_and_pipeline_alternatives_become_use_program() -> None:
    """An async def, a dspy.Module and a nested Pipeline given as alternatives are UseProgram and can serve."""
    log: list[str] = []
    lm = FaultInjectingLM(answers={"q": "from the module"})
    nested = Pipeline(program("nested", log), name="nested")
    fallback = Fallback(program("fn", log, Boom("fn")), dspy.Predict("question -> answer"), nested)
    assert all(isinstance(a, UseProgram) for a in fallback.alternatives)
    assert [a.name for a in fallback.alternatives] == ["program:fn", "program:Predict", "program:nested"]

    with dspy.context(lm=lm):
        outcome = await Pipeline(program("primary", log, Boom("p")), fallback).invoke("q")
    assert (outcome.value.answer, outcome.served_by) == ("from the module", "program:Predict")
    assert log == ["primary", "fn"]

    only_nested = Fallback(nested)
    outcome = await Pipeline(program("primary", log, Boom("p")), only_nested).invoke("q")
    assert (outcome.value, outcome.served_by) == ("nested: q", "program:nested")


async def test_a_bare_lm_alternative_becomes_use_lm() -> None:
    """A dspy.LM given directly is wrapped in UseLM."""
    lm = FaultInjectingLM("fault/spare")
    fallback = Fallback(lm)
    assert isinstance(fallback.alternatives[0], UseLM)
    assert fallback.alternatives[0].name == "lm:custom/fault/spare"


# --- all fail ------------------------------------------------------------------------------------------


def failing_chain(log: list[str]) -> tuple[Pipeline, list[BaseException]]:
    errors: list[BaseException] = [Boom("primary"), ValueError("a"), dspy.LMServerError("b", model="m")]
    pipeline = Pipeline(
        program("primary", log, errors[0]),
        Fallback(
            UseProgram(program("a", log, errors[1]), name="a"),
            UseProgram(program("never", log), name="skipped", on=KeyError),
            UseProgram(program("b", log, errors[2]), name="b"),
        ),
    )
    return pipeline, errors


async def test_all_failing_raises_fallback_failed_error_with_every_error_in_order() -> None:
    """All fail: FallbackFailedError (ExceptionGroup + ResilienceError) holds every error and name in order."""
    log: list[str] = []
    pipeline, errors = failing_chain(log)
    with pytest.raises(FallbackFailedError) as raised:
        await pipeline("q")
    group = raised.value
    assert isinstance(group, ExceptionGroup) and isinstance(group, ResilienceError)
    assert list(group.exceptions) == errors
    assert group.tried == ("primary", "a", "b")
    assert group.message == "all 3 tried of 4 options failed (primary, a, b)"
    assert log == ["primary", "a", "b"]


async def test_fallback_failed_error_works_with_except_star() -> None:
    """except* splits the group by type and the handlers see the matching errors."""
    pipeline, errors = failing_chain([])
    caught: dict[str, list[BaseException]] = {}
    try:
        await pipeline("q")
    except* dspy.LMError as group:
        caught["lm"] = list(group.exceptions)
        assert isinstance(group, FallbackFailedError)
    except* (Boom, ValueError) as group:
        caught["ours"] = list(group.exceptions)
    assert caught == {"lm": [errors[2]], "ours": [errors[0], errors[1]]}


async def test_except_star_keeps_the_names_of_the_matching_alternatives() -> None:
    """A group split by except* still names the options whose errors it holds."""
    pipeline, _ = failing_chain([])
    handled: list[tuple[str, ...]] = []
    try:
        await pipeline("q")
    except* dspy.LMError as group:
        assert isinstance(group, FallbackFailedError)
        handled.append(group.tried)
    except* (Boom, ValueError):
        pass
    assert handled == [("b",)]


# --- cancellation --------------------------------------------------------------------------------------


async def test_cancelled_error_from_the_primary_is_never_handled() -> None:
    """A CancelledError raised by the primary propagates; no alternative runs."""
    log: list[str] = []
    pipeline = Pipeline(
        program("primary", log, asyncio.CancelledError()),
        Fallback(UseProgram(program("a", log), name="a"), Static(answer="x")),
    )
    with pytest.raises(asyncio.CancelledError):
        await pipeline("q")
    assert log == ["primary"]


async def test_caller_cancellation_during_the_primary_skips_alternatives() -> None:
    """Cancelling the caller while the primary runs raises CancelledError and never calls an alternative."""
    log: list[str] = []

    async def slow(question: str) -> str:
        log.append("primary")
        await asyncio.sleep(60)
        return "late"

    pipeline = Pipeline(slow, Fallback(UseProgram(program("a", log), name="a"), Static(answer="x")))
    task = asyncio.create_task(pipeline("q"))
    await asyncio.sleep(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log == ["primary"]
    assert not other_tasks()


async def test_cancellation_inside_an_alternative_propagates() -> None:
    """A CancelledError from an alternative ends the chain: later alternatives are not tried."""
    log: list[str] = []
    pipeline = Pipeline(
        program("primary", log, Boom()),
        Fallback(
            UseProgram(program("a", log, asyncio.CancelledError()), name="a"),
            UseProgram(program("b", log), name="b"),
        ),
    )
    with pytest.raises(asyncio.CancelledError):
        await pipeline("q")
    assert log == ["primary", "a"]


# --- bad input -----------------------------------------------------------------------------------------


def problem_fields(build: Callable[[], object]) -> list[str]:
    with pytest.raises(ConfigurationError) as raised:
        build()
    for field, _ in raised.value.problems:
        assert field in str(raised.value)
    return [field for field, _ in raised.value.problems]


def test_fallback_without_alternatives_is_rejected() -> None:
    """Fallback() names Fallback.alternatives."""
    assert problem_fields(lambda: Fallback()) == ["Fallback.alternatives"]


def test_fallback_with_a_non_alternative_is_rejected() -> None:
    """Fallback(42) names Fallback.alternatives[0]."""
    assert problem_fields(lambda: Fallback(42)) == ["Fallback.alternatives[0]"]


def test_fallback_with_a_sync_function_is_rejected() -> None:
    """A sync function is not an alternative: Fallback.alternatives[1] is named."""
    assert problem_fields(lambda: Fallback(Static(answer="x"), lambda inputs: "sync")) == ["Fallback.alternatives[1]"]


@pytest.mark.parametrize("on", ["nope", (), [int], 42])
def test_fallback_with_a_bad_on_is_rejected(on: Any) -> None:
    """on= must be Exception subclasses or a predicate: Fallback.on is named."""
    assert problem_fields(lambda: Fallback(Static(answer="x"), on=on)) == ["Fallback.on"]


def test_fallback_lists_pydantic_problems_together() -> None:
    """No alternatives and a bad on= are reported in one error."""
    assert sorted(problem_fields(lambda: Fallback(on="nope"))) == ["Fallback.alternatives", "Fallback.on"]


def test_fallback_lists_every_problem_at_once() -> None:
    """A bad alternative and a bad on= are both listed in the one ConfigurationError."""
    assert sorted(problem_fields(lambda: Fallback(42, on="nope"))) == ["Fallback.alternatives[0]", "Fallback.on"]


def test_static_needs_an_answer_or_a_factory() -> None:
    """Static() with nothing, with both, or with a non-callable factory is a ConfigurationError."""
    assert problem_fields(lambda: Static()) == ["Static"]
    assert problem_fields(lambda: Static(lambda inputs: None, answer="x")) == ["Static"]
    assert problem_fields(lambda: Static(42)) == ["Static.factory"]  # type: ignore[arg-type]


def test_use_program_rejects_a_sync_function() -> None:
    """UseProgram(sync function) names UseProgram.program."""
    assert problem_fields(lambda: UseProgram(lambda question: question)) == ["UseProgram.program"]


def test_describe_lists_alternatives_and_filter() -> None:
    """Fallback.describe() is a config: each alternative's table in order, the handled error types by import path."""
    fallback = Fallback(UseLM(FaultInjectingLM("fault/big"), name="big"), Static(answer="x"), on=dspy.LMError)
    big = {"kind": "UseLM", "name": "big", "lm": {"kind": "FaultInjectingLM", "model": "custom/fault/big"}}
    assert fallback.describe() == {
        "layer": "Fallback",
        "name": "Fallback",
        "options": {
            "alternatives": [big, {"kind": "Static", "name": "static", "answer": "x"}],
            "on": ["dspy.utils.exceptions:LMError"],
            "name": None,
        },
    }
    on = Fallback(Static(answer="s"), on=(Boom, KeyError)).describe()["options"]["on"]
    assert on == [f"{__name__}:Boom", "builtins:KeyError"]


def test_describe_shows_a_predicate_filter_by_repr() -> None:
    def only_boom(error: Exception) -> bool:
        return isinstance(error, Boom)

    assert Fallback(Static(answer="s"), on=only_boom).describe()["options"]["on"] == repr(only_boom)
    assert Fallback(Static(answer="s")).describe()["options"]["on"] == "every error but a user mistake"


async def test_a_named_fallback_labels_its_events_and_describe() -> None:
    events: list[Event] = []
    fallback = Fallback(Static(answer="s"), name="qa-fallback")
    await Pipeline(program("primary", [], Boom("p")), fallback, listeners=[events.append])("q")
    assert [(type(event), event.layer) for event in events] == [(FallbackUsed, "qa-fallback")]
    assert fallback.name == fallback.describe()["name"] == "qa-fallback"
    assert fallback.snapshot() is None and fallback.health() is None  # no state between calls


async def test_a_custom_alternative_runs_and_one_without_run_cannot_be_built() -> None:
    class Cached(Alternative):
        """A user-written alternative: the last good answer."""

        def __init__(self) -> None:
            self.name, self.on = "cached", None

        async def run(self, call: Call, primary: Handler) -> Any:
            return f"cached {call.inputs['question']}"

    class Incomplete(Alternative):
        name, on = "incomplete", None

    async def failing(question: str) -> str:
        raise dspy.LMServerError("503", status=503)

    outcome = await Pipeline(failing, Fallback(Cached())).invoke("q")
    assert (outcome.value, outcome.served_by) == ("cached q", "cached")
    with pytest.raises(TypeError, match=r"abstract method.*run"):
        Incomplete()  # type: ignore[abstract]


# --- user mistakes are never served by default ---------------------------------------------------------


def _mistakes() -> list[Callable[[], Exception]]:
    """Configuration and programming errors, as a program raises them."""
    return [
        lambda: TypeError("forward() got an unexpected keyword argument 'qestion'"),
        lambda: AttributeError("'NoneType' object has no attribute 'answer'"),
        lambda: ConfigurationError([("lm", "missing")]),
        lambda: ValueError("No LM is loaded. Please configure the LM using `dspy.configure(lm=dspy.LM(...))`."),
    ]


async def test_no_lm_configured_propagates_through_a_static_fallback() -> None:
    """Regression: with no LM configured, Fallback(Static(...)) answered 'sorry' forever; now DSPy's own error
    (a ValueError saying no LM is loaded) reaches the caller."""
    pipeline = Pipeline(dspy.Predict("question -> answer"), Fallback(Static(answer="sorry")), Retry(3))
    with dspy.context(lm=None), pytest.raises(ValueError, match="No LM is loaded"):
        await pipeline("q")


@pytest.mark.parametrize("make", _mistakes(), ids=["TypeError", "AttributeError", "ConfigurationError", "no LM"])
async def test_a_user_mistake_propagates_unchanged_through_the_default_fallback(
    make: Callable[[], Exception],
) -> None:
    """A programming or configuration error is raised as it is: no alternative runs, no FallbackUsed."""
    log: list[str] = []
    events: list[Event] = []
    error = make()
    pipeline = Pipeline(
        program("primary", log, error),
        Fallback(UseProgram(program("backup", log)), Static(answer="sorry")),
        listeners=[events.append],
    )
    with pytest.raises(type(error)) as raised:
        await pipeline("q")
    assert raised.value is error
    assert log == ["primary"] and not [e for e in events if isinstance(e, FallbackUsed)]


async def test_an_on_that_lists_the_mistake_type_still_serves() -> None:
    """A user who names such an error in on= gets what they asked for (also on=Exception)."""
    for on in (TypeError, Exception):
        pipeline = Pipeline(program("primary", [], TypeError("bug")), Fallback(Static(answer="sorry"), on=on))
        outcome = await pipeline.invoke("q")
        assert (outcome.value.answer, outcome.served_by) == ("sorry", "static")


async def test_a_user_mistake_in_an_alternative_is_not_hidden_by_the_next_one() -> None:
    """A bug in an alternative propagates too: the next alternative does not cover it up."""
    log: list[str] = []
    pipeline = Pipeline(
        program("primary", log, Boom("down")),
        Fallback(UseProgram(program("buggy", log, AttributeError("typo")), name="buggy"), Static(answer="sorry")),
    )
    with pytest.raises(AttributeError, match="typo"):
        await pipeline("q")
    assert log == ["primary", "buggy"]


@settings(max_examples=50, deadline=None)
@given(
    mistake=st.sampled_from(_mistakes()),
    retried=st.booleans(),
    alternatives=st.integers(min_value=1, max_value=3),
)
def test_the_default_fallback_never_serves_a_user_mistake(
    mistake: Callable[[], Exception], retried: bool, alternatives: int
) -> None:
    """Property: whatever the chain and with or without a Retry below, a user mistake never gets an answer."""
    log: list[str] = []
    error = mistake()
    layers: list[Any] = [Fallback(*(Static(answer=f"sorry {i}", name=f"s{i}") for i in range(alternatives)))]
    if retried:
        layers.append(Retry(3, base_delay=0, jitter="none"))
    pipeline = Pipeline(program("primary", log, error), *layers)
    with pytest.raises(type(error)):
        asyncio.run(pipeline.invoke("q"))
    assert log == ["primary"]  # and never retried


async def test_a_user_mistake_a_retry_gave_up_on_still_propagates_through_the_default_fallback() -> None:
    """A Retry told to retry TypeError wraps it in RetriesExhaustedError: the default on= looks inside."""
    log: list[str] = []
    pipeline = Pipeline(
        program("primary", log, TypeError("bug")),
        Fallback(Static(answer="sorry")),
        Retry(2, base_delay=0, retry_on=TypeError),
    )
    with pytest.raises(RetriesExhaustedError) as caught:
        await pipeline("q")
    assert isinstance(caught.value.last_error, TypeError) and log == ["primary", "primary"]


# --- the answers a Static gives, checked when the pipeline is built ----------------------------------------


def test_a_static_answer_lacking_an_output_field_every_answer_has_is_refused_at_build() -> None:
    """Each Static (fields, not a factory) must give every output field of the program: each one that does not is
    named by its place, with the fields it lacks."""
    two_outputs = dspy.Predict("question -> answer, confidence")
    with pytest.raises(ConfigurationError) as raised:
        Pipeline(
            two_outputs,
            Fallback(UseProgram(program("spare", [])), Static(answer="sorry", name="apology"), Static(confidence="0")),
        )
    assert [field for field, _ in raised.value.problems] == ["Fallback.alternatives[1]", "Fallback.alternatives[2]"]
    (_, lacks_confidence), (_, lacks_answer) = raised.value.problems
    assert "confidence" in lacks_confidence and "'apology'" in lacks_confidence and "answer" in lacks_answer
    Pipeline(two_outputs, Fallback(Static(answer="?", confidence="0")))
    Pipeline(two_outputs, Fallback(Static(lambda inputs: dspy.Prediction())))  # a factory's answer is unknowable
    Pipeline(program("any", []), Fallback(Static(answer="x")))  # a function's outputs are unknown: not checked


async def test_serving_an_alternative_logs_a_warning_naming_the_pipeline_the_alternative_and_the_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pipeline = Pipeline(
        program("primary", [], Boom("primary down")), Fallback(Static(answer="s", name="apology")), name="qa"
    )
    with caplog.at_level(logging.WARNING, logger="resilient_dspy.fallback"):
        await pipeline("q")
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert all(part in message for part in ("qa", "'apology'", "Boom", "primary down"))
