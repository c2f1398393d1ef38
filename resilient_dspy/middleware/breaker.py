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

import logging
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator, model_validator

from resilient_dspy.core.health import LayerHealth, Status, key_name
from resilient_dspy.core.options import FieldProblem, build_options
from resilient_dspy.errors import CircuitOpenError, ErrorKind, classify
from resilient_dspy.events import Event, deliver
from resilient_dspy.partition import Hold, KeyFunction, PartitionOptions, Partitions

if TYPE_CHECKING:
    from resilient_dspy.core.call import Call, Handler
    from resilient_dspy.core.pipeline import Pipeline

__all__ = [
    "CircuitBreaker",
    "CircuitBreakerOptions",
    "CircuitRejected",
    "CircuitSnapshot",
    "CircuitState",
    "CircuitStateChanged",
]

logger = logging.getLogger("resilient_dspy.breaker")

ErrorFilter = tuple[type[BaseException], ...] | Callable[[BaseException], bool]

_FAILURE_KINDS = frozenset(
    {
        ErrorKind.RATE_LIMIT,
        ErrorKind.SERVER,
        ErrorKind.TIMEOUT,
        ErrorKind.TRANSPORT,
        ErrorKind.UNKNOWN,
        ErrorKind.GAVE_UP,
    }
)


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    ISOLATED = "isolated"


def _normalise_filter(value: Any) -> Any:
    if isinstance(value, type):
        return (value,)
    if isinstance(value, list):
        return tuple(value)
    return value


def _check_filter(value: Any) -> Any:
    if value is None:
        return None
    value = _normalise_filter(value)
    if isinstance(value, tuple):
        if not value or not all(isinstance(t, type) and issubclass(t, BaseException) for t in value):
            raise ValueError("must be exception types or a predicate of the exception")
    elif not callable(value):
        raise ValueError("must be exception types or a predicate of the exception")
    return value


class CircuitBreakerOptions(PartitionOptions):
    """When to open, how long to stay open, and how to probe; see docs/patterns/circuit-breaker.md."""

    failure_threshold: int | None = Field(default=None, ge=1, description="Consecutive failures that open it.")
    failure_rate: float | None = Field(default=None, gt=0, le=1, description="Failure share that opens it.")
    slow_call_rate: float | None = Field(default=None, gt=0, le=1, description="Slow-call share that opens it.")
    slow_call_duration: float | None = Field(default=None, gt=0, allow_inf_nan=False, description="A slow call's time.")
    window: int | None = Field(default=None, ge=1, description="Count window: the last N calls.")
    window_seconds: float | None = Field(default=None, gt=0, allow_inf_nan=False, description="Time window: last T s.")
    buckets: int = Field(default=10, ge=1, le=1000, description="Buckets a time window is counted in.")
    min_calls: int = Field(default=10, ge=1, description="Calls in the window before a rate can open it.")
    break_duration: float = Field(default=30.0, gt=0, allow_inf_nan=False, description="Seconds open before a probe.")
    break_multiplier: float = Field(default=1.0, ge=1, allow_inf_nan=False, description="Break growth per re-open.")
    max_break_duration: float | None = Field(default=None, gt=0, allow_inf_nan=False, description="Cap on growth.")
    half_open_probes: int = Field(default=1, ge=1, description="Trial calls admitted (and needed) when half-open.")
    failure_on: Any = Field(default=None, description="Errors that count as failures (types or predicate).")
    exclude: Any = Field(default=None, description="Errors that count as nothing (types or predicate).")
    name: str | None = Field(default=None, description="Label in events and describe().")

    _check_failure_on = field_validator("failure_on")(classmethod(lambda cls, v: _check_filter(v)))
    _check_exclude = field_validator("exclude")(classmethod(lambda cls, v: _check_filter(v)))

    @model_validator(mode="after")
    def _check_mode(self) -> CircuitBreakerOptions:
        rated = self.failure_rate is not None or self.slow_call_rate is not None
        if rated and self.failure_threshold is not None:
            raise FieldProblem(
                "failure_threshold",
                "give failure_threshold (consecutive mode) or failure_rate/slow_call_rate, not both",
            )
        if (self.slow_call_rate is None) != (self.slow_call_duration is None):
            missing, given = (
                ("slow_call_duration", "slow_call_rate")
                if self.slow_call_duration is None
                else ("slow_call_rate", "slow_call_duration")
            )
            raise FieldProblem(missing, f"is required with {given} (slow_call_rate and slow_call_duration go together)")
        if self.window is not None and self.window_seconds is not None:
            raise FieldProblem("window", "give window (last N calls) or window_seconds (last T seconds), not both")
        if not rated and (self.window is not None or self.window_seconds is not None):
            field = "window" if self.window is not None else "window_seconds"
            raise FieldProblem(field, "a window needs failure_rate or slow_call_rate")
        if self.window is not None and self.min_calls > self.window:
            rule = f"must be <= window ({self.window}) or the circuit can never open (got {self.min_calls})"
            raise FieldProblem("min_calls", rule)
        if self.max_break_duration is not None and self.max_break_duration < self.break_duration:
            raise FieldProblem("max_break_duration", f"must be >= break_duration ({self.break_duration:g})")
        return self

    @property
    def consecutive(self) -> int | None:
        """The consecutive-failure threshold in effect (5 when no rate is configured), else None."""
        if self.failure_rate is None and self.slow_call_rate is None:
            return self.failure_threshold or 5
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class CircuitStateChanged(Event):
    """The circuit for ``key`` went from ``old`` to ``new``; ``reason`` says why; ``retry_after`` if it opened."""

    key: Hashable
    old: CircuitState
    new: CircuitState
    reason: str
    retry_after: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class CircuitRejected(Event):
    """A call was refused without running (open, half-open with no permit, or isolated)."""

    key: Hashable
    state: CircuitState
    retry_after: float | None


