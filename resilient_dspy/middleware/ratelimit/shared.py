"""The RateLimiter's meter on a shared store: every limit of a key on the server, one atomic Lua step per admission.

State of a key lives under ``store.key("ratelimit", <layer name>, <key>)``: a hash (bucket levels, the token sums
of the windows, the turn marker) and a sorted set per window limit (member = admission id, and for tokens
``id|weight``; score = its expiry on the server clock). :data:`ADMIT` prunes, checks every limit and charges all
of them or none, and answers "admitted" or the seconds to wait; :data:`ADJUST` reconciles one admission's token
weight after the call; :data:`RELEASE` hands back the turn of a head that gave up.

The turn: a head refused by the server takes the key's turn marker (its token weight, since when it has waited,
a lease) unless one that has waited longer holds it. While a turn is held, another call is admitted only if
charging it now would not move the holder's admission time later (a backfill); otherwise it is told to come back
when both fit, the holder charged first. The holder's admission clears the marker; a holder that gives up releases
it, and one whose process died loses it when its lease (its admission time + :data:`TURN_LEASE`) runs out. So a
large request is never starved by small ones from other processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from resilient_dspy.errors import RateLimitedError
from resilient_dspy.middleware._shared.waiting import give_up_at, wait_until
from resilient_dspy.middleware.ratelimit.events import RateLimitRejected, RateLimitWaited
from resilient_dspy.middleware.ratelimit.queue import _Waiter
from resilient_dspy.store.link import StoreLink
from resilient_dspy.store.protocol import StoreUnavailableError

if TYPE_CHECKING:
    from resilient_dspy.core.call import Call
    from resilient_dspy.middleware.ratelimit.algorithms import _Entry
    from resilient_dspy.middleware.ratelimit.layer import RateLimiter
    from resilient_dspy.middleware.ratelimit.options import Limit
    from resilient_dspy.middleware.ratelimit.queue import _Lane

__all__ = ["ADJUST", "ADMIT", "RELEASE", "TURN_LEASE", "Admission", "SharedMeter"]

TURN_LEASE = 1.0
"""Seconds a turn outlives its holder's admission time: how long a crashed holder can hold up the others."""

_LIMITS = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = KEYS[1]
local n = tonumber(ARGV[1])
local kind, amount, per, burst = {}, {}, {}, {}
for i = 1, n do
  local at = 2 + (i - 1) * 4
  kind[i], amount[i], per[i], burst[i] = ARGV[at], tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2]),
    tonumber(ARGV[at + 3])
end
local rest = 2 + n * 4
local function weight(i, tokens)
  if kind[i] == 'r' or kind[i] == 'R' then return 1 end
  return tokens
end
local function prune(i)
  local z = KEYS[1 + i]
  if kind[i] == 't' then
    local gone = redis.call('ZRANGEBYSCORE', z, '-inf', now)
    if #gone > 0 then
      local freed = 0
      for _, m in ipairs(gone) do freed = freed + tonumber(string.match(m, '|(%d+)$')) end
      redis.call('HINCRBY', state, 'u' .. i, -freed)
      redis.call('ZREMRANGEBYSCORE', z, '-inf', now)
    end
  elseif kind[i] == 'r' then
    redis.call('ZREMRANGEBYSCORE', z, '-inf', now)
  end
end
"""

_READY = r"""
-- When `need` fits limit i, if `extra` is charged at `extra_at` first (0: nothing); math.huge = never.
local function ready(i, need, extra, extra_at)
  if kind[i] == 'R' or kind[i] == 'T' then
    local interval = per[i] / amount[i]
    local tat = tonumber(redis.call('HGET', state, 'b' .. i) or '0')
    if extra > 0 then tat = math.max(tat, extra_at) + extra * interval end
    return math.max(now, tat - (burst[i] - need) * interval)
  end
  local z = KEYS[1 + i]
  local used
  if kind[i] == 't' then used = tonumber(redis.call('HGET', state, 'u' .. i) or '0')
  else used = redis.call('ZCARD', z) end
  local excess = used + extra + need - amount[i]
  if excess <= 0 then return now end
  if kind[i] == 'r' then
    if excess <= used then
      local e = redis.call('ZRANGE', z, excess - 1, excess - 1, 'WITHSCORES')
      return math.max(now, tonumber(e[2]))
    end
    excess = excess - used
  else
    local entries = redis.call('ZRANGE', z, 0, -1, 'WITHSCORES')
    for k = 1, #entries, 2 do
      excess = excess - tonumber(string.match(entries[k], '|(%d+)$'))
      if excess <= 0 then return math.max(now, tonumber(entries[k + 1])) end
    end
  end
  if extra > 0 and excess <= extra then return math.max(now, extra_at + per[i]) end
  return math.huge
