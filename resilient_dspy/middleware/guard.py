"""Guard: validate a call's inputs before anything runs, and the program's answer before anyone uses it.

Input checks run first: a pydantic model of the inputs, :class:`InputRules` (lengths, required fields, forbidden
patterns), or a function of the inputs. A failure raises :class:`InvalidInputError` naming the field and the rule,
and the program is not run. Output checks run on a result: a predicate of the prediction or a pydantic model of its
fields. A failure raises :class:`InvalidOutputError` carrying the prediction and the reason — a failure that a
``Retry`` above can retry and a ``Fallback`` above can replace. DSPy caches an answer before anyone judges it, so
after an invalid answer the next pass of the same call through this Guard (a retry, a fallback re-running the
stack) bypasses the cache and asks for a fresh one.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import dspy
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from resilient_dspy.binding.estimate import measure_chars
from resilient_dspy.config.kinds import import_path
from resilient_dspy.core.layer import Layer
from resilient_dspy.core.options import FieldProblem, Options, options_from, problems_of
from resilient_dspy.errors import ConfigurationError, InvalidInputError, InvalidOutputError
from resilient_dspy.events import Rejected

if TYPE_CHECKING:
    from resilient_dspy.core.call import Call, Handler

__all__ = [
    "Guard",
    "GuardOptions",
    "GuardRejectedInput",
    "GuardRejectedOutput",
    "InputRules",
    "InvalidInputError",
    "InvalidOutputError",
]

Problem = tuple[str, str]

_FRESH = "resilient_dspy.guard.fresh"
"""Call property set after an invalid answer: the next pass through a Guard asks below for an uncached answer."""


class InputRules(Options):
    """Common input checks; every problem is reported, each naming its field.

    ``max_chars`` bounds every input (an int) or the named ones (a mapping); non-string values are measured as
    ``str(value)`` (counted without recursion when nested too deep for it); one whose ``str()`` raises breaks the
    rule, named by its field. ``required`` inputs must be present, not None and not blank. ``forbidden`` patterns (regex
    strings or compiled, searched with ``re.search``; add ``(?i)`` to ignore case) must not occur in any string input.
    """

    max_chars: int | dict[str, int] | None = Field(default=None, description="Characters per input (or per name).")
    max_total_chars: int | None = Field(default=None, gt=0, description="Characters of all inputs together.")
    required: tuple[str, ...] = Field(default=(), description="Inputs that must be present and not blank.")
    forbidden: tuple[re.Pattern[str], ...] = Field(default=(), description="Patterns no string input may contain.")

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise ConfigurationError(problems_of(error, "InputRules")) from None

    _lists = field_validator("required", "forbidden", mode="before")(classmethod(lambda cls, v: _as_tuple(v)))

    @field_validator("max_chars")
    @classmethod
    def _check_max_chars(cls, value: int | dict[str, int] | None) -> int | dict[str, int] | None:
        limits = value.values() if isinstance(value, dict) else () if value is None else (value,)
        if any(limit <= 0 for limit in limits):
            raise FieldProblem("max_chars", f"every limit must be > 0 (got {value!r})")
        return value

    @model_validator(mode="after")
    def _some_rule(self) -> InputRules:
        if self.max_chars is None and self.max_total_chars is None and not self.required and not self.forbidden:
            raise FieldProblem("max_chars", "give at least one rule: max_chars, max_total_chars, required, forbidden")
        return self

    def check(self, inputs: Mapping[str, Any]) -> list[Problem]:
        """Every ``(field, rule)`` the inputs break; empty when they pass."""
        problems: list[Problem] = []
        for name in self.required:
            value = inputs.get(name)
            if value is None or (isinstance(value, str) and not value.strip()):
                problems.append((name, "is required" if value is None else "must not be blank"))
        max_chars = self.max_chars
        max_total = self.max_total_chars
        total: int | None = 0
        for name, value in inputs.items():
            limit = max_chars.get(name) if isinstance(max_chars, dict) else max_chars
            if limit is None and max_total is None:
                continue  # no length rule applies: a non-string input need not be printed
            size = len(value) if isinstance(value, str) else measure_chars(value)
            if size is None:
                rule = "max_chars" if limit is not None else "max_total_chars"
                problems.append((name, f"{rule}: cannot be measured (str() of this {type(value).__name__} fails)"))
                total = None
                continue
            if total is not None:
                total += size
            if limit is not None and size > limit:
                problems.append((name, f"max_chars: {size} characters > {limit}"))
        if max_total is not None and total is not None and total > max_total:
            problems.append(("inputs", f"max_total_chars: {total} characters > {max_total}"))
        for pattern in self.forbidden:
            for name, value in inputs.items():
                if isinstance(value, str) and pattern.search(value) is not None:
                    problems.append((name, f"forbidden: matches {pattern.pattern!r}"))
        return problems


class GuardOptions(Options):
    """What the Guard checks; see docs/patterns/guard.md."""

    input: Any = Field(default=None, description="A pydantic model, InputRules, or (inputs) -> None | bool | str.")
    output: Any = Field(default=None, description="A pydantic model, or (prediction) -> None | bool | str.")
    name: str | None = Field(default=None, description="Label in events and describe().")

    @field_validator("input")
    @classmethod
    def _check_input(cls, value: Any) -> Any:
        return _check_spec(value, "input", "a pydantic model class, an InputRules(...) or a function of the inputs")

    @field_validator("output")
    @classmethod
    def _check_output(cls, value: Any) -> Any:
        if isinstance(value, InputRules):
            raise FieldProblem("output", "InputRules check inputs; give a pydantic model class or a predicate")
        return _check_spec(value, "output", "a pydantic model class or a predicate of the prediction")

    @model_validator(mode="after")
    def _something(self) -> GuardOptions:
        if self.input is None and self.output is None:
            raise FieldProblem("input", "a Guard needs something to check: give input=, output= or both")
        return self


@dataclass(frozen=True, slots=True, kw_only=True)
class GuardRejectedInput(Rejected):
    """The inputs broke ``rule`` on ``field`` (the first of ``problems``); the program was not run."""

    field: str
    rule: str
    problems: tuple[Problem, ...]

    def rejection_reason(self) -> str:
        return "input"


@dataclass(frozen=True, slots=True, kw_only=True)
class GuardRejectedOutput(Rejected):
    """Attempt ``attempt``'s answer was rejected because of ``reason`` (on ``field`` when known)."""

    reason: str
    field: str | None
    attempt: int

    def rejection_reason(self) -> str:
        return "output"


