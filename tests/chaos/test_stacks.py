"""Generated fault schedules through generated pipelines, on virtual time: every invariant of design.md §6 holds.

Each example builds a fresh stack (:func:`stack_configs`) over a :class:`ScriptedProgram` that follows a generated
schedule, runs generated arrivals (some calls cancelled by their caller) through it, and checks the invariants
with :func:`check_built`: no lost call, deadline, attempts and retry budget, cancellation never retried, permanent
errors never retried, half-open probes, bulkhead in-flight, limiter windows, cache freshness, no orphan tasks.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from resilient_dspy.testing import Fault, FaultStep
from resilient_dspy.testing.harness import Run, ScriptedProgram, StackConfig, run_calls
from resilient_dspy.testing.invariants import Violation, assert_no_violations, check_built
from resilient_dspy.testing.strategies import Arrival, arrivals, fault_schedules, stack_configs
from tests.chaos._support import examples
from tests.conftest import run_virtual

HORIZON = 5_000.0


def bounded(config: StackConfig) -> bool:
    """A stack that bounds every call's time: a total timeout, or an attempt timeout (attempts are finite)."""
    return config.total_timeout is not None or config.attempt_timeout is not None


def exercise(
    config: StackConfig,
    schedule: list[FaultStep],
    pattern: list[Arrival],
    cancels: dict[int, float],
    distinct: int | None = None,
) -> tuple[Run, list[Violation]]:
    """Run the pattern through a fresh stack; ``distinct`` questions repeat so a Cache has something to serve."""

    async def scenario() -> tuple[Run, list[Violation]]:
        program = ScriptedProgram(schedule)
        built = config.build(program)
        questions = [f"q{i % distinct}" if distinct else f"q{i}" for i in range(len(pattern))]
        run = await run_calls(
            built.pipeline,
            questions,
            arrivals=[a.at for a in pattern],
            cancel_after={k: v for k, v in cancels.items() if k < len(pattern)},
            horizon=HORIZON,
        )
        return run, check_built(run, built, program.journal)

    return run_virtual(scenario)


def expected(config: StackConfig, schedule: list[FaultStep], violations: list[Violation]) -> list[Violation]:
    """Violations that are real bugs: a stack with no timeout may lose a call to a hang, and only that."""
    if bounded(config) or all(step.fault is not Fault.HANG for step in schedule):
        return violations
    return [v for v in violations if not (v.invariant == "no_lost_call" and "still running" in v.message)]


cancellations = st.dictionaries(st.integers(0, 24), st.sampled_from([0.0, 0.05, 0.3, 1.0, 4.0]), max_size=3)


@examples(30)
@given(
    config=stack_configs(),
    schedule=fault_schedules(max_size=30),
    pattern=arrivals(max_size=25),
    cancels=cancellations,
)
def test_any_stack_under_any_schedule_keeps_the_invariants(
    config: StackConfig, schedule: list[FaultStep], pattern: list[Arrival], cancels: dict[int, float]
) -> None:
    """The full property: any valid stack, any fault schedule, any arrivals and caller cancellations."""
    _, violations = exercise(config, schedule, pattern, cancels)
    assert_no_violations(expected(config, schedule, violations))


@examples(15)
@given(
    config=stack_configs(cache=True, fallback=False),
    schedule=fault_schedules(max_size=20),
    pattern=arrivals(max_size=20),
    distinct=st.integers(1, 4),
)
def test_cache_under_faults_serves_fresh_successes_only(
    config: StackConfig, schedule: list[FaultStep], pattern: list[Arrival], distinct: int
) -> None:
    """Repeated questions through a cached stack: hits only within ttl, and only of answers that succeeded."""
    _, violations = exercise(config, schedule, pattern, {}, distinct=distinct)
    assert_no_violations(expected(config, schedule, violations))


@examples(15)
@given(
    config=stack_configs(breaker=True, retry=True, timeouts=True),
    fault=st.sampled_from(list(Fault)),
    length=st.integers(1, 30),
    pattern=arrivals(min_size=5, max_size=25),
)
def test_each_failure_mode_alone(config: StackConfig, fault: Fault, length: int, pattern: list[Arrival]) -> None:
    """A run of one failure mode (then recovery) through a breaker and retry stack keeps every invariant."""
    schedule = [FaultStep(fault)] * length
    _, violations = exercise(config, schedule, pattern, {})
    assert_no_violations(expected(config, schedule, violations))


@examples(10)
@given(config=stack_configs(timeouts=True), pattern=arrivals(min_size=3, max_size=15))
def test_a_storm_of_hangs_costs_time_not_calls(config: StackConfig, pattern: list[Arrival]) -> None:
    """Every request hangs: with a timeout in the stack every call still ends, typed, within its deadline."""
    schedule = [FaultStep(Fault.HANG)] * 200
    run, violations = exercise(config, schedule, pattern, {})
    assert_no_violations(expected(config, schedule, violations))
    if bounded(config):
        assert all(not call.hung for call in run.calls)
