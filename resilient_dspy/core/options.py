"""The base of every middleware's options model: frozen pydantic, validated once, errors named by field.

Part of the core (docs/architecture.md: the layout, a call's path, the rules).
"""

from __future__ import annotations

import types
import typing
from typing import Any, ClassVar, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from resilient_dspy.errors import ConfigurationError

__all__ = ["FieldProblem", "Options", "build_options", "options_from"]

OptionsT = TypeVar("OptionsT", bound="Options")


class Options(BaseModel):
    """Frozen, strict options; unknown fields are an error, not a silent no-op."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, arbitrary_types_allowed=True)

    _collection_fields: ClassVar[dict[str, Any]] = {}

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        """Remember the fields typed as a tuple or a set: the ones where a list (as JSON has) must be accepted."""
        super().__pydantic_init_subclass__(**kwargs)
        cls._collection_fields = {
            name: field.annotation for name, field in cls.model_fields.items() if _takes_collection(field.annotation)
        }

    @model_validator(mode="before")
    @classmethod
    def _lists_as_collections(cls, data: Any) -> Any:
        """Strict mode refuses a list for a tuple (a range, a set of types); JSON and most callers only have lists."""
        fields = cls._collection_fields
        if not fields or not isinstance(data, dict):
            return data
        converted = {}
        for name, value in data.items():
            annotation = fields.get(name)
            converted[name] = value if annotation is None else _as_collection(annotation, value)
        return converted


def _arms(annotation: Any) -> tuple[Any, ...]:
    """The alternatives of a union (``X | Y``, ``Optional[X]``), or the annotation itself; ``Annotated`` unwrapped."""
    origin = get_origin(annotation)
    if origin is typing.Annotated:
        return _arms(get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        return tuple(arm for part in get_args(annotation) for arm in _arms(part))
    return (annotation,)


def _takes_collection(annotation: Any) -> bool:
    return any(get_origin(arm) in (tuple, frozenset, set) for arm in _arms(annotation))


def _as_collection(annotation: Any, value: Any) -> Any:
    """``value`` with lists turned into the tuple (or set) that ``annotation`` takes, nested ones included."""
    if not isinstance(value, list | set | frozenset):
        return value
    for arm in _arms(annotation):
        origin, args = get_origin(arm), get_args(arm)
        if origin is tuple and isinstance(value, list):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_as_collection(args[0], item) for item in value)
            if len(args) == len(value):
                return tuple(_as_collection(arg, item) for arg, item in zip(args, value, strict=True))
            return tuple(value)  # the wrong length: let pydantic say so, about a tuple
        if origin in (frozenset, set) and not isinstance(value, origin):
            return origin(value)
    return value


class FieldProblem(ValueError):
    """Raised by a cross-field validator to name the field at fault (pydantic reports those at model level)."""

    def __init__(self, field: str, rule: str) -> None:
        self.field = field
        self.rule = rule
        super().__init__(rule)


def problems_of(error: ValidationError, owner: str, values: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """Turn a pydantic error into ``(field, rule)`` pairs named ``Owner.field`` (``Owner.field.0`` for an item):
    one per field, in the user's words — a value refused by every arm of a union gets one rule listing what each
    arm wants, then the value it got, once; pydantic's schema tags never appear."""
    problems: list[tuple[str, str]] = []
    fields: dict[str, list[tuple[str, str]]] = {}  # field -> (path inside it, rule), in order
    given: dict[str, str] = {}
    for item in error.errors():
        cause = item.get("ctx", {}).get("error")
        if isinstance(cause, FieldProblem):
            problems.append((f"{owner}.{cause.field}", cause.rule))
            continue
        loc = [str(part) for part in item["loc"] if not _is_schema_tag(part)] or ["options"]
        field, inside = loc[0], ".".join(loc[1:])
        rule = str(item["msg"]).removeprefix("Value error, ")
        if field not in fields:
            fields[field] = []
            problems.append((f"{owner}.{field}", ""))
        if (inside, rule) not in fields[field]:
            fields[field].append((inside, rule))
        if "input" in item and item["type"] != "missing" and "(got " not in rule and field not in given:
            value = values[field] if values is not None and field in values else item["input"]
            given[field] = f" (got {value!r})"
    merged = []
    for name, rule in problems:
        field = name.removeprefix(f"{owner}.")
        if rule or field not in fields:
            merged.append((name, rule))
            continue
        parts = fields[field]
        insides = {inside for inside, _ in parts}
        if len(insides) == 1 and (inside := next(iter(insides))):
            name = f"{name}.{inside}"
            rules = [rule for _, rule in parts]
        else:
            rules = [f"item {inside}: {rule}" if inside else rule for inside, rule in parts]
        merged.append((name, " or ".join(rules) + given.get(field, "")))
    return merged


def _is_schema_tag(part: Any) -> bool:
    """A union member's or validator's tag in pydantic's error path (``tuple[...]``, ``callable``,
    ``function-after[...]``), not a field name or an index."""
    return isinstance(part, str) and (
        "[" in part or part in {"callable", "none", "str", "int", "float", "bool", "list", "tuple", "dict"}
    )


def build_options(model: type[OptionsT], owner: str, values: dict[str, Any]) -> OptionsT:
    """Validate ``values`` into ``model``; raise one :class:`ConfigurationError` listing every bad field."""
    try:
        return model(**values)
    except ValidationError as error:
        raise ConfigurationError(problems_of(error, owner, values)) from None


def options_from(model: type[OptionsT], owner: str, arguments: dict[str, Any]) -> OptionsT:
    """:func:`build_options` from a constructor's ``locals()``: only the model's fields are read, so each option is
    written once in the signature and once in the model (``tests/test_options.py`` checks the two agree)."""
    fields = model.model_fields
    return build_options(model, owner, {name: value for name, value in arguments.items() if name in fields})
