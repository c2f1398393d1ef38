"""The cache key: a digest of the program's identity (signatures, instructions, demos, LM, adapter) and the
canonical inputs, so a changed program never reads another program's answers."""

from __future__ import annotations

import enum
import functools
import hashlib
import inspect
import math
import re
import typing
from collections.abc import Callable, Iterator
from typing import Any

import dspy
from pydantic import BaseModel

from resilient_dspy.binding.lm_identity import DEPLOYMENT_KEYS, lm_identity
from resilient_dspy.binding.settings import setting
from resilient_dspy.binding.targets import CallableTarget, LMTarget, ModuleTarget, Target
from resilient_dspy.core.call import Call
from resilient_dspy.core.pipeline import PipelineTarget
from resilient_dspy.middleware.cache.serializer import _type_name, compact_json

__all__ = ["KEY_VERSION", "KeyBuilder", "KeyFunction", "compute_key"]


KEY_VERSION = 2
"""Bumped whenever the key text changes (2: an LM is identified by :func:`lm_identity`)."""
KeyFunction = Callable[[Call], object]


_SECRET = re.compile(r"api_?key|secret|passw|credential|auth|cookie|header|private|(?:^|_)token$|(?:^|_)key$", re.I)


# ------------------------------------------------------------------------------------------------------- the key


@functools.lru_cache(maxsize=1024)
def _is_secret(name: str) -> bool:
    """Connection secrets (api keys, tokens, auth headers) never enter a key: they don't change the answer."""
    return bool(_SECRET.search(name))


_SCALARS = frozenset({str, int, bool, type(None)})


