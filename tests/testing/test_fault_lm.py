"""FaultInjectingLM: adapter-valid deterministic answers, scripted and seeded faults mapped to DSPy errors, latency."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter
from typing import Literal

import dspy
import pytest
from pydantic import BaseModel, ValidationError

from resilient_dspy.core.options import build_options
from resilient_dspy.errors import ConfigurationError
from resilient_dspy.faults import parse_steps
from resilient_dspy.testing import Fault, FaultInjectingLM, FaultProfile, FaultStep, fault_error
from resilient_dspy.testing.fault_lm import render_answer
from tests.conftest import other_tasks

TYPED = "question -> count: int, score: float, flag: bool, tags: list[str]"


def digest(question: str) -> int:
    return int(hashlib.sha256(question.encode()).hexdigest()[:8], 16)


def now() -> float:
    return asyncio.get_running_loop().time()


async def request(lm: FaultInjectingLM, prompt: str = "ping") -> Fault | str:
    """One raw LM request: the answer text, or the fault whose DSPy error it raised."""
    try:
        (text,) = await lm.acall(prompt=prompt)
    except dspy.LMError:
        return lm.journal[-1].fault
    return str(text)


# --- answers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", [dspy.ChatAdapter(), dspy.JSONAdapter()], ids=["chat", "json"])
async def test_typed_output_fields_parse_under_each_adapter(adapter: dspy.Adapter) -> None:
    """int/float/bool/list outputs parse under Chat and JSON adapters, with values derived from the question."""
    lm = FaultInjectingLM()
    question = "How many moons?"
    with dspy.context(lm=lm, adapter=adapter):
        prediction = await dspy.Predict(TYPED).acall(question=question)
    d = digest(question)
    assert prediction.count == d % 100 and type(prediction.count) is int
    assert prediction.score == round((d % 1000) / 1000, 3) and type(prediction.score) is float
    assert prediction.flag is bool(d % 2)
    assert prediction.tags == [f"item {d % 7}"]
    assert [(e.fault, e.question) for e in lm.journal] == [(Fault.OK, question)]


@pytest.mark.parametrize("adapter", [dspy.ChatAdapter(), dspy.JSONAdapter()], ids=["chat", "json"])
async def test_chain_of_thought_answers_under_each_adapter(adapter: dspy.Adapter) -> None:
    """ChainOfThought gets a reasoning and an answer in the adapter's format, with one request."""
    lm = FaultInjectingLM(answers={"Why is the sky blue?": "Rayleigh scattering."})
    with dspy.context(lm=lm, adapter=adapter):
        prediction = await dspy.ChainOfThought("question -> answer").acall(question="Why is the sky blue?")
    assert prediction.answer == "Rayleigh scattering."
    assert prediction.reasoning == "Recall what is known about: Why is the sky blue?. Then answer briefly."
    assert lm.requests == 1


async def test_answers_are_deterministic_per_question() -> None:
    """The same question gets the same answer from any instance; different questions differ."""
    first, second = FaultInjectingLM(seed=1), FaultInjectingLM(seed=2)
    with dspy.context(lm=first):
        a1 = await dspy.Predict("question -> answer").acall(question="Same?")
        b1 = await dspy.Predict("question -> answer").acall(question="Different?")
    with dspy.context(lm=second):
        a2 = await dspy.Predict("question -> answer").acall(question="Same?")
    assert a1.answer == a2.answer == f"A local answer #{digest('Same?') % 10_000} to: Same?"
    assert b1.answer != a1.answer


async def test_answers_from_a_mapping_or_a_function() -> None:
    """answers= may map questions to answers (others get the default) or be a function of the question."""
    mapped = FaultInjectingLM(answers={"Known?": "Yes."})
    computed = FaultInjectingLM(answers=lambda question: question[::-1])
    predict = dspy.Predict("question -> answer")
    with dspy.context(lm=mapped):
        assert (await predict.acall(question="Known?")).answer == "Yes."
        assert (await predict.acall(question="Unknown?")).answer.startswith("A local answer #")
    with dspy.context(lm=computed):
        assert (await predict.acall(question="abc")).answer == "cba"


