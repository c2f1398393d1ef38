"""Storage for the :class:`~resilient_dspy.Cache` layer: an async backend protocol, four backends, a safe serializer.

A backend stores opaque bytes under ``"<namespace>:<digest>"`` keys with an optional TTL. :class:`MemoryBackend`
(LRU + TTL on the pipeline clock) is the default; :class:`DiskBackend` persists on ``diskcache``;
:class:`TieredBackend` puts a near tier in front of a far one; :class:`AiocacheBackend` adapts any aiocache cache.
:class:`CacheSerializer` turns values (``dspy.Prediction`` first) into a versioned JSON envelope and back — never
pickle, because a shared store may hold attacker-controlled bytes.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import inspect
import json
import json.scanner
import logging
import math
import os
import re
import sqlite3
import time
import typing
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import diskcache  # type: ignore[import-untyped]
import dspy
from aiocache.backends.memory import SimpleMemoryBackend  # type: ignore[import-untyped]
from aiocache.base import BaseCache  # type: ignore[import-untyped]
from dspy.primitives.prediction import Completions
from pydantic import BaseModel

from resilient_dspy.core.clock import Clock, LoopClock
from resilient_dspy.errors import ConfigurationError

__all__ = [
    "AiocacheBackend",
    "CacheBackend",
    "CacheSerializer",
    "CachedEntry",
    "CorruptEntryError",
    "DiskBackend",
    "MemoryBackend",
    "NowaitBackend",
    "TieredBackend",
    "UnencodableError",
    "UnknownTypeError",
    "is_backend",
]

logger = logging.getLogger("resilient_dspy.cache")

WallClock = Callable[[], float]


# ------------------------------------------------------------------------------------------------ the protocol


@runtime_checkable
class CacheBackend(Protocol):
    """Where a Cache keeps its entries. Keys are ``"<namespace>:<digest>"``; values are opaque bytes.

    Optional extras a backend may offer: ``get_with_ttl(key)`` (value and remaining seconds, for
    :class:`TieredBackend`), ``bind_clock(clock)`` (the pipeline clock, for TTLs on virtual time) and
    ``blocking = False`` (its operations never wait on I/O, so the Cache skips the timeout scope), and with it
    the synchronous pair of :class:`NowaitBackend`, which the Cache then calls without an ``await``.
    """

    async def get(self, key: str) -> bytes | None:
        """The value, or None when absent or expired."""
        ...

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        """Store ``value``; it expires ``ttl`` seconds from now (None = never)."""
        ...

    async def delete(self, key: str) -> bool:
        """Remove ``key``; True if it was there."""
        ...

    async def clear(self, namespace: str | None = None) -> int:
        """Remove every entry of ``namespace`` (every entry when None); how many were removed."""
        ...


_BACKEND_METHODS = ("get", "set", "delete", "clear")


@runtime_checkable
class NowaitBackend(Protocol):
    """A backend that never waits (``blocking = False``) may also offer these: the Cache calls them instead of
    ``get``/``set``, which saves two coroutines per call (~0.6 µs of a ~4 µs hit)."""

    def get_nowait(self, key: str) -> bytes | None: ...

    def set_nowait(self, key: str, value: bytes, ttl: float | None) -> None: ...


def is_nowait(candidate: object) -> bool:
    """True when ``candidate`` declares ``blocking = False`` and its class defines ``get_nowait`` with ``get`` and
    ``set_nowait`` with ``set``: a subclass that overrides only ``get``/``set`` keeps its overrides in use."""
    if getattr(candidate, "blocking", True) is not False or not isinstance(candidate, NowaitBackend):
        return False
    cls = type(candidate)
    return _owner(cls, "get") is _owner(cls, "get_nowait") and _owner(cls, "set") is _owner(cls, "set_nowait")


def _owner(cls: type, name: str) -> type | None:
    return next((klass for klass in cls.__mro__ if name in vars(klass)), None)


def is_backend(candidate: object) -> bool:
    """True when ``candidate`` has the four async methods of :class:`CacheBackend`."""
    return not isinstance(candidate, type) and all(
        inspect.iscoroutinefunction(getattr(candidate, name, None)) for name in _BACKEND_METHODS
    )


def _namespace_prefix(namespace: str | None) -> str:
    return "" if namespace is None else f"{namespace}:"


# ------------------------------------------------------------------------------------------------------ memory


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


# ------------------------------------------------------------------------------- expiry stamp for shared stores

_STAMP = b"rdc-exp:"


def _stamp(value: bytes, expires_at: float | None) -> bytes:
    """Prefix ``value`` with its absolute (wall-clock) expiry, in ASCII so text-mode stores keep it intact."""
    when = b"-" if expires_at is None else repr(expires_at).encode("ascii")
    return b"".join((_STAMP, when, b"\n", value))


def _unstamp(raw: bytes) -> tuple[float | None, bytes] | None:
    """``(expires_at, value)`` from a stamped blob, or None when the blob is not ours."""
    if not raw.startswith(_STAMP):
        return None
    end = raw.find(b"\n", len(_STAMP))
    if end < 0:
        return None
    when = raw[len(_STAMP) : end]
    if when == b"-":
        return None, raw[end + 1 :]
    try:
        expires_at = float(when)
    except ValueError:
        return None
    return (expires_at, raw[end + 1 :]) if math.isfinite(expires_at) else None


def _live(raw: object, wall: WallClock, where: str, key: str) -> tuple[bytes, float | None] | None:
    """The value and its remaining seconds if ``raw`` is a live stamped entry; a foreign blob is logged as a miss."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogateescape")
    if not isinstance(raw, bytes):
        logger.warning("%s: ignoring a foreign %s value under %s", where, type(raw).__name__, key)
        return None
    stamped = _unstamp(raw)
    if stamped is None:
        logger.warning("%s: ignoring a foreign or corrupt entry under %s", where, key)
        return None
    expires_at, value = stamped
    if expires_at is None:
        return value, None
    remaining = expires_at - wall()
    return (value, remaining) if remaining > 0 else None


