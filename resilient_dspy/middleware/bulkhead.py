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
from typing import TYPE_CHECKING, Any

from pydantic import Field

from resilient_dspy.core.health import LayerHealth, key_name
from resilient_dspy.core.options import build_options
from resilient_dspy.errors import BulkheadFullError
from resilient_dspy.events import Event, Rejected
from resilient_dspy.middleware._shared.partitions import Hold, KeyFunction, PartitionOptions, Partitions

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


class _Compartment:
    """The state of one key: running calls, and the futures of queued calls in arrival order.

    Invariant: a waiter exists only while every slot is taken, so ``in_flight < max_concurrent`` alone says a
    newcomer may run without barging past anyone.
    """

    __slots__ = ("in_flight", "key", "waiters")

    def __init__(self, key: Hashable = None) -> None:
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


class _Permit:
    """A call's permit as a :class:`~resilient_dspy.core.call.Lease`: lent out (the slot freed for other calls)
    while a Cache below makes the call wait for an identical call's answer, taken back before it runs itself."""

    __slots__ = ("bulkhead", "compartment", "held", "key")

    def __init__(self, bulkhead: Bulkhead, compartment: _Compartment, key: Hashable) -> None:
        self.bulkhead = bulkhead
        self.compartment = compartment
        self.key = key
        self.held = True

    def lend(self) -> None:
        if self.held:
            self.held = False
            self.compartment.release()

    async def reclaim(self, call: Call) -> None:
        if not self.held:
            self.compartment = await self.bulkhead._take(call, self.key)
            self.held = True


class Bulkhead:
    """Run at most ``max_concurrent`` calls at once below this layer; queue up to ``max_queue`` more (FIFO)."""

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
        self.options = build_options(
            BulkheadOptions,
            "Bulkhead",
            {
                "max_concurrent": max_concurrent,
                "max_queue": max_queue,
                "max_wait": max_wait,
                "key": key,
                "max_keys": max_keys,
                "idle_after": idle_after,
                "name": name,
            },
        )
        self.name = self.options.name or "Bulkhead"
        self._max_concurrent = self.options.max_concurrent
        self._key_of = self.options.key
        self._single = _Compartment()
        self._partitions: Partitions[_Compartment] = Partitions(
            self._new_compartment, max_keys=self.options.max_keys, idle_after=self.options.idle_after
        )
        self._lends = False

    def _new_compartment(self, key: Hashable) -> _Compartment:
        return _Compartment(key)

    def on_build(self, pipeline: Pipeline) -> None:
        """Lend permits out only when a layer below may make a call wait for another's work (``coalesces``)."""
        layers = pipeline.layers
        below = layers[next(i for i, layer in enumerate(layers) if layer is self) + 1 :]
        self._lends = any(getattr(layer, "coalesces", False) for layer in below)

    async def __call__(self, call: Call, next: Handler) -> Any:
        key_of = self._key_of
        if key_of is None:
            compartment, key = self._single, None
        else:
            key = key_of(call)
            compartment = self._partitions.get(key, call.clock.now())
        if compartment.in_flight < self._max_concurrent:
            compartment.in_flight += 1
        else:
            await self._wait(call, compartment, key)
        if not self._lends:
            try:
                return await next(call)
            finally:
                compartment.release()
        permit = _Permit(self, compartment, key)
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
        """A permit again for a call that lent its own (see :class:`_Permit`), by the same rules as a new call."""
        compartment = self._single if self._key_of is None else self._partitions.get(key, call.clock.now())
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
        deadline = call.deadline
        give_up, reason = deadline, "deadline"
        if options.max_wait is not None and (deadline is None or now + options.max_wait < deadline):
            give_up, reason = now + options.max_wait, "max_wait"
        if give_up is not None and give_up <= now:
            raise self._reject(call, compartment, key, reason, 0.0)

        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.append(waiter)
        expired = False
        try:  # from here on every exit gives the place (or the permit handed to it) back, a listener's included
            if call.listening:
                call.emit(
                    BulkheadQueued(
                        pipeline=call.runtime.name, layer=self.name, time=now, key=key, position=len(waiters)
                    )
                )
            if give_up is None:
                await waiter
            else:
                scope = clock.deadline(give_up)
                try:
                    async with scope:
                        await waiter
                except TimeoutError:
                    if not scope.expired():
                        raise
                    expired = True
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                compartment.release()
            else:
                compartment.forget(waiter)
            raise
        if expired and (not waiter.done() or waiter.cancelled()):
            compartment.forget(waiter)
            raise self._reject(call, compartment, key, reason, clock.now() - now)
        if call.listening:
            at = clock.now()
            try:
                call.emit(
                    BulkheadAcquired(pipeline=call.runtime.name, layer=self.name, time=at, key=key, waited=at - now)
                )
            except BaseException:  # a listener's KeyboardInterrupt & co.: the call ends, its permit goes on
                compartment.release()
                raise

    def _reject(
        self, call: Call, compartment: _Compartment, key: Hashable, reason: str, waited: float
    ) -> BulkheadFullError:
        if call.listening:
            call.emit(
                BulkheadRejected(
                    pipeline=call.runtime.name,
                    layer=self.name,
                    time=call.clock.now(),
                    key=key,
                    reason=reason,
                    waited=waited,
                )
            )
        what = {"queue_full": "queue full", "max_wait": "max_wait passed", "deadline": "deadline passed"}[reason]
        return BulkheadFullError(
            f"{self.name}{'' if key is None else f'[{key!r}]'}: {what} "
            f"({compartment.in_flight}/{self._max_concurrent} running, {compartment.queued()} queued)"
        )

    def snapshot(self, key: Hashable = None) -> BulkheadSnapshot:
        """Running and queued calls of the compartment for ``key`` (the only one when there is no ``key=``)."""
        compartment = self._single if self._key_of is None else self._partitions.peek(key)
        in_flight, queued = (0, 0) if compartment is None else (compartment.in_flight, compartment.queued())
        return BulkheadSnapshot(key, in_flight, queued, self._max_concurrent, self.options.max_queue)

    def health(self) -> LayerHealth:
        """Degraded when any compartment is full (calls queue or are refused); never down: it is load, not loss."""
        compartments = [(None, self._single)] if self._key_of is None else list(self._partitions.items())
        details = {
            key_name(key): {"in_flight": c.in_flight, "queued": c.queued(), "max_concurrent": self._max_concurrent}
            for key, c in compartments
        }
        full = any(c.in_flight >= self._max_concurrent for _, c in compartments)
        return LayerHealth(self.name, "degraded" if full else "ok", {"compartments": details})

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {"layer": "Bulkhead", "options": self.options.model_dump()}
        if self.options.name:
            described["name"] = self.options.name
        return described