end
local function ready_all(tokens, extra_tokens, extra_at)
  local when = now
  for i = 1, n do
    local extra = 0
    if extra_tokens >= 0 then extra = weight(i, extra_tokens) end
    when = math.max(when, ready(i, weight(i, tokens), extra, extra_at))
  end
  return when
end
"""

ADMIT = (
    _LIMITS
    + _READY
    + r"""
-- ARGV[rest..]: tokens, admission id, seconds already waited, since (0 = first ask), lease
local tokens, id = tonumber(ARGV[rest]), ARGV[rest + 1]
local since = tonumber(ARGV[rest + 3])
if since == 0 then since = now - tonumber(ARGV[rest + 2]) end
local lease = tonumber(ARGV[rest + 4])
for i = 1, n do prune(i) end
local mine = ready_all(tokens, -1, 0)
local turn = redis.call('HMGET', state, 'turn', 'turn_tokens', 'turn_since', 'turn_until')
local held = turn[1] and turn[1] ~= id and tonumber(turn[4]) > now and tonumber(turn[3]) <= since
local wake = mine
if held then
  local holder = tonumber(turn[2])
  local before = ready_all(holder, -1, 0)
  if mine <= now and ready_all(holder, tokens, now) <= before then
    held = false
  else
    wake = math.min(math.max(mine, before, ready_all(tokens, holder, before)), tonumber(turn[4]))
    if wake <= now then wake = tonumber(turn[4]) end
  end
end
if not held and mine <= now then
  local horizon = now
  for i = 1, n do
    local w = weight(i, tokens)
    if kind[i] == 'R' or kind[i] == 'T' then
      local interval = per[i] / amount[i]
      local tat = math.max(tonumber(redis.call('HGET', state, 'b' .. i) or '0'), now) + w * interval
      redis.call('HSET', state, 'b' .. i, string.format('%.17g', tat))
      horizon = math.max(horizon, tat)
    else
      local z = KEYS[1 + i]
      local member = id
      if kind[i] == 't' then
        member = id .. '|' .. w
        redis.call('HINCRBY', state, 'u' .. i, w)
      end
      redis.call('ZADD', z, now + per[i], member)
      redis.call('PEXPIRE', z, math.ceil(per[i] * 1000) + 1000)
      horizon = math.max(horizon, now + per[i])
    end
  end
  if turn[1] == id then
    redis.call('HDEL', state, 'turn', 'turn_tokens', 'turn_since', 'turn_until')
  elseif turn[1] then
    horizon = math.max(horizon, tonumber(turn[4]))
  end
  redis.call('PEXPIRE', state, math.ceil((horizon - now) * 1000) + 1000)
  return {1, '0', string.format('%.17g', since)}
end
if not held then
  redis.call('HSET', state, 'turn', id, 'turn_tokens', tokens, 'turn_since', string.format('%.17g', since),
    'turn_until', string.format('%.17g', mine + lease))
  local ttl = math.ceil((mine + lease - now) * 1000) + 1000
  if redis.call('PTTL', state) < ttl then redis.call('PEXPIRE', state, ttl) end
end
return {0, string.format('%.6f', wake - now), string.format('%.17g', since)}
"""
)
"""Admit one call on every limit of its key, or answer the seconds to wait (see the module docstring)."""

ADJUST = (
    _LIMITS
    + r"""
-- ARGV[rest..]: admission id, its estimate, delta (real usage - estimate)
local id, estimate, delta = ARGV[rest], tonumber(ARGV[rest + 1]), tonumber(ARGV[rest + 2])
for i = 1, n do
  if kind[i] == 't' then
    prune(i)
    local z = KEYS[1 + i]
    local member = id .. '|' .. estimate
    local expiry = redis.call('ZSCORE', z, member)
    if expiry and tonumber(expiry) > now then
      redis.call('ZREM', z, member)
      redis.call('ZADD', z, expiry, id .. '|' .. (estimate + delta))
      redis.call('HINCRBY', state, 'u' .. i, delta)
    end
  elseif kind[i] == 'T' then
    local later = tonumber(redis.call('HGET', state, 'b' .. i) or '0') + delta * per[i] / amount[i]
    redis.call('HSET', state, 'b' .. i, string.format('%.17g', later))
    local ttl = math.ceil((later - now) * 1000) + 1000
    if redis.call('PTTL', state) < ttl then redis.call('PEXPIRE', state, ttl) end
  end
end
return 1
"""
)
"""Change one admission's token weight after the call: a refund or an excess, on every token limit."""

RELEASE = r"""
if redis.call('HGET', KEYS[1], 'turn') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'turn', 'turn_tokens', 'turn_since', 'turn_until')
end
return 1
"""
"""Give back the turn of a head that stopped waiting (a no-op unless it holds it)."""


class Admission:
    """How a call was admitted: on the server (``ident``) or, during an outage, locally (``handles``)."""

    __slots__ = ("handles", "ident")

    def __init__(self, ident: str | None, handles: list[_Entry | None]) -> None:
        self.ident = ident
        self.handles = handles


