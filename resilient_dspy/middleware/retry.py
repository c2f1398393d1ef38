"""Retry: run the layers below again on a transient failure, with backoff, jitter and a retry budget.

Decisions, in order, after an attempt fails: cancellation and inner rejections are never retried; the
predicate (default :func:`~resilient_dspy.errors.classify`) must say retryable; attempts must remain; the
delay (backoff, then jitter, then at least the server's Retry-After, capped) must end before the call's
deadline; the retry budget must allow it. ``AdapterParseError`` is retried with DSPy's cache bypassed,
because DSPy caches the malformed answer before parsing fails. A streamed call is never run again once a chunk
reached the consumer (:mod:`resilient_dspy.core.stream`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import Field

from resilient_dspy.core.call import Call, Handler
from resilient_dspy.core.options import Options, build_options
from resilient_dspy.core.pipeline import Pipeline
from resilient_dspy.core.stream import stream_started
from resilient_dspy.errors import ErrorInfo, ErrorKind, RetriesExhaustedError, classify
from resilient_dspy.events import Event

__all__ = [
    "Retry",
    "RetryBudget",
    "RetryGaveUp",
    "RetryOptions",
    "RetryScheduled",
    "compute_delay",
]

Backoff = Literal["constant", "linear", "exponential"]
Jitter = Literal["none", "full", "equal", "decorrelated"]
ErrorPredicate = Callable[[Exception], bool]


class RetryBudget(Options):
    """At every retry at ``t``, the retries of ``(t - window, t]`` (that one included) never exceed ``ratio`` * the
    calls that reached the Retry in that span + ``min_per_second`` * ``window``: a true sliding bound."""

    ratio: float = Field(default=0.2, ge=0, allow_inf_nan=False)
    min_per_second: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    window: float = Field(default=10.0, gt=0, allow_inf_nan=False)


_DEFAULT_BUDGET = RetryBudget()
_REJECTED = ErrorKind.REJECTED  # a module global: reading an enum member off its class costs ~100 ns in 3.11


class RetryOptions(Options):
    max_attempts: int = Field(default=3, ge=1, description="Attempts in all, counting the first.")
    backoff: Backoff = "exponential"
    base_delay: float = Field(default=0.5, ge=0, allow_inf_nan=False)
    max_delay: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    jitter: Jitter = "full"
    retry_on: tuple[type[Exception], ...] | ErrorPredicate | None = Field(
        default=None, description="Exception types or a predicate; None = the default classification."
    )
    retry_on_result: Callable[[Any], bool] | None = None
    respect_retry_after: bool = True
    max_retry_after: float = Field(default=60.0, ge=0, allow_inf_nan=False)
    budget: RetryBudget | None = Field(default_factory=RetryBudget)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryScheduled(Event):
    """Attempt ``attempt`` failed; the next starts after ``delay`` seconds."""

    attempt: int
    delay: float
    reason: str
    error: BaseException | None


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryGaveUp(Event):
    """Retry stopped with the last attempt failed; ``reason`` is max_attempts, deadline, budget or circuit_open."""

    attempts: int
    reason: str
    error: BaseException | None


def compute_delay(
    options: RetryOptions, retry: int, previous: float, uniform: Callable[[float, float], float]
) -> float:
    """Delay before retry number ``retry`` (1 = the first retry); ``previous`` feeds decorrelated jitter."""
    base, cap = options.base_delay, options.max_delay
    if options.jitter == "decorrelated":
        return min(cap, uniform(base, max(base, previous * 3)))
    if options.backoff == "constant":
        delay = base
    elif options.backoff == "linear":
        delay = base * retry
    else:
        delay = base * 2.0 ** min(retry - 1, 1000)
    delay = min(delay, cap)
    if options.jitter == "full":
        return uniform(0.0, delay)
    if options.jitter == "equal":
        return delay / 2 + uniform(0.0, delay / 2)
    return delay


class _BudgetWindow:
    """The retry budget as a true sliding bound: at each retry at ``t``, retries in ``(t - window, t]`` (exact
    timestamps) must stay within ``ratio`` * calls in that span + ``min_per_second`` * ``window``.

    Calls are counted per slot of ``window / slots`` seconds, and only slots wholly inside the span count: the call
    count is never over-stated (at most one slot's calls are left out), so the bound holds exactly while memory stays
    ``slots`` entries whatever the traffic. A call still in flight when its slot leaves the span keeps counting until
    it ends (``lingering``): a burst queued below the Retry (in a Bulkhead) is live traffic, not forgotten after
    ``window`` seconds. The retry timestamps are bounded by the budget itself. Each operation is O(1) amortised.
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


class Retry:
    """Retry the layers below on transient failures (see the module docstring for the rules)."""

    placement: ClassVar[str] = "retry"  # what the pipeline's layer-order rules read (core/placement.py)

    def __init__(
        self,
        max_attempts: int = 3,
        *,
        backoff: Backoff = "exponential",
        base_delay: float = 0.5,
        max_delay: float = 30.0,
        jitter: Jitter = "full",
        retry_on: tuple[type[Exception], ...] | list[type[Exception]] | type[Exception] | ErrorPredicate | None = None,
        retry_on_result: Callable[[Any], bool] | None = None,
        respect_retry_after: bool = True,
        max_retry_after: float = 60.0,
        budget: RetryBudget | None = _DEFAULT_BUDGET,
    ) -> None:
        if isinstance(retry_on, type):
            retry_on = (retry_on,)
        self.options = build_options(
            RetryOptions,
            "Retry",
            {
                "max_attempts": max_attempts,
                "backoff": backoff,
                "base_delay": base_delay,
                "max_delay": max_delay,
                "jitter": jitter,
                "retry_on": retry_on,
                "retry_on_result": retry_on_result,
                "respect_retry_after": respect_retry_after,
                "max_retry_after": max_retry_after,
                "budget": budget,
            },
        )
        self._budget = _BudgetWindow(self.options.budget) if self.options.budget is not None else None
        options = self.options
        self._fixed_delay: float | None = None
        if options.jitter == "none" and (options.backoff == "constant" or options.base_delay == 0):
            # compute_delay's answer for every retry, and it draws no randomness: skip the call
            self._fixed_delay = float(min(options.base_delay, options.max_delay))

    def on_build(self, pipeline: Pipeline) -> None:
        pipeline.target.watch_dspy_retries()

    def _retryable(self, error: Exception, kind: ErrorKind, default: bool) -> bool:
        if kind is ErrorKind.REJECTED:
            return False
        retry_on = self.options.retry_on
        if retry_on is None:
            return default
        if isinstance(retry_on, tuple):
            return isinstance(error, retry_on)
        return bool(retry_on(error))

    async def __call__(self, call: Call, next: Handler) -> Any:
        options = self.options
        clock = call.clock
        budget = self._budget
        slot = budget.record_call(clock.now()) if budget is not None else None
        try:
            previous = options.base_delay
            attempt_call = call
            attempt = 1
            record = call.record
            while True:
                error: Exception | None = None
                info: ErrorInfo | None = None
                record.blocked_until = None
                try:
                    result = await next(attempt_call)
                except Exception as caught:
                    if stream_started():  # a chunk reached the consumer: another attempt would repeat it
                        raise
                    info = classify(caught)
                    if not (
                        info.retryable and info.kind is not _REJECTED
                        if options.retry_on is None
                        else self._retryable(caught, info.kind, info.retryable)
                    ):
                        raise
                    error = caught
                else:
                    if options.retry_on_result is None or not options.retry_on_result(result) or stream_started():
                        return result

                stop = None
                if attempt >= options.max_attempts:
                    stop = "max_attempts"
                else:
                    fixed = self._fixed_delay
                    delay = fixed if fixed is not None else compute_delay(options, attempt, previous, call.rng.uniform)
                    previous = delay
                    if info is not None and info.retry_after is not None and options.respect_retry_after:
                        delay = max(delay, min(info.retry_after, options.max_retry_after))
                    blocked = record.blocked_until
                    if blocked is not None:  # the failure opened a circuit below: an earlier attempt is refused anyway
                        delay = max(delay, blocked - clock.now())
                    if call.deadline is not None and delay >= call.deadline - clock.now():
                        stop = "deadline"
                    elif blocked is not None and delay > options.max_retry_after:
                        stop = "circuit_open"
                    elif budget is not None and not budget.try_spend(clock.now(), error):
                        stop = "budget"
                if stop is not None:
                    if call.runtime.listeners:
                        call.emit(
                            RetryGaveUp(
                                pipeline=call.runtime.name,
                                layer="Retry",
                                time=clock.now(),
                                attempts=attempt,
                                reason=stop,
                                error=error,
                            )
                        )
                    if error is None:
                        return result
                    raise RetriesExhaustedError(attempt, error, reason=stop)

                if call.runtime.listeners:  # call.listening, without the property call
                    call.emit(
                        RetryScheduled(
                            pipeline=call.runtime.name,
                            layer="Retry",
                            time=clock.now(),
                            attempt=attempt,
                            delay=delay,
                            reason=type(error).__name__ if error is not None else "result rejected",
                            error=error,
                        )
                    )
                call.record.retries += 1
                await clock.sleep(delay)
                attempt += 1
                bypass = attempt_call.bypass_cache or (info is not None and info.needs_fresh_response)
                attempt_call = call.for_attempt(attempt, bypass)
        finally:
            if budget is not None and slot is not None:
                budget.call_ended(slot)

    def describe(self) -> dict[str, Any]:
        return {"layer": "Retry", "options": self.options.model_dump()}
