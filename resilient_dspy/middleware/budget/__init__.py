"""The budget (docs/patterns/budget.md): options, events, accounts (the arithmetic of caps and windows), layer.

The default token estimate is :class:`resilient_dspy.binding.estimate.ProgramEstimate`, shared with the rate limiter.
"""

from resilient_dspy.binding.estimate import DEFAULT_MAX_TOKENS
from resilient_dspy.middleware.budget.events import (
    BudgetAlert,
    BudgetRejected,
    BudgetSnapshot,
    BudgetSpent,
    BudgetUsage,
)
from resilient_dspy.middleware.budget.layer import Budget
from resilient_dspy.middleware.budget.options import BudgetOptions, PriceFunction, TokenEstimate, Unit

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "Budget",
    "BudgetAlert",
    "BudgetOptions",
    "BudgetRejected",
    "BudgetSnapshot",
    "BudgetSpent",
    "BudgetUsage",
    "PriceFunction",
    "TokenEstimate",
    "Unit",
]
