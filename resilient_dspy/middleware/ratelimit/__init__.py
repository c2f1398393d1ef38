"""The rate limiter (docs/patterns/rate-limiter.md): options, events, algorithms, queue, layer."""

from resilient_dspy.binding.estimate import DEFAULT_MAX_TOKENS
from resilient_dspy.middleware.ratelimit.events import (
    LimitUsage,
    RateLimiterSnapshot,
    RateLimitReconciled,
    RateLimitRejected,
    RateLimitWaited,
)
from resilient_dspy.middleware.ratelimit.layer import RateLimiter
from resilient_dspy.middleware.ratelimit.options import Limit, RateLimiterOptions

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "Limit",
    "LimitUsage",
    "RateLimitReconciled",
    "RateLimitRejected",
    "RateLimitWaited",
    "RateLimiter",
    "RateLimiterOptions",
    "RateLimiterSnapshot",
]
