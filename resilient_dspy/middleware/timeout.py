"""Timeout: a deadline for the call (placed outermost) or for each attempt (placed inside Retry or Hedge).

The deadline is written into the call context, so inner layers (Retry) see how much time is left; the
effective deadline is the earlier of ours and any deadline from outside. When it passes, the body is
cancelled (asyncio's own timeout) and :class:`TimeoutExceededError` is raised, also when the body answers the
cancellation with an error of its own (a TaskGroup's ExceptionGroup); a cancellation that comes from the caller stays
a cancellation. Nothing keeps running afterwards: the body runs in the caller's task. A streamed call can also be
bounded by its wait for the first chunk (``first_chunk``) and each pause between chunks (``idle``); see
:mod:`resilient_dspy.core.stream`.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import Field

from resilient_dspy.core.call import Call, Handler
from resilient_dspy.core.clock import LoopClock
from resilient_dspy.core.deadlines import DeadlineTimer
from resilient_dspy.core.layer import Layer, roles
from resilient_dspy.core.options import Options, options_from
from resilient_dspy.core.pipeline import Pipeline
from resilient_dspy.core.stream import ChunkLimits
from resilient_dspy.errors import ConfigurationError, TimeoutExceededError
from resilient_dspy.events import Event

__all__ = ["Timeout", "TimeoutFired", "TimeoutOptions"]


class TimeoutOptions(Options):
    seconds: float = Field(gt=0, allow_inf_nan=False, description="How long the wrapped layers may run.")
    first_chunk: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="Longest wait for a stream's first chunk."
    )
    idle: float | None = Field(default=None, gt=0, allow_inf_nan=False, description="A stream's pause between chunks.")
    name: str | None = Field(default=None, description="Label in events and describe(); default by placement.")


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeoutFired(Event):
    """The deadline passed and the body was cancelled."""

    timeout: float
    scope: str


def _cancel_pending() -> bool:
    """Whether the running task has a cancellation request not yet handled (by its canceller's ``uncancel``)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


_ATTEMPT_MAKERS = frozenset({"retry", "hedge"})
"""The roles of layers that run what is below them as attempts of one call."""


class Timeout(Layer):
    """Bound the time of everything below this layer to ``seconds``."""

    placement: ClassVar[str] = "timeout"
    options_type: ClassVar[type[Options]] = TimeoutOptions
    options: TimeoutOptions

    def __init__(
        self, seconds: float, *, first_chunk: float | None = None, idle: float | None = None, name: str | None = None
    ) -> None:
        self.options = options_from(TimeoutOptions, "Timeout", locals())
        self.scope = "total"
        self._placed = False
        self._timer = DeadlineTimer(None)  # the deadlines of the loop calls run on (core/deadlines.py)

    def default_name(self) -> str:
        return f"Timeout({self.scope})"

    def on_build(self, pipeline: Pipeline) -> None:
        """Name the scope by placement: a Timeout below a Retry or a Hedge bounds one attempt (and its expiry is
        retryable: the Retry, or the Hedge's next attempt, goes on)."""
        outer, _ = pipeline.layers_around(self)
        scope = "attempt" if roles(outer) & _ATTEMPT_MAKERS else "total"
        if self._placed and scope != self.scope:
            raise ConfigurationError(
                [("Timeout", f"this instance bounds the {self.scope} elsewhere; use a new Timeout for the {scope}")]
            )
        self.scope, self._placed = scope, True

    async def __call__(self, call: Call, next: Handler) -> Any:
        options = self.options
        if type(call.clock) is LoopClock and options.first_chunk is None and options.idle is None:
            # the fixed path: one shared loop timer instead of an asyncio.timeout per call, same semantics
            loop = asyncio.get_running_loop()
            timer = self._timer if self._timer.loop is loop else self._timer_for(loop)
            started = loop.time()
            seconds = options.seconds
            deadline = started + seconds
            if call.deadline is not None and call.deadline < deadline:
                deadline = call.deadline
                seconds = max(0.0, deadline - started)
            entry = None if timer is None else timer.enter(deadline)
            if timer is not None and entry is not None:
                try:
                    result = await next(call.with_deadline(deadline))
                except BaseException as error:
                    if not timer.leave(entry):
                        raise
                    # asyncio.Timeout's rules: our cancellation alone becomes a timeout; an error the body answered
                    # it with is ours too, unless a cancellation from outside is also pending
                    task = entry.task
                    alone = task.uncancel() <= entry.cancelling
                    if isinstance(error, asyncio.CancelledError):
                        if not alone:
                            raise
                        cause = None
                    elif isinstance(error, TimeoutError):
                        cause = None
                    elif not isinstance(error, Exception) or task.cancelling() > 0:
                        raise
                    else:
                        cause = error
                    self.emit(call, TimeoutFired, timeout=seconds, scope=self.scope)
                    raise TimeoutExceededError(seconds, scope=self.scope, limit="deadline") from cause
                if timer.leave(entry):  # the body swallowed our cancellation and answered: its answer stands
                    entry.task.uncancel()
                return result
        return await self._scoped(call, next)

    def _timer_for(self, loop: asyncio.AbstractEventLoop) -> DeadlineTimer | None:
        """A timer for ``loop``; None while the last one still serves calls on another loop (they use a scope)."""
        if self._timer.busy:
            return None
        self._timer = DeadlineTimer(loop)
        return self._timer

    async def _scoped(self, call: Call, next: Handler) -> Any:
        """The general path: the clock's own deadline scope (a virtual clock, stream limits, an earlier deadline)."""
        seconds = self.options.seconds
        clock = call.clock
        started = clock.now()
        deadline = started + seconds
        if call.deadline is not None and call.deadline < deadline:
            deadline = call.deadline
            seconds = max(0.0, deadline - started)
        scope = clock.deadline(deadline)
        options = self.options
        cause: Exception | None = None
        limits = None
        try:
            async with scope:
                if options.first_chunk is None and options.idle is None:
                    return await next(call.with_deadline(deadline))
                limits = ChunkLimits.over(scope, deadline, clock, options.first_chunk, options.idle)
                with limits or contextlib.nullcontext():
                    return await next(call.with_deadline(deadline))
        except TimeoutError:
            if not scope.expired():
                raise
        except Exception as error:
            # Our deadline cancelled the body and it answered with an error of its own (a TaskGroup's ExceptionGroup,
            # a client turning CancelledError into a transport error): that is our timeout, unless a cancellation
            # from outside (the caller, an enclosing deadline) is also pending, which then goes on as it is.
            if not scope.expired() or _cancel_pending():
                raise
            cause = error
        limit, seconds = limits.waiting if limits is not None and limits.waiting else ("deadline", seconds)
        self.emit(call, TimeoutFired, timeout=seconds, scope=self.scope)
        raise TimeoutExceededError(seconds, scope=self.scope, limit=limit) from cause

    def describe_state(self) -> dict[str, Any]:
        return {"scope": self.scope}
