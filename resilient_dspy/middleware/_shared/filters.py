"""The error filter a layer is given (``on=``, ``failure_on=``, ...): exception types or a predicate of the error."""

from __future__ import annotations

from typing import Any

__all__ = ["normalise_filter"]


def normalise_filter(value: Any) -> Any:
    """A type or a list of types as a tuple of types; a tuple or a predicate as it is (validated by the caller)."""
    if isinstance(value, type):
        return (value,)
    if isinstance(value, list):
        return tuple(value)
    return value
