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

__all__ = ["Event", "Listener"]

logger = logging.getLogger("resilient_dspy.events")


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Something a layer did during one call; ``layer`` names the layer, ``time`` is the pipeline clock."""

    pipeline: str
    layer: str
    time: float


Listener = Callable[[Event], object]


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
