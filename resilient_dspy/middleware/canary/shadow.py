"""Shadow copies: a candidate runs a copy of the call in a task the Canary owns, bounded in number and in time, never
answering the caller; its outcome is compared with stable's when both are known."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dspy

from resilient_dspy.core.call import Call, CallRecord, Handler
from resilient_dspy.errors import TimeoutExceededError
from resilient_dspy.middleware.fallback import is_user_mistake

if TYPE_CHECKING:
    from resilient_dspy.middleware.canary.routes import Route

__all__: list[str] = []

logger = logging.getLogger("resilient_dspy.canary")

SHADOW_PROPERTY = "canary_shadow"
"""Set (to the candidate's name) in a shadow copy's ``call.properties``, for layers below that want to tell."""


@dataclass(frozen=True, slots=True)
class StableResult:
    """What stable did for the caller: its answer or error, and how long it took."""

    value: Any
    error: BaseException | None
    latency: float


@dataclass(frozen=True, slots=True)
class ShadowResult:
    """What a shadow copy did: its answer or error, its latency, whether it reached the program, and stable's result
    (None when stable had not finished within the shadow's time bound)."""

    value: Any
    error: BaseException | None
    latency: float
    reached: bool
    stable: StableResult | None


class Shadows:
    """The shadow tasks of one Canary: at most ``limit`` in flight, each ended by ``timeout`` seconds at the latest."""

    def __init__(self, limit: int, timeout: float) -> None:
        self.limit = limit
        self.timeout = timeout
        self.tasks: set[asyncio.Task[None]] = set()
        self._mistakes_logged: set[type[BaseException]] = set()

    def full(self) -> bool:
        return len(self.tasks) >= self.limit

    def start(
        self,
        call: Call,
        route: Route,
        next: Handler,
        stable: asyncio.Future[StableResult],
        done: Callable[[Call, Route, ShadowResult], None],
    ) -> asyncio.Task[None]:
        """Run ``route`` on a copy of ``call`` in a task of our own; ``done`` gets the copy and its result (not on
        cancellation)."""
        task = asyncio.create_task(self._run(call, route, next, stable, done), name=f"canary shadow {route.name}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _run(
        self,
        call: Call,
        route: Route,
        next: Handler,
        stable: asyncio.Future[StableResult],
        done: Callable[[Call, Route, ShadowResult], None],
    ) -> None:
        clock = call.clock
        started = clock.now()
        bound = started + self.timeout
        deadline = bound if call.deadline is None else min(bound, call.deadline)
        properties = {**call.properties, SHADOW_PROPERTY: route.name}
        runtime = call.runtime
        trace = call.record.trace
        if trace is not None:  # the caller's trace ends with its call: the copy's events stay out of it
            runtime = dataclasses.replace(
                runtime, listeners=tuple(each for each in runtime.listeners if each != trace.add_event)
            )
        copy = call.replace(
            inputs=dict(call.inputs),
            runtime=runtime,
            record=CallRecord(started),
            deadline=deadline,
            properties=properties,
        )
        value: Any = None
        error: BaseException | None = None
        scope = clock.deadline(deadline)
        try:
            async with scope:
                with dspy.context(send_stream=None):  # a shadow's chunks never reach the caller's stream
                    value = await route.alternative.run(copy, next)
        except Exception as failure:
            error = failure
            if isinstance(failure, TimeoutError) and scope.expired():
                error = TimeoutExceededError(deadline - started, scope="shadow")
        latency = clock.now() - started
        if error is not None and is_user_mistake(error) and type(error) not in self._mistakes_logged:
            self._mistakes_logged.add(type(error))
            logger.error(
                "%s: shadow %r failed with a configuration or programming error (the caller got stable's answer; "
                "logged once per error type): %s",
                call.runtime.name,
                route.name,
                error,
                exc_info=error,
            )
        finished: StableResult | None = None
        waiting = clock.deadline(bound)
        try:
            async with waiting:
                finished = await asyncio.shield(stable)  # shielded: our bound must not cancel the caller's future
        except TimeoutError:
            if not waiting.expired():
                raise
        reached = copy.record.attempts > 0 or (error is not None and is_user_mistake(error))
        done(copy, route, ShadowResult(value, error, latency, reached, finished))

    async def drain(self) -> None:
        """Wait until every shadow in flight has finished (each within its time bound)."""
        while self.tasks:
            await asyncio.wait(set(self.tasks))

    async def aclose(self) -> None:
        """Cancel every shadow in flight and wait until they are gone."""
        tasks = set(self.tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
