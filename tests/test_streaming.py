"""Streaming through the layers (``dspy.streamify(pipeline.as_module(), ...)``), offline on the fault-injecting LM.

The rules: a retry or fallback only while no chunk reached the consumer, then a typed error (never a chunk twice);
a Timeout's first-chunk and idle limits; a cache hit delivers the final prediction; a bulkhead or limiter holds the
call's capacity for the whole stream; chunks of a thread a timeout abandoned never reach the consumer. Over real
HTTP with stream faults: tests/testing/test_chaos_server_streaming.py.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import dspy
import pytest
from dspy.streaming import StreamListener, StreamResponse

from resilient_dspy import Bulkhead, Cache, Fallback, Pipeline, RateLimiter, Retry, Static, Timeout
from resilient_dspy.errors import BulkheadFullError, StreamInterruptedError, TimeoutExceededError
from resilient_dspy.events import Event
from resilient_dspy.middleware.fallback import FallbackUsed
from resilient_dspy.middleware.ratelimit import RateLimitReconciled
from resilient_dspy.middleware.timeout import TimeoutFired
from resilient_dspy.testing import Fault, FaultInjectingLM, FaultStep
from tests.conftest import other_tasks

QUICK = {"base_delay": 0.0, "jitter": "none"}


async def stream(module: Any, *, sync_program: bool = False, **inputs: Any) -> tuple[list[str], Any]:
    """Run ``dspy.streamify(module)`` with a listener on ``answer``: the chunks the consumer saw, and the prediction."""
    listeners = [StreamListener(signature_field_name="answer")]
    streamed = dspy.streamify(module, stream_listeners=listeners, is_async_program=not sync_program)
    chunks: list[str] = []
    final = None
    async for value in streamed(**inputs):
        if isinstance(value, StreamResponse):
            chunks.append(value.chunk)
        elif isinstance(value, dspy.Prediction):
            final = value
    return chunks, final


@pytest.mark.parametrize("sync_program", [False, True], ids=["acall", "sync-forward"])
@pytest.mark.looptime(False)  # the sync path runs on the pipeline's background loop, in real time
async def test_a_streamed_module_sends_its_answer_chunk_by_chunk_then_the_prediction(sync_program: bool) -> None:
    """Regression: dspy.streamify over a pipeline hung, and with listeners raised AttributeError(named_predictors).
    Through as_module() the listened field arrives word by word, then the final prediction, both when streamify
    calls the module's sync forward (on the pipeline's background loop) and its acall."""
    lm = FaultInjectingLM()
    module = Pipeline(dspy.Predict("question -> answer"), Retry(3, **QUICK)).as_module()
    with dspy.context(lm=lm):
        chunks, final = await stream(module, sync_program=sync_program, question="Why stream?")
    assert len(chunks) > 3 and "".join(chunks) == final.answer
    assert lm.requests == 1
    module.pipeline.portal.close()


async def test_a_failure_before_the_first_chunk_is_retried_and_the_consumer_sees_one_answer() -> None:
    """A server error before any chunk is retried; the consumer sees exactly one answer's chunks."""
    lm = FaultInjectingLM(script=["server_error", "rate_limit"])
    module = Pipeline(dspy.Predict("question -> answer"), Retry(3, **QUICK)).as_module()
    with dspy.context(lm=lm):
        chunks, final = await stream(module, question="q")
    assert "".join(chunks) == final.answer
    assert [entry.fault for entry in lm.journal] == [Fault.SERVER_ERROR, Fault.RATE_LIMIT, Fault.OK]


class StreamsThenFails(dspy.Module):  # type: ignore[misc]
    """Streams a whole answer, then fails: a failure after chunks reached the consumer."""

    def __init__(self) -> None:
        super().__init__()
        self.predict = dspy.Predict("question -> answer")

    async def aforward(self, question: str) -> Any:
        await self.predict.acall(question=question)
        raise dspy.LMServerError("the provider failed after streaming", status=503)


async def test_a_failure_after_the_first_chunk_ends_the_stream_with_a_typed_error_and_is_never_run_again() -> None:
    """Regression: a retried streamed call sent the failed attempt's chunks again on the same stream. Now, once a
    chunk reached the consumer, neither Retry nor Fallback runs the call again: StreamInterruptedError, holding
    the failure, ends the stream."""
    lm = FaultInjectingLM()
    heard: list[Event] = []
    pipeline = Pipeline(
        StreamsThenFails(), Fallback(Static(answer="sorry")), Retry(3, **QUICK), listeners=[heard.append]
    )
    with dspy.context(lm=lm), pytest.raises(StreamInterruptedError) as raised:
        await stream(pipeline.as_module(), question="q")
    assert raised.value.chunks > 0
    assert isinstance(raised.value.error, dspy.LMServerError)
    assert lm.requests == 1
    assert not any(isinstance(event, FallbackUsed) for event in heard)


