"""The names a stack config may use for a layer or an object, and ``module:attr`` import paths for one's own.

Built-in kinds are a table of import paths, resolved on first use: the config package imports no layer, so the
core's ``Pipeline.from_config`` can reach it without an import cycle (the layers import the core).
"""

from __future__ import annotations

import enum
import importlib
import inspect
import re
from typing import Any

from pydantic import BaseModel

__all__ = ["BUILTIN_KINDS", "import_path", "is_import_path", "resolve", "resolve_kind"]

_MIDDLEWARE = "resilient_dspy.middleware"
_BACKENDS = "resilient_dspy.middleware.cache.backends"

BUILTIN_KINDS: dict[str, str] = {
    **{
        name: f"{_MIDDLEWARE}:{name}"
        for name in (
            "Timeout",
            "AdaptiveTimeout",
            "Retry",
            "RetryBudget",
            "CircuitBreaker",
            "Bulkhead",
            "AdaptiveConcurrency",
            "AdaptiveThrottle",
            "RateLimiter",
            "Limit",
            "Cache",
            "Fallback",
            "Canary",
            "Hedge",
            "Percentile",
            "UseLM",
            "UseProgram",
            "Static",
            "Guard",
            "InputRules",
            "Budget",
            "Chaos",
        )
    },
    **{
        name: f"{_BACKENDS}:{name}"
        for name in ("MemoryBackend", "DiskBackend", "TieredBackend", "AiocacheBackend", "RedisBackend")
    },
    "PrometheusMetrics": "resilient_dspy.observe.prometheus:PrometheusMetrics",
    "CostTracker": "resilient_dspy.observe.cost:CostTracker",
    "LogCalls": "resilient_dspy.observe.logging:LogCalls",
    "LM": "dspy:LM",
    "FaultInjectingLM": "resilient_dspy.testing:FaultInjectingLM",
    "by_model": "resilient_dspy:by_model",
    "by_partition_key": "resilient_dspy:by_partition_key",
    "RedisStore": "resilient_dspy.store:RedisStore",
}
"""Kind name -> ``module:attr``; any other kind is read as an import path itself."""

_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def is_import_path(text: str) -> bool:
    """True for ``package.module:attribute`` (dots allowed on both sides, no spaces)."""
    return bool(_PATH.match(text))


def resolve(path: str) -> Any:
    """The object at ``module:attr`` (``attr`` may be dotted); raises ``ValueError`` saying what is missing."""
    if not is_import_path(path):
        raise ValueError(f"must be an import path 'package.module:name' (got {path!r})")
    module_name, _, attribute = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import module {module_name!r} ({error})") from None
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(f"module {module_name!r} has no {attribute!r}") from None
    return target


def resolve_kind(kind: str) -> Any:
    """A built-in kind's class (``"Timeout"``) or the object at an import path (``"myapp.layers:Audit"``)."""
    path = BUILTIN_KINDS.get(kind)
    if path is None and not is_import_path(kind):
        known = ", ".join(sorted(BUILTIN_KINDS))
        raise ValueError(f"unknown kind {kind!r}: use one of {known}, or an import path 'package.module:Class'")
    return resolve(path or kind)


def import_path(value: Any) -> str | None:
    """How a config names ``value`` (a class, a function, an enum member): its kind or ``module:qualname``; None
    when it has no importable name (a lambda, a closure, an instance)."""
    if isinstance(value, enum.Enum):
        return None
    if not (inspect.isclass(value) or inspect.isfunction(value) or inspect.isbuiltin(value)):
        return None
    module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", "")
    if not module or "<" in qualname:
        return None
    for kind, path in BUILTIN_KINDS.items():
        if path.split(":")[1] == qualname and _same(path, value):
            return kind
    path = f"{module}:{qualname}"
    return path if _same(path, value) else None


def _same(path: str, value: Any) -> bool:
    try:
        return resolve(path) is value
    except ValueError:
        return False


def kind_of(model: BaseModel) -> str:
    """The kind naming an options-like object (``Limit``, ``RetryBudget``) in a config."""
    return import_path(type(model)) or f"{type(model).__module__}:{type(model).__qualname__}"
