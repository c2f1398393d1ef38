"""CircuitBreaker against the scenarios of Resilience4j's CircuitBreakerStateMachineTest and sliding-window tests.

The base options are those of that test's ``setUp``: 50 % failure and slow-call rates, slow at 4 s, a 20 s time
window (here 20 buckets of 1 s) with 5 minimum calls, a 5 s break, 4 half-open calls, one ignored error type.
Where our decided semantics differ (design §2: any failing or slow probe re-opens at once, where Resilience4j
rates the half-open calls), the row says so and expects our behaviour. Virtual time (looptime).
"""

from __future__ import annotations

import asyncio
from typing import Any

import dspy
import pytest

from resilient_dspy import CircuitBreaker, CircuitOpenError, Pipeline
from resilient_dspy.middleware.breaker import CircuitState

CLOSED, OPEN, HALF_OPEN, ISOLATED = (
    CircuitState.CLOSED,
    CircuitState.OPEN,
    CircuitState.HALF_OPEN,
    CircuitState.ISOLATED,
)

BASE: dict[str, Any] = {
    "failure_rate": 0.5,
    "slow_call_rate": 0.5,
    "slow_call_duration": 4.0,
    "window_seconds": 20.0,
    "buckets": 20,
    "min_calls": 5,
    "break_duration": 5.0,
    "half_open_probes": 4,
    "exclude": dspy.LMInvalidRequestError,  # Resilience4j's ignoreExceptions(NumberFormatException.class)
}

TRIP = [("fail", CLOSED, "error")] * 4 + [("fail", OPEN, "error")]  # 5 of 5 failed
HALF = [*TRIP, ("adv:5", OPEN, "-")]  # the break is over: the next call is a probe


class Held:
    """An async program: ``ok``/``fail``/``excl``, ``slow:S``/``slowfail:S`` after S seconds, ``hold`` until settled."""

    def __init__(self) -> None:
        self.futures: list[asyncio.Future[str]] = []

    async def __call__(self, question: str) -> str:
        kind, _, seconds = question.partition(":")
        if kind == "hold":
            future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            self.futures.append(future)
            return await future
        if seconds:
            await asyncio.sleep(float(seconds))
        if kind in ("fail", "slowfail"):
            raise dspy.LMServerError("503", status=503)
        if kind == "excl":
            raise dspy.LMInvalidRequestError("400", status=400)
        return "answer"


def error(kind: str) -> Exception:
    return dspy.LMServerError("503", status=503) if kind == "fail" else dspy.LMInvalidRequestError("400", status=400)


