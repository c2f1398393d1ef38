"""Wait for half-open (``wait_for_half_open=True``): a call that finds the circuit open waits for the break to end
instead of being refused, then competes for the probe like any call.

A waiter gives up at ``max_wait`` after it arrived or at its deadline, whichever is first; when the break cannot end
before then it is refused at once (waiting would only end in the same refusal). A waiter that finds the circuit
half-open with its probes out keeps waiting — for the probes' outcome (a close lets it through; a re-open starts a
new break, which it waits for only if that break ends before it gives up) — and is refused when its time is up. It
wakes on a transition this process sees (the layer's change signal), at the time the circuit gave as
``retry_after``, or (on a store, whose other processes' transitions it cannot see) after ``poll`` seconds while
half-open — only one waiter per key polls; it wakes the others when it stops waiting, so N waiters cost one
round trip per poll, not N. No task is started: the wait is a bounded await in the calling task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING, NamedTuple, TypeVar

from resilient_dspy.errors import CircuitOpenError
from resilient_dspy.middleware._shared.waiting import give_up_at, wait_until
from resilient_dspy.middleware.breaker.events import CircuitRejected, CircuitState, CircuitWaited, CircuitWaiting

if TYPE_CHECKING:
    from resilient_dspy.core.call import Call
    from resilient_dspy.core.layer import Layer

__all__ = ["ChangeSignals", "Refused", "wait_for_half_open"]

T = TypeVar("T")

_LEAST_WAIT = 1e-3
"""The shortest sleep between two admissions of one waiter, so a ``retry_after`` of 0 cannot spin."""


class Refused(NamedTuple):
    """An admission refused: the circuit's state and the rejection to raise (``retry_after`` None when isolated)."""

    state: CircuitState
    error: CircuitOpenError


class ChangeSignals:
    """One :class:`asyncio.Event` per circuit key with waiters, set (and dropped) at that circuit's next
    transition: waiters wake on the change instead of polling. ``watching`` holds the keys whose shared half-open
    circuit one waiter of this process polls for the others."""

    __slots__ = ("events", "watching")

    def __init__(self) -> None:
        self.events: dict[Hashable, asyncio.Event] = {}
        self.watching: set[Hashable] = set()

    def of(self, key: Hashable) -> asyncio.Event:
        event = self.events.get(key)
        if event is None:
            event = self.events[key] = asyncio.Event()
        return event

    def changed(self, key: Hashable) -> None:
        event = self.events.pop(key, None)
        if event is not None:
            event.set()


async def wait_for_half_open(
    layer: Layer,
    call: Call,
    key: Hashable,
    refused: Refused,
    arrived: float,
    max_wait: float | None,
    signals: ChangeSignals,
    admit: Callable[[float], Awaitable[T | Refused]],
    poll: float | None = None,
) -> T:
    """Wait until ``admit(now)`` grants the call (its admission is returned) or the call must give up (the latest
    refusal is raised, after :class:`CircuitRejected`). With ``poll`` (a shared circuit), one waiter per key polls
    a half-open circuit for this process and wakes the others when it stops waiting."""
    clock = call.clock
    give_up = give_up_at(arrived, max_wait, call.deadline)
    now = arrived
    waiting = watcher = False
    try:
        while True:
            state, error = refused
            retry_after = error.retry_after
            hopeless = (
                state is CircuitState.ISOLATED
                or retry_after is None
                or give_up.reached(now)
                or (state is CircuitState.OPEN and give_up.before(now + retry_after))
            )
            if hopeless:
                layer.emit(call, CircuitRejected, key=key, state=state, retry_after=retry_after)
                if waiting:
                    layer.emit(call, CircuitWaited, key=key, waited=now - arrived, admitted=False)
                raise error
            assert retry_after is not None
            wake = now + max(retry_after, _LEAST_WAIT)
            if poll is not None and state is CircuitState.HALF_OPEN:
                if not watcher and key not in signals.watching:
                    signals.watching.add(key)
                    watcher = True
                if watcher:
                    wake = min(wake, now + max(poll, _LEAST_WAIT))
            if not waiting:
                waiting = True
                layer.emit(call, CircuitWaiting, key=key, state=state, retry_after=retry_after, until=give_up.at)
            until = wake if give_up.at is None else min(wake, give_up.at)
            await wait_until(clock, signals.of(key).wait(), until)
            now = clock.now()
            outcome = await admit(now)
            if not isinstance(outcome, Refused):
                layer.emit(call, CircuitWaited, key=key, waited=now - arrived, admitted=True)
                return outcome
            refused = outcome
    finally:
        if watcher:  # the others ask again: one of them takes over, or they find the circuit closed
            signals.watching.discard(key)
            signals.changed(key)
