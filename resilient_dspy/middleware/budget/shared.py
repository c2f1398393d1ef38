"""A budget kept on a shared store: what every process spent and what the calls in flight anywhere reserve.

Two atomic steps, each one Lua script (one round trip) on the server's clock: ``reserve`` (drop the reservations
whose process died — each expires ``reservation_ttl`` seconds, or the call's deadline, after it was made —, roll the
fixed window, refuse when spent + reserved + estimate > limit, else hold the estimate under a new reservation id) and
``commit`` (swap the reservation for the usage measured, fire each alert threshold once cluster-wide). State: a hash
``store.key("budget", name, "{key}")`` and a sorted set of reservation expiries beside it (one hash tag, one slot).
A lifetime budget's keys never expire; a windowed one's expire after its window ends.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, NamedTuple

from resilient_dspy.binding.usage import UsageScope, attach_usage, usage_scope
from resilient_dspy.middleware.budget.events import BudgetSnapshot, BudgetUsage
from resilient_dspy.store.link import StoreLink
from resilient_dspy.store.protocol import FailMode, StateStore, StoreUnavailableError

if TYPE_CHECKING:
    from resilient_dspy.core.call import Call, Handler
    from resilient_dspy.core.layer import Layer
    from resilient_dspy.middleware.budget.layer import Budget
    from resilient_dspy.middleware.budget.options import BudgetOptions, Unit

__all__ = ["Refusal", "SharedBudgets", "call_shared"]

_PRELUDE = """
local H, R = KEYS[1], KEYS[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local per, lt, ld = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local function num(v, d) if v then return tonumber(v) end return d end
local f = redis.call('HMGET', H, 'st', 'sd', 'rt', 'rd', 'n', 'start', 'seq', 'at', 'ad')
local st, sd, rt, rd, n = num(f[1], 0), num(f[2], 0), num(f[3], 0), num(f[4], 0), num(f[5], 0)
local start, seq, at, ad = num(f[6], false), num(f[7], 0), num(f[8], 0), num(f[9], 0)
local gone = redis.call('ZRANGEBYSCORE', R, '-inf', now)
for _, id in ipairs(gone) do
  local a = redis.call('HMGET', H, 't' .. id, 'd' .. id)
  rt, rd, n = rt - num(a[1], 0), rd - num(a[2], 0), n - 1
  redis.call('HDEL', H, 't' .. id, 'd' .. id)
end
if #gone > 0 then redis.call('ZREMRANGEBYSCORE', R, '-inf', now) end
if n <= 0 then n, rt, rd = 0, 0, 0 end
if start and per > 0 and now >= start + per then
  st, sd, at, ad = 0, 0, 0, 0
  if n > 0 then start = start + per * math.floor((now - start) / per) else start = false end
end
local function save()
  redis.call('HSET', H, 'st', tostring(st), 'sd', tostring(sd), 'rt', tostring(rt), 'rd', tostring(rd), 'n', n,
    'start', start and tostring(start) or '', 'seq', seq, 'at', at, 'ad', ad)
  if per > 0 then
    local left = start and math.max(0, start + per - now) or 0
    local ttl = math.ceil((left + per + tonumber(ARGV[4])) * 1000)
    redis.call('PEXPIRE', H, ttl)
    redis.call('PEXPIRE', R, ttl)
  end
end
local function state(head1, head2, head3, head4)
  local resets = (start and per > 0) and tostring(math.max(0, start + per - now)) or ''
  return {head1, head2, head3, head4, tostring(st), tostring(sd), tostring(rt), tostring(rd), n, resets}
end
"""

RESERVE = (
    _PRELUDE
    + """
local et, ed, ttl = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
if lt >= 0 and st + rt + et > lt then return state('no', 'tokens', '', '') end
if ld >= 0 and sd + rd + ed > ld then return state('no', 'dollars', '', '') end
if not start and per > 0 then start = now end
seq = seq + 1
rt, rd, n = rt + et, rd + ed, n + 1
redis.call('HSET', H, 't' .. seq, tostring(et), 'd' .. seq, tostring(ed))
redis.call('ZADD', R, now + ttl, seq)
save()
return state('ok', tostring(seq), '', '')
"""
)

COMMIT = (
    _PRELUDE
    + """
local id, spent_t, spent_d = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
if redis.call('ZREM', R, id) == 1 then
  local a = redis.call('HMGET', H, 't' .. id, 'd' .. id)
  rt, rd, n = rt - num(a[1], 0), rd - num(a[2], 0), n - 1
  redis.call('HDEL', H, 't' .. id, 'd' .. id)
  if n <= 0 then n, rt, rd = 0, 0, 0 end
end
if spent_t > 0 or spent_d > 0 then
  if not start and per > 0 then start = now end
  st, sd = st + spent_t, sd + spent_d
end
local at0, ad0 = at, ad
for i = 8, #ARGV do
  local threshold = tonumber(ARGV[i])
  if lt >= 0 and at == i - 8 and st >= threshold * lt then at = at + 1 end
  if ld >= 0 and ad == i - 8 and sd >= threshold * ld then ad = ad + 1 end
end
save()
return state(at0, at, ad0, ad)
"""
)

RESET = (
    _PRELUDE
    + """
st, sd, at, ad = 0, 0, 0, 0
start = false
save()
return state('ok', '', '', '')
"""
)


class Refusal(NamedTuple):
    """The cap that refused a reservation, and the figures the refusal reports (``retry_after`` None: lifetime)."""

    unit: Unit
    limit: float
    spent: float
    reserved: float
    retry_after: float | None


class SharedBudgets:
    """The store side of a Budget with ``store=``: runs its steps and mirrors the last state each key showed."""

    __slots__ = ("config", "link", "max_keys", "mirror", "name", "options", "store")

    def __init__(self, layer: Layer, options: BudgetOptions, store: StateStore, mode: FailMode) -> None:
        self.store = store
        self.options = options
        self.link = StoreLink(layer, store, mode)
        self.name = layer.name
        self.max_keys = options.max_keys
        self.mirror: dict[Hashable, BudgetSnapshot] = {}
        unset = -1.0
        self.config: list[Any] = [
            unset if options.per is None else options.per,
            unset if options.tokens is None else options.tokens,
            unset if options.dollars is None else options.dollars,
            options.reservation_ttl,
        ]

    def keys(self, key: Hashable) -> list[str]:
        base = self.store.key("budget", self.name, "{" + ("_" if key is None else str(key)) + "}")
        return [base, base + ":reservations"]

    async def reserve(self, call: Call, key: Hashable, tokens: int, dollars: float) -> str | Refusal:
        """Hold the estimate (a reservation id) or say which cap refused it; raises StoreUnavailableError."""
        ttl = self.options.reservation_ttl
        if call.deadline is not None:  # a call cannot outlive its deadline: its reservation need not either
            ttl = min(ttl, max(0.0, call.deadline - call.clock.now()) + 1.0)
        args = [*self.config, tokens, dollars, ttl]
        reply = await self.link.run(call, RESERVE, self.keys(key), args, operation="reserve a call's estimate")
        snapshot = self._read(call, key, reply)
        if _text(reply[0]) == "ok":
            return _text(reply[1])
        unit: Unit = "tokens" if _text(reply[1]) == "tokens" else "dollars"
        usage = snapshot.tokens if unit == "tokens" else snapshot.dollars
        assert usage is not None
        return Refusal(unit, usage.limit, usage.spent, usage.reserved, snapshot.resets_in)

    async def commit(
        self, call: Call, key: Hashable, reservation: str, tokens: int, dollars: float
    ) -> tuple[tuple[int, int], tuple[int, int], BudgetSnapshot]:
        """Swap the reservation for the usage: the alert thresholds crossed (tokens, dollars: from, to) and the
        state after; raises StoreUnavailableError."""
        args = [*self.config, reservation, tokens, dollars, *self.options.alert_at]
        reply = await self.link.run(call, COMMIT, self.keys(key), args, operation="commit a call's spending")
        snapshot = self._read(call, key, reply)
        return (int(reply[0]), int(reply[1])), (int(reply[2]), int(reply[3])), snapshot

    async def reset(self, key: Hashable) -> None:
        """Forget what was spent for ``key`` in every process (reservations in flight stay)."""
        await self.store.run(RESET, self.keys(key), self.config, operation="reset a budget")
        self.mirror.pop(key, None)

    def _read(self, call: Call, key: Hashable, reply: list[Any]) -> BudgetSnapshot:
        spent_t, spent_d, held_t, held_d = (float(_text(v)) for v in reply[4:8])
        resets = _text(reply[9])
        resets_in = float(resets) if resets else None
        options = self.options
        tokens = None if options.tokens is None else _usage("tokens", options.tokens, spent_t, held_t)
        dollars = None if options.dollars is None else _usage("dollars", options.dollars, spent_d, held_d)
        resets_at = None if resets_in is None else call.clock.now() + resets_in
        snapshot = BudgetSnapshot(key, tokens, dollars, int(reply[8]), resets_at, resets_in)
        mirror = self.mirror
        mirror.pop(key, None)
        if len(mirror) >= self.max_keys:
            del mirror[next(iter(mirror))]
        mirror[key] = snapshot
        return snapshot


async def call_shared(layer: Budget, shared: SharedBudgets, call: Call, next: Handler) -> Any:
    """A call through a budget on a store: one round trip to reserve its estimate, one to commit its usage. While
    the store is unreachable: the in-process accounts (``local``) or :class:`BudgetExceededError` with the store's
    ``retry_interval`` (``reject``)."""
    options = layer.options
    key = None if options.key is None else options.key(call)
    prompt, completion = layer.estimate(call)
    tokens = prompt + completion
    dollars = layer.estimate_dollars(prompt, completion) if options.dollars is not None else 0.0
    layer.check_size(key, tokens, dollars)
    try:
        held = await shared.reserve(call, key, tokens, dollars)
    except StoreUnavailableError:
        if shared.link.mode == "local":
            return await layer.call_local(call, next)
        last = shared.mirror.get(key)
        unit: Unit = "tokens" if options.tokens is not None else "dollars"
        usage = None if last is None else last.tokens if unit == "tokens" else last.dollars
        limit = float((options.tokens if unit == "tokens" else options.dollars) or 0)
        spent, reserved = (0.0, 0.0) if usage is None else (usage.spent, usage.reserved)
        amount = tokens if unit == "tokens" else dollars
        layer.refuse(call, key, unit, limit, spent, reserved, amount, shared.store.retry_interval)
    if isinstance(held, Refusal):
        amount = tokens if held.unit == "tokens" else dollars
        layer.refuse(call, key, held.unit, held.limit, held.spent, held.reserved, amount, held.retry_after)
    with usage_scope() as scope:
        try:
            result = await next(call)
        except BaseException:
            await _settle(layer, shared, call, key, held, tokens, dollars, scope)
            raise
        await _settle(layer, shared, call, key, held, tokens, dollars, scope)
        attach_usage(result, scope)
    return result


async def _settle(
    layer: Budget,
    shared: SharedBudgets,
    call: Call,
    key: Hashable,
    reservation: str,
    tokens: int,
    dollars: float,
    scope: UsageScope,
) -> None:
    """Commit the usage; a store failure here loses this call's spending from the shared count (its reservation
    expires), never the call."""
    used, cost = layer.measure(scope, dollars)
    layer.spent(call, key, tokens, dollars, used, cost)
    try:
        (t0, t1), (d0, d1), snapshot = await shared.commit(call, key, reservation, used, cost)
    except StoreUnavailableError:
        return
    thresholds = shared.options.alert_at
    for usage, first, last in ((snapshot.tokens, t0, t1), (snapshot.dollars, d0, d1)):
        if usage is not None:
            for threshold in thresholds[first:last]:
                layer.alert(call, key, usage.unit, threshold, usage.spent, usage.limit, snapshot.resets_at)


def _usage(unit: Unit, limit: float, spent: float, reserved: float) -> BudgetUsage:
    return BudgetUsage(unit, limit, spent, reserved, max(0.0, limit - spent - reserved))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
