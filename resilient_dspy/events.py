"""Typed events that layers emit, and the per-pipeline sink that delivers them to listeners.

Each pattern module defines its own event classes (subclasses of :class:`Event`); this module holds the base and the
delivery rule: with no listener nothing is built, and a listener's ``Exception`` never fails a call (any other
``BaseException`` propagates: see :func:`deliver`). It is also where users import every event from: the layers
import this module, so a pattern's events are looked up in its module on first use (PEP 562), never imported here.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from resilient_dspy.middleware.adaptive_concurrency import AdaptiveConcurrencyRejected, ConcurrencyLimitChanged
    from resilient_dspy.middleware.adaptive_throttle import ThrottleRejected
    from resilient_dspy.middleware.breaker import CircuitRejected, CircuitStateChanged, CircuitWaited, CircuitWaiting
    from resilient_dspy.middleware.budget import BudgetAlert, BudgetRejected, BudgetSpent
    from resilient_dspy.middleware.bulkhead import BulkheadAcquired, BulkheadQueued, BulkheadRejected
    from resilient_dspy.middleware.cache import (
        CacheBackendFailed,
        CacheCoalesced,
        CacheHit,
        CacheMiss,
        CacheNotStored,
        CacheStored,
    )
    from resilient_dspy.middleware.canary import (
        CanaryPromoted,
        CanaryRolledBack,
        CanaryRouted,
        ShadowCompared,
        ShadowSkipped,
    )
    from resilient_dspy.middleware.chaos import ChaosInjected
    from resilient_dspy.middleware.fallback import FallbackUsed
    from resilient_dspy.middleware.guard import GuardRejectedInput, GuardRejectedOutput
    from resilient_dspy.middleware.hedge import HedgeStarted, HedgeWon
    from resilient_dspy.middleware.ratelimit import RateLimitReconciled, RateLimitRejected, RateLimitWaited
    from resilient_dspy.middleware.retry import RetryGaveUp, RetryScheduled
    from resilient_dspy.middleware.timeout import TimeoutFired
    from resilient_dspy.store.events import StoreRecovered, StoreUnavailable

__all__ = [
    "AdaptiveConcurrencyRejected",
    "BudgetAlert",
    "BudgetRejected",
    "BudgetSpent",
    "BulkheadAcquired",
    "BulkheadQueued",
    "BulkheadRejected",
    "CacheBackendFailed",
    "CacheCoalesced",
    "CacheHit",
    "CacheMiss",
    "CacheNotStored",
    "CacheStored",
    "CanaryPromoted",
    "CanaryRolledBack",
    "CanaryRouted",
    "ChaosInjected",
    "CircuitRejected",
    "CircuitStateChanged",
    "CircuitWaited",
    "CircuitWaiting",
    "ConcurrencyLimitChanged",
    "Event",
    "EventRouter",
    "FallbackUsed",
    "GuardRejectedInput",
    "GuardRejectedOutput",
    "HedgeStarted",
    "HedgeWon",
    "Listener",
    "RateLimitReconciled",
    "RateLimitRejected",
    "RateLimitWaited",
    "Rejected",
    "RetryGaveUp",
    "RetryScheduled",
    "ShadowCompared",
    "ShadowSkipped",
    "StoreRecovered",
    "StoreUnavailable",
    "ThrottleRejected",
    "TimeoutFired",
]

# each pattern's events, by the module of the layer that emits them (the same names as the imports above)
_PATTERN_EVENTS: dict[str, tuple[str, ...]] = {
    "resilient_dspy.middleware.adaptive_concurrency": ("AdaptiveConcurrencyRejected", "ConcurrencyLimitChanged"),
    "resilient_dspy.middleware.adaptive_throttle": ("ThrottleRejected",),
    "resilient_dspy.middleware.breaker": ("CircuitRejected", "CircuitStateChanged", "CircuitWaited", "CircuitWaiting"),
    "resilient_dspy.middleware.budget": ("BudgetAlert", "BudgetRejected", "BudgetSpent"),
    "resilient_dspy.middleware.bulkhead": ("BulkheadAcquired", "BulkheadQueued", "BulkheadRejected"),
    "resilient_dspy.middleware.cache": (
        "CacheBackendFailed",
        "CacheCoalesced",
        "CacheHit",
        "CacheMiss",
        "CacheNotStored",
        "CacheStored",
    ),
    "resilient_dspy.middleware.canary": (
        "CanaryPromoted",
        "CanaryRolledBack",
        "CanaryRouted",
        "ShadowCompared",
        "ShadowSkipped",
    ),
    "resilient_dspy.middleware.chaos": ("ChaosInjected",),
    "resilient_dspy.middleware.fallback": ("FallbackUsed",),
    "resilient_dspy.middleware.guard": ("GuardRejectedInput", "GuardRejectedOutput"),
    "resilient_dspy.middleware.hedge": ("HedgeStarted", "HedgeWon"),
    "resilient_dspy.middleware.ratelimit": ("RateLimitReconciled", "RateLimitRejected", "RateLimitWaited"),
    "resilient_dspy.middleware.retry": ("RetryGaveUp", "RetryScheduled"),
    "resilient_dspy.middleware.timeout": ("TimeoutFired",),
    "resilient_dspy.store.events": ("StoreRecovered", "StoreUnavailable"),
}
_EMITTED_BY = {name: module for module, names in _PATTERN_EVENTS.items() for name in names}

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


if not TYPE_CHECKING:  # type checkers read the imports above

    def __getattr__(name: str) -> Any:
        """A pattern's event class, looked up in the module of the layer that emits it."""
        module = _EMITTED_BY.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    """The module's names and the pattern events it gives on first use."""
    return sorted({*globals(), *__all__})
