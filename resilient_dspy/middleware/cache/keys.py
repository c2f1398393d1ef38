"""The cache key: a digest of the program's identity (signatures, instructions, demos, LM, adapter) and the
canonical inputs, so a changed program never reads another program's answers."""

from __future__ import annotations

import enum
import functools
import hashlib
import math
import re
import typing
from collections.abc import Callable
from typing import Any

import dspy
from pydantic import BaseModel

from resilient_dspy.binding.lm_identity import DEPLOYMENT_KEYS, lm_identity
from resilient_dspy.binding.settings import setting
from resilient_dspy.binding.shape import KeyIdentity, identity_source
from resilient_dspy.binding.targets import Target
from resilient_dspy.core.call import Call
from resilient_dspy.middleware.cache.serializer import _type_name, compact_json

__all__ = ["KEY_VERSION", "CacheKeyFunction", "KeyBuilder", "compute_key"]


KEY_VERSION = 2
"""Bumped whenever the key text changes (2: an LM is identified by :func:`lm_identity`)."""

CacheKeyFunction = Callable[[Call], object]
"""``Cache(key=...)``: the call's cache key in place of the computed one; a ``str`` is hashed as it is, anything
else in canonical JSON (unlike the partition key of Bulkhead, CircuitBreaker and RateLimiter, it is never a dict
key: any JSON-like value will do)."""


_SECRET = re.compile(r"api_?key|secret|passw|credential|auth|cookie|header|private|(?:^|_)token$|(?:^|_)key$", re.I)


# ------------------------------------------------------------------------------------------------------- the key


@functools.lru_cache(maxsize=1024)
def _is_secret(name: str) -> bool:
    """Connection secrets (api keys, tokens, auth headers) never enter a key: they don't change the answer."""
    return bool(_SECRET.search(name))


_SCALARS = frozenset({str, int, bool, type(None)})
_KEYS_AT_MOST = 1024
"""Keys remembered per KeyBuilder (str-only inputs); past it the memo starts over (memory stays bounded)."""


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


class KeyBuilder:
    """Computes the keys of one target's calls from the :class:`~resilient_dspy.binding.shape.KeyIdentity` the target
    gives: its fixed parts (names, each predictor's signature, demos, config) are encoded once per identity object,
    an LM's identity is memoised and re-checked against its current kwargs, and the LM in effect and the adapter are
    read on every call, and the key of str-only inputs under an identity text already hashed is remembered. The
    Cache never looks at what kind of target it keys.
    """

    __slots__ = (
        "_adapter",
        "_close",
        "_head",
        "_identity_now",
        "_keys",
        "_lm_of",
        "_lms",
        "_parts",
        "_seen",
        "namespace",
    )

    def __init__(self, namespace: str, target: Target) -> None:
        self.namespace = namespace
        self._identity_now = identity_source(target)
        self._lms: dict[int, tuple[Any, tuple[Any, ...], str]] = {}
        # keys of str-only inputs by (identity text, inputs): only the digest is skipped, the identity is re-read
        self._keys: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
        # the encoding of the identity last seen: the JSON text before the LM part, per predictor the text before its
        # LM (None: one LM for the whole target), whether the adapter follows, and the text closing the nesting
        self._seen: KeyIdentity | None = None
        self._head = ""
        self._parts: tuple[tuple[Any, str], ...] | None = None
        self._lm_of: Any = None
        self._adapter = True
        self._close = "]"

    def key(self, inputs: dict[str, Any]) -> str:
        """``"<namespace>:<sha256 hex>"`` for ``inputs``, under the LM and adapter in ``dspy.settings`` now."""
        lm = setting("lm")
        adapter = setting("adapter")
        identity = self._identity_now()
        if identity is not self._seen:
            self._encode(identity)
        parts = self._parts
        if parts is None:
            fixed = self._lm_of
            digest = self._lm(lm if fixed is None else fixed)
            lm_text = "null" if digest is None else f'"{digest}"'
        else:
            predictors = []
            for predictor, head in parts:
                digest = self._lm(getattr(predictor, "lm", None) or lm)
                predictors.append(f"{head}null]" if digest is None else f'{head}"{digest}"]')
            lm_text = f"[{','.join(predictors)}]"
        if self._adapter:
            adapter_text = "null" if adapter is None else _dumps(_adapter_identity(adapter))
            text = f"{self._head}{lm_text},{adapter_text}{self._close}"
        else:
            text = f"{self._head}{lm_text}{self._close}"
        texts = True  # every input a str: the same identity text and inputs make the same key (memoised)
        for name, value in inputs.items():  # flat inputs (str keys, scalar values) are their own canonical form
            if type(value) is not str:
                texts = False
                if type(value) not in _SCALARS:
                    inputs = _canonical(inputs)
                    break
            if type(name) is not str or name[:1] == "$":
                texts = False
                inputs = _canonical(inputs)
                break
        if texts:
            seen = (text, tuple(inputs.items()))
            key = self._keys.get(seen)
            if key is not None:
                return key
        text = f"[{KEY_VERSION},{text},{_dumps(inputs)}]"
        key = f"{self.namespace}:{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()}"
        if texts:
            if len(self._keys) >= _KEYS_AT_MOST:
                self._keys.clear()
            self._keys[seen] = key
        return key

    def identity(self, settings_lm: Any = None, adapter: Any = None) -> list[Any]:
        """The identity part of the key as a JSON list, built afresh (no memo): :meth:`key` hashes the same text."""
        return self._listed(self._identity_now(), settings_lm, adapter)

    def needs_settings_lm(self) -> bool:
        """True when a predictor of the target takes its LM from ``dspy.settings`` (see ``Cache.key_for``)."""
        return self._identity_now().needs_settings_lm()

    def _encode(self, identity: KeyIdentity) -> None:
        """Encode what stays fixed while ``identity`` holds: ``_dumps(self._listed(...))`` up to the LM parts."""
        opened = closed = ""
        core = identity
        while core.inner is not None:
            opened, closed = f"{opened}[{_dumps(core.kind)},", f"]{closed}"
            core = core.inner
        self._head = f"{opened}[{','.join(_dumps(part) for part in (core.kind, *core.names))},"
        self._close = f"]{closed}"
        self._lm_of = core.lm
        self._adapter = core.adapter
        if core.predictors is None:
            self._parts = None
        else:
            self._parts = tuple((p, _dumps(self._fixed(name, p))[:-1] + ",") for name, p in core.predictors)
        self._seen = identity

    def _listed(self, identity: KeyIdentity, settings_lm: Any, adapter: Any) -> list[Any]:
        if identity.inner is not None:
            return [identity.kind, self._listed(identity.inner, settings_lm, adapter)]
        listed: list[Any] = [identity.kind, *identity.names]
        if identity.predictors is None:
            listed.append(self._lm(settings_lm if identity.lm is None else identity.lm))
        else:
            listed.append([self._predictor(name, p, settings_lm) for name, p in identity.predictors])
        if identity.adapter:
            listed.append(_adapter_identity(adapter))
        return listed

    def _predictor(self, name: str, predictor: Any, settings_lm: Any) -> list[Any]:
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


def _custom_key(namespace: str, raw: object) -> str:
    text = raw if type(raw) is str else _dumps(_canonical(raw))
    return f"{namespace}:{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()}"
