"""What a Cache is told: its backend, TTL, namespace, key and price functions, what it may store."""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field, field_serializer, field_validator

from resilient_dspy.binding.shape import qualified_name
from resilient_dspy.core.options import Options
from resilient_dspy.middleware.cache.backends.memory import MemoryBackend
from resilient_dspy.middleware.cache.backends.protocol import is_backend
from resilient_dspy.middleware.cache.keys import CacheKeyFunction

__all__ = [
    "CacheOptions",
    "CachePriceFunction",
]


CachePriceFunction = Callable[[dict[str, dict[str, Any]]], float]
"""``Cache(price=...)``: the dollars one cached answer's LM usage cost when it was made — its usage by model
(``{model: {"prompt_tokens": …, "completion_tokens": …, "total_tokens": …}}``, as stored with the answer) — added
to ``saved_cost`` each time a hit or a follower is served without running the program."""

_NAMESPACE = re.compile(r"[A-Za-z0-9_.\-/]{1,100}")


class CacheOptions(Options):
    """What :class:`Cache` accepts; validated when the Cache is created. Dumped (``describe()``), the functions and
    types are their qualified names, and the backend is left out (``describe()`` shows its repr beside them)."""

    backend: Any = Field(
        default=None,
        validate_default=True,
        exclude=True,
        description="Where entries live (None: a new MemoryBackend).",
    )
    ttl: float | None = Field(
        default=3600.0, gt=0, allow_inf_nan=False, description="Seconds an entry lives; None = until evicted."
    )
    namespace: str = Field(default="default", description="Prefix of every key; invalidate a whole namespace at once.")
    key: CacheKeyFunction | None = Field(default=None, description="Function of the call replacing the computed key.")
    single_flight: bool = Field(default=True, description="Concurrent identical misses share one program call.")
    backend_timeout: float = Field(
        default=1.0, gt=0, allow_inf_nan=False, description="Seconds a backend call may take."
    )
    max_pending_stores: int = Field(
        default=100, ge=1, description="Background stores in flight at most; beyond it an answer is not stored."
    )
    price: CachePriceFunction | None = Field(
        default=None, description="Dollars of a stored answer's usage (by model), for saved_cost."
    )
    types: tuple[type, ...] = Field(default=(), description="Extra pydantic models / enums answers may hold.")
    name: str | None = Field(default=None, description="Label in events, logs, health and describe().")

    @field_validator("backend", mode="before")
    @classmethod
    def _check_backend(cls, value: Any) -> Any:
        if value is None:
            return MemoryBackend()
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

    @field_serializer("key", "price")
    def _dump_function(self, function: Callable[..., Any] | None) -> str | None:
        return None if function is None else qualified_name(function)

    @field_serializer("types")
    def _dump_types(self, types: tuple[type, ...]) -> list[str]:
        return [qualified_name(kind) for kind in types]
