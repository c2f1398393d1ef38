"""The cache (docs/patterns/cache.md): options, events, keys, serializer, layer, and its backends/."""

from resilient_dspy.middleware.cache.events import (
    CacheBackendFailed,
    CacheCoalesced,
    CacheHit,
    CacheMiss,
    CacheNotStored,
    CacheStats,
    CacheStored,
)
from resilient_dspy.middleware.cache.keys import KeyBuilder, compute_key
from resilient_dspy.middleware.cache.layer import Cache
from resilient_dspy.middleware.cache.options import CacheOptions

__all__ = [
    "Cache",
    "CacheBackendFailed",
    "CacheCoalesced",
    "CacheHit",
    "CacheMiss",
    "CacheNotStored",
    "CacheOptions",
    "CacheStats",
    "CacheStored",
    "KeyBuilder",
    "compute_key",
]