async def test_answers_report_usage_and_journal_tokens() -> None:
    """Answered requests report token usage (also in the journal); failed ones journal zero tokens."""
    lm = FaultInjectingLM(script=["server_error"])
    assert await request(lm) == Fault.SERVER_ERROR
    with dspy.context(lm=lm, track_usage=True):
        prediction = await dspy.Predict("question -> answer").acall(question="Tokens?")
    failed, answered = lm.journal
    assert (failed.input_tokens, failed.output_tokens) == (0, 0)
    usage = prediction.get_lm_usage()["custom/fault/local"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (answered.input_tokens, answered.output_tokens)
    assert answered.input_tokens > 0 and answered.output_tokens > 0


# --- faults --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "error", "status"),
    [
        ("rate_limit", dspy.LMRateLimitError, 429),
        ("server_error", dspy.LMServerError, 503),
        ("timeout", dspy.LMTimeoutError, 504),
        ("transport", dspy.LMTransportError, None),
        ("context_window", dspy.ContextWindowExceededError, 400),
        ("auth", dspy.LMAuthError, 401),
    ],
)
async def test_each_fault_surfaces_as_its_dspy_error(kind: str, error: type[Exception], status: int | None) -> None:
    """A scripted fault reaches the caller as DSPy's own error class with the HTTP-like status."""
    lm = FaultInjectingLM(script=[kind])
    with dspy.context(lm=lm), pytest.raises(error) as raised:
        await dspy.Predict("question -> answer").acall(question="Fail?")
    assert getattr(raised.value, "status", None) == status
    assert [(e.fault, e.question) for e in lm.journal] == [(Fault(kind), "Fail?")]
    assert lm.faults == Counter({Fault(kind): 1})


async def test_malformed_answer_is_a_parse_error_under_the_json_adapter() -> None:
    """A malformed reply fails to parse (AdapterParseError) and is journalled as MALFORMED."""
    lm = FaultInjectingLM(script=["malformed"])
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()), pytest.raises(dspy.AdapterParseError):
        await dspy.Predict("question -> answer").acall(question="Format?")
    assert [e.fault for e in lm.journal] == [Fault.MALFORMED]


async def test_hang_waits_until_cancelled() -> None:
    """A hang never answers: it is journalled, waits until cancelled, and leaves nothing in flight."""
    lm = FaultInjectingLM(script=["hang"])
    start = now()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(lm.acall(prompt="Anyone there?"), timeout=3600)
    assert now() - start == pytest.approx(3600, abs=1e-3)
    assert [e.fault for e in lm.journal] == [Fault.HANG]
    assert lm.core.in_flight == 0
    assert not other_tasks()


async def test_script_then_push_are_consumed_in_order_before_the_profile() -> None:
    """Scripted faults come first, pushed ones next, then the (fault-free) profile answers."""
    lm = FaultInjectingLM(script=["server_error", Fault.TRANSPORT])
    lm.push("rate_limit", Fault.OK, "auth")
    results = [await request(lm) for _ in range(6)]
    assert results[:3] == [Fault.SERVER_ERROR, Fault.TRANSPORT, Fault.RATE_LIMIT]
    assert results[4] == Fault.AUTH
    assert isinstance(results[3], str) and isinstance(results[5], str)
    assert [e.fault for e in lm.journal] == [
        Fault.SERVER_ERROR,
        Fault.TRANSPORT,
        Fault.RATE_LIMIT,
        Fault.OK,
        Fault.AUTH,
        Fault.OK,
    ]
    assert lm.requests == 6
    assert lm.faults == Counter(
        {Fault.OK: 2, Fault.SERVER_ERROR: 1, Fault.TRANSPORT: 1, Fault.RATE_LIMIT: 1, Fault.AUTH: 1}
    )


MIXED = FaultProfile(rate_limit=0.2, server_error=0.2, timeout=0.1, transport=0.1, context_window=0.1)


