"""How a Cache calls its backend: failing open, never making a call late (docs/patterns/cache.md, "Failing open").

A backend with the synchronous ``get_nowait``/``set_nowait`` pair is called inline; one with ``blocking = False``
is awaited as it is. A blocking backend's read runs under a deadline (``backend_timeout``, and at most a tenth of
the call's remaining time); its store runs in a background task bounded by ``backend_timeout``, kept referenced,
and at most ``max_pending_stores`` at once (beyond that an answer is not stored). A failure is counted, emitted
(:class:`CacheBackendFailed`) and logged; a timeout is logged as a warning once per outage of that operation, and
so is a shared store's outage (through its :class:`~resilient_dspy.store.link.StoreLink`: ``StoreUnavailable`` once,
``StoreRecovered`` when it answers again). A leasing backend's lookups and lease releases are bounded the same way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from resilient_dspy.middleware.cache.backends.protocol import NowaitBackend, is_nowait
from resilient_dspy.middleware.cache.backends.redis_backend import Claim
from resilient_dspy.middleware.cache.events import CacheBackendFailed, CacheNotStored, CacheStored, Counters
from resilient_dspy.store.link import StoreLink
from resilient_dspy.store.protocol import StateStore, StoreUnavailableError

if TYPE_CHECKING:
    from resilient_dspy.core.call import Call
    from resilient_dspy.core.layer import Layer
    from resilient_dspy.middleware.cache.options import CacheOptions

__all__ = ["BackendCalls"]

logger = logging.getLogger("resilient_dspy.cache")

# a blocking backend's read may take at most this share of the call's remaining time (and backend_timeout)
_READ_SHARE = 0.1


@dataclass(slots=True)
class _PendingStore:
    """An answer being stored in the background: served to identical calls (until it expires) meanwhile."""

    data: bytes
    expires_at: float | None


class BackendCalls:
    """Every call one Cache makes to its backend during calls, failing open; ``owner`` names it in events and logs."""

    __slots__ = (
        "_backlogged",
        "_count",
        "_owner",
        "_pending",
        "_tasks",
        "_timing_out",
        "backend",
        "blocking",
        "leasing",
        "link",
        "max_value_bytes",
        "nowait",
        "options",
    )

    def __init__(self, owner: Layer, options: CacheOptions, counters: Counters) -> None:
        self._owner = owner
        self.options = options
        self._count = counters
        self.backend: Any = options.backend
        self.blocking = bool(getattr(self.backend, "blocking", True))
        """Its calls may wait on I/O: bounded by ``backend_timeout``, stores in the background."""
        self.nowait: NowaitBackend | None = self.backend if is_nowait(self.backend) else None
        """The backend, when it has the synchronous pair: called inline, never awaited."""
        self.leasing = self.blocking and all(
            callable(getattr(self.backend, name, None)) for name in ("lookup", "set_leased", "release")
        )
        """It leases missed keys (:class:`RedisBackend`): single-flight reaches across processes."""
        self.max_value_bytes: int | None = getattr(self.backend, "max_value_bytes", None)
        """A larger answer is not stored (the backend's own limit)."""
        store = getattr(self.backend, "store", None)
        self.link = (
            StoreLink(owner, store, "local", meanwhile="calls go uncached") if isinstance(store, StateStore) else None
        )
        """The backend's shared store: an outage is reported once (StoreUnavailable, StoreRecovered), never per call."""
        self._tasks: dict[asyncio.Task[None], str] = {}  # background stores of a blocking backend, by key
        self._pending: dict[str, _PendingStore] = {}  # the latest pending store of each key
        self._timing_out: set[str] = set()  # operations whose last attempt timed out (logged once until they answer)
        self._backlogged = False

    @property
    def stores_pending(self) -> int:
        """Background stores running now."""
        return len(self._tasks)

    # ---------------------------------------------------------------- reads

    def read_now(self, call: Call, key: str, backend: NowaitBackend) -> bytes | None:
        try:
            return backend.get_nowait(key)
        except Exception as error:
            self._failed(call, "get", key, error, timed_out=False)
            return None

    async def read(self, call: Call, key: str) -> bytes | None:
        """The stored bytes of ``key`` (a pending store's first), or None when absent, failed or out of time; the
        caller's cancellation propagates."""
        backend = self.backend
        if not self.blocking:
            try:
                return await backend.get(key)  # type: ignore[no-any-return]
            except Exception as error:
                self._failed(call, "get", key, error, timed_out=False)
                return None
        if self._pending:
            pending = self._pending_data(call, key)
            if pending is not None:
                return pending
        return await self._bounded(call, key, "get", lambda: backend.get(key))  # type: ignore[no-any-return]

    async def claim(self, call: Call, key: str, lease: float) -> Claim | None:
        """A leasing backend's lookup (:meth:`RedisBackend.lookup`) under the same bounds as :meth:`read`: the entry,
        this call's lease for ``lease`` seconds, or another's lease; None when it failed or is out of time."""
        if self._pending:
            pending = self._pending_data(call, key)
            if pending is not None:
                return Claim(pending)
        backend = self.backend
        return await self._bounded(call, key, "get", lambda: backend.lookup(key, lease))  # type: ignore[no-any-return]

    def _pending_data(self, call: Call, key: str) -> bytes | None:
        pending = self._pending.get(key)
        if pending is not None and (pending.expires_at is None or call.clock.now() < pending.expires_at):
            return pending.data
        return None

    async def _bounded(self, call: Call, key: str, operation: str, start: Callable[[], Awaitable[Any]]) -> Any:
        """``start()`` awaited within ``backend_timeout`` and a tenth of the call's remaining time; None on failure."""
        try:
            clock = call.clock
            now = clock.now()
            budget = self.options.backend_timeout
            deadline = call.deadline
            if deadline is not None:  # leave the program most of the time left
                budget = min(budget, (deadline - now) * _READ_SHARE)
                if budget <= 0:
                    return None
            scope = clock.deadline(now + budget)
            try:
                async with scope:
                    result = await start()
            except TimeoutError as error:
                if not scope.expired():
                    raise
                self._failed(call, operation, key, error, timed_out=True, budget=budget)
                return None
            if self._timing_out:
                self._answered(operation)
            link = self.link
            if link is not None and link.down_since is not None:
                link.recovered(call)
            return result
        except Exception as error:
            self._failed(call, operation, key, error, timed_out=False)
            return None

    # ---------------------------------------------------------------- stores

    def store_now(self, call: Call, key: str, data: bytes, backend: NowaitBackend) -> None:
        try:
            backend.set_nowait(key, data, self.options.ttl)
        except Exception as error:
            self._failed(call, "set", key, error, timed_out=False)
            return
        self._stored(call, key, data)

    def store_later(self, call: Call, key: str, data: bytes, lease: str | None = None) -> None:
        """Store in a background task, kept referenced and bounded; when ``max_pending_stores`` are running, skip
        (ending the call's ``lease`` all the same)."""
        tasks = self._tasks
        if len(tasks) >= self.options.max_pending_stores:
            if lease is not None:
                self.release_later(call, key, lease)
            self._count.skipped_stores += 1
            if not self._backlogged:
                self._backlogged = True
                logger.warning(
                    "%s: %d stores still running on a slow backend; answers are not stored until one ends",
                    self._owner.name,
                    len(tasks),
                )
            self._owner.emit(call, CacheNotStored, key=key, reason="backlog")
            return
        ttl = self.options.ttl
        pending = _PendingStore(data, None if ttl is None else call.clock.now() + ttl)
        self._pending[key] = pending
        task = asyncio.get_running_loop().create_task(self.store(call, key, data, lease))
        tasks[task] = key

        def forget(task: asyncio.Task[None]) -> None:
            del tasks[task]
            if self._pending.get(key) is pending:
                del self._pending[key]
            if not tasks:
                self._backlogged = False

        task.add_done_callback(forget)

    async def store(self, call: Call, key: str, data: bytes, lease: str | None = None) -> None:
        """Set ``key`` to ``data`` (under ``backend_timeout`` on a blocking backend), ending ``lease`` (a leasing
        backend's) in the same step; a failure is reported."""
        ttl = self.options.ttl
        backend = self.backend
        try:
            if not self.blocking:
                await backend.set(key, data, ttl)
            else:
                clock = call.clock
                budget = self.options.backend_timeout
                scope = clock.deadline(clock.now() + budget)
                try:
                    async with scope:
                        if lease is None:
                            await backend.set(key, data, ttl)
                        else:
                            await backend.set_leased(key, data, ttl, lease)
                except TimeoutError as error:
                    if not scope.expired():
                        raise
                    self._failed(call, "set", key, error, timed_out=True, budget=budget)
                    return
                if self._timing_out:
                    self._answered("set")
                link = self.link
                if link is not None and link.down_since is not None:
                    link.recovered(call)
        except Exception as error:
            self._failed(call, "set", key, error, timed_out=False)
            return
        self._stored(call, key, data)

    def release_later(self, call: Call, key: str, lease: str) -> None:
        """End ``lease`` in a background task (kept referenced, bounded by ``backend_timeout``): the call holding it
        failed, was cancelled or stores nothing, so another process's waiter may lead at once."""
        tasks = self._tasks
        task = asyncio.get_running_loop().create_task(self._release(call, key, lease))
        tasks[task] = key
        task.add_done_callback(tasks.__delitem__)

    async def _release(self, call: Call, key: str, lease: str) -> None:
        clock = call.clock
        budget = self.options.backend_timeout
        try:
            async with clock.deadline(clock.now() + budget):
                await self.backend.release(key, lease)
        except Exception as error:  # the lease then expires on its own
            self._failed(call, "release", key, error, timed_out=isinstance(error, TimeoutError), budget=budget)

    async def settle(self, doomed: Callable[[str], bool]) -> None:
        """Wait for the pending stores of the keys ``doomed`` selects, so none lands after an invalidation."""
        for key in [key for key in self._pending if doomed(key)]:
            del self._pending[key]
        tasks = [task for task, key in self._tasks.items() if doomed(key)]
        if tasks:
            await asyncio.wait(tasks)

    async def drain(self) -> None:
        """Wait until no store runs in the background."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    # ---------------------------------------------------------------- reporting

    def _stored(self, call: Call, key: str, data: bytes) -> None:
        self._count.stores += 1
        if call.listening:  # every miss stores: not even the keyword arguments when no one listens
            self._owner.emit(call, CacheStored, key=key, ttl=self.options.ttl, size=len(data))

    def _answered(self, operation: str) -> None:
        if operation in self._timing_out:
            self._timing_out.discard(operation)
            logger.info("%s: backend %s answers in time again", self._owner.name, operation)

    def _failed(
        self, call: Call, operation: str, key: str, error: BaseException, *, timed_out: bool, budget: float = 0.0
    ) -> None:
        count = self._count
        count.errors += 1
        name = self._owner.name
        if timed_out:
            count.timeouts += 1
            # logged once per outage: a hung backend would otherwise log every call; each one is counted
            first = operation not in self._timing_out
            self._timing_out.add(operation)
            logger.log(
                logging.WARNING if first else logging.DEBUG,
                "%s: backend %s took over %gs for %s; going on without it",
                name,
                operation,
                budget,
                key,
            )
        elif isinstance(error, StoreUnavailableError) and self.link is not None:
            self.link.failed(call, error)  # a store outage: StoreUnavailable and a warning once, not once per call
            logger.debug("%s: backend %s failed for %s (%s); going on without it", name, operation, key, error)
        else:
            logger.warning("%s: backend %s failed for %s (%r); going on without it", name, operation, key, error)
        self._owner.emit(call, CacheBackendFailed, key=key, operation=operation, error=error, timed_out=timed_out)
