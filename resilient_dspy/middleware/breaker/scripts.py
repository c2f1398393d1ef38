"""The Lua steps of a shared circuit (see :mod:`resilient_dspy.middleware.breaker.shared`), Redis 7 (``TIME`` in a
writing script is replicated by its effects).

Every step reads the circuit's hash (``st`` state, ``gen`` generation, ``ou`` open until, ``bd`` current break,
``lz`` live probe leases as JSON ``{id: expiry}``, ``pok`` probes succeeded, ``lseq`` lease counter, ``cf``
consecutive failures, ``cn``/``cnf`` outcomes counted in consecutive mode) and replies with the state after it:
``{head, head, state, old, reason, retry_after, open_left, break, calls, failures, slows, consecutive, probes,
probes_ok}`` (``old`` empty when nothing changed). The options come as ARGV 1..12 (see ``SharedCircuits.config``).
"""

from __future__ import annotations

__all__ = ["ADMIT", "CONTROL", "RECORD"]

_PRELUDE = """
local K, W = KEYS[1], KEYS[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local mode, size, buckets, min_calls = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local frate, srate, base_break = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local mult, max_break, probes = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local ceiling, idle = tonumber(ARGV[11]), tonumber(ARGV[12])
local function num(v, d) if v then return tonumber(v) end return d end
local f = redis.call('HMGET', K, 'st', 'gen', 'ou', 'bd', 'lz', 'pok', 'lseq', 'cf', 'cn', 'cnf')
local st, gen, ou, bd = f[1] or 'closed', num(f[2], 0), num(f[3], 0), num(f[4], base_break)
local leases = cjson.decode(f[5] or '{}')
local pok, lseq, cf, cn, cnf = num(f[6], 0), num(f[7], 0), num(f[8], 0), num(f[9], 0), num(f[10], 0)
local told, treason, tra = '', '', ''
local function move(new, reason, ra)
  told, treason, tra = st, reason, ra and tostring(ra) or ''
  st, gen, leases, pok, cn, cnf = new, gen + 1, {}, 0, 0, 0
end
local function open(reason, ra)
  local duration = bd
  if ra and ra > duration then
    local cap = max_break > 0 and max_break or math.max(base_break, ceiling)
    duration = math.max(duration, math.min(ra, cap))
  end
  ou, cf = now + duration, 0
  redis.call('DEL', W)
  move('open', reason, duration)
end
local function reopen(reason, ra)
  bd = bd * mult
  if max_break > 0 and bd > max_break then bd = max_break end
  open(reason, ra)
end
local function close(reason)
  bd, cf = base_break, 0
  redis.call('DEL', W)
  move('closed', reason, false)
end
local function live()
  local n, earliest = 0, false
  for id, exp in pairs(leases) do
    if exp <= now then leases[id] = nil else
      n = n + 1
      if not earliest or exp < earliest then earliest = exp end
    end
  end
  return n, earliest
end
local function totals()
  if mode == 'c' then return cn, cnf, 0 end
  if mode == 'n' then
    local w = redis.call('HMGET', W, 'n', 'f', 's')
    return num(w[1], 0), num(w[2], 0), num(w[3], 0)
  end
  local oldest = math.floor(now / (size / buckets)) - buckets
  local calls, fails, slows = 0, 0, 0
  for slot = 0, buckets - 1 do
    local b = redis.call('HMGET', W, 'b' .. slot, 'c' .. slot, 'f' .. slot, 's' .. slot)
    if num(b[1], -1) > oldest then
      calls, fails, slows = calls + num(b[2], 0), fails + num(b[3], 0), slows + num(b[4], 0)
    end
  end
  return calls, fails, slows
end
local function save()
  local nleases = 0
  for _ in pairs(leases) do nleases = nleases + 1 end
  redis.call('HSET', K, 'st', st, 'gen', gen, 'ou', tostring(ou), 'bd', tostring(bd),
    'lz', nleases > 0 and cjson.encode(leases) or '{}', 'pok', pok, 'lseq', lseq, 'cf', cf, 'cn', cn, 'cnf', cnf)
  if st == 'isolated' then
    redis.call('PERSIST', K)
    return
  end
  local ttl = math.ceil((idle + math.max(0, ou - now) + bd) * 1000)
  redis.call('PEXPIRE', K, ttl)
  redis.call('PEXPIRE', W, ttl)
end
local function state_reply(head1, head2)
  local calls, fails, slows = totals()
  local n = live()
  return {head1, head2, st, told, treason, tra, tostring(math.max(0, ou - now)), tostring(bd),
    calls, fails, slows, cf, n, pok}
end
"""

