"""Pipeline: calling conventions, layer order, describe(), build-time validation, injected clock/rng, events."""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from resilient_dspy import Outcome, Pipeline, Retry, Timeout
from resilient_dspy.core import Call, Handler, LoopClock, Middleware
from resilient_dspy.errors import ConfigurationError
from resilient_dspy.events import Event, RetryScheduled


@dataclass
class Tag:
    """Writing a middleware is one small class: this one logs enter/exit and tags the call's properties."""

    label: str
    log: list[str] = field(default_factory=list)

    async def __call__(self, call: Call, next: Handler) -> Any:
        self.log.append(f"enter {self.label}")
        call.properties.setdefault("tags", []).append(self.label)
        try:
            return await next(call)
        finally:
            self.log.append(f"exit {self.label}")


class StampOptions(BaseModel):
    key: str
    value: int = 1


class Stamp:
    """A middleware with a pydantic ``options`` model (describe() dumps it) and no describe() of its own."""

    def __init__(self, key: str, value: int = 1) -> None:
        self.options = StampOptions(key=key, value=value)

    async def __call__(self, call: Call, next: Handler) -> Any:
        call.properties[self.options.key] = self.options.value
        return await next(call)


async def echo(question: str) -> str:
    return f"echo: {question}"


async def two_fields(question: str, context: str = "") -> dict[str, str]:
    return {"question": question, "context": context}


# --- calling conventions -------------------------------------------------------------------------------


async def test_positional_maps_to_the_first_input_field_and_kwargs_work() -> None:
    """pipeline('x') and pipeline(question='x') run the program with the same inputs."""
    pipeline = Pipeline(two_fields)
    assert pipeline.input_fields == ("question", "context")
    assert await pipeline("q") == {"question": "q", "context": ""}
    assert await pipeline(question="q") == {"question": "q", "context": ""}
    assert await pipeline("q", "c") == {"question": "q", "context": "c"}
    assert await pipeline("q", context="c") == {"question": "q", "context": "c"}


async def test_too_many_positionals_is_a_type_error() -> None:
    """More positionals than input fields is a TypeError naming the fields."""
    pipeline = Pipeline(echo)
    with pytest.raises(TypeError, match=r"takes 1 positional input\(s\) \['question'\], got 2"):
        await pipeline("a", "b")


async def test_positional_and_keyword_for_the_same_field_is_a_type_error() -> None:
    """Giving a field positionally and by keyword is a TypeError naming it."""
    pipeline = Pipeline(two_fields)
    with pytest.raises(TypeError, match=r"got input\(s\) \['question'\] both positionally and by keyword"):
        await pipeline("a", question="b")


async def test_invoke_returns_an_outcome() -> None:
    """invoke() returns the value with served_by, attempts, retries and the loop-time duration."""
    outcome = await Pipeline(echo, Timeout(5)).invoke("q")
    assert outcome == Outcome("echo: q", "primary", 1, 0, 0.0)


async def test_run_executes_a_prebuilt_call_with_its_properties() -> None:
    """new_call() + run() pass caller-given properties down and expose what layers added."""
    seen: list[dict[str, Any]] = []

    async def program(question: str) -> str:
        return question

    class Snapshot:
        async def __call__(self, call: Call, next: Handler) -> Any:
            seen.append(dict(call.properties))
            return await next(call)

    pipeline = Pipeline(program, Tag("outer"), Snapshot())
    call = pipeline.new_call({"question": "q"}, properties={"tenant": "acme"})
    assert await pipeline.run(call) == "q"
    assert seen == [{"tenant": "acme", "tags": ["outer"]}]
    assert call.properties == {"tenant": "acme", "tags": ["outer"]}
    assert call.record.attempts == 1


# --- layer order and describe --------------------------------------------------------------------------


async def test_first_listed_layer_is_outermost() -> None:
    """Three Tag layers enter in listed order and exit in reverse; all see the shared properties."""
    log: list[str] = []
    pipeline = Pipeline(echo, Tag("a", log), Tag("b", log), Tag("c", log))
    call = pipeline.new_call({"question": "q"})
    assert await pipeline.run(call) == "echo: q"
    assert log == ["enter a", "enter b", "enter c", "exit c", "exit b", "exit a"]
    assert call.properties["tags"] == ["a", "b", "c"]


