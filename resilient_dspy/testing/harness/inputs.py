"""A value for every input field of a program, so a harness call never leaves one missing."""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Sequence
from typing import Any

import dspy

from resilient_dspy.core.pipeline import Pipeline

__all__ = ["input_values"]


def _input_annotations(program: Any) -> dict[str, Any]:
    """The declared type of each input field of ``program`` (a DSPy signature's, else its parameters' hints)."""
    if isinstance(program, Pipeline):
        return _input_annotations(program.program)
    signatures = [getattr(program, "signature", None)]
    if isinstance(program, dspy.Module):
        signatures += [predictor.signature for predictor in program.predictors()]
    found: dict[str, Any] = {}
    for signature in signatures:
        for name, info in (getattr(signature, "input_fields", None) or {}).items():
            found.setdefault(name, info.annotation)
    function = getattr(type(program), "forward", None) if isinstance(program, dspy.Module) else program
    if function is not None:
        try:
            hints = typing.get_type_hints(function)
        except Exception:  # unresolvable string annotations: fall back to what inspect shows
            hints = {name: p.annotation for name, p in inspect.signature(function).parameters.items()}
        for name, hint in hints.items():
            found.setdefault(name, hint)
    return found


def _value_of(annotation: Any, text: str, index: int) -> Any:
    """A value of ``annotation`` (str, int, float, bool, a list/dict/Literal/Optional of those), else ``text``."""
    origin = typing.get_origin(annotation)
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if origin is typing.Literal and args:
        return args[index % len(args)]
    if origin in (typing.Union, types.UnionType) and args:
        return _value_of(args[0], text, index)
    if annotation is bool:
        return index % 2 == 0
    if annotation is int:
        return index + 1
    if annotation is float:
        return index + 0.5
    if origin in (list, tuple, set, frozenset, Sequence) or annotation in (list, tuple):
        return [_value_of(args[0] if args else str, text, index)]
    if origin is dict or annotation is dict:
        return {"value": text}
    return text


def input_values(pipeline: Pipeline, question: str, index: int = 0, *, field: str | None = None) -> dict[str, Any]:
    """Every input field of ``pipeline``'s program for one call: ``question`` in ``field`` (default the first), a
    value of each other field's declared type (``"context: <question>"`` for text), so no field is left missing."""
    fields = pipeline.input_fields or ("question",)
    first = field or fields[0]
    annotations = _input_annotations(pipeline.program)
    values: dict[str, Any] = {first: question}
    for name in fields:
        if name != first:
            values[name] = _value_of(annotations.get(name, str), f"{name}: {question}", index)
    return values
