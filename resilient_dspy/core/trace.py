"""Call traces: which layers ran, for how long, with what outcome, and what they reported along the way.

A traced call (``await pipeline.traced(question)``) runs through a second handler chain, composed once when the
pipeline is built, in which every layer and the program are wrapped in a span recorder; untraced calls never
touch it, so tracing costs nothing until used. Events emitted during the call are attached to the span that
was open when they fired. ``Trace.render()`` prints the tree a developer wants when a call was slow or fell back.

Part of the core (docs/architecture.md: the layout, a call's path, the rules).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from resilient_dspy.events import Event

if TYPE_CHECKING:
    from resilient_dspy.core.call import Call, Handler

__all__ = ["Span", "Trace"]

_SKIPPED_EVENT_FIELDS = frozenset({"pipeline", "layer", "time"})


@dataclass(slots=True)
class Span:
    """One pass through one layer (or the program): when it started and ended, how it ended, its events."""

    name: str
    attempt: int
    started: float
    ended: float | None = None
    outcome: str = "running"
    error: BaseException | None = None
    events: list[Event] = field(default_factory=list)
    children: list[Span] = field(default_factory=list)

    @property
    def duration(self) -> float | None:
        return None if self.ended is None else self.ended - self.started


class Trace:
    """The spans of one call, as a tree; built by the traced handler chain of a :class:`Pipeline`."""

    __slots__ = ("_stack", "root")

    def __init__(self, name: str, started: float) -> None:
        self.root = Span(name, 1, started)
        self._stack = [self.root]

    def open(self, name: str, attempt: int, now: float) -> Span:
        span = Span(name, attempt, now)
        self._stack[-1].children.append(span)
        self._stack.append(span)
        return span

    def close(self, span: Span, now: float, error: BaseException | None = None) -> None:
        span.ended = now
        span.error = error
        span.outcome = "ok" if error is None else type(error).__name__
        while self._stack and self._stack[-1] is not span:
            self._stack.pop()
        if len(self._stack) > 1:
            self._stack.pop()

    def add_event(self, event: Event) -> None:
        """A listener: attach ``event`` to the innermost open span."""
        self._stack[-1].events.append(event)

    def spans(self) -> list[Span]:
        """Every span, depth first (the root first)."""
        found: list[Span] = []
        pending = [self.root]
        while pending:
            span = pending.pop()
            found.append(span)
            pending.extend(reversed(span.children))
        return found

    def render(self) -> str:
        """The trace as an indented tree: durations in ms relative to the call's start, outcomes, events."""
        lines: list[str] = []
        start = self.root.started

        def walk(span: Span, prefix: str, last: bool, top: bool) -> None:
            branch = "" if top else ("└─ " if last else "├─ ")
            duration = "…" if span.duration is None else f"{span.duration * 1000:.1f} ms"
            attempt = f" #{span.attempt}" if span.attempt > 1 else ""
            detail = f": {span.error}" if span.error is not None and str(span.error) else ""
            offset = f"+{(span.started - start) * 1000:.1f} ms"
            lines.append(f"{prefix}{branch}{span.name}{attempt}  {offset}  {duration}  {span.outcome}{detail}")
            inner = prefix + ("" if top else ("   " if last else "│  "))
            items: list[Span | Event] = sorted([*span.children, *span.events], key=_when)
            for index, item in enumerate(items):
                final = index == len(items) - 1
                if isinstance(item, Span):
                    walk(item, inner, final, False)
                else:
                    mark = "└· " if final else "├· "
                    lines.append(f"{inner}{mark}{_describe_event(item, start)}")

        walk(self.root, "", True, True)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


def _when(item: Span | Event) -> float:
    return item.started if isinstance(item, Span) else item.time


def _describe_event(event: Event, start: float) -> str:
    fields = []
    for spec in dataclasses.fields(event):
        if spec.name in _SKIPPED_EVENT_FIELDS:
            continue
        value = getattr(event, spec.name)
        if isinstance(value, BaseException):
            value = type(value).__name__
        elif isinstance(value, float):
            value = f"{value:.3g}"
        fields.append(f"{spec.name}={value}")
    return f"{type(event).__name__} +{(event.time - start) * 1000:.1f} ms {' '.join(fields)}".rstrip()


def traced(name: str, step: Callable[[Call], Awaitable[Any]]) -> Handler:
    """Wrap one step of the chain so a traced call records a span around it."""

    async def handler(call: Call) -> Any:
        trace = call.record.trace
        if trace is None:
            return await step(call)
        clock = call.runtime.clock
        span = trace.open(name, call.attempt, clock.now())
        try:
            result = await step(call)
        except BaseException as error:
            trace.close(span, clock.now(), error)
            raise
        trace.close(span, clock.now())
        return result

    return handler
