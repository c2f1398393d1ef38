"""What the observers share: an event's fields, a call's measurement, event routing, and async listeners.

Every observing middleware (OpenTelemetry, Prometheus, CostTracker, LogCalls) measures a call the same way:
its time on the pipeline clock, its outcome, its attempts, and the LM tokens used inside it. Tokens come from
DSPy's usage tracker. A window opens its own tracker (DSPy rolls it up into any outer one on exit), except when
the active tracker was opened by an outer window in the same task: then it only marks where that tracker's
entries stood and counts what was added, so observers stacked on one call open one tracker, and concurrent calls
(which run in other tasks) never count each other's tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import Awaitable, Callable, Hashable
from contextvars import ContextVar, Token
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from resilient_dspy.binding.settings import setting
from resilient_dspy.binding.usage import UsageScope, attach_usage, usage_scope
from resilient_dspy.errors import RejectedError, TimeoutExceededError
from resilient_dspy.events import Event
from resilient_dspy.middleware.breaker.events import CircuitSnapshot
from resilient_dspy.observe.redact import to_plain

if TYPE_CHECKING:
    from resilient_dspy.core.call import Call
    from resilient_dspy.core.pipeline import Pipeline

__all__ = [
    "CIRCUIT_STATE_VALUES",
    "DURATION_BUCKETS",
    "OUTCOMES",
    "AsyncListener",
    "CallReport",
    "NoUsage",
    "TokenUsage",
    "UsageWindow",
    "event_fields",
    "key_label",
    "outcome_of",
    "subscribe_once",
    "usage_window",
]

logger = logging.getLogger("resilient_dspy.observe")

DURATION_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
"""Call-duration histogram boundaries in seconds, for LLM calls (tens of milliseconds to minutes)."""

OUTCOMES = ("success", "fallback", "rejected", "timeout", "error", "cancelled")
"""Every value of a call's ``outcome`` label: few, so they are safe as metric labels."""


_FIELD_NAMES: dict[type[Event], tuple[str, ...]] = {}


def _field_names(kind: type[Event]) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(kind)
    if names is None:
        names = _FIELD_NAMES[kind] = tuple(field.name for field in dataclasses.fields(kind))
    return names


def event_fields(event: Event) -> dict[str, Any]:
    """``{"event": class name, "pipeline", "layer", "time", <every other field>}``, JSON-safe, unredacted."""
    fields: dict[str, Any] = {"event": type(event).__name__}
    for name in _field_names(type(event)):
        value = getattr(event, name)
        fields[name] = value if value is None or type(value) in (str, int, float, bool) else to_plain(value)
    return fields


def key_label(key: Hashable) -> str:
    """A partition key as a label value: ``""`` for the unpartitioned circuit, else its ``str``."""
    return "" if key is None else str(key)


