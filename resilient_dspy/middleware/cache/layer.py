"""Cache: serve repeated calls from a store, and let concurrent identical misses share one program call.

The key is ``"<namespace>:<sha256>"`` of the program's identity (each predictor's signature, instructions, demos
and config; the program class or function name), the LM in effect (model, endpoint, sampling kwargs — never
secrets), the adapter and the inputs. A miss runs the layers below inside a usage scope and stores the answer
with its LM usage; errors and fallback answers are never stored. Identical misses in flight share one call
(single-flight). A broken or slow backend fails open: the call goes through, the failure is logged; every backend
wait is clamped to the call's remaining time, and a blocking backend's store runs in the background (see drain()).
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dspy
from pydantic import BaseModel

from resilient_dspy.binding.settings import setting
from resilient_dspy.binding.targets import ModuleTarget, Target
from resilient_dspy.binding.usage import attach_usage, usage_scope
from resilient_dspy.core.call import Call, CallRecord, Handler, leases_lent, lend_leases, reclaim_leases
from resilient_dspy.core.health import LayerHealth
from resilient_dspy.core.options import build_options
from resilient_dspy.core.pipeline import Pipeline
from resilient_dspy.errors import ConfigurationError
from resilient_dspy.middleware.cache.backends.memory import MemoryBackend
from resilient_dspy.middleware.cache.backends.protocol import NowaitBackend, is_nowait
from resilient_dspy.middleware.cache.events import (
    CacheBackendFailed,
    CacheCoalesced,
    CacheHit,
    CacheMiss,
    CacheNotStored,
    CacheStats,
    CacheStored,
)
from resilient_dspy.middleware.cache.keys import (
    KeyBuilder,
    KeyFunction,
    _annotations_of,
    _callable_name,
    _custom_key,
    _prefixed,
)
from resilient_dspy.middleware.cache.options import _NAMESPACE, CacheOptions, PriceFunction
from resilient_dspy.middleware.cache.serializer import (
    CachedEntry,
    CacheSerializer,
    CorruptEntryError,
    UnencodableError,
    UnknownTypeError,
    _type_name,
)

__all__ = [
    "Cache",
    "logger",
]


logger = logging.getLogger("resilient_dspy.cache")


class _Counters:
    __slots__ = (
        "bypassed",
        "coalesced",
        "errors",
        "hits",
        "misses",
        "saved_cost",
        "saved_tokens",
        "skipped_stores",
        "stores",
        "timeouts",
    )

    def __init__(self) -> None:
        self.hits = self.misses = self.coalesced = self.bypassed = self.stores = self.errors = 0
        self.timeouts = self.skipped_stores = 0
        self.saved_tokens = 0
        self.saved_cost = 0.0


@dataclass(slots=True)
class _PendingStore:
    """An answer being stored in the background: served to identical calls (until it expires) meanwhile."""

    data: bytes
    expires_at: float | None


# a blocking backend's read may take at most this share of the call's remaining time (and backend_timeout)
_READ_SHARE = 0.1


@dataclass(slots=True)
class _Answer:
    """What a leader hands its followers: the encoded answer (for fresh copies), who served it, its usage."""

    value: Any
    data: bytes | None
    served_by: str
    usage: dict[str, Any]
    tokens: int
    fallback: bool


_RETRY = object()

# The flights this task chain leads (inherited by the program's coroutine and every task it creates): a call that
# finds one of them in flight is reentrant, and waiting on it would wait on itself.
_LEADING: contextvars.ContextVar[tuple[asyncio.Future[Any], ...]] = contextvars.ContextVar(
    "resilient_dspy_cache_leading", default=()
)


class Cache:
    """Serve identical calls from ``backend``; share one call between concurrent identical misses."""

    def __init__(
        self,
        backend: Any = None,
        *,
        ttl: float | None = 3600.0,
        namespace: str = "default",
        key: KeyFunction | None = None,
        single_flight: bool = True,
        backend_timeout: float = 1.0,
        max_pending_stores: int = 100,
        price: PriceFunction | None = None,
        types: tuple[type, ...] | list[type] = (),
        name: str | None = None,
    ) -> None:
        self.options = build_options(
            CacheOptions,
            "Cache",
            {
                "backend": MemoryBackend() if backend is None else backend,
                "ttl": ttl,
                "namespace": namespace,
                "key": key,
                "single_flight": single_flight,
                "backend_timeout": backend_timeout,
                "max_pending_stores": max_pending_stores,
                "price": price,
                "types": tuple(types) if isinstance(types, list | tuple) else types,
                "name": name,
            },
        )
        self.backend = self.options.backend
        self.label = self.options.name or "Cache"
        self.coalesces = self.options.single_flight
        """A call may wait here for an identical call's answer: a Bulkhead above lends its slot meanwhile."""
        self._blocking = bool(getattr(self.backend, "blocking", True))
        self._nowait: NowaitBackend | None = self.backend if is_nowait(self.backend) else None
        self._serializer = CacheSerializer(self.options.types)
        self._pipeline: Pipeline | None = None
        self._target: Target | None = None
        self._keys: KeyBuilder | None = None
        self._flights: dict[str, asyncio.Future[Any]] = {}
        self._count = _Counters()
        self._reported: set[str] = set()
        self._store_tasks: dict[asyncio.Task[None], str] = {}  # background stores of a blocking backend, by key
        self._pending: dict[str, _PendingStore] = {}  # the latest pending store of each key
        self._timing_out: set[str] = set()  # operations whose last attempt timed out (logged once until they answer)
        self._backlogged = False

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
        self._target = pipeline.target
        self._keys = KeyBuilder(self.options.namespace, pipeline.target)
        bind_clock = getattr(self.backend, "bind_clock", None)
        if bind_clock is not None:
            bind_clock(pipeline.clock)
        self._allow_target_types()

    def for_copy(self) -> Cache:
        """A copy of the program (``ResilientModule`` deepcopy) gets its own Cache with these options and backend:
        answers are shared, and its keys name the copy's predictors (a compiled copy's demos differ)."""
        return type(self)(**dict(self.options))

    # ---------------------------------------------------------------- public helpers

    @property
    def stats(self) -> CacheStats:
        count = self._count
        return CacheStats(
            count.hits,
            count.misses,
            count.coalesced,
            count.bypassed,
            count.stores,
            count.errors,
            count.saved_tokens,
            count.saved_cost,
            count.timeouts,
            count.skipped_stores,
        )

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
        target = self._target
        if (
            isinstance(target, ModuleTarget)
            and setting("lm") is None
            and any(getattr(predictor, "lm", None) is None for _, predictor in target.named_predictors())
        ):
            raise LookupError(
                "no LM in effect: a call's key includes the LM it runs with, so call key_for inside the same "
                "dspy.context(lm=...) (or dspy.configure) as the calls whose entries you mean"
            )
        return self._keys.key(merged)

    async def drain(self) -> None:
        """Wait until the stores running in the background (each bounded by ``backend_timeout``) are done: call it
        before shutdown, or in a test before reading the backend."""
        while self._store_tasks:
            await asyncio.wait(list(self._store_tasks))

    async def _settle(self, doomed: Callable[[str], bool]) -> None:
        """Wait for the pending stores of the keys ``doomed`` selects, so none lands after an invalidation."""
        for key in [key for key in self._pending if doomed(key)]:
            del self._pending[key]
        tasks = [task for task, key in self._store_tasks.items() if doomed(key)]
        if tasks:
            await asyncio.wait(tasks)

    async def invalidate(self, key: str) -> bool:
        """Remove one entry (a key from :meth:`key_for` or an event); True if it was there."""
        await self._settle(key.__eq__)
        return await self.backend.delete(key)  # type: ignore[no-any-return]

    async def invalidate_namespace(self, namespace: str | None = None) -> int:
        """Remove every entry of ``namespace`` (default: this Cache's); how many were removed."""
        namespace = self.options.namespace if namespace is None else namespace
        if not _NAMESPACE.fullmatch(namespace):
            raise ValueError(f"not a valid namespace: {namespace!r}")
        await self._settle(_prefixed(f"{namespace}:"))
        return await self.backend.clear(namespace)  # type: ignore[no-any-return]

    async def clear(self) -> int:
        """Remove every entry in the backend, whatever its namespace; how many were removed."""
        await self._settle(_prefixed(""))
        return await self.backend.clear(None)  # type: ignore[no-any-return]

    def health(self) -> LayerHealth:
        """Degraded after backend failures (the cache fails open, so calls still pass); hit rate and savings."""
        stats = self.stats
        details = {
            "hit_rate": stats.hit_rate,
            "hits": stats.hits,
            "misses": stats.misses,
            "coalesced": stats.coalesced,
            "bypassed": stats.bypassed,
            "backend_errors": stats.errors,
            "backend_timeouts": stats.timeouts,
            "stores_pending": len(self._store_tasks),
            "stores_skipped": stats.skipped_stores,
            "saved_tokens": stats.saved_tokens,
            "saved_cost": stats.saved_cost,
        }
        return LayerHealth(self.label, "degraded" if stats.errors else "ok", details)

    def describe(self) -> dict[str, Any]:
        options = self.options
        return {
            "layer": "Cache",
            "name": self.label,
            "backend": repr(self.backend),
            "options": {
                "ttl": options.ttl,
                "namespace": options.namespace,
                "key": None if options.key is None else _callable_name(options.key),
                "single_flight": options.single_flight,
                "backend_timeout": options.backend_timeout,
                "max_pending_stores": options.max_pending_stores,
                "price": None if options.price is None else _callable_name(options.price),
                "types": [_type_name(t) for t in options.types],
            },
        }

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
            logger.exception("%s: could not compute the key; the call runs uncached", self.label)
            return await next(call)
        if call.record.leases and leases_lent(call):
            await reclaim_leases(call)  # an earlier pass of this call (a retry above) lent them as a follower
        if call.bypass_cache:
            self._count.bypassed += 1
            self._missed(call, key, bypassed=True)
            return await self._lead(call, next, key, None)
        single_flight = self.options.single_flight
        nowait = self._nowait
        while True:
            flight = self._flight(key) if single_flight else None
            if flight is None:
                data = self._read_now(call, key, nowait) if nowait is not None else await self._read(call, key)
                if data is not None:
                    entry = self._decode(key, data)
                    if entry is not None:
                        return self._hit(call, key, entry)
                flight = self._flight(key) if single_flight else None
                if flight is None:
                    self._missed(call, key, bypassed=False)
                    if single_flight:
                        flight = asyncio.get_running_loop().create_future()
                        self._flights[key] = flight
                    return await self._lead(call, next, key, flight)
            if flight in _LEADING.get():
                # reentrant: an ancestor of this call leads the flight, so it can only end after this call
                self._missed(call, key, bypassed=False)
                return await next(call)
            if call.record.leases:
                lend_leases(call)  # it only waits: its bulkhead slot serves other questions meanwhile
            try:
                outcome = await asyncio.shield(flight)
            except BaseException as error:  # the leader's error, or this follower's own cancellation / timeout
                self._count.coalesced += 1
                if call.listening:
                    call.emit(self._coalesced_event(call, key, error))
                raise
            if outcome is not _RETRY:
                return self._follow(call, key, outcome)
            if call.record.leases and leases_lent(call):
                await reclaim_leases(call)  # the leader was cancelled: this call may lead next

    def _flight(self, key: str) -> asyncio.Future[Any] | None:
        flight = self._flights.get(key)
        if flight is not None and flight.get_loop() is not asyncio.get_running_loop():
            del self._flights[key]
            return None
        return flight

    async def _lead(self, call: Call, next: Handler, key: str, flight: asyncio.Future[Any] | None) -> Any:
        """Run the call, hand the answer to the followers waiting on ``flight`` (if any), and store it."""
        record = call.record
        served_by = record.served_by
        leading = None if flight is None else _LEADING.set((*_LEADING.get(), flight))
        try:
            try:
                with usage_scope() as scope:
                    try:
                        value = await next(call)
                    finally:
                        if leading is not None:
                            _LEADING.reset(leading)
            except Exception as error:
                if flight is not None:
                    flight.set_exception(error)
                    flight.exception()
                raise
            except BaseException:
                if flight is not None:
                    flight.set_result(_RETRY)
                raise
            attach_usage(value, scope)
            usage = scope.by_model()
            tokens = scope.total_tokens(usage)
            data = self._encode(value, usage, tokens)
            answer = _Answer(value, data, record.served_by, usage, tokens, record.served_by != served_by)
            if flight is not None:
                flight.set_result(answer)
            data = self._storable(call, key, answer)
            if data is not None:
                nowait = self._nowait
                if nowait is not None:
                    self._store_now(call, key, data, nowait)
                elif self._blocking:
                    self._store_later(call, key, data)  # never on the caller's critical path
                else:
                    await self._store(call, key, data)
            return value
        finally:
            if flight is not None and self._flights.get(key) is flight:
                del self._flights[key]

    def _hit(self, call: Call, key: str, entry: CachedEntry) -> Any:
        count = self._count
        count.hits += 1
        self._saved(entry.usage, entry.tokens)
        if call.listening:
            call.emit(
                CacheHit(
                    pipeline=call.runtime.name,
                    layer=self.label,
                    time=call.clock.now(),
                    key=key,
                    saved_tokens=entry.tokens,
                    saved_usage=entry.usage,
                )
            )
        return self._with_usage(entry.value, entry.usage)

    def _follow(self, call: Call, key: str, answer: _Answer) -> Any:
        self._count.coalesced += 1
        self._saved(answer.usage, answer.tokens)
        call.record.served_by = answer.served_by
        if call.listening:
            call.emit(self._coalesced_event(call, key, None, answer.tokens, answer.usage))
        value, usage = self._fresh(answer)
        return self._with_usage(value, usage)

    def _coalesced_event(
        self,
        call: Call,
        key: str,
        error: BaseException | None,
        tokens: int = 0,
        usage: dict[str, dict[str, Any]] | None = None,
    ) -> CacheCoalesced:
        return CacheCoalesced(
            pipeline=call.runtime.name,
            layer=self.label,
            time=call.clock.now(),
            key=key,
            error=error,
            saved_tokens=tokens,
            saved_usage=usage or {},
        )

    def _missed(self, call: Call, key: str, *, bypassed: bool) -> None:
        if not bypassed:  # a bypassed call is counted as bypassed only: each lookup is one of the four
            self._count.misses += 1
        if call.listening:
            call.emit(
                CacheMiss(
                    pipeline=call.runtime.name, layer=self.label, time=call.clock.now(), key=key, bypassed=bypassed
                )
            )

    def _saved(self, usage: dict[str, Any], tokens: int) -> None:
        count = self._count
        count.saved_tokens += tokens
        price = self.options.price
        if price is not None and usage:
            try:
                count.saved_cost += float(price(usage))
            except Exception:
                logger.exception("%s: the price function failed; saved_cost leaves this answer out", self.label)

    def _with_usage(self, value: Any, usage: dict[str, Any]) -> Any:
        if type(value) is dspy.Prediction and setting("track_usage"):
            value.set_lm_usage(usage)
        return value

    def _fresh(self, answer: _Answer) -> tuple[Any, dict[str, Any]]:
        """A follower's own copy of the leader's answer and usage, so no caller can mutate another's result."""
        if answer.data is not None:
            entry = self._decode("(in flight)", answer.data)
            if entry is not None:
                return entry.value, entry.usage
        try:
            return copy.deepcopy(answer.value), copy.deepcopy(answer.usage)
        except Exception:
            return answer.value, answer.usage

    # ---------------------------------------------------------------- encoding

    def _allow_target_types(self) -> None:
        if self._target is None:
            return
        for annotation in _annotations_of(self._target):
            self._serializer.allow_annotation(annotation)

    def _encode(self, value: Any, usage: dict[str, Any], tokens: int) -> bytes | None:
        for retry in (True, False):
            try:
                return self._serializer.dumps(value, usage, tokens)
            except UnencodableError as error:
                if retry and issubclass(error.kind, BaseModel | enum.Enum):
                    self._allow_target_types()
                    continue
                self._report_once(_type_name(error.kind), "%s: answer not cached: %s", self.label, error)
                return None
            except Exception as error:
                self._report_once(_type_name(type(value)), "%s: answer not cached: %r", self.label, error)
                return None
        return None

    def _decode(self, key: str, data: object) -> CachedEntry | None:
        if type(data) is not bytes:
            logger.warning("%s: backend returned a %s for %s; treated as a miss", self.label, type(data).__name__, key)
            return None
        for retry in (True, False):
            try:
                return self._serializer.loads(data)
            except UnknownTypeError as error:
                if retry:
                    self._allow_target_types()
                    continue
                logger.warning("%s: unreadable entry %s (%s); treated as a miss", self.label, key, error)
            except CorruptEntryError as error:
                logger.warning("%s: unreadable entry %s (%s); treated as a miss", self.label, key, error)
                return None
        return None

    def _report_once(self, topic: str, message: str, *args: object) -> None:
        if topic in self._reported:
            return
        if len(self._reported) < 256:
            self._reported.add(topic)
        logger.warning(message, *args)

    # ---------------------------------------------------------------- the backend, failing open

    def _read_now(self, call: Call, key: str, backend: NowaitBackend) -> bytes | None:
        try:
            return backend.get_nowait(key)
        except Exception as error:
            self._failed(call, "get", key, error, timed_out=False)
            return None

    async def _read(self, call: Call, key: str) -> bytes | None:
        backend = self.backend
        try:
            if not self._blocking:
                return await backend.get(key)  # type: ignore[no-any-return]
            clock = call.clock
            now = clock.now()
            if self._pending:
                pending = self._pending.get(key)
                if pending is not None and (pending.expires_at is None or now < pending.expires_at):
                    return pending.data
            budget = self.options.backend_timeout
            deadline = call.deadline
            if deadline is not None:  # leave the program most of the time left
                budget = min(budget, (deadline - now) * _READ_SHARE)
                if budget <= 0:
                    return None
            scope = clock.deadline(now + budget)
            try:
                async with scope:
                    data: bytes | None = await backend.get(key)
            except TimeoutError as error:
                if not scope.expired():
                    raise
                self._failed(call, "get", key, error, timed_out=True, budget=budget)
                return None
            if self._timing_out:
                self._answered("get")
            return data
        except Exception as error:
            self._failed(call, "get", key, error, timed_out=False)
            return None
        except BaseException:  # cancelled while reading: the lookup ends here, as a miss that runs nothing
            self._missed(call, key, bypassed=False)
            raise

    def _storable(self, call: Call, key: str, answer: _Answer) -> bytes | None:
        """The bytes to store, or None (and a CacheNotStored event) for a fallback's or an unencodable answer."""
        reason = "fallback" if answer.fallback else "unencodable" if answer.data is None else None
        if reason is None:
            return answer.data
        if call.listening:
            call.emit(
                CacheNotStored(
                    pipeline=call.runtime.name, layer=self.label, time=call.clock.now(), key=key, reason=reason
                )
            )
        return None

    def _store_now(self, call: Call, key: str, data: bytes, backend: NowaitBackend) -> None:
        try:
            backend.set_nowait(key, data, self.options.ttl)
        except Exception as error:
            self._failed(call, "set", key, error, timed_out=False)
            return
        self._stored(call, key, data)

    def _store_later(self, call: Call, key: str, data: bytes) -> None:
        """Store in a background task, kept referenced and bounded; when ``max_pending_stores`` are running, skip."""
        tasks = self._store_tasks
        if len(tasks) >= self.options.max_pending_stores:
            self._count.skipped_stores += 1
            if not self._backlogged:
                self._backlogged = True
                logger.warning(
                    "%s: %d stores still running on a slow backend; answers are not stored until one ends",
                    self.label,
                    len(tasks),
                )
            if call.listening:
                call.emit(
                    CacheNotStored(
                        pipeline=call.runtime.name, layer=self.label, time=call.clock.now(), key=key, reason="backlog"
                    )
                )
            return
        ttl = self.options.ttl
        pending = _PendingStore(data, None if ttl is None else call.clock.now() + ttl)
        self._pending[key] = pending
        task = asyncio.get_running_loop().create_task(self._store(call, key, data))
        tasks[task] = key

        def forget(task: asyncio.Task[None]) -> None:
            del tasks[task]
            if self._pending.get(key) is pending:
                del self._pending[key]
            if not tasks:
                self._backlogged = False

        task.add_done_callback(forget)

    async def _store(self, call: Call, key: str, data: bytes) -> None:
        ttl = self.options.ttl
        backend = self.backend
        try:
            if not self._blocking:
                await backend.set(key, data, ttl)
            else:
                clock = call.clock
                budget = self.options.backend_timeout
                scope = clock.deadline(clock.now() + budget)
                try:
                    async with scope:
                        await backend.set(key, data, ttl)
                except TimeoutError as error:
                    if not scope.expired():
                        raise
                    self._failed(call, "set", key, error, timed_out=True, budget=budget)
                    return
                if self._timing_out:
                    self._answered("set")
        except Exception as error:
            self._failed(call, "set", key, error, timed_out=False)
            return
        self._stored(call, key, data)

    def _stored(self, call: Call, key: str, data: bytes) -> None:
        self._count.stores += 1
        if call.listening:
            call.emit(
                CacheStored(
                    pipeline=call.runtime.name,
                    layer=self.label,
                    time=call.clock.now(),
                    key=key,
                    ttl=self.options.ttl,
                    size=len(data),
                )
            )

    def _answered(self, operation: str) -> None:
        if operation in self._timing_out:
            self._timing_out.discard(operation)
            logger.info("%s: backend %s answers in time again", self.label, operation)

    def _failed(
        self, call: Call, operation: str, key: str, error: BaseException, *, timed_out: bool, budget: float = 0.0
    ) -> None:
        count = self._count
        count.errors += 1
        if timed_out:
            count.timeouts += 1
            # logged once per outage: a hung backend would otherwise log every call; each one is counted
            first = operation not in self._timing_out
            self._timing_out.add(operation)
            logger.log(
                logging.WARNING if first else logging.DEBUG,
                "%s: backend %s took over %gs for %s; going on without it",
                self.label,
                operation,
                budget,
                key,
            )
        else:
            logger.warning("%s: backend %s failed for %s (%r); going on without it", self.label, operation, key, error)
        if call.listening:
            call.emit(
                CacheBackendFailed(
                    pipeline=call.runtime.name,
                    layer=self.label,
                    time=call.clock.now(),
                    key=key,
                    operation=operation,
                    error=error,
                    timed_out=timed_out,
                )
            )