class Guard(Layer):
    """Reject bad inputs before the program runs and bad answers after; see the module docstring."""

    options_type: ClassVar[type[Options]] = GuardOptions
    options: GuardOptions

    def __init__(self, input: Any = None, output: Any = None, *, name: str | None = None) -> None:
        self.options = options = options_from(GuardOptions, "Guard", locals())
        self._check_input = None if options.input is None else _input_checker(options.input)
        self._check_output = None if options.output is None else _output_checker(options.output)

    async def __call__(self, call: Call, next: Handler) -> Any:
        check_input = self._check_input
        if check_input is not None:
            problems = check_input(call.inputs)
            if problems:
                raise self._reject_input(call, problems)
        check_output = self._check_output
        if check_output is None:
            return await next(call)
        if call.properties.pop(_FRESH, False) and not call.bypass_cache:
            call = call.replace(bypass_cache=True)
        result = await next(call)
        verdict = check_output(result)
        if verdict is None:
            return result
        reason, field = verdict
        call.properties[_FRESH] = True
        self.emit(call, GuardRejectedOutput, reason=reason, field=field, attempt=call.attempt)
        raise InvalidOutputError(reason, result, field=field)

    def _reject_input(self, call: Call, problems: list[Problem]) -> InvalidInputError:
        field, rule = problems[0]
        self.emit(call, GuardRejectedInput, field=field, rule=rule, problems=tuple(problems))
        return InvalidInputError(field, rule, problems=problems)

    def describe(self) -> dict[str, Any]:
        """The options as what they check (rules, a model's fields, a function's name), not the objects."""
        options = self.options
        described = {"input": _describe_spec(options.input), "output": _describe_spec(options.output)}
        return {"layer": "Guard", "name": self.name, "options": {**described, "name": options.name}}


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _is_model(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, BaseModel)