# -------------------------------------------------------------------------------------------------------- disk


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


# ------------------------------------------------------------------------------------------------------ tiered


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


# ---------------------------------------------------------------------------------------------------- aiocache

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


# -------------------------------------------------------------------------------------------------- serializer

SERIALIZER_VERSION = 1
_MAX_DEPTH = 64


class UnencodableError(TypeError):
    """The value holds something the serializer cannot store faithfully (it is then simply not cached)."""

    def __init__(self, kind: type[Any], reason: str) -> None:
        self.kind = kind
        super().__init__(f"cannot cache a {kind.__module__}.{kind.__qualname__}: {reason}")


class CorruptEntryError(ValueError):
    """Stored bytes that are not a valid entry of this serializer (read as a miss)."""


class UnknownTypeError(CorruptEntryError):
    """The entry names a model or enum class that is not on the allowlist."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"entry holds a {name!r}, which is not an allowed type")


class CachedEntry(typing.NamedTuple):
    """A decoded entry: the value (a fresh object), the LM usage that produced it and its total tokens."""

    value: Any
    usage: dict[str, Any]
    tokens: int


def _type_name(cls: type[Any]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _usage_value(value: object) -> str:
    """Usage is accounting, stored as plain JSON: a value JSON cannot hold is kept as its repr."""
    return repr(value)


def compact_json(*, sort_keys: bool, default: Callable[[Any], Any]) -> Callable[[Any], str]:
    """A compact, non-ASCII-escaping JSON encoder built once. ``json.dumps`` and ``JSONEncoder.encode`` build a
    new C encoder on every call, about half their cost on small values; the text is the same. No circular-reference
    check: callers encode values whose depth they have bounded."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - a Python without the C accelerator
        return json.JSONEncoder(sort_keys=sort_keys, ensure_ascii=False, separators=(",", ":"), default=default).encode
    encode = make(None, default, json.encoder.encode_basestring, None, ":", ",", sort_keys, False, True)

    def dumps(value: Any) -> str:
        return "".join(encode(value, 0))

    return dumps


_envelope_json = compact_json(sort_keys=False, default=_usage_value)
# the C scanner json.loads ends in, without its whitespace and extra-data checks (loads makes its own)
_scan_json = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]  # typeshed is wrong here


