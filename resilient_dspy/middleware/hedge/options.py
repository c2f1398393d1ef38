"""Hedge's options: when a hedge starts (a fixed delay or a learned :class:`Percentile`), how many, and what each runs;
the window of recent latencies a learned delay reads; the alternatives, described as Fallback describes them."""

from __future__ import annotations

import bisect
import math
import re
from collections import deque
from typing import Any

import dspy
from pydantic import Field, field_validator, model_validator

from resilient_dspy.core.options import FieldProblem, Options, options_from
from resilient_dspy.errors import ConfigurationError
from resilient_dspy.middleware.fallback import Alternative, UseLM, UseProgram

__all__ = ["HedgeOptions", "Latencies", "Percentile", "PercentileOptions", "as_alternative"]

_PERCENTILE = re.compile(r"p(\d{1,2}(?:\.\d+)?)")


class PercentileOptions(Options):
    """A learned hedge delay: the ``q`` quantile of the last ``window`` successful attempts' latencies, clamped."""

    q: float = Field(gt=0, lt=1, description="The quantile, e.g. 0.95 (hedge the slowest 5 %).")
    window: int = Field(default=100, ge=1, description="Recent successful latencies kept.")
    min_samples: int = Field(default=10, ge=1, description="Latencies needed before the quantile is used.")
    floor: float = Field(default=0.0, ge=0, allow_inf_nan=False, description="The delay never goes below this.")
    ceiling: float = Field(
        default=10.0, gt=0, allow_inf_nan=False, description="The delay never goes above this; used until learned."
    )

    @model_validator(mode="after")
    def _check(self) -> PercentileOptions:
        if self.floor > self.ceiling:
            raise FieldProblem("floor", f"must be at most ceiling ({self.ceiling:g}) (got {self.floor:g})")
        if self.min_samples > self.window:
            raise FieldProblem("min_samples", f"must be at most window ({self.window}) (got {self.min_samples})")
        return self


class Percentile:
    """``delay=Percentile(0.95, window=200, floor=0.05, ceiling=2.0)``; ``delay="p95"`` is ``Percentile(0.95)``."""

    __slots__ = ("options",)

    def __init__(
        self, q: float, *, window: int = 100, min_samples: int = 10, floor: float = 0.0, ceiling: float = 10.0
    ) -> None:
        self.options = options_from(PercentileOptions, "Percentile", locals())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Percentile) and other.options == self.options

    def __hash__(self) -> int:
        return hash(self.options)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.options.model_dump().items() if k != "q")
        return f"Percentile({self.options.q!r}, {fields})"

    def label(self) -> str:
        """``p95`` for q=0.95: how snapshots and ``describe()`` name it."""
        return f"p{self.options.q * 100:g}"


class HedgeOptions(Options):
    """When a Hedge starts another attempt and what that attempt runs; see docs/patterns/hedge.md."""

    delay: float | Percentile = Field(
        default=0.05, description="Seconds without an answer before a hedge; a Percentile or 'p95' learns it."
    )
    max_hedges: int = Field(default=1, ge=1, description="Extra attempts at most, beside the first.")
    alternatives: tuple[Any, ...] = Field(
        default=(), description="What hedge n runs (UseLM/UseProgram, an LM, a program); empty = the layers below."
    )
    name: str | None = Field(default=None, description="Label in events and describe().")

    @field_validator("delay", mode="before")
    @classmethod
    def _delay(cls, value: Any) -> Any:
        if isinstance(value, str):
            match = _PERCENTILE.fullmatch(value)
            if match is None or not 0 < float(match.group(1)) < 100:
                raise ValueError(f"must be seconds, a Percentile or 'pNN' such as 'p95' (got {value!r})")
            return Percentile(float(match.group(1)) / 100)
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"must be finite seconds >= 0 (got {value!r})")
            return float(value)
        if not isinstance(value, Percentile):
            raise ValueError(f"must be seconds, a Percentile or 'pNN' such as 'p95' (got {value!r:.80})")
        return value

    @model_validator(mode="after")
    def _enough_alternatives(self) -> HedgeOptions:
        if self.alternatives and self.max_hedges > len(self.alternatives):
            raise FieldProblem(
                "max_hedges",
                f"hedge n runs alternatives[n-1]: at most {len(self.alternatives)} with {len(self.alternatives)} "
                f"alternative(s) (got {self.max_hedges})",
            )
        return self


class Latencies:
    """The last ``window`` successful latencies, kept sorted too, for a quantile in O(1) and an update in O(window)."""

    __slots__ = ("options", "order", "sorted")

    def __init__(self, options: PercentileOptions) -> None:
        self.options = options
        self.order: deque[float] = deque()
        self.sorted: list[float] = []

    def add(self, latency: float) -> None:
        if len(self.order) >= self.options.window:
            del self.sorted[bisect.bisect_left(self.sorted, self.order.popleft())]
        self.order.append(latency)
        bisect.insort(self.sorted, latency)

    def ready(self) -> bool:
        return len(self.sorted) >= self.options.min_samples

    def delay(self) -> float:
        """The nearest-rank quantile, clamped to [floor, ceiling]; the ceiling until ``min_samples`` are in."""
        options = self.options
        if not self.ready():
            return options.ceiling
        rank = max(1, math.ceil(options.q * len(self.sorted)))
        return min(max(self.sorted[rank - 1], options.floor), options.ceiling)


def as_alternative(candidate: Any, index: int, problems: list[tuple[str, str]]) -> Alternative | None:
    """An alternative as Fallback describes it; only ones that run a program (a static answer is no hedge)."""
    where = f"Hedge.alternatives[{index}]"
    if isinstance(candidate, UseLM | UseProgram):
        if candidate.on is not None:
            problems.append((where, "on= has no meaning for a hedge (it starts on slowness, not on an error)"))
        return candidate
    if isinstance(candidate, Alternative):
        problems.append((where, "must be UseLM or UseProgram: a static answer is no hedge (use Timeout + Fallback)"))
        return None
    if isinstance(candidate, dspy.BaseLM):
        return UseLM(candidate)
    try:
        return UseProgram(candidate)
    except ConfigurationError:
        problems.append(
            (where, f"must be UseLM/UseProgram, a dspy.LM, a program or an async callable (got {candidate!r:.80})")
        )
        return None
