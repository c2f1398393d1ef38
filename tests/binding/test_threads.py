"""Forward-only modules in worker threads: the thread bound holds under timeouts, the caller's context is carried,
and a timed-out caller gets its error before the thread ends (an order, not a duration, is asserted)."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable

import dspy
import pytest

from resilient_dspy import Pipeline, Timeout
from resilient_dspy.errors import TimeoutExceededError
from resilient_dspy.testing import FaultInjectingLM
from tests.conftest import other_tasks

pytestmark = pytest.mark.looptime(False)  # real threads: virtual time cannot cut one

REQUEST = contextvars.ContextVar("request", default="none")


class Blocked(dspy.Module):  # type: ignore[misc]
    """A forward() that blocks until released, counting the threads inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0
        self.finished = 0

    def forward(self, question: str) -> dspy.Prediction:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            self.release.wait(10)
            return dspy.Prediction(answer=question)
        finally:
            with self.lock:
                self.running -= 1
                self.finished += 1


async def _until(condition: Callable[[], bool], polls: int = 2000) -> None:
    """Wait until ``condition()`` holds (checked every 5 ms, at most ``polls`` times): threads set no asyncio event."""
    for _ in range(polls):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the condition never held")


async def test_timed_out_forward_calls_keep_their_thread_slot_until_the_thread_returns() -> None:
    """Regression: dspy.asyncify frees a thread's slot when its caller times out while the thread runs on, so calls
    cut by a Timeout piled up threads without bound (6 at once with a bound of 2). Now a slot is held until forward()
    returns: never more than async_max_workers threads run, timed-out ones included."""
    module = Blocked()
    pipeline = Pipeline(module, Timeout(0.05))
    with dspy.context(async_max_workers=2):
        for index in range(6):
            with pytest.raises(TimeoutExceededError):
                await pipeline(f"q{index}")
    assert module.peak <= 2
    module.release.set()
    await _until(lambda: module.running == 0)
    assert module.peak == 2  # the bound was reached: the test measured something


async def test_a_freed_thread_slot_goes_to_the_next_waiting_call() -> None:
    """When a thread returns, a call waiting for a slot runs: every call answers, two threads at most."""
    module = Blocked()
    pipeline = Pipeline(module)
    with dspy.context(async_max_workers=2):
        calls = [asyncio.ensure_future(pipeline(f"q{index}")) for index in range(5)]
        await _until(lambda: module.running == 2)
        module.release.set()
        answers = await asyncio.gather(*calls)
    assert [answer.answer for answer in answers] == [f"q{index}" for index in range(5)]
    assert module.peak == 2


async def test_a_forward_only_module_sees_the_callers_context_variables_and_dspy_settings() -> None:
    """Every context variable of the caller (DSPy's settings among them) is visible inside forward()."""
    seen: list[tuple[str, object]] = []

    class Reader(dspy.Module):  # type: ignore[misc]
        def forward(self, question: str) -> dspy.Prediction:
            seen.append((REQUEST.get(), dspy.settings.lm))
            return dspy.Prediction(answer=question)

    lm = FaultInjectingLM()
    REQUEST.set("request-7")
    with dspy.context(lm=lm):
        await Pipeline(Reader())("q")
    assert seen == [("request-7", lm)]


async def test_the_caller_gets_its_timeout_before_the_thread_has_finished() -> None:
    """A Timeout cannot stop a thread: the caller gets TimeoutExceededError at the deadline while forward() is still
    running (the thread is released only afterwards), and no task is left behind."""
    module = Blocked()
    with pytest.raises(TimeoutExceededError):
        await Pipeline(module, Timeout(0.05))("slow")
    assert (module.running, module.finished) == (1, 0)  # still inside forward() when the caller got its error
    assert not other_tasks()
    module.release.set()
    await _until(lambda: module.finished == 1)


async def test_a_call_cancelled_while_waiting_for_a_thread_slot_never_runs_and_leaks_no_slot() -> None:
    """A call cancelled while it waits for a slot never starts its forward(); the slot serves the next call."""
    module = Blocked()
    pipeline = Pipeline(module)
    with dspy.context(async_max_workers=1):
        first = asyncio.ensure_future(pipeline("holds the slot"))
        await _until(lambda: module.running == 1)
        waiting = asyncio.ensure_future(pipeline("waits, then is cancelled"))
        await asyncio.sleep(0.02)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        module.release.set()
        assert (await first).answer == "holds the slot"
        assert (await pipeline("runs")).answer == "runs"
    assert module.finished == 2
