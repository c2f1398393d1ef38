"""One layer's tie to its store: the ``store=`` and ``on_store_failure=`` options, and the outage bookkeeping.

Each stateful layer takes the same two options (:class:`StoreOptions`) and holds one :class:`StoreLink`. The link
runs the layer's steps on the store and, when one fails, tells the layer (it raises
:class:`~resilient_dspy.store.protocol.StoreUnavailableError`, which the layer turns into its documented fallback),
emits :class:`~resilient_dspy.store.events.StoreUnavailable` and logs once per outage, and reports ``degraded``
in ``health()`` until the store answers again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import Field

from resilient_dspy.core.options import Options
from resilient_dspy.store.events import StoreRecovered, StoreUnavailable
from resilient_dspy.store.protocol import FailMode, StateStore, StoreUnavailableError

if TYPE_CHECKING:
    from resilient_dspy.core.call import Call
    from resilient_dspy.core.layer import Layer

__all__ = ["StoreLink", "StoreOptions"]

logger = logging.getLogger("resilient_dspy.store")


class StoreOptions(Options):
    """The store fields every stateful layer accepts."""

    store: StateStore | None = Field(
        default=None, description="Shared state (a RedisStore); None keeps the state in this process."
    )
    on_store_failure: FailMode = Field(
        default="local",
        description="While the store is unreachable: 'local' serves on in-process state, 'reject' refuses calls.",
    )


class StoreLink:
    """A layer's store, its failure mode, whether the layer is in an outage (``down_since``), and what it does
    meanwhile, as its warning says it (``meanwhile``: a cache's calls go uncached)."""

    __slots__ = ("down_since", "failures", "layer", "meanwhile", "mode", "store")

    def __init__(self, layer: Layer, store: StateStore, mode: FailMode, *, meanwhile: str | None = None) -> None:
        self.layer = layer
        self.store = store
        self.mode = mode
        self.meanwhile = meanwhile or ("serving on in-process state" if mode == "local" else "rejecting calls")
        self.down_since: float | None = None
        self.failures = 0

    async def run(self, call: Call, script: str, keys: Sequence[str], args: Sequence[Any], *, operation: str) -> Any:
        """Run one step; on failure record it (event and log once per outage) and re-raise for the layer."""
        try:
            result = await self.store.run(script, keys, args, operation=operation)
        except StoreUnavailableError as error:
            self.failed(call, error)
            raise
        if self.down_since is not None:
            self.recovered(call)
        return result

    def failed(self, call: Call, error: StoreUnavailableError) -> None:
        """Count a failed step; the first of an outage emits :class:`StoreUnavailable` and logs a warning."""
        self.failures += 1
        if self.down_since is not None:
            return
        self.down_since = call.clock.now()
        layer = self.layer
        layer.emit(
            call, StoreUnavailable, store=self.store.name, operation=error.operation, error=str(error), mode=self.mode
        )
        logger.warning(
            "%s: store %r unavailable (%s); %s until it answers", layer.name, self.store.name, error, self.meanwhile
        )

    def recovered(self, call: Call) -> None:
        """The store answered after an outage: emit :class:`StoreRecovered` and log it."""
        since = self.down_since
        if since is None:
            return
        self.down_since = None
        outage = max(0.0, call.clock.now() - since)
        self.layer.emit(call, StoreRecovered, store=self.store.name, outage=outage)
        logger.warning("%s: store %r answers again after %.3fs", self.layer.name, self.store.name, outage)

    def health_details(self) -> dict[str, Any]:
        """What ``health()`` adds for the store: its name, whether it is reachable, failed steps so far."""
        return {"store": self.store.name, "store_ok": self.down_since is None, "store_failures": self.failures}

    @property
    def degraded(self) -> bool:
        """True while in an outage: ``health()`` says ``degraded`` (``local``) or ``down`` (``reject``)."""
        return self.down_since is not None
