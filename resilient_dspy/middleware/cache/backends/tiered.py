"""Two tiers: a near backend in front of a far one, filled on a far hit."""

from __future__ import annotations

import time

from resilient_dspy.core.clock import Clock
from resilient_dspy.errors import ConfigurationError
from resilient_dspy.middleware.cache.backends.expiry import _live, _stamp
from resilient_dspy.middleware.cache.backends.protocol import CacheBackend, WallClock, is_backend

__all__ = [
    "TieredBackend",
]


class TieredBackend:
    """A fast ``near`` tier (usually :class:`MemoryBackend`) in front of a shared or persistent ``far`` tier.

    An entry's expiry is absolute and travels with it: a far hit is copied near with its *remaining* TTL, so a
    promotion never extends its life, also through nested tiers. A far tier that cannot tell the remaining TTL
    (no ``get_with_ttl``) gets the values stamped with their wall-clock expiry (``wall_clock``), checked on read.
    """

    def __init__(self, near: CacheBackend, far: CacheBackend, *, wall_clock: WallClock = time.time) -> None:
        problems = [
            (f"TieredBackend.{name}", f"must implement async get/set/delete/clear (got {tier!r:.80})")
            for name, tier in (("near", near), ("far", far))
            if not is_backend(tier)
        ]
        if not callable(wall_clock):
            problems.append(("TieredBackend.wall_clock", f"must be callable (got {wall_clock!r})"))
        if problems:
            raise ConfigurationError(problems)
        self.near = near
        self.far = far
        self._wall = wall_clock
        # a far tier that cannot tell an entry's remaining TTL holds stamped values: the expiry travels with them
        self._stamped = getattr(far, "get_with_ttl", None) is None

    def bind_clock(self, clock: Clock) -> None:
        for tier in (self.near, self.far):
            bind = getattr(tier, "bind_clock", None)
            if bind is not None:
                bind(clock)

    async def get(self, key: str) -> bytes | None:
        value = await self.near.get(key)
        if value is not None:
            return value
        found = await self._far_get(key)
        return None if found is None else found[0]

    async def get_with_ttl(self, key: str) -> tuple[bytes, float | None] | None:
        near_get = getattr(self.near, "get_with_ttl", None)
        if near_get is not None:
            found: tuple[bytes, float | None] | None = await near_get(key)
            if found is not None:
                return found
        return await self._far_get(key)

    async def _far_get(self, key: str) -> tuple[bytes, float | None] | None:
        """The far entry and its remaining seconds (None: it never expires), copied near with exactly that TTL."""
        found: tuple[bytes, float | None] | None
        if self._stamped:
            raw = await self.far.get(key)
            found = None if raw is None else _live(raw, self._wall, "TieredBackend", key)
        else:
            found = await self.far.get_with_ttl(key)  # type: ignore[attr-defined]
        if found is None:
            return None
        value, remaining = found
        if remaining is not None and remaining <= 0:
            return None
        await self.near.set(key, value, remaining)
        return found

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        await self.near.set(key, value, ttl)
        if self._stamped:
            value = _stamp(value, None if ttl is None else self._wall() + ttl)
        await self.far.set(key, value, ttl)

    async def delete(self, key: str) -> bool:
        near = await self.near.delete(key)
        far = await self.far.delete(key)
        return near or far

    async def clear(self, namespace: str | None = None) -> int:
        """Clear both tiers; the count is the larger tier's (the near tier mostly holds copies of far entries)."""
        near = await self.near.clear(namespace)
        far = await self.far.clear(namespace)
        return max(near, far)

    def __repr__(self) -> str:
        return f"TieredBackend({self.near!r}, {self.far!r})"
