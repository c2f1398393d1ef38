"""Chaos: named faults in the shared vocabulary, exceptions and factories, latency, outcomes, effects, rates,
scripts, switches, events, cancellation, placement and bad options.

Every async test runs on looptime's virtual loop clock, so injected latency is free and exact.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import dspy
import pytest

from resilient_dspy import Pipeline, RetriesExhaustedError, Retry, Timeout, TimeoutExceededError
from resilient_dspy.core import Call
from resilient_dspy.errors import ConfigurationError, ResilienceWarning
from resilient_dspy.events import Event
from resilient_dspy.middleware.cache import Cache
from resilient_dspy.middleware.chaos import Chaos, ChaosInjected, ChaosSnapshot
from resilient_dspy.testing import Fault, FaultInjectingLM, FaultStep, fault_error
from tests.conftest import other_tasks


class Program:
    """An async program (input ``question``) that counts its calls and answers a Prediction."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    async def __call__(self, question: str) -> dspy.Prediction:
        self.calls.append({"question": question, "time": now()})
        return dspy.Prediction(answer=f"answer to {question}", confidence=0.9, sources=["a", "b"])


def now() -> float:
    return asyncio.get_running_loop().time()


def injected(events: list[Event]) -> list[ChaosInjected]:
    return [event for event in events if isinstance(event, ChaosInjected)]


async def outcome_of(pipeline: Pipeline, question: str = "q") -> str | BaseException:
    """The answer, or the exception the call raised (so a schedule reads as one list)."""
    try:
        return str((await pipeline(question)).answer)
    except Exception as error:
        return error


FAILING = [fault for fault in Fault if fault not in (Fault.OK, Fault.HANG)]


# ------------------------------------------------------------------------------- 1. one vocabulary with the LM


@pytest.mark.parametrize("fault", FAILING, ids=str)
async def test_a_named_fault_raises_the_same_dspy_error_as_the_fault_lm(fault: Fault) -> None:
    """Chaos(fault=kind) raises the class and status a pipeline's caller sees when FaultInjectingLM injects the same
    kind (DSPy's error, or ours for an answer cut at max_tokens)."""
    lm = FaultInjectingLM(script=[fault, fault])  # malformed needs both Chat and its JSON fallback to fail
    with dspy.context(lm=lm), pytest.raises(Exception) as from_lm:
        await Pipeline(dspy.Predict("question -> answer"))(question="q")

    program = Program()
    with pytest.raises(Exception) as from_chaos:
        await Pipeline(program, Chaos(fault=fault))("q")

    assert type(from_chaos.value) is type(from_lm.value)
    assert getattr(from_chaos.value, "status", None) == getattr(from_lm.value, "status", None)
    assert program.calls == []
    assert type(fault_error(fault)) is type(from_lm.value)


async def test_a_named_rate_limit_carries_retry_after_from_its_range() -> None:
    """retry_after=(low, high) gives each injected 429 a seeded Retry-After in the range; a number gives exactly it."""
    pipeline = Pipeline(Program(), Chaos(fault="rate_limit", retry_after=(0.5, 2.0), seed=4))
    seen = []
    for _ in range(10):
        error = await outcome_of(pipeline)
        assert isinstance(error, dspy.LMRateLimitError) and error.status == 429
        assert error.retry_after is not None and 0.5 <= error.retry_after <= 2.0
        seen.append(error.retry_after)
    assert len(set(seen)) > 1

    error = await outcome_of(Pipeline(Program(), Chaos(fault="rate_limit", retry_after=3)))
    assert isinstance(error, dspy.LMRateLimitError) and error.retry_after == 3.0
    error = await outcome_of(Pipeline(Program(), Chaos(fault="rate_limit")))
    assert isinstance(error, dspy.LMRateLimitError) and error.retry_after is None


async def test_retry_honours_an_injected_retry_after_and_recovers() -> None:
    """A scripted 429 with Retry-After 2 s then a 503: Retry waits at least 2 s, retries twice, and answers."""
    program = Program()
    pipeline = Pipeline(
        program,
        Retry(3, base_delay=0.1, jitter="none"),
        Chaos(script=[FaultStep("rate_limit", retry_after=2.0), "server_error"]),
    )
    start = now()
    outcome = await pipeline.invoke("q")
    assert outcome.value.answer == "answer to q"
    assert outcome.retries == 2
    assert [call["time"] - start for call in program.calls] == pytest.approx([2.0 + 0.2], abs=1e-6)


