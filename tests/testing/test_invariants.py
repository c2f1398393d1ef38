"""Each invariant checker catches a hand-made violation with a message naming the call, and passes a clean run."""

from __future__ import annotations

import asyncio

import dspy

from resilient_dspy import RetryBudget, TimeoutExceededError
from resilient_dspy.middleware.ratelimit import Limit
from resilient_dspy.middleware.retry import RetryScheduled
from resilient_dspy.testing import Fault
from resilient_dspy.testing.fault_lm import JournalEntry
from resilient_dspy.testing.harness import CallResult, ProgramEntry, RecordedEvent, Run
from resilient_dspy.testing.invariants import (
    attempts_within_bounds,
    bulkhead_limit_respected,
    cancellation_not_retried,
    deadline_respected,
    inputs_complete,
    limiter_respected,
    loop_not_blocked,
    no_lost_call,
    no_orphan_tasks,
    permanent_errors_not_retried,
    retry_budget_respected,
)


def call(index: int, ended: float = 1.0, **kw: object) -> CallResult:
    return CallResult(index, f"q{index}", 0.0, ended, **kw)  # type: ignore[arg-type]


def test_no_lost_call_names_hung_swallowed_and_untyped_calls() -> None:
    calls = [
        call(0, value="ok"),
        call(1, error=TimeoutExceededError(1.0)),
        call(2, error=dspy.LMServerError("503", status=503)),
        call(3, hung=True, error=asyncio.CancelledError()),
        call(4, cancel_requested=True, value="late"),
        call(5, error=KeyError("boom")),
        call(6, error=asyncio.CancelledError()),
    ]
    found = no_lost_call(calls)
    assert [(v.call, v.message.split(" ")[0]) for v in found] == [
        (3, "still"),
        (4, "the"),
        (5, "untyped"),
        (6, "cancelled"),
    ]


def test_deadline_and_attempts() -> None:
    assert deadline_respected([call(0, ended=2.0005)], 2.0) == []
    [late] = deadline_respected([call(0, ended=2.5)], 2.0)
    assert late.call == 0 and "took 2.5s, deadline 2s" in late.message
    assert deadline_respected([call(0, ended=99.0)], None) == []
    [many] = attempts_within_bounds([call(0, attempts=4)], 3)
    assert "4 attempts > max 3" in many.message
    journal = [ProgramEntry(0, "q0", Fault.OK, 0.0, 0.1)] * 3
    [hidden] = attempts_within_bounds([call(0, attempts=1)], 3, journal=journal, requests_per_attempt=2)
    assert "3 requests for 1 attempt(s) > 2" in hidden.message


def test_retry_budget_counts_retries_against_calls() -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=1.0, window=2.0)
    events = [
        RecordedEvent(
            0, RetryScheduled(pipeline="p", layer="Retry", time=t, attempt=1, delay=0.0, reason="x", error=None)
        )
        for t in (0.1, 0.2, 0.3)
    ]
    assert retry_budget_respected([call(0)], events[:2], budget) == []
    [over] = retry_budget_respected([call(0)], events, budget)
    assert "3 retries" in over.message and "budget 2" in over.message


def test_retry_budget_is_checked_over_the_whole_sliding_window() -> None:
    """20 retries within 9.1 s under min 1/s over 10 s break the bound (the bucketed budget used to allow them)."""
    budget = RetryBudget(ratio=0.0, min_per_second=1.0, window=10.0)
    retries = [
        RecordedEvent(
            i, RetryScheduled(pipeline="p", layer="Retry", time=t, attempt=1, delay=0.0, reason="x", error=None)
        )
        for i, t in enumerate([0.95] * 10 + [10.05] * 10)
    ]
    calls = [CallResult(i, f"q{i}", e.event.time, e.event.time) for i, e in enumerate(retries)]
    [over] = retry_budget_respected(calls, retries, budget)
    assert "20 retries" in over.message and "budget 10" in over.message
    assert retry_budget_respected(calls, retries[:10] + retries[10:11], budget) != []
    later = [
        RecordedEvent(
            i, RetryScheduled(pipeline="p", layer="Retry", time=t, attempt=1, delay=0.0, reason="x", error=None)
        )
        for i, t in enumerate([0.95] * 10 + [10.95] * 10)
    ]
    assert retry_budget_respected(calls, later, budget) == []


def test_retry_budget_counts_calls_in_flight_in_the_window_wherever_they_started() -> None:
    """Calls that started at 0 and are still in flight at 1.5 count for a retry at 1.5 (a limiter or bulkhead may
    have held them, and the budget counts a call while it is in flight); calls that ended before the window don't."""
    budget = RetryBudget(ratio=0.5, min_per_second=0.0, window=1.0)
    retry = RecordedEvent(
        2, RetryScheduled(pipeline="p", layer="Retry", time=1.5, attempt=1, delay=0.0, reason="x", error=None)
    )
    in_flight = [call(i, ended=2.0) for i in range(3)]
    assert retry_budget_respected(in_flight, [retry], budget) == []
    ended = [call(i, ended=0.2) for i in range(2)] + [call(2, ended=0.2)]
    [over] = retry_budget_respected(ended, [retry], budget)
    assert "1 retries" in over.message and "budget 0" in over.message and "0.5 * 0 calls" in over.message


