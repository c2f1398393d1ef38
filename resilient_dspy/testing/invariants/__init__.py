"""Checkers for the invariants of design.md section 6, over what a harness recorded.

Each checker takes the per-call results (:class:`~resilient_dspy.testing.harness.CallResult`), the event stream
and/or the program's own journal (runs with start and end times), and returns a list of :class:`Violation` — empty
when the invariant holds — each with a message that says which call broke what, by how much.

The checkers come in families, one module each: ``calls`` (every call ends well, the run leaves nothing behind),
``retries`` (attempts, budget, cancellation, permanent errors), ``admission`` (half-open probes, bulkhead, limiter),
``cache`` (freshness, only successes stored); ``checks`` runs every one that applies to a pipeline.
"""

from resilient_dspy.testing.invariants.admission import (
    bulkhead_limit_respected,
    half_open_probes_respected,
    limiter_respected,
)
from resilient_dspy.testing.invariants.cache import cache_fresh_and_clean
from resilient_dspy.testing.invariants.calls import (
    deadline_respected,
    inputs_complete,
    loop_not_blocked,
    no_lost_call,
    no_orphan_tasks,
)
from resilient_dspy.testing.invariants.checks import Expectations, check_built, check_run, expectations
from resilient_dspy.testing.invariants.retries import (
    attempts_within_bounds,
    cancellation_not_retried,
    permanent_errors_not_retried,
    retry_budget_respected,
)
from resilient_dspy.testing.invariants.violation import EPSILON, Interval, Violation, assert_no_violations

__all__ = [
    "EPSILON",
    "Expectations",
    "Interval",
    "Violation",
    "assert_no_violations",
    "attempts_within_bounds",
    "bulkhead_limit_respected",
    "cache_fresh_and_clean",
    "cancellation_not_retried",
    "check_built",
    "check_run",
    "deadline_respected",
    "expectations",
    "half_open_probes_respected",
    "inputs_complete",
    "limiter_respected",
    "loop_not_blocked",
    "no_lost_call",
    "no_orphan_tasks",
    "permanent_errors_not_retried",
    "retry_budget_respected",
]
