"""FaultInjectingLM from sync code, worker threads and async alike (dspy.Evaluate with threads, streamify over a sync
module), and its streamed answers: one word a chunk, ``chunk_latency`` apart on its clock."""

from __future__ import annotations

import asyncio

import dspy
import pytest
from dspy.streaming import StreamListener, StreamResponse

from resilient_dspy.errors import ConfigurationError
from resilient_dspy.testing import Fault, FaultInjectingLM


def test_evaluate_with_threads_runs_on_the_fault_lm_offline() -> None:
    """Regression: the LM failed from worker threads ('no running event loop'), so dspy.Evaluate(num_threads=4)
    could not run offline. Every example answers, and a scripted fault lands on exactly one of them."""
    lm = FaultInjectingLM(script=["server_error"])
    devset = [dspy.Example(question=f"q{i}", answer="x").with_inputs("question") for i in range(12)]
    evaluate = dspy.Evaluate(devset=devset, metric=lambda *args, **kwargs: 1.0, num_threads=4, max_errors=100)
    with dspy.context(lm=lm):
        result = evaluate(dspy.Predict("question -> answer"))
    assert lm.requests == 12 and [entry.fault for entry in lm.journal].count(Fault.SERVER_ERROR) == 1
    assert result.score == pytest.approx(100 * 11 / 12, abs=0.01)


@pytest.mark.looptime(False)  # streamify runs a sync module in a real worker thread
async def test_streamify_over_a_sync_module_streams_from_its_worker_thread() -> None:
    """A sync module (its forward calls Predict) under dspy.streamify: the LM's sync engine streams from the worker
    thread, the listener gets the answer word by word."""

    class Sync(dspy.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.predict = dspy.Predict("question -> answer")

        def forward(self, question: str) -> dspy.Prediction:
            return self.predict(question=question)

    streamed = dspy.streamify(Sync(), stream_listeners=[StreamListener(signature_field_name="answer")])
    chunks: list[str] = []
    final = None
    with dspy.context(lm=FaultInjectingLM()):
        async for value in streamed(question="stream me"):
            if isinstance(value, StreamResponse):
                chunks.append(value.chunk)
            elif isinstance(value, dspy.Prediction):
                final = value
    assert final is not None and len(chunks) > 3 and "".join(chunks) == final.answer


async def test_a_streamed_answer_comes_one_word_a_chunk_chunk_latency_apart() -> None:
    """On virtual time: the first chunk comes after the request's latency, each next one chunk_latency later."""
    lm = FaultInjectingLM(answers={"q": "one two three"}, chunk_latency=2.0, script=[{"fault": "ok", "latency": 5.0}])
    loop = asyncio.get_running_loop()
    started = loop.time()
    arrivals: list[tuple[str, float]] = []
    streamed = dspy.streamify(
        dspy.Predict("question -> answer"),
        stream_listeners=[StreamListener(signature_field_name="answer")],
        is_async_program=True,
    )
    with dspy.context(lm=lm):
        async for value in streamed(question="q"):
            if isinstance(value, StreamResponse) and value.chunk:
                arrivals.append((value.chunk, loop.time() - started))
    assert "".join(chunk for chunk, _ in arrivals) == "one two three"
    assert arrivals[0][1] >= 5.0 and arrivals[-1][1] > arrivals[0][1]


@pytest.mark.parametrize("value", [-1, True, "fast"])
def test_chunk_latency_must_be_seconds(value: object) -> None:
    with pytest.raises(ConfigurationError) as raised:
        FaultInjectingLM(chunk_latency=value)  # type: ignore[arg-type]
    assert [field for field, _ in raised.value.problems] == ["FaultInjectingLM.chunk_latency"]
