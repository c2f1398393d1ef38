"""A sturdy pipeline, for ``resilient-dspy chaos examples/sturdy_pipeline.py:build``.

The recommended layers: a static fallback, a total deadline, a Retry that retries only transient errors (the default
classification) under a retry budget, a circuit breaker, a bulkhead and a per-attempt timeout; DSPy's own retries
are off. Run as a script, it makes one call through a healthy local LM and prints the answer.

Expected output::

    sturdy pipeline answered (primary): A local answer #9741 to: Why is this pipeline sturdy?
    now try: resilient-dspy chaos examples/sturdy_pipeline.py:build
"""

from __future__ import annotations

import asyncio
import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy

from resilient_dspy import Bulkhead, CircuitBreaker, Fallback, Pipeline, Retry, Static, Timeout

# In production: dspy.configure(lm=dspy.LM("openai/gpt-4o-mini", num_retries=0)); our Retry does the retrying.
dspy.configure(lm=dspy.LM("openai/gpt-4o-mini", num_retries=0, cache=False))


def build() -> Pipeline:
    """Fallback ▶ Timeout(total) ▶ Retry ▶ CircuitBreaker ▶ Bulkhead ▶ Timeout(attempt) ▶ program."""
    return Pipeline(
        dspy.ChainOfThought("question -> answer"),
        Fallback(Static(answer="The service is busy; please try again shortly.")),
        Timeout(20.0),
        Retry(4, base_delay=0.2, max_delay=2.0, max_retry_after=3.0),
        CircuitBreaker(failure_rate=0.5, window=20, min_calls=10, break_duration=5.0),
        Bulkhead(8, max_queue=32),
        Timeout(3.0),
        name="sturdy",
    )


async def main() -> None:
    from resilient_dspy.testing import FaultInjectingLM

    pipeline = build()
    with dspy.context(lm=FaultInjectingLM()):
        outcome = await pipeline.invoke(question="Why is this pipeline sturdy?")
    print(f"sturdy pipeline answered ({outcome.served_by}): {outcome.value.answer[:60]}")
    print("now try: resilient-dspy chaos examples/sturdy_pipeline.py:build")


if __name__ == "__main__":
    asyncio.run(main())
