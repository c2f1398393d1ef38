"""Batches: many inputs through one pipeline, a bounded window of calls at a time, one :class:`Outcome` per input.

:func:`map` returns the outcomes in input order; :func:`imap` yields ``(index, outcome)`` as calls finish. Inputs are
questions (the program's first input), dicts of inputs or ``dspy.Example``s, from any iterable or async iterable:
at most ``concurrency`` calls are in flight, each in its own task, and the next input is read only when one ends,
so memory stays flat however many there are (with :func:`imap`; :func:`map`'s list holds every outcome). A failed
call is an outcome carrying its typed error (``return_exceptions=True``), or ends the batch with it. Cancelling the
caller cancels the calls in flight and waits for them: no task outlives the batch.

Part of the core (docs/architecture.md); the guide is docs/guides/batches.md.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterable, Iterable, Mapping, Sized
from typing import TYPE_CHECKING, Any, Protocol

import dspy

from resilient_dspy.core.call import Call, CallRecord
from resilient_dspy.core.outcome import Outcome
from resilient_dspy.errors import ConfigurationError

if TYPE_CHECKING:
    from resilient_dspy.core.pipeline import Pipeline

__all__ = ["DEFAULT_CONCURRENCY", "BatchObserver", "Inputs", "Progress", "call_inputs", "imap", "map"]

DEFAULT_CONCURRENCY = 16
"""Calls in flight when the caller does not say (DSPy's own engine caps an LM at 100 per event loop)."""

Inputs = Iterable[Any] | AsyncIterable[Any]


class BatchObserver(Protocol):
    """Watches a batch (a progress bar, a report): told the total when known, then every outcome, then the end."""

    def start(self, total: int | None) -> None: ...

    def add(self, index: int, outcome: Outcome) -> None: ...

    def stop(self) -> None: ...


Progress = bool | BatchObserver
"""``True``: a live bar on stderr when it is a terminal (:class:`resilient_dspy.observe.progress.ProgressBar`);
``False``: none; or any :class:`BatchObserver`."""

_END: Any = object()


def call_inputs(pipeline: Pipeline, item: Any) -> dict[str, Any]:
    """The keyword inputs for one batch item, checked as a call checks them (raises InvalidInputError or TypeError).

    A ``dspy.Example`` gives its ``with_inputs`` fields, or without them the program's inputs it has (so labels
    such as ``answer`` stay out); a mapping gives its items; anything else is the program's first input.
    """
    if isinstance(item, dspy.Example):
        try:
            given = item.inputs().toDict()
        except ValueError:  # no with_inputs(...): the program's inputs it holds
            given = {name: item[name] for name in pipeline.input_fields if name in item}
        return pipeline._inputs((), given)
    if isinstance(item, Mapping):
        return pipeline._inputs((), dict(item))
    return pipeline._inputs((item,), {})


class _Window:
    """The calls in flight, each its own task; a finished call queues its outcome for the reader and wakes it."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.runtime = pipeline.runtime
        self.loop = asyncio.get_running_loop()
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.finished: deque[tuple[int, Outcome]] = deque()
        self.stop: BaseException | None = None
        self._wakeup: asyncio.Future[None] | None = None

    def start(self, index: int, item: Any) -> None:
        self.tasks[index] = self.loop.create_task(self._run(index, item))

    async def _run(self, index: int, item: Any) -> None:
        runtime = self.runtime
        clock = runtime.clock
        record = CallRecord(clock.now())
        error: Exception | None = None
        value: Any = None
        try:
            value = await self.pipeline.run(Call(call_inputs(self.pipeline, item), runtime, record))
        except Exception as caught:
            error = caught
        except BaseException as stop:  # cancelled, or asked to stop: the batch ends with it
            del self.tasks[index]
            if self.stop is None:
                self.stop = stop
            self._wake()
            raise
        outcome = Outcome(
            value,
            record.served_by,
            record.attempts,
            record.retries,
            clock.now() - record.started_at,
            error=error,
            hedges=record.hedges,
            served_hedge=record.served_hedge,
        )
        del self.tasks[index]
        self.finished.append((index, outcome))
        self._wake()

    def _wake(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def wait(self) -> None:
        """Until a call finishes (or one ended the batch: then raise what ended it)."""
        if not self.finished and self.stop is None:
            self._wakeup = self.loop.create_future()
            try:
                await self._wakeup
            finally:
                self._wakeup = None
        if self.stop is not None and not self.finished:
            raise self.stop

    async def close(self) -> None:
        """Cancel the calls still in flight and wait until every one has ended, even if the caller is cancelled
        meanwhile (then raise that cancellation after)."""
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        interrupted: BaseException | None = None
        while tasks:
            try:
                await asyncio.wait(tasks)
            except asyncio.CancelledError as cancelled:
                interrupted = cancelled
            tasks = [task for task in tasks if not task.done()]
        if interrupted is not None:
            raise interrupted


def _observer(pipeline: Pipeline, progress: Progress) -> BatchObserver | None:
    if progress is True:
        from resilient_dspy.observe.progress import ProgressBar  # rich, loaded only for a bar

        return ProgressBar(description=pipeline.name)
    if progress is False:
        return None
    return progress


def _check(inputs: Inputs, concurrency: int, total: int | None) -> None:
    problems = []
    if isinstance(inputs, str | bytes | Mapping | dspy.Example):  # iterable, but one item: each char would be a call
        problems.append(
            ("inputs", f"must be an iterable of items, e.g. a list of them (got one {type(inputs).__name__})")
        )
    elif not isinstance(inputs, Iterable | AsyncIterable):
        problems.append(("inputs", f"must be an iterable or async iterable of items (got {type(inputs).__name__})"))
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        problems.append(("concurrency", f"must be a whole number >= 1 (got {concurrency!r})"))
    if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 0):
        problems.append(("total", f"must be a whole number >= 0 or None (got {total!r})"))
    if problems:
        raise ConfigurationError(problems)


async def imap(
    pipeline: Pipeline,
    inputs: Inputs,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    progress: Progress = False,
    return_exceptions: bool = True,
    total: int | None = None,
) -> AsyncGenerator[tuple[int, Outcome], None]:
    """Yield ``(index, outcome)`` for every input as its call finishes, ``concurrency`` calls at a time.

    ``index`` counts the inputs from 0. With ``return_exceptions=False`` the first failure is raised instead (the
    other calls are cancelled). ``total`` tells a progress bar how many to expect when ``inputs`` has no ``len``.
    Leaving the loop early cancels the calls in flight when the iterator is closed: use
    ``contextlib.aclosing(...)`` to close it at once.
    """
    _check(inputs, concurrency, total)
    observer = _observer(pipeline, progress)
    window = _Window(pipeline)
    sync_items = None if isinstance(inputs, AsyncIterable) else iter(inputs)
    async_items = aiter(inputs) if isinstance(inputs, AsyncIterable) else None
    if observer is not None:
        observer.start(len(inputs) if isinstance(inputs, Sized) else total)
    try:
        index = 0
        more = True
        tasks, finished = window.tasks, window.finished
        while True:
            while more and len(tasks) + len(finished) < concurrency:  # unread outcomes hold their slot
                item = next(sync_items, _END) if sync_items is not None else await anext(async_items, _END)  # type: ignore[arg-type]
                if item is _END:
                    more = False
                else:
                    window.start(index, item)
                    index += 1
            if not finished:
                if not tasks and window.stop is None:
                    return
                await window.wait()
            done = finished.popleft()
            if observer is not None:
                observer.add(*done)
            if not return_exceptions and done[1].error is not None:
                raise done[1].error
            yield done
    finally:
        try:
            await window.close()
        finally:
            if observer is not None:
                observer.stop()


async def map(
    pipeline: Pipeline,
    inputs: Inputs,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    progress: Progress = False,
    return_exceptions: bool = True,
    total: int | None = None,
) -> list[Outcome]:
    """Every input's :class:`Outcome`, in input order (see :func:`imap` for the arguments)."""
    found: list[Outcome | None] = [None] * len(inputs) if isinstance(inputs, Sized) else []
    stream = imap(
        pipeline,
        inputs,
        concurrency=concurrency,
        progress=progress,
        return_exceptions=return_exceptions,
        total=total,
    )
    async with contextlib.aclosing(stream):
        async for index, outcome in stream:
            if index >= len(found):
                found.extend([None] * (index + 1 - len(found)))
            found[index] = outcome
    return found  # type: ignore[return-value]  # every slot is filled: one outcome per input
