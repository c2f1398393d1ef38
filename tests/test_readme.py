"""The README's recommended stack, built from the README's own code block, serves the burst the README promises."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import dspy

from resilient_dspy import Pipeline
from resilient_dspy.testing import FaultInjectingLM

README = Path(__file__).parent.parent / "README.md"


def readme_pipeline() -> Pipeline:
    """A fresh ``pipeline`` from the README's Quickstart code block (run without its ``asyncio.run(main())``)."""
    text = README.read_text()
    block = text.split("## Quickstart", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {"__name__": "readme_quickstart"}
    exec(compile(block.replace("asyncio.run(main())", ""), str(README), "exec"), namespace)
    pipeline = namespace["pipeline"]
    assert isinstance(pipeline, Pipeline)
    return pipeline


def promised_burst() -> tuple[int, tuple[float, float]]:
    """The burst size and per-request latency range the README states for its stack."""
    promise = r"serves a burst of \*\*(\d+) concurrent calls\*\*.*?([\d.]+)[\u2013-]([\d.]+) s"
    found = re.search(promise, README.read_text(), re.S)
    assert found, "the README states the burst its stack serves"
    return int(found[1]), (float(found[2]), float(found[3]))


async def test_readme_stack_serves_the_promised_burst_from_the_primary() -> None:
    """N concurrent calls on a healthy LM: every one answered by the primary, none by the fallback, none lost."""
    burst, latency = promised_burst()
    assert burst >= 300
    pipeline = readme_pipeline()
    lm = FaultInjectingLM(profile={"latency": latency}, seed=1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with dspy.context(lm=lm):
        outcomes = await asyncio.gather(*(pipeline.invoke(f"Question {i}?") for i in range(burst)))
    served = [outcome.served_by for outcome in outcomes]
    print(f"{burst} concurrent calls: {served.count('primary')} by the primary in {loop.time() - started:.1f}s")
    assert served.count("primary") == burst
    assert lm.requests == burst


async def test_default_bulkhead_queues_a_burst_of_300_instead_of_rejecting() -> None:
    """Bulkhead() with its defaults runs 10 at a time and queues the rest of a 300-call burst: none is rejected."""
    from resilient_dspy import Bulkhead

    async def answer(question: str) -> str:
        await asyncio.sleep(0.5)
        return question

    pipeline = Pipeline(answer, Bulkhead())
    answers = await asyncio.gather(*(pipeline(f"q{i}") for i in range(300)), return_exceptions=True)
    assert answers == [f"q{i}" for i in range(300)]
