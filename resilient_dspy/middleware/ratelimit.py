"""RateLimiter: requests and LLM tokens per period, several limits at once, exact by default and FIFO-fair.

Exact mode keeps a sliding log of admissions per limit, so no window of length ``per`` ever holds more than
``amount``; a burst is opt-in (``Limit(burst=...)``), and then that limit is a token bucket (GCRA). A call is
admitted only when every limit has room for its weight (1 for requests, the token estimate for tokens). Calls
queue in strict FIFO order per key: only the head may be admitted, so a large request is never overtaken. The
head sleeps on the injected clock exactly until its admission time, and is woken early when a reconciliation
refunds tokens. Token cost is estimated before the call and reconciled with the usage DSPy measured after it.
No background task is involved.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationError, field_validator

from resilient_dspy.binding.estimate import DEFAULT_MAX_TOKENS, estimate_chars, lm_max_tokens, program_parts
from resilient_dspy.binding.settings import setting
from resilient_dspy.binding.usage import UsageScope, attach_usage, usage_scope
from resilient_dspy.core.health import LayerHealth, key_name
from resilient_dspy.core.options import Options, build_options, problems_of
from resilient_dspy.core.pipeline import innermost_program
from resilient_dspy.errors import ConfigurationError, RateLimitedError, RequestTooLargeError
from resilient_dspy.events import Event
from resilient_dspy.partition import Hold, KeyFunction, PartitionOptions, Partitions

if TYPE_CHECKING:
    from resilient_dspy.core.call import Call, Handler
    from resilient_dspy.core.clock import Clock
    from resilient_dspy.core.pipeline import Pipeline

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "Limit",
    "LimitUsage",
    "RateLimitReconciled",
    "RateLimitRejected",
    "RateLimitWaited",
    "RateLimiter",
    "RateLimiterOptions",
    "RateLimiterSnapshot",
]

"""Completion tokens assumed by the default estimate when the LM sets no ``max_tokens``."""

Unit = Literal["requests", "tokens"]

_SLACK = 1e-9
"""Admission times within 1 ns count as reached: asyncio fires a timer up to its clock resolution early, and
float sums like ``t + per`` carry rounding dust; without this slack a head could wake, find itself a few ulps
early, and re-arm a timer that fires again at once without time moving."""


class Limit(Options):
    """``amount`` requests or tokens per ``per`` seconds; exact (sliding window) unless ``burst`` is given."""

    amount: int = Field(gt=0, description="Requests or tokens admitted per period.")
    per: float = Field(gt=0, allow_inf_nan=False, description="The period, in seconds.")
    unit: Unit = Field(default="requests", description="What is counted: requests (weight 1) or tokens.")
    burst: int | None = Field(
        default=None, ge=1, description="Opt-in token bucket of this capacity, refilled at amount/per."
    )

    def __init__(self, **values: Any) -> None:
        """Validate like any options model, but fail with a :class:`ConfigurationError` naming ``Limit.<field>``."""
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise ConfigurationError(problems_of(error, "Limit")) from None

    @classmethod
    def requests(cls, amount: int, per: float, *, burst: int | None = None) -> Limit:
        """At most ``amount`` calls per ``per`` seconds."""
        return cls(amount=amount, per=per, unit="requests", burst=burst)

    @classmethod
    def tokens(cls, amount: int, per: float, *, burst: int | None = None) -> Limit:
        """At most ``amount`` LM tokens (prompt + completion) per ``per`` seconds."""
        return cls(amount=amount, per=per, unit="tokens", burst=burst)

    @property
    def capacity(self) -> int:
        """The largest weight one call may have: ``burst`` for a bucket, ``amount`` for a window."""
        return self.amount if self.burst is None else self.burst

    def __str__(self) -> str:
        burst = "" if self.burst is None else f" (burst {self.burst})"
        return f"{self.amount} {self.unit} per {self.per:g}s{burst}"


class RateLimiterOptions(PartitionOptions):
    """The limits and how long a call may wait for them; see docs/patterns/rate-limiter.md."""

    limits: tuple[Limit, ...] = Field(description="Every limit a call must fit, all at once.")
    max_wait: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="Seconds a call may wait; None = up to its deadline."
    )
    estimate_tokens: Callable[[Any], int] | None = Field(
        default=None, description="Token cost of a call before it runs; None = the default estimate."
    )
    name: str | None = Field(default=None, description="Label in events and describe().")

    @field_validator("limits")
    @classmethod
    def _some_limit(cls, limits: tuple[Limit, ...]) -> tuple[Limit, ...]:
        if not limits:
            raise ValueError(
                "give at least one limit: RateLimiter(requests=100, per=1.0) or RateLimiter(Limit.tokens(90_000, 60))"
            )
        return limits


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitWaited(Event):
    """Admitted after ``waited`` seconds in the queue; ``tokens`` is its estimate (None without a token limit)."""

    key: Hashable
    waited: float
    tokens: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitRejected(Event):
    """The call could not be admitted in time (``reason``: ``max_wait`` or ``deadline``); it did not run."""

    key: Hashable
    reason: str
    retry_after: float
    waited: float


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitReconciled(Event):
    """After the call: the token ``estimate`` charged up front, the ``actual`` usage measured, what is ``charged``."""

    key: Hashable
    estimate: int
    actual: int
    charged: int


@dataclass(frozen=True, slots=True)
class LimitUsage:
    """One limit's state: weight ``used`` in the current window (or bucket level) and ``available`` now."""

    limit: Limit
    used: float
    available: float


