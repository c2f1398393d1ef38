"""One module per pattern, each with the same shape: options model, middleware, events."""

from resilient_dspy.middleware.adaptive_concurrency import (
    AdaptiveConcurrency,
    AdaptiveConcurrencyRejected,
    AdaptiveConcurrencySnapshot,
    ConcurrencyLimitChanged,
)
from resilient_dspy.middleware.adaptive_throttle import AdaptiveThrottle, ThrottleRejected, ThrottleSnapshot
from resilient_dspy.middleware.adaptive_timeout import AdaptiveTimeout
from resilient_dspy.middleware.breaker import (
    CircuitBreaker,
    CircuitRejected,
    CircuitSnapshot,
    CircuitState,
    CircuitStateChanged,
)
from resilient_dspy.middleware.budget import (
    Budget,
    BudgetAlert,
    BudgetRejected,
    BudgetSnapshot,
    BudgetSpent,
    BudgetUsage,
)
from resilient_dspy.middleware.bulkhead import (
    Bulkhead,
    BulkheadAcquired,
    BulkheadQueued,
    BulkheadRejected,
    BulkheadSnapshot,
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
from resilient_dspy.middleware.canary import (
    Canary,
    CanaryPromoted,
    CanaryRolledBack,
    CanaryRouted,
    CanarySnapshot,
    ShadowCompared,
    ShadowSkipped,
)
from resilient_dspy.middleware.chaos import Chaos, ChaosInjected, ChaosSnapshot
from resilient_dspy.middleware.fallback import Fallback, FallbackUsed, Static, UseLM, UseProgram
from resilient_dspy.middleware.guard import Guard, GuardRejectedInput, GuardRejectedOutput, InputRules
from resilient_dspy.middleware.hedge import Hedge, HedgeSnapshot, HedgeStarted, HedgeWon, Percentile
from resilient_dspy.middleware.ratelimit import (
    Limit,
    LimitUsage,
    RateLimiter,
    RateLimiterSnapshot,
    RateLimitReconciled,
    RateLimitRejected,
    RateLimitWaited,
)
from resilient_dspy.middleware.retry import Retry, RetryBudget, RetryGaveUp, RetryScheduled, RetrySnapshot
from resilient_dspy.middleware.timeout import Timeout, TimeoutFired

__all__ = [
    "AdaptiveConcurrency",
    "AdaptiveConcurrencyRejected",
    "AdaptiveConcurrencySnapshot",
    "AdaptiveThrottle",
    "AdaptiveTimeout",
    "Budget",
    "BudgetAlert",
    "BudgetRejected",
    "BudgetSnapshot",
    "BudgetSpent",
    "BudgetUsage",
    "Bulkhead",
    "BulkheadAcquired",
    "BulkheadQueued",
    "BulkheadRejected",
    "BulkheadSnapshot",
    "Cache",
    "CacheBackendFailed",
    "CacheCoalesced",
    "CacheHit",
    "CacheMiss",
    "CacheNotStored",
    "CacheStats",
    "CacheStored",
    "Canary",
    "CanaryPromoted",
    "CanaryRolledBack",
    "CanaryRouted",
    "CanarySnapshot",
    "Chaos",
    "ChaosInjected",
    "ChaosSnapshot",
    "CircuitBreaker",
    "CircuitRejected",
    "CircuitSnapshot",
    "CircuitState",
    "CircuitStateChanged",
    "ConcurrencyLimitChanged",
    "Fallback",
    "FallbackUsed",
    "Guard",
    "GuardRejectedInput",
    "GuardRejectedOutput",
    "Hedge",
    "HedgeSnapshot",
    "HedgeStarted",
    "HedgeWon",
    "InputRules",
    "Limit",
    "LimitUsage",
    "Percentile",
    "RateLimitReconciled",
    "RateLimitRejected",
    "RateLimitWaited",
    "RateLimiter",
    "RateLimiterSnapshot",
    "Retry",
    "RetryBudget",
    "RetryGaveUp",
    "RetryScheduled",
    "RetrySnapshot",
    "ShadowCompared",
    "ShadowSkipped",
    "Static",
    "ThrottleRejected",
    "ThrottleSnapshot",
    "Timeout",
    "TimeoutFired",
    "UseLM",
    "UseProgram",
]
