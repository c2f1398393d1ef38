"""How a Budget prices a call: the dollars of an estimate before it runs, of the usage DSPy measured after, and the
models its price cannot see (said once each, at ERROR, since a dollar cap would count them as $0)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from resilient_dspy.binding.estimate import ProgramEstimate
    from resilient_dspy.binding.usage import UsageScope
    from resilient_dspy.middleware.budget.options import BudgetOptions, PriceFunction

__all__ = ["Pricing"]

logger = logging.getLogger("resilient_dspy.budget")


class Pricing:
    """The pricing half of :class:`~resilient_dspy.middleware.budget.layer.Budget` (a mixin of its state)."""

    options: BudgetOptions
    _price: PriceFunction | None
    _program: ProgramEstimate
    _reported_unpriced: set[str]
    name: str  # the Layer's

    def measure(self, scope: UsageScope, dollars: float) -> tuple[int, float]:
        """The tokens and dollars a call used, from DSPy's usage (its dollar estimate if the price fails)."""
        usage = scope.by_model()
        actual_tokens = scope.total_tokens(usage) if usage else 0
        actual_dollars = 0.0
        if self.options.dollars is not None and usage:
            try:
                self._warn_unpriced(usage)
                actual_dollars = self._price_of(usage)
            except Exception:
                logger.exception("%s: the price function failed; the call is charged its estimate", self.name)
                actual_dollars = dollars
        return actual_tokens, actual_dollars

    def _unpriced(self, model: Any) -> bool:
        """True for a model a price with ``lookup`` (a :class:`~resilient_dspy.observe.PriceTable`) cannot price."""
        lookup = getattr(self._price, "lookup", None)
        return (
            isinstance(model, str) and self.options.dollars is not None and callable(lookup) and lookup(model) is None
        )

    def _warn_unpriced(self, usage: Mapping[str, Any]) -> None:
        """Say once per model, at ERROR, that the dollar cap cannot see a model's spending."""
        for model in usage:
            if model not in self._reported_unpriced and self._unpriced(model) and len(self._reported_unpriced) < 256:
                self._reported_unpriced.add(model)
                logger.error(
                    "%s: no price for model %r: its calls count $0 against the dollar cap; give the price a "
                    "price for it",
                    self.name,
                    model,
                )

    def _price_of(self, usage: Mapping[str, Mapping[str, Any]]) -> float:
        assert self._price is not None
        value = self._price(usage)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{self.name}: price must return a finite number of dollars >= 0 (got {value!r})")
        return float(value)

    def estimate_dollars(self, prompt: int, completion: int) -> float:
        usage = {
            self._program.model(): {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
        }
        return self._price_of(usage)
