"""Fallback details pinned by mutation testing: per-alternative filters on Static, exact configuration messages,
names, event times and describe() of a predicate filter."""

from __future__ import annotations

import asyncio
from typing import Any

import dspy
import pytest

from resilient_dspy import Fallback, FallbackFailedError, Pipeline, Static, UseLM
from resilient_dspy.errors import ConfigurationError
from resilient_dspy.events import Event


class Boom(Exception):
    """The error the alternatives under test handle."""


def failing(error: Exception) -> Any:
    async def primary(question: str) -> str:
        await asyncio.sleep(1.5)
        raise error

    return primary


async def test_a_static_alternative_handles_only_the_errors_in_its_on_filter() -> None:
    pipeline = Pipeline(failing(ValueError("other")), Fallback(Static(answer="static", on=Boom)))
    with pytest.raises(FallbackFailedError) as caught:
        await pipeline("q")
    assert caught.value.tried == ("primary",)
    handled = Pipeline(failing(Boom("mine")), Fallback(Static(answer="static", on=[Boom])))
    assert (await handled("q")).answer == "static"


@pytest.mark.parametrize(
    ("kwargs", "rule"),
    [
        ({"factory": lambda inputs: "x", "answer": "y"}, "give either a factory or answer fields, not both"),
        ({}, "needs answer fields (e.g. answer='...') or a factory"),
    ],
)
def test_static_configuration_messages(kwargs: dict[str, Any], rule: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Static(**kwargs)
    assert caught.value.problems == (("Static", rule),)


def test_an_empty_prediction_is_refused_by_name() -> None:
    with pytest.raises(ConfigurationError) as caught:
        Fallback(dspy.Prediction())
    assert caught.value.problems == (("Fallback.alternatives[0]", "an empty dspy.Prediction is not an answer"),)


def test_use_lm_is_named_after_its_model_or_its_type() -> None:
    class Bare(dspy.BaseLM):  # type: ignore[misc]
        def __init__(self) -> None:  # no BaseLM.__init__: no `model` attribute
            pass

    assert UseLM(Bare()).name == "lm:Bare"
    assert UseLM(dspy.LM("openai/x", api_key="k")).name == "lm:openai/x"


async def test_fallback_used_carries_the_pipeline_clock_time() -> None:
    events: list[Event] = []
    pipeline = Pipeline(failing(Boom("late")), Fallback(Static(answer="s")), listeners=[events.append])
    started = asyncio.get_running_loop().time()
    await pipeline("q")
    [used] = events
    assert used.time == pytest.approx(started + 1.5)


def test_describe_shows_a_predicate_filter_by_repr() -> None:
    def only_boom(error: Exception) -> bool:
        return isinstance(error, Boom)

    described = Fallback(Static(answer="s"), on=only_boom).describe()
    assert described["on"] == repr(only_boom)
    assert Fallback(Static(answer="s"), on=(Boom, KeyError)).describe()["on"] == ["Boom", "KeyError"]