def _canonical(value: Any) -> Any:
    """A deterministic, injective JSON form of ``value`` for hashing (tags start with ``$``; no id() or hash())."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is float:
        return value if math.isfinite(value) else {"$float": repr(value)}
    if kind is list:
        return [_canonical(item) for item in value]
    if kind is tuple:
        return {"$tuple": [_canonical(item) for item in value]}
    if isinstance(value, dict):
        if all(type(k) is str and not k.startswith("$") for k in value):
            return {k: _canonical(v) for k, v in value.items()}
        items = [[_canonical(k), _canonical(v)] for k, v in value.items()]
        return {"$dict": sorted(items, key=_dumps)}
    if isinstance(value, set | frozenset):
        return {"$set": sorted((_canonical(item) for item in value), key=_dumps)}
    if isinstance(value, dspy.Example):
        return {"$example": _canonical(dict(value.items()))}
    if isinstance(value, enum.Enum):
        return {"$enum": _type_name(kind), "v": _canonical(value.value)}
    if isinstance(value, BaseModel):
        try:
            return {"$model": _type_name(kind), "v": _canonical(value.model_dump(mode="json"))}
        except Exception:
            return {"$repr": _type_name(kind), "r": repr(value)}
    if isinstance(value, bytes | bytearray):
        return {"$bytes": bytes(value).hex()}
    if isinstance(value, type):
        return {"$type": _describe_type(value)}
    return {"$repr": _type_name(kind), "r": repr(value)}


def _not_json(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# sorted keys; ``_canonical`` has already walked (and bounded) every value it encodes
_dumps = compact_json(sort_keys=True, default=_not_json)


def _describe_type(annotation: Any) -> Any:
    """A stable description of a type annotation; a pydantic model includes its JSON schema, an enum its members."""
    try:
        return _describe_hashable_type(annotation)
    except TypeError:
        return repr(annotation)


@functools.lru_cache(maxsize=1024)
def _describe_hashable_type(annotation: Any) -> Any:
    if isinstance(annotation, type):
        name = _type_name(annotation)
        if issubclass(annotation, BaseModel):
            try:
                return [name, _canonical(annotation.model_json_schema())]
            except Exception:
                return [name, sorted(annotation.model_fields)]
        if issubclass(annotation, enum.Enum):
            return [name, [[member.name, _canonical(member.value)] for member in annotation]]
        return name
    origin = typing.get_origin(annotation)
    if origin is None:
        return repr(annotation)
    args = [
        _describe_type(a) if isinstance(a, type) or typing.get_origin(a) else _canonical(a)
        for a in typing.get_args(annotation)
    ]
    return [_describe_type(origin) if isinstance(origin, type) else repr(origin), args]


@functools.lru_cache(maxsize=256)
def _signature_identity(signature: Any, doc: str | None) -> str:
    """Digest of the signature's name, instructions (memoised on ``__doc__``) and each field's metadata and type."""
    fields = [
        [name, _canonical(info.json_schema_extra or {}), _describe_type(info.annotation)]
        for name, info in signature.fields.items()
    ]
    return _digest([signature.__name__, signature.instructions, fields])


def _digest(value: Any) -> str:
    return hashlib.sha256(_dumps(value).encode("utf-8", "surrogatepass")).hexdigest()


def _lm_identity(lm: Any) -> Any:
    """What makes an LM answer differently: its class, which deployment answers (:func:`lm_identity`: model,
    endpoint, deployment id — the same identity :func:`~resilient_dspy.by_model` partitions by), its model type
    and its other kwargs (sampling); no secrets."""
    if lm is None:
        return None
    kwargs = getattr(lm, "kwargs", None)
    public = (
        {k: v for k, v in kwargs.items() if not _is_secret(k) and k not in DEPLOYMENT_KEYS}
        if isinstance(kwargs, dict)
        else {}
    )
    return [_type_name(type(lm)), lm_identity(lm), getattr(lm, "model_type", None), _canonical(public)]


def _adapter_identity(adapter: Any) -> Any:
    if adapter is None:
        return None
    state = getattr(adapter, "__dict__", {})
    scalars = {k: v for k, v in state.items() if v is None or type(v) in (str, int, float, bool)}
    return [_type_name(type(adapter)), _canonical(scalars)]


def _callable_name(function: Any) -> str:
    qualname = getattr(function, "__qualname__", None)
    if isinstance(qualname, str):
        return f"{getattr(function, '__module__', '?')}.{qualname}"
    return _type_name(type(function))


class KeyBuilder:
    """Computes the keys of one target's calls. A module's part (each predictor's signature, demos, config) is
    encoded once and again only when :meth:`ModuleTarget.shape` reports a change; an LM's identity is memoised and
    re-checked against its current kwargs; the LM in effect and the adapter are read on every call.
    """

    __slots__ = ("_class", "_function", "_lms", "_parts", "_shape", "namespace", "target")

    def __init__(self, namespace: str, target: Target) -> None:
        self.namespace = namespace
        self.target = target
        self._lms: dict[int, tuple[Any, tuple[Any, ...], str]] = {}
        # a function target's name, as JSON text: its identity is then assembled without encoding a list per call
        self._function = _dumps(_callable_name(target.function)) if isinstance(target, CallableTarget) else None
        # a module target: the ProgramShape encoded, its class, and per predictor the JSON text before its LM
        self._shape: Any = None
        self._class: tuple[type[Any], str] | None = None
        self._parts: tuple[tuple[Any, str], ...] = ()

    def key(self, inputs: dict[str, Any]) -> str:
        """``"<namespace>:<sha256 hex>"`` for ``inputs``, under the LM and adapter in ``dspy.settings`` now."""
        lm = setting("lm")
        adapter = setting("adapter")
        if self._function is not None:
            # the text _dumps gives the identity list below, without building and encoding it
            digest = self._lm(lm)
            lm_text = "null" if digest is None else f'"{digest}"'
            adapter_text = "null" if adapter is None else _dumps(_adapter_identity(adapter))
            identity = f'["function",{self._function},{lm_text},{adapter_text}]'
        else:
            identity = self._identity_text(self.target, lm, adapter)
        for name, value in inputs.items():  # flat inputs (str keys, scalar values) are their own canonical form
            if type(value) not in _SCALARS or type(name) is not str or name[:1] == "$":
                inputs = _canonical(inputs)
                break
        text = f"[{KEY_VERSION},{identity},{_dumps(inputs)}]"
        return f"{self.namespace}:{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()}"

    def _identity_text(self, target: Target, settings_lm: Any, adapter: Any) -> str:
        """``_dumps(self._identity(...))``; a module's part comes from the memo, without walking the program."""
        if isinstance(target, ModuleTarget):
            shape = target.shape()
            if shape is not self._shape:
                self._parts = tuple(
                    (predictor, _dumps(self._fixed(name, predictor))[:-1] + ",") for name, predictor in shape.predictors
                )
                self._shape = shape
            cls = type(target.program)
            if self._class is None or self._class[0] is not cls:
                self._class = (cls, _dumps(_type_name(cls)))
            predictors = []
            for predictor, head in self._parts:
                digest = self._lm(getattr(predictor, "lm", None) or settings_lm)
                predictors.append(f"{head}null]" if digest is None else f'{head}"{digest}"]')
            adapter_text = "null" if adapter is None else _dumps(_adapter_identity(adapter))
            return f'["module",{self._class[1]},[{",".join(predictors)}],{adapter_text}]'
        if isinstance(target, PipelineTarget):
            return f'["pipeline",{self._identity_text(target.pipeline.target, settings_lm, adapter)}]'
        return _dumps(self._identity(target, settings_lm, adapter))

    def _identity(self, target: Target, settings_lm: Any, adapter: Any) -> Any:
        if isinstance(target, ModuleTarget):
            program = target.program
            predictors = [self._predictor(name, p, settings_lm) for name, p in target.named_predictors()]
            return ["module", _type_name(type(program)), predictors, _adapter_identity(adapter)]
        if isinstance(target, LMTarget):
            return ["lm", self._lm(target.lm)]
        if isinstance(target, CallableTarget):
            return ["function", _callable_name(target.function), self._lm(settings_lm), _adapter_identity(adapter)]
        if isinstance(target, PipelineTarget):
            return ["pipeline", self._identity(target.pipeline.target, settings_lm, adapter)]
        return ["target", _type_name(type(target)), target.name, self._lm(settings_lm), _adapter_identity(adapter)]

    def _predictor(self, name: str, predictor: Any, settings_lm: Any) -> Any:
        return [*self._fixed(name, predictor), self._lm(getattr(predictor, "lm", None) or settings_lm)]

    @staticmethod
    def _fixed(name: str, predictor: Any) -> list[Any]:
        """A predictor's identity but its LM: name, signature, demos, config (no secrets), field criteria."""
        signature = predictor.signature
        config = getattr(predictor, "config", None)
        return [
            name,
            _signature_identity(signature, signature.__doc__),
            _canonical(list(predictor.demos)),
            _canonical({k: v for k, v in config.items() if not _is_secret(k)}) if config else None,
            _canonical(getattr(predictor, "fields", None) or None),
        ]

    def _lm(self, lm: Any) -> str | None:
        if lm is None:
            return None
        kwargs = getattr(lm, "kwargs", None)
        snapshot = (
            getattr(lm, "model", None),
            getattr(lm, "model_type", None),
            getattr(lm, "api_base", None),
            getattr(lm, "base_url", None),
            tuple(kwargs.items()) if isinstance(kwargs, dict) else None,
        )
        memo = self._lms.get(id(lm))
        try:
            if memo is not None and memo[0] is lm and memo[1] == snapshot:
                return memo[2]
        except Exception:
            memo = None
        digest = _digest(_lm_identity(lm))
        if len(self._lms) >= 64:
            self._lms.clear()
        self._lms[id(lm)] = (lm, snapshot, digest)
        return digest


def compute_key(namespace: str, target: Target, inputs: dict[str, Any]) -> str:
    """``"<namespace>:<sha256 hex>"`` for calling ``target`` with ``inputs`` under the current ``dspy.settings``."""
    return KeyBuilder(namespace, target).key(inputs)


def _prefixed(prefix: str) -> Callable[[str], bool]:
    return lambda key: key.startswith(prefix)


def _custom_key(namespace: str, raw: object) -> str:
    text = raw if type(raw) is str else _dumps(_canonical(raw))
    return f"{namespace}:{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()}"


def _annotations_of(target: Target) -> Iterator[Any]:
    """Every type annotation the target's answers may contain: signature fields, or a function's return type."""
    if isinstance(target, ModuleTarget):
        for _, predictor in target.named_predictors():
            for info in predictor.signature.fields.values():
                yield info.annotation
    elif isinstance(target, CallableTarget):
        function = target.function
        try:
            hints = typing.get_type_hints(function if inspect.isroutine(function) else type(function).__call__)
        except Exception:
            return
        if "return" in hints:
            yield hints["return"]
    elif isinstance(target, PipelineTarget):
        yield from _annotations_of(target.pipeline.target)