async def test_properties_set_below_a_replacing_layer_are_visible_above() -> None:
    """Properties are shared by every view of the call, even across a layer that passes call.replace() down."""
    pipeline = Pipeline(echo, Tag("outer"), Timeout(5), Stamp("seen_inside", 7))
    call = pipeline.new_call({"question": "q"})
    await pipeline.run(call)
    assert call.properties == {"tags": ["outer"], "seen_inside": 7}


async def test_tag_is_a_middleware() -> None:
    """The example middleware classes satisfy the Middleware protocol."""
    assert isinstance(Tag("x"), Middleware)
    assert isinstance(Stamp("k"), Middleware)


def test_describe_lists_layers_outermost_first_then_the_program() -> None:
    """describe() shows each layer (own describe(), options model, or bare name) and then the program."""
    pipeline = Pipeline(echo, Timeout(5), Stamp("k", 3), Tag("t"), Retry(2, jitter="none"))
    described = pipeline.describe()
    assert [d["layer"] for d in described] == ["Timeout", "Stamp", "Tag", "Retry", "program"]
    assert described[0] == {
        "layer": "Timeout",
        "name": "Timeout(total)",
        "scope": "total",
        "options": {"seconds": 5.0, "name": None},
    }
    assert described[1] == {"layer": "Stamp", "options": {"key": "k", "value": 3}}
    assert described[2] == {"layer": "Tag", "options": {}}
    assert described[3]["options"]["max_attempts"] == 2
    assert described[4] == {"layer": "program", "target": "echo", "inputs": ["question"]}


def test_repr_and_name() -> None:
    """The pipeline is named after its program unless given a name, and its repr lists the layers."""
    assert repr(Pipeline(echo, Timeout(1), Tag("t"))) == "Pipeline(echo, Timeout, Tag)"
    assert repr(Pipeline(echo)) == "Pipeline(echo)"
    assert Pipeline(echo).name == "echo"
    assert Pipeline(echo, name="support-bot").name == "support-bot"


# --- validation at build -------------------------------------------------------------------------------


class SyncMiddleware:
    def __call__(self, call: Call, next: Handler) -> Any:
        return next(call)


def test_every_build_problem_is_listed_in_one_error() -> None:
    """A sync program, non-middleware layers, a bad clock and a non-callable listener are all reported at once."""

    def sync_program(question: str) -> str:
        return question

    with pytest.raises(ConfigurationError) as raised:
        Pipeline(
            sync_program,
            42,  # type: ignore[arg-type]
            Tag,  # type: ignore[arg-type]
            SyncMiddleware(),
            Tag("fine"),
            clock=object(),  # type: ignore[arg-type]
            listeners=[print, "not callable"],  # type: ignore[list-item]
        )
    error = raised.value
    assert [name for name, _ in error.problems] == [
        "program",
        "middleware[0]",
        "middleware[1]",
        "middleware[2]",
        "clock",
        "listeners[1]",
    ]
    message = str(error)
    assert message.startswith("6 invalid settings:\n")
    for name, rule in error.problems:
        assert f"  - {name}: {rule}" in message
    assert "a sync function" in dict(error.problems)["program"]
    assert "42" in dict(error.problems)["middleware[0]"]


def test_a_single_problem_is_reported_in_the_singular() -> None:
    """One bad setting reads '1 invalid setting'."""
    with pytest.raises(ConfigurationError, match=r"^1 invalid setting:\n  - program: ") as raised:
        Pipeline(42)
    assert isinstance(raised.value, ValueError)


def test_subscribe_rejects_a_non_callable() -> None:
    """subscribe(42) is a ConfigurationError naming the listener."""
    pipeline = Pipeline(echo)
    with pytest.raises(ConfigurationError) as raised:
        pipeline.subscribe(42)  # type: ignore[arg-type]
    assert [name for name, _ in raised.value.problems] == ["listener"]