def _is_async(value: Any) -> bool:
    return inspect.iscoroutinefunction(value) or inspect.iscoroutinefunction(type(value).__call__)


def _check_spec(value: Any, field: str, kinds: str) -> Any:
    if value is InputRules:
        raise FieldProblem(field, "give the rules: InputRules(max_chars=..., ...), not the class")
    if value is None or _is_model(value) or isinstance(value, InputRules):
        return value
    if isinstance(value, type) or not callable(value):
        raise FieldProblem(field, f"must be {kinds} (got {value!r:.80})")
    if _is_async(value):
        raise FieldProblem(field, f"must be a sync function: it runs on every call (got the async {value!r:.80})")
    return value


def _verdict(result: Any, function: Any, what: str) -> str | None:
    """The rejection reason a check function's return value means: None or True pass, False or a str reject."""
    if result is None or result is True:
        return None
    name = getattr(function, "__qualname__", None) or type(function).__name__
    if result is False:
        return f"rejected by {name}"
    if isinstance(result, str):
        return result or f"rejected by {name}"
    raise TypeError(f"Guard: the {what} check {name} must return None, a bool or a str (got {result!r:.80})")


def _model_problems(error: ValidationError, default: str) -> list[Problem]:
    return [(".".join(str(part) for part in item["loc"]) or default, item["msg"]) for item in error.errors()]


def _input_checker(spec: Any) -> Callable[[dict[str, Any]], list[Problem]]:
    if isinstance(spec, InputRules):
        return spec.check
    if _is_model(spec):
        model: type[BaseModel] = spec

        def check_model(inputs: dict[str, Any]) -> list[Problem]:
            try:
                model.model_validate(inputs)
            except ValidationError as error:
                return _model_problems(error, "inputs")
            return []

        return check_model

    def check_function(inputs: dict[str, Any]) -> list[Problem]:
        try:
            reason = _verdict(spec(inputs), spec, "input")
        except InvalidInputError as error:
            return list(error.problems)
        except ValidationError as error:
            return _model_problems(error, "inputs")
        except ValueError as error:
            reason = str(error) or type(error).__name__
        return [] if reason is None else [("inputs", reason)]

    return check_function


def _fields_of(result: Any) -> Any:
    if isinstance(result, dspy.Prediction):
        return dict(result.items())
    if isinstance(result, Mapping):
        return dict(result)
    return result


def _output_checker(spec: Any) -> Callable[[Any], tuple[str, str | None] | None]:
    if _is_model(spec):
        model: type[BaseModel] = spec

        def check_model(result: Any) -> tuple[str, str | None] | None:
            try:
                model.model_validate(_fields_of(result), from_attributes=True)
            except ValidationError as error:
                field, rule = _model_problems(error, "")[0]
                return rule, field or None
            return None

        return check_model

    def check_function(result: Any) -> tuple[str, str | None] | None:
        try:
            reason = _verdict(spec(result), spec, "output")
        except ValueError as error:
            reason = str(error) or type(error).__name__
        return None if reason is None else (reason, None)

    return check_function


def _describe_spec(spec: Any) -> Any:
    """A check as config: rules as an ``InputRules`` table, a model or function by import path (what a config
    rebuilds); one with no importable name (a local class, a lambda) by what it is, which no config rebuilds."""
    if spec is None:
        return None
    if isinstance(spec, InputRules):
        dump = spec.model_dump()
        dump["forbidden"] = [pattern.pattern for pattern in spec.forbidden]
        return {"kind": "InputRules", **dump}
    path = import_path(spec)
    if path is not None:
        return path
    if _is_model(spec):
        return {"model": spec.__name__, "fields": list(spec.model_fields)}
    return {"function": getattr(spec, "__qualname__", None) or type(spec).__name__}