async def fault_sequence(seed: int, n: int = 40) -> list[Fault]:
    lm = FaultInjectingLM(profile=MIXED, seed=seed)
    for _ in range(n):
        await request(lm)
    assert sum(lm.faults.values()) == n
    return [e.fault for e in lm.journal]


async def test_seeded_profile_reproduces_the_same_fault_sequence() -> None:
    """The same seed gives the same fault sequence; another seed gives another; all kinds come from the profile."""
    first, second, other = await fault_sequence(11), await fault_sequence(11), await fault_sequence(12)
    assert first == second
    assert other != first
    assert set(first) <= {Fault.OK, *MIXED.rates()}
    assert len(set(first)) >= 3


async def test_rate_limits_carry_retry_after_within_the_profile_range() -> None:
    """Rate limits surface as dspy.LMRateLimitError with retry_after drawn from the profile range (3 decimals)."""
    lm = FaultInjectingLM(profile=FaultProfile(rate_limit=1.0, retry_after=(0.5, 2.0)), seed=3)
    seen: list[float] = []
    for _ in range(20):
        with pytest.raises(dspy.LMRateLimitError) as raised:
            await lm.acall(prompt="again")
        assert raised.value.status == 429
        retry_after = raised.value.retry_after
        assert retry_after is not None and 0.5 <= retry_after <= 2.0
        assert retry_after == round(retry_after, 3)
        seen.append(retry_after)
    assert len(set(seen)) > 1


async def test_rate_limit_without_retry_after() -> None:
    """With retry_after=None in the profile, a rate limit carries no retry_after."""
    lm = FaultInjectingLM(script=["rate_limit"], profile=FaultProfile(retry_after=None))
    with pytest.raises(dspy.LMRateLimitError) as raised:
        await lm.acall(prompt="again")
    assert raised.value.retry_after is None


@pytest.mark.parametrize("kind", ["server_error", "timeout", "transport", "context_window", "auth"])
async def test_only_rate_limits_carry_retry_after(kind: str) -> None:
    """Faults other than rate limits carry no retry_after."""
    lm = FaultInjectingLM(script=[kind])
    with pytest.raises(dspy.LMError) as raised:
        await lm.acall(prompt="again")
    assert raised.value.retry_after is None


async def test_latency_advances_loop_time() -> None:
    """An answer takes the profile's latency in loop time; concurrent requests overlap rather than queue."""
    lm = FaultInjectingLM(profile=FaultProfile(latency=(1.5, 1.5)))
    start = now()
    await lm.acall(prompt="slow")
    assert now() - start == pytest.approx(1.5, abs=1e-6)
    assert lm.journal[0].time == pytest.approx(start + 1.5, abs=1e-6)

    start = now()
    await asyncio.gather(*(lm.acall(prompt=f"slow {i}") for i in range(5)))
    assert now() - start == pytest.approx(1.5, abs=1e-6)
    assert lm.core.max_in_flight == 5 and lm.core.in_flight == 0


async def test_latency_range_is_seeded() -> None:
    """Latencies drawn from a range are reproducible for a seed and stay within the range."""

    async def latencies(seed: int) -> list[float]:
        lm = FaultInjectingLM(profile=FaultProfile(latency=(0.1, 0.9)), seed=seed)
        out = []
        for _ in range(5):
            start = now()
            await lm.acall(prompt="tick")
            out.append(now() - start)
        return out

    first, second = await latencies(4), await latencies(4)
    assert first == pytest.approx(second, abs=1e-9)
    assert all(0.1 - 1e-9 <= t <= 0.9 + 1e-9 for t in first)


# --- configuration -------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", [["ok", "explode"], ["OK"], ["rate-limit"]])
def test_unknown_script_kind_is_a_configuration_error(script: list[str]) -> None:
    """An unknown fault in the script is a ConfigurationError naming FaultInjectingLM.script and the kinds known."""
    with pytest.raises(ConfigurationError) as raised:
        FaultInjectingLM(script=script)
    ((name, rule),) = raised.value.problems
    assert name == "FaultInjectingLM.script"
    assert f"unknown fault(s) {[k for k in script if k != 'ok']}" in rule
    assert all(kind.value in rule.partition("known:")[2] for kind in Fault)


