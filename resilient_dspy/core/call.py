"""The one contract every layer is written against: a :class:`Call`, its :class:`CallRecord`, the :class:`Runtime`
a pipeline injects, a :class:`Handler` and a :class:`Middleware`, and the :class:`Lease` an outer layer lends.

See docs/architecture.md (the layout and a call's path) and docs/concepts/writing-middleware.md.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from resilient_dspy.core.clock import Clock
from resilient_dspy.events import Event, Listener, deliver

if TYPE_CHECKING:
    from resilient_dspy.core.trace import Trace

__all__ = [
    "Call",
    "CallRecord",
    "Handler",
    "Lease",
    "Middleware",
    "Runtime",
    "leases_lent",
    "lend_leases",
    "reclaim_leases",
]

Handler = Callable[["Call"], Awaitable[Any]]


@runtime_checkable
class Middleware(Protocol):
    """One layer: do something around ``await next(call)``. Keep per-call state in locals or ``call``."""

    async def __call__(self, call: Call, next: Handler) -> Any: ...


@dataclass(frozen=True, slots=True)
class Runtime:
    """What a pipeline injects into every call: its name, clock, randomness and event listeners."""

    name: str
    clock: Clock
    rng: random.Random
    listeners: tuple[Listener, ...] = ()


class Lease(Protocol):
    """Capacity an outer layer holds for a call (a bulkhead permit), which it lends out while the call only waits
    for another call's work (a cache's single-flight follower) and takes back before the call works again."""

    held: bool

    def lend(self) -> None: ...

    async def reclaim(self, call: Call) -> None: ...


@dataclass(slots=True)
class CallRecord:
    """Shared by every view of one call: what happened, for :class:`Outcome` and reports.

    ``attempts`` counts the times the call reached the program (or a fault injected in its place): a layer that
    judges the provider compares it before and after ``await next(call)``, so a cache hit, a coalesced follower
    or an inner rejection counts as no provider outcome. ``blocked_until`` is set by an inner layer that will
    refuse this call's next attempt until then (an opened circuit), so a Retry above waits exactly that long.
    ``leases`` are the capacities outer layers hold for the call (see :class:`Lease` and :func:`lend_leases`).
    ``hedges`` counts the extra attempts a Hedge started; ``served_hedge`` is the attempt that answered (0 = the
    first, n = hedge n).
    """

    started_at: float
    attempts: int = 0
    retries: int = 0
    served_by: str = "primary"
    trace: Trace | None = None
    blocked_until: float | None = None
    leases: list[Lease] | None = None
    hedges: int = 0
    served_hedge: int = 0

    def absorb(self, nested: CallRecord) -> None:
        """Take in what a nested pipeline's call did: its program runs, retries, hedges, and who served it."""
        self.attempts += nested.attempts
        self.retries += nested.retries
        self.hedges += nested.hedges
        if nested.served_hedge:
            self.served_hedge = nested.served_hedge
        if nested.served_by != "primary":
            self.served_by = nested.served_by
        if nested.blocked_until is not None:
            self.blocked_until = nested.blocked_until


@dataclass(slots=True)
class Call:
    """One invocation as it travels down the stack.

    ``inputs`` are the program's keyword arguments. ``deadline`` is an absolute time on the pipeline clock
    (or None). A layer that changes the context for the layers below passes ``call.replace(...)`` down,
    so layers above never see it; ``properties`` and ``record`` are shared by all views of the call.
    """

    inputs: dict[str, Any]
    runtime: Runtime
    record: CallRecord
    deadline: float | None = None
    attempt: int = 1
    bypass_cache: bool = False
    partition_key: Hashable | None = None
    properties: dict[str, Any] = field(default_factory=dict)

    @property
    def clock(self) -> Clock:
        return self.runtime.clock

    @property
    def rng(self) -> random.Random:
        return self.runtime.rng

    @property
    def listening(self) -> bool:
        """True when someone listens: build events only then, so silence costs nothing."""
        return bool(self.runtime.listeners)

    def emit(self, event: Event) -> None:
        deliver(self.runtime.listeners, event)

    def remaining(self) -> float | None:
        """Seconds left before the deadline (may be negative), or None without a deadline."""
        return None if self.deadline is None else self.deadline - self.runtime.clock.now()

    def replace(self, **changes: Any) -> Call:
        """A copy with ``changes``; a hand copy, as ``dataclasses.replace`` costs ~1 µs on the hot path."""
        copy = Call(
            self.inputs,
            self.runtime,
            self.record,
            self.deadline,
            self.attempt,
            self.bypass_cache,
            self.partition_key,
            self.properties,
        )
        if changes:
            if not _CALL_FIELD_SET.issuperset(changes):
                unknown = sorted(changes.keys() - _CALL_FIELD_SET)
                raise TypeError(f"Call has no field {unknown[0]!r}")
            for name, value in changes.items():
                setattr(copy, name, value)
        return copy

    def with_deadline(self, deadline: float | None) -> Call:
        """``replace(deadline=deadline)`` without the keyword handling (a Timeout, every call)."""
        return Call(
            self.inputs,
            self.runtime,
            self.record,
            deadline,
            self.attempt,
            self.bypass_cache,
            self.partition_key,
            self.properties,
        )

    def for_attempt(self, attempt: int, bypass_cache: bool) -> Call:
        """``replace(attempt=attempt, bypass_cache=bypass_cache)`` without the keyword handling (Retry, every retry)."""
        return Call(
            self.inputs,
            self.runtime,
            self.record,
            self.deadline,
            attempt,
            bypass_cache,
            self.partition_key,
            self.properties,
        )


_CALL_FIELDS = tuple(f.name for f in dataclasses.fields(Call))
_CALL_FIELD_SET = frozenset(_CALL_FIELDS)
_HAND_COPIED = ("inputs", "runtime", "record", "deadline", "attempt", "bypass_cache", "partition_key", "properties")
if _CALL_FIELDS != _HAND_COPIED:  # pragma: no cover
    raise AssertionError("Call's fields changed: update Call.replace, with_deadline and for_attempt")


def leases_lent(call: Call) -> bool:
    """True when a capacity held for ``call`` is lent out (it must be taken back before the call works)."""
    # a loop, not any(): no generator on every cache lookup under a Bulkhead (0.3 against 0.8-1.0 µs)
    for lease in call.record.leases or ():  # noqa: SIM110
        if not lease.held:
            return True
    return False


def lend_leases(call: Call) -> None:
    """Lend out every capacity held for ``call``: it is about to wait for another call's work."""
    for lease in call.record.leases or ():
        lease.lend()


async def reclaim_leases(call: Call) -> None:
    """Take back every lease :func:`lend_leases` lent, outermost first, before the call does work of its own."""
    for lease in call.record.leases or ():
        await lease.reclaim(call)
