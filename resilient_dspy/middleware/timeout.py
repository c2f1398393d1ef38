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
