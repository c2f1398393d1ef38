"""A fast scripted program for fault-injection tests: each run does the next scripted fault, and is journaled."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable

import dspy

from resilient_dspy.core.clock import Clock, LoopClock
from resilient_dspy.faults import Fault, FaultStep, ScriptEntry, fault_error, parse_steps
from resilient_dspy.testing.harness.records import ProgramEntry, current_call

__all__ = ["ScriptedProgram"]


class ScriptedProgram:
    """A fast ``async def (question)`` program for fault-injection tests: each run does the next scripted fault.

    Runs take steps from ``script`` in start order, then ``default``. Errors are exactly what DSPy raises for each
    fault (:func:`fault_error`), a ``hang`` waits until cancelled, latency sleeps on ``clock``. ``journal`` holds
    every run with its harness call; ``max_in_flight`` the highest concurrency seen.
    """

    def __init__(
        self, script: Iterable[ScriptEntry] = (), *, default: ScriptEntry = None, clock: Clock | None = None
    ) -> None:
        self.script: deque[FaultStep] = deque(parse_steps(script, "ScriptedProgram.script"))
        self.default = parse_steps([default], "ScriptedProgram.default")[0]
        self.clock = clock or LoopClock()
        self.journal: list[ProgramEntry] = []
        self.in_flight = 0
        self.max_in_flight = 0

    def push(self, *steps: ScriptEntry) -> None:
        self.script.extend(parse_steps(steps, "ScriptedProgram.push"))

    async def __call__(self, question: str) -> dspy.Prediction:
        step = self.script.popleft() if self.script else self.default
        entry = ProgramEntry(current_call.get(), question, step.fault, self.clock.now())
        self.journal.append(entry)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if step.latency:
                await self.clock.sleep(step.latency)
            if step.fault is Fault.HANG:
                await asyncio.Event().wait()
            error = fault_error(step.fault, retry_after=step.retry_after, status=step.status)
            if error is not None:
                entry.error = error
                raise error
            return dspy.Prediction(answer=f"answer to {question}")
        except asyncio.CancelledError:
            entry.cancelled = True
            raise
        finally:
            self.in_flight -= 1
            entry.ended = self.clock.now()
