"""Deadlines that share one loop timer: what a Timeout of fixed length sets on every call, at a fraction of the cost.

``asyncio.timeout`` arms a ``TimerHandle`` per call (copying the context for it), cancels it when the body ends and
leaves it in the loop's heap until it comes due: about 3.5 µs a call here. The deadlines one Timeout sets fall in the
order they are set (now + the same seconds), so a FIFO holds them and a single timer, armed for the earliest,
serves them all: a call adds an entry and marks it done. When the timer fires it cancels the task of each entry
that is due, exactly as ``asyncio.timeout`` would (``task.cancel()``; the caller answers with ``task.uncancel()``),
and re-arms itself for the next. A deadline that falls before the last one set is refused (``enter`` returns None):
its caller uses a scope of its own.

Part of the core (docs/architecture.md: the layout, a call's path, the rules).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque

__all__ = ["Deadline", "DeadlineTimer"]

_ACTIVE, _FELL, _DONE = 0, 1, 2
_COMPACT_AFTER = 256
"""Ended deadlines kept behind one still running before the FIFO is swept (each holds its task until then)."""


class Deadline:
    """One call's deadline: ``when`` on the loop clock, the task it bounds, and the task's pending cancellations at
    the start (``cancelling``), which tell whether a cancellation is this deadline's alone."""

    __slots__ = ("cancelling", "state", "task", "when")

    def __init__(self, when: float, task: asyncio.Task[object], cancelling: int) -> None:
        self.when = when
        self.task = task
        self.cancelling = cancelling
        self.state = _ACTIVE


class DeadlineTimer:
    """The deadlines of one event loop, in non-decreasing order, served by one timer armed for the earliest."""

    __slots__ = ("_armed", "_done", "_handle", "_queue", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.loop = loop
        self._queue: deque[Deadline] = deque()
        self._handle: asyncio.Handle | None = None
        self._armed = 0.0
        self._done = 0  # ended deadlines still in the FIFO, behind one that runs on

    @property
    def busy(self) -> bool:
        """True while a deadline set here has not ended."""
        return bool(self._queue)

    def enter(self, when: float) -> Deadline | None:
        """A deadline at ``when`` for the running task; None when it falls before the last one (or outside a task)."""
        queue = self._queue
        if queue and when < queue[-1].when:
            return None
        task = asyncio.current_task(self.loop)
        if task is None:
            return None
        deadline = Deadline(when, task, task.cancelling())
        queue.append(deadline)
        handle = self._handle
        if handle is None or when < self._armed:
            if handle is not None:
                handle.cancel()
            self._arm(when)
        return deadline

    def leave(self, deadline: Deadline) -> bool:
        """End ``deadline``; True when it fell (it cancelled its task, which the caller answers with ``uncancel``)."""
        fell = deadline.state == _FELL  # a deadline that fell has already left the FIFO
        deadline.state = _DONE
        queue = self._queue
        if not fell:
            self._done += 1
        while queue and queue[0].state == _DONE:
            queue.popleft()
            self._done -= 1
        if self._done > _COMPACT_AFTER and self._done * 2 > len(queue):
            # a long call at the head holds the ended ones (and their tasks) behind it: sweep them, as asyncio
            # sweeps the cancelled timers out of its heap
            self._queue = deque(entry for entry in queue if entry.state != _DONE)
            self._done = 0
        return fell

    def _arm(self, when: float) -> None:
        loop = self.loop
        assert loop is not None
        self._armed = when
        # like asyncio.Timeout: a deadline already past cancels on the next turn of the loop. The timer outlives the
        # call that armed it, so it runs in an empty context: a copy of the call's would keep the call (and its
        # pipeline) alive until the timer fires
        empty = contextvars.Context()
        if when <= loop.time():
            self._handle = loop.call_soon(self._fire, context=empty)
        else:
            self._handle = loop.call_at(when, self._fire, context=empty)

    def _fire(self) -> None:
        loop = self.loop
        assert loop is not None
        due = max(self._armed, loop.time())  # the loop runs a timer up to its clock resolution early
        self._handle = None
        queue = self._queue
        while queue:
            deadline = queue[0]
            if deadline.state == _ACTIVE:
                if deadline.when > due:
                    self._arm(deadline.when)
                    return
                deadline.state = _FELL
                deadline.task.cancel()
            else:
                self._done -= 1
            queue.popleft()
