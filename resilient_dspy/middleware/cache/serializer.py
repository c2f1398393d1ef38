"""The cache's serializer: values (``dspy.Prediction`` first) to a versioned JSON envelope and back — never
pickle, because a shared store may hold attacker-controlled bytes."""

from __future__ import annotations

import base64
import enum
import json
import json.scanner
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import dspy
from dspy.primitives.prediction import Completions
from pydantic import BaseModel

__all__ = [
    "SERIALIZER_VERSION",
    "CacheSerializer",
    "CachedEntry",
    "CorruptEntryError",
    "UnencodableError",
    "UnknownTypeError",
    "compact_json",
]


SERIALIZER_VERSION = 1
_MAX_DEPTH = 64


class UnencodableError(TypeError):
    """The value holds something the serializer cannot store faithfully (it is then simply not cached)."""

    def __init__(self, kind: type[Any], reason: str) -> None:
        self.kind = kind
        super().__init__(f"cannot cache a {kind.__module__}.{kind.__qualname__}: {reason}")


class CorruptEntryError(ValueError):
    """Stored bytes that are not a valid entry of this serializer (read as a miss)."""


class UnknownTypeError(CorruptEntryError):
    """The entry names a model or enum class that is not on the allowlist."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"entry holds a {name!r}, which is not an allowed type")


class CachedEntry(typing.NamedTuple):
    """A decoded entry: the value (a fresh object), the LM usage that produced it and its total tokens."""

    value: Any
    usage: dict[str, Any]
    tokens: int


def _type_name(cls: type[Any]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _usage_value(value: object) -> str:
    """Usage is accounting, stored as plain JSON: a value JSON cannot hold is kept as its repr."""
    return repr(value)


def compact_json(*, sort_keys: bool, default: Callable[[Any], Any]) -> Callable[[Any], str]:
    """A compact, non-ASCII-escaping JSON encoder built once. ``json.dumps`` and ``JSONEncoder.encode`` build a
    new C encoder on every call, about half their cost on small values; the text is the same. No circular-reference
    check: callers encode values whose depth they have bounded."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - a Python without the C accelerator
        return json.JSONEncoder(sort_keys=sort_keys, ensure_ascii=False, separators=(",", ":"), default=default).encode
    encode = make(None, default, json.encoder.encode_basestring, None, ":", ",", sort_keys, False, True)

    def dumps(value: Any) -> str:
        return "".join(encode(value, 0))

    return dumps


_envelope_json = compact_json(sort_keys=False, default=_usage_value)
# the C scanner json.loads ends in, without its whitespace and extra-data checks (loads makes its own)
_scan_json = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]  # typeshed is wrong here


