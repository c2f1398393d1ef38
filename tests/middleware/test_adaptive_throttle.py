"""AdaptiveThrottle: the local refusal rate converges to the SRE formula's fixed point under a provider refusing X %
(hypothesis over X), recovery once the provider recovers, what counts as an accept, neutral outcomes, seeded
draws, partitions, events, validation and what it reports.

Async tests run on looptime's virtual clock (``--looptime``); property tests build a looptime loop per example.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import dspy
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from resilient_dspy import BulkheadFullError, Pipeline, RejectedError, Retry, Timeout
from resilient_dspy.core.call import Call, Handler
from resilient_dspy.errors import ConfigurationError, ThrottledError
from resilient_dspy.events import Event, Rejected
from resilient_dspy.faults import Fault, fault_error
from resilient_dspy.middleware.adaptive_throttle import AdaptiveThrottle, ThrottleRejected
from resilient_dspy.testing.overload import SheddingProvider, offer
from tests.conftest import other_tasks, run_virtual


class Refusing:
    """A provider that refuses each call with a 503 with probability ``share`` (its own seeded rng), else answers
    after 0.05 s; ``reached`` counts the calls it saw."""

    def __init__(self, share: float, seed: int = 1) -> None:
        self.share = share
        self.rng = random.Random(seed)
        self.reached = 0

    async def __call__(self, question: str) -> str:
        self.reached += 1
        await asyncio.sleep(0.05)
        if self.rng.random() < self.share:
            raise fault_error(Fault.SERVER_ERROR, status=503) or AssertionError
        return question


def fixed_point(share: float, k: float, per_window: float) -> float:
    """The refusal probability where the formula holds its own: with every arrival counted as a request, a share
    ``s`` let through and ``1 - share`` of those accepted, ``1 - s = (R - k·R·s·(1 - share)) / (R + 1)``."""
    slack = 1 - k * (1 - share)
    return 0.0 if slack <= 0 else 1 - 1 / (1 + per_window * slack)


# ------------------------------------------------------------------------------------------------ 1. convergence


@settings(max_examples=12, deadline=None)
@given(share=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_the_refusal_rate_converges_to_the_formula(share: float, seed: int) -> None:
    """10 calls/s, a 10 s window, the provider refusing ``share`` of what reaches it: over the last window the share
    refused locally is the formula's fixed point (0 while more than 1/k is accepted), and the snapshot's
    probability is the formula of its own counts."""
    assume(share <= 0.35 or share >= 0.7)  # near 1 - 1/k convergence takes many windows (the factor is k·(1-share))
    rate, window = 10, 10.0

    async def scenario() -> None:
        provider = Refusing(share, seed)
        throttle = AdaptiveThrottle(window=window, buckets=10, rng=random.Random(seed))
        refused_at: list[float] = []
        pipeline = Pipeline(
            provider,
            throttle,
            listeners=[lambda e: refused_at.append(e.time) if isinstance(e, ThrottleRejected) else None],
        )
        offered = await offer(pipeline, rate=rate, duration=6 * window)
        end = asyncio.get_running_loop().time()
        assert offered.errors["ThrottledError"] == len(refused_at)
        last_window = sum(1 for time in refused_at if time >= end - window) / (rate * window)
        assert last_window == pytest.approx(fixed_point(share, 2.0, rate * window), abs=0.08)
        snapshot = throttle.snapshot()
        formula = max(0.0, (snapshot.requests - 2.0 * snapshot.accepts) / (snapshot.requests + 1))
        assert snapshot.reject_probability == pytest.approx(formula)

    run_virtual(scenario)


async def test_a_shedding_provider_sees_about_k_times_what_it_accepts() -> None:
    """A provider that serves 4 calls/s and sheds the rest, offered 20 calls/s for 200 s: unthrottled it sees all
    4,000; throttled (k=2) it sees about twice what it serves, and serves as much."""

    async def run(throttled: bool) -> tuple[int, int]:
        provider = SheddingProvider(capacity=4, latency=0.1)
        layers = [AdaptiveThrottle(window=30.0, rng=random.Random(7))] if throttled else []
        offered = await offer(Pipeline(provider, *layers), rate=20, duration=200)
        return provider.reached, offered.ok

    bare_reached, bare_ok = await run(False)
    reached, ok = await run(True)
    assert bare_reached == 4_000
    assert ok >= 0.95 * bare_ok
    assert reached <= 2.5 * ok and reached < 0.5 * bare_reached


# ------------------------------------------------------------------------------------------------ 2. recovery


async def test_it_recovers_within_a_few_windows_once_the_provider_does() -> None:
    """A window of 100 % refusals, then a healthy provider. Local refusals count as requests, so the window does not
    simply empty: the accepts let through double about every window (``1 + k·accepts``) until they are 1/k of the
    requests. With 100 requests a window that is under log2(100) + 2 windows; then every call reaches the provider."""
    provider = Refusing(1.0)
    throttle = AdaptiveThrottle(window=10.0, buckets=10, rng=random.Random(3))
    pipeline = Pipeline(provider, throttle)
    outage = await offer(pipeline, rate=10, duration=10)
    assert outage.errors["ThrottledError"] > 0.5 * outage.sent
    assert throttle.health().status == "degraded"

    provider.share = 0.0
    recovering = await offer(pipeline, rate=10, duration=90)
    assert recovering.errors["ThrottledError"] > 0  # not at once: that is the formula's caution
    assert throttle.snapshot().reject_probability == 0.0
    reached = provider.reached
    healthy = await offer(pipeline, rate=10, duration=30)
    assert healthy.ok == healthy.sent and provider.reached - reached == healthy.sent
    assert throttle.health().status == "ok"
    assert not other_tasks()


# ------------------------------------------------------------------------------------------------ 3. what counts


class Below:
    """Just below the throttle: ``hit`` answers without the provider, ``full`` is an inner refusal."""

    async def __call__(self, call: Call, next: Handler) -> Any:
        question = call.inputs["question"]
        if question == "hit":
            return "cached"
        if question == "full":
            raise BulkheadFullError("inner")
        return await next(call)


async def failing(question: str) -> str:
    if question == "400":
        raise dspy.LMInvalidRequestError("bad request")
    if question == "500":
        raise fault_error(Fault.SERVER_ERROR, status=500) or AssertionError
    if question == "429":
        raise fault_error(Fault.RATE_LIMIT) or AssertionError
    if question == "slow":
        await asyncio.sleep(10)
    return question


async def outcome(pipeline: Pipeline, question: str) -> str:
    try:
        return str(await pipeline(question=question))
    except Exception as error:
        return type(error).__name__


@pytest.mark.parametrize(
    ("question", "requests", "accepts"),
    [
        ("ok", 1, 1),
        ("400", 1, 1),  # the provider answered: a client error is no overload
        ("500", 1, 1),  # a bug, not a refusal
        ("429", 1, 0),
        ("slow", 1, 0),  # the attempt timeout below
        ("hit", 0, 0),
        ("full", 0, 0),
    ],
)
async def test_what_counts_as_a_request_and_an_accept(question: str, requests: int, accepts: int) -> None:
    throttle = AdaptiveThrottle()
    pipeline = Pipeline(failing, throttle, Timeout(1.0), Below())
    await outcome(pipeline, question)
    snapshot = throttle.snapshot()
    assert (snapshot.requests, snapshot.accepts) == (requests, accepts)


async def test_a_cancelled_call_counts_nothing() -> None:
    throttle = AdaptiveThrottle()
    pipeline = Pipeline(failing, throttle)
    task = asyncio.create_task(pipeline(question="slow"))
    await asyncio.sleep(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (throttle.snapshot().requests, throttle.snapshot().accepts) == (0, 0)


async def test_overload_on_decides_what_is_a_refusal() -> None:
    throttle = AdaptiveThrottle(overload_on=dspy.LMInvalidRequestError)
    pipeline = Pipeline(failing, throttle)
    await outcome(pipeline, "429")  # first: after it nothing may be refused (so no draw decides this test)
    await outcome(pipeline, "400")
    assert (throttle.snapshot().requests, throttle.snapshot().accepts) == (2, 1)


# ------------------------------------------------------------------------------------------------ 4. the refusal


async def test_a_local_refusal_is_a_rejection_that_retry_does_not_retry() -> None:
    events: list[Event] = []
    throttle = AdaptiveThrottle(k=1.0, rng=random.Random(0))
    provider = Refusing(1.0)
    pipeline = Pipeline(provider, Retry(5, base_delay=0.1), throttle, listeners=[events.append])
    results = [await outcome(pipeline, f"q{i}") for i in range(30)]
    assert "ThrottledError" in results
    refused = [e for e in events if isinstance(e, Rejected)]
    assert refused and all(isinstance(e, ThrottleRejected) for e in refused)
    assert all(e.rejection_reason() == "throttled" and 0 < e.probability < 1 for e in refused)
    assert issubclass(ThrottledError, RejectedError)
    # each refused call went no further: the provider saw only what the throttle let through, retries included
    let_through = sum(1 for e in events if type(e).__name__ == "RetryScheduled") + 30 - results.count("ThrottledError")
    assert provider.reached <= let_through


async def test_the_same_seed_refuses_the_same_calls() -> None:
    async def refusals(seed: int) -> list[str]:
        pipeline = Pipeline(Refusing(0.8, seed=5), AdaptiveThrottle(rng=random.Random(seed)))
        return [await outcome(pipeline, f"q{i}") for i in range(200)]

    assert await refusals(11) == await refusals(11)
    assert "ThrottledError" in await refusals(11)


async def test_each_key_has_its_own_window() -> None:
    async def program(question: str) -> str:
        if question.startswith("bad"):
            raise fault_error(Fault.SERVER_ERROR, status=503) or AssertionError
        return question

    throttle = AdaptiveThrottle(key=lambda call: call.inputs["question"][:3], rng=random.Random(1))
    pipeline = Pipeline(program, throttle)
    for i in range(50):
        await outcome(pipeline, f"bad{i}")
        await outcome(pipeline, f"god{i}")
    assert throttle.snapshot("bad").reject_probability > 0.5
    assert throttle.snapshot("god").reject_probability == 0.0
    assert throttle.health().details["throttling"] == ["bad"]


async def test_describe_shows_the_options_without_the_callables() -> None:
    throttle = AdaptiveThrottle(k=1.5, rng=random.Random(1), name="throttle")
    described = Pipeline(failing, throttle).describe()[0]
    assert described["layer"] == "AdaptiveThrottle" and described["name"] == "throttle"
    assert described["options"]["k"] == 1.5 and described["options"]["seeded"] is True
    assert "rng" not in described["options"]


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"k": 0.5}, "k"),
        ({"window": 0.0}, "window"),
        ({"buckets": 0}, "buckets"),
        ({"max_probability": 0.0}, "max_probability"),
        ({"overload_on": "503"}, "overload_on"),
        ({"rng": 42}, "rng"),
    ],
)
def test_a_bad_option_is_a_configuration_error_naming_the_field(arguments: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        AdaptiveThrottle(**arguments)
    assert f"AdaptiveThrottle.{field}" in str(caught.value)


async def test_max_probability_caps_the_refusals_and_speeds_recovery() -> None:
    """Capped at 0.5, a total outage still lets about half the calls through, and the same recovery as above takes
    one window instead of several."""
    provider = Refusing(1.0)
    throttle = AdaptiveThrottle(window=10.0, buckets=10, max_probability=0.5, rng=random.Random(3))
    pipeline = Pipeline(provider, throttle)
    outage = await offer(pipeline, rate=10, duration=10)
    assert throttle.snapshot().reject_probability == 0.5
    assert 0.3 * outage.sent < outage.errors["ThrottledError"] < 0.7 * outage.sent
    provider.share = 0.0
    await offer(pipeline, rate=10, duration=11)
    assert throttle.snapshot().reject_probability == 0.0
