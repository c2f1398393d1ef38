"""One process of the multi-process breaker test: ``python breaker_process.py URL PREFIX STEP`` runs one call through
a CircuitBreaker named "shared" on that store and prints ``answer``, ``error`` or ``rejected``."""

from __future__ import annotations

import asyncio
import sys

from resilient_dspy import CircuitBreaker, Pipeline, RedisStore
from tests.middleware.breaker_steps import program, run


async def main(url: str, prefix: str, step: str) -> None:
    store = RedisStore(url, prefix=prefix, timeout=2.0)
    breaker = CircuitBreaker(1, break_duration=60.0, store=store, on_store_failure="reject", name="shared")
    try:
        print(await run(Pipeline(program, breaker), step), flush=True)
    finally:
        await store.aclose()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
