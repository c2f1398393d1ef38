"""The contract of a shared state store: named keys, atomic server-side steps, a bounded time per step.

A store is a connection, not a data structure: each pattern keeps its own algorithm next to its layer (a Lua
script per atomic step for :class:`~resilient_dspy.store.redis.RedisStore`) and asks the store only to run it
within ``timeout``. Every failure — refused connection, timeout, server error — surfaces as one type,
:class:`StoreUnavailableError`, so a layer has exactly one thing to catch when it falls back (see
:mod:`resilient_dspy.store.link`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol, runtime_checkable

from resilient_dspy.core.health import LayerHealth
from resilient_dspy.errors import ResilienceError

__all__ = ["FailMode", "StateStore", "StoreUnavailableError"]

FailMode = Literal["local", "reject"]
"""What a layer does while its store is unreachable: ``local`` keeps serving on in-process state (fail open, each
process on its own), ``reject`` refuses the call with the layer's own rejection (fail closed)."""


class StoreUnavailableError(ResilienceError):
    """A store step did not complete: the server is down, slow past the store's ``timeout``, or refused the step."""

    def __init__(self, store: str, operation: str, cause: BaseException | None = None) -> None:
        self.store = store
        self.operation = operation
        self.cause = cause
        detail = f": {type(cause).__name__}: {cause}" if cause is not None else ""
        super().__init__(f"store {store!r} could not {operation}{detail}")


@runtime_checkable
class StateStore(Protocol):
    """What layers need from a shared store. :class:`~resilient_dspy.store.redis.RedisStore` is the built-in one."""

    @property
    def name(self) -> str:
        """The label in events, health and ``describe()``."""
        ...

    @property
    def retry_interval(self) -> float:
        """Seconds a failed store is left alone before it is tried again: a fail-closed rejection's ``retry_after``."""
        ...

    def key(self, *parts: str) -> str:
        """One namespaced key: the store's prefix and ``parts`` joined, so layers and tenants never collide."""
        ...

    async def run(self, script: str, keys: Sequence[str], args: Sequence[Any], *, operation: str) -> Any:
        """Run one atomic server-side step (a Lua script) within the store's timeout; raise
        :class:`StoreUnavailableError` on any failure. ``operation`` names the step in that error."""
        ...

    def health(self) -> LayerHealth:
        """``ok`` while steps succeed, ``degraded`` after a failure until a step succeeds again."""
        ...

    def describe(self) -> dict[str, Any]:
        """The store's kind and options, without secrets (a URL's password is masked)."""
        ...

    async def aclose(self) -> None:
        """Release the store's connections; the store may not be used afterwards."""
        ...
