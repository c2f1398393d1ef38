"""Opt-in: the recommended stack on a real local model (SmolLM2-135M on llama.cpp), asserting the library's promises.

Run with ``pytest -m real_model`` after ``pip install 'resilient-dspy[real-model]'`` (compiles llama.cpp: minutes).
The default run deselects it (``addopts`` in pyproject); without llama_cpp or the GGUF, or when the server does not
start, it is skipped with the reason. Real sockets and real time (``looptime(False)``); bounded: a few questions,
``max_tokens=160``, ChainOfThought at temperature 0.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import dspy
import pytest
from dspy.utils.callback import BaseCallback

from resilient_dspy import (
    AdaptiveTimeout,
    Cache,
    CircuitBreaker,
    Fallback,
    Guard,
    Pipeline,
    Retry,
    Static,
    Timeout,
    by_model,
)
from resilient_dspy.errors import ErrorKind, classify
from resilient_dspy.events import CacheStored, Event, RetryScheduled
from resilient_dspy.testing.real_model import QUESTIONS, LlamaServer, unavailable
from tests.conftest import other_tasks

pytestmark = [pytest.mark.real_model, pytest.mark.looptime(False)]

COUNT = int(os.environ.get("RESILIENT_DSPY_REAL_QUESTIONS", "4"))
APOLOGY = "Sorry, I cannot answer right now."


@pytest.fixture(scope="module")
def server() -> Iterator[LlamaServer]:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    try:
        running = LlamaServer(start_timeout=180.0).__enter__()
    except RuntimeError as error:
        pytest.skip(f"llama_cpp.server could not start: {error}")
    try:
        yield running
    finally:
        running.stop()


class SeenByLM(BaseCallback):
    """Each request's rollout_id and temperature, read off the LM instance that sends it."""

    def __init__(self) -> None:
        self.requests: list[tuple[Any, Any]] = []

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self.requests.append((instance.kwargs.get("rollout_id"), instance.kwargs.get("temperature")))


def recommended(events: list[Event]) -> Pipeline:
    """The README's stack (rate limiter and bulkhead left out: one caller), with a cache to check what it keeps."""
    return Pipeline(
        dspy.ChainOfThought("question -> answer"),
        Fallback(Static(answer=APOLOGY)),
        Timeout(1800.0),
        Retry(3),
        CircuitBreaker(failure_threshold=5, key=by_model),
        AdaptiveTimeout(240.0),
        Cache(),
        listeners=[events.append],
    )


async def test_the_recommended_stack_keeps_its_promises_on_a_real_model(server: LlamaServer) -> None:
    events: list[Event] = []
    pipeline = recommended(events)
    lm = server.lm(max_tokens=160)
    outcomes = []
    with dspy.context(lm=lm):
        for question in QUESTIONS[:COUNT]:
            try:
                outcomes.append(await pipeline.invoke(question))
            except Exception as error:  # a typed error is a kept promise too; an untyped one is not
                assert classify(error).kind is not ErrorKind.UNKNOWN, repr(error)
                outcomes.append(error)
    await lm.aclose()

    assert len(outcomes) == COUNT  # no lost call
    primary = [o for o in outcomes if not isinstance(o, Exception) and o.served_by == "primary"]
    assert all(isinstance(o.value.answer, str) and o.value.answer != APOLOGY for o in primary)
    stored = [event for event in events if isinstance(event, CacheStored)]
    assert len(stored) == len(primary)  # only good answers are cached: never a parse failure or the apology
    for event in events:
        if isinstance(event, RetryScheduled) and event.error is not None:
            assert classify(event.error).retryable
    assert not other_tasks()


async def test_a_retry_after_a_rejected_answer_sends_the_real_server_a_changed_request(server: LlamaServer) -> None:
    seen = SeenByLM()
    verdicts = iter([False])  # the first answer is rejected whatever it says; the retry's stands
    pipeline = Pipeline(
        dspy.Predict("question -> answer"),
        Timeout(1800.0),  # a loaded 2-core machine took 300 s a request: the retry must get its turn
        Retry(2, base_delay=0.0),
        Guard(output=lambda prediction: next(verdicts, True)),
    )
    lm = server.lm(max_tokens=48)
    with dspy.context(lm=lm, callbacks=[seen]):
        try:
            await pipeline(QUESTIONS[0])
        except Exception as error:
            assert classify(error).kind is not ErrorKind.UNKNOWN
    await lm.aclose()
    first_attempt = [request for request in seen.requests if request[0] is None]  # Chat, and its JSON fallback
    retried = seen.requests[len(first_attempt) :]
    assert first_attempt and set(first_attempt) == {(None, 0.0)}
    assert retried, f"no retry reached the server: {seen.requests}"
    assert all(isinstance(rollout, int) and temperature == 0.7 for rollout, temperature in retried)
    assert not other_tasks()
