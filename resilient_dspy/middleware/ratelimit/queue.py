"""The FIFO lane of one key: a meter per limit, the queue of waiting calls, and calls to reconcile."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Hashable

from resilient_dspy.middleware._shared.partitions import Hold
from resilient_dspy.middleware.ratelimit.algorithms import _Entry, _Meter, _meter
from resilient_dspy.middleware.ratelimit.options import Limit

__all__: list[str] = []


class _Waiter:
    """A queued call: its token weight and the future its predecessor (or a refund) sets to wake it."""

    __slots__ = ("future", "tokens")

    def __init__(self, tokens: int, future: asyncio.Future[None]) -> None:
        self.tokens = tokens
        self.future = future


class _Lane:
    """The state of one key: a meter per limit, the FIFO queue, and calls awaiting reconciliation."""

    __slots__ = ("in_flight", "key", "meters", "queue", "told")

    def __init__(self, limits: tuple[Limit, ...], key: Hashable = None, until_answer: bool = False) -> None:
        self.key = key
        self.meters: tuple[_Meter, ...] = tuple(_meter(limit, until_answer) for limit in limits)
        self.queue: deque[_Waiter] = deque()
        self.in_flight = 0
        self.told = 0.0  # with a store: the last wait the server gave this key's head, for retry_after behind it

    def ready_at(self, tokens: int, now: float) -> float:
        ready = now
        for meter in self.meters:
            when = meter.ready_at(tokens if meter.tokens else 1, now)
            if when > ready:
                ready = when
        return ready

    def charge(self, tokens: int, now: float) -> None:
        for meter in self.meters:
            meter.charge(tokens if meter.tokens else 1, now)

    def charge_kept(self, tokens: int, now: float) -> list[_Entry | None]:
        """Charge every limit and keep the handles reconciliation needs."""
        return [meter.charge(tokens if meter.tokens else 1, now) for meter in self.meters]

    def release(self, handles: list[_Entry | None] | None, now: float, refund: bool = False) -> None:
        """A call admitted here has its answer: held admissions start their window now (or leave, ``refund``: the
        call never reached the provider); the head may fit again."""
        for index, meter in enumerate(self.meters):
            meter.release(handles[index] if handles else None, now, refund)
        self.nudge()

    def adjust(self, handles: list[_Entry | None], delta: int, now: float) -> None:
        for meter, handle in zip(self.meters, handles, strict=True):
            if meter.tokens:
                meter.adjust(handle, delta, now)

    def estimate(self, waiter: _Waiter, now: float) -> float:
        """When ``waiter`` might be admitted: the backlog ahead of it plus itself, at each limit's full rate."""
        count = tokens = 0
        for queued in self.queue:
            count += 1
            tokens += queued.tokens
            if queued is waiter:
                break
        ready = now
        for meter in self.meters:
            when = meter.estimate(tokens if meter.tokens else count, now)
            if when > ready:
                ready = when
        return ready

    def nudge(self) -> None:
        """Wake the head so it recomputes its admission time (it became head, or capacity came back)."""
        if self.queue:
            future = self.queue[0].future
            if not future.done():
                future.set_result(None)

    def leave(self, waiter: _Waiter) -> None:
        """Take ``waiter`` out of the queue; when it was the head, the next one becomes head and is woken."""
        queue = self.queue
        if queue[0] is waiter:
            queue.popleft()
            self.nudge()
        else:
            queue.remove(waiter)

    def hold(self, now: float) -> Hold:
        """Queued or unreconciled calls are calls; admissions still in a window protect (a fresh lane would let a
        second burst through)."""
        if self.queue or self.in_flight or any(getattr(meter, "held", 0) for meter in self.meters):
            return Hold.CALLS
        return Hold.NOTHING if all(meter.idle(now) for meter in self.meters) else Hold.PROTECTION
