"""Typed events that layers emit, and the per-pipeline sink that delivers them to listeners.

Each pattern module defines its own event classes (subclasses of :class:`Event`); this module only holds
the base and the delivery rule: with no listener nothing is built, and a listener's ``Exception`` never fails a call
(any other ``BaseException`` propagates: see :func:`deliver`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["Event", "EventRouter", "Listener", "Rejected"]

logger = logging.getLogger("resilient_dspy.events")


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Something a layer did during one call; ``layer`` names the layer, ``time`` is the pipeline clock."""

    pipeline: str
    layer: str
    time: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Rejected(Event):
    """The base of every event saying a layer refused a call without running it: observers count rejections by
    this type, so a layer of one's own that derives from it is counted too."""

    def rejection_reason(self) -> str:
        """Why, as a short label from a small set (``queue_full``, ``open``, ``tokens`` …): safe as a metric label."""
        reason = getattr(self, "reason", None)
        return str(getattr(reason, "value", reason) or "rejected")


Listener = Callable[[Event], object]

E = TypeVar("E", bound=Event)


class EventRouter:
    """A listener that hands each event to the handlers subscribed to its type or to any of its base classes
    (``on(Rejected, ...)`` sees every rejection); the lookup is resolved once per concrete type."""

    __slots__ = ("_handlers", "_resolved")

    def __init__(self) -> None:
        self._handlers: dict[type[Event], list[Callable[[Any], object]]] = {}
        self._resolved: dict[type[Event], tuple[Callable[[Any], object], ...]] = {}

    def on(self, kind: type[E], handler: Callable[[E], object]) -> EventRouter:
        """Call ``handler`` for every event that is a ``kind``; returns the router, so calls chain."""
        self._handlers.setdefault(kind, []).append(handler)
        self._resolved.clear()
        return self

    def handlers_for(self, kind: type[Event]) -> tuple[Callable[[Any], object], ...]:
        """The handlers an event of ``kind`` goes to, most specific type first."""
        found = self._resolved.get(kind)
        if found is None:
            found = tuple(handler for base in kind.__mro__ for handler in self._handlers.get(base, ()))
            self._resolved[kind] = found
        return found

    def __call__(self, event: Event) -> None:
        for handler in self.handlers_for(type(event)):
            handler(event)


class OfKinds:
    """A listener that passes on only the events of the given types (``pipeline.subscribe(listener, to=...)``)."""

    __slots__ = ("kinds", "listener")

    def __init__(self, listener: Listener, kinds: tuple[type[Event], ...]) -> None:
        self.listener = listener
        self.kinds = kinds

    def __call__(self, event: Event) -> object:
        return self.listener(event) if isinstance(event, self.kinds) else None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OfKinds) and other.listener == self.listener and other.kinds == self.kinds

    def __hash__(self) -> int:
        return hash((self.listener, self.kinds))

    def __repr__(self) -> str:
        return f"OfKinds({self.listener!r}, {', '.join(kind.__name__ for kind in self.kinds)})"


def listener_problem(listener: object) -> str | None:
    """Why ``listener`` cannot listen, or None. Listeners are called synchronously: an async one needs an adapter."""
    if not callable(listener):
        return f"must be callable (got {listener!r})"
    if inspect.iscoroutinefunction(listener) or inspect.iscoroutinefunction(type(listener).__call__):
        return f"is async (got {listener!r}); wrap it in resilient_dspy.observe.AsyncListener(...) and start that"
    return None


def deliver(listeners: tuple[Listener, ...], event: Event) -> None:
    """Give ``event`` to every listener; a listener's ``Exception`` is logged and swallowed, so it never fails a call.

    Any other ``BaseException`` (``KeyboardInterrupt``, ``SystemExit``, ``CancelledError``, a subclass of one's own)
    asks to stop rather than reports an error: it propagates at once, so layers emit only where an exit gives back
    what they hold.
    """
    for listener in listeners:
        try:
            listener(event)
        except Exception:
            logger.exception("event listener %r failed on %s", listener, type(event).__name__)