def test_pushing_an_unknown_kind_is_a_configuration_error_and_appends_nothing() -> None:
    """push() validates every kind first: an unknown one is a ConfigurationError and nothing is appended."""
    lm = FaultInjectingLM(script=["ok"])
    with pytest.raises(ConfigurationError) as raised:
        lm.push("server_error", "explode")
    ((name, rule),) = raised.value.problems
    assert name == "FaultInjectingLM.push"
    assert "['explode']" in rule
    assert lm.pending == (FaultStep(Fault.OK),)


def test_profile_rates_summing_over_one_raise_validation_error() -> None:
    """FaultProfile(...) with rates summing over 1 raises pydantic's ValidationError (a ValueError) at once."""
    with pytest.raises(ValidationError, match=r"fault probabilities must sum to at most 1 \(got 1\.2\)") as raised:
        FaultProfile(rate_limit=0.6, server_error=0.6)
    assert isinstance(raised.value, ValueError)
    assert not isinstance(raised.value, ConfigurationError)


def test_profile_built_through_options_is_a_configuration_error() -> None:
    """Built the library's way (build_options), the same profile is a ConfigurationError naming FaultProfile."""
    with pytest.raises(ConfigurationError) as raised:
        build_options(FaultProfile, "FaultProfile", {"rate_limit": 0.6, "server_error": 0.6})
    ((name, rule),) = raised.value.problems
    assert name == "FaultProfile.options"
    assert "sum to at most 1" in rule


@pytest.mark.parametrize(
    "values",
    [{"latency": (2.0, 1.0)}, {"retry_after": (-1.0, 1.0)}, {"rate_limit": 1.5}, {"hang": -0.1}, {"ratelimit": 0.1}],
)
def test_invalid_profile_values_are_rejected(values: dict[str, object]) -> None:
    """Inverted or negative ranges, out-of-range rates and unknown fields are rejected."""
    with pytest.raises(ValidationError):
        FaultProfile(**values)


def test_defaults_are_safe_for_a_pipeline() -> None:
    """The LM defaults to num_retries=0 and no cache, and its default profile injects no faults."""
    lm = FaultInjectingLM()
    assert lm.num_retries == 0
    assert lm.cache is False
    assert sum(lm.core.profile.rates().values()) == 0


# --- growth: rich signatures, per-step overrides, the shared vocabulary ---------------------------------


class Person(BaseModel):
    name: str
    age: int


class Rich(dspy.Signature):
    """Describe someone."""

    question: str = dspy.InputField()
    context: str = dspy.InputField()
    label: Literal["positive", "negative", "neutral"] = dspy.OutputField()
    maybe: int | None = dspy.OutputField()
    counts: dict[str, int] = dspy.OutputField()
    person: Person = dspy.OutputField()
    numbers: list[int] = dspy.OutputField()


@pytest.mark.parametrize("adapter", [dspy.ChatAdapter(), dspy.JSONAdapter()], ids=["chat", "json"])
async def test_literal_optional_dict_model_and_list_outputs_parse_under_each_adapter(adapter: dspy.Adapter) -> None:
    """Answers follow each field's schema from the prompt: a valid Literal choice, ints, a dict, a model, a list."""
    lm = FaultInjectingLM()
    question = "Who is Ada?"
    with dspy.context(lm=lm, adapter=adapter):
        prediction = await dspy.Predict(Rich).acall(question=question, context="math")
    d = digest(question)
    assert prediction.label == ["positive", "negative", "neutral"][d % 3]
    assert prediction.maybe == d % 100
    assert prediction.counts == {"key": d % 100}
    assert prediction.person == Person(name=f"item {d % 7}", age=d % 100)
    assert prediction.numbers == [d % 100]
    assert lm.requests == 1
    assert lm.journal[0].adapter == ("json" if isinstance(adapter, dspy.JSONAdapter) else "chat")


