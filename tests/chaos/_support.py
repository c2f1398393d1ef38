"""Shared helpers of the fault-injection suite: the per-example looptime loop and the budget decorator."""

from __future__ import annotations

from typing import TypeVar

from hypothesis import HealthCheck, settings

T = TypeVar("T")


def examples(quick: int) -> settings:
    """``quick`` examples in the default run; the ``chaos`` profile's (deep) budget when it is loaded."""
    if settings.get_current_profile_name() == "chaos":
        return settings(deadline=None)
    return settings(max_examples=quick, deadline=None, suppress_health_check=[HealthCheck.too_slow])
