"""Invariants of retrying: attempts within their bound, retries within the budget, a cancellation never retried,
a permanent error never retried. Journals are matched to calls by their ``call`` index, else by question."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from resilient_dspy.faults import Fault
from resilient_dspy.middleware.retry import RetryBudget, RetryScheduled
from resilient_dspy.testing.fault_lm.schedule import CANCELLED_BY_CALLER
from resilient_dspy.testing.harness import CallResult, RecordedEvent
from resilient_dspy.testing.invariants.violation import EPSILON, Interval, Violation

__all__ = [
    "attempts_within_bounds",
    "cancellation_not_retried",
    "permanent_errors_not_retried",
    "retry_budget_respected",
]


def attempts_within_bounds(
    calls: Sequence[CallResult],
    max_attempts: int | None,
    *,
    journal: Sequence[Interval] = (),
    requests_per_attempt: int | None = None,
) -> list[Violation]:
    """Attempts per call ≤ ``max_attempts``; with a journal, runs per call ≤ attempts * ``requests_per_attempt``.

    The second bound catches hidden retries below the pipeline (e.g. DSPy's own ``num_retries``), which multiply
    the requests each attempt makes.
    """
    found = []
    for call in calls:
        if max_attempts is not None and call.attempts > max_attempts:
            found.append(
                Violation("attempts_within_bounds", f"{call.attempts} attempts > max {max_attempts}", call.index)
            )
    if requests_per_attempt is not None and journal:
        runs = _runs_by_call(calls, journal)
        for call in calls:
            made = len(runs.get(call.index, ()))
            bound = max(call.attempts, 1) * requests_per_attempt
            if made > bound:
                found.append(
                    Violation(
                        "attempts_within_bounds",
                        f"{made} requests for {call.attempts} attempt(s) > {bound} "
                        f"({requests_per_attempt} per attempt): something below the pipeline retries",
                        call.index,
                    )
                )
    return found


def retry_budget_respected(
    calls: Sequence[CallResult],
    events: Sequence[RecordedEvent],
    budget: RetryBudget,
    *,
    journal: Sequence[Any] = (),
) -> list[Violation]:
    """Retries never outrun the budget, a true sliding bound: for each retry at t, the retries in (t - window, t] ≤
    ratio * calls that reached the Retry in that span or were still in flight there + min_per_second * window.

    A layer above the Retry (a limiter, a bulkhead) may hold a call before it reaches the Retry, which the checker
    cannot see; so a call counts if it started by t and ended inside the window or later (an upper bound: no false
    alarm; ``journal`` is accepted for compatibility). Retries of one shared failure (the same error object, as a
    Cache's single-flight followers receive) count once.
    """
    scheduled = sorted(
        ((e.event.time, e.event.error) for e in events if isinstance(e.event, RetryScheduled)), key=lambda r: r[0]
    )
    retries = [t for t, _ in scheduled]
    reached = [(c.started, c.ended) for c in calls]  # a call counts while it is in flight (it may linger there)
    found = []
    for at in retries:
        opened = at - budget.window
        spans = [error for t, error in scheduled if opened + EPSILON < t <= at + EPSILON]
        recent = sum(1 for error in spans if error is None) + len({id(e) for e in spans if e is not None})
        started = sum(1 for earliest, latest in reached if earliest <= at + EPSILON and latest >= opened - EPSILON)
        allowed = budget.ratio * started + budget.min_per_second * budget.window
        if recent > allowed + EPSILON:
            found.append(
                Violation(
                    "retry_budget_respected",
                    f"{recent} retries in the {budget.window:g}s up to t={at:g} > budget {allowed:g} "
                    f"({budget.ratio:g} * {started} calls + {budget.min_per_second:g}/s * {budget.window:g}s)",
                )
            )
            break
    return found


def cancellation_not_retried(
    calls: Sequence[CallResult], events: Sequence[RecordedEvent], journal: Sequence[Interval] = ()
) -> list[Violation]:
    """No retry was scheduled for a cancellation, and no program run of a cancelled call started after it ended."""
    found = [
        Violation("cancellation_not_retried", "a Retry scheduled a retry of a CancelledError", e.call)
        for e in events
        if isinstance(e.event, RetryScheduled) and isinstance(e.event.error, asyncio.CancelledError)
    ]
    runs = _runs_by_call(calls, journal)
    for call in calls:
        if call.cancel_requested or call.hung:
            late = [r for r in runs.get(call.index, ()) if _start(r) > call.ended + EPSILON]
            if late:
                found.append(
                    Violation(
                        "cancellation_not_retried",
                        f"{len(late)} program run(s) started after the call was cancelled at t={call.ended:g}",
                        call.index,
                    )
                )
    return found


def permanent_errors_not_retried(
    calls: Sequence[CallResult],
    journal: Sequence[Any],
    *,
    permanent: frozenset[Fault] = frozenset({Fault.AUTH, Fault.CONTEXT_WINDOW}),
) -> list[Violation]:
    """After a run of a call ends in a permanent fault (auth, context window), that call runs the program no more.

    A run cancelled before its fault took effect (an attempt timeout during its latency) does not count: nobody saw
    the fault. ``journal`` entries need ``question``, ``fault`` and a start time (``started``, or ``time`` for the
    LM journal).
    """
    runs = _runs_by_call(calls, journal)
    found = []
    for call in calls:
        entries = sorted(runs.get(call.index, ()), key=_start)
        for position, entry in enumerate(entries):
            if entry.fault in permanent and not _cut_short(entry) and position + 1 < len(entries):
                found.append(
                    Violation(
                        "permanent_errors_not_retried",
                        f"{entry.fault.value} was followed by {len(entries) - position - 1} more request(s)",
                        call.index,
                    )
                )
                break
    return found


def _runs_by_call(calls: Sequence[CallResult], journal: Iterable[Any]) -> dict[int, list[Any]]:
    """Journal entries per call index: by their ``call`` when they carry one, else by their question."""
    index_of = {call.question: call.index for call in calls}
    runs: dict[int, list[Any]] = defaultdict(list)
    for entry in journal:
        owner = getattr(entry, "call", None)
        owner = owner if owner is not None else index_of.get(entry.question)
        if owner is not None:
            runs[owner].append(entry)
    return runs


def _cut_short(entry: Any) -> bool:
    """A program run or LM request cancelled before its fault or answer took effect."""
    return bool(getattr(entry, "cancelled", False)) or getattr(entry, "detail", "") == CANCELLED_BY_CALLER


def _start(entry: Any) -> float:
    """When a journal entry's request started: ``started``, or an LM journal's ``time`` minus its latency."""
    value = getattr(entry, "started", None)
    if value is not None:
        return float(value)
    return float(entry.time) - float(getattr(entry, "latency", 0.0) or 0.0)