# --- injected clock and randomness ---------------------------------------------------------------------


class CountingClock(LoopClock):
    """The loop clock, recording every sleep it is asked for."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await super().sleep(seconds)


async def always_down(question: str) -> str:
    raise ConnectionError("down")


async def retry_delays(seed: int) -> list[float]:
    clock = CountingClock()
    pipeline = Pipeline(always_down, Retry(4, base_delay=1, jitter="full"), clock=clock, rng=random.Random(seed))
    with pytest.raises(Exception, match="gave up after 4 attempts"):
        await pipeline("q")
    return clock.sleeps


async def test_injected_clock_and_seeded_rng_reproduce_retry_delays() -> None:
    """Two pipelines with rng=Random(7) sleep exactly the same full-jitter delays, through the injected clock."""
    first, second = await retry_delays(7), await retry_delays(7)
    expected = random.Random(7)
    assert first == second == [expected.uniform(0, 1), expected.uniform(0, 2), expected.uniform(0, 4)]
    assert await retry_delays(8) != first


# --- events --------------------------------------------------------------------------------------------


def flaky() -> Any:
    """A program that fails its first call with a retryable error and then echoes."""
    calls: list[int] = []

    async def program(question: str) -> str:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("blip")
        return question

    return program


async def test_a_failing_listener_never_fails_the_call(caplog: pytest.LogCaptureFixture) -> None:
    """A listener that raises is logged and skipped; the next listener still gets the event and the call succeeds."""
    received: list[Event] = []

    def broken(event: Event) -> None:
        raise RuntimeError("listener bug")

    pipeline = Pipeline(flaky(), Retry(2, base_delay=0, jitter="none"), listeners=[broken, received.append])
    with caplog.at_level(logging.ERROR, logger="resilient_dspy.events"):
        assert await pipeline("q") == "q"
    assert [type(e) for e in received] == [RetryScheduled]
    assert "event listener" in caplog.text and "RetryScheduled" in caplog.text


async def test_no_listener_the_call_works_and_nothing_listens() -> None:
    """Without listeners the call succeeds and call.listening is False."""
    listening: list[bool] = []

    class Probe:
        async def __call__(self, call: Call, next: Handler) -> Any:
            listening.append(call.listening)
            return await next(call)

    pipeline = Pipeline(flaky(), Probe(), Retry(2, base_delay=0, jitter="none"))
    assert await pipeline("q") == "q"
    assert listening == [False]


async def test_subscribe_adds_a_listener_for_later_calls() -> None:
    """A listener added with subscribe() receives the events of the following calls."""
    received: list[Event] = []
    pipeline = Pipeline(flaky(), Retry(2, base_delay=0, jitter="none"), name="p")
    pipeline.subscribe(received.append)
    assert await pipeline("q") == "q"
    assert [(type(e), e.pipeline, e.layer) for e in received] == [(RetryScheduled, "p", "Retry")]


async def test_call_replace_matches_dataclasses_replace_for_every_field() -> None:
    """Call.replace is a hand copy for speed; it must stay equal to dataclasses.replace for every field."""
    import dataclasses

    from resilient_dspy import Pipeline

    async def program(question: str) -> str:
        return question

    pipeline = Pipeline(program)
    call = pipeline.new_call({"question": "q"}, deadline=5.0, properties={"k": 1}, partition_key="p")
    assert call.replace() == dataclasses.replace(call)
    changes = {
        "inputs": {"question": "r"},
        "deadline": 1.0,
        "attempt": 3,
        "bypass_cache": True,
        "partition_key": "other",
        "properties": {},
    }
    assert {f.name for f in dataclasses.fields(call)} - set(changes) == {"runtime", "record"}
    for name, value in changes.items():
        assert call.replace(**{name: value}) == dataclasses.replace(call, **{name: value})
    with pytest.raises(TypeError, match="no field"):
        call.replace(nonsense=1)
    assert call.with_deadline(1.0) == dataclasses.replace(call, deadline=1.0)
    assert call.for_attempt(3, True) == dataclasses.replace(call, attempt=3, bypass_cache=True)
    assert call.for_attempt(3, True).properties is call.properties


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: __import__("resilient_dspy").Retry(True), "Retry.max_attempts"),
        (lambda: __import__("resilient_dspy").Retry("3"), "Retry.max_attempts"),
        (lambda: __import__("resilient_dspy").Timeout("5"), "Timeout.seconds"),
    ],
)
def test_options_are_strict(build: Any, field: str) -> None:
    """Options do not coerce: Retry(True) is not one attempt, Timeout("5") is not five seconds."""
    from resilient_dspy.errors import ConfigurationError

    with pytest.raises(ConfigurationError) as raised:
        build()
    assert [name for name, _ in raised.value.problems] == [field]


# --- input field names are checked before any layer runs ----------------------------------------------


class _Count:
    """A layer that counts the calls reaching it."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, call: Call, next: Handler) -> Any:
        self.calls += 1
        return await next(call)