async def test_a_malformed_fault_is_a_parse_error_of_the_programs_signature_and_is_retried() -> None:
    """fault='malformed' raises AdapterParseError naming the wrapped predictor's signature; Retry retries it."""
    lm = FaultInjectingLM()
    chaos = Chaos(script=["malformed"])
    pipeline = Pipeline(dspy.Predict("question -> verdict: bool"), chaos)
    with dspy.context(lm=lm):
        error = await outcome_of(pipeline)
    assert isinstance(error, dspy.AdapterParseError)
    assert list(error.signature.output_fields) == ["verdict"]
    assert lm.requests == 0

    retried = Pipeline(dspy.Predict("question -> answer"), Retry(2, base_delay=0.01), Chaos(script=["malformed"]))
    with dspy.context(lm=lm):
        outcome = await retried.invoke("q")
    assert outcome.retries == 1 and lm.requests == 1


# --------------------------------------------------------------------------- 2. exceptions, types, factories


class QuotaGone(Exception):
    """A user exception for injection."""


async def test_an_exception_instance_is_raised_each_time_with_a_fresh_traceback() -> None:
    """An instance is raised as itself on every call; its traceback does not grow from call to call."""
    error = QuotaGone("quota gone")
    pipeline = Pipeline(Program(), Chaos(fault=error))
    depths = []
    for _ in range(3):
        raised = await outcome_of(pipeline)
        assert raised is error
        depth, tb = 0, raised.__traceback__
        while tb is not None:
            depth, tb = depth + 1, tb.tb_next
        depths.append(depth)
    assert depths[0] == depths[1] == depths[2]


async def test_an_exception_type_is_instantiated_per_call() -> None:
    """An exception type gives a new instance on every call."""
    pipeline = Pipeline(Program(), Chaos(fault=QuotaGone))
    first, second = await outcome_of(pipeline), await outcome_of(pipeline)
    assert isinstance(first, QuotaGone) and isinstance(second, QuotaGone) and first is not second


async def test_a_factory_gets_the_call() -> None:
    """A factory is called with the Call and its exception is raised (here a 429 whose Retry-After uses the input)."""
    seen: list[Call] = []

    def make(call: Call) -> Exception:
        seen.append(call)
        return dspy.LMRateLimitError("slow down", status=429, retry_after=len(call.inputs["question"]))

    error = await outcome_of(Pipeline(Program(), Chaos(fault=make)), "four")
    assert isinstance(error, dspy.LMRateLimitError) and error.retry_after == 4
    assert [call.inputs for call in seen] == [{"question": "four"}]


async def test_a_factory_that_returns_no_exception_is_a_type_error() -> None:
    """A factory returning something else is a bug in the test setup: TypeError, not a silent pass."""
    with pytest.raises(TypeError, match="not an Exception"):
        await Pipeline(Program(), Chaos(fault=lambda call: "oops"))("q")  # type: ignore[arg-type,return-value]


# ------------------------------------------------------------------------------------------------ 3. latency


async def test_latency_sleeps_on_the_pipeline_clock_then_calls_the_program() -> None:
    """latency=1.5 delays every call by exactly 1.5 s of loop time; a range draws seeded delays within it."""
    program = Program()
    start = now()
    await Pipeline(program, Chaos(latency=1.5))("q")
    assert program.calls[0]["time"] - start == pytest.approx(1.5, abs=1e-6)

    async def delays(seed: int) -> list[float]:
        events: list[Event] = []
        pipeline = Pipeline(Program(), Chaos(latency=(0.5, 2.0), seed=seed), listeners=[events.append])
        out = []
        for _ in range(5):
            begin = now()
            await pipeline("q")
            out.append(now() - begin)
        assert [e.kind for e in injected(events)] == ["latency"] * 5
        return out

    first, again, other = await delays(1), await delays(1), await delays(2)
    assert first == pytest.approx(again, abs=1e-9)
    assert first != pytest.approx(other, abs=1e-3)
    assert all(0.5 - 1e-9 <= d <= 2.0 + 1e-9 for d in first)


