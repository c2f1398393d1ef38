"""A Cache backend on a shared :class:`~resilient_dspy.store.StateStore` (``RedisStore``), with leases for
single-flight across processes (docs/patterns/cache.md, "Sharing a cache between processes").

Every operation is one atomic Lua step of the store (one round trip, bounded by the store's ``timeout``). Keys are
``<prefix>:cache:{<namespace>}:e:<digest>`` for an entry, ``...:l:<digest>`` for its lease and ``...:index`` for the
namespace's size index: the hash tag ``{<namespace>}`` puts all keys a step touches in one Redis Cluster slot.
TTLs are Redis's own (``PX``), so an entry expires on the server's clock, the same for every process.

Size limits: a value over ``max_value_bytes`` is not stored; with ``max_entries`` a namespace keeps at most that many
entries, and a store beyond it evicts the entries **closest to their expiry** first (under one TTL: the oldest
written; entries without a TTL go last, oldest first). The index is a sorted set by expiry, trimmed of expired
members on each store, so eviction costs O(log n) in the same step. ``clear`` walks keys with ``SCAN`` and removes
them with ``UNLINK`` in steps of ``_CLEAR_BATCH`` (never ``KEYS``, which blocks a shared server).
"""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from resilient_dspy.core.options import Options, options_from
from resilient_dspy.store.protocol import StateStore

__all__ = ["Claim", "RedisBackend", "RedisBackendOptions"]

_CLEAR_BATCH = 500
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")
_NO_EXPIRY_MS = 100 * 365 * 24 * 3600 * 1000  # an entry without TTL sorts after every expiring one, oldest first

# KEYS: entry, lease. ARGV: lease ms (0: read only), token. -> {1, value} | {0} | {2} (leased) | {3, pttl, held ms}
_LOOKUP = """
local value = redis.call('GET', KEYS[1])
if value then return {1, value} end
if ARGV[1] == '0' then return {0} end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if redis.call('SET', KEYS[2], ARGV[2] .. ' ' .. string.format('%.0f', now), 'NX', 'PX', ARGV[1]) then
  return {2}
end
local held = redis.call('GET', KEYS[2]) or ''
local since = tonumber(string.match(held, ' (%d+)$')) or now
return {3, redis.call('PTTL', KEYS[2]), now - since}
"""

# KEYS: entry. -> {value, pttl} | {}
_GET_WITH_TTL = """
local value = redis.call('GET', KEYS[1])
if not value then return {} end
return {value, redis.call('PTTL', KEYS[1])}
"""

# KEYS: entry, index, lease. ARGV: value, ttl ms (0: none), digest, max entries (0: none), token ('' none),
# entry key prefix, no-expiry ms. Stores, trims the namespace to its limit (soonest expiry first), ends the lease
# if it is ours.
_STORE = """
local ttl = tonumber(ARGV[2])
if ttl > 0 then redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl) else redis.call('SET', KEYS[1], ARGV[1]) end
local limit = tonumber(ARGV[4])
local evicted = 0
if limit > 0 then
  local t = redis.call('TIME')
  local now = t[1] * 1000 + t[2] / 1000
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', string.format('%.3f', now))
  local expiry = now + (ttl > 0 and ttl or tonumber(ARGV[7]))
  redis.call('ZADD', KEYS[2], string.format('%.3f', expiry), ARGV[3])
  local over = redis.call('ZCARD', KEYS[2]) - limit
  if over > 0 then
    local popped = redis.call('ZPOPMIN', KEYS[2], over)
    for i = 1, #popped, 2 do evicted = evicted + redis.call('UNLINK', ARGV[6] .. popped[i]) end
  end
end
if ARGV[5] ~= '' then
  local held = redis.call('GET', KEYS[3])
  if held and string.sub(held, 1, #ARGV[5] + 1) == ARGV[5] .. ' ' then redis.call('DEL', KEYS[3]) end
end
return evicted
"""

