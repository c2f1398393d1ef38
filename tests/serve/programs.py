"""Programs the serve tests name in their stack configs (by import path)."""

from __future__ import annotations

import asyncio

from resilient_dspy.errors import RateLimitedError


async def echo(question: str) -> str:
    return f"echo: {question}"


async def slow(question: str) -> str:
    await asyncio.sleep(float(question))
    return f"slept {question}"


async def broken(question: str) -> str:
    if question == "boom":
        raise RuntimeError("internal secret detail")
    if question == "limited":
        raise RateLimitedError(retry_after=2.5)
    return question
