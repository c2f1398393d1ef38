"""What a CircuitBreaker is told: thresholds, window, break, which errors count."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import Field, field_validator, model_validator

from resilient_dspy.core.options import FieldProblem
from resilient_dspy.errors import ErrorKind
from resilient_dspy.middleware._shared.filters import check_filter
from resilient_dspy.middleware._shared.partitions import PartitionOptions
from resilient_dspy.store.link import StoreOptions

__all__ = [
    "CircuitBreakerOptions",
    "ErrorFilter",
]


ErrorFilter = tuple[type[BaseException], ...] | Callable[[BaseException], bool]

_FAILURE_KINDS = frozenset(
    {
        ErrorKind.RATE_LIMIT,
        ErrorKind.SERVER,
        ErrorKind.TIMEOUT,
        ErrorKind.TRANSPORT,
        ErrorKind.UNKNOWN,
        ErrorKind.GAVE_UP,
    }
)


class CircuitBreakerOptions(PartitionOptions, StoreOptions):
    """When to open, how long to stay open, and how to probe; see docs/patterns/circuit-breaker.md."""

    failure_threshold: int | None = Field(default=None, ge=1, description="Consecutive failures that open it.")
    failure_rate: float | None = Field(default=None, gt=0, le=1, description="Failure share that opens it.")
    slow_call_rate: float | None = Field(default=None, gt=0, le=1, description="Slow-call share that opens it.")
    slow_call_duration: float | None = Field(default=None, gt=0, allow_inf_nan=False, description="A slow call's time.")
    window: int | None = Field(default=None, ge=1, description="Count window: the last N calls.")
    window_seconds: float | None = Field(default=None, gt=0, allow_inf_nan=False, description="Time window: last T s.")
    buckets: int = Field(default=10, ge=1, le=1000, description="Buckets a time window is counted in.")
    min_calls: int = Field(default=10, ge=1, description="Calls in the window before a rate can open it.")
    break_duration: float = Field(default=30.0, gt=0, allow_inf_nan=False, description="Seconds open before a probe.")
    break_multiplier: float = Field(default=1.0, ge=1, allow_inf_nan=False, description="Break growth per re-open.")
    max_break_duration: float | None = Field(default=None, gt=0, allow_inf_nan=False, description="Cap on growth.")
    half_open_probes: int = Field(default=1, ge=1, description="Trial calls admitted (and needed) when half-open.")
    failure_on: Any = Field(default=None, description="Errors that count as failures (types or predicate).")
    exclude: Any = Field(default=None, description="Errors that count as nothing (types or predicate).")
    wait_for_half_open: bool = Field(default=False, description="Wait for the break to end instead of refusing.")
    max_wait: float | None = Field(
        default=None, ge=0, allow_inf_nan=False, description="Longest such wait; None = up to the call's deadline."
    )
    name: str | None = Field(default=None, description="Label in events and describe(); the identity on a store.")

    _check_failure_on = field_validator("failure_on")(classmethod(lambda cls, v: check_filter(v)))
    _check_exclude = field_validator("exclude")(classmethod(lambda cls, v: check_filter(v)))

    @model_validator(mode="after")
    def _check_mode(self) -> CircuitBreakerOptions:
        rated = self.failure_rate is not None or self.slow_call_rate is not None
        if rated and self.failure_threshold is not None:
            raise FieldProblem(
                "failure_threshold",
                "give failure_threshold (consecutive mode) or failure_rate/slow_call_rate, not both",
            )
        if (self.slow_call_rate is None) != (self.slow_call_duration is None):
            missing, given = (
                ("slow_call_duration", "slow_call_rate")
                if self.slow_call_duration is None
                else ("slow_call_rate", "slow_call_duration")
            )
            raise FieldProblem(missing, f"is required with {given} (slow_call_rate and slow_call_duration go together)")
        if self.window is not None and self.window_seconds is not None:
            raise FieldProblem("window", "give window (last N calls) or window_seconds (last T seconds), not both")
        if not rated and (self.window is not None or self.window_seconds is not None):
            field = "window" if self.window is not None else "window_seconds"
            raise FieldProblem(field, "a window needs failure_rate or slow_call_rate")
        if self.window is not None and self.min_calls > self.window:
            rule = f"must be <= window ({self.window}) or the circuit can never open (got {self.min_calls})"
            raise FieldProblem("min_calls", rule)
        if self.max_wait is not None and not self.wait_for_half_open:
            raise FieldProblem("max_wait", "has no effect without wait_for_half_open=True")
        if self.max_break_duration is not None and self.max_break_duration < self.break_duration:
            raise FieldProblem("max_break_duration", f"must be >= break_duration ({self.break_duration:g})")
        return self

    @property
    def consecutive(self) -> int | None:
        """The consecutive-failure threshold in effect (5 when no rate is configured), else None."""
        if self.failure_rate is None and self.slow_call_rate is None:
            return self.failure_threshold or 5
        return None