def outcome_of(error: BaseException | None, served_by: str, attempts: int | None = None) -> str:
    """``success``, ``cached`` (answered without reaching the program: a cache hit or a coalesced call; known when
    ``attempts`` is given) or ``fallback`` (an alternative served), else ``rejected``, ``timeout``, ``error``,
    ``cancelled``."""
    if error is None:
        if served_by != "primary":
            return "fallback"
        return "cached" if attempts == 0 else "success"
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"
    if isinstance(error, RejectedError):
        return "rejected"
    if isinstance(error, TimeoutExceededError):
        return "timeout"
    return "error"


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Prompt (input) and completion (output) tokens of one model."""

    input: int = 0
    output: int = 0

    @property
    def total(self) -> int:
        return self.input + self.output


def _count(value: Any) -> int:
    return value if type(value) is int else int(value) if isinstance(value, float) else 0


_OPENED: ContextVar[tuple[asyncio.Task[Any] | None, Any] | None] = ContextVar("resilient_dspy_usage", default=None)
"""The task and tracker of the innermost window that opened its own tracker in this context."""


class UsageWindow:
    """The LM usage recorded while the ``with`` block runs, by model (see the module docstring)."""

    __slots__ = ("_context", "_marks", "_token", "_tracker")

    def __enter__(self) -> UsageWindow:
        tracker = setting("usage_tracker")
        opened = _OPENED.get()
        task = asyncio.current_task()
        if tracker is not None and opened is not None and opened[1] is tracker and opened[0] is task:
            self._context: Any = None
            self._token: Token[tuple[asyncio.Task[Any] | None, Any] | None] | None = None
        else:
            self._context = usage_scope()
            tracker = self._context.__enter__().tracker
            self._token = _OPENED.set((task, tracker))
        self._tracker = tracker
        self._marks = {lm: len(entries) for lm, entries in tracker.usage_data.items()}
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._context is not None:
            if self._token is not None:
                _OPENED.reset(self._token)
            self._context.__exit__(kind, error, traceback)

    def usage(self) -> dict[str, TokenUsage]:
        """Tokens by model recorded since the window opened (DSPy cache hits record nothing)."""
        marks = self._marks
        usage: dict[str, TokenUsage] = {}
        for lm, entries in self._tracker.usage_data.items():
            start = marks.get(lm, 0)
            if len(entries) <= start:
                continue
            prompt = completion = 0
            for entry in entries[start:]:
                prompt += _count(entry.get("prompt_tokens"))
                completion += _count(entry.get("completion_tokens"))
            usage[lm] = TokenUsage(prompt, completion)
        return usage

    def hand_back(self, result: Any) -> None:
        """Attach the usage to ``result`` as DSPy would have, had our own tracker not hidden it (``track_usage``)."""
        if self._context is not None:
            attach_usage(result, UsageScope(self._tracker))


class NoUsage(UsageWindow):
    """A window that measures nothing, for observers told not to count tokens (saves DSPy's tracker setup)."""

    __slots__ = ()

    def __enter__(self) -> UsageWindow:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        return None

    def usage(self) -> dict[str, TokenUsage]:
        return {}

    def hand_back(self, result: Any) -> None:
        return None


def usage_window(tokens: bool) -> UsageWindow:
    """A :class:`UsageWindow` when ``tokens`` is wanted, else a :class:`NoUsage`."""
    return UsageWindow() if tokens else NoUsage()


@dataclass(frozen=True, slots=True)
class CallReport:
    """One finished call as an observer saw it: outcome, duration (pipeline clock), attempts, tokens by model."""

    pipeline: str
    outcome: str
    duration: float
    attempts: int
    retries: int
    served_by: str
    usage: dict[str, TokenUsage]
    error: BaseException | None = None

    @property
    def input_tokens(self) -> int:
        return sum(u.input for u in self.usage.values())

    @property
    def output_tokens(self) -> int:
        return sum(u.output for u in self.usage.values())


def report_call(call: Call, started: float, window: UsageWindow | None, error: BaseException | None) -> CallReport:
    """Build the :class:`CallReport` of ``call``, which started at ``started`` and ends now."""
    record = call.record
    return CallReport(
        call.runtime.name,
        outcome_of(error, record.served_by, record.attempts),
        call.clock.now() - started,
        record.attempts,
        record.retries,
        record.served_by,
        {} if window is None else window.usage(),
        error,
    )


def safely(what: str, action: Callable[..., object], *args: Any) -> None:
    """Run an observer's bookkeeping; its failure is logged, never raised into the call."""
    try:
        action(*args)
    except Exception:
        logger.exception("observer %s failed; the call is unaffected", what)


def subscribe_once(pipeline: Pipeline, listener: Callable[[Event], object]) -> None:
    """Subscribe ``listener`` to ``pipeline`` unless it already listens (a middleware's ``on_build``)."""
    if listener not in pipeline.runtime.listeners:
        pipeline.subscribe(listener)


CIRCUIT_STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2, "isolated": 3}
"""Numeric circuit states for gauges: 0 closed, 1 half-open, 2 open, 3 isolated."""