@dataclass(frozen=True, slots=True)
class CircuitSnapshot:
    """The observable state of one circuit (see :meth:`CircuitBreaker.snapshot`)."""

    key: Hashable
    state: CircuitState
    calls: int
    failures: int
    slow_calls: int
    consecutive_failures: int
    retry_after: float | None
    break_duration: float
    probes_in_flight: int
    probes_succeeded: int

    @property
    def failure_rate(self) -> float:
        return self.failures / self.calls if self.calls else 0.0

    @property
    def slow_call_rate(self) -> float:
        return self.slow_calls / self.calls if self.calls else 0.0


_FAILED, _SLOW = 1, 2

RETRY_AFTER_CEILING = 3600.0
"""Longest break a trip's Retry-After can ask for without ``max_break_duration`` (then that is the ceiling)."""


class _CountWindow:
    """Outcomes of the last ``size`` calls in a ring, with running totals: O(1) per call."""

    __slots__ = ("failures", "filled", "index", "outcomes", "slows")

    def __init__(self, size: int) -> None:
        self.outcomes = [0] * size
        self.index = self.filled = self.failures = self.slows = 0

    def add(self, outcome: int, now: float) -> None:
        outcomes = self.outcomes
        old = outcomes[self.index]
        if self.filled == len(outcomes):
            self.failures -= old & _FAILED
            self.slows -= (old & _SLOW) >> 1
        else:
            self.filled += 1
        outcomes[self.index] = outcome
        self.failures += outcome & _FAILED
        self.slows += (outcome & _SLOW) >> 1
        self.index = (self.index + 1) % len(outcomes)

    def totals(self, now: float) -> tuple[int, int, int]:
        return self.filled, self.failures, self.slows


