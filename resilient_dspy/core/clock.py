"""The time source of a pipeline: injected per pipeline so tests run on virtual time.

The default :class:`LoopClock` reads the running event loop's clock, so whole-loop virtual time (e.g.
``looptime``) drives every layer, and its deadlines are asyncio's own (cancellation-safe) timeouts.

Part of the core (docs/architecture.md: the layout, a call's path, the rules).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, runtime_checkable

__all__ = ["Clock", "DeadlineScope", "LoopClock"]


class DeadlineScope(AbstractAsyncContextManager[object], Protocol):
    """What ``Clock.deadline`` returns: a timeout scope that can tell whether it fired (``asyncio.Timeout``)."""

    def expired(self) -> bool: ...


@runtime_checkable
class Clock(Protocol):
    """Monotonic time, sleeping, and a deadline scope, all on one time base."""

    def now(self) -> float:
        """Monotonic seconds on this clock's time base."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` on this clock; cancellable."""
        ...

    def deadline(self, when: float) -> DeadlineScope:
        """A scope that cancels its body at ``when`` and then raises ``TimeoutError`` (like ``asyncio.timeout_at``)."""
        ...


class LoopClock:
    """The running event loop's clock (``loop.time()``): the default for every pipeline."""

    __slots__ = ()

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def sleep(self, seconds: float) -> Coroutine[Any, Any, None]:
        # asyncio.sleep's own coroutine, not one wrapping it: one frame less per retry
        return asyncio.sleep(seconds)

    def deadline(self, when: float) -> asyncio.Timeout:
        return asyncio.timeout_at(when)

    def __repr__(self) -> str:
        return "LoopClock()"
