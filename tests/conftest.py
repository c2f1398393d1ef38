"""Shared test setup: DSPy's cache in a temp dir, virtual loop time for every async test (see pyproject)."""

from __future__ import annotations

import asyncio
import os
import tempfile

os.environ.setdefault("DSPY_CACHEDIR", tempfile.mkdtemp(prefix="resilient-dspy-test-cache-"))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import pytest

from resilient_dspy.testing import FaultInjectingLM


@pytest.fixture
def fault_lm() -> FaultInjectingLM:
    """A fault-free local LM; push faults with ``fault_lm.push("rate_limit", ...)``."""
    return FaultInjectingLM()


def other_tasks() -> set[asyncio.Task[object]]:
    """Tasks still alive besides the current one (for no-orphan checks)."""
    current = asyncio.current_task()
    return {task for task in asyncio.all_tasks() if task is not current and not task.done()}
