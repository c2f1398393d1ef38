"""Fallback: when the layers below fail, try ordered alternatives; record which one served.

An alternative is another program (or pipeline), the same stack under another LM (``UseLM``), or a static
answer (``Static``). Each may narrow the errors it handles with ``on=``; an error matches when it, or the
last error inside a :class:`RetriesExhaustedError`, is an instance of a listed type (or the predicate says
so). Cancellation is never handled, and by default neither is a user mistake (no LM configured, a ``TypeError``
or ``AttributeError`` in the program, a ``ConfigurationError``), from the primary or an alternative: no answer
fixes a bug, so it propagates; an explicit ``on=`` is taken as written. If every eligible alternative fails,
:class:`FallbackFailedError` (an ``ExceptionGroup``) holds every error in the order tried. A streamed call is not
served by an alternative once a chunk reached the consumer (:mod:`resilient_dspy.core.stream`).
"""

from __future__ import annotations

import copy
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import dspy
from pydantic import Field, field_serializer, field_validator

from resilient_dspy.binding.targets import Target
from resilient_dspy.config.kinds import import_path
from resilient_dspy.core.call import Call, Handler
from resilient_dspy.core.layer import Layer
from resilient_dspy.core.options import Options, options_from
from resilient_dspy.core.pipeline import Pipeline, adapt_program
from resilient_dspy.core.stream import stream_started
from resilient_dspy.errors import ConfigurationError, ErrorKind, FallbackFailedError, RetriesExhaustedError, classify
from resilient_dspy.events import Event
from resilient_dspy.middleware._shared.filters import normalise_filter

__all__ = [
    "DEFAULT_ON",
    "Alternative",
    "Fallback",
    "FallbackOptions",
    "FallbackUsed",
    "Static",
    "UseLM",
    "UseProgram",
    "is_user_mistake",
]

logger = logging.getLogger("resilient_dspy.fallback")

ErrorFilter = tuple[type[Exception], ...] | Callable[[Exception], bool]


class _AnyButUserMistakes:
    """The default ``on=``: every error except a configuration or programming error, which no answer can fix."""

    def __call__(self, error: Exception) -> bool:
        return not is_user_mistake(error)

    def __repr__(self) -> str:
        return "every error but a user mistake"

    def __copy__(self) -> _AnyButUserMistakes:
        return self  # stateless: the default stays one object, however pydantic copies field defaults

    def __deepcopy__(self, memo: dict[int, Any]) -> _AnyButUserMistakes:
        return self


DEFAULT_ON: Callable[[Exception], bool] = _AnyButUserMistakes()
"""Fallback's default filter: serve for any failure but a user mistake (no LM configured, a TypeError...)."""


class Alternative(ABC):
    """One fallback: ``name`` labels it in the outcome; ``on`` narrows which errors it handles."""

    name: str
    on: ErrorFilter | None

    @abstractmethod
    async def run(self, call: Call, primary: Handler) -> Any:
        """Produce the answer; ``primary`` is the fallback's inner stack, for alternatives that rerun it."""

    def describe(self) -> dict[str, Any]:
        """The alternative as a config table (``{"kind": "Static", ...}``): what ``Pipeline.from_config`` rebuilds."""
        described = {"kind": kind_of_class(type(self)), "name": self.name, **self.describe_fields()}
        if self.on is not None:
            described["on"] = describe_filter(self.on)
        return described

    def describe_fields(self) -> dict[str, Any]:
        """What the alternative is made of, as config values (overridden by each kind)."""
        return {}


class UseLM(Alternative):
    """Run the same inner stack with another LM (``dspy.context(lm=...)``, per task, safe under concurrency)."""

    def __init__(self, lm: dspy.BaseLM, *, name: str | None = None, on: Any = None) -> None:
        if not isinstance(lm, dspy.BaseLM):
            raise ConfigurationError([("UseLM.lm", f"must be a dspy.LM (got {lm!r:.80})")])
        self.lm = lm
        self.name = name or f"lm:{getattr(lm, 'model', type(lm).__name__)}"
        self.on = normalise_filter(on) if on is not None else None

    async def run(self, call: Call, primary: Handler) -> Any:
        with dspy.context(lm=self.lm):
            return await primary(call)

    def describe_fields(self) -> dict[str, Any]:
        return {"lm": describe_lm(self.lm)}


