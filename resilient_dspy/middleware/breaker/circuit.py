"""The state machine of one circuit (closed, open, half-open, isolated), synchronous and lock-free."""

from __future__ import annotations

from collections.abc import Hashable

from resilient_dspy.errors import CircuitOpenError
from resilient_dspy.middleware._shared.partitions import Hold
from resilient_dspy.middleware.breaker.events import CircuitSnapshot, CircuitState
from resilient_dspy.middleware.breaker.options import CircuitBreakerOptions
from resilient_dspy.middleware.breaker.windows import _FAILED, _SLOW, _CountWindow, _Probe, _TimeWindow

__all__ = [
    "RETRY_AFTER_CEILING",
    "Transition",
]


RETRY_AFTER_CEILING = 3600.0
"""Longest break a trip's Retry-After can ask for without ``max_break_duration`` (then that is the ceiling)."""


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
