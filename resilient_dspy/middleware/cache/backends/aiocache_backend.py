"""Any aiocache cache (Redis, Memcached, memory) as a backend."""

from __future__ import annotations

import math
import re
import time
from typing import Any

from aiocache.backends.memory import SimpleMemoryBackend  # type: ignore[import-untyped]
from aiocache.base import BaseCache  # type: ignore[import-untyped]

from resilient_dspy.errors import ConfigurationError
from resilient_dspy.middleware.cache.backends.expiry import _live, _stamp
from resilient_dspy.middleware.cache.backends.protocol import WallClock, _namespace_prefix

__all__ = [
    "AiocacheBackend",
]


_MEMCACHED_RELATIVE_LIMIT = 30 * 24 * 3600


def _identity(value: Any) -> Any:
    return value


_REDIS_BATCH = 500
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


async def _clear_redis(client: Any, prefix: str) -> int:
    """Delete every key under ``prefix`` with ``SCAN`` in batches: ``KEYS`` would block a shared server."""
    removed = 0
    batch: list[Any] = []
    async for key in client.scan_iter(match=_GLOB_SPECIAL.sub(r"\\\1", prefix) + "*", count=_REDIS_BATCH):
        batch.append(key)
        if len(batch) >= _REDIS_BATCH:
            removed += int(await client.delete(*batch))
            batch.clear()
    if batch:
        removed += int(await client.delete(*batch))
    return removed


class AiocacheBackend:
    """Any aiocache cache (``SimpleMemoryCache`` now; Redis or memcached for sharing between processes).

    Values bypass aiocache's own serializer and carry their wall-clock expiry, checked on read: the store's
    TTL is rounded *up* to whole seconds (memcached and Redis ``EX`` want ints) only to free memory. Keys go
    through the aiocache cache's own ``namespace`` prefix. ``clear(namespace)`` removes exactly our prefix; it
    needs a key listing: ``SimpleMemoryCache`` lists its dict, Redis is walked with ``SCAN`` (never ``KEYS``, which
    blocks the server); memcached has none, so clearing it raises :class:`ConfigurationError`.
    """

    def __init__(self, cache: BaseCache, *, wall_clock: WallClock = time.time) -> None:
        problems = []
        if not isinstance(cache, BaseCache):
            problems.append(("AiocacheBackend.cache", f"must be an aiocache cache (got {cache!r:.80})"))
        if not callable(wall_clock):
            problems.append(("AiocacheBackend.wall_clock", f"must be callable (got {wall_clock!r})"))
        if problems:
            raise ConfigurationError(problems)
        self.cache = cache
        self._wall = wall_clock
        bases = {base.__name__ for base in type(cache).__mro__}
        self._memcached = "MemcachedBackend" in bases
        self._redis = "RedisBackend" in bases

    def _store_ttl(self, ttl: float | None) -> int | None:
        if ttl is None:
            return None
        seconds = max(1, math.ceil(ttl))
        if self._memcached and seconds > _MEMCACHED_RELATIVE_LIMIT:
            return None
        return seconds

    async def get_with_ttl(self, key: str) -> tuple[bytes, float | None] | None:
        raw = await self.cache.get(key, loads_fn=_identity)
        return None if raw is None else _live(raw, self._wall, "AiocacheBackend", key)

    async def get(self, key: str) -> bytes | None:
        found = await self.get_with_ttl(key)
        return None if found is None else found[0]

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        expires_at = None if ttl is None else self._wall() + ttl
        await self.cache.set(key, _stamp(value, expires_at), ttl=self._store_ttl(ttl), dumps_fn=_identity)

    async def delete(self, key: str) -> bool:
        return bool(await self.cache.delete(key))

    async def clear(self, namespace: str | None = None) -> int:
        cache = self.cache
        prefix = cache.build_key(_namespace_prefix(namespace))
        if self._redis:
            return await _clear_redis(cache.client, prefix)
        if not isinstance(cache, SimpleMemoryBackend):
            raise ConfigurationError(
                [
                    (
                        "AiocacheBackend.cache",
                        f"clear() needs a store that lists its keys (SimpleMemoryCache, RedisCache); "
                        f"{type(cache).__name__} cannot",
                    )
                ]
            )
        doomed = [key for key in list(await cache.raw("keys")) if isinstance(key, str) and key.startswith(prefix)]
        removed = 0
        for key in doomed:
            removed += int(await cache.delete(key, namespace="") or 0)
        return removed

    def __repr__(self) -> str:
        return f"AiocacheBackend({type(self.cache).__name__})"
