"""The RateLimiter's meter on a shared store: the queue head's admission loop, one atomic step per admission, and
the answer's step (:mod:`resilient_dspy.middleware.ratelimit.scripts` holds the Lua steps and what they keep).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections import deque
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, Literal

from resilient_dspy.errors import RateLimitedError
from resilient_dspy.middleware._shared.waiting import give_up_at, wait_until
from resilient_dspy.middleware.ratelimit.events import RateLimitRejected, RateLimitWaited
from resilient_dspy.middleware.ratelimit.queue import _Waiter
from resilient_dspy.middleware.ratelimit.scripts import (
    ADMIT,
    HOLD_CAP,
    HOLD_POLL_FLOOR,
    PENDING_MAX,
    RELEASE,
    SETTLE,
    TURN_LEASE,
)
from resilient_dspy.store.link import StoreLink
from resilient_dspy.store.protocol import StoreUnavailableError

if TYPE_CHECKING:
    from resilient_dspy.core.call import Call
    from resilient_dspy.middleware.ratelimit.algorithms import _Entry
    from resilient_dspy.middleware.ratelimit.layer import RateLimiter
    from resilient_dspy.middleware.ratelimit.options import Limit
    from resilient_dspy.middleware.ratelimit.queue import _Lane

__all__ = ["Admission", "Settle", "SharedMeter"]

Settle = Literal["a", "h", "x"]
"""How an answer settles its admission: ``a`` reconcile (counted from admission), ``h`` start a held admission's
window now, ``x`` refund a held admission (the call never reached the provider)."""


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
        windows = [limit.per for limit in limits if limit.burst is None]
        self.poll = max(HOLD_POLL_FLOOR, min(windows) / 10) if windows else HOLD_POLL_FLOOR
        self.pending: deque[tuple[list[str], list[Any]]] = deque(maxlen=PENDING_MAX)
        self._ids = itertools.count()
        self._process = uuid.uuid4().hex[:12]
        options = getattr(link.store, "options", None)
        self.retry_interval = float(getattr(options, "retry_interval", 1.0))

    def keys(self, key: Hashable) -> list[str]:
        """The key's hash, then one sorted set per limit (every limit gets one, so KEYS[1 + i] is limit i); the hash
        tag ``{...}`` puts them in one Redis Cluster slot, as one script must."""
        base = "{" + self.link.store.key("ratelimit", self.layer.name, "" if key is None else str(key)) + "}"
        return [base, *(f"{base}:{index}" for index in range(self.count))]

    async def admit(
        self, call: Call, lane: _Lane, key: Hashable, tokens: int | None, arrived: float, holds: bool
    ) -> Admission:
        """Queue in FIFO order; as the head, ask the server (or the local meters in an outage) until admitted;
        ``holds``: the admission is held until :meth:`settle` (its lease: the call's remaining deadline + per)."""
        layer, clock, weight = self.layer, call.clock, tokens or 0
        give_up = give_up_at(arrived, layer.options.max_wait, call.deadline)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(weight, loop.create_future())
        queue = lane.queue
        queue.append(waiter)
        keys = self.keys(key)
        ident = f"{self._process}:{next(self._ids)}"
        since, refused, holder, asking = "0", False, False, False
        try:
            if queue[0] is not waiter:
                refused = True
                became_head = not give_up.reached(arrived) and await wait_until(clock, waiter.future, give_up.at)
                if not became_head and queue[0] is not waiter:
                    raise self._reject(call, key, give_up.reason, lane.told, arrived)
            while True:
                if self.pending:
                    await self._replay(call)
                now = clock.now()
                hold = _hold(call.deadline, now) if holds else 0.0
                args = [*self.spec, weight, ident, now - arrived, since, TURN_LEASE, hold, self.poll]
                try:
                    asking = True
                    admitted, wait, since = await self.link.run(call, ADMIT, keys, args, operation="admit")
                    asking = False
                except StoreUnavailableError:
                    asking = False
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
            if asking and holds:  # stopped while the server decided: it may hold an admission for this call
                await self.settle(call, lane, key, Admission(ident, []), weight, 0, "x")
            if holder:
                await self._release(call, keys, ident)
            raise
        finally:
            lane.leave(waiter)
        if refused:
            try:
                layer.emit(call, RateLimitWaited, key=key, waited=clock.now() - arrived, tokens=tokens)
            except BaseException:  # a listener stopping the call: its held admission must not stay held
                if holds:
                    await self.settle(call, lane, key, admission, weight, 0, "x")
                raise
        return admission

    async def _release(self, call: Call, keys: list[str], ident: str) -> None:
        """Hand back the turn, best effort: its lease ends it anyway."""
        with contextlib.suppress(StoreUnavailableError):
            await self.link.run(call, RELEASE, keys[:1], [ident], operation="release")

    async def settle(
        self, call: Call, lane: _Lane, key: Hashable, admission: Admission, estimate: int, delta: int, mode: Settle
    ) -> None:
        """The answer, one step on the server (or on the local meters for a call admitted during an outage); a held
        answer the store fails to take is kept and replayed before this process's next step (else its lease ends
        it); a failed reconciliation is dropped: the estimate stays charged, which errs on the safe side."""
        if admission.ident is None:
            now = call.clock.now()
            if delta and mode != "x":
                lane.adjust(admission.handles, delta, now)
            if mode != "a":
                lane.release(admission.handles, now, refund=mode == "x")
            return
        keys, args = self.keys(key), [*self.spec, admission.ident, estimate, delta, mode]
        try:
            if self.pending:
                await self._replay(call)
            await self.link.run(call, SETTLE, keys, args, operation="settle")
        except StoreUnavailableError:
            if mode != "a":
                self.pending.append((keys, args))
        except asyncio.CancelledError:
            if mode != "a":
                self.pending.append((keys, args))
            raise
        if mode != "a":
            lane.nudge()

    async def _replay(self, call: Call) -> None:
        """Settle the held answers the store failed to take, oldest first, until one fails again (a replayed answer
        starts its window at the replay: later than the real answer, never earlier)."""
        pending = self.pending
        with contextlib.suppress(StoreUnavailableError):
            while pending:
                keys, args = pending[0]
                await self.link.run(call, SETTLE, keys, args, operation="settle")
                pending.popleft()

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


def _hold(deadline: float | None, now: float) -> float:
    """How long an admission is held at most: the call's remaining deadline, capped at :data:`HOLD_CAP`."""
    return HOLD_CAP if deadline is None else max(0.0, min(deadline - now, HOLD_CAP))
