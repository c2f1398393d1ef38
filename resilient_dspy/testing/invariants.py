"""Checkers for the invariants of design.md section 6, over what a harness recorded.

Each checker takes the per-call results (:class:`~resilient_dspy.testing.harness.CallResult`), the event stream
and/or the program's own journal (runs with start and end times), and returns a list of :class:`Violation` — empty
when the invariant holds — each with a message that says which call broke what, by how much.
"""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from resilient_dspy.core.pipeline import Pipeline
from resilient_dspy.errors import ErrorKind, ResilienceError, classify
from resilient_dspy.faults import Fault
from resilient_dspy.middleware.breaker import CircuitBreaker, CircuitState, CircuitStateChanged
from resilient_dspy.middleware.bulkhead import Bulkhead
from resilient_dspy.middleware.cache import Cache, CacheHit, CacheStored
from resilient_dspy.middleware.fallback import Fallback, Static
from resilient_dspy.middleware.ratelimit import Limit, RateLimiter
from resilient_dspy.middleware.retry import Retry, RetryBudget, RetryScheduled
from resilient_dspy.middleware.timeout import Timeout
from resilient_dspy.testing.fault_lm import CANCELLED_BY_CALLER
from resilient_dspy.testing.harness import Built, CallResult, RecordedEvent, Run

