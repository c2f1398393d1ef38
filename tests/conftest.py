"""Shared test setup: DSPy's cache in a temp dir, virtual loop time for every async test (see pyproject).

The ``fault_lm``, ``virtual_clock``, ``chaos_server`` and ``chaos_harness`` fixtures come from our pytest plugin,
loaded here (``-p no:resilient_dspy`` in pyproject stops the entry point loading it first) so that the
environment below is set before anything imports DSPy: DSPy reads ``DSPY_CACHEDIR`` once, at import.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

os.environ.setdefault("DSPY_CACHEDIR", tempfile.mkdtemp(prefix="resilient-dspy-test-cache-"))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

pytest_plugins = ["resilient_dspy.testing.plugin"]


def other_tasks() -> set[asyncio.Task[object]]:
    """Tasks still alive besides the current one (for no-orphan checks)."""
    current = asyncio.current_task()
    return {task for task in asyncio.all_tasks() if task is not current and not task.done()}


T = TypeVar("T")


def run_virtual(scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run one scenario on a fresh looptime loop (virtual time), closed after: hypothesis examples must not share
    the test's loop or function fixtures; a hang fails at once, virtually."""
    import looptime

    async def bounded() -> T:
        async with asyncio.timeout(1_000_000):  # in the scenario's own task: no wrapper task left beside it
            return await scenario()

    loop = looptime.new_event_loop()
    try:
        return loop.run_until_complete(bounded())
    finally:
        loop.close()


@pytest.fixture(scope="session")
def redis_url() -> Any:
    """A real redis-server's URL (see tests/redis_server.py); skips with the reason when none can be had."""
    from tests.redis_server import redis_server, url_from_environment

    url = url_from_environment()
    if url is not None:
        yield url
        return
    try:
        with redis_server() as started:
            yield started
    except RuntimeError as error:
        pytest.skip(f"no redis-server: {error}")


@pytest.fixture
async def redis_store(redis_url: str) -> Any:
    """A :class:`RedisStore` on that server with a prefix of this test's own, closed after the test."""
    import uuid

    from resilient_dspy.store import RedisStore

    store = RedisStore(redis_url, prefix=f"test-{uuid.uuid4().hex[:12]}", timeout=2.0)  # a loaded CI box is slow
    yield store
    await store.aclose()