async def test_injected_latency_is_cut_by_a_timeout_above_and_leaves_no_task() -> None:
    """A 10 s latency under Timeout(1) ends at 1 s with TimeoutExceededError; the program never runs."""
    program = Program()
    pipeline = Pipeline(program, Timeout(1.0), Chaos(latency=10.0))
    start = now()
    with pytest.raises(TimeoutExceededError):
        await pipeline("q")
    assert now() - start == pytest.approx(1.0, abs=1e-6)
    assert program.calls == []
    assert not other_tasks()


async def test_caller_cancellation_during_latency_or_a_hang_propagates() -> None:
    """Cancelling a call sleeping in injected latency, or hanging, raises CancelledError and leaves no task behind."""
    for chaos in (Chaos(latency=100.0), Chaos(fault="hang")):
        program = Program()
        task = asyncio.create_task(Pipeline(program, chaos)("q"))
        await asyncio.sleep(5)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert program.calls == []
        assert not other_tasks()


async def test_a_scripted_hang_is_ended_by_the_attempt_timeout_and_retried() -> None:
    """script=['hang'] under Retry + Timeout(attempt): the hang costs exactly one attempt timeout, then answers."""
    program = Program()
    pipeline = Pipeline(program, Timeout(30), Retry(3, base_delay=0, jitter="none"), Timeout(2), Chaos(script=["hang"]))
    start = now()
    outcome = await pipeline.invoke("q")
    assert outcome.retries == 1
    assert program.calls[0]["time"] - start == pytest.approx(2.0, abs=1e-6)


async def test_a_scripted_step_can_be_slow_and_fail() -> None:
    """FaultStep(server_error, latency=3, status=502): a 502 after 3 s; FaultStep(latency=1) is only slow."""
    program = Program()
    events: list[Event] = []
    chaos = Chaos(script=[FaultStep("server_error", latency=3.0, status=502), FaultStep(latency=1.0)])
    pipeline = Pipeline(program, chaos, listeners=[events.append])
    start = now()
    error = await outcome_of(pipeline)
    assert isinstance(error, dspy.LMServerError) and error.status == 502
    assert now() - start == pytest.approx(3.0, abs=1e-6)
    assert await outcome_of(pipeline) == "answer to q"
    assert now() - start == pytest.approx(4.0, abs=1e-6)
    assert [(e.kind, e.detail, e.scripted) for e in injected(events)] == [
        ("latency", "3s", True),
        ("fault", "server_error: LMServerError(status=502)", True),
        ("latency", "1s", True),
    ]


# ----------------------------------------------------------------------------------------------- 4. outcomes


async def test_named_outcomes_corrupt_the_real_answer() -> None:
    """empty / malformed / wrong_fields run the program and return its answer emptied, garbled or renamed."""
    program = Program()
    empty = await Pipeline(program, Chaos(outcome="empty"))("q")
    assert empty.toDict() == {"answer": "", "confidence": None, "sources": []}
    malformed = await Pipeline(program, Chaos(outcome="malformed"))("q")
    assert malformed.toDict() == {
        "answer": "<malformed answer>",
        "confidence": "<malformed confidence>",
        "sources": "<malformed sources>",
    }
    wrong = await Pipeline(program, Chaos(outcome="wrong_fields"))("q")
    assert sorted(wrong.keys()) == ["unexpected_answer", "unexpected_confidence", "unexpected_sources"]
    with pytest.raises(AttributeError):
        _ = wrong.answer
    assert len(program.calls) == 3


async def test_named_outcomes_keep_the_lm_usage_of_a_dspy_answer() -> None:
    """Over a DSPy program the LM really answers (one request, usage kept) and the caller gets an empty answer."""
    lm = FaultInjectingLM()
    pipeline = Pipeline(dspy.Predict("question -> answer"), Chaos(outcome="empty"))
    with dspy.context(lm=lm, track_usage=True):
        prediction = await pipeline("q")
    assert prediction.answer == ""
    assert lm.requests == 1
    usage = prediction.get_lm_usage()["custom/fault/local"]
    assert usage["prompt_tokens"] == lm.journal[0].input_tokens


