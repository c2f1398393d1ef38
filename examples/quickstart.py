"""Quickstart: a ChainOfThought program that survives rate limits, 5xx errors and hangs.

Runs offline against the fault-injecting LM; swap in ``dspy.LM("openai/gpt-4o-mini", num_retries=0)``.
A 429, a 5xx and a hang cost three retries; the fourth attempt answers.

Expected output::

    A local answer #80 to: What is DSPy?
    served by primary after 4 attempts; LM saw 4 requests
"""

import asyncio

import dspy

from resilient_dspy import Fallback, Pipeline, Retry, Static, Timeout
from resilient_dspy.testing import FaultInjectingLM


async def main() -> None:
    lm = FaultInjectingLM(script=["rate_limit", "server_error", "hang"])  # three faults, then answers
    pipeline = Pipeline(
        dspy.ChainOfThought("question -> answer"),
        Fallback(Static(answer="Sorry, try again later.")),  # outermost: catches whatever is left
        Timeout(10.0),  # total deadline, retries included
        Retry(4, base_delay=0.05, max_retry_after=0.2),  # honours Retry-After, capped for the demo
        Timeout(0.5),  # per attempt: a hang becomes a retryable timeout
    )
    with dspy.context(lm=lm):
        outcome = await pipeline.invoke("What is DSPy?")
    print(outcome.value.answer)
    print(f"served by {outcome.served_by} after {outcome.attempts} attempts; LM saw {lm.requests} requests")


if __name__ == "__main__":
    asyncio.run(main())
