"""What an AdaptiveConcurrency is told: the algorithm, the bounds of its limit, its queue and what slows it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from resilient_dspy.core.options import FieldProblem
from resilient_dspy.middleware._shared.partitions import PartitionOptions

__all__ = ["AdaptiveConcurrencyOptions", "Algorithm"]

Algorithm = Literal["aimd", "gradient"]


class AdaptiveConcurrencyOptions(PartitionOptions):
    """The limit's algorithm, bounds and queue; see docs/patterns/adaptive-concurrency.md."""

    algorithm: Algorithm = Field(
        default="gradient", description="aimd (latency threshold and errors) or gradient (long vs short RTT)."
    )
    initial_limit: int = Field(default=10, ge=1, description="The limit before any call has finished (per key).")
    min_limit: int = Field(default=1, ge=1, description="The limit never falls below this.")
    max_limit: int = Field(default=200, ge=1, description="The limit never rises above this.")
    latency_threshold: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="aimd: a success slower than this counts as a drop; None = only errors and timeouts do.",
    )
    backoff: float = Field(
        default=0.9, gt=0, lt=1, allow_inf_nan=False, description="Factor the limit is multiplied by on a drop."
    )
    tolerance: float = Field(
        default=1.5, ge=1, allow_inf_nan=False, description="gradient: how far the short RTT may exceed the long one."
    )
    smoothing: float = Field(
        default=0.2, gt=0, le=1, allow_inf_nan=False, description="gradient: weight of each new limit estimate."
    )
    short_window: int = Field(default=10, ge=1, description="gradient: samples the recent RTT is averaged over.")
    long_window: int = Field(default=600, ge=2, description="gradient: samples the baseline RTT is averaged over.")
    max_queue: int = Field(
        default=1000, ge=0, description="Calls waiting in FIFO order for a slot (per key); 0 = reject when full."
    )
    max_wait: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="Seconds a call may wait in the queue; None = no bound."
    )
    name: str | None = Field(default=None, description="Label in events and describe().")

    @model_validator(mode="after")
    def _check_bounds(self) -> AdaptiveConcurrencyOptions:
        if self.min_limit > self.max_limit:
            raise FieldProblem("min_limit", f"must be <= max_limit ({self.max_limit}) (got {self.min_limit})")
        if not self.min_limit <= self.initial_limit <= self.max_limit:
            bounds = f"{self.min_limit}..{self.max_limit}"
            rule = f"must be within min_limit..max_limit ({bounds}) (got {self.initial_limit})"
            raise FieldProblem("initial_limit", rule)
        if self.short_window >= self.long_window:
            rule = f"must be < long_window ({self.long_window}) (got {self.short_window})"
            raise FieldProblem("short_window", rule)
        if self.algorithm == "gradient" and self.latency_threshold is not None:
            raise FieldProblem("latency_threshold", "is read by algorithm='aimd' only (the gradient needs none)")
        return self
