"""A call's place in a concurrency compartment as a :class:`~resilient_dspy.core.call.Lease` (Bulkhead,
AdaptiveConcurrency): lent out while a Cache below makes the call wait for an identical call's answer, taken back
by the layer's own admission rules before the call runs itself."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

if TYPE_CHECKING:
    from resilient_dspy.core.call import Call

__all__ = ["CompartmentLease"]


class _Releasable(Protocol):
    def release(self) -> None: ...


CompartmentT = TypeVar("CompartmentT", bound=_Releasable)


class CompartmentLease(Generic[CompartmentT]):
    """The slot a call holds in ``compartment``; ``take(call, key)`` admits it again after it lent the slot."""

    __slots__ = ("compartment", "held", "key", "take")

    def __init__(
        self, take: Callable[[Call, Hashable], Awaitable[CompartmentT]], compartment: CompartmentT, key: Hashable
    ) -> None:
        self.take = take
        self.compartment = compartment
        self.key = key
        self.held = True

    def lend(self) -> None:
        if self.held:
            self.held = False
            self.compartment.release()

    async def reclaim(self, call: Call) -> None:
        if not self.held:
            self.compartment = await self.take(call, self.key)
            self.held = True