class UseProgram(Alternative):
    """Run another program: a ``dspy.Module``, ``dspy.LM``, ``Pipeline`` or ``async def`` on the same inputs."""

    def __init__(self, program: Any, *, name: str | None = None, on: Any = None) -> None:
        problems: list[tuple[str, str]] = []
        target = adapt_program(program, problems)
        if target is None:
            raise ConfigurationError([(f"UseProgram.{field}", rule) for field, rule in problems])
        self.program = program
        self.target: Target = target
        self.name = name or f"program:{target.name}"
        self.on = normalise_filter(on) if on is not None else None

    async def run(self, call: Call, primary: Handler) -> Any:
        return await self.target(call)

    def describe_fields(self) -> dict[str, Any]:
        return {"program": import_path(self.program) or self.target.name}


class Static(Alternative):
    """A fixed answer: a fresh ``dspy.Prediction(**fields)`` each time, or ``factory(inputs)``'s return value."""

    def __init__(
        self,
        factory: Callable[[dict[str, Any]], Any] | None = None,
        *,
        name: str = "static",
        on: Any = None,
        **fields: Any,
    ) -> None:
        if factory is not None and fields:
            raise ConfigurationError([("Static", "give either a factory or answer fields, not both")])
        if factory is None and not fields:
            raise ConfigurationError([("Static", "needs answer fields (e.g. answer='...') or a factory")])
        if factory is not None and not callable(factory):
            raise ConfigurationError([("Static.factory", f"must be callable (got {factory!r:.80})")])
        self.factory = factory
        self.fields = fields
        self.name = name
        self.on = normalise_filter(on) if on is not None else None

    async def run(self, call: Call, primary: Handler) -> Any:
        if self.factory is not None:
            return self.factory(call.inputs)
        return dspy.Prediction(**copy.deepcopy(self.fields))

    def describe_fields(self) -> dict[str, Any]:
        if self.factory is not None:
            return {"factory": import_path(self.factory) or repr(self.factory)}
        return copy.deepcopy(self.fields)


class FallbackOptions(Options):
    alternatives: tuple[Any, ...] = Field(min_length=1, description="Tried in order after the primary fails.")
    on: Any = Field(
        default=DEFAULT_ON,
        description="Errors the fallback handles at all (types or predicate); default: all but user mistakes.",
    )
    name: str | None = Field(default=None, description="Label in events and describe().")

    @field_serializer("on")
    def _dump_on(self, value: Any) -> Any:
        """The filter as ``describe()`` shows it, so a config built from a description knows the default."""
        return describe_filter(value)

    @field_validator("on")
    @classmethod
    def _check_on(cls, value: Any) -> Any:
        value = normalise_filter(value)
        if isinstance(value, tuple):
            if not value or not all(isinstance(t, type) and issubclass(t, Exception) for t in value):
                raise ValueError("must be Exception subclasses or a predicate")
        elif not callable(value):
            raise ValueError("must be Exception subclasses or a predicate")
        return value


@dataclass(frozen=True, slots=True, kw_only=True)
class FallbackUsed(Event):
    """``alternative`` is being tried because of ``error``."""

    alternative: str
    error: BaseException


