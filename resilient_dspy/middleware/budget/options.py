"""What a Budget is told: its caps (tokens, dollars), their period, how a call's cost is estimated and priced, when
to alert, and how to partition (docs/patterns/budget.md, "Options and defaults")."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from resilient_dspy.core.options import FieldProblem
from resilient_dspy.middleware._shared.partitions import PartitionOptions
from resilient_dspy.store.link import StoreOptions

__all__ = ["BudgetOptions", "PriceFunction", "TokenEstimate", "Unit"]

Unit = Literal["tokens", "dollars"]

PriceFunction = Callable[[Mapping[str, Mapping[str, Any]]], float]
"""Dollars for a DSPy usage dict ``{model: {"prompt_tokens": …, "completion_tokens": …, "total_tokens": …}}`` (the
same contract as the Cache's ``price=``: one :class:`~resilient_dspy.observe.PriceTable` serves both)."""

TokenEstimate = Callable[[Any], int | tuple[int, int]]
"""Tokens a call will use, before it runs: an int, or ``(prompt, completion)`` so a price can tell them apart."""


class BudgetOptions(PartitionOptions, StoreOptions):
    """The caps, their period, and how a call's cost is estimated; see docs/patterns/budget.md."""

    tokens: int | None = Field(default=None, gt=0, description="LM tokens (prompt + completion) per period.")
    dollars: float | None = Field(default=None, gt=0, allow_inf_nan=False, description="Dollars per period.")
    per: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="The period in seconds; None = the budget's lifetime."
    )
    price: PriceFunction | None = Field(default=None, description="Usage by model → dollars; needed by dollars=.")
    estimate_tokens: TokenEstimate | None = Field(
        default=None, description="A call's tokens before it runs; None = the default estimate."
    )
    alert_at: tuple[float, ...] = Field(default=(0.8,), description="Fractions of a cap that raise a BudgetAlert.")
    on_alert: Callable[[Any], object] | None = Field(default=None, description="Sync callback for each BudgetAlert.")
    reservation_ttl: float = Field(
        default=600.0, gt=0, allow_inf_nan=False, description="On a store: seconds a dead process's reservation holds."
    )
    name: str | None = Field(default=None, description="Label in events and describe(); the identity on a store.")

    @field_validator("alert_at", mode="before")
    @classmethod
    def _as_tuple(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    @field_validator("alert_at")
    @classmethod
    def _check_thresholds(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        bad = [t for t in value if not (math.isfinite(t) and 0 < t <= 1)]
        if bad:
            raise FieldProblem("alert_at", f"every threshold must be a fraction in (0, 1] (got {bad})")
        return tuple(sorted(set(value)))

    @field_validator("on_alert")
    @classmethod
    def _check_on_alert(cls, value: Callable[[Any], object] | None) -> Callable[[Any], object] | None:
        if value is not None and (
            inspect.iscoroutinefunction(value) or inspect.iscoroutinefunction(type(value).__call__)
        ):
            raise FieldProblem(
                "on_alert", f"must be a sync callable: it runs inside the call (got the async {value!r})"
            )
        return value

    @model_validator(mode="after")
    def _check_caps(self) -> BudgetOptions:
        if self.tokens is None and self.dollars is None:
            raise FieldProblem("tokens", "a budget needs a cap: give tokens=, dollars= or both")
        if self.dollars is not None and self.price is None:
            raise FieldProblem(
                "price", "is required with dollars=: a callable from the usage by model to dollars (e.g. a PriceTable)"
            )
        if self.dollars is None and self.price is not None:
            raise FieldProblem("price", "has no effect without dollars= (to count cost without a cap, use CostTracker)")
        return self