class _TimeWindow:
    """Outcomes of the last ``seconds`` in ``buckets`` slots; a slot older than the window counts as empty."""

    __slots__ = ("calls", "failures", "slows", "stamps", "width")

    def __init__(self, seconds: float, buckets: int) -> None:
        self.width = seconds / buckets
        self.stamps = [-(2**62)] * buckets
        self.calls = [0] * buckets
        self.failures = [0] * buckets
        self.slows = [0] * buckets

    def add(self, outcome: int, now: float) -> None:
        stamp = int(now // self.width)
        slot = stamp % len(self.stamps)
        if self.stamps[slot] != stamp:
            self.stamps[slot], self.calls[slot], self.failures[slot], self.slows[slot] = stamp, 0, 0, 0
        self.calls[slot] += 1
        self.failures[slot] += outcome & _FAILED
        self.slows[slot] += (outcome & _SLOW) >> 1

    def totals(self, now: float) -> tuple[int, int, int]:
        oldest = int(now // self.width) - len(self.stamps)
        calls = failures = slows = 0
        for slot, stamp in enumerate(self.stamps):
            if stamp > oldest:
                calls += self.calls[slot]
                failures += self.failures[slot]
                slows += self.slows[slot]
        return calls, failures, slows


class _Probe:
    """A half-open trial call; identity is its ticket."""

    __slots__ = ("started",)

    def __init__(self, started: float) -> None:
        self.started = started


Transition = tuple[CircuitState, CircuitState, str, float | None]


class _Circuit:
    """The state machine of one circuit. Synchronous: asyncio runs it between awaits, so it needs no lock."""

    __slots__ = (
        "break_duration",
        "consecutive",
        "counted",
        "counted_failures",
        "generation",
        "in_flight",
        "key",
        "open_until",
        "options",
        "probes",
        "probes_succeeded",
        "state",
        "window",
    )

    def __init__(self, options: CircuitBreakerOptions, key: Hashable) -> None:
        self.options = options
        self.key = key
        self.state = CircuitState.CLOSED
        self.generation = 0
        self.consecutive = 0
        self.counted = self.counted_failures = 0  # consecutive mode's outcomes since the last state change
        self.open_until = 0.0
        self.break_duration = options.break_duration
        self.probes: dict[_Probe, None] = {}
        self.probes_succeeded = 0
        self.window = self._new_window()
        self.in_flight = 0  # counted by _KeyedCircuit only: the unpartitioned circuit is never evicted

    def _new_window(self) -> _CountWindow | _TimeWindow | None:
        options = self.options
        if options.consecutive is not None:
            return None
        if options.window is not None:
            return _CountWindow(options.window)
        return _TimeWindow(options.window_seconds or 60.0, options.buckets)

    def hold(self, now: float) -> Hold:
        """Calls in flight or isolation pin it; open or half-open (even with the break over, until a probe closes
        it), a failure count or a failure or slow call in the window protect. Successes alone protect nothing: a
        fresh window only opens sooner."""
        state = self.state
        if self.in_flight or state is CircuitState.ISOLATED:
            return Hold.CALLS
        if state is not CircuitState.CLOSED or self.consecutive:
            return Hold.PROTECTION
        if self.window is not None:
            _, failures, slows = self.window.totals(now)
            if failures or slows:
                return Hold.PROTECTION
        return Hold.NOTHING

    # ----------------------------------------------------------------------------------------- admission

    def admit(self, now: float) -> tuple[int | _Probe, Transition | None]:
        """A ticket for a call allowed to run, and the transition admitting it caused; raises when refused."""
        state = self.state
        if state is CircuitState.CLOSED:
            return self.generation, None
        transition = None
        if state is CircuitState.OPEN:
            if now < self.open_until:
                raise CircuitOpenError(f"circuit {self.key!r} is open", retry_after=self.open_until - now)
            transition = self._move(CircuitState.HALF_OPEN, "break_elapsed", None)
        elif state is CircuitState.ISOLATED:
            raise CircuitOpenError(f"circuit {self.key!r} is isolated", retry_after=None)
        hung_after = self.break_duration
        for probe in [p for p in self.probes if now - p.started >= hung_after]:
            del self.probes[probe]
        if len(self.probes) + self.probes_succeeded >= self.options.half_open_probes:
            reclaim = min((p.started + hung_after for p in self.probes), default=now + hung_after)
            message = f"circuit {self.key!r} is half-open and its probes are out"
            raise CircuitOpenError(message, retry_after=max(0.0, reclaim - now))
        probe = _Probe(now)
        self.probes[probe] = None
        return probe, transition

    # ----------------------------------------------------------------------------------------- outcomes

    def release(self, ticket: int | _Probe) -> None:
        """A neutral outcome: count nothing; a probe gives its permit back."""
        if type(ticket) is _Probe:
            self.probes.pop(ticket, None)

    def succeeded(self, ticket: int | _Probe, slow: bool, now: float) -> Transition | None:
        if type(ticket) is _Probe:
            if ticket not in self.probes:
                return None
            if slow:
                return self._reopen(now, "probe_slow", None)
            del self.probes[ticket]
            self.probes_succeeded += 1
            if self.probes_succeeded >= self.options.half_open_probes:
                return self._close("probes_succeeded")
            return None
        if ticket != self.generation:
            return None
        self.consecutive = 0
        window = self.window
        if window is None:
            self.counted += 1
            return None
        window.add(_SLOW if slow else 0, now)
        # Every outcome is judged once min_calls are seen. A fast success never raises a rate, so on a count window
        # (rates checked at each earlier outcome) it can cross one only by bringing the window to min_calls.
        if slow or isinstance(window, _TimeWindow) or window.filled == self.options.min_calls:
            return self._check_rates(now, None)
        return None

    def failed(self, ticket: int | _Probe, slow: bool, retry_after: float | None, now: float) -> Transition | None:
        if type(ticket) is _Probe:
            if ticket not in self.probes:
                return None
            return self._reopen(now, "probe_failed", retry_after)
        if ticket != self.generation:
            return None
        self.consecutive += 1
        window = self.window
        if window is None:
            self.counted += 1
            self.counted_failures += 1
            threshold = self.options.consecutive
            if threshold is not None and self.consecutive >= threshold:
                return self._open(now, "failure_threshold", retry_after)
            return None
        window.add(_FAILED | (_SLOW if slow else 0), now)
        return self._check_rates(now, retry_after)

    def _check_rates(self, now: float, retry_after: float | None) -> Transition | None:
        assert self.window is not None
        calls, failures, slows = self.window.totals(now)
        options = self.options
        if calls < options.min_calls:
            return None
        if options.failure_rate is not None and failures >= options.failure_rate * calls:
            return self._open(now, "failure_rate", retry_after)
        if options.slow_call_rate is not None and slows >= options.slow_call_rate * calls:
            return self._open(now, "slow_call_rate", retry_after)
        return None

    # ----------------------------------------------------------------------------------------- transitions

    def _move(self, new: CircuitState, reason: str, retry_after: float | None) -> Transition:
        old = self.state
        self.state = new
        self.generation += 1
        self.probes.clear()
        self.probes_succeeded = 0
        self.counted = self.counted_failures = 0
        return old, new, reason, retry_after

    def _open(self, now: float, reason: str, retry_after: float | None) -> Transition:
        duration = self.break_duration
        if retry_after is not None and retry_after > duration:
            options = self.options
            ceiling = options.max_break_duration or max(options.break_duration, RETRY_AFTER_CEILING)
            duration = max(duration, min(retry_after, ceiling))
        self.open_until = now + duration
        self.consecutive = 0
        self.window = self._new_window()
        return self._move(CircuitState.OPEN, reason, duration)

    def _reopen(self, now: float, reason: str, retry_after: float | None) -> Transition:
        options = self.options
        grown = self.break_duration * options.break_multiplier
        cap = options.max_break_duration
        self.break_duration = grown if cap is None else min(grown, cap)
        return self._open(now, reason, retry_after)

    def _close(self, reason: str) -> Transition:
        self.break_duration = self.options.break_duration
        self.consecutive = 0
        self.window = self._new_window()
        return self._move(CircuitState.CLOSED, reason, None)

    def isolate(self) -> Transition | None:
        return None if self.state is CircuitState.ISOLATED else self._move(CircuitState.ISOLATED, "isolate", None)

    def reset(self) -> Transition | None:
        changed = self.state is not CircuitState.CLOSED
        transition = self._close("reset")
        return transition if changed else None

    def snapshot(self, now: float) -> CircuitSnapshot:
        if self.window is not None:
            calls, failures, slows = self.window.totals(now)
        else:  # consecutive mode: what was counted since the circuit last changed state
            calls, failures, slows = self.counted, self.counted_failures, 0
        retry_after = max(0.0, self.open_until - now) if self.state is CircuitState.OPEN else None
        return CircuitSnapshot(
            key=self.key,
            state=self.state,
            calls=calls,
            failures=failures,
            slow_calls=slows,
            consecutive_failures=self.consecutive,
            retry_after=retry_after,
            break_duration=self.break_duration,
            probes_in_flight=len(self.probes),
            probes_succeeded=self.probes_succeeded,
        )


class _KeyedCircuit(_Circuit):
    """A circuit kept in :class:`Partitions`: it counts its admitted calls until their outcome, so it is never
    evicted with calls in flight (their outcomes would land on a detached circuit). Every admitted call ends in
    exactly one of release, succeeded or failed."""

    __slots__ = ()

    def admit(self, now: float) -> tuple[int | _Probe, Transition | None]:
        admitted = super().admit(now)
        self.in_flight += 1
        return admitted

    def release(self, ticket: int | _Probe) -> None:
        self.in_flight -= 1
        super().release(ticket)

    def succeeded(self, ticket: int | _Probe, slow: bool, now: float) -> Transition | None:
        self.in_flight -= 1
        return super().succeeded(ticket, slow, now)

    def failed(self, ticket: int | _Probe, slow: bool, retry_after: float | None, now: float) -> Transition | None:
        self.in_flight -= 1
        return super().failed(ticket, slow, retry_after, now)


class CircuitBreaker:
    """Open the circuit when failures (or slow calls) cross a threshold; see the module docstring."""

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
        name: str | None = None,
    ) -> None:
        self.options = build_options(
            CircuitBreakerOptions,
            "CircuitBreaker",
            {
                "failure_threshold": failure_threshold,
                "failure_rate": failure_rate,
                "slow_call_rate": slow_call_rate,
                "slow_call_duration": slow_call_duration,
                "window": window,
                "window_seconds": window_seconds,
                "buckets": buckets,
                "min_calls": min_calls,
                "break_duration": break_duration,
                "break_multiplier": break_multiplier,
                "max_break_duration": max_break_duration,
                "half_open_probes": half_open_probes,
                "failure_on": failure_on,
                "exclude": exclude,
                "key": key,
                "max_keys": max_keys,
                "idle_after": idle_after,
                "name": name,
            },
        )
        options = self.options
        self.name = options.name or "CircuitBreaker"
        self._key = options.key
        self._single = _Circuit(options, None) if options.key is None else None
        self._partitions: Partitions[_Circuit] = Partitions(
            lambda k: _KeyedCircuit(options, k),
            max_keys=options.max_keys,
            idle_after=options.idle_after,
            on_evict=self._evicted,
        )
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

    def _circuit(self, call: Call, now: float) -> _Circuit:
        single = self._single
        if single is not None:
            return single
        assert self._key is not None
        return self._partitions.get(self._key(call), now)

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
                    single.succeeded(generation, False, 0.0)
            return result
        clock = call.clock
        started = clock.now()
        circuit = single if single is not None else self._circuit(call, started)
        try:
            ticket, transition = circuit.admit(started)
        except CircuitOpenError as rejection:
            if call.listening:
                call.emit(
                    CircuitRejected(
                        pipeline=call.runtime.name,
                        layer=self.name,
                        time=started,
                        key=circuit.key,
                        state=circuit.state,
                        retry_after=rejection.retry_after,
                    )
                )
            raise
        record = call.record
        reached = record.attempts
        try:
            if transition is not None:  # inside: a listener's BaseException must give the probe back too
                self._announce(call, circuit.key, transition, started)
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
            self._announce(call, circuit.key, transition, now)
        return result

    def _failed(self, call: Call, circuit: _Circuit, ticket: int | _Probe, error: Exception, started: float) -> None:
        if self.counts_as_failure(error) is None:
            circuit.release(ticket)
            return
        now = call.clock.now()
        slow = self._slow is not None and now - started >= self._slow
        transition = circuit.failed(ticket, slow, classify(error).retry_after, now)
        if transition is not None:
            self._announce(call, circuit.key, transition, now)
        if circuit.state is CircuitState.OPEN:
            call.record.blocked_until = circuit.open_until

    def _announce(self, call: Call | None, key: Hashable, transition: Transition, now: float) -> None:
        old, new, reason, _ = transition
        log = logger.warning if new is CircuitState.OPEN else logger.info
        log("circuit %s%s: %s -> %s (%s)", self.name, "" if key is None else f"[{key!r}]", old, new, reason)
        if call is not None:
            if call.listening:
                call.emit(self._event(call.runtime.name, key, transition, now))
            return
        for pipeline in list(self._pipelines):
            runtime = pipeline.runtime
            if runtime.listeners:
                deliver(runtime.listeners, self._event(runtime.name, key, transition, now))

    def _event(self, pipeline: str, key: Hashable, transition: Transition, now: float) -> CircuitStateChanged:
        old, new, reason, retry_after = transition
        return CircuitStateChanged(
            pipeline=pipeline,
            layer=self.name,
            time=now,
            key=key,
            old=old,
            new=new,
            reason=reason,
            retry_after=retry_after,
        )

    # --------------------------------------------------------------------------------------- manual control

    def _circuits(self, key: Hashable | None) -> list[_Circuit]:
        if self._single is not None:
            return [self._single]
        if key is None:
            return [circuit for _, circuit in self._partitions.items()]
        return [self._partitions.get(key, self._now())]

    def _now(self) -> float:
        for pipeline in self._pipelines:
            try:
                return pipeline.runtime.clock.now()
            except RuntimeError:  # the loop clock outside a running loop
                break
        return 0.0

    def isolate(self, key: Hashable | None = None) -> None:
        """Hold the circuit (for ``key``, or every existing one) open until :meth:`reset`: manual override."""
        now = self._now()
        for circuit in self._circuits(key):
            transition = circuit.isolate()
            if transition is not None:
                self._announce(None, circuit.key, transition, now)

    def reset(self, key: Hashable | None = None) -> None:
        """Close the circuit (for ``key``, or every one) and forget its counts, isolation included."""
        now = self._now()
        for circuit in self._circuits(key):
            transition = circuit.reset()
            if transition is not None:
                self._announce(None, circuit.key, transition, now)

    def snapshot(self, key: Hashable | None = None) -> CircuitSnapshot:
        """State and counts of the circuit for ``key`` (the only one when unpartitioned)."""
        if self._single is not None:
            return self._single.snapshot(self._now())
        circuit = self._partitions.peek(key)
        return (circuit or _Circuit(self.options, key)).snapshot(self._now())

    def snapshots(self) -> dict[Hashable, CircuitSnapshot]:
        """Every live circuit's snapshot by key."""
        now = self._now()
        return {key: circuit.snapshot(now) for key, circuit in self._all()}

    def _all(self) -> list[tuple[Hashable, _Circuit]]:
        if self._single is not None:
            return [(None, self._single)]
        return list(self._partitions.items())

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
        elif len(refusing) == len(snapshots) and self._single is not None:
            status = "down"
        else:
            status = "degraded"
        states = {key_name(key): snap.state.value for key, snap in snapshots.items()}
        details: dict[str, Any] = {"circuits": states, "refusing": sorted(refusing)}
        if self._single is None:
            partitions = self._partitions
            details["evicted_protecting"] = partitions.evicted_protective
            last = partitions.last_evicted_at
            if last is not None and self._now() - last < self.options.idle_after:
                status = "degraded"
        return LayerHealth(self.name, status, details)

    @property
    def state(self) -> CircuitState:
        """The state of the unpartitioned circuit (use :meth:`snapshot` with a key when partitioned)."""
        return self.snapshot().state

    def describe(self) -> dict[str, Any]:
        options = self.options.model_dump(exclude={"failure_on", "exclude", "key"})
        options["mode"] = "consecutive" if self.options.consecutive is not None else "rate"
        options["partitioned"] = self.options.key is not None
        return {"layer": "CircuitBreaker", "name": self.name, "options": options}