class CacheSerializer:
    """A versioned JSON envelope for cached values; it never pickles and never imports a class named by data.

    It round-trips JSON values, tuples, sets, bytes, ``dspy.Prediction`` / ``dspy.Example`` (fields,
    ``completions``) and instances of pydantic models and enums on its allowlist — the classes found in the
    program's signatures (see :meth:`allow_annotation`). Anything else raises :class:`UnencodableError`.
    """

    __slots__ = ("_ambiguous", "_types")

    def __init__(self, types: Iterable[type[Any]] = ()) -> None:
        self._types: dict[str, type[Any]] = {}
        self._ambiguous: set[str] = set()
        self.allow(*types)

    def allow(self, *classes: type[Any]) -> None:
        """Allow these pydantic model / enum classes (and the models and enums their fields mention)."""
        for cls in classes:
            self.allow_annotation(cls)

    def allow_annotation(self, annotation: Any) -> None:
        """Allow every pydantic model and enum class reachable from a type annotation (``list[Answer] | None``)."""
        seen: set[int] = set()
        pending = [annotation]
        while pending:
            item = pending.pop()
            if id(item) in seen:
                continue
            seen.add(id(item))
            if isinstance(item, type) and issubclass(item, BaseModel | enum.Enum):
                self._register(item)
                if issubclass(item, BaseModel):
                    pending.extend(field.annotation for field in item.model_fields.values())
            pending.extend(typing.get_args(item))

    def _register(self, cls: type[Any]) -> None:
        name = _type_name(cls)
        known = self._types.get(name)
        if known is not None and known is not cls:
            self._ambiguous.add(name)
        self._types[name] = cls

    def knows(self, cls: type[Any]) -> bool:
        name = _type_name(cls)
        return self._types.get(name) is cls and name not in self._ambiguous

    # ---------------------------------------------------------------- encode

    def dumps(self, value: Any, usage: Mapping[str, Any] | None = None, tokens: int = 0) -> bytes:
        """The envelope for ``value`` and the usage that produced it; raises :class:`UnencodableError`."""
        value_text = _envelope_json(self._encode(value, 0))
        usage_text = _envelope_json(dict(usage)) if usage else "{}"
        text = f'{{"rdc":{SERIALIZER_VERSION},"value":{value_text},"usage":{usage_text},"tokens":{int(tokens)}}}'
        return text.encode("utf-8", "surrogatepass")

    def _encode(self, value: Any, depth: int) -> Any:
        kind = type(value)
        if kind is str or kind is int or kind is float or kind is bool or value is None:
            return value
        if depth > _MAX_DEPTH:
            raise UnencodableError(kind, f"nested deeper than {_MAX_DEPTH} levels")
        depth += 1
        if kind is list:
            return [self._encode(item, depth) for item in value]
        if kind is dict or (isinstance(value, dict) and kind.__module__ == "collections"):
            if "$t" not in value and all(type(k) is str for k in value):
                return {k: self._encode(v, depth) for k, v in value.items()}
            return {"$t": "dict", "v": [[self._encode(k, depth), self._encode(v, depth)] for k, v in value.items()]}
        if kind is tuple:
            return {"$t": "tuple", "v": [self._encode(item, depth) for item in value]}
        if kind is set or kind is frozenset:
            return {"$t": kind.__name__, "v": [self._encode(item, depth) for item in value]}
        if kind is bytes:
            return {"$t": "bytes", "v": base64.b64encode(value).decode("ascii")}
        if kind is dspy.Prediction:
            completions = value.completions
            return {
                "$t": "prediction",
                "v": self._encode(dict(value.items()), depth),
                "c": None if completions is None else self._encode(dict(completions.items()), depth),
            }
        if kind is dspy.Example:
            inputs = getattr(value, "_input_keys", None)
            return {
                "$t": "example",
                "v": self._encode(dict(value.items()), depth),
                "i": None if inputs is None else sorted(inputs),
            }
        if isinstance(value, BaseModel | enum.Enum):
            if not self.knows(kind):
                raise UnencodableError(kind, "not a type of the program's signatures (allow it with types=)")
            if isinstance(value, enum.Enum):
                return {"$t": "enum", "n": _type_name(kind), "v": self._encode(value.value, depth)}
            return {"$t": "model", "n": _type_name(kind), "v": value.model_dump(mode="json")}
        raise UnencodableError(kind, "no safe encoding for this type")

    # ---------------------------------------------------------------- decode

    def loads(self, data: bytes) -> CachedEntry:
        """The entry in ``data``; any bytes that are not a valid envelope raise :class:`CorruptEntryError`."""
        try:
            text = data.decode("utf-8", "surrogatepass")
            envelope, end = _scan_json(text, 0)
        except (ValueError, RecursionError) as error:
            raise CorruptEntryError(f"not a cache entry: {error}") from None
        except StopIteration:
            raise CorruptEntryError("not a cache entry: not JSON") from None
        if end != len(text):
            raise CorruptEntryError(f"not a cache entry: extra data at {end}")
        if type(envelope) is not dict or envelope.get("rdc") != SERIALIZER_VERSION:
            raise CorruptEntryError("not a cache entry of this serializer version")
        try:
            value = self._decode(envelope["value"])
            usage = envelope.get("usage", {})
            tokens = envelope.get("tokens", 0)
        except CorruptEntryError:
            raise
        except Exception as error:
            raise CorruptEntryError(f"malformed cache entry: {type(error).__name__}: {error}") from None
        if type(usage) is not dict or type(tokens) is not int:
            raise CorruptEntryError("malformed cache entry: usage or tokens")
        return CachedEntry(value, usage, tokens)

    def _decode(self, item: Any) -> Any:
        kind = type(item)
        if kind is list:
            return [self._decode(x) for x in item]
        if kind is not dict:
            return item
        tag = item.get("$t")
        if tag is None:
            return {k: self._decode(v) for k, v in item.items()}
        decoder = _DECODERS.get(tag)
        if decoder is None:
            raise CorruptEntryError(f"unknown tag {tag!r}")
        return decoder(self, item)

    def _resolve(self, name: Any) -> type[Any]:
        cls = self._types.get(name) if type(name) is str else None
        if cls is None or name in self._ambiguous:
            raise UnknownTypeError(str(name))
        return cls

    def _decode_prediction(self, item: dict[str, Any]) -> Any:
        fields = self._decode(item["v"])
        prediction = dspy.Prediction(base=fields)
        completions = item.get("c")
        if completions is not None:
            prediction._completions = Completions(self._decode(completions))
        return prediction

    def _decode_example(self, item: dict[str, Any]) -> Any:
        example = dspy.Example(base=self._decode(item["v"]))
        inputs = item.get("i")
        return example if inputs is None else example.with_inputs(*inputs)

    def _decode_model(self, item: dict[str, Any]) -> Any:
        cls = self._resolve(item["n"])
        return cls.model_validate_json(json.dumps(item["v"]))

    def _decode_enum(self, item: dict[str, Any]) -> Any:
        return self._resolve(item["n"])(self._decode(item["v"]))

    def _decode_dict(self, item: dict[str, Any]) -> Any:
        return {self._decode(k): self._decode(v) for k, v in item["v"]}

    def _decode_bytes(self, item: dict[str, Any]) -> Any:
        return base64.b64decode(item["v"], validate=True)


def _sequence(build: Callable[[list[Any]], Any]) -> Callable[[CacheSerializer, dict[str, Any]], Any]:
    def decode(serializer: CacheSerializer, item: dict[str, Any]) -> Any:
        values = item["v"]
        if type(values) is not list:
            raise CorruptEntryError("a tagged sequence must hold a list")
        return build([serializer._decode(x) for x in values])

    return decode


_DECODERS: dict[str, Callable[[CacheSerializer, dict[str, Any]], Any]] = {
    "prediction": CacheSerializer._decode_prediction,
    "example": CacheSerializer._decode_example,
    "model": CacheSerializer._decode_model,
    "enum": CacheSerializer._decode_enum,
    "dict": CacheSerializer._decode_dict,
    "bytes": CacheSerializer._decode_bytes,
    "tuple": _sequence(tuple),
    "set": _sequence(set),
    "frozenset": _sequence(frozenset),
}