ADMIT = (
    _PRELUDE
    + """
if st == 'closed' then return state_reply('go', 'g' .. gen) end
if st == 'isolated' then return state_reply('no', '') end
if st == 'open' then
  if now < ou then return state_reply('no', tostring(ou - now)) end
  move('half_open', 'break_elapsed', false)
end
local n, earliest = live()
if n + pok >= probes then
  save()
  return state_reply('no', tostring(math.max(0, (earliest or (now + bd)) - now)))
end
lseq = lseq + 1
local id = gen .. '.' .. lseq
leases[id] = now + bd
save()
return state_reply('go', 'p' .. id)
"""
)

RECORD = (
    _PRELUDE
    + """
local ticket, outcome, slow, ra = ARGV[13], ARGV[14], ARGV[15] == '1', tonumber(ARGV[16])
if ra < 0 then ra = false end
local id = string.sub(ticket, 2)
if string.sub(ticket, 1, 1) == 'p' then
  if leases[id] == nil then return state_reply('stale', '') end
  if outcome == 'release' then leases[id] = nil
  elseif outcome == 'fail' then reopen('probe_failed', ra)
  elseif slow then reopen('probe_slow', false)
  else
    leases[id] = nil
    pok = pok + 1
    if pok >= probes then close('probes_succeeded') end
  end
  save()
  return state_reply('ok', '')
end
if tonumber(id) ~= gen then return state_reply('stale', '') end
local failed = outcome == 'fail'
if failed then cf = cf + 1 else cf = 0 end
if mode == 'c' then
  cn = cn + 1
  if failed then
    cnf = cnf + 1
    if cf >= size then open('failure_threshold', ra) end
  end
else
  local bits = (failed and 1 or 0) + (slow and 2 or 0)
  if mode == 'n' then
    local w = redis.call('HMGET', W, 'i', 'n', 'f', 's')
    local i, n, fl, sl = num(w[1], 0), num(w[2], 0), num(w[3], 0), num(w[4], 0)
    if n == size then
      local old = num(redis.call('HGET', W, 'r' .. i), 0)
      fl, sl = fl - old % 2, sl - math.floor(old / 2)
    else n = n + 1 end
    redis.call('HSET', W, 'r' .. i, bits, 'i', (i + 1) % size, 'n', n, 'f', fl + bits % 2,
      's', sl + math.floor(bits / 2))
  else
    local stamp = math.floor(now / (size / buckets))
    local slot = stamp % buckets
    local b = redis.call('HMGET', W, 'b' .. slot, 'c' .. slot, 'f' .. slot, 's' .. slot)
    if num(b[1], -1) ~= stamp then b = {stamp, 0, 0, 0} end
    redis.call('HSET', W, 'b' .. slot, stamp, 'c' .. slot, num(b[2], 0) + 1, 'f' .. slot, num(b[3], 0) + bits % 2,
      's' .. slot, num(b[4], 0) + math.floor(bits / 2))
  end
  local calls, fails, slows = totals()
  if calls >= min_calls then
    if frate >= 0 and fails >= frate * calls then open('failure_rate', ra)
    elseif srate >= 0 and slows >= srate * calls then open('slow_call_rate', ra) end
  end
end
save()
return state_reply('ok', '')
"""
)

CONTROL = (
    _PRELUDE
    + """
local action = ARGV[13]
if action == 'isolate' then
  if st ~= 'isolated' then move('isolated', 'isolate', false) end
elseif st ~= 'closed' then close('reset')
else bd, cf, cn, cnf = base_break, 0, 0, 0; redis.call('DEL', W) end
save()
return state_reply('ok', '')
"""
)
