"""The retry budget of a :class:`~resilient_dspy.middleware.retry.Retry`: a true sliding bound on its retries.

At every retry at ``t``, the retries of ``(t - window, t]`` (that one included) never exceed ``ratio`` * the calls
that reached the Retry in that span + ``min_per_second`` * ``window``. Calls are counted once each, when they enter
the Retry, and a call still in flight keeps counting after its entry has left the span (a burst queued below is live
traffic). One failure shared by several calls (a Cache's single-flight followers get their leader's error object)
is paid for once. The budget belongs to one Retry instance and is shared by every call through it. See
docs/patterns/retry.md ("The retry budget").
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import Field

from resilient_dspy.core.options import Options

if TYPE_CHECKING:
    from resilient_dspy.core.call import Call
    from resilient_dspy.store.link import StoreLink

__all__ = ["RetryBudget", "RetrySnapshot", "SharedBudgetWindow"]


class RetryBudget(Options):
    """At every retry at ``t``, the retries of ``(t - window, t]`` (that one included) never exceed ``ratio`` * the
    calls that reached the Retry in that span + ``min_per_second`` * ``window``: a true sliding bound."""

    ratio: float = Field(default=0.2, ge=0, allow_inf_nan=False, description="Retries allowed per call seen.")
    min_per_second: float = Field(default=1.0, ge=0, allow_inf_nan=False, description="A floor for quiet times.")
    window: float = Field(default=10.0, gt=0, allow_inf_nan=False, description="The sliding window, in seconds.")


@dataclass(frozen=True, slots=True)
class RetrySnapshot:
    """A Retry's budget at ``time`` (pipeline clock): the ``calls`` it counts in the window, the ``retries`` spent
    there, and the retries ``allowed`` there (``ratio * calls + min_per_second * window``)."""

    time: float
    window: float
    calls: int
    retries: int
    allowed: float

    @property
    def exhausted(self) -> bool:
        """True when a retry now (of a failure not yet paid for) would be refused with ``reason="budget"``."""
        return self.retries + 1 > self.allowed


class BudgetWindow:
    """The budget's state: calls counted per slot of ``window / slots`` seconds, retries as exact timestamps.

    Only slots wholly inside the span count, so the call count is never over-stated (at most one slot's calls are
    left out): the bound holds exactly while memory stays ``slots`` entries whatever the traffic. A call still in
    flight when its slot leaves the span keeps counting until it ends (``lingering``). The retry timestamps are
    bounded by the budget itself. Each operation is O(1) amortised.
    """

    __slots__ = ("calls", "charged", "floor", "lingering", "ratio", "retries", "total", "width", "window")

    def __init__(self, budget: RetryBudget, slots: int = 100) -> None:
        self.ratio = budget.ratio
        self.window = budget.window
        self.floor = budget.min_per_second * budget.window
        self.width = budget.window / slots
        self.calls: deque[list[int]] = deque()  # [slot number, calls recorded in it, of them in flight], oldest first
        self.total = 0  # calls in ``calls``
        self.lingering = 0  # calls in flight whose slot has left the span
        self.retries: deque[tuple[float, BaseException | None]] = deque()  # (time, failure) spent, oldest first
        self.charged: dict[int, int] = {}  # id of a failure in ``retries`` -> its entries (kept alive by the deque)

    def record_call(self, now: float) -> list[int]:
        """Count a call that reached the Retry at ``now`` (times are non-decreasing: they are read from the clock);
        its slot, for :meth:`call_ended`."""
        stamp = int(now // self.width)
        calls = self.calls
        if calls and calls[-1][0] >= stamp:
            slot = calls[-1]
            slot[1] += 1
            slot[2] += 1
        else:
            slot = [stamp, 1, 1]
            calls.append(slot)
            self._expire_calls(now)
        self.total += 1
        return slot

    def call_ended(self, slot: list[int]) -> None:
        """The call counted in ``slot`` ended: it no longer lingers once its slot has left the span."""
        if slot[1] < 0:  # the slot left the span: the call was lingering
            self.lingering -= 1
        else:
            slot[2] -= 1

    def _expire_calls(self, now: float) -> None:
        """Drop the slots that start at or before ``now - window``: not wholly inside the span any more (their calls
        still in flight linger)."""
        calls = self.calls
        opened = now - self.window
        width = self.width
        while calls and calls[0][0] * width <= opened:
            slot = calls.popleft()
            self.total -= slot[1]
            self.lingering += slot[2]
            slot[1] = -1

    def try_spend(self, now: float, failure: BaseException | None = None) -> bool:
        """Spend one retry at ``now`` if the budget of ``(now - window, now]`` has room for it. A retry of a
        ``failure`` already paid for in the window (one error object shared by a Cache's single-flight followers)
        is allowed at no cost: one shared failure counts once."""
        retries = self.retries
        charged = self.charged
        opened = now - self.window
        while retries and retries[0][0] <= opened:
            _, old = retries.popleft()
            if old is not None:
                left = charged[id(old)] - 1
                if left:
                    charged[id(old)] = left
                else:
                    del charged[id(old)]
        if failure is not None and id(failure) in charged:
            return True
        self._expire_calls(now)
        if len(retries) + 1 > self.ratio * (self.total + self.lingering) + self.floor:
            return False
        retries.append((now, failure))
        if failure is not None:
            charged[id(failure)] = charged.get(id(failure), 0) + 1
        return True

    def latest(self) -> float:
        """The latest time the window has seen (a call's slot or a retry), for a snapshot taken with no clock."""
        seen = [self.calls[-1][0] * self.width] if self.calls else []
        if self.retries:
            seen.append(self.retries[-1][0])
        return max(seen, default=0.0)

    def snapshot(self, now: float) -> RetrySnapshot:
        """What :meth:`try_spend` would count at ``now``, read without changing anything."""
        opened = now - self.window
        width = self.width
        calls = self.lingering
        for stamp, recorded, in_flight in self.calls:
            calls += recorded if stamp * width > opened else in_flight
        retries = sum(1 for at, _ in self.retries if at > opened)
        return RetrySnapshot(now, self.window, calls, retries, self.ratio * calls + self.floor)


_SPEND = """
local H, Z = KEYS[1], KEYS[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local window, width, ratio, floor = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
for i = 6, #ARGV, 2 do
  redis.call('HINCRBY', H, math.floor((now - tonumber(ARGV[i])) / width), tonumber(ARGV[i + 1]))
end
local opened = now - window
local calls = 0
local all = redis.call('HGETALL', H)
for i = 1, #all, 2 do
  local stamp = tonumber(all[i])
  if stamp then
    if stamp * width > opened then calls = calls + tonumber(all[i + 1]) else redis.call('HDEL', H, all[i]) end
  end
end
redis.call('ZREMRANGEBYSCORE', Z, '-inf', opened)
local retries = redis.call('ZCARD', Z)
local granted = 0
if ARGV[5] == '1' and retries + 1 <= ratio * calls + floor then
  granted = 1
  retries = retries + 1
  redis.call('ZADD', Z, now, redis.call('HINCRBY', H, 'seq', 1))
end
local ttl = math.ceil(window * 2000)
redis.call('PEXPIRE', H, ttl)
redis.call('PEXPIRE', Z, ttl)
return {granted, calls, retries}
"""


class SharedBudgetWindow:
    """The retry budget of one Retry ``name`` across processes, on a store: the same sliding bound, with the calls
    and retries of every process (see docs/patterns/retry.md, "Across processes").

    Each retry is one round trip (one Lua script on the server's clock) that also adds the calls counted here since
    the last one; calls alone are sent at most every ``window / 10`` seconds, so a call costs no round trip of its
    own. Calls not sent yet (at most one such interval per process) are not counted anywhere else, which can only
    refuse a retry a little sooner. A shared failure paid once (single-flight followers) is not recognised across
    the store: each follower's retry counts.
    """

    __slots__ = ("config", "flush_every", "flushed_at", "keys", "link", "pending", "seen", "width")

    def __init__(self, budget: RetryBudget, link: StoreLink, name: str, slots: int = 100) -> None:
        self.link = link
        self.width = budget.window / slots
        self.flush_every = budget.window / 10
        self.config: list[Any] = [budget.window, self.width, budget.ratio, budget.min_per_second * budget.window]
        base = link.store.key("retry", name, "{budget}")
        self.keys = [base, base + ":retries"]
        self.pending: dict[int, int] = {}  # local slot stamp -> calls not yet sent
        self.flushed_at = -math.inf
        self.seen: RetrySnapshot | None = None

    async def record_call(self, call: Call, now: float) -> None:
        """Count a call; send the calls counted so far when ``window / 10`` passed since the last send."""
        stamp = int(now // self.width)
        pending = self.pending
        pending[stamp] = pending.get(stamp, 0) + 1
        if now - self.flushed_at >= self.flush_every:
            await self.step(call, now, want=False)

    async def step(self, call: Call, now: float, *, want: bool) -> bool:
        """Send the pending calls and, with ``want``, ask for one retry; raises StoreUnavailableError."""
        args = [*self.config, "1" if want else "0"]
        for stamp, count in self.pending.items():
            args += [max(0.0, now - stamp * self.width), count]
        self.pending = {}
        self.flushed_at = now
        granted, calls, retries = await self.link.run(call, _SPEND, self.keys, args, operation="spend a retry")
        window = self.config[0]
        self.seen = RetrySnapshot(now, window, int(calls), int(retries), self.config[2] * int(calls) + self.config[3])
        return bool(granted)