def test_cancellation_permanent_errors_bulkhead_limiter_orphans() -> None:
    cancelled = call(0, ended=1.0, cancel_requested=True, error=asyncio.CancelledError())
    after = [ProgramEntry(0, "q0", Fault.OK, 1.5, 2.0)]
    assert "started after the call was cancelled" in cancellation_not_retried([cancelled], [], after)[0].message
    journal = [ProgramEntry(0, "q0", Fault.CONTEXT_WINDOW, 0.0, 0.1), ProgramEntry(0, "q0", Fault.OK, 0.2, 0.3)]
    assert "context_window was followed by 1" in permanent_errors_not_retried([call(0)], journal)[0].message
    timed_out = ProgramEntry(0, "q0", Fault.CONTEXT_WINDOW, 0.0, 0.3, cancelled=True)  # cut before its fault
    assert permanent_errors_not_retried([call(0)], [timed_out, ProgramEntry(0, "q0", Fault.OK, 0.3, 0.4)]) == []
    lm_cut = JournalEntry(0.3, "m", Fault.AUTH, "q0", 5, 0, latency=0.3, detail="cancelled by the caller")
    lm_retry = JournalEntry(0.5, "m", Fault.OK, "q0", 5, 3)
    assert permanent_errors_not_retried([call(0)], [lm_cut, lm_retry]) == []
    lm_seen = JournalEntry(0.3, "m", Fault.AUTH, "q0", 5, 0, latency=0.3)
    assert "auth was followed by 1" in permanent_errors_not_retried([call(0)], [lm_seen, lm_retry])[0].message
    overlapping = [ProgramEntry(i, f"q{i}", None, 0.0, 1.0) for i in range(3)]
    assert bulkhead_limit_respected(overlapping, 3) == []
    assert "3 runs in flight" in bulkhead_limit_respected(overlapping, 2)[0].message
    assert limiter_respected([0.0, 0.5, 1.0], [Limit.requests(2, 1.0)]) == []
    assert "3 admissions in [0, 1)" in limiter_respected([0.0, 0.5, 0.9], [Limit.requests(2, 1.0)])[0].message
    assert "bucket bound" in limiter_respected([0.0, 0.0, 0.0], [Limit.requests(1, 1.0, burst=2)])[0].message
    assert no_orphan_tasks([]) == [] and "left running" in no_orphan_tasks(["<Task x>"])[0].message


async def test_followers_lending_their_bulkhead_permit_are_not_counted_as_running_below_it() -> None:
    """Three identical calls through Bulkhead(2) ▶ Cache: one runs, two wait as followers having lent their
    permits; the running checkpoint sees one span, and no bulkhead violation is reported (hypothesis's example)."""
    from resilient_dspy.testing import FaultStep
    from resilient_dspy.testing.harness import ScriptedProgram, StackConfig, run_calls
    from resilient_dspy.testing.invariants import check_built

    config = StackConfig(bulkhead={"max_concurrent": 2, "max_queue": 0, "max_wait": None}, cache=True)
    program = ScriptedProgram([FaultStep(Fault.OK, latency=0.01)])
    built = config.build(program)
    run = await run_calls(built.pipeline, ["q0"] * 3, arrivals=[0.0, 0.0, 0.0], cancel_after={}, horizon=10.0)
    assert [result.ok for result in run.calls] == [True, True, True]
    assert len(program.journal) == 1
    assert next((entry.started, entry.ended) for entry in built.checkpoint("running")) == (0.0, 0.01)
    assert check_built(run, built, program.journal) == []


def test_inputs_complete_flags_each_call_that_ran_with_missing_inputs() -> None:
    """A call whose program logged missing inputs is a violation naming them; complete calls pass."""
    calls = [call(0), call(1, missing_inputs=("context",))]
    (found,) = inputs_complete(calls)
    assert found.invariant == "inputs_complete" and found.call == 1 and "context" in found.message
    assert inputs_complete([call(0)]) == []


def test_loop_not_blocked_flags_a_block_over_the_limit_only() -> None:
    """The longest real-time block is compared to max_block; at or under it nothing is reported."""
    run = Run([call(0)], [], [], 0.0, 1.0, 10.0, longest_block=8.0, blocked_at=0.5)
    (found,) = loop_not_blocked(run, 1.0)
    assert found.invariant == "loop_not_blocked" and "8.0 s" in found.message
    assert loop_not_blocked(run, 8.0) == []
