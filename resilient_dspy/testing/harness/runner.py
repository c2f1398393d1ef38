"""Run many calls through a pipeline and record what the invariants need: results, timings, events, journals.

Every call runs in its own task with :data:`current_call` set, so events (delivered synchronously in the caller's
task), program journal entries and DSPy's "missing input" warnings are attributed to the call that caused them.
Every input field of the program gets a value (see :func:`input_values`). Timing uses the pipeline's clock: run it
on a ``looptime`` loop for virtual time, or on a real loop with small latencies. Only the loop-lag monitor reads the
real clock, because blocking (a ``time.sleep`` in an async program) is invisible to virtual time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from resilient_dspy.core.clock import Clock
from resilient_dspy.core.pipeline import Pipeline
from resilient_dspy.testing.harness.inputs import input_values
from resilient_dspy.testing.harness.records import CallResult, EventRecorder, Run, current_call, current_recorder

__all__ = ["run_calls"]


_MISSING_INPUTS = "Not all input fields were provided to module"


class _MissingInputs(logging.Handler):
    """Collects DSPy's "Not all input fields were provided" warnings by harness call, with the missing names."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.by_call: dict[int | None, list[str]] = defaultdict(list)

    def emit(self, record: logging.LogRecord) -> None:
        if not str(record.msg).startswith(_MISSING_INPUTS):
            return
        args = record.args if isinstance(record.args, tuple) else ()
        missing = args[1] if len(args) == 2 and isinstance(args[1], list) else ["?"]
        names = self.by_call[current_call.get()]
        names.extend(str(name) for name in missing if str(name) not in names)


class _LoopLag:
    """A timer every ``tick`` loop seconds that keeps the longest real-time gap past the tick: how long the loop
    was blocked. Virtual time does not move while a callback blocks, so the real clock is the only witness."""

    def __init__(self, clock: Clock, tick: float = 0.1) -> None:
        self.clock = clock
        self.tick = tick
        self.longest = 0.0
        self.at: float | None = None
        self._last = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._last = time.perf_counter()
        self._handle = asyncio.get_running_loop().call_later(self.tick, self._beat)

    def _beat(self) -> None:
        now = time.perf_counter()
        lag = now - self._last - self.tick
        if lag > self.longest:
            self.longest, self.at = lag, self.clock.now()
        self._last = now
        self._handle = asyncio.get_running_loop().call_later(self.tick, self._beat)

    def stop(self) -> None:
        self._beat()  # a block at the very end counts too
        if self._handle is not None:
            self._handle.cancel()


async def run_calls(
    pipeline: Pipeline,
    calls: int | Sequence[str | Mapping[str, Any]],
    *,
    arrivals: Sequence[float] | None = None,
    concurrency: int | None = None,
    cancel_after: Mapping[int, float] | None = None,
    horizon: float = 3600.0,
    field_name: str | None = None,
) -> Run:
    """Run ``calls`` (a count, the questions, or each call's inputs) through ``pipeline`` and record everything.

    A question fills every input field (:func:`input_values`; ``field_name`` puts it in that field instead of the
    first); a mapping is passed as the inputs, as is. ``arrivals`` are start offsets (seconds from the start;
    default all at once); ``concurrency`` bounds calls in flight; ``cancel_after[i]`` cancels call ``i`` that many
    seconds after it started, as a caller would. A call still running ``horizon`` seconds after the start is
    cancelled and marked ``hung`` (a lost call). DSPy's missing-input warnings land in ``missing_inputs`` of the
    call that logged them, and the longest real-time block of the loop in ``Run.longest_block``.
    """
    given = [f"q{i}" for i in range(calls)] if isinstance(calls, int) else list(calls)
    if arrivals is not None and len(arrivals) != len(given):
        raise ValueError(f"arrivals has {len(arrivals)} offsets for {len(given)} calls")
    inputs: list[dict[str, Any]] = []
    questions: list[str] = []
    for index, item in enumerate(given):
        if isinstance(item, Mapping):
            inputs.append(dict(item))
            questions.append(str(next(iter(item.values()), "")))
        else:
            inputs.append(input_values(pipeline, item, index, field=field_name))
            questions.append(item)
    loop = asyncio.get_running_loop()
    clock = pipeline.clock
    recorder = EventRecorder()
    runtime = pipeline.runtime
    listened = dataclasses.replace(runtime, listeners=(*runtime.listeners, recorder))
    gate = asyncio.Semaphore(concurrency) if concurrency else None
    missing = _MissingInputs()
    dspy_logger = logging.getLogger("dspy")
    lag = _LoopLag(clock)
    lag.start()
    before = set(asyncio.all_tasks())
    start = clock.now()
    results: dict[int, CallResult] = {}
    cancels = dict(cancel_after or {})
    requested: set[int] = set()

    async def one(index: int, question: str) -> None:
        current_call.set(index)
        current_recorder.set(recorder)
        if arrivals is not None:
            await clock.sleep(max(0.0, start + arrivals[index] - clock.now()))
        if gate is not None:
            await gate.acquire()
        try:
            call = pipeline.new_call(inputs[index])
            call.runtime = listened
            started = clock.now()
            task = asyncio.current_task()
            handle = None
            if index in cancels and task is not None:
                handle = loop.call_later(cancels[index], lambda: requested.add(index) if task.cancel() else None)
            value: Any = None
            error: BaseException | None = None
            try:
                value = await pipeline.run(call)
            except BaseException as caught:  # recorded, and a cancellation re-raised below
                error = caught
            finally:
                if handle is not None:
                    handle.cancel()
            record = call.record
            results[index] = CallResult(
                index,
                question,
                started,
                clock.now(),
                value,
                error,
                cancel_requested=index in requested,
                attempts=record.attempts,
                retries=record.retries,
                served_by=record.served_by,
                missing_inputs=tuple(missing.by_call.get(index, ())),
            )
            if isinstance(error, asyncio.CancelledError) and index not in requested:
                raise error
        finally:
            if gate is not None:
                gate.release()

    dspy_logger.addHandler(missing)
    try:
        tasks = [asyncio.create_task(one(i, q), name=f"harness-call-{i}") for i, q in enumerate(questions)]
        _, pending = await asyncio.wait(tasks, timeout=horizon) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
    finally:
        dspy_logger.removeHandler(missing)
        lag.stop()
    hung = {tasks.index(task) for task in pending}
    ended = clock.now()
    for _ in range(3):
        await asyncio.sleep(0)
    current = asyncio.current_task()
    orphans = sorted(
        repr(task) for task in asyncio.all_tasks() if task not in before and task is not current and not task.done()
    )
    calls_out: list[CallResult] = []
    for index, question in enumerate(questions):
        result = results.get(index)
        if index in hung or result is None:
            error = asyncio.CancelledError("still running at the horizon")
            base = result or CallResult(index, question, start, ended, error=error)
            late = tuple(missing.by_call.get(index, ()))
            result = dataclasses.replace(base, hung=True, ended=ended, error=error, missing_inputs=late)
        calls_out.append(result)
    return Run(calls_out, recorder.events, orphans, start, ended, horizon, longest_block=lag.longest, blocked_at=lag.at)
