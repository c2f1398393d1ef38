"""Retry after a bad answer changes the request (rollout_id, temperature, adapter), and answers cut at max_tokens.

On the fault LM, whose journal records each request's temperature and max_tokens as a provider receives them; the
rollout_id never reaches a provider (DSPy strips it), so a DSPy callback reads it off the LM each request is sent by.
"""

from __future__ import annotations

import uuid
from typing import Any

import dspy
import pytest
from dspy.utils.callback import BaseCallback

from resilient_dspy import Pipeline, Retry
from resilient_dspy.errors import ConfigurationError, ErrorKind, TruncatedOutputError, classify
from resilient_dspy.events import Event, RetryScheduled
from resilient_dspy.testing import ChaosServer, FaultInjectingLM
from tests.conftest import other_tasks


class SeenByLM(BaseCallback):
    """Each LM request's rollout_id and temperature, read off the LM instance that sends it."""

    def __init__(self) -> None:
        self.requests: list[tuple[Any, Any]] = []

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self.requests.append((instance.kwargs.get("rollout_id"), instance.kwargs.get("temperature")))


def retry(attempts: int = 3, **options: Any) -> Retry:
    return Retry(attempts, base_delay=0.0, jitter="none", **options)


def question() -> str:
    return f"q {uuid.uuid4()}"


# ------------------------------------------------------------------------------------- 1. parse errors resample


async def test_a_parse_retry_sends_a_fresh_rollout_id_at_a_higher_temperature() -> None:
    lm = FaultInjectingLM(script=["malformed", "malformed"], temperature=0.0, cache=True)
    seen = SeenByLM()
    with dspy.context(lm=lm, callbacks=[seen]):
        outcome = await Pipeline(dspy.Predict("question -> answer"), retry()).invoke(question=question())

    assert outcome.attempts == 2 and outcome.value.answer.startswith("A local answer")
    assert [entry.temperature for entry in lm.journal] == [0.0, 0.0, 0.7]  # chat, its JSON fallback, the retry
    (first, _), (_, _), (retried, temperature) = seen.requests
    assert first is None and isinstance(retried, int) and temperature == 0.7


async def test_the_temperature_steps_up_to_its_cap() -> None:
    lm = FaultInjectingLM(script=["malformed"] * 6, temperature=0.0)
    with dspy.context(lm=lm):
        await Pipeline(dspy.Predict("question -> answer"), retry(4, temperature_step=0.4, max_temperature=1.0))(
            question=question()
        )
    assert [entry.temperature for entry in lm.journal] == [0.0, 0.0, 0.4, 0.4, 0.8, 0.8, 1.0]


async def test_each_retry_has_its_own_rollout_id_drawn_from_the_pipeline_rng() -> None:
    async def rollouts(seed: int) -> list[Any]:
        seen = SeenByLM()
        lm = FaultInjectingLM(script=["malformed"] * 4, temperature=0.0)
        with dspy.context(lm=lm, callbacks=[seen]):
            pipeline = Pipeline(dspy.Predict("question -> answer"), retry(3), rng=__import__("random").Random(seed))
            await pipeline(question="same question")
        return [rollout for rollout, _ in seen.requests]

    first = await rollouts(1)
    assert first[0] is None and len({first[2], first[4]}) == 2  # chat and JSON of an attempt share it
    assert first == await rollouts(1)


async def test_an_lm_without_a_temperature_keeps_the_providers_default() -> None:
    lm = FaultInjectingLM(script=["malformed", "malformed"])
    with dspy.context(lm=lm):
        await Pipeline(dspy.Predict("question -> answer"), retry())(question=question())
    assert [entry.temperature for entry in lm.journal] == [None, None, None]


async def test_a_predictors_own_lm_is_resampled() -> None:
    lm = FaultInjectingLM(script=["malformed", "malformed"], temperature=0.0, cache=True)
    predict = dspy.Predict("question -> answer")
    predict.lm = lm
    outcome = await Pipeline(predict, retry()).invoke(question=question())
    assert outcome.attempts == 2
    assert [entry.temperature for entry in lm.journal] == [0.0, 0.0, 0.7]


async def test_resample_off_re_asks_the_same_request_uncached() -> None:
    lm = FaultInjectingLM(script=["malformed", "malformed"], temperature=0.0, cache=True)
    seen = SeenByLM()
    with dspy.context(lm=lm, callbacks=[seen]):
        outcome = await Pipeline(dspy.Predict("question -> answer"), retry(resample=False)).invoke(question=question())
    assert outcome.attempts == 2 and lm.requests == 3
    assert [entry.temperature for entry in lm.journal] == [0.0, 0.0, 0.0]
    assert {rollout for rollout, _ in seen.requests} == {None}


async def test_switch_adapter_asks_the_json_adapter_first_on_the_retry() -> None:
    lm = FaultInjectingLM(script=["malformed", "malformed"], temperature=0.0)
    with dspy.context(lm=lm):
        await Pipeline(dspy.Predict("question -> answer"), retry(switch_adapter=True))(question=question())
    assert [entry.adapter for entry in lm.journal] == ["chat", "json", "json"]


async def test_an_invalid_output_resamples_too() -> None:
    from resilient_dspy import Guard

    lm = FaultInjectingLM(temperature=0.0)
    answers = iter([False, True])
    pipeline = Pipeline(dspy.Predict("question -> answer"), retry(), Guard(output=lambda prediction: next(answers)))
    with dspy.context(lm=lm):
        await pipeline(question=question())
    assert [entry.temperature for entry in lm.journal] == [0.0, 0.7]


