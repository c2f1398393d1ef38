"""CircuitBreaker: stop calling a dependency that is failing, and probe it gently before trusting it again.

Closed, it counts outcomes — consecutive failures, or the failure rate and the slow-call rate over a window of
the last N calls or the last T seconds (in buckets), once ``min_calls`` have been seen. When a threshold is
reached the circuit opens: the call that tripped it raises its own error, later calls are rejected without
running, with :class:`~resilient_dspy.CircuitOpenError` carrying the time left. After the break (at least the
``retry_after`` of the error that tripped it; optionally growing on each re-open) the first call moves it to
half-open, which admits at most ``half_open_probes`` trial calls: all succeed → closed; any fails → open again,
timer restarted. A probe that hangs for a whole break gives its permit back. Errors it is told to exclude and
cancellations are neutral: they count as nothing, and a cancelled probe returns its permit.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, ClassVar

from resilient_dspy.core.clock import LoopClock
from resilient_dspy.core.emit import emit_event
from resilient_dspy.core.health import LayerHealth, Status, key_name, worst
from resilient_dspy.core.layer import Layer
from resilient_dspy.core.options import Options, options_from
from resilient_dspy.errors import CircuitOpenError, classify
from resilient_dspy.middleware._shared.partitions import KeyedStates, KeyFunction
from resilient_dspy.middleware.breaker.circuit import Transition, _Circuit, _KeyedCircuit
from resilient_dspy.middleware.breaker.events import CircuitRejected, CircuitSnapshot, CircuitState, CircuitStateChanged
from resilient_dspy.middleware.breaker.options import _FAILURE_KINDS, CircuitBreakerOptions
from resilient_dspy.middleware.breaker.shared import SharedCircuits, call_shared
from resilient_dspy.middleware.breaker.waiting import ChangeSignals, Refused, wait_for_half_open
from resilient_dspy.middleware.breaker.windows import _Probe
from resilient_dspy.store.protocol import FailMode, StateStore

if TYPE_CHECKING:
    from resilient_dspy.core.call import Call, Handler, Runtime
    from resilient_dspy.core.pipeline import Pipeline

__all__ = [
    "CircuitBreaker",
    "logger",
]


logger = logging.getLogger("resilient_dspy.breaker")


class CircuitBreaker(Layer):
    """Open the circuit when failures (or slow calls) cross a threshold; see the module docstring."""

    placement: ClassVar[str] = "breaker"
    options_type: ClassVar[type[Options]] = CircuitBreakerOptions
    options: CircuitBreakerOptions

    def __init__(
        self,
        failure_threshold: int | None = None,
        *,
        failure_rate: float | None = None,
        slow_call_rate: float | None = None,
        slow_call_duration: float | None = None,
        window: int | None = None,
        window_seconds: float | None = None,
        buckets: int = 10,
        min_calls: int = 10,
        break_duration: float = 30.0,
        break_multiplier: float = 1.0,
        max_break_duration: float | None = None,
        half_open_probes: int = 1,
        failure_on: Any = None,
        exclude: Any = None,
        key: KeyFunction | None = None,
        max_keys: int = 1024,
        idle_after: float = 600.0,
        wait_for_half_open: bool = False,
        max_wait: float | None = None,
        store: StateStore | None = None,
        on_store_failure: FailMode = "local",
        name: str | None = None,
    ) -> None:
        self.options = options = options_from(CircuitBreakerOptions, "CircuitBreaker", locals())
        self._states: KeyedStates[_Circuit] = KeyedStates(
            options,
            lambda k: _KeyedCircuit(options, k),
            single=lambda: _Circuit(options, None),
            on_evict=self._evicted,
        )
        self._shared = None if store is None else SharedCircuits(self, options, store, on_store_failure)
        self._single = self._states.single if store is None else None  # None: every call takes the path that branches
        self.signals = ChangeSignals()
        self._key_of, self._partitions = options.key, self._states.partitions  # the keyed hot path, inlined
        self._slow = options.slow_call_duration
        time_window = options.consecutive is None and options.window is None  # window_seconds, or the default 60 s
        self._timed = options.slow_call_duration is not None or time_window
        self._failure_on = options.failure_on
        self._exclude = options.exclude
        self._pipelines: weakref.WeakSet[Pipeline] = weakref.WeakSet()

    def _evicted(self, key: Hashable, circuit: _Circuit) -> None:
        """A circuit that still protected was evicted: more keys need protection than ``max_keys`` allows."""
        logger.warning(
            "circuit %s[%r] evicted while still protecting (%s): more than max_keys=%d circuits remember failures",
            self.name,
            key,
            circuit.state.value,
            self.options.max_keys,
        )

    def on_build(self, pipeline: Pipeline) -> None:
        self._pipelines.add(pipeline)

    # --------------------------------------------------------------------------------------- the call

    def counts_as_failure(self, error: BaseException) -> bool | None:
        """True for a failure, None for neutral (excluded, cancellation, or not a failure by ``failure_on``)."""
        if not isinstance(error, Exception):
            return None
        exclude = self._exclude
        if exclude is not None and (isinstance(error, exclude) if isinstance(exclude, tuple) else exclude(error)):
            return None
        failure_on = self._failure_on
        if failure_on is None:
            return True if classify(error).kind in _FAILURE_KINDS else None
        matched = isinstance(error, failure_on) if isinstance(failure_on, tuple) else failure_on(error)
        return True if matched else None

    async def __call__(self, call: Call, next: Handler) -> Any:
        single = self._single
        if single is not None and single.state is CircuitState.CLOSED and not self._timed:
            # The common case, unpartitioned and closed with no clock-based counting: no clock read on success.
            generation = single.generation
            record = call.record
            reached = record.attempts
            try:
                result = await next(call)
            except Exception as error:
                if record.attempts != reached:
                    self._failed(call, single, generation, error, 0.0)
                raise
            if generation == single.generation and record.attempts != reached:
                if single.window is None:
                    single.consecutive = 0
                    single.counted += 1
                else:
                    transition = single.succeeded(generation, False, 0.0)
                    if transition is not None:  # it completed min_calls and tripped: its break starts now
                        single.open_until = call.clock.now() + (transition[3] or 0.0)
                        self.announce(call, None, transition)
            return result
        started = call.clock.now()
        if self._shared is not None:
            return await call_shared(self, self._shared, call, next, started)
        return await self.call_local(call, next, started)

    async def call_local(self, call: Call, next: Handler, started: float) -> Any:
        """A call on in-process state (the store's fallback too): admit, run, count its outcome."""
        clock = call.clock
        key_of = self._key_of
        circuit = self._states.single or self._partitions.get(None if key_of is None else key_of(call), started)
        try:
            ticket, transition = circuit.admit(started)
        except CircuitOpenError as rejection:
            if not self.options.wait_for_half_open:
                self.emit(
                    call, CircuitRejected, key=circuit.key, state=circuit.state, retry_after=rejection.retry_after
                )
                raise
            refused = Refused(circuit.state, rejection)
            key = circuit.key
            circuit, ticket, transition = await wait_for_half_open(
                self,
                call,
                key,
                refused,
                started,
                self.options.max_wait,
                self.signals,
                lambda now: self._admit(key, now),
            )
        record = call.record
        reached = record.attempts
        try:
            if transition is not None:  # inside: a listener's BaseException must give the probe back too
                self.announce(call, circuit.key, transition)
            result = await next(call)
        except Exception as error:
            if record.attempts == reached:  # a cache's follower or an inner rejection: the provider was not asked
                circuit.release(ticket)
            else:
                self._failed(call, circuit, ticket, error, started)
            raise
        except BaseException:
            circuit.release(ticket)
            raise
        if record.attempts == reached:  # a cache hit or a coalesced answer says nothing about the provider
            circuit.release(ticket)
            return result
        now = clock.now()
        slow = self._slow is not None and now - started >= self._slow
        transition = circuit.succeeded(ticket, slow, now)
        if transition is not None:
            self.announce(call, circuit.key, transition)
        return result

    async def _admit(self, key: Hashable, now: float) -> tuple[_Circuit, int | _Probe, Transition | None] | Refused:
        """A waiter's next try at the in-process circuit for ``key``."""
        circuit = self._states.get(key, now)
        try:
            ticket, transition = circuit.admit(now)
        except CircuitOpenError as rejection:
            return Refused(circuit.state, rejection)
        return circuit, ticket, transition

    def _failed(self, call: Call, circuit: _Circuit, ticket: int | _Probe, error: Exception, started: float) -> None:
        if self.counts_as_failure(error) is None:
            circuit.release(ticket)
            return
        now = call.clock.now()
        slow = self._slow is not None and now - started >= self._slow
        transition = circuit.failed(ticket, slow, classify(error).retry_after, now)
        if transition is not None:
            self.announce(call, circuit.key, transition)
        if circuit.state is CircuitState.OPEN:
            call.record.blocked_until = circuit.open_until

    def announce(self, call: Call | None, key: Hashable, transition: Transition) -> None:
        """Log a transition and emit it: to the calling pipeline, or (manual control) to every pipeline built with
        this breaker."""
        self.signals.changed(key)
        old, new, reason, retry_after = transition
        log = logger.warning if new is CircuitState.OPEN else logger.info
        log("circuit %s%s: %s -> %s (%s)", self.name, "" if key is None else f"[{key!r}]", old, new, reason)
        fields = {"key": key, "old": old, "new": new, "reason": reason, "retry_after": retry_after}
        if call is not None:
            self.emit(call, CircuitStateChanged, **fields)
            return
        for pipeline in list(self._pipelines):
            runtime = pipeline.runtime
            if runtime.listeners:
                emit_event(_with_time(runtime), self.name, CircuitStateChanged, **fields)

    # --------------------------------------------------------------------------------------- manual control

    def _circuits(self, key: Hashable | None) -> list[_Circuit]:
        if self._shared is not None:
            raise RuntimeError(f"{self.name} keeps its circuits on a store: use await aisolate() / areset()")
        if self._single is not None or key is None:
            return [circuit for _, circuit in self._states.items()]
        return [self._states.get(key, self._now())]

    def _now(self) -> float:
        for pipeline in self._pipelines:
            try:
                return pipeline.runtime.clock.now()
            except RuntimeError:  # the loop clock outside a running loop
                break
        return 0.0

    def isolate(self, key: Hashable | None = None) -> None:
        """Hold the circuit (for ``key``, or every existing one) open until :meth:`reset`: manual override."""
        for circuit in self._circuits(key):
            transition = circuit.isolate()
            if transition is not None:
                self.announce(None, circuit.key, transition)

    def reset(self, key: Hashable | None = None) -> None:
        """Close the circuit (for ``key``, or every one) and forget its counts, isolation included."""
        for circuit in self._circuits(key):
            transition = circuit.reset()
            if transition is not None:
                self.announce(None, circuit.key, transition)

    async def aisolate(self, key: Hashable | None = None) -> None:
        """:meth:`isolate` that also works on a store (there, for ``key`` only: every process refuses at once)."""
        await self._control(key, "isolate")

    async def areset(self, key: Hashable | None = None) -> None:
        """:meth:`reset` that also works on a store (there, for ``key`` only: every process sees it closed)."""
        await self._control(key, "reset")

    async def _control(self, key: Hashable | None, action: str) -> None:
        shared = self._shared
        if shared is None:
            (self.isolate if action == "isolate" else self.reset)(key)
            return
        transition = await shared.control(key, action)
        if transition is not None:
            self.announce(None, key, transition)

    def snapshot(self, key: Hashable | None = None) -> CircuitSnapshot:
        """State and counts of the circuit for ``key`` (the only one when unpartitioned; a fresh circuit's for a key
        not seen). On a store: as the last step of this process found it."""
        if self._shared is not None and key in self._shared.mirror:
            return self._shared.mirror[key]
        circuit = self._states.peek(key)
        return (circuit or _Circuit(self.options, key)).snapshot(self._now())

    def snapshots(self) -> dict[Hashable, CircuitSnapshot]:
        """Every live circuit's snapshot by key (``{None: ...}`` when unpartitioned); on a store, the mirrored ones."""
        if self._shared is not None:
            mirrored = dict(self._shared.mirror)
            return {None: self.snapshot()} if self.options.key is None and not mirrored else mirrored
        now = self._now()
        return {key: circuit.snapshot(now) for key, circuit in self._states.items()}

    def health(self) -> LayerHealth:
        """Down when the (only) circuit refuses calls; degraded when some partitions do, or when a protecting
        circuit was evicted within the last ``idle_after`` seconds (``max_keys`` too small for the failing keys)."""
        snapshots = self.snapshots()
        refusing = {
            key_name(key): snap.state.value
            for key, snap in snapshots.items()
            if snap.state is CircuitState.ISOLATED or (snap.state is CircuitState.OPEN and (snap.retry_after or 0) > 0)
        }
        status: Status
        if not refusing:
            status = "ok"
        elif len(refusing) == len(snapshots) and self.options.key is None:
            status = "down"
        else:
            status = "degraded"
        states = {key_name(key): snap.state.value for key, snap in snapshots.items()}
        details: dict[str, Any] = {"circuits": states, "refusing": sorted(refusing)}
        link = None if self._shared is None else self._shared.link
        if link is not None:
            details.update(link.health_details())
            if link.degraded:
                status = worst([status, "down" if link.mode == "reject" else "degraded"])
        elif self._single is None:
            partitions = self._states.partitions
            details["evicted_protecting"] = partitions.evicted_protective
            last = partitions.last_evicted_at
            if last is not None and self._now() - last < self.options.idle_after:
                status = "degraded"
        return LayerHealth(self.name, status, details)

    @property
    def state(self) -> CircuitState:
        """Alias of ``snapshot().state``: the state of the unpartitioned circuit (docs and tests read it)."""
        return self.snapshot().state

    def describe(self) -> dict[str, Any]:
        """The base's, with ``options`` holding the mode and partitioning in effect instead of the error filters
        and key function (types or callables, which say nothing once printed)."""
        options = self.dump_options(frozenset({"failure_on", "exclude", "key"}))
        options["mode"] = "consecutive" if self.options.consecutive is not None else "rate"
        options["partitioned"] = self.options.key is not None
        return {**super().describe(), "options": options}


class _NoLoopClock(LoopClock):
    """The time of an event announced where the pipeline's loop clock has none (a manual ``isolate()`` before the
    loop runs): 0.0, like :meth:`CircuitBreaker.snapshot` there."""

    __slots__ = ()

    def now(self) -> float:
        return 0.0


def _with_time(runtime: Runtime) -> Runtime:
    """``runtime``, or a copy whose clock reads 0.0 when its own cannot be read (no running loop)."""
    try:
        runtime.clock.now()
    except RuntimeError:
        return dataclasses.replace(runtime, clock=_NoLoopClock())
    return runtime
