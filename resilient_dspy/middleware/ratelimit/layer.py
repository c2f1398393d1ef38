"""RateLimiter: requests and LLM tokens per period, several limits at once, exact by default and FIFO-fair.

Exact mode keeps a sliding log of admissions per limit, so no window of length ``per`` ever holds more than
``amount``; a burst is opt-in (``Limit(burst=...)``), and then that limit is a token bucket (GCRA). A call is
admitted only when every limit has room for its weight (1 for requests, the token estimate for tokens). Calls
queue in strict FIFO order per key: only the head may be admitted, so a large request is never overtaken. The
head sleeps on the injected clock exactly until its admission time, and is woken early when a reconciliation
refunds tokens. Token cost is estimated before the call and reconciled with the usage DSPy measured after it.
No background task is involved. With ``store=`` the limits are counted on a shared server instead, one atomic step
per admission and, counted from the answer, one at the answer (:mod:`resilient_dspy.middleware.ratelimit.shared`),
so every process shares them.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from resilient_dspy.binding.estimate import DEFAULT_MAX_TOKENS, ProgramEstimate
from resilient_dspy.binding.usage import UsageScope, attach_usage, usage_scope
from resilient_dspy.core.health import LayerHealth, Status, key_name
from resilient_dspy.core.layer import Layer
from resilient_dspy.core.options import Options, options_from
from resilient_dspy.core.pipeline import innermost_program
from resilient_dspy.errors import RateLimitedError, RequestTooLargeError
from resilient_dspy.middleware._shared.partitions import KeyedStates, KeyFunction
from resilient_dspy.middleware._shared.waiting import give_up_at, wait_until
from resilient_dspy.middleware.ratelimit.algorithms import _Entry, _RequestWindow
from resilient_dspy.middleware.ratelimit.events import (
    LimitUsage,
    RateLimiterSnapshot,
    RateLimitReconciled,
    RateLimitRejected,
    RateLimitWaited,
)
from resilient_dspy.middleware.ratelimit.options import Limit, RateLimiterOptions
from resilient_dspy.middleware.ratelimit.queue import _Lane, _Waiter
from resilient_dspy.middleware.ratelimit.shared import Admission, Settle, SharedMeter
from resilient_dspy.store.link import StoreLink

if TYPE_CHECKING:
    from resilient_dspy.core.call import Call, Handler
    from resilient_dspy.core.clock import Clock
    from resilient_dspy.core.pipeline import Pipeline
    from resilient_dspy.store.protocol import FailMode, StateStore

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "RateLimiter",
]


class RateLimiter(Layer):
    """Admit calls within every limit (requests and tokens per period), FIFO per key, waiting up to ``max_wait``."""

    placement: ClassVar[str] = "ratelimit"
    options_type: ClassVar[type[Options]] = RateLimiterOptions
    options: RateLimiterOptions

    def __init__(
        self,
        *limits: Limit,
        requests: int | None = None,
        tokens: int | None = None,
        per: float = 1.0,
        max_wait: float | None = None,
        counts_from: Literal["admission", "answer"] = "answer",
        estimate_tokens: Callable[[Call], int] | None = None,
        key: KeyFunction | None = None,
        max_keys: int = 1024,
        idle_after: float = 600.0,
        name: str | None = None,
        store: StateStore | None = None,
        on_store_failure: FailMode = "local",
    ) -> None:
        self.options = options_from(RateLimiterOptions, "RateLimiter", locals())
        options = self.options
        self._limits = options.limits
        self._token_limits = tuple(lim for lim in options.limits if lim.unit == "tokens")
        # held until the answer, in memory and on a store (where a lease bounds a crashed process's holds)
        self._holds = options.counts_from == "answer" and any(lim.burst is None for lim in options.limits)
        self._states: KeyedStates[_Lane] = KeyedStates(options, self._new_lane)
        self._single = single = self._states.single
        self._key_of, self._partitions = options.key, self._states.partitions  # the keyed hot path, inlined
        only = () if single is None else single.meters
        self._sole = only[0] if len(only) == 1 and isinstance(only[0], _RequestWindow) else None
        self._estimate: Callable[[Any], int] = options.estimate_tokens or self.default_estimate
        self._default = ProgramEstimate()
        self._clock: Clock | None = None
        self._shared: SharedMeter | None = None
        if options.store is not None:  # decided here: in memory, the fast path never sees it, the others test None
            self._shared = SharedMeter(self, StoreLink(self, options.store, options.on_store_failure), self._limits)
            self._sole = None

    def _new_lane(self, key: Hashable) -> _Lane:
        return _Lane(self._limits, key, self._holds)

    def on_build(self, pipeline: Pipeline) -> None:
        """Learn the program's instructions and pinned LMs once, for the default token estimate."""
        self._default.learn(innermost_program(pipeline.program))

    def default_estimate(self, call: Call) -> int:
        """(characters of the inputs + the program's instructions and demos) / 4 + the LM's ``max_tokens``."""
        prompt, completion = self._default.tokens(call)
        return prompt + completion

    async def __call__(self, call: Call, next: Handler) -> Any:
        clock = call.clock
        self._clock = clock
        now = clock.now()
        lane = self._single
        if lane is None:
            key_of = self._key_of
            assert key_of is not None
            key = key_of(call)
            lane = self._partitions.get(key, now)
        else:
            key = None
            sole = self._sole
            if sole is not None and not lane.queue and sole.try_admit(now):
                if not self._holds:
                    return await next(call)
                return await self._call_held(call, next, lane)
        if self._shared is not None:
            return await self._call_shared(call, next, lane, key, now)
        if self._token_limits:
            return await self._call_measured(call, next, lane, key, now)
        if lane.queue or lane.ready_at(0, now) > now:
            await self._queue(call, lane, key, None, now)
        else:
            lane.charge(0, now)
        if not self._holds:
            return await next(call)
        return await self._call_held(call, next, lane)

    async def _call_held(self, call: Call, next: Handler, lane: _Lane) -> Any:
        """Run an admitted call whose admission is held until its answer; refunded if it never reached the
        provider (``record.attempts`` unchanged: a cache hit, a coalesced follower, an inner rejection)."""
        record = call.record
        before = record.attempts
        try:
            return await next(call)
        finally:
            lane.release(None, call.clock.now(), record.attempts == before)

    async def _call_measured(self, call: Call, next: Handler, lane: _Lane, key: Hashable, now: float) -> Any:
        """The token path: estimate, admit, run inside a usage scope, then reconcile the charge with real usage."""
        tokens = self._checked_estimate(call)
        if lane.queue or lane.ready_at(tokens, now) > now:
            handles = await self._queue(call, lane, key, tokens, now)
        else:
            handles = lane.charge_kept(tokens, now)
        lane.in_flight += 1
        record = call.record
        before = record.attempts
        with usage_scope() as scope:
            try:
                result = await next(call)
            except BaseException:
                self._settle(call, lane, key, handles, tokens, scope, failed=True, reached=record.attempts != before)
                raise
            if self._settle(call, lane, key, handles, tokens, scope, failed=False, reached=record.attempts != before):
                attach_usage(result, scope)
        return result

    def _checked_estimate(self, call: Call) -> int:
        """The call's token estimate, checked: an int >= 0 that fits every token limit's capacity."""
        tokens = self._estimate(call)
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"{self.name}: estimate_tokens must return an int >= 0 (got {tokens!r})")
        for limit in self._token_limits:
            if tokens > limit.capacity:
                what = (
                    f"the limit of {limit.amount} tokens per {limit.per:g}s"
                    if limit.burst is None
                    else f"the burst of {limit.burst} tokens of the limit {limit}"
                )
                raise RequestTooLargeError(
                    "RateLimiter.tokens", f"request of {tokens} tokens exceeds {what}, so it can never be admitted"
                )
        return tokens

    def _settle(
        self,
        call: Call,
        lane: _Lane,
        key: Hashable,
        handles: list[_Entry | None],
        estimate: int,
        scope: UsageScope,
        *,
        failed: bool,
        reached: bool,
    ) -> bool:
        """Reconcile the estimate with measured usage on the local meters (True if any was measured); a call that
        measured nothing keeps its estimate, and a failed one at least its estimate. Counting from the answer, a
        call that never ``reached`` the provider is refunded whole."""
        now = call.clock.now()
        if self._holds and not reached:
            lane.in_flight -= 1
            lane.release(handles, now, refund=True)
            return False
        delta = self._reconcile(call, lane, key, estimate, scope, failed=failed)
        if delta is None:
            if self._holds:
                lane.release(handles, now)
            return False
        if delta:
            lane.adjust(handles, delta, now)
        if self._holds:
            lane.release(handles, now)
        elif delta < 0:
            lane.nudge()
        return True

    def _reconcile(
        self, call: Call, lane: _Lane, key: Hashable, estimate: int, scope: UsageScope, *, failed: bool
    ) -> int | None:
        """The change to the charge (None: no usage measured, the estimate stays); a failed call keeps at least
        its estimate."""
        lane.in_flight -= 1
        usage = scope.by_model()
        if not usage:
            return None
        actual = scope.total_tokens(usage)
        charged = max(actual, estimate) if failed else actual
        self.emit(call, RateLimitReconciled, key=key, estimate=estimate, actual=actual, charged=charged)
        return charged - estimate

    async def _call_shared(self, call: Call, next: Handler, lane: _Lane, key: Hashable, now: float) -> Any:
        """With a store: admitted by the server (one step); the answer is one more step when the admission is held
        (its window starts, or it is refunded) or its token estimate differs from the usage measured."""
        shared, holds = self._shared, self._holds
        assert shared is not None
        if not self._token_limits and not holds:
            await shared.admit(call, lane, key, None, now, False)
            return await next(call)
        tokens = self._checked_estimate(call) if self._token_limits else None
        admission = await shared.admit(call, lane, key, tokens, now, holds)
        lane.in_flight += 1
        record = call.record
        before = record.attempts
        with usage_scope() as scope:
            try:
                result = await next(call)
            except asyncio.CancelledError:
                lane.in_flight -= 1  # cancelled: it keeps its estimate; held, its window starts now (or refunded)
                if holds:
                    mode: Settle = "h" if record.attempts != before else "x"
                    await shared.settle(call, lane, key, admission, tokens or 0, 0, mode)
                raise
            except BaseException:
                await self._answer_shared(call, lane, key, admission, tokens, scope, record.attempts != before, True)
                raise
            if await self._answer_shared(call, lane, key, admission, tokens, scope, record.attempts != before, False):
                attach_usage(result, scope)
        return result

    async def _answer_shared(
        self,
        call: Call,
        lane: _Lane,
        key: Hashable,
        admission: Admission,
        tokens: int | None,
        scope: UsageScope,
        reached: bool,
        failed: bool,
    ) -> bool:
        """Reconcile and settle a call admitted on the store (True if usage was measured); the settle step runs even
        when a listener raises, so a held admission never stays held."""
        shared = self._shared
        assert shared is not None
        if self._holds and not reached:
            lane.in_flight -= 1
            await shared.settle(call, lane, key, admission, tokens or 0, 0, "x")
            return False
        delta: int | None = None
        try:
            if tokens is None:
                lane.in_flight -= 1
            else:
                delta = self._reconcile(call, lane, key, tokens, scope, failed=failed)
        finally:
            if self._holds or delta:
                await shared.settle(call, lane, key, admission, tokens or 0, delta or 0, "h" if self._holds else "a")
        if delta is not None and delta < 0:
            lane.nudge()
        return delta is not None

    async def _queue(
        self, call: Call, lane: _Lane, key: Hashable, tokens: int | None, arrived: float
    ) -> list[_Entry | None]:
        """Wait in FIFO order, then charge every limit; raise :class:`RateLimitedError` if it cannot be in time."""
        clock = call.clock
        weight = tokens or 0
        give_up = give_up_at(arrived, self.options.max_wait, call.deadline)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(weight, loop.create_future())
        queue = lane.queue
        queue.append(waiter)
        try:
            now = arrived
            if give_up.reached(arrived):
                raise self._reject(call, key, give_up.reason, lane.estimate(waiter, now) - now, 0.0)
            # Behind the head: wait to become head until the give-up time (made head as the time ran out: go on).
            became_head = queue[0] is waiter or await wait_until(clock, waiter.future, give_up.at)
            if not became_head and queue[0] is not waiter:
                now = clock.now()
                raise self._reject(call, key, give_up.reason, lane.estimate(waiter, now) - now, now - arrived)
            while True:  # the head: sleep until its exact admission time, woken early by a refund or an answer
                now = clock.now()
                ready = lane.ready_at(weight, now)
                if ready <= now:
                    break
                held = ready == math.inf  # the room is held by running calls: wait for an answer, up to giving up
                if give_up.before(ready) and not held:
                    raise self._reject(call, key, give_up.reason, ready - now, now - arrived)
                waiter.future = wake = loop.create_future()
                if not await wait_until(clock, wake, give_up.at if held else ready) and held:
                    now = clock.now()
                    raise self._reject(call, key, give_up.reason, lane.estimate(waiter, now) - now, now - arrived)
            if tokens is None:
                lane.charge(0, now)
                handles: list[_Entry | None] = []
            else:
                handles = lane.charge_kept(tokens, now)
        finally:
            lane.leave(waiter)
        try:
            self.emit(call, RateLimitWaited, key=key, waited=now - arrived, tokens=tokens)
        except BaseException:  # a listener stopping the call: a held admission must not stay held for ever
            if self._holds:
                lane.release(handles, clock.now())
            raise
        return handles

    def _reject(self, call: Call, key: Hashable, reason: str, retry_after: float, waited: float) -> RateLimitedError:
        retry_after = max(0.0, retry_after)
        self.emit(call, RateLimitRejected, key=key, reason=reason, retry_after=retry_after, waited=waited)
        why = f"max_wait={self.options.max_wait:g}s" if reason == "max_wait" else "the call's deadline"
        where = "" if key is None else f"[{key!r}]"
        return RateLimitedError(f"{self.name}{where}: cannot admit the call within {why}", retry_after=retry_after)

    def snapshot(self, key: Hashable = None) -> RateLimiterSnapshot:
        """Usage of each limit in its current window, and the queue length, for ``key`` (call it inside the loop)."""
        lane = self._states.peek(key)
        if lane is None:
            usages = tuple(LimitUsage(lim, 0.0, float(lim.capacity)) for lim in self._limits)
            return RateLimiterSnapshot(key, 0, usages)
        now = self._clock.now() if self._clock is not None else 0.0
        usages = tuple(LimitUsage(meter.limit, *meter.usage(now)) for meter in lane.meters)
        return RateLimiterSnapshot(key, len(lane.queue), usages)

    def snapshots(self) -> dict[Hashable, RateLimiterSnapshot]:
        """Every live key's snapshot (``{None: ...}`` when there is no ``key=``)."""
        return {key: self.snapshot(key) for key, _ in self._states.items()}

    def health(self) -> LayerHealth:
        """Degraded while calls queue for admission; the figures are each limit's use of its current window."""
        details: dict[str, Any] = {}
        queued = 0
        for key, snap in self.snapshots().items():
            queued += snap.queued
            details[key_name(key)] = {
                "queued": snap.queued,
                "limits": [
                    {"unit": u.limit.unit, "per": u.limit.per, "used": u.used, "available": u.available}
                    for u in snap.limits
                ],
            }
        shared = self._shared
        if shared is None:
            return LayerHealth(self.name, "degraded" if queued else "ok", {"lanes": details})
        link = shared.link
        status: Status = "degraded" if queued or link.degraded else "ok"
        if link.degraded and link.mode == "reject":
            status = "down"
        return LayerHealth(self.name, status, {"lanes": details, **link.health_details()})
