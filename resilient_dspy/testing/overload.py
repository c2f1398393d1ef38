"""Simulated providers under load, for tests and benchmarks of the adaptive layers (on virtual time).

:class:`KneeProvider` answers in ``base`` seconds while at most ``knee`` calls are in flight and slows down steeply
beyond (latency ``base · (in_flight / knee) ** power``), so its throughput peaks at the knee and falls past it.
:class:`SheddingProvider` serves at most ``capacity`` calls per second and sheds the rest with a 503, as an
overloaded provider does; :func:`offer` sends calls at a fixed rate and counts what came of them.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from resilient_dspy.faults import Fault, fault_error

__all__ = ["KneeProvider", "Offered", "SheddingProvider", "offer"]


class KneeProvider:
    """An async program whose latency is flat up to ``knee`` calls in flight and grows as a power beyond it."""

    def __init__(self, *, knee: int = 8, base: float = 1.0, power: float = 2.0) -> None:
        self.knee = knee
        self.base = base
        self.power = power
        self.in_flight = 0
        self.max_in_flight = 0
        self.served = 0

    def latency(self, in_flight: int) -> float:
        """Seconds a call takes that starts with ``in_flight`` calls running (itself included)."""
        return float(self.base * max(1.0, in_flight / self.knee) ** self.power)

    async def __call__(self, question: str) -> str:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.latency(self.in_flight))
        finally:
            self.in_flight -= 1
        self.served += 1
        return question


class SheddingProvider:
    """An async program that answers at most ``capacity`` calls per second (a fixed one-second window) in
    ``latency`` seconds and sheds the rest at once with a 503; ``shedding = False`` makes it serve everything."""

    def __init__(self, *, capacity: int = 10, latency: float = 0.1) -> None:
        self.capacity = capacity
        self.latency = latency
        self.shedding = True
        self.reached = 0
        self.shed = 0
        self._second = -math.inf
        self._admitted = 0

    async def __call__(self, question: str) -> str:
        self.reached += 1
        now = asyncio.get_running_loop().time()
        second = math.floor(now)
        if second != self._second:
            self._second, self._admitted = second, 0
        if self.shedding and self._admitted >= self.capacity:
            self.shed += 1
            error = fault_error(Fault.SERVER_ERROR, status=503)
            assert error is not None
            raise error
        self._admitted += 1
        await asyncio.sleep(self.latency)
        return question


@dataclass
class Offered:
    """What came of the calls :func:`offer` sent: answers, and errors by type name."""

    sent: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    finished_at: list[float] = field(default_factory=list)

    def goodput(self, seconds: float) -> float:
        """Answers per second over ``seconds``."""
        return self.ok / seconds


async def offer(call: Callable[[str], Awaitable[object]], *, rate: float, duration: float) -> Offered:
    """Send ``rate`` calls per second for ``duration`` seconds (open loop: a slow answer never delays the next
    call), wait for every call to end, and count the answers and the errors."""
    offered = Offered()
    loop = asyncio.get_running_loop()

    async def one(i: int) -> None:
        try:
            await call(f"q{i}")
        except Exception as error:
            offered.errors[type(error).__name__] += 1
        else:
            offered.ok += 1
            offered.finished_at.append(loop.time())

    tasks = []
    start = loop.time()
    total = int(rate * duration)
    for i in range(total):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
        offered.sent += 1
    await asyncio.gather(*tasks)
    return offered
