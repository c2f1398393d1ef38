"""Writing a middleware: one small class. This one records each attempt's latency and outcome.

Expected output (the latencies vary)::

    A local answer #9041 to: What is a middleware?
    attempt 1: LMServerError in ... ms
    attempt 2: ok in ... ms
"""

import asyncio
from dataclasses import dataclass, field
from typing import Any

import dspy

from resilient_dspy import Pipeline, Retry
from resilient_dspy.core import Call, Handler
from resilient_dspy.testing import FaultInjectingLM


@dataclass
class AttemptLog:
    """Appends (attempt, seconds, outcome) for every attempt that passes through it."""

    entries: list[tuple[int, float, str]] = field(default_factory=list)

    async def __call__(self, call: Call, next: Handler) -> Any:
        started = call.clock.now()
        try:
            result = await next(call)
        except Exception as error:  # never BaseException: cancellation must pass untouched
            self.entries.append((call.attempt, call.clock.now() - started, type(error).__name__))
            raise
        self.entries.append((call.attempt, call.clock.now() - started, "ok"))
        return result


async def main() -> None:
    log = AttemptLog()
    pipeline = Pipeline(dspy.Predict("question -> answer"), Retry(3, base_delay=0.01), log)
    with dspy.context(lm=FaultInjectingLM(script=["server_error"])):
        prediction = await pipeline("What is a middleware?")
    print(prediction.answer)
    for attempt, seconds, outcome in log.entries:
        print(f"attempt {attempt}: {outcome} in {seconds * 1000:.1f} ms")
    assert [outcome for _, _, outcome in log.entries] == ["LMServerError", "ok"]


if __name__ == "__main__":
    asyncio.run(main())
