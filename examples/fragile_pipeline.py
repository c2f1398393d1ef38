"""A deliberately fragile pipeline, for ``resilient-dspy chaos examples/fragile_pipeline.py:build``.

What is wrong with it: no timeout (a hung request hangs the caller), a Retry that retries everything (auth and
context-window errors included), no fallback, and DSPy's own retries left on under our Retry (the attempts
multiply). Run as a script, it makes one call through a healthy local LM and prints the answer.

Expected output::

    fragile pipeline answered: A local answer #9075 to: Why is this pipeline fragile?
    now try: resilient-dspy chaos examples/fragile_pipeline.py:build
"""

from __future__ import annotations

import asyncio
import os
import warnings

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy

from resilient_dspy import Pipeline, Retry
from resilient_dspy.errors import ResilienceWarning

# The LM the program would use in production: DSPy's retries on (num_retries=3), under our Retry. The chaos
# command mirrors this setting on the fault-injecting LM it puts in its place.
dspy.configure(lm=dspy.LM("openai/gpt-4o-mini", num_retries=3, cache=False))


def build() -> Pipeline:
    """The fragile pipeline: Retry(5) on every exception, and nothing else."""
    return Pipeline(
        dspy.ChainOfThought("question -> answer"),
        Retry(5, retry_on=Exception, base_delay=0.2),
        name="fragile",
    )


async def main() -> None:
    from resilient_dspy.testing import FaultInjectingLM

    pipeline = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResilienceWarning)
        with dspy.context(lm=FaultInjectingLM(num_retries=3)):
            answer = await pipeline(question="Why is this pipeline fragile?")
    print(f"fragile pipeline answered: {answer.answer[:60]}")
    print("now try: resilient-dspy chaos examples/fragile_pipeline.py:build")


if __name__ == "__main__":
    asyncio.run(main())
