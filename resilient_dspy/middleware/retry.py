"""Retry: run the layers below again on a transient failure, with backoff, jitter and a retry budget.

Decisions, in order, after an attempt fails: cancellation and inner rejections are never retried; the
predicate (default :func:`~resilient_dspy.errors.classify`) must say retryable; attempts must remain; the
delay (backoff, then jitter, then at least the server's Retry-After, capped) must end before the call's
deadline; the retry budget (retry_budget.py) must allow it. A retry after a parse error, an invalid output or a
truncated answer changes the request (``resample``, :mod:`resilient_dspy.binding.resample`): a fresh DSPy
``rollout_id`` (DSPy's cache misses: it holds the malformed answer, stored before parsing failed) and a temperature
raised by ``temperature_step`` per such retry up to ``max_temperature``, optionally the other adapter
(``switch_adapter``), because re-asking the same request at temperature 0 returns the same bad output; with
``resample=False`` it is the same request, uncached. A ``TruncatedOutputError`` (the answer stopped at
``max_tokens``) is retried only with ``max_tokens`` multiplied by ``max_tokens_factor``, up to ``max_tokens_cap``;
at the cap (or with ``max_tokens_cap=None``) it is raised as it is, since the same limit cuts the same way. A
streamed call is never run again once a chunk reached the consumer (:mod:`resilient_dspy.core.stream`). Retry state
is per call, except the budget, which one Retry shares among its calls: :meth:`Retry.snapshot` reads it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from resilient_dspy.binding.resample import RESAMPLE, Resample
from resilient_dspy.core.call import Call, Handler
from resilient_dspy.core.clock import Clock
from resilient_dspy.core.health import LayerHealth
from resilient_dspy.core.layer import Layer
from resilient_dspy.core.options import FieldProblem, Options, options_from
from resilient_dspy.core.pipeline import Pipeline
from resilient_dspy.core.stream import stream_started
from resilient_dspy.errors import ErrorInfo, ErrorKind, RetriesExhaustedError, TruncatedOutputError, classify
from resilient_dspy.events import Event
from resilient_dspy.middleware._shared.filters import normalise_filter
from resilient_dspy.middleware.retry_budget import BudgetWindow, RetryBudget, RetrySnapshot, SharedBudgetWindow
from resilient_dspy.store.link import StoreLink, StoreOptions
from resilient_dspy.store.protocol import FailMode, StateStore, StoreUnavailableError

__all__ = [
    "Retry",
    "RetryBudget",
    "RetryGaveUp",
    "RetryOptions",
    "RetryScheduled",
    "RetrySnapshot",
    "compute_delay",
]

Backoff = Literal["constant", "linear", "exponential"]
Jitter = Literal["none", "full", "equal", "decorrelated"]
ErrorPredicate = Callable[[Exception], bool]
ErrorTypes = tuple[type[Exception], ...] | list[type[Exception]] | type[Exception]

_DEFAULT_BUDGET = RetryBudget()
_REJECTED = ErrorKind.REJECTED  # a module global: reading an enum member off its class costs ~100 ns in 3.11


class RetryOptions(StoreOptions):
    """What a Retry retries, how long it waits and what bounds it; see docs/patterns/retry.md."""

    max_attempts: int = Field(default=3, ge=1, description="Attempts in all, counting the first.")
    backoff: Backoff = Field(default="exponential", description="How the delay grows with the retry number.")
    base_delay: float = Field(default=0.5, ge=0, allow_inf_nan=False, description="The first delay, before jitter.")
    max_delay: float = Field(default=30.0, gt=0, allow_inf_nan=False, description="Cap on the backoff delay.")
    jitter: Jitter = Field(default="full", description="How the delay is randomised (the pipeline's rng).")
    retry_on: tuple[type[Exception], ...] | ErrorPredicate | None = Field(
        default=None, description="Exception types (one, a list or a tuple) or a predicate; None = classify()."
    )
    retry_on_result: Callable[[Any], bool] | None = Field(default=None, description="True retries that result.")
    respect_retry_after: bool = Field(default=True, description="Honour the error's retry_after.")
    max_retry_after: float = Field(default=60.0, ge=0, allow_inf_nan=False, description="Cap on a Retry-After wait.")
    budget: RetryBudget | None = Field(default_factory=RetryBudget, description="The retry budget; None = none.")
    resample: bool = Field(
        default=True, description="After a bad answer: a fresh rollout_id and a higher temperature (False: the same)."
    )
    temperature_step: float = Field(
        default=0.7, ge=0, le=2, allow_inf_nan=False, description="Temperature added per resampled retry (from 0)."
    )
    max_temperature: float = Field(
        default=1.0, ge=0, le=2, allow_inf_nan=False, description="Cap on a resampled retry's temperature."
    )
    switch_adapter: bool = Field(
        default=False, description="A resampled retry also uses the other adapter (Chat/JSON)."
    )
    max_tokens_factor: float = Field(
        default=2.0, gt=1, le=16, allow_inf_nan=False, description="A truncated answer's retry multiplies max_tokens."
    )
    max_tokens_cap: int | None = Field(
        default=4096, ge=1, description="Most max_tokens a retry asks for; None: a truncated answer is not retried."
    )
    name: str | None = Field(default=None, description="Label in events and describe(); the identity on a store.")

    @model_validator(mode="after")
    def _check_store(self) -> RetryOptions:
        if self.store is not None and self.budget is None:
            raise FieldProblem("store", "holds the retry budget across processes: it has no effect with budget=None")
        return self

    @field_validator("retry_on", mode="before")
    @classmethod
    def _types_as_tuple(cls, value: Any) -> Any:
        """One exception type (a class is callable: it must not pass as a predicate) or a list, as a tuple."""
        return normalise_filter(value)


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


class Retry(Layer):
    """Retry the layers below on transient failures (see the module docstring for the rules)."""

    placement: ClassVar[str] = "retry"
    options_type: ClassVar[type[Options]] = RetryOptions
    options: RetryOptions

    def __init__(
        self,
        max_attempts: int = 3,
        *,
        backoff: Backoff = "exponential",
        base_delay: float = 0.5,
        max_delay: float = 30.0,
        jitter: Jitter = "full",
        retry_on: ErrorTypes | ErrorPredicate | None = None,
        retry_on_result: Callable[[Any], bool] | None = None,
        respect_retry_after: bool = True,
        max_retry_after: float = 60.0,
        budget: RetryBudget | None = _DEFAULT_BUDGET,
        store: StateStore | None = None,
        on_store_failure: FailMode = "local",
        resample: bool = True,
        temperature_step: float = 0.7,
        max_temperature: float = 1.0,
        switch_adapter: bool = False,
        max_tokens_factor: float = 2.0,
        max_tokens_cap: int | None = 4096,
        name: str | None = None,
    ) -> None:
        self.options = options = options_from(RetryOptions, "Retry", locals())
        self._budget = BudgetWindow(options.budget) if options.budget is not None else None
        self._shared: SharedBudgetWindow | None = None
        if store is not None and options.budget is not None:
            self._shared = SharedBudgetWindow(options.budget, StoreLink(self, store, on_store_failure), self.name)
        self._clock: Clock | None = None
        self._fixed_delay: float | None = None
        if options.jitter == "none" and (options.backoff == "constant" or options.base_delay == 0):
            # compute_delay's answer for every retry, and it draws no randomness: skip the call
            self._fixed_delay = float(min(options.base_delay, options.max_delay))

    def on_build(self, pipeline: Pipeline) -> None:
        """Watch for DSPy's own retries under this layer; keep the first pipeline's clock for :meth:`snapshot`."""
        pipeline.target.watch_dspy_retries()
        if self._clock is None:
            self._clock = pipeline.runtime.clock

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
        shared = self._shared
        if shared is not None:
            await self._count_shared(call, shared)
        resample: Resample | None = None
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
                    if isinstance(caught, TruncatedOutputError) and not self._has_room(caught):
                        raise  # the same max_tokens cuts the same way
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
                    elif budget is not None and not (
                        budget.try_spend(clock.now(), error)
                        if shared is None
                        else await self._spend_shared(call, shared, budget, error)
                    ):
                        stop = "budget"
                if stop is not None:
                    self.emit(call, RetryGaveUp, attempts=attempt, reason=stop, error=error)
                    if error is None:
                        return result
                    raise RetriesExhaustedError(attempt, error, reason=stop)

                reason = type(error).__name__ if error is not None else "result rejected"
                self.emit(call, RetryScheduled, attempt=attempt, delay=delay, reason=reason, error=error)
                call.record.retries += 1
                await clock.sleep(delay)
                attempt += 1
                bypass = attempt_call.bypass_cache
                if info is not None and info.needs_fresh_response:
                    bypass = True
                    resample = self._resample(error, resample, call)
                    if resample is not None:
                        call.properties[RESAMPLE] = resample
                attempt_call = call.for_attempt(attempt, bypass)
        finally:
            if resample is not None:
                call.properties.pop(RESAMPLE, None)
            if budget is not None and slot is not None:
                budget.call_ended(slot)

    async def _count_shared(self, call: Call, shared: SharedBudgetWindow) -> None:
        with contextlib.suppress(StoreUnavailableError):  # the calls are still counted here, for the fallback
            await shared.record_call(call, call.clock.now())

    async def _spend_shared(
        self, call: Call, shared: SharedBudgetWindow, budget: BudgetWindow, error: BaseException | None
    ) -> bool:
        """One retry from the budget of every process; while the store is out, from this process's (``local``) or
        none (``reject``: the call gives up with ``reason="budget"``)."""
        try:
            return await shared.step(call, call.clock.now(), want=True)
        except StoreUnavailableError:
            return shared.link.mode == "local" and budget.try_spend(call.clock.now(), error)

    def _has_room(self, error: TruncatedOutputError) -> bool:
        """Whether a retry may ask for more than the ``max_tokens`` that cut ``error``'s answer."""
        cap = self.options.max_tokens_cap
        return cap is not None and (error.max_tokens is None or error.max_tokens < cap)

    def _resample(self, error: Exception | None, previous: Resample | None, call: Call) -> Resample | None:
        """How the next attempt's request differs after a bad answer (None: it is the same request, uncached)."""
        options = self.options
        max_tokens = previous.max_tokens if previous is not None else None
        if isinstance(error, TruncatedOutputError) and options.max_tokens_cap is not None:
            hit = error.max_tokens
            cap = options.max_tokens_cap
            max_tokens = cap if hit is None else min(cap, max(hit + 1, math.ceil(hit * options.max_tokens_factor)))
        if not options.resample:
            return Resample(max_tokens=max_tokens) if max_tokens is not None else None
        step = (previous.temperature or 0.0) + options.temperature_step if previous is not None else None
        temperature = min(options.temperature_step if step is None else step, options.max_temperature)
        rollout_id = call.rng.getrandbits(31)
        return Resample(rollout_id, temperature, max_tokens, options.switch_adapter)

    def snapshot(self) -> RetrySnapshot | None:
        """The retry budget now (on the pipeline clock): calls and retries in its window; None without a budget."""
        budget = self._budget
        if budget is None:
            return None
        if self._shared is not None and self._shared.seen is not None:
            return self._shared.seen
        clock = self._clock
        try:
            now = clock.now() if clock is not None else budget.latest()
        except RuntimeError:  # the loop clock outside a running loop: as of the latest call
            now = budget.latest()
        return budget.snapshot(now)

    def health(self) -> LayerHealth | None:
        """Degraded while the retry budget is spent (retries made in its window, room for no more): failures are no
        longer retried. Otherwise nothing to report."""
        snapshot = self.snapshot()
        link = None if self._shared is None else self._shared.link
        spent = snapshot is not None and snapshot.retries > 0 and snapshot.exhausted
        if snapshot is None or not (spent or (link is not None and link.degraded)):
            return None
        details: dict[str, Any] = {
            "budget_calls": snapshot.calls,
            "budget_retries": snapshot.retries,
            "allowed": snapshot.allowed,
        }
        if link is not None:
            details.update(link.health_details())
        return LayerHealth(self.name, "degraded", details)


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