async def test_a_misspelled_or_missing_input_raises_invalid_input_error_before_any_layer() -> None:
    """Regression: pipeline(qestion=...) and pipeline() reached the LM with an empty question."""
    import dspy

    from resilient_dspy import InvalidInputError
    from resilient_dspy.testing import FaultInjectingLM

    lm = FaultInjectingLM()
    layer = _Count()
    pipeline = Pipeline(dspy.Predict("question -> answer"), layer)
    with dspy.context(lm=lm):
        with pytest.raises(InvalidInputError) as misspelled:
            await pipeline(qestion="What is DSPy?")
        with pytest.raises(InvalidInputError) as missing:
            await pipeline()
        with pytest.raises(InvalidInputError):
            await pipeline.invoke(qestion="What is DSPy?")
        with pytest.raises(InvalidInputError):
            await pipeline.traced()
    assert {field for field, _ in misspelled.value.problems} == {"qestion", "question"}
    assert missing.value.field == "question"
    assert layer.calls == 0 and lm.requests == 0


async def test_inputs_with_defaults_are_optional_and_unknown_ones_are_refused() -> None:
    """A parameter with a default may be left out; a name the program does not take is refused."""
    from resilient_dspy import InvalidInputError

    async def search(query: str, k: int = 3) -> list[str]:
        return [query] * k

    pipeline = Pipeline(search)
    assert await pipeline("q") == ["q"] * 3
    assert await pipeline(query="q", k=1) == ["q"]
    with pytest.raises(InvalidInputError) as raised:
        await pipeline(query="q", kk=1)
    assert raised.value.field == "kk"
    with pytest.raises(InvalidInputError) as raised:
        await pipeline(k=1)
    assert raised.value.field == "query"


async def test_a_module_takes_its_fields_and_dspys_call_options() -> None:
    """A module takes its signature's fields (optional ones may be left out) and DSPy's per-call keywords."""
    import dspy

    from resilient_dspy import InvalidInputError
    from resilient_dspy.testing import FaultInjectingLM

    class WithHint(dspy.Signature):
        question: str = dspy.InputField()
        hint: str | None = dspy.InputField()
        answer: str = dspy.OutputField()

    pipeline = Pipeline(dspy.ChainOfThought(WithHint))
    with dspy.context(lm=FaultInjectingLM()):
        assert (await pipeline(question="q")).answer
        assert (await pipeline(question="q", hint="h", config={"temperature": 0.5})).answer
        with pytest.raises(InvalidInputError) as raised:
            await pipeline(question="q", hnit="h")
    assert raised.value.field == "hnit"


async def test_an_lm_takes_prompt_or_messages_and_any_call_kwargs() -> None:
    """Wrapping a dspy.LM: prompt or messages, plus call kwargs (temperature, ...); neither is refused."""
    from resilient_dspy import InvalidInputError
    from resilient_dspy.testing import FaultInjectingLM

    pipeline = Pipeline(FaultInjectingLM())
    assert await pipeline("hi")
    assert await pipeline(prompt="hi", temperature=0.1)
    messages = [{"role": "user", "content": "hi"}]
    assert pipeline.target.input_problems({"messages": messages, "temperature": 0.1}) == []
    with pytest.raises(InvalidInputError) as raised:
        await pipeline(temperature=0.1)
    assert raised.value.field == "prompt"