# KEYS: lease. ARGV: token. Ends the lease only if this caller still holds it.
_RELEASE = """
local held = redis.call('GET', KEYS[1])
if held and string.sub(held, 1, #ARGV[1] + 1) == ARGV[1] .. ' ' then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: entry, index. ARGV: digest.
_DELETE = """
local removed = redis.call('UNLINK', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return removed
"""

# KEYS: a key of the namespace (routes the step to its node). ARGV: cursor, match, count.
# One SCAN step: unlinks the entries and indexes found (leases of calls in flight stay), counts the entries.
_CLEAR_STEP = """
local found = redis.call('SCAN', ARGV[1], 'MATCH', ARGV[2], 'COUNT', ARGV[3])
local removed = 0
for _, key in ipairs(found[2]) do
  if string.find(key, '}:e:', 1, true) then
    removed = removed + redis.call('UNLINK', key)
  elseif string.sub(key, -7) == '}:index' then
    redis.call('UNLINK', key)
  end
end
return {found[1], removed}
"""


class RedisBackendOptions(Options):
    """What :class:`RedisBackend` accepts; validated when it is created."""

    store: StateStore = Field(description="The shared store (a RedisStore), the same object for every layer.")
    max_entries: int | None = Field(
        default=100_000, ge=1, description="Entries per namespace at most (soonest expiry evicted first); None: no cap."
    )
    max_value_bytes: int = Field(default=1_048_576, ge=1, description="A larger encoded answer is not stored.")
    lease_ttl: float = Field(
        default=30.0,
        gt=0,
        allow_inf_nan=False,
        description="Seconds a leader holds a missed key at most (and at most its call's remaining time).",
    )
    max_wait: float = Field(
        default=30.0,
        gt=0,
        allow_inf_nan=False,
        description="Seconds a call waits at most for another process's answer before running the call itself.",
    )


@dataclass(frozen=True, slots=True)
class Claim:
    """A lookup's answer: the stored ``value``; or ``token`` of the lease this caller now holds; or neither: another
    process holds the lease for ``lease_left`` more seconds and has held it ``held_for`` seconds."""

    value: bytes | None = None
    token: str | None = None
    lease_left: float = 0.0
    held_for: float = 0.0


class RedisBackend:
    """Entries on a shared store: TTL on the server, namespaces, size limits, and leases for single-flight across
    processes. Give it the process's one ``RedisStore``; every process with the same store prefix shares entries."""

    blocking = True

    def __init__(
        self,
        store: StateStore,
        *,
        max_entries: int | None = 100_000,
        max_value_bytes: int = 1_048_576,
        lease_ttl: float = 30.0,
        max_wait: float = 30.0,
    ) -> None:
        self.options = options_from(RedisBackendOptions, "RedisBackend", locals())
        self.store = store
        self.max_value_bytes = max_value_bytes
        self.lease_ttl = lease_ttl
        self.max_wait = max_wait
        self._limit = max_entries or 0
        self._owner = uuid.uuid4().hex[:16]  # an identity, not a decision: lease tokens unique across processes
        self._leases = 0

    # ---------------------------------------------------------------- keys

    def _keys(self, key: str) -> tuple[str, str, str]:
        """The entry, its namespace's index and its lease."""
        namespace, _, digest = key.partition(":")
        tag = f"{{{namespace}}}"
        key_of = self.store.key
        return key_of("cache", tag, "e", digest), key_of("cache", tag, "index"), key_of("cache", tag, "l", digest)

    # ---------------------------------------------------------------- the protocol

    async def get(self, key: str) -> bytes | None:
        claim = await self.lookup(key, None)
        return claim.value

    async def get_with_ttl(self, key: str) -> tuple[bytes, float | None] | None:
        entry = self._keys(key)[0]
        found = await self.store.run(_GET_WITH_TTL, [entry], [], operation="cache get")
        if not found:
            return None
        value, ttl = found
        return bytes(value), None if int(ttl) < 0 else int(ttl) / 1000

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        await self.set_leased(key, value, ttl, None)

    async def delete(self, key: str) -> bool:
        entry, index, _ = self._keys(key)
        digest = key.partition(":")[2]
        return bool(await self.store.run(_DELETE, [entry, index], [digest], operation="cache delete"))

    async def clear(self, namespace: str | None = None) -> int:
        """Remove the entries of ``namespace`` (every namespace's when None) in ``SCAN`` steps; how many."""
        key_of = self.store.key
        tag = "*" if namespace is None else _GLOB_SPECIAL.sub(r"\\\1", namespace)
        match = _GLOB_SPECIAL.sub(r"\\\1", key_of("cache", "")) + "{" + tag + "}:*"
        anchor = key_of("cache", f"{{{namespace or ''}}}", "index")
        cursor, removed = b"0", 0
        while True:
            step = await self.store.run(_CLEAR_STEP, [anchor], [cursor, match, _CLEAR_BATCH], operation="cache clear")
            cursor, removed = step[0], removed + int(step[1])
            if cursor in (b"0", "0", 0):
                return removed

    # ---------------------------------------------------------------- single-flight across processes

    async def lookup(self, key: str, lease: float | None) -> Claim:
        """The entry of ``key``; when absent and ``lease`` is given, take its lease for ``lease`` seconds if no one
        holds it. One step: a hit, a lease, or how long another process's lease still runs."""
        entry, _, lease_key = self._keys(key)
        if lease is None:
            found = await self.store.run(_LOOKUP, [entry, lease_key], [0, ""], operation="cache get")
            return Claim(bytes(found[1])) if int(found[0]) == 1 else Claim()
        self._leases += 1
        token = f"{self._owner}:{self._leases}"
        milliseconds = max(1, math.ceil(lease * 1000))
        found = await self.store.run(_LOOKUP, [entry, lease_key], [milliseconds, token], operation="cache lookup")
        kind = int(found[0])
        if kind == 1:
            return Claim(bytes(found[1]))
        if kind == 2:
            return Claim(token=token)
        return Claim(lease_left=max(0, int(found[1])) / 1000, held_for=max(0, int(found[2])) / 1000)

    async def set_leased(self, key: str, value: bytes, ttl: float | None, token: str | None) -> None:
        """Store ``value`` (trimming the namespace to ``max_entries``) and end the lease ``token`` in the same step."""
        if len(value) > self.max_value_bytes:
            raise ValueError(f"value of {len(value)} bytes over max_value_bytes={self.max_value_bytes}")
        entry, index, lease_key = self._keys(key)
        digest = key.partition(":")[2]
        milliseconds = 0 if ttl is None else max(1, math.ceil(ttl * 1000))
        args = [value, milliseconds, digest, self._limit, token or "", entry[: len(entry) - len(digest)], _NO_EXPIRY_MS]
        await self.store.run(_STORE, [entry, index, lease_key], args, operation="cache set")

    async def release(self, key: str, token: str) -> None:
        """End the lease ``token`` (a leader that failed or was cancelled): the next waiter to look takes over."""
        await self.store.run(_RELEASE, [self._keys(key)[2]], [token], operation="cache release")

    def describe(self) -> dict[str, Any]:
        """The store (no secrets) and the limits."""
        options = self.options
        return {
            "store": self.store.describe(),
            "max_entries": options.max_entries,
            "max_value_bytes": options.max_value_bytes,
            "lease_ttl": options.lease_ttl,
            "max_wait": options.max_wait,
        }

    def __repr__(self) -> str:
        return f"RedisBackend({self.store!r}, max_entries={self.options.max_entries})"
