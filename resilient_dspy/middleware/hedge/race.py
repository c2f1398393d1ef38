"""One hedged call's race: attempts started on time, judged as they end, every loser cancelled and awaited."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from resilient_dspy.errors import ErrorKind, classify
from resilient_dspy.middleware._shared.waiting import wait_until
from resilient_dspy.middleware.fallback import Alternative
from resilient_dspy.middleware.hedge.events import HedgeStarted

if TYPE_CHECKING:
    from resilient_dspy.core.call import Call, Handler
    from resilient_dspy.middleware.hedge.layer import Hedge

__all__ = ["Race"]


class Race:
    """One call's attempts: started on time, judged as they end, and every loser cancelled and awaited."""

    __slots__ = ("call", "hedge", "last_error", "next", "tasks", "wakeup")

    def __init__(self, hedge: Hedge, call: Call, next: Handler) -> None:
        self.hedge = hedge
        self.call = call
        self.next = next
        self.tasks: list[asyncio.Task[tuple[Any, float]]] = []
        self.last_error: Exception | None = None
        self.wakeup: asyncio.Future[None] | None = None

    async def run(self) -> Any:
        hedge, call, clock = self.hedge, self.call, self.call.clock
        max_hedges = hedge.options.max_hedges
        delay = hedge.current_delay()
        self._start(0)
        next_at: float | None = clock.now() + delay
        reason = "delay"
        judged: set[int] = set()
        timed_out = False  # the wait for next_at ended by time: a clock that rounds may read a hair before it
        try:
            while True:
                for index, task in enumerate(self.tasks):
                    if index in judged or not task.done():
                        continue
                    judged.add(index)
                    if task.cancelled():  # cancelled from inside the attempt, not by us: as a cancellation
                        raise asyncio.CancelledError
                    error = task.exception()
                    if error is None:
                        value, latency = task.result()
                        hedge.record_win(call, index, len(self.tasks) - 1, latency)
                        return value
                    if not isinstance(error, Exception):
                        raise error
                    info = classify(error)
                    if info.kind is ErrorKind.REJECTED:  # never reached the provider: drop this attempt only
                        self.last_error = self.last_error or error
                        continue
                    if not info.retryable:
                        raise error
                    self.last_error = error
                    if next_at is not None:
                        next_at, reason = clock.now(), "failure"
                now = clock.now()
                started = len(self.tasks) - 1
                if next_at is not None and (
                    started >= max_hedges or (call.deadline is not None and next_at >= call.deadline)
                ):
                    next_at = None
                if next_at is not None and (timed_out or now >= next_at):
                    self._start(started + 1)
                    hedge.emit(
                        call, HedgeStarted, hedge=started + 1, runs=self._runs(started + 1), reason=reason, delay=delay
                    )
                    next_at, reason, timed_out = now + delay, "delay", False
                    continue
                if len(judged) == len(self.tasks):
                    assert self.last_error is not None
                    raise self.last_error
                self.wakeup = asyncio.get_running_loop().create_future()  # set when any attempt ends
                timed_out = not await wait_until(clock, self.wakeup, next_at)
        finally:
            await self._cancel_rest()

    def _runs(self, index: int) -> str:
        alternatives = self.hedge.alternatives
        return alternatives[index - 1].name if index and alternatives else "primary"

    def _start(self, index: int) -> None:
        alternatives = self.hedge.alternatives
        runner = self.next if not index or not alternatives else alternatives[index - 1]
        task = asyncio.get_running_loop().create_task(self._attempt(runner, self.call.replace()))
        task.add_done_callback(self._wake)
        self.tasks.append(task)

    async def _attempt(self, runner: Handler | Alternative, call: Call) -> tuple[Any, float]:
        clock = call.clock
        began = clock.now()
        value = await (runner.run(call, self.next) if isinstance(runner, Alternative) else runner(call))
        return value, clock.now() - began

    def _wake(self, _: asyncio.Task[tuple[Any, float]]) -> None:
        wakeup = self.wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def _cancel_rest(self) -> None:
        """Cancel every attempt still running and wait until each has ended; a second cancellation of the caller
        meanwhile is passed on once they have (never an orphan task)."""
        running = [task for task in self.tasks if not task.done()]
        for task in running:
            task.cancel()
        interrupted = False
        while running:
            try:
                await asyncio.wait(running)
            except asyncio.CancelledError:
                interrupted = True
            running = [task for task in running if not task.done()]
        for task in self.tasks:
            if not task.cancelled():
                task.exception()  # retrieved: a loser's error is no "never retrieved" warning
        if interrupted:
            raise asyncio.CancelledError
