"""Per-key state for the stateful guards (breaker, bulkhead, rate limiter, budget), bounded in memory.

A guard given ``key=`` (a function of the :class:`~resilient_dspy.Call`) keeps independent state per key — one
circuit per model, one bulkhead per provider. States are created on first use and kept in LRU order. Each state
says what dropping it would lose (:class:`Hold`): nothing (evicted once unused for ``idle_after`` or beyond
``max_keys``), protection (an open circuit, a failure count, recent admissions: kept, evicted only beyond
``max_keys`` when no harmless state is left, oldest first, and counted), or calls (in flight, queued, pinned:
never evicted). So the number of states exceeds ``max_keys`` only by states with calls at that moment.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from enum import IntEnum
from itertools import islice
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from pydantic import Field

from resilient_dspy.binding.lm_identity import lm_identity
from resilient_dspy.binding.settings import setting
from resilient_dspy.core.options import Options

if TYPE_CHECKING:
    from resilient_dspy.core.call import Call

__all__ = [
    "Hold",
    "KeyFunction",
    "KeyedStates",
    "PartitionOptions",
    "PartitionState",
    "Partitions",
    "by_model",
    "by_partition_key",
]

KeyFunction = Callable[["Call"], Hashable]


class Hold(IntEnum):
    """What evicting a per-key state now would lose; higher holds keep it more firmly."""

    NOTHING = 0  # harmless: a fresh state would behave the same
    PROTECTION = 1  # it still protects (open circuit, failure count, recent admissions): evicted only under pressure
    CALLS = 2  # calls in flight or queued on it, or pinned by an operator: never evicted


class PartitionState(Protocol):
    """What a per-key state must tell its :class:`Partitions`: what dropping it now would lose."""

    def hold(self, now: float) -> Hold: ...


StateT = TypeVar("StateT", bound=PartitionState)


class PartitionOptions(Options):
    """The partitioning fields every stateful guard accepts."""

    key: Callable[[Any], Hashable] | None = Field(default=None, description="Function of the call giving its key.")
    max_keys: int = Field(default=1024, ge=1, description="Keys kept; beyond it the oldest go (busy ones never).")
    idle_after: float = Field(default=600.0, gt=0, allow_inf_nan=False, description="Seconds before an idle key goes.")


def by_model(call: Call) -> Hashable:
    """Partition by the LM in effect for this call (``dspy.context(lm=...)`` or configured): its model and endpoint,
    as :func:`~resilient_dspy.binding.lm_identity.lm_identity` gives them, so two deployments of one model stay
    apart."""
    return lm_identity(setting("lm")) or "default"


def by_partition_key(call: Call) -> Hashable:
    """Partition by ``call.partition_key`` (set by the caller with ``pipeline.new_call(..., partition_key=)``)."""
    return call.partition_key


class Partitions(Generic[StateT]):
    """States by key in LRU order; ``get`` creates on first use and evicts by :class:`Hold`, harmless ones first.

    Two tiers keep eviction cheap: ``_states`` (recently used, LRU) and ``_held`` (protective states the sweep set
    aside, oldest first). Under pressure the sweep drains the harmless states of the first tier before it evicts
    the oldest of the second, so a protective state is not re-examined on every call.
    """

    __slots__ = (
        "_factory",
        "_held",
        "_last_used",
        "_states",
        "evicted_protective",
        "idle_after",
        "last_evicted_at",
        "max_keys",
        "on_evict",
    )

    _SWEEP = 4  # states examined per get when not over max_keys: stale-state cleanup stays O(1) per call

    def __init__(
        self,
        factory: Callable[[Hashable], StateT],
        *,
        max_keys: int,
        idle_after: float,
        on_evict: Callable[[Hashable, StateT], None] | None = None,
    ) -> None:
        self._factory = factory
        self._states: OrderedDict[Hashable, StateT] = OrderedDict()
        self._held: OrderedDict[Hashable, StateT] = OrderedDict()
        self._last_used: dict[Hashable, float] = {}
        self.max_keys = max_keys
        self.idle_after = idle_after
        self.on_evict = on_evict
        self.evicted_protective = 0
        """States evicted while they still protected (beyond ``max_keys`` with nothing harmless left)."""
        self.last_evicted_at: float | None = None
        """When the last protective state was evicted."""

    def get(self, key: Hashable, now: float) -> StateT:
        states = self._states
        state = states.get(key)
        if state is None:
            state = self._held.pop(key, None)
            if state is None:
                state = self._factory(key)
            states[key] = state
        else:
            states.move_to_end(key)
        self._last_used[key] = now
        if len(states) + len(self._held) > 1:
            self._sweep(key, now)
        return state

    def _sweep(self, keep: Hashable, now: float) -> None:
        """Evict stale harmless states and, beyond ``max_keys``, enough others; never ``keep`` or a busy state."""
        states, held, last_used = self._states, self._held, self._last_used
        over = len(states) + len(held) - self.max_keys
        examined = 0
        # The recent tier, oldest first: a busy state is passed (it counts as used), a protective one set aside.
        while True:
            oldest = next(iter(states))
            if oldest == keep:  # everything before it was examined; busy ones went behind it
                break
            stale = now - last_used[oldest] >= self.idle_after
            if over <= 0 and (not stale or examined >= self._SWEEP):
                break
            examined += 1
            hold = states[oldest].hold(now)
            if hold is Hold.CALLS:
                states.move_to_end(oldest)
                last_used[oldest] = now
            elif hold is Hold.PROTECTION:
                held[oldest] = states.pop(oldest)
            else:
                del states[oldest], last_used[oldest]
                over -= 1
        if not held:
            return
        # The set-aside tier, oldest first. Not over max_keys: only its oldest is re-examined (protection expires).
        # Over: a few of the oldest are, harmless ones go first; then the oldest protective states, counted.
        if over <= 0:
            oldest, state = next(iter(held.items()))
            if now - last_used[oldest] >= self.idle_after and state.hold(now) is Hold.NOTHING:
                del held[oldest], last_used[oldest]
            return
        for oldest, state in list(islice(held.items(), self._SWEEP)):
            if state.hold(now) is Hold.NOTHING:
                del held[oldest], last_used[oldest]
                over -= 1
                if over <= 0:
                    return
        while over > 0 and held:
            oldest, state = next(iter(held.items()))
            hold = state.hold(now)
            if hold is Hold.CALLS:  # pinned since it was set aside (an operator's isolate()): back to the recent tier
                states[oldest] = held.pop(oldest)
                states.move_to_end(keep)
                continue
            del held[oldest], last_used[oldest]
            over -= 1
            if hold is Hold.PROTECTION:
                self.evicted_protective += 1
                self.last_evicted_at = now
                if self.on_evict is not None:
                    self.on_evict(oldest, state)

    def peek(self, key: Hashable) -> StateT | None:
        """The state for ``key`` if it exists, without touching its LRU position."""
        state = self._states.get(key)
        return self._held.get(key) if state is None else state

    def items(self) -> Iterator[tuple[Hashable, StateT]]:
        """Every live state, the set-aside (protective, least recently used) ones first."""
        return iter([*self._held.items(), *self._states.items()])

    def __len__(self) -> int:
        return len(self._states) + len(self._held)

    def __contains__(self, key: object) -> bool:
        return key in self._states or key in self._held


class KeyedStates(Generic[StateT]):
    """A stateful layer's states: its one shared state without ``key=``, else one per key in :class:`Partitions`.
    The one place a layer gets a key's state, peeks at it and lists every live one (for ``snapshots()``); a layer's
    hot path reads ``single``, ``key_of`` and ``partitions`` directly (a method call there costs ~5 %)."""

    __slots__ = ("key_of", "partitions", "single")

    def __init__(
        self,
        options: PartitionOptions,
        factory: Callable[[Hashable], StateT],
        *,
        single: Callable[[], StateT] | None = None,
        on_evict: Callable[[Hashable, StateT], None] | None = None,
    ) -> None:
        self.key_of: Callable[[Any], Hashable] | None = options.key
        self.single: StateT | None = None
        """The shared state (None when partitioned): a layer's fast path reads it directly."""
        if options.key is None:
            self.single = factory(None) if single is None else single()
        self.partitions: Partitions[StateT] = Partitions(
            factory, max_keys=options.max_keys, idle_after=options.idle_after, on_evict=on_evict
        )

    def get(self, key: Hashable, now: float) -> StateT:
        """The state for ``key`` (the shared one when unpartitioned), created on first use."""
        single = self.single
        return single if single is not None else self.partitions.get(key, now)

    def peek(self, key: Hashable) -> StateT | None:
        """The state for ``key`` if it exists (the shared one when unpartitioned), its LRU place untouched."""
        single = self.single
        return single if single is not None else self.partitions.peek(key)

    def items(self) -> list[tuple[Hashable, StateT]]:
        """Every live state by key: ``[(None, shared)]`` when unpartitioned."""
        single = self.single
        return [(None, single)] if single is not None else list(self.partitions.items())