async def test_a_later_call_is_asked_as_written_again() -> None:
    lm = FaultInjectingLM(script=["malformed", "malformed"], temperature=0.0)
    pipeline = Pipeline(dspy.Predict("question -> answer"), retry())
    with dspy.context(lm=lm):
        await pipeline(question=question())
        await pipeline(question=question())
    assert [entry.temperature for entry in lm.journal] == [0.0, 0.0, 0.7, 0.0]
    assert not other_tasks()


async def test_a_bare_lm_target_is_resampled_through_its_call_kwargs() -> None:
    calls: list[dict[str, Any]] = []

    class Picky(dspy.BaseLM):  # type: ignore[misc]
        async def acall(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> list[str]:
            calls.append(kwargs)
            if len(calls) == 1:
                raise dspy.AdapterParseError("ChatAdapter", dspy.Signature("q -> a"), "bad")
            return ["ok"]

    lm = Picky("picky/model", temperature=0.0, num_retries=0)
    assert await Pipeline(lm, retry())(prompt="hi") == ["ok"]
    assert calls[0] == {} and calls[1]["temperature"] == 0.7 and isinstance(calls[1]["rollout_id"], int)


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature_step", -0.1), ("max_temperature", 3.0), ("max_tokens_factor", 1.0), ("max_tokens_cap", 0)],
)
def test_bad_resample_options_name_their_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=f"Retry.{field}"):
        Retry(**{field: value})


# ------------------------------------------------------------------------------------ 2. answers cut at max_tokens


async def test_a_cut_answer_that_does_not_parse_is_a_truncated_output_error() -> None:
    lm = FaultInjectingLM(script=["truncated", "truncated"], max_tokens=64)
    with dspy.context(lm=lm), pytest.raises(TruncatedOutputError) as caught:
        await Pipeline(dspy.Predict("question -> answer"))(question=question())
    assert caught.value.max_tokens == 64
    assert "max_tokens=64" in str(caught.value)
    assert isinstance(caught.value.__cause__, dspy.AdapterParseError)
    info = classify(caught.value)
    assert (info.kind, info.retryable) == (ErrorKind.TRUNCATED, True)


async def test_a_plain_malformed_answer_stays_a_parse_error() -> None:
    lm = FaultInjectingLM(script=["malformed", "malformed"], max_tokens=64)
    with dspy.context(lm=lm), pytest.raises(dspy.AdapterParseError):
        await Pipeline(dspy.Predict("question -> answer"))(question=question())


async def test_retry_doubles_max_tokens_for_a_cut_answer() -> None:
    lm = FaultInjectingLM(script=["truncated", "truncated"], max_tokens=100, temperature=0.0)
    events: list[Event] = []
    pipeline = Pipeline(dspy.Predict("question -> answer"), retry(), listeners=[events.append])
    with dspy.context(lm=lm):
        outcome = await pipeline.invoke(question=question())
    assert outcome.attempts == 2
    assert [(entry.max_tokens, entry.temperature) for entry in lm.journal] == [(100, 0.0), (100, 0.0), (200, 0.7)]
    [scheduled] = [event for event in events if isinstance(event, RetryScheduled)]
    assert scheduled.reason == "TruncatedOutputError"


async def test_the_raised_max_tokens_stays_for_the_later_retries_within_its_cap() -> None:
    lm = FaultInjectingLM(script=["truncated"] * 2 + ["malformed"] * 2 + ["truncated"] * 2, max_tokens=1000)
    with dspy.context(lm=lm), pytest.raises(TruncatedOutputError):  # cut again at the cap: no room left
        await Pipeline(dspy.Predict("question -> answer"), retry(4, max_tokens_cap=1500))(question=question())
    assert [entry.max_tokens for entry in lm.journal] == [1000, 1000, 1500, 1500, 1500, 1500]


async def test_a_cut_answer_at_the_cap_is_raised_at_once() -> None:
    lm = FaultInjectingLM(script=["truncated"] * 4, max_tokens=4096)
    with dspy.context(lm=lm), pytest.raises(TruncatedOutputError):
        await Pipeline(dspy.Predict("question -> answer"), retry())(question=question())
    assert lm.requests == 2


async def test_no_cap_means_a_cut_answer_is_not_retried() -> None:
    lm = FaultInjectingLM(script=["truncated"] * 4, max_tokens=100)
    with dspy.context(lm=lm), pytest.raises(TruncatedOutputError):
        await Pipeline(dspy.Predict("question -> answer"), retry(max_tokens_cap=None))(question=question())
    assert lm.requests == 2


@pytest.mark.looptime(False)
async def test_the_chaos_server_sends_finish_reason_length_and_the_pipeline_names_it() -> None:
    async with ChaosServer(port=0) as server:
        lm = dspy.LM("openai/chaos", api_base=server.url + "/v1", api_key="x", cache=False, num_retries=0)
        lm = lm.copy(max_tokens=50)
        server.script("truncated", "truncated")
        try:
            with dspy.context(lm=lm), pytest.raises(TruncatedOutputError) as caught:
                await Pipeline(dspy.Predict("question -> answer"))(question="What is DSPy?")
            server.script("truncated", "truncated")
            with dspy.context(lm=lm):
                outcome = await Pipeline(dspy.Predict("question -> answer"), retry()).invoke(question="What is DSPy?")
        finally:
            await lm.aclose()
    assert caught.value.max_tokens == 50
    assert outcome.attempts == 2
