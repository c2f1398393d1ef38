"""What a Canary is told: its candidates and their share of traffic, how to route, and when a candidate is worse."""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable
from typing import Any, Literal

from pydantic import Field, model_validator

from resilient_dspy.core.options import FieldProblem, Options

__all__ = ["CanaryOptions", "Mode"]

Mode = Literal["canary", "shadow"]
DEFAULT_SHARE = 0.1
"""With no ``weights``: the share of traffic all candidates get together, split evenly."""


class CanaryOptions(Options):
    """Routes, judging and shadowing; see docs/patterns/canary.md."""

    candidates: tuple[Any, ...] = Field(min_length=1, description="UseLM/UseProgram routes beside the stable one.")
    weights: tuple[float, ...] | None = Field(
        default=None, description="Each candidate's share of calls (0..1); None = 10 % split evenly; stable: the rest."
    )
    mode: Mode = Field(default="canary", description="canary: candidates answer; shadow: they get a copy only.")
    sticky: Callable[[Any], Hashable] | None = Field(
        default=None, description="Key of a call (str/int/tuple): the same key always takes the same route."
    )
    rng: random.Random | None = Field(default=None, description="Randomness of unsticky routing; None = pipeline's.")
    window: int = Field(default=100, ge=1, description="Judged outcomes kept per route (the last N).")
    window_seconds: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="Also forget outcomes older than this; None = never."
    )
    min_calls: int = Field(default=20, ge=1, description="Outcomes each route needs in its window before judging.")
    max_error_rate_increase: float | None = Field(
        default=0.05, ge=0, le=1, description="Roll back when candidate error rate - stable's exceeds it; None = off."
    )
    confidence: float | None = Field(
        default=0.95, gt=0.5, lt=1, description="How sure the error-rate increase must be (one-sided); None = as seen."
    )
    max_latency_ratio: float | None = Field(
        default=1.5, ge=1, allow_inf_nan=False, description="Roll back when candidate/stable latency exceeds it."
    )
    min_latency_increase: float = Field(
        default=0.05, ge=0, allow_inf_nan=False, description="...and exceeds stable's by more than these seconds."
    )
    latency_percentile: float = Field(default=95.0, gt=0, le=100, description="The latency percentile compared.")
    compare: Callable[[Any, Any], bool] | None = Field(
        default=None, description="shadow: compare(stable_answer, shadow_answer) -> equal?, reported in events."
    )
    max_shadows: int = Field(default=10, ge=1, description="shadow: copies in flight at once; more are skipped.")
    shadow_timeout: float = Field(default=30.0, gt=0, allow_inf_nan=False, description="shadow: a copy's time bound.")
    name: str | None = Field(default=None, description="Label in events and describe().")

    @model_validator(mode="after")
    def _check(self) -> CanaryOptions:
        weights = self.weights
        if weights is not None:
            if len(weights) != len(self.candidates):
                raise FieldProblem(
                    "weights", f"needs one weight per candidate ({len(self.candidates)}), got {len(weights)}"
                )
            if any(not 0 <= weight <= 1 for weight in weights):
                raise FieldProblem("weights", f"each weight is a share of calls in [0, 1] (got {list(weights)})")
            if sum(weights) > 1 + 1e-9:
                raise FieldProblem("weights", f"the candidates' shares add up to more than 1 (got {sum(weights):g})")
        if self.min_calls > self.window:
            raise FieldProblem(
                "min_calls", f"must be <= window ({self.window}) or no candidate is ever judged (got {self.min_calls})"
            )
        if self.compare is not None and self.mode != "shadow":
            raise FieldProblem("compare", "compares a shadow's answer with stable's: it needs mode='shadow'")
        return self

    def shares(self) -> tuple[float, ...]:
        """Each candidate's share of calls, the default filled in."""
        if self.weights is not None:
            return self.weights
        return (DEFAULT_SHARE / len(self.candidates),) * len(self.candidates)