def test_render_answer_follows_a_response_format_schema() -> None:
    """With a JSON schema (as sent in response_format) the answer is JSON: a value per property, $refs resolved."""
    schema = {
        "type": "object",
        "properties": {
            "answer": {"type": "string"},
            "score": {"type": "number"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "owner": {"$ref": "#/$defs/Owner"},
            "mood": {"enum": ["calm", "angry"]},
        },
        "$defs": {"Owner": {"type": "object", "properties": {"id": {"type": "integer"}}}},
    }
    rendered = render_answer("no instructions", "[[ ## question ## ]]\nWhy?", schema=schema, json_mode=True)
    d = digest("Why?")
    assert rendered.adapter == "json" and rendered.question == "Why?"
    assert json.loads(rendered.text) == {
        "answer": f"A local answer #{d % 10_000} to: Why?",
        "score": round((d % 1000) / 1000, 3),
        "tags": [f"item {d % 7}"],
        "owner": {"id": d % 100},
        "mood": ["calm", "angry"][d % 2],
    }
    malformed = render_answer("[[ ## completed ## ]]", "Why?", malformed=True)
    assert "[[ ##" not in malformed.text and malformed.adapter == "chat"


async def test_a_script_step_overrides_latency_retry_after_and_status() -> None:
    """FaultSteps give one request its own latency, Retry-After or 5xx status; None and mappings are steps too."""
    lm = FaultInjectingLM(
        script=[
            FaultStep("rate_limit", retry_after=7.0),
            {"fault": "server_error", "status": 502, "latency": 2.0},
            None,
            FaultStep(latency=0.5),
        ]
    )
    with pytest.raises(dspy.LMRateLimitError) as limited:
        await lm.acall(prompt="a")
    assert limited.value.retry_after == 7.0
    start = now()
    with pytest.raises(dspy.LMServerError) as server:
        await lm.acall(prompt="b")
    assert server.value.status == 502
    assert now() - start == pytest.approx(2.0, abs=1e-6)
    await lm.acall(prompt="c")
    start = now()
    await lm.acall(prompt="d")
    assert now() - start == pytest.approx(0.5, abs=1e-6)
    assert [(e.fault, e.status, e.retry_after, e.latency) for e in lm.journal] == [
        (Fault.RATE_LIMIT, 429, 7.0, 0.0),
        (Fault.SERVER_ERROR, 502, None, 2.0),
        (Fault.OK, None, None, 0.0),
        (Fault.OK, None, None, 0.5),
    ]
    assert lm.pending == ()


async def test_invalid_json_is_a_provider_error_with_status_200() -> None:
    """invalid_json surfaces as DSPy's LMProviderError with status 200, as for a real HTTP reply that is not JSON."""
    lm = FaultInjectingLM(script=["invalid_json"])
    with pytest.raises(dspy.LMProviderError) as raised:
        await lm.acall(prompt="x")
    assert type(raised.value) is dspy.LMProviderError and raised.value.status == 200


async def test_a_request_cancelled_during_its_latency_is_journalled() -> None:
    """A caller that gives up during the latency still shows in the journal (and in requests), marked cancelled."""
    lm = FaultInjectingLM(profile=FaultProfile(latency=(5.0, 5.0)))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(lm.acall(prompt="slow"), timeout=1.0)
    assert lm.requests == 1
    (entry,) = lm.journal
    assert (entry.fault, entry.detail, entry.output_tokens) == (Fault.OK, "cancelled by the caller", 0)
    assert lm.core.in_flight == 0 and not other_tasks()


@pytest.mark.parametrize(
    ("entry", "field", "rule"),
    [
        (FaultStep, "FaultStep.fault", "unknown fault 'explode'"),
        ({"fault": "server_error", "status": 404}, "script[0].status", "from 500 to 599"),
        ({"fault": "timeout", "status": 504}, "script[0].status", "only a server_error"),
        ({"fault": "server_error", "retry_after": 1}, "script[0].retry_after", "only a rate_limit"),
        ({"fault": "ok", "latency": -1}, "script[0].latency", "finite number of seconds >= 0"),
        ({"fault": "ok", "delay": 1}, "script[0]", "unknown key(s) ['delay']"),
        (3.5, "script[0]", "must be a fault name, None, a FaultStep or a mapping"),
    ],
)
def test_bad_steps_name_where_and_why(entry: object, field: str, rule: str) -> None:
    """An invalid step is a ConfigurationError naming its index and key (or FaultStep's field)."""
    with pytest.raises(ConfigurationError) as raised:
        if entry is FaultStep:
            FaultStep("explode")  # type: ignore[arg-type]
        else:
            parse_steps([entry], "script")  # type: ignore[list-item]
    ((name, message),) = raised.value.problems
    assert name == field and rule in message


def test_fault_error_is_none_for_faults_that_raise_nothing() -> None:
    """ok answers and hang never ends: neither has an error."""
    assert fault_error("ok") is None and fault_error(Fault.HANG) is None
    error = fault_error("rate_limit", retry_after=1.5, model="m")
    assert isinstance(error, dspy.LMRateLimitError)
    assert (error.status, error.retry_after, error.model) == (429, 1.5, "m")


# --- sync code and worker threads --------------------------------------------------------------------------


def test_sync_calls_without_an_event_loop_answer_fail_and_journal() -> None:
    """Called from plain sync code (no event loop anywhere), the sync engine answers, injects faults and journals."""
    lm = FaultInjectingLM(script=["server_error"], answers={"Why?": "Because."})
    with dspy.context(lm=lm), pytest.raises(dspy.LMServerError):
        dspy.Predict("question -> answer")(question="Why?")
    with dspy.context(lm=lm):
        assert dspy.Predict("question -> answer")(question="Why?").answer == "Because."
    assert [entry.fault for entry in lm.journal] == [Fault.SERVER_ERROR, Fault.OK]


@pytest.mark.looptime(False)  # a real worker thread: virtual time would not wait for it
async def test_calls_from_a_worker_thread_answer_and_journal() -> None:
    """A sync DSPy call made in a worker thread (dspy.asyncify, a forward-only module) reaches the sync engine."""
    lm = FaultInjectingLM(answers={"Why?": "Because."})
    with dspy.context(lm=lm):
        prediction = await dspy.asyncify(dspy.Predict("question -> answer"))(question="Why?")
    assert prediction.answer == "Because."
    assert [(entry.fault, entry.question) for entry in lm.journal] == [(Fault.OK, "Why?")]


def test_a_tail_slows_its_share_of_requests_by_its_factor_and_leaves_untailed_seeds_as_they_were() -> None:
    from resilient_dspy.testing.fault_lm.schedule import FaultSchedule

    plain = FaultSchedule(FaultProfile(latency=(1.0, 2.0)), seed=3)
    again = FaultSchedule(FaultProfile(latency=(1.0, 2.0), tail=0.0), seed=3)
    assert [plain.draw().latency for _ in range(50)] == [again.draw().latency for _ in range(50)]
    tailed = FaultSchedule(FaultProfile(latency=(1.0, 2.0), tail=0.1, tail_factor=10.0), seed=3)
    latencies = [tailed.draw().latency for _ in range(2000)]
    slow = [latency for latency in latencies if latency > 2.0]
    assert all(10.0 <= latency <= 20.0 for latency in slow)
    assert 150 <= len(slow) <= 250
    assert all(entry.fault is Fault.OK for entry in [tailed.draw() for _ in range(100)])


@pytest.mark.parametrize("bad", [{"tail": 1.5}, {"tail": -0.1}, {"tail_factor": 0.5}])
def test_a_bad_tail_is_a_configuration_error_naming_it(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError) as caught:
        build_options(FaultProfile, "FaultProfile", bad)
    assert {name for name, _ in caught.value.problems} == {f"FaultProfile.{next(iter(bad))}"}