async def test_outcomes_of_plain_values() -> None:
    """Non-Prediction answers are corrupted by type: a string empties to '' and garbles to '<malformed>'."""

    async def text(question: str) -> str:
        return f"text for {question}"

    assert await Pipeline(text, Chaos(outcome="empty"))("q") == ""
    assert await Pipeline(text, Chaos(outcome="malformed"))("q") == "<malformed>"
    assert (await Pipeline(text, Chaos(outcome="wrong_fields"))("q")).toDict() == {"unexpected": "text for q"}

    async def mapping(question: str) -> dict[str, str]:
        return {"answer": question}

    assert await Pipeline(mapping, Chaos(outcome="empty"))("q") == {"answer": ""}


async def test_a_value_or_a_factory_replaces_the_call() -> None:
    """outcome=<value> or a factory (sync or async) answers instead of the program, which never runs."""
    program = Program()
    canned = dspy.Prediction(answer="canned")
    assert await Pipeline(program, Chaos(outcome=canned))("q") is canned

    async def later(call: Call) -> str:
        await asyncio.sleep(1)
        return f"async for {call.inputs['question']}"

    assert await Pipeline(program, Chaos(outcome=lambda call: f"for {call.inputs['question']}"))("q") == "for q"
    assert await Pipeline(program, Chaos(outcome=later))("q") == "async for q"
    assert program.calls == []


async def test_retry_on_result_recovers_from_injected_empty_answers() -> None:
    """Empty answers on the first two attempts are retried by retry_on_result until the real one comes back."""
    program = Program()
    pipeline = Pipeline(
        program,
        Retry(5, base_delay=0.01, retry_on_result=lambda p: not p.answer),
        Chaos(outcome="empty", enabled=lambda call: call.attempt <= 2),
    )
    outcome = await pipeline.invoke("q")
    assert outcome.value.answer == "answer to q"
    assert outcome.retries == 2 and len(program.calls) == 3


# ------------------------------------------------------------------------------------------------- 5. effects


async def test_an_effect_runs_before_the_program_sync_or_async() -> None:
    """effect= is called with the call (awaited when async), then the program runs normally."""
    program = Program()
    seen: list[str] = []

    async def slow_effect(call: Call) -> None:
        await asyncio.sleep(2)
        seen.append(f"async {call.inputs['question']}")

    assert await outcome_of(Pipeline(program, Chaos(effect=lambda call: seen.append("sync"))), "a") == "answer to a"
    start = now()
    assert await outcome_of(Pipeline(program, Chaos(effect=slow_effect)), "b") == "answer to b"
    assert now() - start == pytest.approx(2.0, abs=1e-6)
    assert seen == ["sync", "async b"]
    assert [call["question"] for call in program.calls] == ["a", "b"]


# ------------------------------------------------------------------------------------- 6. rates and randomness


async def count_injections(chaos: Chaos, calls: int, rng: random.Random | None = None) -> list[bool]:
    pipeline = Pipeline(Program(), chaos, rng=rng)
    return [isinstance(await outcome_of(pipeline), dspy.LMServerError) for _ in range(calls)]


async def test_the_rate_is_the_injection_probability() -> None:
    """rate=0.2 injects into about a fifth of 1000 calls; 0 never; 1 always."""
    assert 150 <= sum(await count_injections(Chaos(fault="server_error", rate=0.2, seed=5), 1000)) <= 250
    assert sum(await count_injections(Chaos(fault="server_error", rate=0.0), 50)) == 0
    assert sum(await count_injections(Chaos(fault="server_error", rate=1.0), 50)) == 50


async def test_seeded_injections_are_reproducible_from_either_random_source() -> None:
    """The same Chaos seed, or the same pipeline rng, gives the same injection pattern; another seed another."""
    by_seed = [await count_injections(Chaos(fault="server_error", rate=0.3, seed=s), 40) for s in (7, 7, 8)]
    assert by_seed[0] == by_seed[1] != by_seed[2]
    by_rng = [await count_injections(Chaos(fault="server_error", rate=0.3), 40, random.Random(s)) for s in (7, 7, 8)]
    assert by_rng[0] == by_rng[1] != by_rng[2]


async def test_an_own_seed_leaves_the_pipeline_rng_alone() -> None:
    """With seed=, Chaos draws from its own source: the pipeline's rng is not advanced by it."""
    rng = random.Random(1)
    state = rng.getstate()
    await count_injections(Chaos(fault="server_error", rate=0.5, seed=3), 10, rng)
    assert rng.getstate() == state


