"""A persistent backend on ``diskcache`` (bytes only, never pickle)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import diskcache  # type: ignore[import-untyped]

from resilient_dspy.errors import ConfigurationError
from resilient_dspy.middleware.cache.backends.expiry import _live, _stamp
from resilient_dspy.middleware.cache.backends.protocol import WallClock, logger

__all__ = [
    "DiskBackend",
]


class _BytesOnlyDisk(diskcache.Disk):  # type: ignore[misc]
    """diskcache serialization restricted to bytes: it never pickles, and never unpickles what it reads."""

    def put(self, key: Any) -> tuple[Any, bool]:
        if type(key) is not str:
            raise TypeError(f"DiskBackend keys are str (got {type(key).__name__})")
        return super().put(key)  # type: ignore[no-any-return]

    def get(self, key: Any, raw: bool) -> Any:
        if not raw:
            raise ValueError("refusing a pickled key found in the cache directory")
        return super().get(key, raw)

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
        if type(value) is not bytes:
            raise TypeError(f"DiskBackend stores bytes (got {type(value).__name__})")
        return super().store(value, read, key=key)

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        if mode == diskcache.core.MODE_RAW:
            return bytes(value) if isinstance(value, bytes | memoryview | bytearray) else value
        if mode == diskcache.core.MODE_BINARY and filename is not None and not read:
            root = Path(self._directory).resolve()
            path = (root / filename).resolve()
            if not path.is_relative_to(root) or not path.is_file():
                raise ValueError(f"refusing a value file outside the cache directory: {filename!r}")
            return path.read_bytes()
        raise ValueError(f"refusing a diskcache value stored in mode {mode} (only raw bytes are ours)")


class DiskBackend:
    """A persistent store on ``diskcache`` (SQLite + files), safe to share between processes on one machine.

    TTLs are wall-clock time (``wall_clock``, default ``time.time``), so they mean the same in every process;
    each entry carries its own expiry, checked on read, and diskcache also culls it. Calls run in a thread.
    """

    def __init__(
        self, directory: str | os.PathLike[str], *, size_limit: int = 2**30, wall_clock: WallClock = time.time
    ) -> None:
        problems = []
        if isinstance(size_limit, bool) or not isinstance(size_limit, int) or size_limit < 1:
            problems.append(("DiskBackend.size_limit", f"must be an int >= 1 (got {size_limit!r})"))
        if not callable(wall_clock):
            problems.append(("DiskBackend.wall_clock", f"must be callable (got {wall_clock!r})"))
        if problems:
            raise ConfigurationError(problems)
        self.directory = Path(directory)
        self._wall = wall_clock
        try:
            self._store = diskcache.Cache(
                str(self.directory), disk=_BytesOnlyDisk, size_limit=size_limit, tag_index=True
            )
        except (OSError, sqlite3.Error) as error:
            raise ConfigurationError([("DiskBackend.directory", f"cannot open a cache there: {error}")]) from error

    def _get(self, key: str) -> tuple[bytes, float | None] | None:
        try:
            raw = self._store.get(key, default=None, retry=True)
        except ValueError as error:
            logger.warning("DiskBackend: %s (key %s)", error, key)
            return None
        return None if raw is None else _live(raw, self._wall, "DiskBackend", key)

    async def get(self, key: str) -> bytes | None:
        found = await asyncio.to_thread(self._get, key)
        return None if found is None else found[0]

    async def get_with_ttl(self, key: str) -> tuple[bytes, float | None] | None:
        return await asyncio.to_thread(self._get, key)

    def _set(self, key: str, value: bytes, ttl: float | None) -> None:
        expires_at = None if ttl is None else self._wall() + ttl
        namespace = key.partition(":")[0]
        self._store.set(key, _stamp(value, expires_at), expire=ttl, tag=namespace, retry=True)

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        await asyncio.to_thread(self._set, key, value, ttl)

    async def delete(self, key: str) -> bool:
        return bool(await asyncio.to_thread(self._store.delete, key, True))

    async def clear(self, namespace: str | None = None) -> int:
        if namespace is None:
            return int(await asyncio.to_thread(self._store.clear, True))
        return int(await asyncio.to_thread(self._store.evict, namespace, True))

    def close(self) -> None:
        """Close the calling thread's SQLite connection (diskcache keeps one per thread); the data stays on disk."""
        self._store.close()

    def __repr__(self) -> str:
        return f"DiskBackend({str(self.directory)!r})"
