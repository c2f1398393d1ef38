"""Adaptive concurrency (docs/patterns/adaptive-concurrency.md): options, limit algorithms, events, layer."""

from resilient_dspy.middleware.adaptive_concurrency.events import (
    AdaptiveConcurrencyRejected,
    AdaptiveConcurrencySnapshot,
    ConcurrencyLimitChanged,
)
from resilient_dspy.middleware.adaptive_concurrency.layer import AdaptiveConcurrency
from resilient_dspy.middleware.adaptive_concurrency.options import AdaptiveConcurrencyOptions

__all__ = [
    "AdaptiveConcurrency",
    "AdaptiveConcurrencyOptions",
    "AdaptiveConcurrencyRejected",
    "AdaptiveConcurrencySnapshot",
    "ConcurrencyLimitChanged",
]
