"""Per-key state for the stateful guards (breaker, bulkhead, rate limiter), bounded in memory.

A guard given ``key=`` (a function of the :class:`~resilient_dspy.Call`) keeps independent state per key — one
circuit per model, one bulkhead per provider. States are created on first use and kept in LRU order; a state
that is *idle* (no call in flight, nothing queued, nothing it must remember) and unused for ``idle_after``
seconds, or beyond ``max_keys``, is evicted. A busy state is never evicted, so the bound can be exceeded only
by keys that are in use at that moment.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from pydantic import Field

from resilient_dspy.dspy_binding import lm_identity, setting
from resilient_dspy.options import Options

if TYPE_CHECKING:
    from resilient_dspy.pipeline import Call

__all__ = ["KeyFunction", "PartitionOptions", "PartitionState", "Partitions", "by_model", "by_partition_key"]

KeyFunction = Callable[["Call"], Hashable]


class PartitionState(Protocol):
    """What a per-key state must tell its :class:`Partitions`: whether dropping it now would lose anything."""

    def idle(self, now: float) -> bool: ...


StateT = TypeVar("StateT", bound=PartitionState)


class PartitionOptions(Options):
    """The partitioning fields every stateful guard accepts."""

    key: Callable[[Any], Hashable] | None = Field(default=None, description="Function of the call giving its key.")
    max_keys: int = Field(default=1024, ge=1, description="Keys kept before idle ones are evicted (LRU).")
    idle_after: float = Field(default=600.0, gt=0, allow_inf_nan=False, description="Seconds before an idle key goes.")


def by_model(call: Call) -> Hashable:
    """Partition by the LM in effect for this call (``dspy.context(lm=...)`` or configured): its model and endpoint,
    as :func:`~resilient_dspy.dspy_binding.lm_identity` gives them, so two deployments of one model stay apart."""
    return lm_identity(setting("lm")) or "default"


def by_partition_key(call: Call) -> Hashable:
    """Partition by ``call.partition_key`` (set by the caller with ``pipeline.new_call(..., partition_key=)``)."""
    return call.partition_key


class Partitions(Generic[StateT]):
    """States by key in LRU order; ``get`` creates on first use and evicts at most a few idle states per call."""

    __slots__ = ("_factory", "_last_used", "_states", "idle_after", "max_keys")

    _SWEEP = 4  # states examined per get: eviction stays O(1) per call

    def __init__(self, factory: Callable[[Hashable], StateT], *, max_keys: int, idle_after: float) -> None:
        self._factory = factory
        self._states: OrderedDict[Hashable, StateT] = OrderedDict()
        self._last_used: dict[Hashable, float] = {}
        self.max_keys = max_keys
        self.idle_after = idle_after

    def get(self, key: Hashable, now: float) -> StateT:
        states = self._states
        state = states.get(key)
        if state is None:
            state = states[key] = self._factory(key)
        else:
            states.move_to_end(key)
        self._last_used[key] = now
        if len(states) > 1:
            self._sweep(key, now)
        return state

    def _sweep(self, keep: Hashable, now: float) -> None:
        """Evict up to a few idle states from the LRU end; never ``keep``, the state being handed out."""
        states = self._states
        for _ in range(self._SWEEP):
            oldest, state = next(iter(states.items()))
            if oldest == keep:
                return  # every other state was examined and kept: only busy ones remain ahead of it
            stale = now - self._last_used[oldest] >= self.idle_after
            if not (stale or len(states) > self.max_keys):
                return
            if state.idle(now):
                del states[oldest], self._last_used[oldest]
            else:
                states.move_to_end(oldest)

    def peek(self, key: Hashable) -> StateT | None:
        """The state for ``key`` if it exists, without touching its LRU position."""
        return self._states.get(key)

    def items(self) -> Iterator[tuple[Hashable, StateT]]:
        return iter(list(self._states.items()))

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, key: object) -> bool:
        return key in self._states
