"""The cache (docs/patterns/cache.md), split by idea: options, events, keys, serializer, answers (storing and
serving), flight (single-flight), backend_calls (failing open), layer, and its backends/."""

from resilient_dspy.middleware.cache.events import (
    CacheBackendFailed,
    CacheCoalesced,
    CacheHit,
    CacheMiss,
    CacheNotStored,
    CacheStats,
    CacheStored,
)
from resilient_dspy.middleware.cache.keys import CacheKeyFunction, KeyBuilder, compute_key
from resilient_dspy.middleware.cache.layer import Cache
from resilient_dspy.middleware.cache.options import CacheOptions, CachePriceFunction

__all__ = [
    "Cache",
    "CacheBackendFailed",
    "CacheCoalesced",
    "CacheHit",
    "CacheKeyFunction",
    "CacheMiss",
    "CacheNotStored",
    "CacheOptions",
    "CachePriceFunction",
    "CacheStats",
    "CacheStored",
    "KeyBuilder",
    "compute_key",
]