def circuit_snapshots(pipeline: Pipeline) -> list[tuple[str, str, str]]:
    """``(layer, key, state)`` of every circuit a pipeline's breakers know now, to seed a state gauge: the layers
    whose snapshots are of type :class:`CircuitSnapshot` (a Budget or a Bulkhead has snapshots too, but no circuit)."""
    found = []
    for layer in pipeline.layers:
        snapshots = getattr(layer, "snapshots", None)
        name = getattr(layer, "name", None)
        if not callable(snapshots) or not isinstance(name, str):
            continue
        try:
            for key, snapshot in snapshots().items():
                if isinstance(snapshot, CircuitSnapshot):
                    found.append((name, key_label(key), str(snapshot.state)))
        except Exception:
            logger.debug("could not read the circuits of %r", layer, exc_info=True)
    return found


# --------------------------------------------------------------------------------------------- async listeners


class _Stop:
    """Queued by :meth:`AsyncListener.aclose`: the consumer stops at its own token and skips stale ones."""

    __slots__ = ()


class AsyncListener:
    """An ``async def`` handler as a listener: events queue (bounded) for one consumer task this object owns.

    Start it with ``await listener.start()`` or ``async with listener:``; :meth:`aclose` lets the task handle
    what is queued, then stops it. A handler that raises is logged and the next event is handled; a full queue
    drops the event (counted in ``dropped``, logged once) rather than slow the call. Events from another thread
    are handed to the loop thread-safely.
    """

    def __init__(
        self, handler: Callable[[Event], Awaitable[object]], *, maxsize: int = 10_000, name: str | None = None
    ) -> None:
        if not callable(handler):
            raise TypeError(f"handler must be an async callable (got {handler!r})")
        self.handler = handler
        self.name: str = name or getattr(handler, "__qualname__", None) or repr(handler)
        self.maxsize = maxsize
        self.dropped = 0
        self.failed = 0
        self._queue: asyncio.Queue[Event | _Stop] = asyncio.Queue()
        self._stop = _Stop()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None

    def __call__(self, event: Event) -> None:
        loop = self._loop
        if loop is not None and threading.get_ident() != self._thread:
            loop.call_soon_threadsafe(self._put, event)
        else:
            self._put(event)

    def _put(self, event: Event) -> None:
        if self._queue.qsize() >= self.maxsize:
            self.dropped += 1
            if self.dropped == 1:
                logger.warning("async listener %s is behind: its queue is full, events are dropped", self.name)
            return
        self._queue.put_nowait(event)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    async def start(self) -> None:
        """Start the consumer task on the running loop (events queued before are handled first)."""
        if self.running:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._task = self._loop.create_task(self._consume(), name=f"AsyncListener({self.name})")

    async def _consume(self) -> None:
        queue = self._queue
        while True:
            event = await queue.get()
            if isinstance(event, _Stop):
                if event is self._stop:
                    return
                continue
            try:
                await self.handler(event)
            except Exception:
                self.failed += 1
                logger.exception("async listener %s failed on %s", self.name, type(event).__name__)

    async def aclose(self) -> None:
        """Let the consumer handle the events already queued, then stop it.

        To bound the wait, wrap it: ``async with asyncio.timeout(5): await listener.aclose()``. Cancelling
        ``aclose`` (a timeout does) cancels the consumer too: no task outlives it.
        """
        task = self._task
        if task is None:
            return
        self._task = self._loop = self._thread = None
        if not task.done():
            self._stop = _Stop()
            self._queue.put_nowait(self._stop)
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                if self.queued:
                    logger.warning("async listener %s: stopped with %d event(s) not handled", self.name, self.queued)
                raise

    async def __aenter__(self) -> AsyncListener:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"AsyncListener({self.name}, queued={self.queued}, dropped={self.dropped})"