# -------------------------------------------------------------------------------------------------- 7. scripts


async def test_a_script_is_consumed_one_entry_per_call_then_passes_through() -> None:
    """Each call takes the next entry (None passes); after the script every call reaches the program."""
    program = Program()
    chaos = Chaos(script=["rate_limit", None, "server_error", "ok"])
    pipeline = Pipeline(program, chaos)
    results = [await outcome_of(pipeline) for _ in range(6)]
    assert [type(r).__name__ if isinstance(r, BaseException) else r for r in results] == [
        "LMRateLimitError",
        "answer to q",
        "LMServerError",
        "answer to q",
        "answer to q",
        "answer to q",
    ]
    assert chaos.pending == ()
    assert len(program.calls) == 4


async def test_a_script_comes_before_the_strategy_and_push_extends_it() -> None:
    """Scripted steps first, then the rate-driven strategy; push() appends validated steps."""
    chaos = Chaos(fault="timeout", script=["auth"])
    chaos.push(None, {"fault": "context_window"})
    assert chaos.pending == (FaultStep(Fault.AUTH), FaultStep(), FaultStep(Fault.CONTEXT_WINDOW))
    pipeline = Pipeline(Program(), chaos)
    kinds = [type(await outcome_of(pipeline)).__name__ for _ in range(4)]
    assert kinds == ["LMAuthError", "str", "ContextWindowExceededError", "LMTimeoutError"]


async def test_retry_walks_through_a_scripted_outage() -> None:
    """Three transient faults then success: Retry(4) answers after exactly four attempts at the Chaos layer."""
    events: list[Event] = []
    pipeline = Pipeline(
        Program(),
        Retry(4, base_delay=0.01),
        Chaos(script=["rate_limit", "server_error", "transport"]),
        listeners=[events.append],
    )
    outcome = await pipeline.invoke("q")
    assert outcome.retries == 3
    assert [e.fault for e in injected(events)] == [Fault.RATE_LIMIT, Fault.SERVER_ERROR, Fault.TRANSPORT]

    give_up = Pipeline(Program(), Retry(2, base_delay=0.01), Chaos(script=["server_error"] * 2))
    with pytest.raises(RetriesExhaustedError) as raised:
        await give_up("q")
    assert isinstance(raised.value.last_error, dspy.LMServerError)


# ------------------------------------------------------------------------------------------------ 8. switches


async def test_disabled_chaos_is_transparent_and_keeps_its_script() -> None:
    """enabled=False injects nothing and consumes nothing; switching it on at run time resumes the script."""
    events: list[Event] = []
    chaos = Chaos(script=["server_error"], enabled=False)
    pipeline = Pipeline(Program(), chaos, listeners=[events.append])
    assert await outcome_of(pipeline) == "answer to q"
    assert chaos.pending == (FaultStep(Fault.SERVER_ERROR),) and injected(events) == []
    chaos.enabled = True
    assert isinstance(await outcome_of(pipeline), dspy.LMServerError)
    chaos.enabled = False
    assert await outcome_of(Pipeline(Program(), Chaos(fault="auth", enabled=False))) == "answer to q"


async def test_a_predicate_decides_per_call() -> None:
    """enabled=<predicate> injects only where it says: here, first attempts fail and retries get through."""
    program = Program()
    pipeline = Pipeline(
        program,
        Retry(3, base_delay=0.01),
        Chaos(fault="server_error", enabled=lambda call: call.attempt == 1),
    )
    outcome = await pipeline.invoke("q")
    assert outcome.retries == 1 and len(program.calls) == 1


def test_a_bad_runtime_switch_is_a_configuration_error() -> None:
    """chaos.enabled = 'yes' is refused, naming Chaos.enabled; the old value stays."""
    chaos = Chaos(fault="server_error")
    with pytest.raises(ConfigurationError) as raised:
        chaos.enabled = "yes"  # type: ignore[assignment]
    assert [field for field, _ in raised.value.problems] == ["Chaos.enabled"]
    assert chaos.enabled is True


# --------------------------------------------------------------------------------------------------- 9. events


