"""The chaos server streams (``"stream": true``): server-sent events word by word, and the stream faults (disconnect,
stall, truncate, malformed chunk) mapped to DSPy's errors; through a streamed pipeline over real HTTP, a fault before
the first chunk is retried and one after it ends the stream with StreamInterruptedError.

Real time and real sockets (``looptime(False)``), kept short: stalls are tenths of a second.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import dspy
import pytest
from dspy.streaming import StreamListener, StreamResponse

from resilient_dspy import Pipeline, Retry, Timeout
from resilient_dspy.errors import ConfigurationError, StreamInterruptedError, TimeoutExceededError
from resilient_dspy.testing import ChaosServer
from resilient_dspy.testing.chaos_server import StreamFault, StreamStep
from tests.conftest import other_tasks

pytestmark = pytest.mark.looptime(False)

QUICK = {"base_delay": 0.0, "jitter": "none"}


@pytest.fixture
async def server() -> AsyncIterator[ChaosServer]:
    async with ChaosServer(port=0, max_hang=5.0) as running:
        yield running
    assert not other_tasks()


@pytest.fixture
async def lm(server: ChaosServer) -> AsyncIterator[dspy.LM]:
    client = server.lm()
    yield client
    await client.aclose()


async def stream(program: Any, lm: dspy.LM, question: str = "q") -> tuple[list[str], Any]:
    streamed = dspy.streamify(
        program, stream_listeners=[StreamListener(signature_field_name="answer")], is_async_program=True
    )
    chunks: list[str] = []
    final = None
    with dspy.context(lm=lm):
        async for value in streamed(question=question):
            if isinstance(value, StreamResponse):
                chunks.append(value.chunk)
            elif isinstance(value, dspy.Prediction):
                final = value
    return chunks, final


async def test_a_streamed_answer_arrives_word_by_word_with_its_usage(server: ChaosServer, lm: dspy.LM) -> None:
    """A bare streamed Predict over HTTP: the answer in several chunks, the journal says how many were sent."""
    chunks, final = await stream(dspy.Predict("question -> answer"), lm)
    assert len(chunks) > 3 and "".join(chunks) == final.answer
    (entry,) = server.journal
    assert entry.detail.startswith("streamed") and entry.output_tokens > 0


@pytest.mark.parametrize(
    ("step", "error"),
    [
        (StreamStep(StreamFault.DISCONNECT, after=3), dspy.LMTransportError),
        (StreamStep(StreamFault.TRUNCATE, after=0), dspy.LMStreamAssemblyError),
        (StreamStep(StreamFault.MALFORMED_CHUNK, after=0), dspy.LMUnexpectedError),
    ],
    ids=["disconnect", "truncate", "malformed_chunk"],
)
async def test_each_stream_fault_is_the_dspy_error_a_provider_would_cause(
    server: ChaosServer, lm: dspy.LM, step: StreamStep, error: type[Exception]
) -> None:
    server.push_stream(step)
    with pytest.raises(error):
        await stream(dspy.Predict("question -> answer"), lm)


async def test_a_stall_pauses_the_stream_then_it_goes_on(server: ChaosServer, lm: dspy.LM) -> None:
    server.push_stream({"fault": "stall", "after": 2, "seconds": 0.2})
    chunks, final = await stream(dspy.Predict("question -> answer"), lm)
    assert "".join(chunks) == final.answer
    assert server.journal[0].detail.endswith("stall")


async def test_a_truncated_stream_before_its_first_chunk_is_retried_through_the_layers(
    server: ChaosServer, lm: dspy.LM
) -> None:
    """LMStreamAssemblyError before any chunk reached the consumer is retried: one answer, two requests."""
    server.push_stream(StreamStep(StreamFault.TRUNCATE, after=0))
    module = Pipeline(dspy.Predict("question -> answer"), Retry(3, **QUICK)).as_module()
    chunks, final = await stream(module, lm)
    assert "".join(chunks) == final.answer and server.requests == 2


async def test_a_rate_limit_before_the_stream_starts_is_retried(server: ChaosServer, lm: dspy.LM) -> None:
    server.push({"fault": "rate_limit", "retry_after": 0.01})
    module = Pipeline(dspy.Predict("question -> answer"), Retry(3, **QUICK)).as_module()
    chunks, final = await stream(module, lm)
    assert "".join(chunks) == final.answer and server.requests == 2


async def test_a_disconnect_after_chunks_reached_the_consumer_ends_the_stream_and_is_not_retried(
    server: ChaosServer, lm: dspy.LM
) -> None:
    server.push_stream(StreamStep(StreamFault.DISCONNECT, after=3))
    module = Pipeline(dspy.Predict("question -> answer"), Retry(3, **QUICK)).as_module()
    with pytest.raises(StreamInterruptedError) as raised:
        await stream(module, lm)
    assert raised.value.chunks == 3 and isinstance(raised.value.error, dspy.LMTransportError)
    assert server.requests == 1


async def test_a_stall_longer_than_the_idle_limit_ends_the_stream(server: ChaosServer, lm: dspy.LM) -> None:
    server.push_stream({"fault": "stall", "after": 4, "seconds": 3.0})
    module = Pipeline(dspy.Predict("question -> answer"), Timeout(30), Retry(3, **QUICK), Timeout(10, idle=0.3))
    with pytest.raises(StreamInterruptedError) as raised:
        await stream(module.as_module(), lm)
    cause = raised.value.error
    assert isinstance(cause, TimeoutExceededError) and cause.limit == "idle"
    assert server.requests == 1


def test_stream_steps_are_checked_all_at_once() -> None:
    with pytest.raises(ConfigurationError) as raised:
        ChaosServer(stream_script=[{"fault": "explode"}, {"fault": "stall", "after": -1}, {"seconds": 1}])
    assert [field for field, _ in raised.value.problems] == [
        "ChaosServer.stream_script[0].fault",
        "ChaosServer.stream_script[1].after",
        "ChaosServer.stream_script[2].seconds",
    ]