class CacheSerializer:
    """A versioned JSON envelope for cached values; it never pickles and never imports a class named by data.

    It round-trips JSON values, tuples, sets, bytes, ``dspy.Prediction`` / ``dspy.Example`` (fields,
    ``completions``) and instances of pydantic models and enums on its allowlist — the classes found in the
    program's signatures (see :meth:`allow_annotation`). Anything else raises :class:`UnencodableError`.
    """

    __slots__ = ("_ambiguous", "_types")

    def __init__(self, types: Iterable[type[Any]] = ()) -> None:
        self._types: dict[str, type[Any]] = {}
        self._ambiguous: set[str] = set()
        self.allow(*types)

    def allow(self, *classes: type[Any]) -> None:
        """Allow these pydantic model / enum classes (and the models and enums their fields mention)."""
        for cls in classes:
            self.allow_annotation(cls)

    def allow_annotation(self, annotation: Any) -> None:
        """Allow every pydantic model and enum class reachable from a type annotation (``list[Answer] | None``)."""
        seen: set[int] = set()
        pending = [annotation]
        while pending:
            item = pending.pop()
            if id(item) in seen:
                continue
            seen.add(id(item))
            if isinstance(item, type) and issubclass(item, BaseModel | enum.Enum):
                self._register(item)
                if issubclass(item, BaseModel):
                    pending.extend(field.annotation for field in item.model_fields.values())
            pending.extend(typing.get_args(item))

    def _register(self, cls: type[Any]) -> None:
        name = _type_name(cls)
        known = self._types.get(name)
        if known is not None and known is not cls:
            self._ambiguous.add(name)
        self._types[name] = cls

    def knows(self, cls: type[Any]) -> bool:
        name = _type_name(cls)
        return self._types.get(name) is cls and name not in self._ambiguous

    # ---------------------------------------------------------------- encode

    def dumps(self, value: Any, usage: Mapping[str, Any] | None = None, tokens: int = 0) -> bytes:
        """The envelope for ``value`` and the usage that produced it; raises :class:`UnencodableError`."""
        value_text = _envelope_json(self._encode(value, 0))
        usage_text = _envelope_json(dict(usage)) if usage else "{}"
        text = f'{{"rdc":{SERIALIZER_VERSION},"value":{value_text},"usage":{usage_text},"tokens":{int(tokens)}}}'
        return text.encode("utf-8", "surrogatepass")

    def _encode(self, value: Any, depth: int) -> Any:
        kind = type(value)
        if kind is str or kind is int or kind is float or kind is bool or value is None:
            return value
        if depth > _MAX_DEPTH:
            raise UnencodableError(kind, f"nested deeper than {_MAX_DEPTH} levels")
        depth += 1
        if kind is list:
            return [self._encode(item, depth) for item in value]
        if kind is dict or (isinstance(value, dict) and kind.__module__ == "collections"):
            if "$t" not in value and all(type(k) is str for k in value):
                return {k: self._encode(v, depth) for k, v in value.items()}
            return {"$t": "dict", "v": [[self._encode(k, depth), self._encode(v, depth)] for k, v in value.items()]}
        if kind is tuple:
            return {"$t": "tuple", "v": [self._encode(item, depth) for item in value]}
        if kind is set or kind is frozenset:
            return {"$t": kind.__name__, "v": [self._encode(item, depth) for item in value]}
        if kind is bytes:
            return {"$t": "bytes", "v": base64.b64encode(value).decode("ascii")}
        if kind is dspy.Prediction:
            completions = value.completions
            return {
                "$t": "prediction",
                "v": self._encode(dict(value.items()), depth),
                "c": None if completions is None else self._encode(dict(completions.items()), depth),
            }
        if kind is dspy.Example:
            inputs = getattr(value, "_input_keys", None)
            return {
                "$t": "example",
                "v": self._encode(dict(value.items()), depth),
                "i": None if inputs is None else sorted(inputs),
            }
        if isinstance(value, BaseModel | enum.Enum):
            if not self.knows(kind):
                raise UnencodableError(kind, "not a type of the program's signatures (allow it with types=)")
            if isinstance(value, enum.Enum):
                return {"$t": "enum", "n": _type_name(kind), "v": self._encode(value.value, depth)}
            return {"$t": "model", "n": _type_name(kind), "v": value.model_dump(mode="json")}
        raise UnencodableError(kind, "no safe encoding for this type")

    # ---------------------------------------------------------------- decode

    def loads(self, data: bytes) -> CachedEntry:
        """The entry in ``data``; any bytes that are not a valid envelope raise :class:`CorruptEntryError`."""
        try:
            text = data.decode("utf-8", "surrogatepass")
            envelope, end = _scan_json(text, 0)
        except (ValueError, RecursionError) as error:
            raise CorruptEntryError(f"not a cache entry: {error}") from None
        except StopIteration:
            raise CorruptEntryError("not a cache entry: not JSON") from None
        if end != len(text):
            raise CorruptEntryError(f"not a cache entry: extra data at {end}")
        if type(envelope) is not dict or envelope.get("rdc") != SERIALIZER_VERSION:
            raise CorruptEntryError("not a cache entry of this serializer version")
        try:
            value = self._decode(envelope["value"])
            usage = envelope.get("usage", {})
            tokens = envelope.get("tokens", 0)
        except CorruptEntryError:
            raise
        except Exception as error:
            raise CorruptEntryError(f"malformed cache entry: {type(error).__name__}: {error}") from None
        if type(usage) is not dict or type(tokens) is not int:
            raise CorruptEntryError("malformed cache entry: usage or tokens")
        return CachedEntry(value, usage, tokens)

    def _decode(self, item: Any) -> Any:
        kind = type(item)
        if kind is list:
            return [self._decode(x) for x in item]
        if kind is not dict:
            return item
        tag = item.get("$t")
        if tag is None:
            return {k: self._decode(v) for k, v in item.items()}
        decoder = _DECODERS.get(tag)
        if decoder is None:
            raise CorruptEntryError(f"unknown tag {tag!r}")
        return decoder(self, item)

    def _resolve(self, name: Any) -> type[Any]:
        cls = self._types.get(name) if type(name) is str else None
        if cls is None or name in self._ambiguous:
            raise UnknownTypeError(str(name))
        return cls

    def _decode_prediction(self, item: dict[str, Any]) -> Any:
        fields = self._decode(item["v"])
        prediction = dspy.Prediction(base=fields)
        completions = item.get("c")
        if completions is not None:
            prediction._completions = Completions(self._decode(completions))
        return prediction

    def _decode_example(self, item: dict[str, Any]) -> Any:
        example = dspy.Example(base=self._decode(item["v"]))
        inputs = item.get("i")
        return example if inputs is None else example.with_inputs(*inputs)

    def _decode_model(self, item: dict[str, Any]) -> Any:
        cls = self._resolve(item["n"])
        return cls.model_validate_json(json.dumps(item["v"]))

    def _decode_enum(self, item: dict[str, Any]) -> Any:
        return self._resolve(item["n"])(self._decode(item["v"]))

    def _decode_dict(self, item: dict[str, Any]) -> Any:
        return {self._decode(k): self._decode(v) for k, v in item["v"]}

    def _decode_bytes(self, item: dict[str, Any]) -> Any:
        return base64.b64decode(item["v"], validate=True)


def _sequence(build: Callable[[list[Any]], Any]) -> Callable[[CacheSerializer, dict[str, Any]], Any]:
    def decode(serializer: CacheSerializer, item: dict[str, Any]) -> Any:
        values = item["v"]
        if type(values) is not list:
            raise CorruptEntryError("a tagged sequence must hold a list")
        return build([serializer._decode(x) for x in values])

    return decode


_DECODERS: dict[str, Callable[[CacheSerializer, dict[str, Any]], Any]] = {
    "prediction": CacheSerializer._decode_prediction,
    "example": CacheSerializer._decode_example,
    "model": CacheSerializer._decode_model,
    "enum": CacheSerializer._decode_enum,
    "dict": CacheSerializer._decode_dict,
    "bytes": CacheSerializer._decode_bytes,
    "tuple": _sequence(tuple),
    "set": _sequence(set),
    "frozenset": _sequence(frozenset),
}