async def test_each_injection_emits_one_event() -> None:
    """ChaosInjected carries the layer name, kind, detail, fault and whether it was scripted; passes emit nothing."""
    events: list[Event] = []
    pipeline = Pipeline(
        Program(),
        Timeout(1.0),
        Chaos(fault="rate_limit", retry_after=1.0, rate=0.5, seed=2, script=[None, "hang"], name="flaky-llm"),
        listeners=[events.append],
    )
    results = [await outcome_of(pipeline) for _ in range(10)]
    chaos_events = injected(events)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert len(chaos_events) == len(failures)
    assert isinstance(failures[0], TimeoutExceededError)
    first = chaos_events[0]
    assert (first.layer, first.kind, first.detail, first.fault, first.scripted) == (
        "flaky-llm",
        "fault",
        "hang",
        Fault.HANG,
        True,
    )
    later = chaos_events[1:]
    assert later and all(
        (e.kind, e.detail, e.fault, e.scripted)
        == ("fault", "rate_limit: LMRateLimitError(status=429, retry_after=1)", Fault.RATE_LIMIT, False)
        for e in later
    )
    assert all(e.pipeline == "Program" for e in chaos_events)
    assert [e.time for e in chaos_events] == sorted(e.time for e in chaos_events)


async def test_without_listeners_injections_are_still_counted() -> None:
    """No listener, no event object; chaos.injected still counts what was injected."""
    chaos = Chaos(fault="server_error", rate=0.5, seed=1)
    results = await count_injections(chaos, 20)
    assert chaos.injected == sum(results) > 0


# ------------------------------------------------------------------------------------------ 10. placement


def test_chaos_above_a_cache_warns_and_below_does_not() -> None:
    """Chaos above Cache is a ResilienceWarning (it fails calls the cache would serve); below is the right place."""
    with pytest.warns(ResilienceWarning, match="above a Cache"):
        Pipeline(Program(), Chaos(fault="server_error"), Cache())
    Pipeline(Program(), Cache(), Chaos(fault="server_error"))


class OwnCache:
    """A layer of one's own that declares the cache role: Chaos reads the role, not the class."""

    placement = "cache"

    async def __call__(self, call: Call, next: Any) -> Any:
        return await next(call)


def test_chaos_above_any_layer_in_the_cache_role_warns() -> None:
    with pytest.warns(ResilienceWarning, match="above a Cache"):
        Pipeline(Program(), Chaos(fault="server_error"), Timeout(5), OwnCache())
    Pipeline(Program(), OwnCache(), Chaos(fault="server_error"))


def test_describe_shows_the_options_switch_and_pending_script() -> None:
    """describe() reports the layer, its switch, how many scripted steps remain and its options."""
    chaos = Chaos(latency=(0.1, 0.2), rate=0.25, script=["rate_limit"], retry_after=1, name="slow")
    (described, _) = Pipeline(Program(), chaos).describe()
    assert described["layer"] == "Chaos" and described["enabled"] is True and described["pending"] == 1
    options = described["options"]
    assert (options["latency"], options["rate"], options["retry_after"], options["name"]) == (
        (0.1, 0.2),
        0.25,
        (1.0, 1.0),
        "slow",
    )
    assert described["name"] == "slow" and Chaos(fault="timeout").describe()["name"] == "Chaos"
    chaos.enabled = lambda call: True
    assert chaos.describe()["enabled"] == "predicate"


async def test_the_snapshot_shows_the_switch_the_script_left_and_the_injections() -> None:
    chaos = Chaos(script=["rate_limit", None, "auth"])
    assert chaos.snapshot() == ChaosSnapshot(enabled=True, pending=chaos.pending, injected=0)
    pipeline = Pipeline(Program(), chaos)
    await outcome_of(pipeline)
    await outcome_of(pipeline)
    assert chaos.snapshot() == ChaosSnapshot(enabled=True, pending=(FaultStep(Fault.AUTH),), injected=1)
    chaos.enabled = lambda call: False
    assert chaos.snapshot().enabled == "predicate"


async def test_health_is_degraded_while_chaos_can_inject_and_ok_when_off_or_spent() -> None:
    chaos = Chaos(script=["server_error"], name="faults")
    pipeline = Pipeline(Program(), chaos)
    (report,) = pipeline.health().layers
    assert (report.layer, report.status, report.details) == (
        "faults",
        "degraded",
        {"enabled": True, "pending": 1, "injected": 0},
    )
    await outcome_of(pipeline)
    assert chaos.health().status == "ok"  # the script is spent and there is no strategy
    assert Chaos(fault="timeout", rate=0.0).health().status == "ok"
    assert Chaos(fault="timeout", enabled=False).health().status == "ok"
    assert Chaos(fault="timeout", enabled=lambda call: False).health().status == "degraded"  # decided per call


