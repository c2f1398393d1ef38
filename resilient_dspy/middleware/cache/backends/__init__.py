"""Storage for the :class:`~resilient_dspy.Cache` layer: the async backend protocol and five backends.

A backend stores opaque bytes under ``"<namespace>:<digest>"`` keys with an optional TTL. :class:`MemoryBackend`
(LRU + TTL on the pipeline clock) is the default; :class:`DiskBackend` persists on ``diskcache``;
:class:`TieredBackend` puts a near tier in front of a far one; :class:`RedisBackend` shares entries (and single-flight)
between processes on a ``RedisStore``; :class:`AiocacheBackend` adapts any aiocache cache.
Values are encoded by :mod:`resilient_dspy.middleware.cache.serializer` (never pickle).
"""

from resilient_dspy.middleware.cache.backends.aiocache_backend import AiocacheBackend
from resilient_dspy.middleware.cache.backends.disk import DiskBackend
from resilient_dspy.middleware.cache.backends.memory import MemoryBackend
from resilient_dspy.middleware.cache.backends.protocol import CacheBackend, NowaitBackend, is_backend, is_nowait
from resilient_dspy.middleware.cache.backends.redis_backend import RedisBackend
from resilient_dspy.middleware.cache.backends.tiered import TieredBackend

__all__ = [
    "AiocacheBackend",
    "CacheBackend",
    "DiskBackend",
    "MemoryBackend",
    "NowaitBackend",
    "RedisBackend",
    "TieredBackend",
    "is_backend",
    "is_nowait",
]
