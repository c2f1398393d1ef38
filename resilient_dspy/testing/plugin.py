"""pytest plugin for chaos tests: ``virtual_clock``, ``fault_lm``, ``chaos_server`` and ``chaos_harness`` fixtures.

Registered through the ``pytest11`` entry point (or ``-p resilient_dspy.testing.plugin``). Async fixtures run on
pytest-asyncio's loop; with ``--looptime`` (or ``@pytest.mark.looptime``) that loop runs on virtual time.
``chaos_server`` binds real sockets: mark its tests ``@pytest.mark.looptime(False)`` when looptime is on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

try:
    import pytest
except ImportError as error:  # an optional extra: say which one, not just "No module named"
    raise ImportError("resilient_dspy.testing.plugin needs pytest: pip install 'resilient-dspy[testing]'") from error

try:  # the chaos_server fixture is async; without pytest-asyncio the plugin offers the others
    import pytest_asyncio
except ImportError:  # pragma: no cover - pytest-asyncio is in the testing and dev extras
    pytest_asyncio = None  # type: ignore[assignment]

if TYPE_CHECKING:  # heavy imports (dspy) wait for a fixture that needs them: the plugin loads in every session
    from resilient_dspy.core.pipeline import Pipeline
    from resilient_dspy.testing.chaos_server import ChaosServer
    from resilient_dspy.testing.fault_lm import FaultInjectingLM
    from resilient_dspy.testing.harness import Run
    from resilient_dspy.testing.invariants import Violation

__all__ = ["ChaosHarness", "ManualClock"]


class ManualClock:
    """A clock that moves only when told (``advance``) or when something sleeps on it; deadlines never fire by
    themselves. For unit tests of time logic without any event loop timing."""

    def __init__(self, start: float = 0.0) -> None:
        self.time = start

    def now(self) -> float:
        return self.time

    async def sleep(self, seconds: float) -> None:
        self.time += max(0.0, seconds)

    def advance(self, seconds: float) -> None:
        self.time += seconds

    def deadline(self, when: float) -> asyncio.Timeout:
        return asyncio.timeout_at(None)


@dataclass
class ChaosHarness:
    """Runs N calls through a pipeline concurrently, records everything, and checks the invariants."""

    last: Run | None = None

    async def run(
        self,
        pipeline: Pipeline,
        calls: int | Sequence[str] = 20,
        *,
        concurrency: int | None = None,
        arrivals: Sequence[float] | None = None,
        cancel_after: dict[int, float] | None = None,
        horizon: float = 3600.0,
        journal: Sequence[Any] = (),
        requests_per_attempt: int | None = None,
        check: bool = True,
        max_block: float | None = None,
    ) -> Run:
        """Run the calls (every input field filled); unless ``check=False``, fail the test (AssertionError) on any
        violated invariant, a loop blocked longer than ``max_block`` real seconds included when given."""
        from resilient_dspy.testing.harness import run_calls
        from resilient_dspy.testing.invariants import assert_no_violations

        run = await run_calls(
            pipeline, calls, concurrency=concurrency, arrivals=arrivals, cancel_after=cancel_after, horizon=horizon
        )
        self.last = run
        if check:
            assert_no_violations(self.violations(run, pipeline, journal, requests_per_attempt, max_block))
        return run

    def violations(
        self,
        run: Run,
        pipeline: Pipeline,
        journal: Sequence[Any] = (),
        requests_per_attempt: int | None = None,
        max_block: float | None = None,
    ) -> list[Violation]:
        """Every invariant :func:`check_run` knows, against the recorded run."""
        from resilient_dspy.testing.invariants import check_run

        return check_run(run, pipeline, journal=journal, requests_per_attempt=requests_per_attempt, max_block=max_block)


@pytest.fixture
def virtual_clock() -> ManualClock:
    """A :class:`ManualClock` at t=0 to inject into a Pipeline (``clock=virtual_clock``)."""
    return ManualClock()


@pytest.fixture
def fault_lm() -> FaultInjectingLM:
    """A fault-free local LM; push faults with ``fault_lm.push("rate_limit", ...)``; ``fault_lm.journal``."""
    from resilient_dspy.testing.fault_lm import FaultInjectingLM

    return FaultInjectingLM()


if pytest_asyncio is not None:

    @pytest_asyncio.fixture
    async def chaos_server() -> AsyncIterator[ChaosServer]:
        """A :class:`ChaosServer` on 127.0.0.1 (free port), stopped after the test; real time, real sockets."""
        from resilient_dspy.testing.chaos_server import ChaosServer

        async with ChaosServer(port=0, max_hang=5.0) as server:
            yield server


@pytest.fixture
def chaos_harness() -> ChaosHarness:
    """A :class:`ChaosHarness`: ``await chaos_harness.run(pipeline, 50, journal=lm.journal)`` asserts invariants."""
    return ChaosHarness()
