"""A fallback chain: on a context-window error, rerun the stack with a larger-context model.

Expected output::

    served by large-context: A local answer #... to: a very long text a very long text ...
"""

import asyncio

import dspy

from resilient_dspy import Fallback, Pipeline, Retry, Static, UseLM
from resilient_dspy.testing import FaultInjectingLM


async def main() -> None:
    small = FaultInjectingLM("fault/small-context", script=["context_window"])
    large = FaultInjectingLM("fault/large-context")
    pipeline = Pipeline(
        dspy.Predict("document, question -> answer"),
        Fallback(
            UseLM(large, name="large-context", on=dspy.ContextWindowExceededError),
            Static(answer="The document is too long for me.", name="apology"),
        ),
        Retry(3, base_delay=0.01),  # never retries a context-window error: it would fail the same way
    )
    with dspy.context(lm=small):
        outcome = await pipeline.invoke(document="a very long text " * 50, question="What is it about?")
    print(f"served by {outcome.served_by}: {outcome.value.answer}")
    assert outcome.served_by == "large-context" and small.requests == 1 and large.requests == 1


if __name__ == "__main__":
    asyncio.run(main())
