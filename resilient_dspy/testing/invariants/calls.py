"""Invariants of every call and of the run as a whole: no call lost, none past its deadline, none with missing
inputs, the loop never blocked, no task left behind."""

from __future__ import annotations

from collections.abc import Sequence

from resilient_dspy.errors import ErrorKind, ResilienceError, classify
from resilient_dspy.testing.harness import CallResult, Run
from resilient_dspy.testing.invariants.violation import Violation

__all__ = ["deadline_respected", "inputs_complete", "loop_not_blocked", "no_lost_call", "no_orphan_tasks"]


def _typed(error: BaseException, allowed: tuple[type[BaseException], ...]) -> bool:
    if isinstance(error, (ResilienceError, *allowed)):
        return True
    return isinstance(error, Exception) and classify(error).kind is not ErrorKind.UNKNOWN


def no_lost_call(calls: Sequence[CallResult], *, allowed: tuple[type[BaseException], ...] = ()) -> list[Violation]:
    """Each call returned or raised a typed error (ResilienceError, a classified DSPy error, or ``allowed``).

    A call still running at the horizon is lost; a cancellation the caller did not ask for is lost; a call the caller
    cancelled must end in ``CancelledError`` unless it had already finished (else the cancellation was swallowed).
    """
    found = []
    for call in calls:
        if call.hung:
            found.append(Violation("no_lost_call", f"still running {call.duration:g}s after it started", call.index))
        elif call.cancel_requested:
            if not call.cancelled:
                got = "a value" if call.error is None else type(call.error).__name__
                message = f"the caller's cancellation was swallowed (got {got})"
                found.append(Violation("no_lost_call", message, call.index))
        elif call.cancelled:
            found.append(Violation("no_lost_call", "cancelled although its caller never cancelled it", call.index))
        elif call.error is not None and not _typed(call.error, allowed):
            error = call.error
            found.append(
                Violation("no_lost_call", f"untyped error {type(error).__name__}: {str(error)[:120]}", call.index)
            )
    return found


def deadline_respected(
    calls: Sequence[CallResult], deadline: float | None, *, epsilon: float = 1e-3
) -> list[Violation]:
    """No call (hung ones included) took longer than ``deadline`` + ``epsilon`` seconds; None = no deadline to hold."""
    if deadline is None:
        return []
    return [
        Violation("deadline_respected", f"took {c.duration:.6g}s, deadline {deadline:g}s (+{epsilon:g})", c.index)
        for c in calls
        if c.duration > deadline + epsilon
    ]


def inputs_complete(calls: Sequence[CallResult]) -> list[Violation]:
    """No call made DSPy log missing input fields: a predictor that ran on a partial prompt is a broken call, even
    when it returned something (DSPy only warns and fills the gap with nothing)."""
    return [
        Violation("inputs_complete", f"DSPy ran with input(s) {list(c.missing_inputs)} missing", c.index)
        for c in calls
        if c.missing_inputs
    ]


def loop_not_blocked(run: Run, max_block: float) -> list[Violation]:
    """The event loop was never blocked longer than ``max_block`` real seconds. A sync call in an async program
    (a sync DSPy module, ``time.sleep``, a blocking client) stops the loop: no Timeout can fire while it runs."""
    if run.longest_block <= max_block:
        return []
    when = "" if run.blocked_at is None else f" (until t={run.blocked_at:g})"
    return [
        Violation(
            "loop_not_blocked",
            f"the loop was blocked for {run.longest_block:.1f} s{when}, over {max_block:g} s: something in the "
            "program runs synchronously (call sync DSPy through dspy.asyncify or acall), and no timeout fires then",
        )
    ]


def no_orphan_tasks(orphans: Sequence[str]) -> list[Violation]:
    """No task started during the run was still alive after every call ended."""
    return [Violation("no_orphan_tasks", f"left running: {task[:160]}") for task in orphans]
