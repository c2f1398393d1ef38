"""The Lua steps of the RateLimiter on a shared store: every limit of a key on the server, one atomic step each.

State of a key lives under ``store.key("ratelimit", <layer name>, <key>)``: a hash (bucket levels, the token sums
of the windows, the turn marker) and a sorted set per window limit (member = admission id, and for tokens
``id|weight``; score = its expiry on the server clock). :data:`ADMIT` prunes, checks every limit and charges all
of them or none, and answers "admitted" or the seconds to wait; :data:`SETTLE` is the answer (it reconciles one
admission's token weight); :data:`RELEASE` hands back the turn of a head that gave up.

Counted from the answer (``counts_from="answer"``, the default), :data:`ADMIT` adds each window entry *held*: its
score is a lease, the server time + the call's hold bound (its remaining deadline, at most :data:`HOLD_CAP`) +
``per``, the latest its window could end had the call lived. The answer is one :data:`SETTLE` step: the entry's
score becomes the server time + ``per`` (``ZADD XX``: an entry whose lease already ran out is not brought back), its
token weight reconciled in the same step, or it is removed (a refund: the call never reached the provider). A
process that dies holding entries loses them when their leases end. A wait the server computes from a lease is not
a real time (the answer may come at any moment, and no one tells the waiters: no pub/sub), so while it is the
reason to wait the wait is capped at a poll interval (``per / 10``, at least :data:`HOLD_POLL_FLOOR`).

The turn: a head refused by the server takes the key's turn marker (its token weight, since when it has waited,
a lease) unless one that has waited longer holds it. While a turn is held, another call is admitted only if
charging it now would not move the holder's admission time later (a backfill); otherwise it is told to come back
when both fit, the holder charged first. The holder's admission clears the marker; a holder that gives up releases
it, and one whose process died loses it when its lease (its admission time + :data:`TURN_LEASE`) runs out. So a
large request is never starved by small ones from other processes.
"""

from __future__ import annotations

__all__ = ["ADMIT", "HOLD_CAP", "HOLD_POLL_FLOOR", "PENDING_MAX", "RELEASE", "SETTLE", "TURN_LEASE"]

TURN_LEASE = 1.0
"""Seconds a turn outlives its holder's admission time: how long a crashed holder can hold up the others."""

HOLD_CAP = 600.0
"""Longest hold of an admission counted from its answer (a call without a deadline): a crashed process's held
entries leave the window at most this + ``per`` after their admission. A call running longer loses its hold."""

HOLD_POLL_FLOOR = 0.02
"""Shortest sleep of a waiter held up by running calls of other processes (``per / 10`` otherwise)."""

PENDING_MAX = 10_000
"""Answers kept for replay while the store is down; beyond it the oldest are left to their leases."""

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
-- A time beyond now + per comes from a held entry's lease: `leased` is set, the caller caps its wait.
local leased = false
local function lease_or_time(i, at)
  if at > now + per[i] + 0.000001 then leased = true end
  return math.max(now, at)
end
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
      return lease_or_time(i, tonumber(e[2]))
    end
    excess = excess - used
  else
    local entries = redis.call('ZRANGE', z, 0, -1, 'WITHSCORES')
    for k = 1, #entries, 2 do
      excess = excess - tonumber(string.match(entries[k], '|(%d+)$'))
      if excess <= 0 then return lease_or_time(i, tonumber(entries[k + 1])) end
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
-- ARGV[rest..]: tokens, admission id, seconds already waited, since (0 = first ask), turn lease, hold (0 = count
-- from admission), poll (the longest wait while a lease is the reason)
local tokens, id = tonumber(ARGV[rest]), ARGV[rest + 1]
local since = tonumber(ARGV[rest + 3])
if since == 0 then since = now - tonumber(ARGV[rest + 2]) end
local lease, hold, poll = tonumber(ARGV[rest + 4]), tonumber(ARGV[rest + 5]), tonumber(ARGV[rest + 6])
local function extend(key, at)
  local ttl = math.ceil((at - now) * 1000) + 1000
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
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
      local expiry = now + hold + per[i]
      redis.call('ZADD', z, expiry, member)
      extend(z, expiry)
      horizon = math.max(horizon, expiry)
    end
  end
  if turn[1] == id then
    redis.call('HDEL', state, 'turn', 'turn_tokens', 'turn_since', 'turn_until')
  elseif turn[1] then
    horizon = math.max(horizon, tonumber(turn[4]))
  end
  extend(state, horizon)
  return {1, '0', string.format('%.17g', since)}
end
if leased then
  mine, wake = math.min(mine, now + poll), math.min(wake, now + poll)
end
if not held then
  redis.call('HSET', state, 'turn', id, 'turn_tokens', tokens, 'turn_since', string.format('%.17g', since),
    'turn_until', string.format('%.17g', mine + lease))
  extend(state, mine + lease)
end
return {0, string.format('%.6f', wake - now), string.format('%.17g', since)}
"""
)
"""Admit one call on every limit of its key, or answer the seconds to wait (see the module docstring)."""

SETTLE = (
    _LIMITS
    + r"""
-- ARGV[rest..]: admission id, its estimate, delta (real usage - estimate), mode: 'a' reconcile an admission counted
-- from admission, 'h' the answer of a held admission (its window starts now), 'x' refund a held admission
local id, estimate, delta, mode = ARGV[rest], tonumber(ARGV[rest + 1]), tonumber(ARGV[rest + 2]), ARGV[rest + 3]
for i = 1, n do
  local z = KEYS[1 + i]
  if kind[i] == 't' then
    prune(i)
    local member = id .. '|' .. estimate
    local expiry = redis.call('ZSCORE', z, member)
    if expiry then
      redis.call('ZREM', z, member)
      if mode == 'x' then
        redis.call('HINCRBY', state, 'u' .. i, -estimate)
      else
        local at = tonumber(expiry)
        if mode == 'h' then at = now + per[i] end
        redis.call('ZADD', z, at, id .. '|' .. (estimate + delta))
        redis.call('HINCRBY', state, 'u' .. i, delta)
      end
    end
  elseif kind[i] == 'r' and mode == 'x' then
    redis.call('ZREM', z, id)
  elseif kind[i] == 'r' and mode == 'h' then
    redis.call('ZADD', z, 'XX', now + per[i], id)
  elseif kind[i] == 'T' and mode ~= 'x' and delta ~= 0 then
    local later = tonumber(redis.call('HGET', state, 'b' .. i) or '0') + delta * per[i] / amount[i]
    redis.call('HSET', state, 'b' .. i, string.format('%.17g', later))
    local ttl = math.ceil((later - now) * 1000) + 1000
    if redis.call('PTTL', state) < ttl then redis.call('PEXPIRE', state, ttl) end
  end
end
return 1
"""
)
"""The answer of one admission, in one step: reconcile its token weight; held, also start its window now (or
remove it: a refund)."""

RELEASE = r"""
if redis.call('HGET', KEYS[1], 'turn') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'turn', 'turn_tokens', 'turn_since', 'turn_until')
end
return 1
"""
"""Give back the turn of a head that stopped waiting (a no-op unless it holds it)."""
