"""The strategies draw only valid values: every schedule parses, every configuration builds and runs."""

from __future__ import annotations

from hypothesis import given, settings

from resilient_dspy.testing import Fault, FaultStep
from resilient_dspy.testing.harness import ScriptedProgram, StackConfig
from resilient_dspy.testing.strategies import Arrival, arrivals, fault_schedules, stack_configs


@settings(max_examples=40, deadline=None)
@given(schedule=fault_schedules(max_size=10), pattern=arrivals(max_size=10))
def test_schedules_and_arrivals_are_well_formed(schedule: list[FaultStep], pattern: list[Arrival]) -> None:
    for step in schedule:
        assert isinstance(step.fault, Fault)
        assert step.retry_after is None or step.fault is Fault.RATE_LIMIT
    times = [a.at for a in pattern]
    assert times == sorted(times) and times[0] >= 0


@settings(max_examples=40, deadline=None)
@given(config=stack_configs())
def test_every_configuration_builds_in_the_recommended_order(config: StackConfig) -> None:
    built = config.build(ScriptedProgram())
    names = [type(layer).__name__ for layer in built.pipeline.layers]
    order = ["Fallback", "RateLimiter", "Retry", "CircuitBreaker", "Bulkhead", "Cache"]
    ranks = [order.index(name) for name in names if name in order]
    assert ranks == sorted(ranks)
    assert ("Cache" in names) == config.cache and ("Retry" in names) == (config.retry is not None)
    if config.total_timeout is not None and config.attempt_timeout is not None:
        assert config.attempt_timeout <= config.total_timeout