class SharedMeter:
    """The remote half of a RateLimiter with ``store=``: the queue head's admission loop and the reconciliation."""

    def __init__(self, layer: RateLimiter, link: StoreLink, limits: tuple[Limit, ...]) -> None:
        self.layer = layer
        self.link = link
        self.spec: list[Any] = [len(limits)]
        for limit in limits:
            letter = "r" if limit.unit == "requests" else "t"
            self.spec += [letter if limit.burst is None else letter.upper(), limit.amount, limit.per, limit.burst or 0]
        self.count = len(limits)
        self._ids = itertools.count()
        self._process = uuid.uuid4().hex[:12]
        options = getattr(link.store, "options", None)
        self.retry_interval = float(getattr(options, "retry_interval", 1.0))

    def keys(self, key: Hashable) -> list[str]:
        """The key's hash, then one sorted set per limit (every limit gets one, so KEYS[1 + i] is limit i); the hash
        tag ``{...}`` puts them in one Redis Cluster slot, as one script must."""
        base = "{" + self.link.store.key("ratelimit", self.layer.name, "" if key is None else str(key)) + "}"
        return [base, *(f"{base}:{index}" for index in range(self.count))]

    async def admit(self, call: Call, lane: _Lane, key: Hashable, tokens: int | None, arrived: float) -> Admission:
        """Queue in FIFO order; as the head, ask the server (or the local meters in an outage) until admitted."""
        layer, clock, weight = self.layer, call.clock, tokens or 0
        give_up = give_up_at(arrived, layer.options.max_wait, call.deadline)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(weight, loop.create_future())
        queue = lane.queue
        queue.append(waiter)
        keys = self.keys(key)
        ident = f"{self._process}:{next(self._ids)}"
        since, refused, holder = "0", False, False
        try:
            if queue[0] is not waiter:
                refused = True
                became_head = not give_up.reached(arrived) and await wait_until(clock, waiter.future, give_up.at)
                if not became_head and queue[0] is not waiter:
                    raise self._reject(call, key, give_up.reason, lane.told, arrived)
            while True:
                now = clock.now()
                args = [*self.spec, weight, ident, now - arrived, since, TURN_LEASE]
                try:
                    admitted, wait, since = await self.link.run(call, ADMIT, keys, args, operation="admit")
                except StoreUnavailableError:
                    if self.link.mode == "reject":
                        raise self._reject(call, key, "store", self.retry_interval, arrived) from None
                    now = clock.now()
                    ready = lane.ready_at(weight, now)
                    if ready <= now:
                        admission = Admission(None, lane.charge_kept(weight, now))
                        break
                    wake = ready
                else:
                    if admitted == 1:
                        holder = False
                        admission = Admission(ident, [])
                        break
                    holder = True
                    now = clock.now()
                    wake = now + float(wait)
                    lane.told = float(wait)
                refused = True
                if give_up.before(wake) or give_up.reached(now):
                    raise self._reject(call, key, give_up.reason, wake - now, arrived)
                waiter.future = future = loop.create_future()
                await wait_until(clock, future, wake)
        except BaseException:
            if holder:
                await self._release(call, keys, ident)
            raise
        finally:
            lane.leave(waiter)
        if refused:
            layer.emit(call, RateLimitWaited, key=key, waited=clock.now() - arrived, tokens=tokens)
        return admission

    async def _release(self, call: Call, keys: list[str], ident: str) -> None:
        """Hand back the turn, best effort: its lease ends it anyway."""
        with contextlib.suppress(StoreUnavailableError):
            await self.link.run(call, RELEASE, keys[:1], [ident], operation="release")

    async def adjust(
        self, call: Call, lane: _Lane, key: Hashable, admission: Admission, estimate: int, delta: int
    ) -> None:
        """Reconcile on the server, or on the local meters for a call admitted during an outage."""
        if admission.ident is None:
            lane.adjust(admission.handles, delta, call.clock.now())
            return
        args = [*self.spec, admission.ident, estimate, delta]
        with contextlib.suppress(StoreUnavailableError):  # the estimate stays charged: it errs on the safe side
            await self.link.run(call, ADJUST, self.keys(key), args, operation="reconcile")

    def _reject(self, call: Call, key: Hashable, reason: str, retry_after: float, arrived: float) -> RateLimitedError:
        retry_after, waited = max(0.0, retry_after), call.clock.now() - arrived
        layer = self.layer
        layer.emit(call, RateLimitRejected, key=key, reason=reason, retry_after=retry_after, waited=waited)
        where = "" if key is None else f"[{key!r}]"
        if reason == "store":
            why = f"its store {self.link.store.name!r} is unavailable (on_store_failure='reject')"
        else:
            why = f"max_wait={layer.options.max_wait:g}s" if reason == "max_wait" else "the call's deadline"
        return RateLimitedError(f"{layer.name}{where}: cannot admit the call within {why}", retry_after=retry_after)
