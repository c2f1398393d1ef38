"""How the metric observers read events: by event type (subclasses included), never by class-name strings, so a
renamed event still counts and a layer of one's own that derives from :class:`~resilient_dspy.events.Rejected`
is counted as a rejection."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from resilient_dspy.events import EventRouter, Rejected
from resilient_dspy.middleware.breaker.events import CircuitStateChanged
from resilient_dspy.middleware.cache.events import CacheCoalesced, CacheHit, CacheMiss
from resilient_dspy.middleware.chaos import ChaosInjected
from resilient_dspy.middleware.fallback import FallbackUsed
from resilient_dspy.middleware.retry import RetryScheduled
from resilient_dspy.middleware.timeout import TimeoutFired
from resilient_dspy.observe.common import key_label

__all__ = ["EventSink", "event_router"]


class EventSink(Protocol):
    """What the metric observers record from events; the :func:`event_router` calls these."""

    def retry(self, pipeline: str, layer: str, reason: str) -> None: ...

    def rejected(self, pipeline: str, layer: str, reason: str) -> None: ...

    def circuit(self, pipeline: str, layer: str, key: str, old: str, new: str) -> None: ...

    def cache(self, pipeline: str, layer: str, result: str, saved_tokens: int) -> None: ...

    def timeout(self, pipeline: str, layer: str, scope: str) -> None: ...

    def fallback(self, pipeline: str, layer: str, alternative: str) -> None: ...

    def chaos(self, pipeline: str, layer: str, kind: str) -> None: ...


def _text(value: Any) -> str:
    return "" if value is None else str(value.value if hasattr(value, "value") else value)


def event_router(sink: EventSink) -> EventRouter:
    """A listener recording events in ``sink`` by event type (subclasses included, so a layer of one's own that
    derives from :class:`~resilient_dspy.events.Rejected` is counted). Label values stay few: no free text."""

    def cache(result: str) -> Callable[[CacheHit | CacheMiss | CacheCoalesced], None]:
        def record(event: CacheHit | CacheMiss | CacheCoalesced) -> None:
            label = "bypass" if getattr(event, "bypassed", False) else result
            if isinstance(event, CacheCoalesced) and event.error is not None:
                label = "coalesced_error"
            sink.cache(event.pipeline, event.layer, label, getattr(event, "saved_tokens", 0))

        return record

    return (
        EventRouter()
        .on(RetryScheduled, lambda e: sink.retry(e.pipeline, e.layer, _text(e.reason)))
        .on(Rejected, lambda e: sink.rejected(e.pipeline, e.layer, e.rejection_reason()))
        .on(
            CircuitStateChanged,
            lambda e: sink.circuit(e.pipeline, e.layer, key_label(e.key), _text(e.old), _text(e.new)),
        )
        .on(CacheHit, cache("hit"))
        .on(CacheMiss, cache("miss"))
        .on(CacheCoalesced, cache("coalesced"))
        .on(TimeoutFired, lambda e: sink.timeout(e.pipeline, e.layer, e.scope))
        .on(FallbackUsed, lambda e: sink.fallback(e.pipeline, e.layer, _text(e.alternative)))
        .on(ChaosInjected, lambda e: sink.chaos(e.pipeline, e.layer, _text(e.kind)))
    )