async def test_a_failure_after_the_first_chunk_keeps_the_other_layers_rules() -> None:
    """A call that failed mid-stream still counts for the layers (the error travels up unchanged until the module
    turns it into StreamInterruptedError): a plain call afterwards is retried as usual."""
    lm = FaultInjectingLM(script=["server_error"])
    module = Pipeline(dspy.Predict("question -> answer"), Retry(3, **QUICK)).as_module()
    with dspy.context(lm=lm):
        prediction = await module.acall(question="not streamed")
    assert prediction.answer and lm.requests == 2


async def test_the_wait_for_the_first_chunk_is_bounded_and_an_attempt_that_sent_none_is_retried() -> None:
    """Timeout(first_chunk=) below a Retry: an attempt whose first chunk is late times out (limit 'first_chunk') and
    is retried, since nothing reached the consumer; the next attempt streams the answer once."""
    lm = FaultInjectingLM(script=[FaultStep(Fault.OK, latency=30.0)])
    heard: list[Event] = []
    pipeline = Pipeline(
        dspy.Predict("question -> answer"),
        Timeout(120),
        Retry(3, **QUICK),
        Timeout(60, first_chunk=2.0),
        listeners=[heard.append],
    )
    with dspy.context(lm=lm):
        chunks, final = await stream(pipeline.as_module(), question="q")
    assert "".join(chunks) == final.answer
    fired = [event for event in heard if isinstance(event, TimeoutFired)]
    assert [(event.timeout, event.scope) for event in fired] == [(2.0, "attempt")]  # the first-chunk limit's 2 s
    assert lm.requests == 2
    assert not other_tasks()


async def test_a_pause_between_chunks_longer_than_idle_ends_the_stream_with_a_typed_error() -> None:
    """Timeout(idle=): chunks 3 s apart, an idle limit of 1 s: the stream ends after its first chunk with
    StreamInterruptedError caused by the idle timeout, and is not retried."""
    lm = FaultInjectingLM(chunk_latency=3.0)
    pipeline = Pipeline(dspy.Predict("question -> answer"), Timeout(120), Retry(3, **QUICK), Timeout(60, idle=1.0))
    with dspy.context(lm=lm), pytest.raises(StreamInterruptedError) as raised:
        await stream(pipeline.as_module(), question="q")
    cause = raised.value.error
    assert isinstance(cause, TimeoutExceededError) and (cause.limit, cause.timeout) == ("idle", 1.0)
    assert lm.requests == 1


async def test_chunks_within_the_idle_limit_stream_to_the_end() -> None:
    """Chunks 0.5 s apart under an idle limit of 1 s (and a first-chunk limit): the whole answer arrives."""
    lm = FaultInjectingLM(chunk_latency=0.5)
    pipeline = Pipeline(dspy.Predict("question -> answer"), Timeout(60, first_chunk=1.0, idle=1.0))
    with dspy.context(lm=lm):
        chunks, final = await stream(pipeline.as_module(), question="q")
    assert len(chunks) > 3 and "".join(chunks) == final.answer


async def test_a_slow_consumer_is_not_an_idle_model() -> None:
    """Time spent handing a chunk to a consumer that reads slowly is not a pause of the LM: a 40-word answer read one
    chunk every 5 s under an idle limit of 1 s arrives whole."""
    words = " ".join(f"w{index}" for index in range(40))
    lm = FaultInjectingLM(answers={"q": words})
    pipeline = Pipeline(dspy.Predict("question -> answer"), Timeout(3600, idle=1.0))
    listeners = [StreamListener(signature_field_name="answer")]
    streamed = dspy.streamify(pipeline.as_module(), stream_listeners=listeners, is_async_program=True)
    chunks: list[str] = []
    with dspy.context(lm=lm):
        async for value in streamed(question="q"):
            if isinstance(value, StreamResponse):
                chunks.append(value.chunk)
                await asyncio.sleep(5)
    assert "".join(chunks) == words


