"""One module per pattern, each with the same shape: options model, middleware, events."""

from resilient_dspy.middleware.breaker import (
    CircuitBreaker,
    CircuitRejected,
    CircuitSnapshot,
    CircuitState,
    CircuitStateChanged,
)
from resilient_dspy.middleware.cache import (
    Cache,
    CacheBackendFailed,
    CacheCoalesced,
    CacheHit,
    CacheMiss,
    CacheNotStored,
    CacheStats,
    CacheStored,
)
from resilient_dspy.middleware.fallback import Fallback, FallbackUsed, Static, UseLM, UseProgram
from resilient_dspy.middleware.retry import Retry, RetryBudget, RetryGaveUp, RetryScheduled
from resilient_dspy.middleware.timeout import Timeout, TimeoutFired

__all__ = [
    "Cache",
    "CacheBackendFailed",
    "CacheCoalesced",
    "CacheHit",
    "CacheMiss",
    "CacheNotStored",
    "CacheStats",
    "CacheStored",
    "CircuitBreaker",
    "CircuitRejected",
    "CircuitSnapshot",
    "CircuitState",
    "CircuitStateChanged",
    "Fallback",
    "FallbackUsed",
    "Retry",
    "RetryBudget",
    "RetryGaveUp",
    "RetryScheduled",
    "Static",
    "Timeout",
    "TimeoutFired",
    "UseLM",
    "UseProgram",
]
