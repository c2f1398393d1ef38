"""Call traces: the span tree of a traced call, events attached where they fired, rendering, failures."""

from __future__ import annotations

import asyncio
import dataclasses

import dspy
import pytest

from resilient_dspy import CircuitBreaker, Fallback, Pipeline, RetriesExhaustedError, Retry, Static, Timeout
from resilient_dspy.core.trace import Span
from resilient_dspy.events import RetryScheduled


def server_error() -> Exception:
    return dspy.LMServerError("injected 503", status=503)


class Flaky:
    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)

    async def __call__(self, question: str) -> str:
        await asyncio.sleep(0.25)
        if self.errors:
            raise self.errors.pop(0)
        return "answer"


def shape(span: Span, depth: int = 0) -> list[tuple[int, str, int, str]]:
    rows = [(depth, span.name, span.attempt, span.outcome)]
    for child in span.children:
        rows.extend(shape(child, depth + 1))
    return rows


async def test_a_retried_call_shows_every_attempt_with_its_outcome_and_the_retry_event() -> None:
    pipeline = Pipeline(
        Flaky(server_error()),
        Fallback(Static(answer="sorry")),
        Timeout(10),
        Retry(3, base_delay=0.5, jitter="none", budget=None),
        CircuitBreaker(5),
        name="qa",
    )
    outcome = await pipeline.traced("q")
    assert outcome.value == "answer" and outcome.trace is not None
    assert shape(outcome.trace.root) == [
        (0, "qa", 1, "ok"),
        (1, "Fallback", 1, "ok"),
        (2, "Timeout(total)", 1, "ok"),
        (3, "Retry", 1, "ok"),
        (4, "CircuitBreaker", 1, "LMServerError"),
        (5, "program Flaky", 1, "LMServerError"),
        (4, "CircuitBreaker", 2, "ok"),
        (5, "program Flaky", 2, "ok"),
    ]
    retry_span = outcome.trace.root.children[0].children[0].children[0]
    assert [type(e) for e in retry_span.events] == [RetryScheduled]
    first, second = retry_span.children
    assert first.duration == pytest.approx(0.25) and second.started - first.ended == pytest.approx(0.5)  # type: ignore[operator]
    assert outcome.trace.root.duration == pytest.approx(1.0)


async def test_render_is_a_readable_tree() -> None:
    pipeline = Pipeline(Flaky(server_error()), Retry(2, base_delay=0.1, jitter="none", budget=None), name="qa")
    outcome = await pipeline.traced("q")
    assert outcome.trace is not None
    text = outcome.trace.render()
    assert text == (
        "qa  +0.0 ms  600.0 ms  ok\n"
        "└─ Retry  +0.0 ms  600.0 ms  ok\n"
        "   ├─ program Flaky  +0.0 ms  250.0 ms  LMServerError: injected 503\n"
        "   ├· RetryScheduled +250.0 ms attempt=1 delay=0.1 reason=LMServerError error=LMServerError\n"
        "   └─ program Flaky #2  +350.0 ms  250.0 ms  ok"
    )
    assert str(outcome.trace) == text


async def test_a_failed_traced_call_carries_its_trace_on_the_error() -> None:
    pipeline = Pipeline(Flaky(*[server_error()] * 3), Retry(2, base_delay=0, budget=None), name="qa")
    with pytest.raises(RetriesExhaustedError) as caught:
        await pipeline.traced("q")
    trace = caught.value.trace  # type: ignore[attr-defined]
    assert trace.root.outcome == "RetriesExhaustedError"
    assert [s.outcome for s in trace.root.children[0].children] == ["LMServerError", "LMServerError"]


@dataclasses.dataclass(frozen=True)
class FrozenError(Exception):
    """A program's own error that refuses new attributes (``error.trace = ...`` raises FrozenInstanceError)."""

    code: int


class ReadOnlyTraceError(Exception):
    """A program's own error that already has a read-only ``trace``."""

    @property
    def trace(self) -> str:
        return "mine"


@pytest.mark.parametrize("error", [FrozenError(7), ReadOnlyTraceError("x")], ids=["frozen_dataclass", "read_only"])
async def test_a_traced_call_raises_the_programs_own_error_even_when_the_trace_cannot_be_attached(
    error: Exception,
) -> None:
    pipeline = Pipeline(Flaky(error), Retry(2, base_delay=0, retry_on=ValueError, budget=None), name="qa")
    with pytest.raises(type(error)) as caught:
        await pipeline.traced("q")
    assert caught.value is error
    if isinstance(error, ReadOnlyTraceError):
        assert caught.value.trace == "mine"


async def test_untraced_calls_are_not_traced_and_tracing_leaves_the_pipeline_listeners_alone() -> None:
    seen: list[object] = []
    pipeline = Pipeline(Flaky(server_error()), Retry(2, base_delay=0, budget=None), listeners=[seen.append])
    outcome = await pipeline.invoke("q")
    assert outcome.trace is None
    traced = await pipeline.traced("q")
    assert traced.trace is not None
    assert len(pipeline.runtime.listeners) == 1
    assert len(seen) == 1  # the RetryScheduled of the first call; the traced call did not fail


async def test_spans_close_on_cancellation() -> None:
    pipeline = Pipeline(Flaky(), Timeout(10), name="qa")
    task = asyncio.create_task(pipeline.traced("q"))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