class Fallback(Layer):
    """On failure below, try each alternative in order; the first success is the answer."""

    placement: ClassVar[str] = "fallback"
    options_type: ClassVar[type[Options]] = FallbackOptions
    options: FallbackOptions

    def __init__(self, *alternatives: Any, on: Any = DEFAULT_ON, name: str | None = None) -> None:
        problems: list[tuple[str, str]] = []
        converted = [_as_alternative(a, i, problems) for i, a in enumerate(alternatives)]
        try:
            self.options = options_from(FallbackOptions, "Fallback", locals())
        except ConfigurationError as error:
            problems[:0] = error.problems
        if problems:
            raise ConfigurationError(problems)
        self.alternatives: tuple[Alternative, ...] = tuple(a for a in converted if a is not None)
        self.on: ErrorFilter = self.options.on
        self._mistakes_pass = self.on is DEFAULT_ON  # then an alternative's user mistake propagates too

    def on_build(self, pipeline: Pipeline) -> None:
        """Refuse a ``Static`` answer that lacks an output field every answer of the program has."""
        outputs = getattr(pipeline.target, "output_fields", None)
        if not outputs:
            return
        problems = []
        for index, alternative in enumerate(self.alternatives):
            if isinstance(alternative, Static) and alternative.factory is None:
                missing = [name for name in outputs if name not in alternative.fields]
                if missing:
                    problems.append(
                        (
                            f"Fallback.alternatives[{index}]",
                            f"Static {alternative.name!r} lacks output field(s) {missing} of {pipeline.target.name} "
                            f"(it answers {list(outputs)}): callers reading them would fail",
                        )
                    )
        if problems:
            raise ConfigurationError(problems)

    async def __call__(self, call: Call, next: Handler) -> Any:
        call.record.served_by = "primary"  # a retry above us starts afresh: an earlier pass's alternative is gone
        try:
            return await next(call)
        except Exception as error:
            if not matches(self.on, error) or stream_started():  # after a chunk, another answer would mix with it
                raise
            first_error = error
        errors: list[Exception] = [first_error]
        tried = ["primary"]
        latest: Exception = first_error
        for alternative in self.alternatives:
            if alternative.on is not None and not matches(alternative.on, latest):
                continue
            self.emit(call, FallbackUsed, alternative=alternative.name, error=latest)
            try:
                value = await alternative.run(call, next)
            except Exception as error:
                if self._mistakes_pass and is_user_mistake(error):
                    raise  # a bug in an alternative: the next one must not cover it up
                errors.append(error)
                tried.append(alternative.name)
                latest = error
                continue
            call.record.served_by = alternative.name
            logger.warning(
                "%s: served by %r after %s: %s", call.runtime.name, alternative.name, type(latest).__name__, latest
            )
            return value
        raise FallbackFailedError(
            f"all {len(tried)} tried of {len(self.alternatives) + 1} options failed ({', '.join(tried)})",
            errors,
            tried,
        )

    def describe(self) -> dict[str, Any]:
        """The options as a config: each alternative's table, the filter's types by import path (or its repr)."""
        options = {
            "alternatives": [alternative.describe() for alternative in self.alternatives],
            "on": describe_filter(self.on),
            "name": self.options.name,
        }
        return {"layer": "Fallback", "name": self.name, "options": options}


def describe_filter(on: ErrorFilter) -> Any:
    """An ``on=`` filter as config text: its types' import paths, a predicate's path, else its repr (the default's
    is ``"every error but a user mistake"``, which a config rebuilds as the default)."""
    if isinstance(on, tuple):
        return [import_path(kind) or kind.__name__ for kind in on]
    return (None if on is DEFAULT_ON else import_path(on)) or repr(on)


def describe_lm(lm: dspy.BaseLM) -> dict[str, Any]:
    """An LM as a config table: its kind, model and request settings; never its API key (a config names the
    environment variable instead: ``api_key_env``)."""
    settings = {
        key: value
        for key, value in dict(getattr(lm, "kwargs", {}) or {}).items()
        if "key" not in key and isinstance(value, str | int | float | bool)
    }
    return {"kind": kind_of_class(type(lm)), "model": getattr(lm, "model", type(lm).__name__), **settings}


def kind_of_class(cls: type) -> str:
    """The kind a config names ``cls`` by: its built-in name, else ``module:qualname``."""
    return import_path(cls) or f"{cls.__module__}:{cls.__qualname__}"


def is_user_mistake(error: BaseException) -> bool:
    """A configuration or programming error (see :data:`~resilient_dspy.errors.ErrorKind.USER_MISTAKE`), also as the
    last error a Retry gave up on."""
    if isinstance(error, RetriesExhaustedError):
        error = error.last_error
    return classify(error).kind is ErrorKind.USER_MISTAKE


def matches(on: ErrorFilter, error: Exception) -> bool:
    """True when ``on`` handles ``error`` (or the last error a Retry gave up on)."""
    if not isinstance(on, tuple):
        return bool(on(error))
    if isinstance(error, on):
        return True
    return isinstance(error, RetriesExhaustedError) and isinstance(error.last_error, on)


def _as_alternative(candidate: Any, index: int, problems: list[tuple[str, str]]) -> Alternative | None:
    if isinstance(candidate, Alternative):
        return candidate
    if isinstance(candidate, dspy.BaseLM):
        return UseLM(candidate)
    if isinstance(candidate, dspy.Prediction):
        fields = dict(candidate.items())
        if not fields:
            problems.append((f"Fallback.alternatives[{index}]", "an empty dspy.Prediction is not an answer"))
            return None
        return Static(**fields)
    inner: list[tuple[str, str]] = []
    target = adapt_program(candidate, inner)
    if target is None:
        problems.append(
            (
                f"Fallback.alternatives[{index}]",
                f"must be UseLM/UseProgram/Static, a dspy.LM, a dspy.Prediction, a program or an async callable "
                f"(got {candidate!r:.80})",
            )
        )
        return None
    return UseProgram(candidate)
