"""The default backend: an in-process LRU with TTL on the pipeline clock."""

from __future__ import annotations

from collections import OrderedDict

from resilient_dspy.core.clock import Clock, LoopClock
from resilient_dspy.errors import ConfigurationError
from resilient_dspy.middleware.cache.backends.protocol import _namespace_prefix

__all__ = [
    "MemoryBackend",
]


class MemoryBackend:
    """In-process LRU with per-entry TTL on the pipeline clock: never serves an entry at or past its expiry.

    The clock is handed over by the Cache when the pipeline is built (``bind_clock``); until then, and when
    ``clock`` is given here, that clock is used (default: the running loop's time).
    """

    blocking = False

    def __init__(self, max_entries: int = 10_000, *, clock: Clock | None = None) -> None:
        problems = []
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            problems.append(("MemoryBackend.max_entries", f"must be an int >= 1 (got {max_entries!r})"))
        if clock is not None and not isinstance(clock, Clock):
            problems.append(("MemoryBackend.clock", f"must implement now(), sleep() and deadline() (got {clock!r})"))
        if problems:
            raise ConfigurationError(problems)
        self.max_entries = max_entries
        self._clock: Clock = clock or LoopClock()
        self._pinned = clock is not None
        self._bound = False
        self._entries: OrderedDict[str, tuple[float | None, bytes]] = OrderedDict()

    def bind_clock(self, clock: Clock) -> None:
        """Use the pipeline's clock for TTLs; one backend cannot serve two different time bases."""
        if self._pinned:
            return
        if self._bound and clock is not self._clock and not (type(clock) is type(self._clock) is LoopClock):
            raise ConfigurationError(
                [("MemoryBackend", "is already bound to another pipeline clock; give each time base its own backend")]
            )
        self._clock, self._bound = clock, True

    def _lookup(self, key: str) -> tuple[float | None, bytes] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires_at = entry[0]
        if expires_at is not None and self._clock.now() >= expires_at:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def get_nowait(self, key: str) -> bytes | None:
        entry = self._lookup(key)
        return None if entry is None else entry[1]

    async def get(self, key: str) -> bytes | None:
        return self.get_nowait(key)

    async def get_with_ttl(self, key: str) -> tuple[bytes, float | None] | None:
        entry = self._lookup(key)
        if entry is None:
            return None
        expires_at, value = entry
        return value, None if expires_at is None else expires_at - self._clock.now()

    def set_nowait(self, key: str, value: bytes, ttl: float | None) -> None:
        entries = self._entries
        entries[key] = (None if ttl is None else self._clock.now() + ttl, value)
        entries.move_to_end(key)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        self.set_nowait(key, value, ttl)

    async def delete(self, key: str) -> bool:
        return self._entries.pop(key, None) is not None

    async def clear(self, namespace: str | None = None) -> int:
        if namespace is None:
            count = len(self._entries)
            self._entries.clear()
            return count
        prefix = _namespace_prefix(namespace)
        doomed = [key for key in self._entries if key.startswith(prefix)]
        for key in doomed:
            del self._entries[key]
        return len(doomed)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"MemoryBackend(max_entries={self.max_entries}, entries={len(self._entries)})"
