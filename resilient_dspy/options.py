"""The base of every middleware's options model: frozen pydantic, validated once, errors named by field."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from resilient_dspy.errors import ConfigurationError

__all__ = ["FieldProblem", "Options", "build_options"]

OptionsT = TypeVar("OptionsT", bound="Options")


class Options(BaseModel):
    """Frozen, strict options; unknown fields are an error, not a silent no-op."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, arbitrary_types_allowed=True)


class FieldProblem(ValueError):
    """Raised by a cross-field validator to name the field at fault (pydantic reports those at model level)."""

    def __init__(self, field: str, rule: str) -> None:
        self.field = field
        self.rule = rule
        super().__init__(rule)


def problems_of(error: ValidationError, owner: str) -> list[tuple[str, str]]:
    """Turn a pydantic error into ``(field, rule)`` pairs named ``Owner.field``."""
    problems = []
    for item in error.errors():
        cause = item.get("ctx", {}).get("error")
        if isinstance(cause, FieldProblem):
            problems.append((f"{owner}.{cause.field}", cause.rule))
            continue
        field = ".".join(str(part) for part in item["loc"]) or "options"
        rule = item["msg"]
        if "input" in item and item["type"] != "missing":
            rule = f"{rule} (got {item['input']!r})"
        problems.append((f"{owner}.{field}", rule))
    return problems


def build_options(model: type[OptionsT], owner: str, values: dict[str, Any]) -> OptionsT:
    """Validate ``values`` into ``model``; raise one :class:`ConfigurationError` listing every bad field."""
    try:
        return model(**values)
    except ValidationError as error:
        raise ConfigurationError(problems_of(error, owner)) from None
