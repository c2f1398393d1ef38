"""What a RateLimiter is told: its limits (requests or tokens per period, a burst) and how long to wait."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from resilient_dspy.core.options import FieldProblem, Options, problems_of
from resilient_dspy.errors import ConfigurationError
from resilient_dspy.middleware._shared.partitions import PartitionOptions
from resilient_dspy.store.link import StoreOptions

__all__ = [
    "Limit",
    "RateLimiterOptions",
    "Unit",
]


Unit = Literal["requests", "tokens"]


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


class RateLimiterOptions(PartitionOptions, StoreOptions):
    """The limits and how long a call may wait for them; see docs/patterns/rate-limiter.md.

    ``requests``, ``tokens`` and ``per`` are a shortcut for ``Limit.requests(requests, per)`` and
    ``Limit.tokens(tokens, per)``: once validated they are added to ``limits`` (and read ``None``), so ``limits``
    is every limit and a model rebuilt from ``model_dump()`` is the same. With ``store=`` the limits are shared by
    every process whose RateLimiter has the same ``name=`` on the same store prefix.
    """

    limits: tuple[Limit, ...] = Field(default=(), description="Every limit a call must fit, all at once.")
    requests: int | None = Field(default=None, gt=0, description="Shortcut: Limit.requests(requests, per).")
    tokens: int | None = Field(default=None, gt=0, description="Shortcut: Limit.tokens(tokens, per).")
    per: float = Field(default=1.0, gt=0, allow_inf_nan=False, description="The shortcuts' period, in seconds.")
    max_wait: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="Seconds a call may wait; None = up to its deadline."
    )
    counts_from: Literal["admission", "answer"] = Field(
        default="answer",
        description="When an admission's window starts: at its answer (held while the call runs) or at admission.",
    )
    estimate_tokens: Callable[[Any], int] | None = Field(
        default=None, description="Token cost of a call before it runs; None = the default estimate."
    )
    name: str | None = Field(default=None, description="Label in events and describe().")

    @model_validator(mode="after")
    def _fold_shortcuts(self) -> RateLimiterOptions:
        """Add the shortcuts to ``limits`` (the model is frozen: this runs once, while it is being validated)."""
        given = (("requests", self.requests), ("tokens", self.tokens))
        shortcuts = [Limit(amount=amount, per=self.per, unit=unit) for unit, amount in given if amount is not None]
        if shortcuts:
            object.__setattr__(self, "limits", (*self.limits, *shortcuts))
            object.__setattr__(self, "requests", None)
            object.__setattr__(self, "tokens", None)
        if not self.limits:
            raise FieldProblem(
                "limits",
                "give at least one limit: RateLimiter(requests=100, per=1.0) or RateLimiter(Limit.tokens(90_000, 60))",
            )
        return self
