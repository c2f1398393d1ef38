"""A circuit kept on a shared store: one state machine and one outcome window per key for every process.

Two atomic steps, each one Lua script (one round trip) reading the server's clock: ``admit`` (closed → go; open →
refuse with the time left; half-open → a probe lease while fewer than ``half_open_probes`` are live, each lease
expiring one break later so a crashed prober cannot wedge the circuit) and ``record`` (an outcome: the count or
time window, the rates judged on every outcome once ``min_calls`` are seen, the consecutive count, the probes; a
trip, a re-open with the break grown, a close). A trip in one process refuses in every other at its next admission.
The state lives in two hashes, ``store.key("breaker", name, "{key}")`` and the same with ``:window`` (one hash tag,
so one cluster slot); both expire ``idle_after`` seconds after the last step (an open circuit only after its break).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from resilient_dspy.errors import CircuitOpenError, classify
from resilient_dspy.middleware.breaker.circuit import RETRY_AFTER_CEILING, Transition
from resilient_dspy.middleware.breaker.events import CircuitRejected, CircuitSnapshot, CircuitState
from resilient_dspy.middleware.breaker.scripts import ADMIT, CONTROL, RECORD
from resilient_dspy.middleware.breaker.waiting import Refused, wait_for_half_open
from resilient_dspy.store.link import StoreLink
from resilient_dspy.store.protocol import FailMode, StateStore, StoreUnavailableError

if TYPE_CHECKING:
    from resilient_dspy.core.call import Call, Handler
    from resilient_dspy.core.layer import Layer
    from resilient_dspy.middleware.breaker.layer import CircuitBreaker
    from resilient_dspy.middleware.breaker.options import CircuitBreakerOptions

__all__ = ["SharedCircuits", "call_shared"]

_MAX_POLL = 1.0
"""Longest a waiter sleeps between two looks at a shared half-open circuit (another process's probe ends unseen)."""

Admission = tuple[str, Transition | None]
"""A granted admission on the store: its ticket (``g<generation>`` or ``p<lease>``) and the transition it caused."""


class SharedCircuits:
    """The store side of a CircuitBreaker with ``store=``: runs its steps and mirrors the last state each key showed."""

    __slots__ = ("config", "link", "max_keys", "mirror", "name", "store")

    def __init__(self, layer: Layer, options: CircuitBreakerOptions, store: StateStore, mode: FailMode) -> None:
        self.store = store
        self.link = StoreLink(layer, store, mode)
        self.name = layer.name
        self.max_keys = options.max_keys
        self.mirror: dict[Hashable, CircuitSnapshot] = {}
        if options.consecutive is not None:
            kind, size = "c", float(options.consecutive)
        elif options.window is not None:
            kind, size = "n", float(options.window)
        else:
            kind, size = "t", options.window_seconds or 60.0
        unset = -1.0
        self.config: list[Any] = [
            kind,
            size,
            options.buckets,
            options.min_calls,
            unset if options.failure_rate is None else options.failure_rate,
            unset if options.slow_call_rate is None else options.slow_call_rate,
            options.break_duration,
            options.break_multiplier,
            unset if options.max_break_duration is None else options.max_break_duration,
            options.half_open_probes,
            RETRY_AFTER_CEILING,
            options.idle_after,
        ]

    def keys(self, key: Hashable) -> list[str]:
        base = self.store.key("breaker", self.name, "{" + ("_" if key is None else str(key)) + "}")
        return [base, base + ":window"]

    async def admit(self, call: Call, key: Hashable) -> Admission | Refused:
        """One round trip: a ticket, or the refusal with the time left; raises StoreUnavailableError."""
        reply = await self.link.run(call, ADMIT, self.keys(key), self.config, operation="admit a call")
        state, transition = self._read(key, reply)
        head = _text(reply[1])
        if _text(reply[0]) == "go":
            return head, transition
        retry_after = float(head) if head else None
        where = "" if key is None else f"[{key!r}]"
        what = "isolated" if state is CircuitState.ISOLATED else f"{state.value.replace('_', '-')} (shared)"
        return Refused(state, CircuitOpenError(f"circuit {self.name}{where} is {what}", retry_after=retry_after))

    async def record(
        self, call: Call, key: Hashable, ticket: str, outcome: str, slow: bool, retry_after: float | None
    ) -> tuple[CircuitState, Transition | None, float]:
        """Record an outcome (``ok``, ``fail`` or ``release``): the state after it, the transition it caused and the
        seconds the circuit stays open; raises StoreUnavailableError."""
        args = [*self.config, ticket, outcome, 1 if slow else 0, -1.0 if retry_after is None else retry_after]
        reply = await self.link.run(call, RECORD, self.keys(key), args, operation="record an outcome")
        state, transition = self._read(key, reply)
        return state, transition, float(_text(reply[6]))

    async def control(self, key: Hashable, action: str) -> Transition | None:
        """``isolate`` or ``reset`` the circuit for ``key`` on the store (every process sees it); a store failure
        raises StoreUnavailableError to the one who asked."""
        reply = await self.store.run(CONTROL, self.keys(key), [*self.config, action], operation=action)
        return self._read(key, reply)[1]

    def _read(self, key: Hashable, reply: list[Any]) -> tuple[CircuitState, Transition | None]:
        """The state in a reply, mirrored for ``snapshot()``, and the transition the step made, if any."""
        state = CircuitState(_text(reply[2]))
        old = _text(reply[3])
        transition: Transition | None = None
        if old:
            retry_after = _text(reply[5])
            transition = (CircuitState(old), state, _text(reply[4]), float(retry_after) if retry_after else None)
        mirror = self.mirror
        mirror.pop(key, None)
        if len(mirror) >= self.max_keys:
            del mirror[next(iter(mirror))]
        remaining = float(_text(reply[6]))
        mirror[key] = CircuitSnapshot(
            key=key,
            state=state,
            calls=int(reply[8]),
            failures=int(reply[9]),
            slow_calls=int(reply[10]),
            consecutive_failures=int(reply[11]),
            retry_after=remaining if state is CircuitState.OPEN else None,
            break_duration=float(_text(reply[7])),
            probes_in_flight=int(reply[12]),
            probes_succeeded=int(reply[13]),
        )
        return state, transition

    def describe(self) -> dict[str, Any]:
        return self.store.describe()


async def call_shared(layer: CircuitBreaker, shared: SharedCircuits, call: Call, next: Handler, started: float) -> Any:
    """A call through a breaker on a store: one round trip to admit, one to record a provider outcome (none for a
    neutral outcome of a closed circuit). While the store is unreachable: the in-process circuit (``local``) or
    :class:`CircuitOpenError` with the store's ``retry_interval`` (``reject``)."""
    options = layer.options
    key = None if options.key is None else options.key(call)
    try:
        admitted = await shared.admit(call, key)
        if isinstance(admitted, Refused):
            if not options.wait_for_half_open:
                retry_after = admitted.error.retry_after
                layer.emit(call, CircuitRejected, key=key, state=admitted.state, retry_after=retry_after)
                raise admitted.error
            poll = min(_MAX_POLL, options.break_duration / 10)
            admitted = await wait_for_half_open(
                layer,
                call,
                key,
                admitted,
                started,
                options.max_wait,
                layer.signals,
                lambda _: shared.admit(call, key),
                poll,
            )
    except StoreUnavailableError:
        if shared.link.mode == "local":
            return await layer.call_local(call, next, started)
        interval = shared.store.retry_interval
        layer.emit(call, CircuitRejected, key=key, state=CircuitState.OPEN, retry_after=interval)
        raise CircuitOpenError(f"circuit {layer.name}: its store is unreachable", retry_after=interval) from None
    ticket, transition = admitted
    record = call.record
    reached = record.attempts
    try:
        if transition is not None:
            layer.announce(call, key, transition)
        result = await next(call)
    except Exception as error:
        if record.attempts == reached or layer.counts_as_failure(error) is None:
            await _finish(layer, shared, call, key, ticket, "release", started, None)
        else:
            await _finish(layer, shared, call, key, ticket, "fail", started, classify(error).retry_after)
        raise
    except BaseException:  # a cancelled probe gives its lease back (or it expires one break later)
        await _finish(layer, shared, call, key, ticket, "release", started, None)
        raise
    outcome = "release" if record.attempts == reached else "ok"  # a cache hit says nothing about the provider
    await _finish(layer, shared, call, key, ticket, outcome, started, None)
    return result


async def _finish(
    layer: CircuitBreaker,
    shared: SharedCircuits,
    call: Call,
    key: Hashable,
    ticket: str,
    outcome: str,
    started: float,
    retry_after: float | None,
) -> None:
    """Record one outcome; a store failure here loses only that outcome (the link reports the outage)."""
    if outcome == "release" and ticket[0] == "g":
        return
    now = call.clock.now()
    slow_after = layer.options.slow_call_duration
    slow = slow_after is not None and now - started >= slow_after
    try:
        state, transition, remaining = await shared.record(call, key, ticket, outcome, slow, retry_after)
    except StoreUnavailableError:
        return
    if transition is not None:
        layer.announce(call, key, transition)
    if outcome == "fail" and state is CircuitState.OPEN:
        call.record.blocked_until = call.clock.now() + remaining


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
