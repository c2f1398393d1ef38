"""The meters a limit counts with: exact sliding logs (requests, tokens) and a token bucket (GCRA)."""

from __future__ import annotations

import math
from collections import deque

from resilient_dspy.middleware.ratelimit.options import Limit

__all__: list[str] = []


_SLACK = 1e-9
"""Admission times within 1 ns count as reached: asyncio fires a timer up to its clock resolution early, and
float sums like ``t + per`` carry rounding dust; without this slack a head could wake, find itself a few ulps
early, and re-arm a timer that fires again at once without time moving."""


class _Entry:
    """One admission in a sliding log: when it leaves the window, and its weight (adjusted by reconciliation)."""

    __slots__ = ("expiry", "weight")

    def __init__(self, expiry: float, weight: int) -> None:
        self.expiry = expiry
        self.weight = weight


class _RequestWindow:
    """Exact requests limit: the sliding log holds only expiry times, as every admission weighs 1.

    Admit when fewer than ``amount`` admissions are held or have ``expiry > now``; otherwise the wait ends when the
    ``len - amount + 1``-th oldest expires. Pruning and waking agree on the same float, as in :class:`_Window`.
    With ``until_answer`` an admission is *held* (counted, with no expiry yet) while its call runs and enters the
    log at :meth:`release`, ``per`` after the answer: releases come in time order, so the log stays sorted.
    """

    __slots__ = ("amount", "held", "limit", "log", "per", "tokens", "until_answer")

    def __init__(self, limit: Limit, until_answer: bool = False) -> None:
        self.limit = limit
        self.amount = limit.amount
        self.per = limit.per
        self.tokens = False
        self.until_answer = until_answer
        self.held = 0
        self.log: deque[float] = deque()

    def prune(self, now: float) -> None:
        log = self.log
        horizon = now + _SLACK
        while log and log[0] <= horizon:
            log.popleft()

    def ready_at(self, weight: int, now: float) -> float:
        self.prune(now)
        log = self.log
        excess = len(log) + self.held + weight - self.amount
        if excess <= 0:
            return now
        return log[excess - 1] if excess <= len(log) else math.inf

    def estimate(self, weight: int, now: float) -> float:
        ready = self.ready_at(min(weight, self.amount), now)
        if ready == math.inf:  # held by calls still running: they leave the window ``per`` after their answers
            ready = now + self.per
        return ready if weight <= self.amount else ready + self.per * ((weight - 1) // self.amount)

    def charge(self, weight: int, now: float) -> None:
        if self.until_answer:
            self.held += 1
        else:
            self.log.append(now + self.per)

    def try_admit(self, now: float) -> bool:
        """``ready_at(1, now) <= now`` then ``charge``, in one pass: the uncontended requests-only fast path."""
        log = self.log
        horizon = now + _SLACK
        while log and log[0] <= horizon:
            log.popleft()
        if len(log) + self.held < self.amount:
            if self.until_answer:
                self.held += 1
            else:
                log.append(now + self.per)
            return True
        return False

    def release(self, entry: _Entry | None, now: float, refund: bool = False) -> None:
        """The call has its answer: a held admission stays in the window for ``per`` from now (``refund``: the call
        never reached the provider — a cache hit, an inner rejection — so it leaves at once)."""
        if self.until_answer:
            self.held -= 1
            if not refund:
                self.log.append(now + self.per)

    def adjust(self, entry: _Entry | None, delta: int, now: float) -> None:
        """Requests are never reconciled."""

    def usage(self, now: float) -> tuple[float, float]:
        self.prune(now)
        used = len(self.log) + self.held
        return float(used), float(max(0, self.amount - used))

    def idle(self, now: float) -> bool:
        self.prune(now)
        return not self.log and not self.held


class _Window:
    """Exact limit: a sliding log of admissions; admit when ``used in (now - per, now] + weight <= amount``.

    Entries store their expiry (``admitted + per``) and are pruned once ``expiry <= now`` (within ``_SLACK``), the
    same float the head sleeps until, so waking at the computed time always finds the room it was promised.
    """

    __slots__ = ("amount", "held", "limit", "log", "per", "tokens", "until_answer", "used")

    def __init__(self, limit: Limit, until_answer: bool = False) -> None:
        self.limit = limit
        self.amount = limit.amount
        self.per = limit.per
        self.tokens = limit.unit == "tokens"
        self.until_answer = until_answer
        self.held = 0
        self.log: deque[_Entry] = deque()
        self.used = 0

    def prune(self, now: float) -> None:
        log = self.log
        horizon = now + _SLACK
        while log and log[0].expiry <= horizon:
            self.used -= log.popleft().weight

    def ready_at(self, weight: int, now: float) -> float:
        """The earliest time at or after ``now`` when ``weight`` fits, if nothing else is charged meanwhile."""
        self.prune(now)
        excess = self.used + weight - self.amount
        if excess <= 0:
            return now
        for entry in self.log:
            excess -= entry.weight
            if excess <= 0:
                return entry.expiry
        return math.inf

    def estimate(self, weight: int, now: float) -> float:
        """Like :meth:`ready_at`, for a weight that may exceed the limit (a backlog): whole windows after it clears."""
        ready = self.ready_at(min(weight, self.amount), now)
        if ready == math.inf:  # held by calls still running: they leave the window ``per`` after their answers
            ready = now + self.per
        return ready if weight <= self.amount else ready + self.per * ((weight - 1) // self.amount)

    def charge(self, weight: int, now: float) -> _Entry:
        self.used += weight
        if self.until_answer:  # held: counted in ``used``, in the log only once released
            self.held += 1
            return _Entry(math.inf, weight)
        entry = _Entry(now + self.per, weight)
        self.log.append(entry)
        return entry

    def release(self, entry: _Entry | None, now: float, refund: bool = False) -> None:
        """The call has its answer: a held admission enters the log, ``per`` from now (``refund``: it leaves)."""
        if self.until_answer and entry is not None and entry.expiry == math.inf:
            self.held -= 1
            if refund:
                self.used -= entry.weight
                entry.expiry = now
            else:
                entry.expiry = now + self.per
                self.log.append(entry)

    def adjust(self, entry: _Entry | None, delta: int, now: float) -> None:
        """Change an admission's weight, if it is still held or in the window (a refund or an excess)."""
        self.prune(now)
        if entry is not None and entry.expiry > now + _SLACK:
            entry.weight += delta
            self.used += delta

    def usage(self, now: float) -> tuple[float, float]:
        self.prune(now)
        return float(self.used), float(max(0, self.amount - self.used))

    def idle(self, now: float) -> bool:
        self.prune(now)
        return not self.log and not self.held


class _Bucket:
    """Burst limit: a token bucket of capacity ``burst`` refilled at ``amount / per``, as a GCRA.

    ``tat`` is the theoretical arrival time: the bucket is full when ``tat <= now`` and holds
    ``(tat - now) / interval`` units of debt otherwise. Any interval of length L admits at most
    ``burst + amount * L / per``.
    """

    __slots__ = ("burst", "interval", "limit", "tat", "tokens")

    def __init__(self, limit: Limit) -> None:
        assert limit.burst is not None
        self.limit = limit
        self.burst = limit.burst
        self.interval = limit.per / limit.amount
        self.tokens = limit.unit == "tokens"
        self.tat = -math.inf

    def ready_at(self, weight: int, now: float) -> float:
        when = self.tat - (self.burst - weight) * self.interval
        return when if when > now + _SLACK else now

    def estimate(self, weight: int, now: float) -> float:
        when = max(self.tat, now) + (weight - self.burst) * self.interval
        return when if when > now + _SLACK else now

    def charge(self, weight: int, now: float) -> None:
        self.tat = (self.tat if self.tat > now else now) + weight * self.interval

    def release(self, entry: _Entry | None, now: float, refund: bool = False) -> None:
        """A bucket counts from admission: refill does not wait for answers."""

    def adjust(self, entry: _Entry | None, delta: int, now: float) -> None:
        self.tat += delta * self.interval

    def usage(self, now: float) -> tuple[float, float]:
        used = max(0.0, self.tat - now) / self.interval
        return used, max(0.0, self.burst - used)

    def idle(self, now: float) -> bool:
        return self.tat <= now


_Meter = _RequestWindow | _Window | _Bucket


def _meter(limit: Limit, until_answer: bool = False) -> _Meter:
    """The meter of ``limit``; ``until_answer`` holds each window admission until its call has its answer."""
    if limit.burst is not None:
        return _Bucket(limit)
    return _Window(limit, until_answer) if limit.unit == "tokens" else _RequestWindow(limit, until_answer)
