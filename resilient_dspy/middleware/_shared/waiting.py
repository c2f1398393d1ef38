"""Bounded waits for the layers that queue calls (Bulkhead, RateLimiter): when a waiting call gives up, and a wait
on the pipeline clock that ends at that time without swallowing anyone else's cancellation."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from resilient_dspy.core.clock import Clock

__all__ = ["GiveUp", "give_up_at", "wait_until"]


class GiveUp(NamedTuple):
    """When a waiting call stops waiting (``at``, None = never) and why (``reason``: ``max_wait`` or ``deadline``)."""

    at: float | None
    reason: str

    def reached(self, now: float) -> bool:
        """The give-up time is ``now`` or earlier: a call that would have to wait is refused at once."""
        return self.at is not None and self.at <= now

    def before(self, when: float) -> bool:
        """The give-up time comes before ``when``: waiting until ``when`` would only end in a refusal."""
        return self.at is not None and when > self.at


def give_up_at(arrived: float, max_wait: float | None, deadline: float | None) -> GiveUp:
    """The earlier of ``arrived + max_wait`` and the call's deadline; on a tie the deadline is the reason."""
    if max_wait is not None and (deadline is None or arrived + max_wait < deadline):
        return GiveUp(arrived + max_wait, "max_wait")
    return GiveUp(deadline, "deadline")


async def wait_until(clock: Clock, awaitable: Awaitable[object], until: float | None) -> bool:
    """Await ``awaitable`` until ``clock`` reaches ``until`` (None: no bound): True when it finished, False when the
    time ran out first. A cancellation from elsewhere (the caller, an enclosing deadline) propagates as it is."""
    if until is None:
        await awaitable
        return True
    scope = clock.deadline(until)
    try:
        async with scope:
            await awaitable
    except TimeoutError:
        if not scope.expired():
            raise
        return False
    return True