@dataclass(frozen=True, slots=True)
class RateLimiterSnapshot:
    """The state of one key (see :meth:`RateLimiter.snapshot`): calls ``queued`` and each limit's usage."""

    key: Hashable
    queued: int
    limits: tuple[LimitUsage, ...]


class _Entry:
    """One admission in a sliding log: when it leaves the window, and its weight (adjusted by reconciliation)."""

    __slots__ = ("expiry", "weight")

    def __init__(self, expiry: float, weight: int) -> None:
        self.expiry = expiry
        self.weight = weight


class _RequestWindow:
    """Exact requests limit: the sliding log holds only expiry times, as every admission weighs 1.

    Admit when fewer than ``amount`` admissions have ``expiry > now``; otherwise the wait ends when the
    ``len - amount + 1``-th oldest expires. Pruning and waking agree on the same float, as in :class:`_Window`.
    """

    __slots__ = ("amount", "limit", "log", "per", "tokens")

    def __init__(self, limit: Limit) -> None:
        self.limit = limit
        self.amount = limit.amount
        self.per = limit.per
        self.tokens = False
        self.log: deque[float] = deque()

    def prune(self, now: float) -> None:
        log = self.log
        horizon = now + _SLACK
        while log and log[0] <= horizon:
            log.popleft()

    def ready_at(self, weight: int, now: float) -> float:
        self.prune(now)
        log = self.log
        excess = len(log) + weight - self.amount
        if excess <= 0:
            return now
        return log[excess - 1] if excess <= len(log) else math.inf

    def estimate(self, weight: int, now: float) -> float:
        if weight <= self.amount:
            return self.ready_at(weight, now)
        return self.ready_at(self.amount, now) + self.per * ((weight - 1) // self.amount)

    def charge(self, weight: int, now: float) -> None:
        self.log.append(now + self.per)

    def try_admit(self, now: float) -> bool:
        """``ready_at(1, now) <= now`` then ``charge``, in one pass: the uncontended requests-only fast path."""
        log = self.log
        horizon = now + _SLACK
        while log and log[0] <= horizon:
            log.popleft()
        if len(log) < self.amount:
            log.append(now + self.per)
            return True
        return False

    def adjust(self, entry: _Entry | None, delta: int, now: float) -> None:
        """Requests are never reconciled."""

    def usage(self, now: float) -> tuple[float, float]:
        self.prune(now)
        used = len(self.log)
        return float(used), float(max(0, self.amount - used))

    def idle(self, now: float) -> bool:
        self.prune(now)
        return not self.log


class _Window:
    """Exact limit: a sliding log of admissions; admit when ``used in (now - per, now] + weight <= amount``.

    Entries store their expiry (``admitted + per``) and are pruned once ``expiry <= now`` (within ``_SLACK``), the
    same float the head sleeps until, so waking at the computed time always finds the room it was promised.
    """

    __slots__ = ("amount", "limit", "log", "per", "tokens", "used")

    def __init__(self, limit: Limit) -> None:
        self.limit = limit
        self.amount = limit.amount
        self.per = limit.per
        self.tokens = limit.unit == "tokens"
        self.log: deque[_Entry] = deque()
        self.used = 0

    def prune(self, now: float) -> None:
        log = self.log
        horizon = now + _SLACK
        while log and log[0].expiry <= horizon:
            self.used -= log.popleft().weight

    def ready_at(self, weight: int, now: float) -> float:
        """The earliest time at or after ``now`` when ``weight`` fits, if nothing else is charged meanwhile."""
        self.prune(now)
        excess = self.used + weight - self.amount
        if excess <= 0:
            return now
        for entry in self.log:
            excess -= entry.weight
            if excess <= 0:
                return entry.expiry
        return math.inf

    def estimate(self, weight: int, now: float) -> float:
        """Like :meth:`ready_at`, for a weight that may exceed the limit (a backlog): whole windows after it clears."""
        if weight <= self.amount:
            return self.ready_at(weight, now)
        return self.ready_at(self.amount, now) + self.per * ((weight - 1) // self.amount)

    def charge(self, weight: int, now: float) -> _Entry:
        entry = _Entry(now + self.per, weight)
        self.log.append(entry)
        self.used += weight
        return entry

    def adjust(self, entry: _Entry | None, delta: int, now: float) -> None:
        """Change an admission's weight, if it is still in the window (a refund or an excess)."""
        self.prune(now)
        if entry is not None and entry.expiry > now + _SLACK:
            entry.weight += delta
            self.used += delta

    def usage(self, now: float) -> tuple[float, float]:
        self.prune(now)
        return float(self.used), float(max(0, self.amount - self.used))

    def idle(self, now: float) -> bool:
        self.prune(now)
        return not self.log


class _Bucket:
    """Burst limit: a token bucket of capacity ``burst`` refilled at ``amount / per``, as a GCRA.

    ``tat`` is the theoretical arrival time: the bucket is full when ``tat <= now`` and holds
    ``(tat - now) / interval`` units of debt otherwise. Any interval of length L admits at most
    ``burst + amount * L / per``.
    """

    __slots__ = ("burst", "interval", "limit", "tat", "tokens")

    def __init__(self, limit: Limit) -> None:
        assert limit.burst is not None
        self.limit = limit
        self.burst = limit.burst
        self.interval = limit.per / limit.amount
        self.tokens = limit.unit == "tokens"
        self.tat = -math.inf

    def ready_at(self, weight: int, now: float) -> float:
        when = self.tat - (self.burst - weight) * self.interval
        return when if when > now + _SLACK else now

    def estimate(self, weight: int, now: float) -> float:
        when = max(self.tat, now) + (weight - self.burst) * self.interval
        return when if when > now + _SLACK else now

    def charge(self, weight: int, now: float) -> None:
        self.tat = (self.tat if self.tat > now else now) + weight * self.interval

    def adjust(self, entry: _Entry | None, delta: int, now: float) -> None:
        self.tat += delta * self.interval

    def usage(self, now: float) -> tuple[float, float]:
        used = max(0.0, self.tat - now) / self.interval
        return used, max(0.0, self.burst - used)

    def idle(self, now: float) -> bool:
        return self.tat <= now


_Meter = _RequestWindow | _Window | _Bucket


def _meter(limit: Limit) -> _Meter:
    if limit.burst is not None:
        return _Bucket(limit)
    return _Window(limit) if limit.unit == "tokens" else _RequestWindow(limit)


class _Waiter:
    """A queued call: its token weight and the future its predecessor (or a refund) sets to wake it."""

    __slots__ = ("future", "tokens")

    def __init__(self, tokens: int, future: asyncio.Future[None]) -> None:
        self.tokens = tokens
        self.future = future


class _Lane:
    """The state of one key: a meter per limit, the FIFO queue, and calls awaiting reconciliation."""

    __slots__ = ("in_flight", "key", "meters", "queue")

    def __init__(self, limits: tuple[Limit, ...], key: Hashable = None) -> None:
        self.key = key
        self.meters: tuple[_Meter, ...] = tuple(_meter(limit) for limit in limits)
        self.queue: deque[_Waiter] = deque()
        self.in_flight = 0

    def ready_at(self, tokens: int, now: float) -> float:
        ready = now
        for meter in self.meters:
            when = meter.ready_at(tokens if meter.tokens else 1, now)
            if when > ready:
                ready = when
        return ready

    def charge(self, tokens: int, now: float) -> None:
        for meter in self.meters:
            meter.charge(tokens if meter.tokens else 1, now)

    def charge_kept(self, tokens: int, now: float) -> list[_Entry | None]:
        """Charge every limit and keep the handles reconciliation needs."""
        return [meter.charge(tokens if meter.tokens else 1, now) for meter in self.meters]

    def adjust(self, handles: list[_Entry | None], delta: int, now: float) -> None:
        for meter, handle in zip(self.meters, handles, strict=True):
            if meter.tokens:
                meter.adjust(handle, delta, now)

    def estimate(self, waiter: _Waiter, now: float) -> float:
        """When ``waiter`` might be admitted: the backlog ahead of it plus itself, at each limit's full rate."""
        count = tokens = 0
        for queued in self.queue:
            count += 1
            tokens += queued.tokens
            if queued is waiter:
                break
        ready = now
        for meter in self.meters:
            when = meter.estimate(tokens if meter.tokens else count, now)
            if when > ready:
                ready = when
        return ready

    def nudge(self) -> None:
        """Wake the head so it recomputes its admission time (it became head, or capacity came back)."""
        if self.queue:
            future = self.queue[0].future
            if not future.done():
                future.set_result(None)

    def leave(self, waiter: _Waiter) -> None:
        """Take ``waiter`` out of the queue; when it was the head, the next one becomes head and is woken."""
        queue = self.queue
        if queue[0] is waiter:
            queue.popleft()
            self.nudge()
        else:
            queue.remove(waiter)

    def hold(self, now: float) -> Hold:
        """Queued or unreconciled calls are calls; admissions still in a window protect (a fresh lane would let a
        second burst through)."""
        if self.queue or self.in_flight:
            return Hold.CALLS
        return Hold.NOTHING if all(meter.idle(now) for meter in self.meters) else Hold.PROTECTION


class RateLimiter:
    """Admit calls within every limit (requests and tokens per period), FIFO per key, waiting up to ``max_wait``."""

    def __init__(
        self,
        *limits: Limit,
        requests: int | None = None,
        tokens: int | None = None,
        per: float = 1.0,
        max_wait: float | None = None,
        estimate_tokens: Callable[[Call], int] | None = None,
        key: KeyFunction | None = None,
        max_keys: int = 1024,
        idle_after: float = 600.0,
        name: str | None = None,
    ) -> None:
        problems: list[tuple[str, str]] = []
        shortcuts: list[Limit] = []
        shortcut: tuple[tuple[Unit, int | None], ...] = (("requests", requests), ("tokens", tokens))
        for unit, amount in shortcut:
            if amount is None:
                continue
            try:
                shortcuts.append(Limit(amount=amount, per=per, unit=unit))
            except ConfigurationError as error:
                for field, rule in error.problems:
                    problem = (f"RateLimiter.{unit}" if field == "Limit.amount" else f"RateLimiter.{field[6:]}", rule)
                    if problem not in problems:
                        problems.append(problem)
        try:
            self.options = build_options(
                RateLimiterOptions,
                "RateLimiter",
                {
                    "limits": (*limits, *shortcuts),
                    "max_wait": max_wait,
                    "estimate_tokens": estimate_tokens,
                    "key": key,
                    "max_keys": max_keys,
                    "idle_after": idle_after,
                    "name": name,
                },
            )
        except ConfigurationError as error:
            shortcut_failed = bool(problems) and not limits
            problems.extend(p for p in error.problems if not (shortcut_failed and p[0] == "RateLimiter.limits"))
        if problems:
            raise ConfigurationError(problems)

        options = self.options
        self.name = options.name or "RateLimiter"
        self._limits = options.limits
        self._token_limits = tuple(lim for lim in options.limits if lim.unit == "tokens")
        self._key_of = options.key
        self._single = _Lane(self._limits)
        only = self._single.meters
        self._sole = only[0] if len(only) == 1 and isinstance(only[0], _RequestWindow) else None
        self._partitions: Partitions[_Lane] = Partitions(
            self._new_lane, max_keys=options.max_keys, idle_after=options.idle_after
        )
        self._estimate: Callable[[Any], int] = options.estimate_tokens or self.default_estimate
        self._prompt_chars = 0
        self._pinned_max_tokens: int | None = None
        self._clock: Clock | None = None

    def _new_lane(self, key: Hashable) -> _Lane:
        return _Lane(self._limits, key)

    def on_build(self, pipeline: Pipeline) -> None:
        """Learn the program's instructions and pinned LMs once, for the default token estimate."""
        chars, lms = program_parts(innermost_program(pipeline.program))
        self._prompt_chars = max(self._prompt_chars, chars)
        pinned = [lm_max_tokens(lm) or DEFAULT_MAX_TOKENS for lm in lms]
        if pinned:
            self._pinned_max_tokens = max(self._pinned_max_tokens or 0, *pinned)

    def default_estimate(self, call: Call) -> int:
        """(characters of the inputs + the program's instructions and demos) / 4 + the LM's ``max_tokens``."""
        chars = self._prompt_chars
        for value in call.inputs.values():
            chars += len(value) if isinstance(value, str) else estimate_chars(value)
        completion = self._pinned_max_tokens or lm_max_tokens(setting("lm")) or DEFAULT_MAX_TOKENS
        return chars // 4 + completion

    async def __call__(self, call: Call, next: Handler) -> Any:
        clock = call.clock
        self._clock = clock
        now = clock.now()
        key_of = self._key_of
        if key_of is None:
            lane, key = self._single, None
            sole = self._sole
            if sole is not None and not lane.queue and sole.try_admit(now):
                return await next(call)
        else:
            key = key_of(call)
            lane = self._partitions.get(key, now)
        if self._token_limits:
            return await self._call_measured(call, next, lane, key, now)
        if lane.queue or lane.ready_at(0, now) > now:
            await self._queue(call, lane, key, None, now)
        else:
            lane.charge(0, now)
        return await next(call)

    async def _call_measured(self, call: Call, next: Handler, lane: _Lane, key: Hashable, now: float) -> Any:
        """The token path: estimate, admit, run inside a usage scope, then reconcile the charge with real usage."""
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
        if lane.queue or lane.ready_at(tokens, now) > now:
            handles = await self._queue(call, lane, key, tokens, now)
        else:
            handles = lane.charge_kept(tokens, now)
        lane.in_flight += 1
        with usage_scope() as scope:
            try:
                result = await next(call)
            except BaseException:
                self._settle(call, lane, key, handles, tokens, scope, failed=True)
                raise
            if self._settle(call, lane, key, handles, tokens, scope, failed=False):
                attach_usage(result, scope)
        return result

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
    ) -> bool:
        """Reconcile the estimate with measured usage (True if any was measured); a call that measured nothing keeps
        its estimate, and a failed one at least its estimate."""
        lane.in_flight -= 1
        usage = scope.by_model()
        if not usage:
            return False
        actual = scope.total_tokens(usage)
        charged = max(actual, estimate) if failed else actual
        delta = charged - estimate
        if delta:
            lane.adjust(handles, delta, call.clock.now())
            if delta < 0:
                lane.nudge()
        if call.listening:
            call.emit(
                RateLimitReconciled(
                    pipeline=call.runtime.name,
                    layer=self.name,
                    time=call.clock.now(),
                    key=key,
                    estimate=estimate,
                    actual=actual,
                    charged=charged,
                )
            )
        return True

    async def _queue(
        self, call: Call, lane: _Lane, key: Hashable, tokens: int | None, arrived: float
    ) -> list[_Entry | None]:
        """Wait in FIFO order, then charge every limit; raise :class:`RateLimitedError` if it cannot be in time."""
        options = self.options
        clock = call.clock
        weight = tokens or 0
        deadline = call.deadline
        give_up, reason = deadline, "deadline"
        if options.max_wait is not None and (deadline is None or arrived + options.max_wait < deadline):
            give_up, reason = arrived + options.max_wait, "max_wait"
        loop = asyncio.get_running_loop()
        waiter = _Waiter(weight, loop.create_future())
        queue = lane.queue
        queue.append(waiter)
        try:
            now = arrived
            if give_up is not None and give_up <= arrived:
                raise self._reject(call, key, reason, lane.estimate(waiter, now) - now, 0.0)
            if queue[0] is not waiter:
                if give_up is None:
                    await waiter.future
                else:
                    scope = clock.deadline(give_up)
                    try:
                        async with scope:
                            await waiter.future
                    except TimeoutError:
                        if not scope.expired():
                            raise
                        if queue[0] is not waiter:
                            now = clock.now()
                            retry_after = lane.estimate(waiter, now) - now
                            raise self._reject(call, key, reason, retry_after, now - arrived) from None
            while True:
                now = clock.now()
                ready = lane.ready_at(weight, now)
                if ready <= now:
                    break
                if give_up is not None and ready > give_up:
                    raise self._reject(call, key, reason, ready - now, now - arrived)
                waiter.future = wake = loop.create_future()
                scope = clock.deadline(ready)
                try:
                    async with scope:
                        await wake
                except TimeoutError:
                    if not scope.expired():
                        raise
            if tokens is None:
                lane.charge(0, now)
                handles: list[_Entry | None] = []
            else:
                handles = lane.charge_kept(tokens, now)
        finally:
            lane.leave(waiter)
        if call.listening:
            call.emit(
                RateLimitWaited(
                    pipeline=call.runtime.name,
                    layer=self.name,
                    time=now,
                    key=key,
                    waited=now - arrived,
                    tokens=tokens,
                )
            )
        return handles

    def _reject(self, call: Call, key: Hashable, reason: str, retry_after: float, waited: float) -> RateLimitedError:
        retry_after = max(0.0, retry_after)
        if call.listening:
            call.emit(
                RateLimitRejected(
                    pipeline=call.runtime.name,
                    layer=self.name,
                    time=call.clock.now(),
                    key=key,
                    reason=reason,
                    retry_after=retry_after,
                    waited=waited,
                )
            )
        why = f"max_wait={self.options.max_wait:g}s" if reason == "max_wait" else "the call's deadline"
        where = "" if key is None else f"[{key!r}]"
        return RateLimitedError(f"{self.name}{where}: cannot admit the call within {why}", retry_after=retry_after)

    def snapshot(self, key: Hashable = None) -> RateLimiterSnapshot:
        """Usage of each limit in its current window, and the queue length, for ``key`` (call it inside the loop)."""
        lane = self._single if self._key_of is None else self._partitions.peek(key)
        if lane is None:
            usages = tuple(LimitUsage(lim, 0.0, float(lim.capacity)) for lim in self._limits)
            return RateLimiterSnapshot(key, 0, usages)
        now = self._clock.now() if self._clock is not None else 0.0
        usages = tuple(LimitUsage(meter.limit, *meter.usage(now)) for meter in lane.meters)
        return RateLimiterSnapshot(key, len(lane.queue), usages)

    def health(self) -> LayerHealth:
        """Degraded while calls queue for admission; the figures are each limit's use of its current window."""
        lanes = [None] if self._key_of is None else [key for key, _ in self._partitions.items()]
        details: dict[str, Any] = {}
        queued = 0
        for key in lanes:
            snap = self.snapshot(key)
            queued += snap.queued
            details[key_name(key)] = {
                "queued": snap.queued,
                "limits": [
                    {"unit": u.limit.unit, "per": u.limit.per, "used": u.used, "available": u.available}
                    for u in snap.limits
                ],
            }
        return LayerHealth(self.name, "degraded" if queued else "ok", {"lanes": details})

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {"layer": "RateLimiter", "options": self.options.model_dump()}
        if self.options.name:
            described["name"] = self.options.name
        return described
