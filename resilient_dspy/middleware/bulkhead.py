"""Bulkhead: bound how many calls run at once below this layer, with a bounded FIFO queue in front.

At most ``max_concurrent`` calls run (per key); up to ``max_queue`` more wait in strict FIFO order, each for at
most ``max_wait`` seconds and never past the call's deadline. A call that finds the queue full, or whose deadline
has already passed when it would have to queue, is rejected at once with :class:`BulkheadFullError`. A finishing
call hands its permit straight to the first live waiter, so no newcomer can barge in; a waiter cancelled after it
was handed a permit passes it on, so cancellation never leaks a permit, nor does a listener that raises on an event
of this layer. No background task is involved.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from resilient_dspy.core.health import LayerHealth, key_name
from resilient_dspy.core.layer import Layer
from resilient_dspy.core.options import Options, options_from
from resilient_dspy.errors import BulkheadFullError
from resilient_dspy.events import Event, Rejected
from resilient_dspy.middleware._shared.leases import CompartmentLease
from resilient_dspy.middleware._shared.partitions import Hold, KeyedStates, KeyFunction, PartitionOptions
from resilient_dspy.middleware._shared.waiting import give_up_at, wait_until

if TYPE_CHECKING:
    from resilient_dspy.core.call import Call, Handler
    from resilient_dspy.core.pipeline import Pipeline

__all__ = [
    "Bulkhead",
    "BulkheadAcquired",
    "BulkheadOptions",
    "BulkheadQueued",
    "BulkheadRejected",
    "BulkheadSnapshot",
]


class BulkheadOptions(PartitionOptions):
    """How many calls may run and wait; see docs/patterns/bulkhead.md."""

    max_concurrent: int = Field(default=10, ge=1, description="Calls running below the bulkhead at once (per key).")
    max_queue: int = Field(
        default=1000, ge=0, description="Calls waiting in FIFO order for a slot (per key); 0 = reject when full."
    )
    max_wait: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="Seconds a call may wait in the queue; None = no bound."
    )
    name: str | None = Field(default=None, description="Label in events and describe().")


@dataclass(frozen=True, slots=True, kw_only=True)
class BulkheadQueued(Event):
    """Every slot was busy: the call joined the queue at ``position`` (1 = next to run)."""

    key: Hashable
    position: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BulkheadAcquired(Event):
    """A queued call got its slot after ``waited`` seconds."""

    key: Hashable
    waited: float


@dataclass(frozen=True, slots=True, kw_only=True)
class BulkheadRejected(Rejected):
    """The call was refused without running; ``reason`` is ``queue_full``, ``max_wait`` or ``deadline``."""

    key: Hashable
    reason: str
    waited: float


@dataclass(frozen=True, slots=True)
class BulkheadSnapshot:
    """The occupancy of one compartment (see :meth:`Bulkhead.snapshot`)."""

    key: Hashable
    in_flight: int
    queued: int
    max_concurrent: int
    max_queue: int


class Bulkhead(Layer):
    """Run at most ``max_concurrent`` calls at once below this layer; queue up to ``max_queue`` more (FIFO)."""

    placement: ClassVar[str] = "bulkhead"
    options_type: ClassVar[type[Options]] = BulkheadOptions
    options: BulkheadOptions

    def __init__(
        self,
        max_concurrent: int = 10,
        *,
        max_queue: int = 1000,
        max_wait: float | None = None,
        key: KeyFunction | None = None,
        max_keys: int = 1024,
        idle_after: float = 600.0,
        name: str | None = None,
    ) -> None:
        self.options = options_from(BulkheadOptions, "Bulkhead", locals())
        self._max_concurrent = self.options.max_concurrent
        self._states: KeyedStates[_Compartment] = KeyedStates(self.options, _Compartment)
        self._single = self._states.single
        self._key_of, self._partitions = self.options.key, self._states.partitions  # the keyed hot path, inlined
        self._lends = False

    def on_build(self, pipeline: Pipeline) -> None:
        """Lend permits out only when a layer below may make a call wait for another's work (``coalesces``)."""
        _, inner = pipeline.layers_around(self)
        self._lends = any(getattr(layer, "coalesces", False) for layer in inner)

    async def __call__(self, call: Call, next: Handler) -> Any:
        compartment = self._single
        if compartment is None:
            key_of = self._key_of
            assert key_of is not None
            key = key_of(call)
            compartment = self._partitions.get(key, call.clock.now())
        else:
            key = None
        if compartment.in_flight < self._max_concurrent:
            compartment.in_flight += 1
        else:
            await self._wait(call, compartment, key)
        if not self._lends:
            try:
                return await next(call)
            finally:
                compartment.release()
        permit = CompartmentLease(self._take, compartment, key)
        record = call.record
        leases = record.leases
        if leases is None:
            leases = record.leases = []
        leases.append(permit)
        try:
            return await next(call)
        finally:
            leases.remove(permit)
            if permit.held:
                permit.compartment.release()

    async def _take(self, call: Call, key: Hashable) -> _Compartment:
        """A permit again for a call that lent its own (a lent ``CompartmentLease``), by the same rules as a
        new call."""
        compartment = self._states.get(key, call.clock.now())
        if compartment.in_flight < self._max_concurrent:
            compartment.in_flight += 1
        else:
            await self._wait(call, compartment, key)
        return compartment

    async def _wait(self, call: Call, compartment: _Compartment, key: Hashable) -> None:
        """Queue for a permit; return holding one, or raise :class:`BulkheadFullError` (or the cancellation)."""
        options = self.options
        clock = call.clock
        now = clock.now()
        waiters = compartment.waiters
        if len(waiters) >= options.max_queue and compartment.queued() >= options.max_queue:
            raise self._reject(call, compartment, key, "queue_full", 0.0)
        give_up = give_up_at(now, options.max_wait, call.deadline)
        if give_up.reached(now):
            raise self._reject(call, compartment, key, give_up.reason, 0.0)

        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.append(waiter)
        try:  # from here on every exit gives the place (or the permit handed to it) back, a listener's included
            self.emit(call, BulkheadQueued, key=key, position=len(waiters))
            expired = not await wait_until(clock, waiter, give_up.at)
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                compartment.release()
            else:
                compartment.forget(waiter)
            raise
        if expired and (not waiter.done() or waiter.cancelled()):
            compartment.forget(waiter)
            raise self._reject(call, compartment, key, give_up.reason, clock.now() - now)
        if call.listening:
            try:
                self.emit(call, BulkheadAcquired, key=key, waited=clock.now() - now)
            except BaseException:  # a listener's KeyboardInterrupt & co.: the call ends, its permit goes on
                compartment.release()
                raise

    def _reject(
        self, call: Call, compartment: _Compartment, key: Hashable, reason: str, waited: float
    ) -> BulkheadFullError:
        self.emit(call, BulkheadRejected, key=key, reason=reason, waited=waited)
        what = {"queue_full": "queue full", "max_wait": "max_wait passed", "deadline": "deadline passed"}[reason]
        return BulkheadFullError(
            f"{self.name}{'' if key is None else f'[{key!r}]'}: {what} "
            f"({compartment.in_flight}/{self._max_concurrent} running, {compartment.queued()} queued)"
        )

    def snapshot(self, key: Hashable = None) -> BulkheadSnapshot:
        """Running and queued calls of the compartment for ``key`` (the only one when there is no ``key=``)."""
        compartment = self._states.peek(key)
        in_flight, queued = (0, 0) if compartment is None else (compartment.in_flight, compartment.queued())
        return BulkheadSnapshot(key, in_flight, queued, self._max_concurrent, self.options.max_queue)

    def snapshots(self) -> dict[Hashable, BulkheadSnapshot]:
        """Every live compartment's snapshot by key (``{None: ...}`` when there is no ``key=``)."""
        return {key: self.snapshot(key) for key, _ in self._states.items()}

    def health(self) -> LayerHealth:
        """Degraded when any compartment is full (calls queue or are refused); never down: it is load, not loss."""
        compartments = self._states.items()
        details = {
            key_name(key): {"in_flight": c.in_flight, "queued": c.queued(), "max_concurrent": self._max_concurrent}
            for key, c in compartments
        }
        full = any(c.in_flight >= self._max_concurrent for _, c in compartments)
        return LayerHealth(self.name, "degraded" if full else "ok", {"compartments": details})

    def describe_state(self) -> dict[str, Any]:
        """Whether placement made it lend permits (a coalescing layer below)."""
        return {"lends_permits": self._lends}


class _Compartment:
    """The state of one key: running calls, and the futures of queued calls in arrival order.

    Invariant: a waiter exists only while every slot is taken, so ``in_flight < max_concurrent`` alone says a
    newcomer may run without barging past anyone.
    """

    __slots__ = ("in_flight", "key", "waiters")

    def __init__(self, key: Hashable) -> None:
        self.key = key
        self.in_flight = 0
        self.waiters: deque[asyncio.Future[None]] = deque()

    def hold(self, now: float) -> Hold:
        """Holders or waiters are calls; an empty compartment protects nothing (a fresh one admits the same)."""
        return Hold.CALLS if self.in_flight or self.waiters else Hold.NOTHING

    def queued(self) -> int:
        """Waiters still waiting (a cancelled one stays in the deque until its task runs its cleanup)."""
        return sum(1 for waiter in self.waiters if not waiter.done())

    def release(self) -> None:
        """Give this permit to the first live waiter, or free the slot when nobody waits."""
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.in_flight -= 1

    def forget(self, waiter: asyncio.Future[None]) -> None:
        """Take a waiter that gives up out of the queue (the releaser may already have dropped it)."""
        with contextlib.suppress(ValueError):
            self.waiters.remove(waiter)