SCENARIOS: dict[str, tuple[dict[str, Any], list[tuple[str, CircuitState, str]]]] = {
    "shouldOpenAfterFailureRateThresholdExceeded: 3 of 5 failed, judged on the 5th call, a success": (
        {},
        [
            ("fail", CLOSED, "error"),
            ("fail", CLOSED, "error"),
            ("fail", CLOSED, "error"),
            ("ok", CLOSED, "ok"),
            ("ok", OPEN, "ok"),
            ("ok", OPEN, "rejected"),
        ],
    ),
    "shouldOpenAfterFailureRateThresholdExceeded, count window of 5": (
        {"window_seconds": None, "window": 5},
        [
            ("fail", CLOSED, "error"),
            ("fail", CLOSED, "error"),
            ("fail", CLOSED, "error"),
            ("ok", CLOSED, "ok"),
            ("ok", OPEN, "ok"),
        ],
    ),
    "shouldOpenAfterFailureRateThresholdExceeded2: 2 of 5 stays closed, 3 of 6 (exactly 50 %) opens": (
        {},
        [
            ("ok", CLOSED, "ok"),
            ("adv:1", CLOSED, "-"),
            ("ok", CLOSED, "ok"),
            ("adv:1", CLOSED, "-"),
            ("ok", CLOSED, "ok"),
            ("adv:1", CLOSED, "-"),
            ("fail", CLOSED, "error"),
            ("adv:1", CLOSED, "-"),
            ("fail", CLOSED, "error"),
            ("adv:1", CLOSED, "-"),
            ("fail", OPEN, "error"),
        ],
    ),
    "shouldOpenAfterSlowCallRateThresholdExceeded: 3 of 5 slow (one a failure), 2 of 5 failed": (
        {},
        [
            ("slowfail:5", CLOSED, "error"),
            ("slow:5", CLOSED, "ok"),
            ("slowfail:0.1", CLOSED, "error"),
            ("slow:0.1", CLOSED, "ok"),
            ("slow:5", OPEN, "ok"),
        ],
    ),
    "shouldOpenAfterSlowCallRateThresholdExceededUsingMockClock": (
        {},
        [
            ("slow:5", CLOSED, "ok"),
            ("slow:5", CLOSED, "ok"),
            ("slow:1", CLOSED, "ok"),
            ("slow:1", CLOSED, "ok"),
            ("slow:5", OPEN, "ok"),
        ],
    ),
    "shouldTransitionToHalfOpenAfterWaitDuration: refused at 3 s, a probe at 6 s": (
        {},
        [
            *TRIP,
            ("ok", OPEN, "rejected"),
            ("adv:3", OPEN, "-"),
            ("ok", OPEN, "rejected"),
            ("adv:3", OPEN, "-"),
            ("hold", HALF_OPEN, "held"),
        ],
    ),
    "shouldOnlyPermitFourCallsInHalfOpenState / shouldIncreaseCounterOnReleasePermission": (
        {},
        [
            *HALF,
            ("hold", HALF_OPEN, "held"),
            ("hold", HALF_OPEN, "held"),
            ("hold", HALF_OPEN, "held"),
            ("hold", HALF_OPEN, "held"),
            ("ok", HALF_OPEN, "rejected"),
            ("ok", HALF_OPEN, "rejected"),
            ("settle:excl", HALF_OPEN, "error"),  # an ignored error gives its permit back
            ("hold", HALF_OPEN, "held"),
            ("ok", HALF_OPEN, "rejected"),
        ],
    ),
    "shouldIgnoreExceptionsAndThenTransitionToClosed": (
        {},
        [
            *HALF,
            ("excl", HALF_OPEN, "error"),
            ("excl", HALF_OPEN, "error"),
            ("excl", HALF_OPEN, "error"),
            ("excl", HALF_OPEN, "error"),
            ("ok", HALF_OPEN, "ok"),
            ("ok", HALF_OPEN, "ok"),
            ("ok", HALF_OPEN, "ok"),
            ("ok", CLOSED, "ok"),
        ],
    ),
    "shouldReleasePermissionWhenExceptionIgnored (ours: the failing probe re-opens; Resilience4j closes at 25 %)": (
        {},
        [
            *HALF,
            ("ok", HALF_OPEN, "ok"),
            ("ok", HALF_OPEN, "ok"),
            ("ok", HALF_OPEN, "ok"),
            ("excl", HALF_OPEN, "error"),
            ("fail", OPEN, "error"),
        ],
    ),
    "shouldTransitionBackToClosedStateWhenFailureIsBelowThreshold (ours: the first failing probe re-opens)": (
        {},
        [*HALF, ("fail", OPEN, "error"), ("ok", OPEN, "rejected")],
    ),
    "shouldTransitionBackToOpenStateWhenSlowCallRateIsAboveThreshold (ours: the first slow probe re-opens)": (
        {},
        [*HALF, ("slow:5", OPEN, "ok"), ("ok", OPEN, "rejected")],
    ),
    "shouldForceOpenCircuitBreaker: isolated ignores the break; reset closes": (
        {},
        [
            ("isolate", ISOLATED, "-"),
            ("ok", ISOLATED, "rejected"),
            ("adv:6", ISOLATED, "-"),
            ("ok", ISOLATED, "rejected"),
            ("reset", CLOSED, "-"),
            ("ok", CLOSED, "ok"),
        ],
    ),
    "shouldResetMetrics: reset forgets the window": (
        {},
        [
            ("ok", CLOSED, "ok"),
            ("fail", CLOSED, "error"),
            ("reset", CLOSED, "-"),
            ("fail", CLOSED, "error"),
            ("fail", CLOSED, "error"),
            ("fail", CLOSED, "error"),  # without the reset: 4 of 5 failed, open
            ("fail", CLOSED, "error"),
            ("ok", OPEN, "ok"),  # 4 of 5 since the reset
        ],
    ),
    "SlidingTimeWindowMetricsTest: outcomes older than the window no longer count": (
        {},
        [
            ("fail", CLOSED, "error"),
            ("fail", CLOSED, "error"),
            ("fail", CLOSED, "error"),
            ("fail", CLOSED, "error"),
            ("adv:21", CLOSED, "-"),
            ("ok", CLOSED, "ok"),  # 1 call in the window, not 5
            ("fail", CLOSED, "error"),
            ("fail", CLOSED, "error"),
            ("fail", CLOSED, "error"),
            ("fail", OPEN, "error"),  # 4 of 5
        ],
    ),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_resilience4j_scenario(name: str) -> None:
    """Each step leaves the expected state and surfaces the expected outcome."""
    overrides, steps = SCENARIOS[name]
    breaker = CircuitBreaker(**{**BASE, **overrides})
    program = Held()
    pipeline = Pipeline(program, breaker)
    held: list[asyncio.Task[str]] = []
    for index, (step, state, outcome) in enumerate(steps):
        got = "-"
        if step.startswith("adv:"):
            await asyncio.sleep(float(step[4:]))
        elif step == "isolate":
            breaker.isolate()
        elif step == "reset":
            breaker.reset()
        elif step == "hold":
            task = asyncio.create_task(pipeline("hold"))
            await asyncio.sleep(0)
            got = "held" if not task.done() else "rejected"
            held.append(task)
        elif step.startswith("settle:"):
            kind = step[7:]
            future = program.futures.pop(0)
            future.set_result("answer") if kind == "ok" else future.set_exception(error(kind))
            results = await asyncio.gather(held.pop(0), return_exceptions=True)
            got = "ok" if results[0] == "answer" else "error"
        else:
            try:
                await pipeline(step)
                got = "ok"
            except CircuitOpenError:
                got = "rejected"
            except dspy.LMError:
                got = "error"
        assert (got, breaker.state) == (outcome, state), f"step {index} ({step})"
    for future in program.futures:
        future.set_result("answer")
    await asyncio.gather(*held, return_exceptions=True)
