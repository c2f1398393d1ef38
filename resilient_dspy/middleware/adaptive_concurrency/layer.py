"""AdaptiveConcurrency: a concurrency limit that moves with the latency and the errors it observes.

Like a :class:`~resilient_dspy.Bulkhead`, it runs at most ``limit`` calls at once below it (per key) and queues up
to ``max_queue`` more in strict FIFO order, each for at most ``max_wait`` and never past the call's deadline; a call
beyond the queue is refused at once with :class:`~resilient_dspy.BulkheadFullError` (a ``RejectedError``: Retry
never retries it). Unlike a Bulkhead the limit is learnt: each call that reached the provider moves it, by AIMD
(``+1`` on a fast success, ``* backoff`` on an overload error, a timeout or a success slower than
``latency_threshold``) or by a Gradient2-style gradient of the long against the short round-trip average, within
``min_limit..max_limit``. Outcomes that say nothing about the provider never move it: a cache hit, a single-flight
follower's shared answer, an inner layer's rejection, a client error, a cancellation. A finishing call hands its
slot straight to the first live waiter (no barging), and so does a raised limit; a cancelled waiter never leaks one.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, ClassVar

from resilient_dspy.core.health import LayerHealth, key_name
from resilient_dspy.core.layer import Layer
from resilient_dspy.core.options import Options, options_from
from resilient_dspy.errors import BulkheadFullError, ErrorKind, classify
from resilient_dspy.middleware._shared.leases import CompartmentLease
from resilient_dspy.middleware._shared.partitions import Hold, KeyedStates, KeyFunction
from resilient_dspy.middleware._shared.waiting import give_up_at, wait_until
from resilient_dspy.middleware.adaptive_concurrency.events import (
    AdaptiveConcurrencyRejected,
    AdaptiveConcurrencySnapshot,
    ConcurrencyLimitChanged,
)
from resilient_dspy.middleware.adaptive_concurrency.limits import LimitAlgorithm, algorithm_for
from resilient_dspy.middleware.adaptive_concurrency.options import AdaptiveConcurrencyOptions, Algorithm

if TYPE_CHECKING:
    from resilient_dspy.core.call import Call, Handler
    from resilient_dspy.core.pipeline import Pipeline

__all__ = ["AdaptiveConcurrency"]

_DROPS = frozenset({ErrorKind.RATE_LIMIT, ErrorKind.SERVER, ErrorKind.TIMEOUT, ErrorKind.TRANSPORT})
"""Errors that say the provider is overloaded (429, 5xx, timeouts, dropped connections): they cut the limit."""


class AdaptiveConcurrency(Layer):
    """Run at most ``limit`` calls at once below this layer, the limit learnt from latency and errors (per key)."""

    placement: ClassVar[str] = "bulkhead"
    options_type: ClassVar[type[Options]] = AdaptiveConcurrencyOptions
    options: AdaptiveConcurrencyOptions

    def __init__(
        self,
        algorithm: Algorithm = "gradient",
        *,
        initial_limit: int = 10,
        min_limit: int = 1,
        max_limit: int = 200,
        latency_threshold: float | None = None,
        backoff: float = 0.9,
        tolerance: float = 1.5,
        smoothing: float = 0.2,
        short_window: int = 10,
        long_window: int = 600,
        max_queue: int = 1000,
        max_wait: float | None = None,
        key: KeyFunction | None = None,
        max_keys: int = 1024,
        idle_after: float = 600.0,
        name: str | None = None,
    ) -> None:
        self.options = options = options_from(AdaptiveConcurrencyOptions, "AdaptiveConcurrency", locals())
        self._states: KeyedStates[_Compartment] = KeyedStates(options, lambda key: _Compartment(key, options))
        self._lends = False

    def on_build(self, pipeline: Pipeline) -> None:
        """Lend slots out only when a layer below may make a call wait for another's work (``coalesces``), as the
        Bulkhead does: a single-flight follower holds no slot while it waits for its leader."""
        _, inner = pipeline.layers_around(self)
        self._lends = any(getattr(layer, "coalesces", False) for layer in inner)

    async def __call__(self, call: Call, next: Handler) -> Any:
        clock = call.clock
        key_of = self._states.key_of
        key = None if key_of is None else key_of(call)
        compartment = self._states.get(key, clock.now())
        if compartment.in_flight < compartment.cap:
            compartment.in_flight += 1
        else:
            await self._wait(call, compartment, key)
        in_flight = compartment.in_flight
        record = call.record
        reached = record.attempts
        started = clock.now()
        dropped: bool | None = None  # None: nothing learnt about the provider
        permit = None
        if self._lends:
            permit = CompartmentLease(self._take, compartment, key)
            leases = record.leases
            if leases is None:
                leases = record.leases = []
            leases.append(permit)
        try:
            result = await next(call)
        except Exception as error:
            if record.attempts != reached and classify(error).kind in _DROPS:
                dropped = True
            raise
        else:
            if record.attempts != reached:
                dropped = False
            return result
        finally:
            if permit is not None:
                assert record.leases is not None
                record.leases.remove(permit)
                compartment = permit.compartment
            old = compartment.cap
            if dropped is not None:
                compartment.learn(started, clock.now(), in_flight, dropped)
            if permit is None or permit.held:
                compartment.release()
            new = compartment.cap
            if new != old:
                reason = "increase" if new > old else "drop" if dropped else "latency"
                self.emit(call, ConcurrencyLimitChanged, key=key, old=old, new=new, reason=reason)

    async def _take(self, call: Call, key: Hashable) -> _Compartment:
        """A slot again for a call that lent its own (a lent ``CompartmentLease``), by the same rules as a
        new call."""
        compartment = self._states.get(key, call.clock.now())
        if compartment.in_flight < compartment.cap:
            compartment.in_flight += 1
        else:
            await self._wait(call, compartment, key)
        return compartment

    async def _wait(self, call: Call, compartment: _Compartment, key: Hashable) -> None:
        """Queue for a slot; return holding one, or raise :class:`BulkheadFullError` (or the cancellation)."""
        options = self.options
        clock = call.clock
        now = clock.now()
        if compartment.queued() >= options.max_queue:
            raise self._reject(call, compartment, key, "queue_full", 0.0)
        give_up = give_up_at(now, options.max_wait, call.deadline)
        if give_up.reached(now):
            raise self._reject(call, compartment, key, give_up.reason, 0.0)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        compartment.waiters.append(waiter)
        try:
            expired = not await wait_until(clock, waiter, give_up.at)
        except BaseException:
            if waiter.done() and not waiter.cancelled():  # handed a slot as the cancellation came: pass it on
                compartment.release()
            else:
                compartment.forget(waiter)
            raise
        if expired and (not waiter.done() or waiter.cancelled()):
            compartment.forget(waiter)
            raise self._reject(call, compartment, key, give_up.reason, clock.now() - now)

    def _reject(
        self, call: Call, compartment: _Compartment, key: Hashable, reason: str, waited: float
    ) -> BulkheadFullError:
        limit = compartment.cap
        self.emit(call, AdaptiveConcurrencyRejected, key=key, reason=reason, waited=waited, limit=limit)
        what = {"queue_full": "queue full", "max_wait": "max_wait passed", "deadline": "deadline passed"}[reason]
        return BulkheadFullError(
            f"{self.name}{'' if key is None else f'[{key!r}]'}: {what} "
            f"({compartment.in_flight}/{limit} running, {compartment.queued()} queued)"
        )

    def snapshot(self, key: Hashable = None) -> AdaptiveConcurrencySnapshot:
        """The limit, running and queued calls of ``key`` (the only one without ``key=``; a fresh one's if unseen)."""
        compartment = self._states.peek(key) or _Compartment(key, self.options)
        short, long = compartment.algorithm.rtts()
        options = self.options
        return AdaptiveConcurrencySnapshot(
            key,
            compartment.cap,
            compartment.in_flight,
            compartment.queued(),
            options.min_limit,
            options.max_limit,
            short,
            long,
        )

    def snapshots(self) -> dict[Hashable, AdaptiveConcurrencySnapshot]:
        """Every live key's snapshot (``{None: ...}`` without ``key=``)."""
        return {key: self.snapshot(key) for key, _ in self._states.items()}

    def describe_state(self) -> dict[str, Any]:
        """Whether placement made it lend slots (a coalescing layer below)."""
        return {"lends_slots": self._lends}

    def health(self) -> LayerHealth:
        """Degraded when any key is full (calls queue or are refused) or its limit fell to ``min_limit``."""
        compartments = self._states.items()
        details = {
            key_name(key): {"limit": c.cap, "in_flight": c.in_flight, "queued": c.queued()} for key, c in compartments
        }
        pressed = any(c.in_flight >= c.cap or c.cap <= self.options.min_limit < c.initial for _, c in compartments)
        return LayerHealth(self.name, "degraded" if pressed else "ok", {"limits": details})


class _Compartment:
    """One key's learnt limit, running calls and queued futures in arrival order.

    Invariant: a waiter exists only while ``in_flight >= cap``; every release and every raise of the limit hands
    slots to the first live waiters, so ``in_flight < cap`` alone says a newcomer may run without barging.
    """

    __slots__ = ("algorithm", "idle_after", "in_flight", "initial", "key", "learnt_at", "waiters")

    def __init__(self, key: Hashable, options: AdaptiveConcurrencyOptions) -> None:
        self.key = key
        self.algorithm: LimitAlgorithm = algorithm_for(options)
        self.initial = options.initial_limit
        self.idle_after = options.idle_after
        self.in_flight = 0
        self.learnt_at = -math.inf
        self.waiters: deque[asyncio.Future[None]] = deque()

    @property
    def cap(self) -> int:
        """The number of calls admitted now: the learnt limit, whole."""
        return int(self.algorithm.limit)

    def learn(self, started: float, now: float, in_flight: int, dropped: bool) -> None:
        self.algorithm.update(started, now, in_flight, dropped)
        self.learnt_at = now

    def hold(self, now: float) -> Hold:
        """Calls hold it; a limit cut below its start protects the provider until it has been idle a while."""
        if self.in_flight or self.waiters:
            return Hold.CALLS
        if self.cap < self.initial and now - self.learnt_at < self.idle_after:
            return Hold.PROTECTION
        return Hold.NOTHING

    def queued(self) -> int:
        """Waiters still waiting (a cancelled one stays in the deque until its task runs its cleanup)."""
        return sum(1 for waiter in self.waiters if not waiter.done())

    def release(self) -> None:
        """Free this slot, then hand every slot the limit allows to the first live waiters."""
        self.in_flight -= 1
        waiters = self.waiters
        while waiters and self.in_flight < self.cap:
            waiter = waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)

    def forget(self, waiter: asyncio.Future[None]) -> None:
        """Take a waiter that gives up out of the queue (the releaser may already have dropped it)."""
        with contextlib.suppress(ValueError):
            self.waiters.remove(waiter)