# ---------------------------------------------------------------------------------------- 11. bad options


class NeedsArguments(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)


@pytest.mark.parametrize(
    ("options", "field", "rule"),
    [
        ({"fault": "server_error", "rate": 1.5}, "Chaos.rate", "less than or equal to 1"),
        ({"fault": "server_error", "rate": -0.1}, "Chaos.rate", "greater than or equal to 0"),
        ({"fault": "explode"}, "Chaos.fault", "unknown fault 'explode'"),
        ({"fault": "ok"}, "Chaos.fault", "injects nothing"),
        ({"fault": asyncio.CancelledError}, "Chaos.fault", "must be an Exception, not CancelledError"),
        ({"fault": KeyboardInterrupt()}, "Chaos.fault", "must be an Exception, not KeyboardInterrupt"),
        ({"fault": NeedsArguments}, "Chaos.fault", "needs arguments"),
        ({"fault": 42}, "Chaos.fault", "must be a fault kind"),
        ({"script": ["rate_limit", "explode"]}, "Chaos.script", "unknown fault(s) ['explode']"),
        ({"script": [FaultStep(), {"fault": "auth", "status": 503}]}, "Chaos.script", "script[1].status"),
        ({"script": "rate_limit"}, "Chaos.script", "must be a sequence"),
        ({"latency": -1}, "Chaos.latency", "seconds >= 0"),
        ({"latency": (2, 1)}, "Chaos.latency", "low <= high"),
        ({"outcome": "emtpy"}, "Chaos.outcome", "unknown outcome 'emtpy'"),
        ({"fault": "server_error", "enabled": "yes"}, "Chaos.enabled", "bool or a predicate"),
        ({"fault": "server_error", "latency": 1.0}, "Chaos.latency", "one strategy per Chaos (fault= is given too)"),
        ({}, "Chaos.fault", "give a strategy"),
        ({"script": ["server_error"], "rate": 0.5}, "Chaos.rate", "a script is exact"),
        ({"fault": "server_error", "retry_after": 1}, "Chaos.retry_after", "only to the rate_limit fault"),
    ],
)
def test_bad_options_name_the_field_and_the_rule(options: dict[str, Any], field: str, rule: str) -> None:
    """Each bad setting is a ConfigurationError at build time naming the field and the rule broken."""
    with pytest.raises(ConfigurationError) as raised:
        Chaos(**options)
    assert [name for name, _ in raised.value.problems] == [field]
    assert rule in raised.value.problems[0][1]


def test_several_bad_options_are_reported_at_once() -> None:
    """One ConfigurationError lists every bad field."""
    with pytest.raises(ConfigurationError) as raised:
        Chaos(fault="explode", rate=2, script=["bad"], latency=-1)  # type: ignore[arg-type]
    assert sorted(name for name, _ in raised.value.problems) == [
        "Chaos.fault",
        "Chaos.latency",
        "Chaos.rate",
        "Chaos.script",
    ]


def test_pushing_an_unknown_kind_adds_nothing() -> None:
    """push() validates all entries before adding any."""
    chaos = Chaos(script=["auth"])
    with pytest.raises(ConfigurationError) as raised:
        chaos.push("server_error", "explode")
    assert raised.value.problems[0][0] == "Chaos.push"
    assert chaos.pending == (FaultStep(Fault.AUTH),)


async def test_many_concurrent_calls_each_get_exactly_one_script_entry() -> None:
    """Under concurrency each scripted step is used by exactly one call: no step is lost or doubled."""
    script = ["server_error", "auth", None, "timeout"] * 5
    pipeline = Pipeline(Program(), Chaos(script=script))
    results = await asyncio.gather(*(outcome_of(pipeline, f"q{i}") for i in range(len(script) + 5)))
    kinds = Counter(type(r).__name__ for r in results)
    assert kinds == Counter({"LMServerError": 5, "LMAuthError": 5, "LMTimeoutError": 5, "str": 10})
