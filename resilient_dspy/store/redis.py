"""RedisStore: shared state on a Redis server through redis-py's asyncio client and its connection pool.

Each step is one ``EVALSHA`` of a pattern's Lua script (loaded once, reloaded after a server restart by redis-py's
:class:`~redis.commands.core.AsyncScript`), so every admission is one atomic round trip; scripts read the time
with ``TIME`` on the server, so clock skew between hosts cannot over-admit. Every step is bounded by ``timeout``;
after a failure the store does not touch the network for ``retry_interval`` seconds (steps fail at once), then
tries again — so a dead server costs a call one timeout per interval, not one per call, and a restarted server is
used again on its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field

from resilient_dspy.core.health import LayerHealth
from resilient_dspy.core.options import Options, options_from
from resilient_dspy.store.protocol import StoreUnavailableError

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

__all__ = ["RedisStore", "RedisStoreOptions"]


class RedisStoreOptions(Options):
    """How to reach the server and how long a step may take; see docs/guides/scaling-out.md."""

    url: str | None = Field(default=None, description="redis:// or rediss:// URL; give this or client.")
    client: Any = Field(default=None, description="A redis.asyncio.Redis to use instead of url (not closed by us).")
    prefix: str = Field(default="resilient_dspy", min_length=1, description="Namespace of every key.")
    timeout: float = Field(default=0.25, gt=0, allow_inf_nan=False, description="Seconds one step may take.")
    retry_interval: float = Field(
        default=1.0, ge=0, allow_inf_nan=False, description="Seconds after a failure before the server is tried again."
    )
    name: str | None = Field(default=None, description="Label in events and health; default redis://host:port/db.")


class RedisStore:
    """Shared state on Redis; give the same object to every layer of a process (one connection pool)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Redis | None = None,
        prefix: str = "resilient_dspy",
        timeout: float = 0.25,
        retry_interval: float = 1.0,
        name: str | None = None,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.options = options_from(RedisStoreOptions, "RedisStore", locals())
        if (url is None) == (client is None):
            from resilient_dspy.errors import ConfigurationError

            raise ConfigurationError([("RedisStore.url", "give exactly one of url= or client=")])
        if client is None:
            import redis.asyncio

            assert url is not None
            client = redis.asyncio.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
            self._owns_client = True
        else:
            self._owns_client = False
        self.client: Redis = client
        self._now = now
        self._scripts: dict[str, AsyncScript] = {}
        self._skip_until = -1.0
        self.failures = 0
        self.last_error: str | None = None
        self._name = name or _label(url, client)

    @property
    def name(self) -> str:
        return self._name

    @property
    def retry_interval(self) -> float:
        return self.options.retry_interval

    def key(self, *parts: str) -> str:
        return ":".join((self.options.prefix, *parts))

    async def run(self, script: str, keys: Sequence[str], args: Sequence[Any], *, operation: str) -> Any:
        if self._now() < self._skip_until:
            raise StoreUnavailableError(self._name, operation, ConnectionError(f"skipped after: {self.last_error}"))
        compiled = self._scripts.get(script)
        if compiled is None:
            compiled = self._scripts[script] = self.client.register_script(script)
        try:
            async with asyncio.timeout(self.options.timeout):
                result = await compiled(keys=list(keys), args=list(args))
        except (Exception, TimeoutError) as error:  # CancelledError is a BaseException: it propagates
            self.failures += 1
            self.last_error = f"{type(error).__name__}: {error}"
            self._skip_until = self._now() + self.options.retry_interval
            raise StoreUnavailableError(self._name, operation, error) from error
        self._skip_until = -1.0
        return result

    async def warm(self, connections: int = 1) -> None:
        """Open ``connections`` pooled connections now (a PING each, together), so the first steps of a busy start
        do not pay the connection set-up inside their step ``timeout``; raises :class:`StoreUnavailableError` when
        the server cannot be reached (bound the wait with ``asyncio.timeout`` around it)."""
        try:
            await asyncio.gather(*(self.client.ping() for _ in range(connections)))
        except (Exception, TimeoutError) as error:
            raise StoreUnavailableError(self._name, "warm up", error) from error

    def health(self) -> LayerHealth:
        down = self._skip_until >= 0.0
        details: dict[str, Any] = {"failures": self.failures}
        if self.last_error is not None:
            details["last_error"] = self.last_error
        return LayerHealth(layer=self._name, status="degraded" if down else "ok", details=details)

    def describe(self) -> dict[str, Any]:
        options = self.options
        return {
            "store": "RedisStore",
            "name": self._name,
            "prefix": options.prefix,
            "timeout": options.timeout,
            "retry_interval": options.retry_interval,
        }

    async def aclose(self) -> None:
        if self._owns_client:
            await self.client.aclose()

    def __repr__(self) -> str:
        return f"RedisStore({self._name!r}, prefix={self.options.prefix!r})"


def _label(url: str | None, client: Any) -> str:
    """``redis://host:port/db`` with any password masked; for a given client, its pool's address."""
    if url is not None:
        parts = urlsplit(url)
        if parts.password is not None:
            host = parts.hostname or ""
            port = f":{parts.port}" if parts.port else ""
            user = f"{parts.username}:***@" if parts.username else "***@"
            parts = parts._replace(netloc=f"{user}{host}{port}")
        return urlunsplit(parts)
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
    host, port, db = kwargs.get("host", "?"), kwargs.get("port", "?"), kwargs.get("db", 0)
    return f"redis://{host}:{port}/{db}"
