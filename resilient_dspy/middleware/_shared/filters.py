"""The error filter a layer is given (``on=``, ``failure_on=``, ...): exception types or a predicate of the error."""

from __future__ import annotations

from typing import Any

__all__ = ["check_filter", "normalise_filter"]


def normalise_filter(value: Any) -> Any:
    """A type or a list of types as a tuple of types; a tuple or a predicate as it is (validated by the caller)."""
    if isinstance(value, type):
        return (value,)
    if isinstance(value, list):
        return tuple(value)
    return value


def check_filter(value: Any) -> Any:
    """An optional filter, normalised and checked (the options' validator): None, exception types or a predicate."""
    if value is None:
        return None
    value = normalise_filter(value)
    if isinstance(value, tuple):
        if not value or not all(isinstance(t, type) and issubclass(t, BaseException) for t in value):
            raise ValueError("must be exception types or a predicate of the exception")
    elif not callable(value):
        raise ValueError("must be exception types or a predicate of the exception")
    return value
