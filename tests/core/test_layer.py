"""The shared shape of layers (core/layer.py): options written once, one emitter, one describe(), the placement hook,
and observers subscribing by event type (events.py)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import pytest

import resilient_dspy.middleware
from resilient_dspy import Pipeline, Retry, Timeout
from resilient_dspy.core.call import Call, Handler
from resilient_dspy.core.layer import Layer, roles
from resilient_dspy.core.options import Options, options_from
from resilient_dspy.errors import ConfigurationError
from resilient_dspy.events import Event, EventRouter, Rejected


def built_in_layers() -> list[type[Layer]]:
    found = {
        value
        for value in vars(resilient_dspy.middleware).values()
        if isinstance(value, type) and issubclass(value, Layer) and value is not Layer
    }
    return sorted(found, key=lambda kind: kind.__name__)


def is_middleware_class(value: object) -> bool:
    """A class whose instances are middleware: an ``async def __call__`` of its own or inherited."""
    return isinstance(value, type) and any(
        inspect.iscoroutinefunction(vars(kind).get("__call__")) for kind in value.__mro__[:-1]
    )


def test_every_layer_the_library_exports_is_written_on_the_layer_base() -> None:
    exported = {
        name for name, value in vars(resilient_dspy.middleware).items() if is_middleware_class(value) and name[0] != "_"
    }
    assert exported and exported == {kind.__name__ for kind in built_in_layers()}


@pytest.mark.parametrize("layer", built_in_layers(), ids=lambda kind: kind.__name__)
def test_a_layers_constructor_takes_exactly_its_options_with_the_same_defaults(layer: type[Layer]) -> None:
    parameters = {
        name: parameter.default
        for name, parameter in inspect.signature(layer.__init__).parameters.items()
        if name != "self"
    }
    fields = layer.options_type.model_fields
    assert set(parameters) == set(fields)
    for name, default in parameters.items():
        if default is not inspect.Parameter.empty:
            assert fields[name].get_default(call_default_factory=True) == default, name


@pytest.mark.parametrize("layer", built_in_layers(), ids=lambda kind: kind.__name__)
def test_every_layers_options_take_a_name(layer: type[Layer]) -> None:
    assert "name" in layer.options_type.model_fields


async def echo(question: str) -> str:
    return question


class NoteOptions(Options):
    text: str = "hello"
    name: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Noted(Event):
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Refused(Rejected):
    reason: str


class Note(Layer):
    """A minimal layer written on the base: it emits one event per call."""

    placement = "note"
    options_type = NoteOptions

    def __init__(self, text: str = "hello", *, name: str | None = None) -> None:
        self.options = options_from(NoteOptions, "Note", locals())
        self.seen: tuple[tuple[Any, ...], tuple[Any, ...]] | None = None

    def on_build(self, pipeline: Pipeline) -> None:
        self.seen = pipeline.layers_around(self)

    async def __call__(self, call: Call, next: Handler) -> Any:
        self.emit(call, Noted, text=self.options.text)
        return await next(call)


async def test_a_layer_on_the_base_gets_name_describe_and_events_filled_in() -> None:
    events: list[Event] = []
    note = Note("hi", name="note-1")
    pipeline = Pipeline(echo, note, name="qa", listeners=[events.append])
    assert await pipeline("q") == "q"
    (event,) = events
    assert isinstance(event, Noted)
    assert (event.pipeline, event.layer, event.text) == ("qa", "note-1", "hi")
    assert event.time == pytest.approx(pipeline.clock.now(), abs=1.0)
    assert note.describe() == {"layer": "Note", "name": "note-1", "options": {"text": "hi", "name": "note-1"}}
    assert Note().name == "Note"
    assert note.snapshot() is None and note.health() is None


def test_an_unknown_option_of_a_layer_on_the_base_is_refused_naming_it() -> None:
    with pytest.raises(ConfigurationError, match=r"Note\.text"):
        Note(3)  # type: ignore[arg-type]


def test_a_layer_reads_its_place_through_layers_around() -> None:
    note = Note()
    timeout, retry = Timeout(5), Retry(2)
    Pipeline(echo, timeout, retry, note)
    assert note.seen is not None
    outer, inner = note.seen
    assert outer == (timeout, retry) and inner == ()
    assert roles(outer) == {"timeout", "retry"}


async def test_a_listener_subscribed_to_a_type_sees_only_those_events_and_their_subclasses() -> None:
    pipeline = Pipeline(echo, Note(), name="qa")
    only_rejections: list[Event] = []
    notes: list[Event] = []
    pipeline.subscribe(only_rejections.append, to=Rejected)
    pipeline.subscribe(notes.append, to=(Noted,))
    await pipeline("q")
    assert only_rejections == [] and [type(event) for event in notes] == [Noted]


def test_subscribing_to_something_that_is_not_an_event_type_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="to="):
        Pipeline(echo).subscribe(print, to=str)  # type: ignore[arg-type]


def test_an_event_router_calls_the_handlers_of_the_type_and_of_its_bases_most_specific_first() -> None:
    seen: list[str] = []
    router = EventRouter().on(Event, lambda e: seen.append("event")).on(Rejected, lambda e: seen.append("rejected"))
    router.on(Refused, lambda e: seen.append("refused"))
    router(Refused(pipeline="p", layer="l", time=0.0, reason="full"))
    router(Noted(pipeline="p", layer="l", time=0.0, text="x"))
    assert seen == ["refused", "rejected", "event", "event"]


def test_a_rejection_names_its_reason_as_a_label() -> None:
    assert Refused(pipeline="p", layer="l", time=0.0, reason="full").rejection_reason() == "full"
