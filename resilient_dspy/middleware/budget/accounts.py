"""The arithmetic of a Budget, with no I/O and no clock of its own: one meter per cap (spent, reserved, alerts
fired) and one account per key (its meters, its fixed window, its calls in flight). Synchronous, so it needs no
lock: every change happens between two awaits of the layer."""

from __future__ import annotations

from collections.abc import Hashable

from resilient_dspy.middleware._shared.partitions import Hold
from resilient_dspy.middleware.budget.events import BudgetSnapshot, BudgetUsage
from resilient_dspy.middleware.budget.options import BudgetOptions, Unit

__all__: list[str] = []


class _CapMeter:
    """One cap: what the window has spent, what calls in flight reserve, and how many alert thresholds fired."""

    __slots__ = ("alerted", "limit", "reserved", "spent", "unit")

    def __init__(self, unit: Unit, limit: float) -> None:
        self.unit: Unit = unit
        self.limit = limit
        self.spent: float = 0
        self.reserved: float = 0
        self.alerted = 0

    def fits(self, amount: float) -> bool:
        return self.spent + self.reserved + amount <= self.limit

    def forget(self) -> None:
        self.spent = 0
        self.alerted = 0

    def usage(self) -> BudgetUsage:
        remaining = max(0.0, self.limit - self.spent - self.reserved)
        return BudgetUsage(self.unit, self.limit, self.spent, self.reserved, remaining)


class _BudgetAccount:
    """The budget of one key: its meters, its window, and the calls in flight."""

    __slots__ = ("dollars", "in_flight", "meters", "per", "start", "tokens")

    def __init__(self, options: BudgetOptions) -> None:
        self.tokens = _CapMeter("tokens", options.tokens) if options.tokens is not None else None
        self.dollars = _CapMeter("dollars", options.dollars) if options.dollars is not None else None
        self.meters = tuple(meter for meter in (self.tokens, self.dollars) if meter is not None)
        self.per = options.per
        self.start: float | None = None
        self.in_flight = 0

    def roll(self, now: float) -> None:
        """End the window if its time is up; with calls in flight the next one starts where it ended."""
        start, per = self.start, self.per
        if start is None or per is None or now < start + per:
            return
        for meter in self.meters:
            meter.forget()
        self.start = start + per * ((now - start) // per) if self.in_flight else None

    def open(self, now: float) -> None:
        if self.start is None and self.per is not None:
            self.start = now

    def resets_at(self) -> float | None:
        return None if self.start is None or self.per is None else self.start + self.per

    def reserve(self, tokens: int, dollars: float, now: float) -> None:
        """Hold a call's estimate while it runs, so concurrent calls cannot all pass the same check."""
        self.open(now)
        if self.tokens is not None:
            self.tokens.reserved += tokens
        if self.dollars is not None:
            self.dollars.reserved += dollars
        self.in_flight += 1

    def charge(self, tokens: int, dollars: float, spent_tokens: int, spent_dollars: float, now: float) -> None:
        """Swap a call's reservation (``tokens``, ``dollars``) for what it spent (the last call out clears any
        rounding left over)."""
        self.roll(now)
        self.in_flight -= 1
        for meter, held, spent in ((self.tokens, tokens, spent_tokens), (self.dollars, dollars, spent_dollars)):
            if meter is None:
                continue
            meter.reserved = meter.reserved - held if self.in_flight else 0
            if spent:
                self.open(now)
                meter.spent += spent

    def reset(self) -> None:
        for meter in self.meters:
            meter.forget()
        self.start = None

    def hold(self, now: float) -> Hold:
        """Calls in flight or spending in the current window pin it: forgetting spend would let a key overspend, so
        a budget is never evicted under pressure (unchanged rule; see docs/patterns/budget.md)."""
        self.roll(now)
        if self.in_flight or any(meter.spent for meter in self.meters):
            return Hold.CALLS
        return Hold.NOTHING

    def snapshot(self, key: Hashable, now: float | None) -> BudgetSnapshot:
        """The account as it stands at ``now`` (None outside a running loop: the window is not rolled)."""
        if now is not None:
            self.roll(now)
        resets_at = self.resets_at()
        resets_in = None if resets_at is None or now is None else max(0.0, resets_at - now)
        tokens = self.tokens.usage() if self.tokens is not None else None
        dollars = self.dollars.usage() if self.dollars is not None else None
        return BudgetSnapshot(key, tokens, dollars, self.in_flight, resets_at, resets_in)
