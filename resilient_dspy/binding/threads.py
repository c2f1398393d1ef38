"""A sync ``forward()`` run in a worker thread, with a bound on the threads that run at once.

DSPy's ``asyncify`` frees its thread slot as soon as the awaiting call is cancelled (a Timeout fired), while the
thread, which cannot be interrupted, keeps running: under repeated timeouts the threads pile up without bound.
Here a slot is held by the thread itself, from its start until ``forward()`` returns, so at most
``dspy.settings.async_max_workers`` (default 8) forwards of one program run at once, timed-out ones included.
DSPy's settings and every context variable are carried into the thread (anyio copies the caller's context).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import anyio.to_thread

from resilient_dspy.binding.settings import setting

__all__ = ["ThreadRun", "ThreadSlots", "current_thread_run", "run_in_thread"]

DEFAULT_THREADS = 8  # DSPy's own default for async_max_workers


class ThreadRun:
    """One forward() handed to a worker thread; ``abandoned`` once its caller stopped waiting (a timeout, a
    cancellation). Whichever comes first, the thread starting or the caller leaving before it started, decides who
    gives the slot back."""

    __slots__ = ("_lock", "abandoned", "started")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.abandoned = False
        self.started = False

    def start(self) -> bool:
        """In the thread: False when the caller already left (then the thread must not run the program)."""
        with self._lock:
            self.started = not self.abandoned
            return self.started

    def abandon(self) -> bool:
        """In the caller: mark the run abandoned; True when the thread never started (the slot is the caller's)."""
        with self._lock:
            self.abandoned = True
            return not self.started


_RUN: ContextVar[ThreadRun | None] = ContextVar("resilient_dspy_thread_run", default=None)


def current_thread_run() -> ThreadRun | None:
    """The :class:`ThreadRun` of the worker thread running now, or None outside one (what a stream reads to drop
    the chunks of an abandoned thread)."""
    return _RUN.get()


def _limit() -> int:
    limit = setting("async_max_workers")
    return limit if isinstance(limit, int) and limit >= 1 else DEFAULT_THREADS


class ThreadSlots:
    """At most ``limit()`` threads at once, each holding its slot until it returns; waiters are woken in FIFO order.

    Safe across threads and event loops: a slot is released by the worker thread, which wakes a waiter on the
    waiter's own loop.
    """

    def __init__(self, limit: Callable[[], int] = _limit) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._running = 0
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = deque()

    async def acquire(self) -> None:
        """Wait for a slot (cancellable: a waiter cancelled after it was woken passes the wake-up on)."""
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if self._running < self._limit():
                    self._running += 1
                    return
                waiter: asyncio.Future[None] = loop.create_future()
                self._waiters.append((loop, waiter))
            try:
                await waiter
            except asyncio.CancelledError:
                with self._lock:
                    if (loop, waiter) in self._waiters:
                        self._waiters.remove((loop, waiter))
                        raise
                self._wake_next()  # it was woken, then cancelled: the wake-up belongs to the next waiter
                raise

    def release(self) -> None:
        """Give a slot back (from any thread) and wake the first waiter."""
        with self._lock:
            self._running -= 1
        self._wake_next()

    def _wake_next(self) -> None:
        while True:
            with self._lock:
                if not self._waiters:
                    return
                loop, waiter = self._waiters.popleft()
            try:
                loop.call_soon_threadsafe(_wake, waiter)
                return
            except RuntimeError:  # its loop is closed: that waiter is gone, wake the next one
                continue


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def run_in_thread(function: Callable[..., Any], inputs: dict[str, Any], slots: ThreadSlots) -> Any:
    """``function(**inputs)`` in a worker thread once ``slots`` has room; the slot is the thread's until it returns.

    Cancelling the caller (a Timeout) stops the wait at once; the thread is abandoned and finishes on its own.
    """
    await slots.acquire()
    run = ThreadRun()

    def in_thread() -> Any:
        if not run.start():
            return None  # the caller left before the thread began: nothing runs, the caller gave the slot back
        _RUN.set(run)  # in the thread's own copy of the caller's context
        try:
            return function(**inputs)
        finally:
            slots.release()

    try:
        return await anyio.to_thread.run_sync(in_thread, abandon_on_cancel=True)
    except BaseException:
        if run.abandon():
            slots.release()
        raise