__all__ = [
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

EPSILON = 1e-6
"""Slack for float sums of virtual times (``t + per`` and friends)."""


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken invariant: which, a message naming the call(s) and numbers, and the call index when there is one."""

    invariant: str
    message: str
    call: int | None = None

    def __str__(self) -> str:
        where = "" if self.call is None else f" (call {self.call})"
        return f"{self.invariant}{where}: {self.message}"


class Interval(Protocol):
    """A program run: a journal entry with a question, a start and an end (``inf`` while running)."""

    @property
    def question(self) -> str: ...

    @property
    def started(self) -> float: ...

    @property
    def ended(self) -> float: ...


def assert_no_violations(violations: Iterable[Violation]) -> None:
    """Raise ``AssertionError`` listing every violation (at most 20), or return when there is none."""
    found = list(violations)
    if found:
        lines = "\n".join(f"  - {v}" for v in found[:20])
        more = f"\n  … and {len(found) - 20} more" if len(found) > 20 else ""
        raise AssertionError(f"{len(found)} invariant violation(s):\n{lines}{more}")


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


def half_open_probes_respected(
    journal: Sequence[Any], events: Sequence[RecordedEvent], breaker: CircuitBreaker
) -> list[Violation]:
    """While half-open, at most ``half_open_probes`` trial runs hold a permit at once.

    Valid when the breaker sits right above the program (each program run is one breaker call). A probe holds its
    permit from its start until it ends neutral (cancelled, excluded error) or one break after it started (a hung
    probe is reclaimed then, or did not reach the program: a cache hit); a success keeps it until the circuit
    decides. ``journal`` entries need ``started``, ``ended``, ``error`` and ``cancelled`` (and ``reached`` if known).
    """
    limit = breaker.options.half_open_probes
    brk = breaker.options.break_duration  # the shortest a permit is held (the break only grows): never a false alarm
    changes = [(i, e.event.time, e.event) for i, e in enumerate(events) if isinstance(e.event, CircuitStateChanged)]
    found = []
    for position, (index, opened, change) in enumerate(changes):
        if change.new is not CircuitState.HALF_OPEN:
            continue
        following = changes[position + 1] if position + 1 < len(changes) else None
        closes = following[1] if following is not None else math.inf
        held: list[tuple[float, float]] = []
        for entry in journal:
            seen = getattr(entry, "events_before", None)
            if seen is not None:  # the order of events: exact even for runs at one instant
                if not index < seen <= (following[0] if following is not None else len(events)):
                    continue
            elif not opened - EPSILON <= entry.started < closes - EPSILON:
                continue
            neutral = (
                entry.cancelled
                or getattr(entry, "reached", None) is False  # a cache hit or a coalesced call: not a provider outcome
                or (entry.error is not None and breaker.counts_as_failure(entry.error) is None)
            )
            release = min(entry.ended if neutral else math.inf, entry.started + brk, closes)
            held.append((entry.started, release))
        peak, at = _peak(held)
        if peak > limit:
            found.append(
                Violation(
                    "half_open_probes_respected",
                    f"{peak} probes held permits at t={at:g} in the half-open state from t={opened:g} (limit {limit})",
                )
            )
    return found


def bulkhead_limit_respected(journal: Sequence[Interval], max_concurrent: int) -> list[Violation]:
    """At no instant did more than ``max_concurrent`` calls hold a permit below the bulkhead (``journal``: the
    spans a :class:`~resilient_dspy.testing.harness.Checkpoint` with ``follows_leases`` saw, or program runs)."""
    peak, at = _peak([(entry.started, entry.ended) for entry in journal])
    if peak > max_concurrent:
        return [
            Violation(
                "bulkhead_limit_respected", f"{peak} runs in flight at t={at:g} > max_concurrent={max_concurrent}"
            )
        ]
    return []


def limiter_respected(admissions: Sequence[float], limits: Sequence[Limit]) -> list[Violation]:
    """Request admissions (program start times) fit every requests limit: an exact limit in every window
    ``[t, t + per)``, a burst limit within ``burst + amount * span / per`` over every span."""
    times = sorted(admissions)
    found = []
    for limit in limits:
        if limit.unit != "requests":
            continue
        for i, start in enumerate(times):
            if limit.burst is None:
                count = sum(1 for t in times[i:] if t < start + limit.per - EPSILON)
                if count > limit.amount:
                    found.append(
                        Violation(
                            "limiter_respected",
                            f"{count} admissions in [{start:g}, {start + limit.per:g}) > {limit.amount} ({limit})",
                        )
                    )
                    break
            else:
                worst = next(
                    (
                        (k - i + 1, times[k])
                        for k in range(i, len(times))
                        if k - i + 1 > limit.burst + limit.amount * (times[k] - start) / limit.per + 1e-6
                    ),
                    None,
                )
                if worst is not None:
                    found.append(
                        Violation(
                            "limiter_respected",
                            f"{worst[0]} admissions in [{start:g}, {worst[1]:g}] exceed the bucket bound of {limit}",
                        )
                    )
                    break
    return found


def cache_fresh_and_clean(
    calls: Sequence[CallResult], events: Sequence[RecordedEvent], ttl: float | None, journal: Sequence[Any] = ()
) -> list[Violation]:
    """Every hit is of an entry stored at most ``ttl`` seconds earlier; every stored answer is a real success.

    A store must come from a call whose latest program run (``journal`` entries with ``call``, ``ended`` and
    ``error``) succeeded, and that was served by the primary (never a fallback answer).
    """
    stored: dict[str, list[float]] = defaultdict(list)
    found = []
    by_call = {c.index: c for c in calls}
    runs: dict[int | None, list[Any]] = defaultdict(list)
    for entry in journal:
        runs[entry.call].append(entry)
    for recorded in events:
        event = recorded.event
        if isinstance(event, CacheStored):
            stored[event.key].append(event.time)
            call = by_call.get(recorded.call) if recorded.call is not None else None
            if call is not None and call.served_by != "primary":
                found.append(Violation("cache_fresh_and_clean", f"stored a {call.served_by} answer", call.index))
            finished = [r for r in runs.get(recorded.call, ()) if r.ended <= event.time + EPSILON]
            if journal and recorded.call is not None:
                latest = finished[-1] if finished else None  # the journal is in start order
                if latest is None or latest.error is not None or getattr(latest, "cancelled", False):
                    why = "no program run" if latest is None else f"a run that failed ({type(latest.error).__name__})"
                    found.append(Violation("cache_fresh_and_clean", f"stored an answer after {why}", recorded.call))
        elif isinstance(event, CacheHit):
            before = [t for t in stored.get(event.key, ()) if t <= event.time + EPSILON]
            if not before:
                found.append(Violation("cache_fresh_and_clean", "a hit on a key never stored", recorded.call))
            elif ttl is not None and event.time - max(before) > ttl + EPSILON:
                age = event.time - max(before)
                found.append(
                    Violation("cache_fresh_and_clean", f"served an entry {age:g}s old, ttl {ttl:g}s", recorded.call)
                )
    return found


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


def _peak(intervals: Sequence[tuple[float, float]]) -> tuple[int, float]:
    """The most intervals ``[start, end)`` overlapping at one instant, and when (ends sort before starts)."""
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals if e != math.inf])
    level = peak = 0
    at = 0.0
    for time, step in points:
        level += step
        if level > peak:
            peak, at = level, time
    return peak, at


@dataclass(frozen=True, slots=True)
class Expectations:
    """What a pipeline promises, read from its layers: the bounds the invariants check a run against."""

    deadline: float | None = None
    max_attempts: int | None = None
    retry_budget: RetryBudget | None = None


def expectations(pipeline: Pipeline) -> Expectations:
    """The deadline (a Timeout with only Fallbacks above it, times the alternatives that rerun the stack) and attempt
    bound (product of every Retry's max_attempts, times those reruns) a pipeline promises; None when unbounded."""
    reruns = 1
    deadline: float | None = None
    attempts = 1
    retries: list[Retry] = []
    waits_above = False
    for layer in pipeline.layers:
        if isinstance(layer, Fallback):
            reruns *= 1 + sum(1 for alternative in layer.alternatives if not isinstance(alternative, Static))
        elif isinstance(layer, Timeout):
            if not waits_above and deadline is None:
                deadline = layer.options.seconds * reruns
        else:
            waits_above = True  # time spent in this layer (queueing, backoff) is outside any Timeout below it
        if isinstance(layer, Retry):
            retries.append(layer)
            attempts *= layer.options.max_attempts
    budget = retries[0].options.budget if len(retries) == 1 else None
    return Expectations(deadline, attempts * reruns, budget)


def check_run(
    run: Run,
    pipeline: Pipeline,
    *,
    journal: Sequence[Any] = (),
    requests_per_attempt: int | None = None,
    epsilon: float = 1e-3,
    max_block: float | None = None,
) -> list[Violation]:
    """Every invariant that applies to any pipeline: no lost call, complete inputs, deadline, attempts, retry
    budget, cancellation, permanent errors, cache freshness (each Cache layer), no orphan tasks, and with
    ``max_block`` a loop never blocked longer than that (real seconds). ``journal`` is the program's or LM's."""
    expected = expectations(pipeline)
    found = no_lost_call(run.calls)
    found += inputs_complete(run.calls)
    if max_block is not None:
        found += loop_not_blocked(run, max_block)
    found += deadline_respected(run.calls, expected.deadline, epsilon=epsilon)
    found += attempts_within_bounds(
        run.calls, expected.max_attempts, journal=journal, requests_per_attempt=requests_per_attempt
    )
    if expected.retry_budget is not None:
        found += retry_budget_respected(run.calls, run.events, expected.retry_budget, journal=journal)
    found += cancellation_not_retried(run.calls, run.events, journal)
    found += permanent_errors_not_retried(run.calls, journal)
    for layer in pipeline.layers:
        if isinstance(layer, Cache):
            program_runs = [entry for entry in journal if hasattr(entry, "call")]
            found += cache_fresh_and_clean(run.calls, run.events, layer.options.ttl, program_runs)
    found += no_orphan_tasks(run.orphans)
    return found


def check_built(run: Run, built: Built, journal: Sequence[Any] = ()) -> list[Violation]:
    """:func:`check_run` plus the layer-specific invariants a :class:`StackConfig` pipeline makes visible with its
    checkpoints: half-open probes, bulkhead in-flight and limiter windows."""
    found = check_run(run, built.pipeline, journal=journal)
    breaker = built.layers.get("breaker")
    if isinstance(breaker, CircuitBreaker):
        found += half_open_probes_respected(built.checkpoint("probed"), run.events, breaker)
    bulkhead = built.layers.get("bulkhead")
    if isinstance(bulkhead, Bulkhead) and bulkhead.options.key is None:
        found += bulkhead_limit_respected(built.checkpoint("running"), bulkhead.options.max_concurrent)
    limiter = built.layers.get("limiter")
    if isinstance(limiter, RateLimiter) and limiter.options.key is None:
        admitted = [entry.started for entry in built.checkpoint("admitted")]
        found += limiter_respected(admitted, limiter.options.limits)
    return found
