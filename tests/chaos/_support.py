"""Shared helpers of the fault-injection suite: the per-example looptime loop and the budget decorator."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import looptime
from hypothesis import HealthCheck, settings

T = TypeVar("T")


def examples(quick: int) -> settings:
    """``quick`` examples in the default run; the ``chaos`` profile's (deep) budget when it is loaded."""
    if settings.get_current_profile_name() == "chaos":
        return settings(deadline=None)
    return settings(max_examples=quick, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run_virtual(scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run one example on a fresh looptime loop (virtual time), closed after; a hang fails at once, virtually."""
    loop = looptime.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(scenario(), timeout=1_000_000))
    finally:
        loop.close()