async def test_the_total_deadline_still_bounds_a_stream() -> None:
    """A stream slower than the total Timeout ends with StreamInterruptedError caused by the deadline."""
    lm = FaultInjectingLM(chunk_latency=1.0)
    pipeline = Pipeline(dspy.Predict("question -> answer"), Timeout(3.5))
    with dspy.context(lm=lm), pytest.raises(StreamInterruptedError) as raised:
        await stream(pipeline.as_module(), question="q")
    cause = raised.value.error
    assert isinstance(cause, TimeoutExceededError) and cause.limit == "deadline"


async def test_a_cache_hit_delivers_the_final_prediction_without_chunks() -> None:
    """A streamed call the cache answers sends no chunk: the consumer gets the stored prediction."""
    lm = FaultInjectingLM()
    module = Pipeline(dspy.Predict("question -> answer"), Cache()).as_module()
    with dspy.context(lm=lm):
        stored = await module.acall(question="cached")
        chunks, final = await stream(module, question="cached")
    assert (chunks, final.answer, lm.requests) == ([], stored.answer, 1)


async def test_a_bulkhead_holds_its_permit_for_the_whole_stream() -> None:
    """While a stream is being read, the call holds its bulkhead slot: another call finds the bulkhead full; once
    the stream has ended, the slot is free again."""
    lm = FaultInjectingLM(chunk_latency=1.0)
    module = Pipeline(dspy.Predict("question -> answer"), Bulkhead(max_concurrent=1, max_queue=0)).as_module()
    listeners = [StreamListener(signature_field_name="answer")]
    streamed = dspy.streamify(module, stream_listeners=listeners, is_async_program=True)
    refused: list[BaseException] = []
    with dspy.context(lm=lm):
        async for value in streamed(question="streamed"):
            if isinstance(value, StreamResponse) and not refused:
                try:
                    await module.acall(question="meanwhile")
                except BulkheadFullError as error:
                    refused.append(error)
        after = await module.acall(question="after")
    assert len(refused) == 1 and after.answer


async def test_a_rate_limiter_settles_a_streamed_call_with_the_whole_streams_usage() -> None:
    """A token-limited call holds its charge while it streams and is settled with the real usage of the whole
    stream once it ended (what the LM reported with its last chunk)."""
    lm = FaultInjectingLM()
    heard: list[Event] = []
    limiter = RateLimiter(tokens=100_000, per=60.0)
    module = Pipeline(dspy.Predict("question -> answer"), limiter, listeners=[heard.append]).as_module()
    with dspy.context(lm=lm):
        chunks, _ = await stream(module, question="metered")
    (entry,) = lm.journal
    (settled,) = [event for event in heard if isinstance(event, RateLimitReconciled)]
    assert chunks and settled.actual == entry.input_tokens + entry.output_tokens


@pytest.mark.looptime(False)  # real threads, cut by a real (short) timeout
async def test_chunks_of_a_thread_a_timeout_abandoned_never_reach_the_consumer() -> None:
    """A forward-only program streams from a worker thread. Its first attempt starts late and is abandoned at the
    first-chunk limit; the retry streams the answer. The abandoned thread streams too, meanwhile: its chunks are
    refused, and the consumer sees one answer, once."""
    finished = threading.Semaphore(0)

    class ForwardOnly(dspy.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.predict = dspy.Predict("question -> answer")

        def forward(self, question: str) -> Any:
            try:
                return self.predict(question=question)
            finally:
                finished.release()

    lm = FaultInjectingLM(script=[FaultStep(Fault.OK, latency=0.3)], chunk_latency=0.1)
    pipeline = Pipeline(ForwardOnly(), Timeout(10), Retry(3, **QUICK), Timeout(5, first_chunk=0.15))
    with dspy.context(lm=lm):
        chunks, final = await stream(pipeline.as_module(), question="q")
        for _ in range(2):
            assert await asyncio.to_thread(finished.acquire, True, 10)
    assert "".join(chunks) == final.answer
    assert lm.requests == 2


async def test_a_module_wrapped_pipeline_inside_another_pipeline_streams_once_through_both() -> None:
    """Pipeline(inner.as_module(), ...).as_module() under streamify: the inner module relays to the outer one, each
    counts the chunks, and a failure before the first chunk is retried by the inner Retry only."""
    lm = FaultInjectingLM(script=["server_error"])
    inner = Pipeline(dspy.Predict("question -> answer"), Retry(3, **QUICK)).as_module()
    outer = Pipeline(inner, Timeout(60)).as_module()
    with dspy.context(lm=lm):
        chunks, final = await stream(outer, question="nested stream")
    assert len(chunks) > 3 and "".join(chunks) == final.answer
    assert lm.requests == 2
