"""One process of the multi-process budget tests: ``python budget_process.py URL PREFIX MODE CAP ESTIMATE CALLS``.

``spend``: CALLS calls (5 at a time) of a plain Predict on the fault LM through a Budget named "shared" of CAP
tokens, each estimated at ESTIMATE; prints ``<admitted> <refused> <tokens used>``. ``hang``: one call whose program
never returns, with a 1 s reservation_ttl; prints ``started`` once it runs (the test then kills the process).
"""

from __future__ import annotations

import asyncio
import sys

import dspy

from resilient_dspy import BudgetExceededError, Pipeline, RedisStore
from resilient_dspy.middleware.budget import Budget
from resilient_dspy.testing import FaultInjectingLM


async def hang(question: str) -> str:
    print("started", flush=True)
    await asyncio.Event().wait()
    return "never"


async def main(url: str, prefix: str, mode: str, cap: int, estimate: int, calls: int) -> None:
    store = RedisStore(url, prefix=prefix, timeout=2.0)
    budget = Budget(
        tokens=cap,
        estimate_tokens=lambda call: estimate,
        reservation_ttl=1.0 if mode == "hang" else 600.0,
        store=store,
        on_store_failure="reject",
        name="shared",
    )
    try:
        if mode == "hang":
            await Pipeline(hang, budget)("q")
            return
        lm = FaultInjectingLM()
        pipeline = Pipeline(dspy.Predict("question -> answer"), budget)
        admitted = refused = 0

        async def one() -> None:
            nonlocal admitted, refused
            try:
                await pipeline("What is DSPy?")
                admitted += 1
            except BudgetExceededError:
                refused += 1

        with dspy.context(lm=lm):
            for _ in range(0, calls, 5):
                await asyncio.gather(*(one() for _ in range(5)))
        used = sum(entry.input_tokens + entry.output_tokens for entry in lm.journal)
        print(admitted, refused, used, flush=True)
    finally:
        await store.aclose()


if __name__ == "__main__":
    url, prefix, mode, cap, estimate, calls = sys.argv[1:7]
    asyncio.run(main(url, prefix, mode, int(cap), int(estimate), int(calls)))
