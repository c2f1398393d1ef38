"""What a Budget reports: its events (a refusal, a call's spending, an alert) and the snapshots of its state."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from resilient_dspy.events import Event, Rejected
from resilient_dspy.middleware.budget.options import Unit

__all__ = ["BudgetAlert", "BudgetRejected", "BudgetSnapshot", "BudgetSpent", "BudgetUsage"]


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetRejected(Rejected):
    """The call did not fit ``unit``'s cap (``spent`` + ``reserved`` + ``estimate`` > ``limit``) and did not run."""

    key: Hashable
    unit: Unit
    limit: float
    spent: float
    reserved: float
    estimate: float
    retry_after: float | None

    def rejection_reason(self) -> str:
        return str(self.unit)


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetSpent(Event):
    """A call ended: the estimate reserved up front, and the actual usage charged instead (dollars None if uncapped)."""

    key: Hashable
    estimated_tokens: int
    tokens: int
    estimated_dollars: float | None
    dollars: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetAlert(Event):
    """Spending of ``unit`` reached ``threshold`` of its cap (once per threshold per window); given to ``on_alert``."""

    key: Hashable
    unit: Unit
    threshold: float
    spent: float
    limit: float
    resets_at: float | None


@dataclass(frozen=True, slots=True)
class BudgetUsage:
    """One cap's state: ``spent`` in the current window (or lifetime), ``reserved`` by calls in flight."""

    unit: Unit
    limit: float
    spent: float
    reserved: float
    remaining: float


@dataclass(frozen=True, slots=True)
class BudgetSnapshot:
    """The state of one key's budget (see :meth:`Budget.snapshot`); ``resets_at`` is on the pipeline clock."""

    key: Hashable
    tokens: BudgetUsage | None
    dollars: BudgetUsage | None
    in_flight: int
    resets_at: float | None
    resets_in: float | None
