"""DSPy binding: what a pipeline can wrap (modules, LMs, async defs, pipelines) and a full fault-injected run."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import dspy
import pytest

from resilient_dspy import (
    Fallback,
    Pipeline,
    RetriesExhaustedError,
    Retry,
    Static,
    Timeout,
    TimeoutExceededError,
    no_dspy_retries,
)
from resilient_dspy.core import Call, Handler
from resilient_dspy.errors import ResilienceWarning
from resilient_dspy.events import Event, RetryScheduled, TimeoutFired
from resilient_dspy.testing import Fault, FaultInjectingLM, FaultProfile
from tests.conftest import other_tasks


class Capture:
    """Records the inputs each call carries at this layer."""

    def __init__(self) -> None:
        self.inputs: list[dict[str, Any]] = []

    async def __call__(self, call: Call, next: Handler) -> Any:
        self.inputs.append(dict(call.inputs))
        return await next(call)


class Ask(dspy.Module):  # type: ignore[misc]
    """A custom module whose input is its forward() parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.predict = dspy.Predict("question, tone -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        return self.predict(question=question, tone="dry")

    async def aforward(self, question: str) -> dspy.Prediction:
        return await self.predict.acall(question=question, tone="dry")


def now() -> float:
    return asyncio.get_running_loop().time()


# --- positional mapping --------------------------------------------------------------------------------


async def test_predict_positional_maps_to_question() -> None:
    """await pipeline('What is DSPy?') runs Predict('question -> answer') with question='What is DSPy?'."""
    lm = FaultInjectingLM(answers={"What is DSPy?": "A framework for programming LMs."})
    capture = Capture()
    pipeline = Pipeline(dspy.Predict("question -> answer"), capture)
    assert pipeline.input_fields == ("question",)
    with dspy.context(lm=lm):
        positional = await pipeline("What is DSPy?")
        keyword = await pipeline(question="What is DSPy?")
    assert positional.answer == keyword.answer == "A framework for programming LMs."
    assert capture.inputs == [{"question": "What is DSPy?"}] * 2
    assert [e.question for e in lm.journal] == ["What is DSPy?"] * 2


async def test_chain_of_thought_two_positionals_map_in_order() -> None:
    """ChainOfThought('question, context -> answer') maps two positionals to question then context."""
    lm = FaultInjectingLM(answers={"Who?": "Ada"})
    capture = Capture()
    pipeline = Pipeline(dspy.ChainOfThought("question, context -> answer"), capture)
    assert pipeline.input_fields == ("question", "context")
    with dspy.context(lm=lm):
        prediction = await pipeline("Who?", "The first programmer.")
    assert capture.inputs == [{"question": "Who?", "context": "The first programmer."}]
    assert prediction.answer == "Ada"
    assert prediction.reasoning.startswith("Recall what is known about: Who?")
    with pytest.raises(TypeError):
        await pipeline("Who?", "ctx", "extra")
    with pytest.raises(TypeError):
        await pipeline("Who?", question="Who?")


async def test_custom_module_forward_parameters_are_its_inputs() -> None:
    """A dspy.Module with forward(self, question) maps the positional to question and is called via acall."""
    lm = FaultInjectingLM(answers={"Why?": "Because."})
    pipeline = Pipeline(Ask())
    assert pipeline.input_fields == ("question",)
    assert pipeline.name == "Ask"
    with dspy.context(lm=lm):
        assert (await pipeline("Why?")).answer == "Because."
        assert (await pipeline(question="Why?")).answer == "Because."
    assert lm.requests == 2


async def test_async_def_positional_and_keywords() -> None:
    """An async def's parameters are the input fields, positional first."""

    async def answer(question: str, *, style: str = "plain") -> str:
        return f"{style}: {question}"

    pipeline = Pipeline(answer)
    assert pipeline.input_fields == ("question", "style")
    assert await pipeline("q") == "plain: q"
    assert await pipeline("q", style="bold") == "bold: q"
    with pytest.raises(TypeError):
        await pipeline("a", "b", "c")


async def test_module_acall_records_usage() -> None:
    """The module is called via acall, so track_usage reports the LM's tokens on the prediction."""
    lm = FaultInjectingLM()
    with dspy.context(lm=lm, track_usage=True):
        prediction = await Pipeline(dspy.Predict("question -> answer"))("Count me")
    usage = prediction.get_lm_usage()
    (entry,) = lm.journal
    assert usage["custom/fault/local"]["prompt_tokens"] == entry.input_tokens > 0
    assert usage["custom/fault/local"]["completion_tokens"] == entry.output_tokens > 0


def test_setting_reads_dspy_settings_in_the_current_context() -> None:
    from resilient_dspy.binding.settings import setting

    lm = FaultInjectingLM()
    for name in ("lm", "adapter", "track_usage", "usage_tracker"):
        assert setting(name) is getattr(dspy.settings, name)
    with dspy.context(lm=lm, track_usage=True):
        assert setting("lm") is lm
        assert setting("track_usage") is True
    assert setting("lm") is dspy.settings.lm
    assert setting("no_such_setting") is None


async def test_usage_scope_measures_rolls_up_and_restores_the_context() -> None:
    """Like ``dspy.track_usage``: usage inside is measured, rolled up into an enclosing tracker, and on exit (even
    by an error) the context is what it was; settings read inside are the ones outside."""
    from resilient_dspy.binding.usage import usage_scope

    lm = FaultInjectingLM()
    program = dspy.Predict("question -> answer")
    with dspy.context(lm=lm), dspy.track_usage() as outer:
        with usage_scope() as scope:
            assert dspy.settings.lm is lm
            assert dspy.settings.usage_tracker is scope.tracker
            await program.acall(question="one")
        assert dspy.settings.usage_tracker is outer
        measured = scope.by_model()["custom/fault/local"]
        assert measured["prompt_tokens"] == lm.journal[0].input_tokens > 0
        assert scope.total_tokens() == scope.total_tokens(scope.by_model()) == measured["total_tokens"]
        with pytest.raises(RuntimeError), usage_scope():
            raise RuntimeError("boom")
        assert dspy.settings.usage_tracker is outer
    assert outer.get_total_tokens()["custom/fault/local"]["prompt_tokens"] == measured["prompt_tokens"]
    assert dspy.settings.usage_tracker is None
    with usage_scope() as empty:
        pass
    assert empty.by_model() == {} and empty.total_tokens() == 0


# --- LM and nested pipeline targets --------------------------------------------------------------------


async def test_wrapping_an_lm_maps_the_positional_to_prompt() -> None:
    """Pipeline(lm)('...') calls lm.acall(prompt=...) and returns the list of completions."""
    lm = FaultInjectingLM(answers={"Say hi": "hi"})
    pipeline = Pipeline(lm, Retry(2, base_delay=0, jitter="none"))
    assert pipeline.input_fields == ("prompt",)
    assert pipeline.name == "LM(custom/fault/local)"
    assert pipeline.describe()[-1] == {
        "layer": "program",
        "target": "LM(custom/fault/local)",
        "inputs": ["prompt"],
        "also": ["messages"],
    }
    lm.push("server_error")
    outcome = await pipeline.invoke("Say hi")
    assert outcome.value == [json.dumps({"answer": "hi"})]
    assert (outcome.attempts, outcome.retries) == (2, 1)
    assert [e.fault for e in lm.journal] == [Fault.SERVER_ERROR, Fault.OK]


async def test_nested_pipeline_inherits_the_parent_deadline() -> None:
    """A nested pipeline sees the parent's deadline: its program hanging is cut at the parent's Timeout(2)."""
    remaining: list[float | None] = []

    class Remaining:
        async def __call__(self, call: Call, next: Handler) -> Any:
            remaining.append(call.remaining())
            return await next(call)

    async def hang(question: str) -> str:
        await asyncio.sleep(10_000)
        return "late"

    nested = Pipeline(hang, Remaining(), name="inner")
    parent = Pipeline(nested, Timeout(2))
    assert parent.input_fields == ("question",) and parent.name == "inner"
    assert parent.describe()[-1]["pipeline"][-1]["target"] == hang.__qualname__
    start = now()
    with pytest.raises(TimeoutExceededError) as raised:
        await parent("q")
    assert (raised.value.scope, raised.value.timeout) == ("total", 2.0)
    assert now() - start == pytest.approx(2.0, abs=1e-3)
    assert remaining == [pytest.approx(2.0, abs=1e-6)]
    assert not other_tasks()


async def test_nested_retry_stops_at_the_parent_deadline() -> None:
    """A Retry in the nested pipeline gives up (reason 'deadline') rather than back off past the parent's deadline."""
    calls: list[float] = []

    async def down(question: str) -> str:
        calls.append(now())
        raise ConnectionError("down")

    nested = Pipeline(down, Retry(5, base_delay=1.5, jitter="none"))
    parent = Pipeline(nested, Timeout(2))
    start = now()
    with pytest.raises(RetriesExhaustedError) as raised:
        await parent("q")
    assert (raised.value.attempts, raised.value.reason) == (2, "deadline")
    assert [t - start for t in calls] == pytest.approx([0.0, 1.5], abs=1e-3)
    assert now() - start == pytest.approx(1.5, abs=1e-3)


# --- DSPy's own retries --------------------------------------------------------------------------------


def test_retry_over_an_lm_with_dspy_retries_warns_once() -> None:
    """Retry over an LM with num_retries > 0 warns with ResilienceWarning; no_dspy_retries(lm) silences it."""
    lm = FaultInjectingLM(num_retries=2)
    with pytest.warns(ResilienceWarning, match="num_retries=2"):
        Pipeline(lm, Retry(2))
    assert no_dspy_retries(lm).num_retries == 0
    Pipeline(no_dspy_retries(lm), Retry(2))  # warnings are errors in this suite: none may be raised


async def test_retry_over_a_module_warns_about_the_context_lm_with_dspy_retries() -> None:
    """A module's LM from dspy.context with num_retries > 0 is warned about on the first call only."""
    lm = FaultInjectingLM(num_retries=1)
    pipeline = Pipeline(dspy.Predict("question -> answer"), Retry(2))
    with dspy.context(lm=lm):
        with pytest.warns(ResilienceWarning, match="num_retries=1"):
            await pipeline("first")
        await pipeline("second")  # the same LM again: no second warning (warnings are errors here)


# --- cache bypass on parse failures --------------------------------------------------------------------


async def test_parse_failure_is_retried_with_a_fresh_response() -> None:
    """With DSPy's cache on, a malformed answer is retried uncached: the LM really answers again."""
    lm = FaultInjectingLM(cache=True, script=["malformed"])
    pipeline = Pipeline(dspy.Predict("question -> answer"), Retry(2, base_delay=0, jitter="none"))
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        outcome = await pipeline.invoke("A question only asked by the cache-bypass test")
    assert outcome.value.answer.startswith("A local answer")
    assert (outcome.attempts, outcome.retries) == (2, 1)
    assert [e.fault for e in lm.journal] == [Fault.MALFORMED, Fault.OK]


# --- end to end ----------------------------------------------------------------------------------------


async def test_chain_of_thought_survives_rate_limit_server_error_and_hang() -> None:
    """Timeout+Retry+Fallback around ChainOfThought rides out rate_limit, server_error and hang, then answers."""
    lm = FaultInjectingLM(
        script=["rate_limit", "server_error", "hang", "ok"],
        profile=FaultProfile(retry_after=(2.0, 2.0)),
        answers={"What is DSPy?": "A framework for programming language models."},
    )
    events: list[Event] = []
    pipeline = Pipeline(
        dspy.ChainOfThought("question -> answer"),
        Fallback(Static(reasoning="n/a", answer="Sorry, try later.", name="apology")),
        Timeout(60),
        Retry(4, base_delay=0.1, jitter="none"),
        Timeout(5),
        listeners=[events.append],
    )
    start = now()
    with dspy.context(lm=lm, track_usage=True):
        outcome = await pipeline.invoke("What is DSPy?")

    assert outcome.served_by == "primary"
    assert outcome.value.answer == "A framework for programming language models."
    assert (outcome.attempts, outcome.retries) == (4, 3)
    usage = outcome.value.get_lm_usage()["custom/fault/local"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    assert [e.fault for e in lm.journal] == [Fault.RATE_LIMIT, Fault.SERVER_ERROR, Fault.HANG, Fault.OK]
    assert {e.question for e in lm.journal} == {"What is DSPy?"}
    assert lm.requests == 4 and lm.core.in_flight == 0
    times = [e.time - start for e in lm.journal]
    assert times[0] == pytest.approx(0.0, abs=1e-3)
    assert times[1] - times[0] == pytest.approx(2.0, abs=1e-3)  # the rate limit's Retry-After was honoured
    assert times[2] - times[1] == pytest.approx(0.2, abs=1e-3)  # a 503 carries no Retry-After: 0.1 * 2**1 backoff
    assert times[3] - times[2] == pytest.approx(5.0 + 0.4, abs=1e-3)  # attempt timeout, then 0.1 * 2**2 backoff
    scheduled = [e for e in events if isinstance(e, RetryScheduled)]
    assert [e.reason for e in scheduled] == ["LMRateLimitError", "LMServerError", "TimeoutExceededError"]
    assert [(e.scope, e.timeout) for e in events if isinstance(e, TimeoutFired)] == [("attempt", 5.0)]
    assert not other_tasks()


class _AsyncOnly(dspy.Module):
    """A module written in the async style: only aforward."""

    def __init__(self) -> None:
        super().__init__()
        self.predict = dspy.Predict("question -> answer")

    async def aforward(self, question: str) -> Any:
        return await self.predict.acall(question=question)


async def test_a_module_with_only_aforward_is_wrapped_and_maps_positionals() -> None:
    """Regression: a module defining only aforward used to crash Pipeline() with AttributeError."""
    from resilient_dspy import Pipeline

    pipeline = Pipeline(_AsyncOnly())
    assert pipeline.input_fields == ("question",)
    with dspy.context(lm=FaultInjectingLM()):
        prediction = await pipeline("What is DSPy?")
    assert "What is DSPy?" in prediction.answer


async def test_positional_only_parameters_are_passed_positionally() -> None:
    """Regression: `async def f(q, /)` used to fail on every call with TypeError."""
    from resilient_dspy import Pipeline

    async def shout(text: str, /, *, suffix: str = "!") -> str:
        return text.upper() + suffix

    pipeline = Pipeline(shout)
    assert await pipeline("hi") == "HI!"
    assert await pipeline("hi", suffix="?") == "HI?"


async def test_a_nested_pipeline_keeps_the_cache_bypass_of_an_outer_retry() -> None:
    """Regression: a Retry around a nested pipeline replayed DSPy's cached malformed answer."""
    import uuid

    from resilient_dspy import Pipeline, Retry

    lm = FaultInjectingLM(script=["malformed", "malformed"], cache=True)
    inner = Pipeline(dspy.Predict("question -> answer"))
    outer = Pipeline(inner, Retry(3, base_delay=0.01, jitter="none"))
    with dspy.context(lm=lm):
        prediction = await outer(question=f"nested bypass {uuid.uuid4()}")
    assert prediction.answer
    assert [entry.fault for entry in lm.journal] == [Fault.MALFORMED, Fault.MALFORMED, Fault.OK]


# --- forward-only modules (the usual DSPy style) -------------------------------------------------------


class _ForwardOnly(dspy.Module):  # type: ignore[misc]
    """A module written in the usual DSPy style: only a sync forward()."""

    def __init__(self, pause: float = 0.0) -> None:
        super().__init__()
        self.predict = dspy.Predict("question -> answer")
        self.pause = pause
        self.threads: list[int] = []

    def forward(self, question: str) -> dspy.Prediction:
        import threading
        import time

        self.threads.append(threading.get_ident())
        if self.pause:
            time.sleep(self.pause)  # real time: a thread cannot be cut by virtual time
        return self.predict(question=question)


async def test_a_forward_only_module_answers_from_a_worker_thread() -> None:
    """Regression: a module with only forward() raised AttributeError('aforward') on every call; now it runs in a
    worker thread, with the caller's DSPy settings (the LM from dspy.context) carried into it."""
    import threading

    lm = FaultInjectingLM(answers={"Why?": "Because."})
    module = _ForwardOnly()
    pipeline = Pipeline(module, Fallback(Static(answer="sorry")))
    assert pipeline.input_fields == ("question",)
    with dspy.context(lm=lm):
        outcome = await pipeline.invoke("Why?")
    assert (outcome.value.answer, outcome.served_by, outcome.attempts) == ("Because.", "primary", 1)
    assert module.threads and module.threads[0] != threading.get_ident()
    assert [entry.question for entry in lm.journal] == ["Why?"]


async def test_a_forward_only_module_is_retried_by_the_layers_around_it() -> None:
    """Every layer still wraps a forward-only module: a Retry retries its LM's server error."""
    lm = FaultInjectingLM(script=["server_error"])
    pipeline = Pipeline(_ForwardOnly(), Retry(3, base_delay=0, jitter="none"))
    with dspy.context(lm=lm):
        outcome = await pipeline.invoke("q")
    assert (outcome.attempts, outcome.retries) == (2, 1)
    assert [entry.fault for entry in lm.journal] == [Fault.SERVER_ERROR, Fault.OK]


async def test_a_forward_only_module_reports_its_lm_usage() -> None:
    """get_lm_usage() works for a forward-only module: DSPy's __call__ tracks usage inside the worker thread."""
    lm = FaultInjectingLM()
    with dspy.context(lm=lm, track_usage=True):
        prediction = await Pipeline(_ForwardOnly())("Count me")
    (entry,) = lm.journal
    usage = prediction.get_lm_usage()["custom/fault/local"]
    assert usage["prompt_tokens"] == entry.input_tokens > 0
    assert usage["completion_tokens"] == entry.output_tokens > 0


async def test_a_forward_only_module_answers_fresh_on_a_cache_bypass_retry() -> None:
    """The cache-bypass attempt (after a parse error) also runs a forward-only module in a thread, uncached."""
    import uuid

    lm = FaultInjectingLM(cache=True, script=["malformed"])
    pipeline = Pipeline(_ForwardOnly(), Retry(2, base_delay=0, jitter="none"))
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        outcome = await pipeline.invoke(f"forward-only bypass {uuid.uuid4()}")
    assert outcome.value.answer
    assert [entry.fault for entry in lm.journal] == [Fault.MALFORMED, Fault.OK]


@pytest.mark.looptime(False)  # a real thread and a real (small) timeout: virtual time cannot cut a thread
async def test_a_timeout_over_a_forward_only_module_raises_on_time() -> None:
    """The Timeout stops waiting at its deadline and the caller gets TimeoutExceededError then, though the thread
    (sleeping 1 s for real) is not interrupted and finishes on its own."""
    import time

    module = _ForwardOnly(pause=1.0)
    pipeline = Pipeline(module, Timeout(0.05))
    started = time.monotonic()
    with dspy.context(lm=FaultInjectingLM()), pytest.raises(TimeoutExceededError):
        await pipeline("slow")
    assert time.monotonic() - started < 0.8  # well before the thread's 1 s sleep ends
    assert not other_tasks()


@pytest.mark.looptime(False)  # real threads
async def test_forward_only_calls_use_a_bounded_number_of_threads() -> None:
    """At most dspy.settings.async_max_workers forward() calls run at once (DSPy's asyncify limiter)."""
    import threading
    import time

    running = 0
    peak = 0
    lock = threading.Lock()

    class Busy(dspy.Module):  # type: ignore[misc]
        def forward(self, question: str) -> dspy.Prediction:
            nonlocal running, peak
            with lock:
                running += 1
                peak = max(peak, running)
            time.sleep(0.02)
            with lock:
                running -= 1
            return dspy.Prediction(answer=question)

    pipeline = Pipeline(Busy())
    with dspy.context(async_max_workers=2):
        answers = await asyncio.gather(*(pipeline(str(i)) for i in range(8)))
    assert [a.answer for a in answers] == [str(i) for i in range(8)]
    assert peak <= 2


def test_a_module_with_neither_forward_nor_aforward_is_refused_at_build() -> None:
    """A module that defines neither forward nor aforward cannot run: ConfigurationError naming the program."""
    from resilient_dspy.errors import ConfigurationError

    class Empty(dspy.Module):  # type: ignore[misc]
        pass

    with pytest.raises(ConfigurationError) as raised:
        Pipeline(Empty())
    assert [field for field, _ in raised.value.problems] == ["program"]


def test_an_async_generator_is_refused_at_build() -> None:
    """An async generator function (or a module whose forward/aforward is one) is refused with its own reason."""
    from resilient_dspy.errors import ConfigurationError

    async def stream(question: str) -> Any:
        yield question

    class Streaming(dspy.Module):  # type: ignore[misc]
        async def aforward(self, question: str) -> Any:
            yield question

    for program in (stream, Streaming()):
        with pytest.raises(ConfigurationError) as raised:
            Pipeline(program)
        ((field, rule),) = raised.value.problems
        assert field == "program" and "generator" in rule
