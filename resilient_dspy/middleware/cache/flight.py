"""Single-flight: concurrent identical misses share one program call (docs/patterns/cache.md, "Single-flight").

The first call to miss a key leads: it runs the layers below and publishes its answer, or its error, on a future
that the calls arriving meanwhile (its followers) wait on through ``asyncio.shield``, so a follower's cancellation
ends only its own wait. A leader that is cancelled publishes :data:`RETRY`: the first follower to wake leads next.
A call whose own ancestor leads the flight (a reentrant call) must not wait on it: it would wait on itself.
"""

from __future__ import annotations

import asyncio
import contextvars
from dataclasses import dataclass
from typing import Any

__all__ = ["RETRY", "Answer", "Flights", "fail", "lead", "leads", "stop_leading"]


@dataclass(slots=True)
class Answer:
    """What a leader hands its followers: the encoded answer (for fresh copies), who served it, its usage."""

    value: Any
    data: bytes | None
    served_by: str
    usage: dict[str, Any]
    tokens: int
    fallback: bool


RETRY = object()
"""Published by a leader that did not finish (cancelled): a follower runs the call itself."""

# The flights this task chain leads (inherited by the program's coroutine and every task it creates): a call that
# finds one of them in flight is reentrant, and waiting on it would wait on itself.
_LEADING: contextvars.ContextVar[tuple[asyncio.Future[Any], ...]] = contextvars.ContextVar(
    "resilient_dspy_cache_leading", default=()
)


class Flights:
    """The flights in progress of one Cache, by key, on the running event loop."""

    __slots__ = ("_flights",)

    def __init__(self) -> None:
        self._flights: dict[str, asyncio.Future[Any]] = {}

    def find(self, key: str) -> asyncio.Future[Any] | None:
        """The flight of ``key`` in progress on this loop (one left by another loop is forgotten), or None."""
        flight = self._flights.get(key)
        if flight is not None and flight.get_loop() is not asyncio.get_running_loop():
            del self._flights[key]
            return None
        return flight

    def start(self, key: str) -> asyncio.Future[Any]:
        """A new flight of ``key``, led by the caller."""
        flight = self._flights[key] = asyncio.get_running_loop().create_future()
        return flight

    def end(self, key: str, flight: asyncio.Future[Any]) -> None:
        """Forget ``flight`` once its leader is done (a later flight of the same key is left alone)."""
        if self._flights.get(key) is flight:
            del self._flights[key]


def leads(flight: asyncio.Future[Any]) -> bool:
    """True when this task or one of its ancestors leads ``flight`` (a reentrant call)."""
    return flight in _LEADING.get()


def lead(flight: asyncio.Future[Any]) -> contextvars.Token[tuple[asyncio.Future[Any], ...]]:
    """Mark this task chain as the leader of ``flight`` (until :func:`stop_leading`)."""
    return _LEADING.set((*_LEADING.get(), flight))


def stop_leading(token: contextvars.Token[tuple[asyncio.Future[Any], ...]]) -> None:
    _LEADING.reset(token)


def fail(flight: asyncio.Future[Any], error: BaseException) -> None:
    """Hand the leader's error to the followers (marked retrieved: no follower may be left to read it)."""
    flight.set_exception(error)
    flight.exception()
