"""What the CircuitBreaker tests share: a program driven by its question, and the expected snapshots and events."""

from __future__ import annotations

import asyncio
from typing import Any

import dspy

from resilient_dspy import CircuitOpenError, Pipeline
from resilient_dspy.events import Event
from resilient_dspy.middleware.breaker import CircuitSnapshot, CircuitState, CircuitStateChanged

CLOSED, OPEN, HALF_OPEN, ISOLATED = (
    CircuitState.CLOSED,
    CircuitState.OPEN,
    CircuitState.HALF_OPEN,
    CircuitState.ISOLATED,
)


async def program(question: str) -> str:
    """Behaviour from the question, after an optional ``key|`` prefix: ok, fail, excl, rl:R, sleep:S[:then]."""
    step = question.split("|")[-1]
    if step.startswith("sleep:"):
        _, seconds, *then = step.split(":", 2)
        await asyncio.sleep(float(seconds))
        step = then[0] if then else "ok"
    if step == "ok":
        return "answer"
    if step == "fail":
        raise dspy.LMServerError("injected 503", status=503)
    if step == "excl":
        raise dspy.LMInvalidRequestError("bad request", status=400)
    if step.startswith("rl:"):
        raise dspy.LMRateLimitError("429", status=429, retry_after=float(step.split(":")[1]))
    raise AssertionError(step)


def by_prefix(call: Any) -> str:
    key: str = call.inputs["question"].split("|")[0]
    return key


async def run(pipeline: Pipeline, question: str) -> str:
    """The answer, or ``rejected`` (the circuit refused it) or ``error`` (the program failed)."""
    try:
        answer: str = await pipeline(question)
    except CircuitOpenError:
        return "rejected"
    except dspy.LMError:
        return "error"
    return answer


def snap(**fields: Any) -> CircuitSnapshot:
    """A snapshot with the defaults of a fresh, unpartitioned, closed circuit, overridden by ``fields``."""
    base: dict[str, Any] = {
        "key": None,
        "state": CLOSED,
        "calls": 0,
        "failures": 0,
        "slow_calls": 0,
        "consecutive_failures": 0,
        "retry_after": None,
        "break_duration": 30.0,
        "probes_in_flight": 0,
        "probes_succeeded": 0,
    }
    return CircuitSnapshot(**{**base, **fields})


def changed(old: CircuitState, new: CircuitState, reason: str, **fields: Any) -> CircuitStateChanged:
    base: dict[str, Any] = {"pipeline": "p", "layer": "cb", "time": 0.0, "key": None, "retry_after": None}
    return CircuitStateChanged(old=old, new=new, reason=reason, **{**base, **fields})


def transitions(events: list[Event]) -> list[tuple[Any, ...]]:
    return [(e.old, e.new, e.reason, e.retry_after) for e in events if isinstance(e, CircuitStateChanged)]


def says(error: BaseException | str, *facts: str) -> None:
    """The message carries these facts (the circuit's key, its state, the reason), whatever its wording."""
    for fact in facts:
        assert fact in str(error), (fact, str(error))
