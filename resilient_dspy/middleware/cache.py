"""Cache: serve repeated calls from a store, and let concurrent identical misses share one program call.

The key is ``"<namespace>:<sha256>"`` of the program's identity (each predictor's signature, instructions, demos
and config; the program class or function name), the LM in effect (model, endpoint, sampling kwargs — never
secrets), the adapter and the inputs. A miss runs the layers below inside a usage scope and stores the answer
with its LM usage; errors and fallback answers are never stored. Identical misses in flight share one call
(single-flight). A broken or slow backend fails open: the call goes through, the failure is logged; every backend
wait is clamped to the call's remaining time, and a blocking backend's store runs in the background (see drain()).
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import enum
import functools
import hashlib
import inspect
import logging
import math
import re
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import dspy
from pydantic import BaseModel, Field, field_validator

from resilient_dspy.binding.lm_identity import DEPLOYMENT_KEYS, lm_identity
from resilient_dspy.binding.settings import setting
from resilient_dspy.binding.targets import CallableTarget, LMTarget, ModuleTarget, Target
from resilient_dspy.binding.usage import attach_usage, usage_scope
from resilient_dspy.cache_backends import (
    CachedEntry,
    CacheSerializer,
    CorruptEntryError,
    MemoryBackend,
    NowaitBackend,
    UnencodableError,
    UnknownTypeError,
    compact_json,
    is_backend,
    is_nowait,
)
from resilient_dspy.core.call import Call, CallRecord, Handler, leases_lent, lend_leases, reclaim_leases
from resilient_dspy.core.health import LayerHealth
from resilient_dspy.core.options import Options, build_options
from resilient_dspy.core.pipeline import Pipeline, PipelineTarget
from resilient_dspy.errors import ConfigurationError
from resilient_dspy.events import Event

__all__ = [
    "Cache",
    "CacheBackendFailed",
    "CacheCoalesced",
    "CacheHit",
    "CacheMiss",
    "CacheNotStored",
    "CacheOptions",
    "CacheStats",
    "CacheStored",
    "KeyBuilder",
    "compute_key",
]

logger = logging.getLogger("resilient_dspy.cache")

KEY_VERSION = 2
"""Bumped whenever the key text changes (2: an LM is identified by :func:`lm_identity`)."""
KeyFunction = Callable[[Call], object]
PriceFunction = Callable[[dict[str, dict[str, Any]]], float]
_NAMESPACE = re.compile(r"[A-Za-z0-9_.\-/]{1,100}")
_SECRET = re.compile(r"api_?key|secret|passw|credential|auth|cookie|header|private|(?:^|_)token$|(?:^|_)key$", re.I)


# ------------------------------------------------------------------------------------------------------- the key


@functools.lru_cache(maxsize=1024)
def _is_secret(name: str) -> bool:
    """Connection secrets (api keys, tokens, auth headers) never enter a key: they don't change the answer."""
    return bool(_SECRET.search(name))