def _accepts(keys: set[str], required: set[str], known: set[str]) -> bool:
    return required <= keys <= known


_NAMES = st.sets(st.sampled_from(["question", "context", "k", "qestion", "contxt", "extra"]), max_size=6)


@given(_NAMES)
def test_inputs_are_refused_exactly_when_a_name_is_unknown_or_a_required_one_is_missing(names: set[str]) -> None:
    """Property: every call whose names are not all known, or miss a required one, raises InvalidInputError naming
    such a field; every other call is accepted."""
    from resilient_dspy import InvalidInputError

    async def program(question: str, context: str, k: int = 1) -> str:
        return question

    layer = _Count()
    pipeline = Pipeline(program, layer)
    required, known = {"question", "context"}, {"question", "context", "k"}
    inputs = dict.fromkeys(names, "x")
    if _accepts(names, required, known):
        assert asyncio.run(pipeline(**inputs)) == "x"
        assert layer.calls == 1
    else:
        with pytest.raises(InvalidInputError) as raised:
            asyncio.run(pipeline(**inputs))
        assert layer.calls == 0
        wrong = (names - known) | (required - names)
        assert {field for field, _ in raised.value.problems} == wrong


# --- build-time validation: what is certainly wrong is refused, order mistakes are warned ----------------


async def _echo(question: str) -> str:
    return question


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"rng": 42}, "rng"),
        ({"rng": random}, "rng"),
        ({"listeners": print}, "listeners"),
        ({"listeners": "print"}, "listeners"),
    ],
    ids=["rng int", "rng module", "listeners callable", "listeners str"],
)
def test_a_wrong_rng_or_listeners_is_refused_naming_the_field(options: dict[str, Any], field: str) -> None:
    """Regression: Pipeline(rng=42) and listeners=print were accepted (and failed later, or iterated a string)."""
    with pytest.raises(ConfigurationError) as raised:
        Pipeline(_echo, **options)
    assert [name for name, _ in raised.value.problems] == [field]


def test_a_static_answer_missing_an_output_field_of_the_module_is_refused() -> None:
    """Static(answer=...) for a 'question -> answer, confidence' module misses 'confidence': refused at build."""
    import dspy

    from resilient_dspy import Fallback, Static

    with pytest.raises(ConfigurationError) as raised:
        Pipeline(dspy.Predict("question -> answer, confidence"), Fallback(Static(answer="sorry")))
    ((name, rule),) = raised.value.problems
    assert name.startswith("Fallback") and "confidence" in rule
    # every output field given (ChainOfThought's reasoning is its own, not the signature's): fine
    Pipeline(dspy.ChainOfThought("question -> answer"), Fallback(Static(answer="sorry")))
    Pipeline(dspy.Predict("question -> answer, confidence"), Fallback(Static(answer="?", confidence="0")))
    Pipeline(dspy.Predict("question -> answer, confidence"), Fallback(Static(lambda inputs: None)))  # unknowable


def test_a_retry_outside_the_fallback_is_warned_with_the_rule() -> None:
    """Retry ▶ Fallback: the static answer is a success, so the Retry never retries; a ResilienceWarning says so."""
    from resilient_dspy import Fallback, Static
    from resilient_dspy.errors import ResilienceWarning

    with pytest.warns(ResilienceWarning, match="Fallback") as warned:
        Pipeline(_echo, Retry(3), Fallback(Static(answer="sorry")))
    assert len(warned) == 1


def test_an_attempt_timeout_longer_than_the_total_is_warned() -> None:
    """Timeout(5) ▶ Retry ▶ Timeout(30): the attempt is clamped to the total, so nothing is left to retry."""
    from resilient_dspy.errors import ResilienceWarning

    with pytest.warns(ResilienceWarning, match="attempt") as warned:
        Pipeline(_echo, Timeout(5), Retry(3), Timeout(30))
    assert len(warned) == 1


