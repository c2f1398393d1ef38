"""Every invariant that applies, at once: the bounds a pipeline promises are read from its layers, then each
checker runs on what the harness recorded."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from resilient_dspy.core.pipeline import Pipeline
from resilient_dspy.middleware.breaker import CircuitBreaker
from resilient_dspy.middleware.bulkhead import Bulkhead
from resilient_dspy.middleware.cache import Cache
from resilient_dspy.middleware.fallback import Fallback, Static
from resilient_dspy.middleware.ratelimit import RateLimiter
from resilient_dspy.middleware.retry import Retry, RetryBudget
from resilient_dspy.middleware.timeout import Timeout
from resilient_dspy.testing.harness import Built, Run
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
from resilient_dspy.testing.invariants.retries import (
    attempts_within_bounds,
    cancellation_not_retried,
    permanent_errors_not_retried,
    retry_budget_respected,
)
from resilient_dspy.testing.invariants.violation import Violation

__all__ = ["Expectations", "check_built", "check_run", "expectations"]


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
        # counted from the answer, a passage that never reached the provider (a hit, an inner rejection) is refunded
        every = limiter.options.counts_from == "admission"
        passed = built.checkpoint("admitted")
        admitted = [entry.started for entry in passed if every or getattr(entry, "reached", None) is not False]
        found += limiter_respected(admitted, limiter.options.limits)
    return found
