"""Cache: serve repeated calls from a store, and let concurrent identical misses share one program call.

The key is ``"<namespace>:<sha256>"`` of what the program is made of (its target's
:class:`~resilient_dspy.binding.shape.KeyIdentity`: each predictor's signature, instructions, demos and config; the
program class or function name), the LM in effect (model, endpoint, sampling kwargs — never secrets), the adapter
and the inputs (:mod:`~resilient_dspy.middleware.cache.keys`). A miss runs the layers below inside a usage scope
and stores the answer with its LM usage (:mod:`~resilient_dspy.middleware.cache.answers`); errors and fallback
answers are never stored. Identical misses in flight share one call (:mod:`~resilient_dspy.middleware.cache.flight`),
across processes on a leasing backend (:mod:`~resilient_dspy.middleware.cache.shared_flight`).
A broken or slow backend fails open: the call goes through, the failure is logged; every backend wait is clamped
to the call's remaining time, and a blocking backend's store runs in the background
(:mod:`~resilient_dspy.middleware.cache.backend_calls`; see :meth:`Cache.drain`).

State: :meth:`Cache.snapshot` (:class:`CacheStats`); see docs/patterns/cache.md and docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, ClassVar

from resilient_dspy.binding.settings import setting
from resilient_dspy.binding.shape import answer_annotations_of
from resilient_dspy.binding.usage import attach_usage, usage_scope
from resilient_dspy.core.call import Call, CallRecord, Handler, leases_lent, lend_leases, reclaim_leases
from resilient_dspy.core.health import LayerHealth
from resilient_dspy.core.layer import Layer
from resilient_dspy.core.options import Options, options_from
from resilient_dspy.core.pipeline import Pipeline
from resilient_dspy.errors import ConfigurationError
from resilient_dspy.middleware.cache.answers import Answers
from resilient_dspy.middleware.cache.backend_calls import BackendCalls
from resilient_dspy.middleware.cache.events import (
    CacheCoalesced,
    CacheHit,
    CacheMiss,
    CacheNotStored,
    CacheStats,
    Counters,
)
from resilient_dspy.middleware.cache.flight import RETRY, Answer, Flights, fail, lead, leads, stop_leading
from resilient_dspy.middleware.cache.keys import CacheKeyFunction, KeyBuilder, _custom_key
from resilient_dspy.middleware.cache.options import _NAMESPACE, CacheOptions, CachePriceFunction
from resilient_dspy.middleware.cache.serializer import CachedEntry
from resilient_dspy.middleware.cache.shared_flight import settle

__all__ = [
    "Cache",
    "logger",
]


logger = logging.getLogger("resilient_dspy.cache")


class Cache(Layer):
    """Serve identical calls from ``backend``; share one call between concurrent identical misses."""

    placement: ClassVar[str] = "cache"
    options_type: ClassVar[type[Options]] = CacheOptions
    options: CacheOptions

    def __init__(
        self,
        backend: Any = None,
        *,
        ttl: float | None = 3600.0,
        namespace: str = "default",
        key: CacheKeyFunction | None = None,
        single_flight: bool = True,
        backend_timeout: float = 1.0,
        max_pending_stores: int = 100,
        price: CachePriceFunction | None = None,
        types: tuple[type, ...] | list[type] = (),
        name: str | None = None,
    ) -> None:
        self.options = options_from(CacheOptions, "Cache", locals())
        self.backend = self.options.backend
        self.coalesces = self.options.single_flight
        """A call may wait here for an identical call's answer: a Bulkhead above lends its slot meanwhile."""
        self._count = Counters()
        self._calls = BackendCalls(self, self.options, self._count)
        self._answers = Answers(self, self._count, self.options.types, self.options.price)
        self._serializer = self._answers.serializer
        self._flights = Flights()
        self._shared = self.options.single_flight and self._calls.leasing
        """Single-flight reaches across processes through the backend's leases."""
        self._pipeline: Pipeline | None = None
        self._keys: KeyBuilder | None = None

    def on_build(self, pipeline: Pipeline) -> None:
        """Learn the program (for keys and allowed answer types) and hand the pipeline clock to the backend."""
        if self._pipeline is not None and self._pipeline is not pipeline:
            raise ConfigurationError(
                [
                    (
                        "Cache",
                        f"already built into pipeline {self._pipeline.name!r}; use one Cache per pipeline "
                        "(they can share a backend)",
                    )
                ]
            )
        self._pipeline = pipeline
        target = pipeline.target
        self._keys = KeyBuilder(self.options.namespace, target)
        bind_clock = getattr(self.backend, "bind_clock", None)
        if bind_clock is not None:
            bind_clock(pipeline.clock)
        self._answers.learn(lambda: answer_annotations_of(target))

    def for_copy(self) -> Cache:
        """A copy of the program (``ResilientModule`` deepcopy) gets its own Cache with these options and backend:
        answers are shared, and its keys name the copy's predictors (a compiled copy's demos differ)."""
        return type(self)(**dict(self.options))

    # ---------------------------------------------------------------- state and description

    def snapshot(self) -> CacheStats:
        """The counts since this Cache was created: every lookup is one of hit, miss, coalesced or bypassed."""
        return self._count.snapshot()

    @property
    def stats(self) -> CacheStats:
        """The same as :meth:`snapshot` (the older spelling, a property: ``cache.stats.hits``)."""
        return self._count.snapshot()

    def health(self) -> LayerHealth:
        """Degraded after backend failures (the cache fails open, so calls still pass); hit rate and savings."""
        stats = self._count.snapshot()
        details = {
            "hit_rate": stats.hit_rate,
            "hits": stats.hits,
            "misses": stats.misses,
            "coalesced": stats.coalesced,
            "bypassed": stats.bypassed,
            "backend_errors": stats.errors,
            "backend_timeouts": stats.timeouts,
            "stores_pending": self._calls.stores_pending,
            "stores_skipped": stats.skipped_stores,
            "saved_tokens": stats.saved_tokens,
            "saved_cost": stats.saved_cost,
        }
        link = self._calls.link
        if link is not None:
            details.update(link.health_details())
        return LayerHealth(self.name, "degraded" if stats.errors else "ok", details)

    def describe_state(self) -> dict[str, Any]:
        """The backend, how stores run on it, and the program whose calls are keyed (None before a pipeline)."""
        calls = self._calls
        stores = "inline" if calls.nowait is not None or not calls.blocking else "background"
        program = None if self._pipeline is None else self._pipeline.target.name
        state = {"backend": repr(self.backend), "stores": stores, "program": program}
        describe = getattr(self.backend, "describe", None)
        if callable(describe):  # a shared backend says which store it is on (never a secret)
            state["backend_state"] = describe()
        return state

    # ---------------------------------------------------------------- keys and invalidation

    def key_for(self, *args: Any, **inputs: Any) -> str:
        """The key a call of the pipeline with these inputs would use, under the current ``dspy.settings`` LM.

        Positional inputs map to the program's input fields, as when calling the pipeline. With a ``key=``
        function, it receives a :class:`Call` holding these inputs (started at 0.0, no deadline). A DSPy program
        whose predictors take the LM from the context raises ``LookupError`` outside ``dspy.context(lm=...)``:
        no call would use that key, so ``invalidate(key)`` would silently find nothing.
        """
        pipeline = self._pipeline
        if pipeline is None or self._keys is None:
            raise RuntimeError("this Cache is not part of a pipeline yet: build Pipeline(program, ..., cache) first")
        merged = pipeline.inputs_of(*args, **inputs)
        if self.options.key is not None:
            call = Call(merged, pipeline.runtime, CallRecord(started_at=0.0))
            return _custom_key(self.options.namespace, self.options.key(call))
        if setting("lm") is None and self._keys.needs_settings_lm():
            raise LookupError(
                "no LM in effect: a call's key includes the LM it runs with, so call key_for inside the same "
                "dspy.context(lm=...) (or dspy.configure) as the calls whose entries you mean"
            )
        return self._keys.key(merged)

    async def drain(self) -> None:
        """Wait until the stores running in the background (each bounded by ``backend_timeout``) are done: call it
        before shutdown, or in a test before reading the backend."""
        await self._calls.drain()

    async def invalidate(self, key: str) -> bool:
        """Remove one entry (a key from :meth:`key_for` or an event); True if it was there."""
        await self._calls.settle(key.__eq__)
        return await self.backend.delete(key)  # type: ignore[no-any-return]

    async def invalidate_namespace(self, namespace: str | None = None) -> int:
        """Remove every entry of ``namespace`` (default: this Cache's); how many were removed."""
        namespace = self.options.namespace if namespace is None else namespace
        if not _NAMESPACE.fullmatch(namespace):
            raise ValueError(f"not a valid namespace: {namespace!r}")
        await self._calls.settle(_prefixed(f"{namespace}:"))
        return await self.backend.clear(namespace)  # type: ignore[no-any-return]

    async def clear(self) -> int:
        """Remove every entry in the backend, whatever its namespace; how many were removed."""
        await self._calls.settle(_prefixed(""))
        return await self.backend.clear(None)  # type: ignore[no-any-return]

    # ---------------------------------------------------------------- the call

    def _key(self, call: Call) -> str:
        options = self.options
        if options.key is not None:
            return _custom_key(options.namespace, options.key(call))
        if self._keys is None:
            raise RuntimeError("Cache.on_build was not called: use the Cache inside a Pipeline")
        return self._keys.key(call.inputs)

    async def __call__(self, call: Call, next: Handler) -> Any:
        try:
            key = self._key(call)
        except Exception:
            logger.exception("%s: could not compute the key; the call runs uncached", self.name)
            return await next(call)
        if call.record.leases and leases_lent(call):
            await reclaim_leases(call)  # an earlier pass of this call (a retry above) lent them as a follower
        if call.bypass_cache:
            self._count.bypassed += 1
            self._missed(call, key, bypassed=True)
            return await self._lead(call, next, key, None)
        single_flight = self.options.single_flight
        calls = self._calls
        nowait = calls.nowait
        flights = self._flights
        while True:
            flight = flights.find(key) if single_flight else None
            if flight is None:
                if nowait is not None:
                    data = calls.read_now(call, key, nowait)
                elif self._shared:
                    return await self._lead_shared(call, next, key)
                else:
                    try:
                        data = await calls.read(call, key)
                    except BaseException:  # cancelled while reading: the lookup ends here, a miss that runs nothing
                        self._missed(call, key, bypassed=False)
                        raise
                if data is not None:
                    entry = self._answers.decode(key, data, nowait is not None)
                    if entry is not None:
                        return self._hit(call, key, entry)
                # a read that never waits let no other call start a flight meanwhile: no second look
                flight = flights.find(key) if single_flight and nowait is None else None
                if flight is None:
                    self._missed(call, key, bypassed=False)
                    return await self._lead(call, next, key, flights.start(key) if single_flight else None)
            if leads(flight):
                # reentrant: an ancestor of this call leads the flight, so it can only end after this call
                self._missed(call, key, bypassed=False)
                return await next(call)
            if call.record.leases:
                lend_leases(call)  # it only waits: its bulkhead slot serves other questions meanwhile
            try:
                outcome = await asyncio.shield(flight)
            except BaseException as error:  # the leader's error, or this follower's own cancellation / timeout
                self._count.coalesced += 1
                self.emit(call, CacheCoalesced, key=key, error=error)
                raise
            if outcome is not RETRY:
                return self._follow(call, key, outcome)
            if call.record.leases and leases_lent(call):
                await reclaim_leases(call)  # the leader was cancelled: this call may lead next

    async def _lead_shared(self, call: Call, next: Handler, key: str) -> Any:
        """Lead ``key`` in this process; on the store: a hit, a lease (then run and store), or another process's
        answer waited for (:mod:`~resilient_dspy.middleware.cache.shared_flight`)."""
        flights = self._flights
        flight = flights.start(key)
        backend = self.backend
        try:
            settled = await settle(self._calls, call, key, backend.lease_ttl, backend.max_wait)
        except BaseException:  # cancelled while looking or waiting: a follower in this process may lead next
            flight.set_result(RETRY)
            flights.end(key, flight)
            raise
        data = settled.data
        entry = None if data is None else self._answers.decode(key, data)
        if entry is None:
            self._missed(call, key, bypassed=False)
            return await self._lead(call, next, key, flight, settled.lease)
        flight.set_result(Answer(entry.value, data, call.record.served_by, entry.usage, entry.tokens, False))
        flights.end(key, flight)
        if not settled.waited:
            return self._hit(call, key, entry)
        self._count.coalesced += 1  # another process's call answered: no provider outcome here
        self._answers.saved(entry.usage, entry.tokens)
        if call.listening:
            self.emit(call, CacheCoalesced, key=key, error=None, saved_tokens=entry.tokens, saved_usage=entry.usage)
        return self._answers.served(entry.value, entry.usage)

    async def _lead(
        self, call: Call, next: Handler, key: str, flight: asyncio.Future[Any] | None, lease: str | None = None
    ) -> Any:
        """Run the call, hand the answer to the followers waiting on ``flight`` (if any), and store it (ending this
        call's ``lease`` on a leasing backend)."""
        record = call.record
        served_by = record.served_by
        leading = None if flight is None else lead(flight)
        try:
            try:
                with usage_scope() as scope:
                    try:
                        value = await next(call)
                    finally:
                        if leading is not None:
                            stop_leading(leading)
            except Exception as error:
                if flight is not None:
                    fail(flight, error)
                if lease is not None:
                    self._calls.release_later(call, key, lease)
                raise
            except BaseException:
                if flight is not None:
                    flight.set_result(RETRY)
                if lease is not None:
                    self._calls.release_later(call, key, lease)
                raise
            attach_usage(value, scope)
            usage = scope.by_model()
            tokens = scope.total_tokens(usage)
            data = self._answers.encode(value, usage, tokens)
            answer = Answer(value, data, record.served_by, usage, tokens, record.served_by != served_by)
            if flight is not None:
                flight.set_result(answer)
            data = self._storable(call, key, answer)
            calls = self._calls
            if data is not None:
                nowait = calls.nowait
                if nowait is not None:
                    calls.store_now(call, key, data, nowait)
                elif calls.blocking:
                    calls.store_later(call, key, data, lease)  # never on the caller's critical path
                else:
                    await calls.store(call, key, data)
            elif lease is not None:
                calls.release_later(call, key, lease)
            return value
        finally:
            if flight is not None:
                self._flights.end(key, flight)

    def _storable(self, call: Call, key: str, answer: Answer) -> bytes | None:
        """The bytes to store, or None (and a CacheNotStored event) for a fallback's, an unencodable or a too large
        answer (over the backend's ``max_value_bytes``)."""
        data = answer.data
        reason = "fallback" if answer.fallback else "unencodable" if data is None else None
        limit = self._calls.max_value_bytes
        if reason is None and limit is not None and data is not None and len(data) > limit:
            reason = "too_large"
        if reason is None:
            return data
        self.emit(call, CacheNotStored, key=key, reason=reason)
        return None

    def _hit(self, call: Call, key: str, entry: CachedEntry) -> Any:
        self._count.hits += 1
        self._answers.saved(entry.usage, entry.tokens)
        if call.listening:  # the hot path: not even the keyword arguments when no one listens
            self.emit(call, CacheHit, key=key, saved_tokens=entry.tokens, saved_usage=entry.usage)
        return self._answers.served(entry.value, entry.usage)

    def _follow(self, call: Call, key: str, answer: Answer) -> Any:
        self._count.coalesced += 1
        self._answers.saved(answer.usage, answer.tokens)
        call.record.served_by = answer.served_by
        if call.listening:
            usage = answer.usage or {}
            self.emit(call, CacheCoalesced, key=key, error=None, saved_tokens=answer.tokens, saved_usage=usage)
        value, usage = self._answers.fresh(answer)
        return self._answers.served(value, usage)

    def _missed(self, call: Call, key: str, *, bypassed: bool) -> None:
        if not bypassed:  # a bypassed call is counted as bypassed only: each lookup is one of the four
            self._count.misses += 1
        if call.listening:
            self.emit(call, CacheMiss, key=key, bypassed=bypassed)


def _prefixed(prefix: str) -> Callable[[str], bool]:
    return lambda key: key.startswith(prefix)
