"""AdaptiveTimeout: the attempt timeout follows each model's recent latency, within its bounds (virtual time)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from resilient_dspy import AdaptiveTimeout, Pipeline, RetriesExhaustedError, Retry, Timeout, TimeoutExceededError
from resilient_dspy.errors import ConfigurationError
from resilient_dspy.events import Event, TimeoutFired
from tests.conftest import other_tasks


class Model:
    """An async program whose latency per call is set by ``latency`` (seconds; None hangs)."""

    def __init__(self, latency: float | None) -> None:
        self.latency = latency
        self.calls = 0

    async def __call__(self, question: str, model: str = "a") -> str:
        self.calls += 1
        if self.latency is None:
            await asyncio.Event().wait()
        await asyncio.sleep(self.latency or 0)
        return "ok"


def adaptive(**options: Any) -> AdaptiveTimeout:
    return AdaptiveTimeout(60.0, min_samples=5, window=20, key=lambda call: call.inputs.get("model", "a"), **options)


async def test_a_slow_model_is_not_cut_before_its_latency_is_known() -> None:
    model = Model(latency=40.0)
    pipeline = Pipeline(model, Timeout(600.0), Retry(2, base_delay=0.0), adaptive())
    assert await pipeline("q") == "ok"
    assert model.calls == 1


async def test_once_latency_is_known_a_hang_is_cut_at_the_multiple_of_its_p99() -> None:
    model = Model(latency=2.0)
    layer = adaptive(multiple=3.0)
    events: list[Event] = []
    pipeline = Pipeline(model, Timeout(600.0), Retry(1), layer, listeners=[events.append])
    for _ in range(5):
        await pipeline("q")
    model.latency = None
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(RetriesExhaustedError) as caught:
        await pipeline("q")
    assert loop.time() - started == pytest.approx(6.0, abs=0.11)
    assert isinstance(caught.value.last_error, TimeoutExceededError)
    assert [event.timeout for event in events if isinstance(event, TimeoutFired)] == [pytest.approx(6.0, abs=0.11)]
    assert not other_tasks()


async def test_a_model_that_slows_down_raises_its_own_timeout_instead_of_failing_forever() -> None:
    model = Model(latency=1.0)
    pipeline = Pipeline(
        model, Timeout(600.0), Retry(4, base_delay=0.0, budget=None), adaptive(multiple=2.0, min_seconds=1.0)
    )
    for _ in range(5):
        await pipeline("q")
    model.latency = 10.0  # 2 x p99 is 2 s now: cut, then 4 s, 8 s, 16 s
    assert await pipeline("q") == "ok"
    assert model.calls == 5 + 4


async def test_the_timeout_never_goes_above_the_ceiling_or_below_the_floor() -> None:
    fast, slow = Model(latency=0.01), Model(latency=50.0)
    fast_layer, slow_layer = adaptive(min_seconds=0.5), adaptive(multiple=3.0)
    fast_pipeline, slow_pipeline = (
        Pipeline(fast, Timeout(600.0), Retry(1), fast_layer),
        Pipeline(slow, Timeout(600.0), Retry(1), slow_layer),
    )
    for _ in range(5):
        await fast_pipeline("q")
        await slow_pipeline("q")
    assert fast_layer.timeout_for(fast_pipeline.new_call({"question": "q"})) == 0.5
    assert slow_layer.timeout_for(slow_pipeline.new_call({"question": "q"})) == 60.0


async def test_each_model_has_its_own_latencies() -> None:
    model = Model(latency=1.0)
    layer = adaptive(multiple=3.0)
    pipeline = Pipeline(model, Timeout(600.0), Retry(1), layer)
    for _ in range(5):
        await pipeline("q", model="fast")
    model.latency = 30.0
    assert await pipeline("q", model="slow") == "ok"  # a model not seen yet gets the ceiling
    with pytest.raises(RetriesExhaustedError):
        await pipeline("q", model="fast")


async def test_a_retried_timeout_gives_up_as_retry_says() -> None:
    model = Model(latency=1.0)
    pipeline = Pipeline(model, Timeout(600.0), Retry(2, base_delay=0.0), adaptive())
    for _ in range(5):
        await pipeline("q")
    model.latency = None
    with pytest.raises(RetriesExhaustedError) as caught:
        await pipeline("q")
    assert isinstance(caught.value.last_error, TimeoutExceededError)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"min_seconds": 90.0}, "AdaptiveTimeout"),
        ({"min_samples": 500}, "AdaptiveTimeout"),
        ({"multiple": 0.5}, "AdaptiveTimeout.multiple"),
        ({"quantile": 0.0}, "AdaptiveTimeout.quantile"),
        ({"window": 0}, "AdaptiveTimeout.window"),
    ],
)
def test_bad_options_are_refused_naming_the_field(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError, match=field):
        AdaptiveTimeout(60.0, **options)


def test_it_describes_itself_by_placement() -> None:
    layer = AdaptiveTimeout(60.0)
    Pipeline(Model(1.0), Timeout(600.0), Retry(2), layer)
    assert layer.name == "AdaptiveTimeout(attempt)"
    assert layer.describe()["options"]["multiple"] == 3.0
