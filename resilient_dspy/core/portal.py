"""The sync entry point: one background event loop per pipeline, on which every call from sync code runs.

``pipeline.sync(...)`` (and a :class:`~resilient_dspy.core.dspy_module.ResilientModule` called from sync code) hands
the call to a :class:`BackgroundLoop`: anyio's ``BlockingPortal`` running in one daemon thread. All sync callers,
from any number of threads (``dspy.Evaluate(num_threads=8)``, ``dspy.Parallel``), share that one loop, so the layers'
state (a limiter's queue, a breaker's probes, a bulkhead's waiters) lives on one loop. The caller's context (DSPy's
settings, usage tracking, every context variable) is carried into the call.

Lifecycle: the loop starts at the first sync call; :meth:`BackgroundLoop.close` (or leaving ``with pipeline.portal``)
stops it and joins its thread; a loop still running is closed when its owner is garbage-collected or at interpreter
exit. A closed loop takes no more calls.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import anyio
from anyio.from_thread import BlockingPortal

__all__ = ["BackgroundLoop"]

T = TypeVar("T")


class _Running:
    """A started portal and the thread whose event loop runs it."""

    __slots__ = ("portal", "thread")

    def __init__(self, portal: BlockingPortal, thread: threading.Thread) -> None:
        self.portal = portal
        self.thread = thread


def _serve(ready: concurrent.futures.Future[BlockingPortal]) -> None:
    """The loop thread: run a portal until it is stopped (what ``anyio.from_thread.start_blocking_portal`` does)."""

    async def main() -> None:
        async with BlockingPortal() as portal:
            ready.set_result(portal)
            await portal.sleep_until_stopped()

    try:
        anyio.run(main)
    except BaseException as error:  # the loop could not start: the caller waiting in _start gets the error
        if not ready.done():
            ready.set_exception(error)
        raise


class BackgroundLoop:
    """An event loop in a daemon thread that runs coroutines for sync callers (see the module docstring)."""

    def __init__(self, name: str = "resilient-dspy") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._running: _Running | None = None
        self._closed = False
        self._finalizer: weakref.finalize[Any, Any] | None = None

    @property
    def running(self) -> bool:
        """True between the first call and :meth:`close`."""
        return self._running is not None

    @property
    def thread(self) -> threading.Thread | None:
        """The loop's thread while it runs, else None."""
        running = self._running
        return None if running is None else running.thread

    def call(self, function: Callable[..., Coroutine[Any, Any, T]], /, *args: Any, **kwargs: Any) -> T:
        """Run ``await function(*args, **kwargs)`` on the loop and return its result (or raise its error).

        Called from the loop's own thread, it raises ``RuntimeError``: a coroutine there must ``await`` instead.
        An interrupt of the waiting caller (Ctrl-C) cancels the call on the loop.
        """
        running = self._start()
        if threading.current_thread() is running.thread:
            raise RuntimeError(
                f"{self.name}: a sync call from the pipeline's own event loop would wait for itself; "
                "await the pipeline (or module.acall) there instead"
            )
        future: concurrent.futures.Future[T] = running.portal.start_task_soon(_call_with_kwargs, function, args, kwargs)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def _start(self) -> _Running:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name}: the background loop is closed; build a new pipeline")
            running = self._running
            if running is None:
                ready: concurrent.futures.Future[BlockingPortal] = concurrent.futures.Future()
                thread = threading.Thread(target=_serve, args=(ready,), name=f"{self.name} loop", daemon=True)
                thread.start()
                running = self._running = _Running(ready.result(), thread)
                self._finalizer = weakref.finalize(self, _stop, running)
            return running

    def close(self) -> None:
        """Stop the loop (calls still running on it are cancelled) and join its thread; later calls are refused."""
        with self._lock:
            self._closed = True
            self._running = None
            finalizer, self._finalizer = self._finalizer, None
        if finalizer is not None:
            finalizer()

    def __enter__(self) -> BackgroundLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._running is not None else "idle"
        return f"BackgroundLoop({self.name!r}, {state})"


async def _call_with_kwargs(function: Callable[..., Coroutine[Any, Any, T]], args: Any, kwargs: Any) -> T:
    return await function(*args, **kwargs)


def _stop(running: _Running) -> None:
    """Cancel what still runs, stop the portal and join its thread; on the loop's own thread (the owner collected
    there), only ask the portal to stop: its thread then ends by itself."""
    portal = running.portal
    if threading.current_thread() is running.thread:
        asyncio.get_running_loop().create_task(portal.stop(cancel_remaining=True))
        return
    with contextlib.suppress(RuntimeError):  # already stopped
        portal.call(portal.stop, True)
    running.thread.join()