def test_an_attempt_timeout_without_a_total_deadline_is_warned() -> None:
    """Retry ▶ Timeout(10) alone: the call can take attempts x 10 s plus every sleep; a total Timeout is missing."""
    from resilient_dspy.errors import ResilienceWarning

    with pytest.warns(ResilienceWarning, match="total") as warned:
        Pipeline(_echo, Retry(3), Timeout(10))
    assert len(warned) == 1


def test_the_recommended_order_builds_without_a_warning() -> None:
    """Fallback ▶ Timeout(total) ▶ Retry ▶ Timeout(attempt) warns nothing (warnings are errors in this suite)."""
    from resilient_dspy import Fallback, Static

    Pipeline(_echo, Fallback(Static(answer="sorry")), Timeout(20), Retry(3), Timeout(2))
    Pipeline(_echo, Timeout(20), Retry(3))
    Pipeline(_echo, Retry(3))


async def test_a_kwargs_module_with_several_predictors_takes_any_input_name() -> None:
    """forward(**kwargs) over several predictors: which names it takes is its own business, so none is refused."""
    import dspy

    class TwoSteps(dspy.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.draft = dspy.Predict("topic -> draft")
            self.polish = dspy.Predict("draft -> text")

        async def aforward(self, **kwargs: Any) -> dspy.Prediction:
            return dspy.Prediction(text=str(sorted(kwargs)))

    pipeline = Pipeline(TwoSteps())
    assert pipeline.input_fields == ("topic",)
    assert (await pipeline(subject="x", style="y")).text == "['style', 'subject']"


def test_the_library_prints_nothing_unless_the_application_configures_logging(tmp_path: Any) -> None:
    """A library adds a NullHandler: its warnings (a circuit opening) reach stderr only through the app's logging."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "quiet.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio, sys, logging
            import dspy
            from resilient_dspy import CircuitBreaker, Pipeline

            async def down(question: str) -> str:
                raise dspy.LMServerError("503", status=503)

            async def main() -> None:
                pipeline = Pipeline(down, CircuitBreaker(failure_threshold=1))
                try:
                    await pipeline("q")
                except dspy.LMServerError:
                    pass

            if sys.argv[1:] == ["configured"]:
                logging.basicConfig(level=logging.WARNING)
            asyncio.run(main())
            """
        )
    )
    quiet = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    loud = subprocess.run([sys.executable, str(script), "configured"], capture_output=True, text=True, timeout=120)
    assert quiet.returncode == loud.returncode == 0
    assert "closed -> open" not in quiet.stderr
    assert "closed -> open" in loud.stderr


async def test_a_fallback_serving_is_logged_at_warning(caplog: Any) -> None:
    import logging

    import dspy

    from resilient_dspy import Fallback, Static

    async def down(question: str) -> str:
        raise dspy.LMServerError("503", status=503)

    pipeline = Pipeline(down, Fallback(Static(lambda inputs: "sorry", name="apology")))
    with caplog.at_level(logging.WARNING, "resilient_dspy"):
        assert await pipeline("q") == "sorry"
    [record] = [r for r in caplog.records if r.name == "resilient_dspy.fallback"]
    assert record.levelno == logging.WARNING
    assert "apology" in record.getMessage() and "LMServerError" in record.getMessage()


def test_a_layer_given_as_the_program_or_a_program_given_as_a_layer_is_refused_saying_the_program_comes_first() -> None:
    import dspy

    from resilient_dspy import Retry

    with pytest.raises(ConfigurationError) as caught:
        Pipeline(Retry(3))
    [(field, rule)] = caught.value.problems
    assert field == "program" and "first" in rule
    with pytest.raises(ConfigurationError) as caught:
        Pipeline(Retry(3), dspy.Predict("question -> answer"))
    fields = [name for name, _ in caught.value.problems]
    assert fields == ["program", "middleware[0]"]
    assert all("first" in rule for _, rule in caught.value.problems)
    assert all(len(rule) < 200 for _, rule in caught.value.problems)  # no program repr dumped into the message
