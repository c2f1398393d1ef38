"""The pytest plugin: its fixtures work here (tests/conftest.py loads it), and a fresh pytest session gets it from
the ``pytest11`` entry point."""

from __future__ import annotations

import asyncio
import time

import dspy
import pytest

from resilient_dspy import Pipeline, Retry, Timeout
from resilient_dspy.testing import FaultInjectingLM
from resilient_dspy.testing.plugin import ChaosHarness, ManualClock

pytest_plugins = ["pytester"]


async def test_virtual_clock_moves_only_when_told(virtual_clock: ManualClock) -> None:
    """Sleeping advances it by exactly the sleep; nothing else does."""
    assert virtual_clock.now() == 0.0
    await virtual_clock.sleep(2.5)
    virtual_clock.advance(0.5)
    assert virtual_clock.now() == 3.0


async def test_harness_passes_a_sturdy_pipeline(chaos_harness: ChaosHarness) -> None:
    """Rate limits, 5xx and hangs through timeout + retry: every invariant holds, and the run is recorded."""
    lm = FaultInjectingLM(profile={"rate_limit": 0.2, "server_error": 0.2, "hang": 0.1}, seed=3)
    pipeline = Pipeline(dspy.Predict("question -> answer"), Timeout(10), Retry(3, base_delay=0.1), Timeout(1))
    with dspy.context(lm=lm):
        run = await chaos_harness.run(pipeline, 30, concurrency=10, journal=lm.journal, requests_per_attempt=2)
    assert len(run.calls) == 30 and chaos_harness.last is run
    assert lm.requests >= 30


async def test_harness_fails_a_pipeline_that_loses_calls(chaos_harness: ChaosHarness) -> None:
    """Hangs with no timeout: the harness reports the lost calls by index instead of hanging the test."""
    lm = FaultInjectingLM(script=["hang", "ok"], seed=0)
    pipeline = Pipeline(dspy.Predict("question -> answer"), Retry(2, base_delay=0.0))
    with dspy.context(lm=lm), pytest.raises(AssertionError, match=r"no_lost_call \(call 0\): still running"):
        await chaos_harness.run(pipeline, 2, horizon=60.0)
    assert not {t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()}


def test_the_entry_point_loads_the_plugin(pytester: pytest.Pytester) -> None:
    """A fresh session (no conftest, no ``-p``) gets every fixture from the installed entry point."""
    pytester.makepyfile(
        """
        import dspy
        from resilient_dspy import Pipeline, Timeout

        async def test_fixtures(virtual_clock, fault_lm, chaos_harness):
            pipeline = Pipeline(dspy.Predict("question -> answer"), Timeout(5))
            fault_lm.push("server_error")
            with dspy.context(lm=fault_lm):
                run = await chaos_harness.run(pipeline, 3, journal=fault_lm.journal)
            assert sum(call.ok for call in run.calls) == 2
            assert virtual_clock.now() == 0.0
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-o", "asyncio_mode=auto", "-o", "addopts=")
    result.assert_outcomes(passed=1)


async def test_harness_feeds_every_input_of_a_multi_input_program(chaos_harness: ChaosHarness) -> None:
    """A `(question, context, top_k: int)` program gets all three, typed from its signature, on every call."""
    received: list[tuple[str, str, int]] = []

    async def program(question: str, context: str, top_k: int) -> dspy.Prediction:
        received.append((question, context, top_k))
        return dspy.Prediction(answer=question)

    run = await chaos_harness.run(Pipeline(program, Timeout(5)), 5)
    assert all(call.ok for call in run.calls)
    assert sorted(question for question, _, _ in received) == sorted(call.question for call in run.calls)
    assert all(context and isinstance(top_k, int) for _, context, top_k in received)


async def test_harness_fails_a_program_that_blocks_the_loop(chaos_harness: ChaosHarness) -> None:
    """An async program that time.sleep()s: with max_block, the harness names the block instead of passing."""

    async def program(question: str) -> dspy.Prediction:
        time.sleep(0.25)  # noqa: ASYNC251 - the blocking call under test
        return dspy.Prediction(answer=question)

    with pytest.raises(AssertionError, match=r"loop_not_blocked: the loop was blocked for"):
        await chaos_harness.run(Pipeline(program, Timeout(0.1)), 2, concurrency=1, max_block=0.2)
    assert chaos_harness.last is not None and chaos_harness.last.longest_block >= 0.25