def _type_name(cls: type[Any]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


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


# ------------------------------------------------------------------------------------------- options and events


class CacheOptions(Options):
    """What :class:`Cache` accepts; validated when the Cache is created."""

    backend: Any = Field(description="Where entries live (MemoryBackend by default).")
    ttl: float | None = Field(
        default=3600.0, gt=0, allow_inf_nan=False, description="Seconds an entry lives; None = until evicted."
    )
    namespace: str = Field(default="default", description="Prefix of every key; invalidate a whole namespace at once.")
    key: KeyFunction | None = Field(default=None, description="Function of the call replacing the computed key.")
    single_flight: bool = Field(default=True, description="Concurrent identical misses share one program call.")
    backend_timeout: float = Field(
        default=1.0, gt=0, allow_inf_nan=False, description="Seconds a backend call may take."
    )
    max_pending_stores: int = Field(
        default=100, ge=1, description="Background stores in flight at most; beyond it an answer is not stored."
    )
    price: PriceFunction | None = Field(
        default=None, description="Dollars for a usage dict (by model), for saved_cost."
    )
    types: tuple[type, ...] = Field(default=(), description="Extra pydantic models / enums answers may hold.")
    name: str | None = Field(default=None, description="Label in events and describe().")

    @field_validator("backend")
    @classmethod
    def _check_backend(cls, value: Any) -> Any:
        if not is_backend(value):
            raise ValueError(
                "must implement async get(key), set(key, value, ttl), delete(key) and clear(namespace) "
                f"(got {value!r:.80})"
            )
        return value

    @field_validator("namespace")
    @classmethod
    def _check_namespace(cls, value: str) -> str:
        if not _NAMESPACE.fullmatch(value):
            raise ValueError(
                "must be 1-100 letters, digits or '_', '-', '.', '/' (':' separates it from the digest) "
                f"(got {value!r})"
            )
        return value

    @field_validator("types")
    @classmethod
    def _check_types(cls, value: tuple[type, ...]) -> tuple[type, ...]:
        wrong = [t for t in value if not (isinstance(t, type) and issubclass(t, BaseModel | enum.Enum))]
        if wrong:
            raise ValueError(f"must be pydantic model or enum classes (got {wrong!r:.80})")
        return value


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counts since the Cache was created. Every lookup is exactly one of hit, miss, coalesced or bypassed.

    ``saved_tokens`` / ``saved_cost`` add up the LM usage of the answers served without running the program
    (hits and coalesced followers); ``errors`` counts backend failures, ``timeouts`` those of them that ran out of
    time; ``skipped_stores`` the answers not stored because ``max_pending_stores`` stores were still running.
    """

    hits: int = 0
    misses: int = 0
    coalesced: int = 0
    bypassed: int = 0
    stores: int = 0
    errors: int = 0
    saved_tokens: int = 0
    saved_cost: float = 0.0
    timeouts: int = 0
    skipped_stores: int = 0

    @property
    def hit_rate(self) -> float:
        """Share of lookups served without running the program (hits + coalesced), 0.0 before any lookup."""
        total = self.hits + self.misses + self.coalesced + self.bypassed
        return (self.hits + self.coalesced) / total if total else 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheHit(Event):
    """Served from the backend; ``saved_tokens`` / ``saved_usage`` (by model) are the usage stored with the answer."""

    key: str
    saved_tokens: int
    saved_usage: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheMiss(Event):
    """Not in the backend (or ``bypassed``: the call asked for a fresh answer); this call runs the program."""

    key: str
    bypassed: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheStored(Event):
    """The answer was stored for ``ttl`` seconds (None = no expiry); ``size`` in bytes."""

    key: str
    ttl: float | None
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheNotStored(Event):
    """A successful answer was not stored: ``reason`` is ``"fallback"``, ``"unencodable"`` or ``"backlog"``."""

    key: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheCoalesced(Event):
    """This call waited for an identical call in flight and got its answer (saving its usage), or its ``error``
    (the leader's, or this follower's own ``CancelledError`` when its wait was cancelled or timed out)."""

    key: str
    error: BaseException | None
    saved_tokens: int = 0
    saved_usage: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheBackendFailed(Event):
    """A backend ``operation`` (get/set) raised ``error`` or ``timed_out``; the call went on without it."""

    key: str
    operation: str
    error: BaseException
    timed_out: bool


# -------------------------------------------------------------------------------------------------- the middleware


class _Counters:
    __slots__ = (
        "bypassed",
        "coalesced",
        "errors",
        "hits",
        "misses",
        "saved_cost",
        "saved_tokens",
        "skipped_stores",
        "stores",
        "timeouts",
    )

    def __init__(self) -> None:
        self.hits = self.misses = self.coalesced = self.bypassed = self.stores = self.errors = 0
        self.timeouts = self.skipped_stores = 0
        self.saved_tokens = 0
        self.saved_cost = 0.0


@dataclass(slots=True)
class _PendingStore:
    """An answer being stored in the background: served to identical calls (until it expires) meanwhile."""

    data: bytes
    expires_at: float | None


# a blocking backend's read may take at most this share of the call's remaining time (and backend_timeout)
_READ_SHARE = 0.1


@dataclass(slots=True)
class _Answer:
    """What a leader hands its followers: the encoded answer (for fresh copies), who served it, its usage."""

    value: Any
    data: bytes | None
    served_by: str
    usage: dict[str, Any]
    tokens: int
    fallback: bool


_RETRY = object()

# The flights this task chain leads (inherited by the program's coroutine and every task it creates): a call that
# finds one of them in flight is reentrant, and waiting on it would wait on itself.
_LEADING: contextvars.ContextVar[tuple[asyncio.Future[Any], ...]] = contextvars.ContextVar(
    "resilient_dspy_cache_leading", default=()
)


class Cache:
    """Serve identical calls from ``backend``; share one call between concurrent identical misses."""

    def __init__(
        self,
        backend: Any = None,
        *,
        ttl: float | None = 3600.0,
        namespace: str = "default",
        key: KeyFunction | None = None,
        single_flight: bool = True,
        backend_timeout: float = 1.0,
        max_pending_stores: int = 100,
        price: PriceFunction | None = None,
        types: tuple[type, ...] | list[type] = (),
        name: str | None = None,
    ) -> None:
        self.options = build_options(
            CacheOptions,
            "Cache",
            {
                "backend": MemoryBackend() if backend is None else backend,
                "ttl": ttl,
                "namespace": namespace,
                "key": key,
                "single_flight": single_flight,
                "backend_timeout": backend_timeout,
                "max_pending_stores": max_pending_stores,
                "price": price,
                "types": tuple(types) if isinstance(types, list | tuple) else types,
                "name": name,
            },
        )
        self.backend = self.options.backend
        self.label = self.options.name or "Cache"
        self.coalesces = self.options.single_flight
        """A call may wait here for an identical call's answer: a Bulkhead above lends its slot meanwhile."""
        self._blocking = bool(getattr(self.backend, "blocking", True))
        self._nowait: NowaitBackend | None = self.backend if is_nowait(self.backend) else None
        self._serializer = CacheSerializer(self.options.types)
        self._pipeline: Pipeline | None = None
        self._target: Target | None = None
        self._keys: KeyBuilder | None = None
        self._flights: dict[str, asyncio.Future[Any]] = {}
        self._count = _Counters()
        self._reported: set[str] = set()
        self._store_tasks: dict[asyncio.Task[None], str] = {}  # background stores of a blocking backend, by key
        self._pending: dict[str, _PendingStore] = {}  # the latest pending store of each key
        self._timing_out: set[str] = set()  # operations whose last attempt timed out (logged once until they answer)
        self._backlogged = False

    def on_build(self, pipeline: Pipeline) -> None:
        """Learn the program (for keys and allowed answer types) and hand the pipeline clock to the backend."""
        if self._pipeline is not None and self._pipeline is not pipeline:
            raise ConfigurationError(
                [
                    (
                        "Cache",
                        f"already built into pipeline {self._pipeline.name!r}; use one Cache per pipeline "
                        "(they can share a backend)",
                    )
                ]
            )
        self._pipeline = pipeline
        self._target = pipeline.target
        self._keys = KeyBuilder(self.options.namespace, pipeline.target)
        bind_clock = getattr(self.backend, "bind_clock", None)
        if bind_clock is not None:
            bind_clock(pipeline.clock)
        self._allow_target_types()

    # ---------------------------------------------------------------- public helpers

    @property
    def stats(self) -> CacheStats:
        count = self._count
        return CacheStats(
            count.hits,
            count.misses,
            count.coalesced,
            count.bypassed,
            count.stores,
            count.errors,
            count.saved_tokens,
            count.saved_cost,
            count.timeouts,
            count.skipped_stores,
        )

    def key_for(self, *args: Any, **inputs: Any) -> str:
        """The key a call of the pipeline with these inputs would use, under the current ``dspy.settings`` LM.

        Positional inputs map to the program's input fields, as when calling the pipeline. With a ``key=``
        function, it receives a :class:`Call` holding these inputs (started at 0.0, no deadline). A DSPy program
        whose predictors take the LM from the context raises ``LookupError`` outside ``dspy.context(lm=...)``:
        no call would use that key, so ``invalidate(key)`` would silently find nothing.
        """
        pipeline = self._pipeline
        if pipeline is None or self._keys is None:
            raise RuntimeError("this Cache is not part of a pipeline yet: build Pipeline(program, ..., cache) first")
        merged = pipeline.inputs_of(*args, **inputs)
        if self.options.key is not None:
            call = Call(merged, pipeline.runtime, CallRecord(started_at=0.0))
            return _custom_key(self.options.namespace, self.options.key(call))
        target = self._target
        if (
            isinstance(target, ModuleTarget)
            and setting("lm") is None
            and any(getattr(predictor, "lm", None) is None for _, predictor in target.named_predictors())
        ):
            raise LookupError(
                "no LM in effect: a call's key includes the LM it runs with, so call key_for inside the same "
                "dspy.context(lm=...) (or dspy.configure) as the calls whose entries you mean"
            )
        return self._keys.key(merged)

    async def drain(self) -> None:
        """Wait until the stores running in the background (each bounded by ``backend_timeout``) are done: call it
        before shutdown, or in a test before reading the backend."""
        while self._store_tasks:
            await asyncio.wait(list(self._store_tasks))

    async def _settle(self, doomed: Callable[[str], bool]) -> None:
        """Wait for the pending stores of the keys ``doomed`` selects, so none lands after an invalidation."""
        for key in [key for key in self._pending if doomed(key)]:
            del self._pending[key]
        tasks = [task for task, key in self._store_tasks.items() if doomed(key)]
        if tasks:
            await asyncio.wait(tasks)

    async def invalidate(self, key: str) -> bool:
        """Remove one entry (a key from :meth:`key_for` or an event); True if it was there."""
        await self._settle(key.__eq__)
        return await self.backend.delete(key)  # type: ignore[no-any-return]

    async def invalidate_namespace(self, namespace: str | None = None) -> int:
        """Remove every entry of ``namespace`` (default: this Cache's); how many were removed."""
        namespace = self.options.namespace if namespace is None else namespace
        if not _NAMESPACE.fullmatch(namespace):
            raise ValueError(f"not a valid namespace: {namespace!r}")
        await self._settle(_prefixed(f"{namespace}:"))
        return await self.backend.clear(namespace)  # type: ignore[no-any-return]

    async def clear(self) -> int:
        """Remove every entry in the backend, whatever its namespace; how many were removed."""
        await self._settle(_prefixed(""))
        return await self.backend.clear(None)  # type: ignore[no-any-return]

    def health(self) -> LayerHealth:
        """Degraded after backend failures (the cache fails open, so calls still pass); hit rate and savings."""
        stats = self.stats
        details = {
            "hit_rate": stats.hit_rate,
            "hits": stats.hits,
            "misses": stats.misses,
            "coalesced": stats.coalesced,
            "bypassed": stats.bypassed,
            "backend_errors": stats.errors,
            "backend_timeouts": stats.timeouts,
            "stores_pending": len(self._store_tasks),
            "stores_skipped": stats.skipped_stores,
            "saved_tokens": stats.saved_tokens,
            "saved_cost": stats.saved_cost,
        }
        return LayerHealth(self.label, "degraded" if stats.errors else "ok", details)

    def describe(self) -> dict[str, Any]:
        options = self.options
        return {
            "layer": "Cache",
            "name": self.label,
            "backend": repr(self.backend),
            "options": {
                "ttl": options.ttl,
                "namespace": options.namespace,
                "key": None if options.key is None else _callable_name(options.key),
                "single_flight": options.single_flight,
                "backend_timeout": options.backend_timeout,
                "max_pending_stores": options.max_pending_stores,
                "price": None if options.price is None else _callable_name(options.price),
                "types": [_type_name(t) for t in options.types],
            },
        }

    # ---------------------------------------------------------------- the call

    def _key(self, call: Call) -> str:
        options = self.options
        if options.key is not None:
            return _custom_key(options.namespace, options.key(call))
        if self._keys is None:
            raise RuntimeError("Cache.on_build was not called: use the Cache inside a Pipeline")
        return self._keys.key(call.inputs)

    async def __call__(self, call: Call, next: Handler) -> Any:
        try:
            key = self._key(call)
        except Exception:
            logger.exception("%s: could not compute the key; the call runs uncached", self.label)
            return await next(call)
        if call.record.leases and leases_lent(call):
            await reclaim_leases(call)  # an earlier pass of this call (a retry above) lent them as a follower
        if call.bypass_cache:
            self._count.bypassed += 1
            self._missed(call, key, bypassed=True)
            return await self._lead(call, next, key, None)
        single_flight = self.options.single_flight
        nowait = self._nowait
        while True:
            flight = self._flight(key) if single_flight else None
            if flight is None:
                data = self._read_now(call, key, nowait) if nowait is not None else await self._read(call, key)
                if data is not None:
                    entry = self._decode(key, data)
                    if entry is not None:
                        return self._hit(call, key, entry)
                flight = self._flight(key) if single_flight else None
                if flight is None:
                    self._missed(call, key, bypassed=False)
                    if single_flight:
                        flight = asyncio.get_running_loop().create_future()
                        self._flights[key] = flight
                    return await self._lead(call, next, key, flight)
            if flight in _LEADING.get():
                # reentrant: an ancestor of this call leads the flight, so it can only end after this call
                self._missed(call, key, bypassed=False)
                return await next(call)
            if call.record.leases:
                lend_leases(call)  # it only waits: its bulkhead slot serves other questions meanwhile
            try:
                outcome = await asyncio.shield(flight)
            except BaseException as error:  # the leader's error, or this follower's own cancellation / timeout
                self._count.coalesced += 1
                if call.listening:
                    call.emit(self._coalesced_event(call, key, error))
                raise
            if outcome is not _RETRY:
                return self._follow(call, key, outcome)
            if call.record.leases and leases_lent(call):
                await reclaim_leases(call)  # the leader was cancelled: this call may lead next

    def _flight(self, key: str) -> asyncio.Future[Any] | None:
        flight = self._flights.get(key)
        if flight is not None and flight.get_loop() is not asyncio.get_running_loop():
            del self._flights[key]
            return None
        return flight

    async def _lead(self, call: Call, next: Handler, key: str, flight: asyncio.Future[Any] | None) -> Any:
        """Run the call, hand the answer to the followers waiting on ``flight`` (if any), and store it."""
        record = call.record
        served_by = record.served_by
        leading = None if flight is None else _LEADING.set((*_LEADING.get(), flight))
        try:
            try:
                with usage_scope() as scope:
                    try:
                        value = await next(call)
                    finally:
                        if leading is not None:
                            _LEADING.reset(leading)
            except Exception as error:
                if flight is not None:
                    flight.set_exception(error)
                    flight.exception()
                raise
            except BaseException:
                if flight is not None:
                    flight.set_result(_RETRY)
                raise
            attach_usage(value, scope)
            usage = scope.by_model()
            tokens = scope.total_tokens(usage)
            data = self._encode(value, usage, tokens)
            answer = _Answer(value, data, record.served_by, usage, tokens, record.served_by != served_by)
            if flight is not None:
                flight.set_result(answer)
            data = self._storable(call, key, answer)
            if data is not None:
                nowait = self._nowait
                if nowait is not None:
                    self._store_now(call, key, data, nowait)
                elif self._blocking:
                    self._store_later(call, key, data)  # never on the caller's critical path
                else:
                    await self._store(call, key, data)
            return value
        finally:
            if flight is not None and self._flights.get(key) is flight:
                del self._flights[key]

    def _hit(self, call: Call, key: str, entry: CachedEntry) -> Any:
        count = self._count
        count.hits += 1
        self._saved(entry.usage, entry.tokens)
        if call.listening:
            call.emit(
                CacheHit(
                    pipeline=call.runtime.name,
                    layer=self.label,
                    time=call.clock.now(),
                    key=key,
                    saved_tokens=entry.tokens,
                    saved_usage=entry.usage,
                )
            )
        return self._with_usage(entry.value, entry.usage)

    def _follow(self, call: Call, key: str, answer: _Answer) -> Any:
        self._count.coalesced += 1
        self._saved(answer.usage, answer.tokens)
        call.record.served_by = answer.served_by
        if call.listening:
            call.emit(self._coalesced_event(call, key, None, answer.tokens, answer.usage))
        value, usage = self._fresh(answer)
        return self._with_usage(value, usage)

    def _coalesced_event(
        self,
        call: Call,
        key: str,
        error: BaseException | None,
        tokens: int = 0,
        usage: dict[str, dict[str, Any]] | None = None,
    ) -> CacheCoalesced:
        return CacheCoalesced(
            pipeline=call.runtime.name,
            layer=self.label,
            time=call.clock.now(),
            key=key,
            error=error,
            saved_tokens=tokens,
            saved_usage=usage or {},
        )

    def _missed(self, call: Call, key: str, *, bypassed: bool) -> None:
        if not bypassed:  # a bypassed call is counted as bypassed only: each lookup is one of the four
            self._count.misses += 1
        if call.listening:
            call.emit(
                CacheMiss(
                    pipeline=call.runtime.name, layer=self.label, time=call.clock.now(), key=key, bypassed=bypassed
                )
            )

    def _saved(self, usage: dict[str, Any], tokens: int) -> None:
        count = self._count
        count.saved_tokens += tokens
        price = self.options.price
        if price is not None and usage:
            try:
                count.saved_cost += float(price(usage))
            except Exception:
                logger.exception("%s: the price function failed; saved_cost leaves this answer out", self.label)

    def _with_usage(self, value: Any, usage: dict[str, Any]) -> Any:
        if type(value) is dspy.Prediction and setting("track_usage"):
            value.set_lm_usage(usage)
        return value

    def _fresh(self, answer: _Answer) -> tuple[Any, dict[str, Any]]:
        """A follower's own copy of the leader's answer and usage, so no caller can mutate another's result."""
        if answer.data is not None:
            entry = self._decode("(in flight)", answer.data)
            if entry is not None:
                return entry.value, entry.usage
        try:
            return copy.deepcopy(answer.value), copy.deepcopy(answer.usage)
        except Exception:
            return answer.value, answer.usage

    # ---------------------------------------------------------------- encoding

    def _allow_target_types(self) -> None:
        if self._target is None:
            return
        for annotation in _annotations_of(self._target):
            self._serializer.allow_annotation(annotation)

    def _encode(self, value: Any, usage: dict[str, Any], tokens: int) -> bytes | None:
        for retry in (True, False):
            try:
                return self._serializer.dumps(value, usage, tokens)
            except UnencodableError as error:
                if retry and issubclass(error.kind, BaseModel | enum.Enum):
                    self._allow_target_types()
                    continue
                self._report_once(_type_name(error.kind), "%s: answer not cached: %s", self.label, error)
                return None
            except Exception as error:
                self._report_once(_type_name(type(value)), "%s: answer not cached: %r", self.label, error)
                return None
        return None

    def _decode(self, key: str, data: object) -> CachedEntry | None:
        if type(data) is not bytes:
            logger.warning("%s: backend returned a %s for %s; treated as a miss", self.label, type(data).__name__, key)
            return None
        for retry in (True, False):
            try:
                return self._serializer.loads(data)
            except UnknownTypeError as error:
                if retry:
                    self._allow_target_types()
                    continue
                logger.warning("%s: unreadable entry %s (%s); treated as a miss", self.label, key, error)
            except CorruptEntryError as error:
                logger.warning("%s: unreadable entry %s (%s); treated as a miss", self.label, key, error)
                return None
        return None

    def _report_once(self, topic: str, message: str, *args: object) -> None:
        if topic in self._reported:
            return
        if len(self._reported) < 256:
            self._reported.add(topic)
        logger.warning(message, *args)

    # ---------------------------------------------------------------- the backend, failing open

    def _read_now(self, call: Call, key: str, backend: NowaitBackend) -> bytes | None:
        try:
            return backend.get_nowait(key)
        except Exception as error:
            self._failed(call, "get", key, error, timed_out=False)
            return None

    async def _read(self, call: Call, key: str) -> bytes | None:
        backend = self.backend
        try:
            if not self._blocking:
                return await backend.get(key)  # type: ignore[no-any-return]
            clock = call.clock
            now = clock.now()
            if self._pending:
                pending = self._pending.get(key)
                if pending is not None and (pending.expires_at is None or now < pending.expires_at):
                    return pending.data
            budget = self.options.backend_timeout
            deadline = call.deadline
            if deadline is not None:  # leave the program most of the time left
                budget = min(budget, (deadline - now) * _READ_SHARE)
                if budget <= 0:
                    return None
            scope = clock.deadline(now + budget)
            try:
                async with scope:
                    data: bytes | None = await backend.get(key)
            except TimeoutError as error:
                if not scope.expired():
                    raise
                self._failed(call, "get", key, error, timed_out=True, budget=budget)
                return None
            if self._timing_out:
                self._answered("get")
            return data
        except Exception as error:
            self._failed(call, "get", key, error, timed_out=False)
            return None
        except BaseException:  # cancelled while reading: the lookup ends here, as a miss that runs nothing
            self._missed(call, key, bypassed=False)
            raise

    def _storable(self, call: Call, key: str, answer: _Answer) -> bytes | None:
        """The bytes to store, or None (and a CacheNotStored event) for a fallback's or an unencodable answer."""
        reason = "fallback" if answer.fallback else "unencodable" if answer.data is None else None
        if reason is None:
            return answer.data
        if call.listening:
            call.emit(
                CacheNotStored(
                    pipeline=call.runtime.name, layer=self.label, time=call.clock.now(), key=key, reason=reason
                )
            )
        return None

    def _store_now(self, call: Call, key: str, data: bytes, backend: NowaitBackend) -> None:
        try:
            backend.set_nowait(key, data, self.options.ttl)
        except Exception as error:
            self._failed(call, "set", key, error, timed_out=False)
            return
        self._stored(call, key, data)

    def _store_later(self, call: Call, key: str, data: bytes) -> None:
        """Store in a background task, kept referenced and bounded; when ``max_pending_stores`` are running, skip."""
        tasks = self._store_tasks
        if len(tasks) >= self.options.max_pending_stores:
            self._count.skipped_stores += 1
            if not self._backlogged:
                self._backlogged = True
                logger.warning(
                    "%s: %d stores still running on a slow backend; answers are not stored until one ends",
                    self.label,
                    len(tasks),
                )
            if call.listening:
                call.emit(
                    CacheNotStored(
                        pipeline=call.runtime.name, layer=self.label, time=call.clock.now(), key=key, reason="backlog"
                    )
                )
            return
        ttl = self.options.ttl
        pending = _PendingStore(data, None if ttl is None else call.clock.now() + ttl)
        self._pending[key] = pending
        task = asyncio.get_running_loop().create_task(self._store(call, key, data))
        tasks[task] = key

        def forget(task: asyncio.Task[None]) -> None:
            del tasks[task]
            if self._pending.get(key) is pending:
                del self._pending[key]
            if not tasks:
                self._backlogged = False

        task.add_done_callback(forget)

    async def _store(self, call: Call, key: str, data: bytes) -> None:
        ttl = self.options.ttl
        backend = self.backend
        try:
            if not self._blocking:
                await backend.set(key, data, ttl)
            else:
                clock = call.clock
                budget = self.options.backend_timeout
                scope = clock.deadline(clock.now() + budget)
                try:
                    async with scope:
                        await backend.set(key, data, ttl)
                except TimeoutError as error:
                    if not scope.expired():
                        raise
                    self._failed(call, "set", key, error, timed_out=True, budget=budget)
                    return
                if self._timing_out:
                    self._answered("set")
        except Exception as error:
            self._failed(call, "set", key, error, timed_out=False)
            return
        self._stored(call, key, data)

    def _stored(self, call: Call, key: str, data: bytes) -> None:
        self._count.stores += 1
        if call.listening:
            call.emit(
                CacheStored(
                    pipeline=call.runtime.name,
                    layer=self.label,
                    time=call.clock.now(),
                    key=key,
                    ttl=self.options.ttl,
                    size=len(data),
                )
            )

    def _answered(self, operation: str) -> None:
        if operation in self._timing_out:
            self._timing_out.discard(operation)
            logger.info("%s: backend %s answers in time again", self.label, operation)

    def _failed(
        self, call: Call, operation: str, key: str, error: BaseException, *, timed_out: bool, budget: float = 0.0
    ) -> None:
        count = self._count
        count.errors += 1
        if timed_out:
            count.timeouts += 1
            # logged once per outage: a hung backend would otherwise log every call; each one is counted
            first = operation not in self._timing_out
            self._timing_out.add(operation)
            logger.log(
                logging.WARNING if first else logging.DEBUG,
                "%s: backend %s took over %gs for %s; going on without it",
                self.label,
                operation,
                budget,
                key,
            )
        else:
            logger.warning("%s: backend %s failed for %s (%r); going on without it", self.label, operation, key, error)
        if call.listening:
            call.emit(
                CacheBackendFailed(
                    pipeline=call.runtime.name,
                    layer=self.label,
                    time=call.clock.now(),
                    key=key,
                    operation=operation,
                    error=error,
                    timed_out=timed_out,
                )
            )
