"""Hedge: when the layers below are slow, start another attempt beside the first; the first success is the answer.

After ``delay`` seconds (fixed, or a :class:`Percentile` of recent successful attempts' latencies) without an answer,
start a hedge: the same layers below again, or the next of ``alternatives`` (``UseLM`` / ``UseProgram``, as
Fallback takes them). At most ``max_hedges`` extra attempts; none starts at or after the call's deadline. Each
attempt runs in its own task on its own :class:`~resilient_dspy.core.call.Call` view, so per-attempt layers below
(Retry, Timeout, RateLimiter) see each attempt as a call of its own.

How attempts end the race:

- the first **success** wins: the other attempts are cancelled and awaited before the answer is returned;
- a **non-retryable** error (``classify(error).retryable`` is False: a bad request, a user mistake) ends the race at
  once with that error, the others cancelled: another attempt would fail the same way;
- a **retryable** failure starts the next hedge at once (not after the delay: the attempt is already lost), while
  hedges remain and the deadline allows; the race fails only when no attempt is left, with the last error;
- a **rejection** by a layer below (rate limiter, bulkhead, breaker) drops that attempt only: it did not reach the
  provider, so it neither starts a hedge early nor stops the others; with no attempt left it is the call's error.

Cancelling the caller cancels every attempt (awaited: no orphan task). Every attempt records its LM usage in one
usage scope of this layer, cancelled losers included, so Budget, CostTracker and ``get_lm_usage()`` see all the
tokens the hedges cost. A streamed call is never hedged (two answers' chunks would mix). Place Hedge below a Cache
(a hit never hedges; above it, a hedge would coalesce onto the attempt it should overtake) and above a RateLimiter
or Bulkhead (each hedge takes its own admission): ``on_build`` warns otherwise. See docs/patterns/hedge.md.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import re
import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import dspy
from pydantic import Field, field_validator, model_validator

from resilient_dspy.binding.usage import attach_usage, usage_scope
from resilient_dspy.core.health import LayerHealth
from resilient_dspy.core.layer import Layer, roles
from resilient_dspy.core.options import FieldProblem, Options, options_from
from resilient_dspy.core.stream import current_relay
from resilient_dspy.errors import ConfigurationError, ErrorKind, ResilienceWarning, classify
from resilient_dspy.events import Event
from resilient_dspy.middleware._shared.waiting import wait_until
from resilient_dspy.middleware.fallback import Alternative, UseLM, UseProgram

if TYPE_CHECKING:
    from resilient_dspy.core.call import Call, Handler
    from resilient_dspy.core.pipeline import Pipeline

__all__ = [
    "Hedge",
    "HedgeOptions",
    "HedgeSnapshot",
    "HedgeStarted",
    "HedgeWon",
    "Percentile",
    "PercentileOptions",
]

_PERCENTILE = re.compile(r"p(\d{1,2}(?:\.\d+)?)")


class PercentileOptions(Options):
    """A learned hedge delay: the ``q`` quantile of the last ``window`` successful attempts' latencies, clamped."""

    q: float = Field(gt=0, lt=1, description="The quantile, e.g. 0.95 (hedge the slowest 5 %).")
    window: int = Field(default=100, ge=1, description="Recent successful latencies kept.")
    min_samples: int = Field(default=10, ge=1, description="Latencies needed before the quantile is used.")
    floor: float = Field(default=0.0, ge=0, allow_inf_nan=False, description="The delay never goes below this.")
    ceiling: float = Field(
        default=10.0, gt=0, allow_inf_nan=False, description="The delay never goes above this; used until learned."
    )

    @model_validator(mode="after")
    def _check(self) -> PercentileOptions:
        if self.floor > self.ceiling:
            raise FieldProblem("floor", f"must be at most ceiling ({self.ceiling:g}) (got {self.floor:g})")
        if self.min_samples > self.window:
            raise FieldProblem("min_samples", f"must be at most window ({self.window}) (got {self.min_samples})")
        return self


class Percentile:
    """``delay=Percentile(0.95, window=200, floor=0.05, ceiling=2.0)``; ``delay="p95"`` is ``Percentile(0.95)``."""

    __slots__ = ("options",)

    def __init__(
        self, q: float, *, window: int = 100, min_samples: int = 10, floor: float = 0.0, ceiling: float = 10.0
    ) -> None:
        self.options = options_from(PercentileOptions, "Percentile", locals())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Percentile) and other.options == self.options

    def __hash__(self) -> int:
        return hash(self.options)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.options.model_dump().items() if k != "q")
        return f"Percentile({self.options.q!r}, {fields})"

    def label(self) -> str:
        """``p95`` for q=0.95: how snapshots and ``describe()`` name it."""
        return f"p{self.options.q * 100:g}"


class HedgeOptions(Options):
    """When a Hedge starts another attempt and what that attempt runs; see docs/patterns/hedge.md."""

    delay: float | Percentile = Field(
        default=0.05, description="Seconds without an answer before a hedge; a Percentile or 'p95' learns it."
    )
    max_hedges: int = Field(default=1, ge=1, description="Extra attempts at most, beside the first.")
    alternatives: tuple[Any, ...] = Field(
        default=(), description="What hedge n runs (UseLM/UseProgram, an LM, a program); empty = the layers below."
    )
    name: str | None = Field(default=None, description="Label in events and describe().")

    @field_validator("delay", mode="before")
    @classmethod
    def _delay(cls, value: Any) -> Any:
        if isinstance(value, str):
            match = _PERCENTILE.fullmatch(value)
            if match is None or not 0 < float(match.group(1)) < 100:
                raise ValueError(f"must be seconds, a Percentile or 'pNN' such as 'p95' (got {value!r})")
            return Percentile(float(match.group(1)) / 100)
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"must be finite seconds >= 0 (got {value!r})")
            return float(value)
        if not isinstance(value, Percentile):
            raise ValueError(f"must be seconds, a Percentile or 'pNN' such as 'p95' (got {value!r:.80})")
        return value

    @model_validator(mode="after")
    def _enough_alternatives(self) -> HedgeOptions:
        if self.alternatives and self.max_hedges > len(self.alternatives):
            raise FieldProblem(
                "max_hedges",
                f"hedge n runs alternatives[n-1]: at most {len(self.alternatives)} with {len(self.alternatives)} "
                f"alternative(s) (got {self.max_hedges})",
            )
        return self


@dataclass(frozen=True, slots=True, kw_only=True)
class HedgeStarted(Event):
    """Hedge number ``hedge`` (1 = the first extra attempt) started, running ``runs``, ``reason`` ``delay`` or
    ``failure`` (an attempt failed retryably), ``delay`` seconds after the previous attempt."""

    hedge: int
    runs: str
    reason: str
    delay: float


@dataclass(frozen=True, slots=True, kw_only=True)
class HedgeWon(Event):
    """Attempt ``attempt`` (0 = the first, n = hedge n) answered after ``latency`` s; ``hedges`` had started."""

    attempt: int
    hedges: int
    latency: float


@dataclass(frozen=True, slots=True)
class HedgeSnapshot:
    """A Hedge's tallies: ``wins`` by attempt (0 = the first), and the delay it would wait now."""

    calls: int
    hedged_calls: int
    hedges: int
    wins: dict[int, int]
    delay: float
    learned: bool


class Hedge(Layer):
    """Start another attempt when the layers below are slow; the first success wins (module docstring: the rules)."""

    placement: ClassVar[str] = "hedge"
    options_type: ClassVar[type[Options]] = HedgeOptions
    options: HedgeOptions

    def __init__(
        self,
        delay: float | str | Percentile = 0.05,
        *,
        max_hedges: int = 1,
        alternatives: Sequence[Any] = (),
        name: str | None = None,
    ) -> None:
        problems: list[tuple[str, str]] = []
        converted = [_as_alternative(a, i, problems) for i, a in enumerate(alternatives)]
        try:
            self.options = options_from(HedgeOptions, "Hedge", {**locals(), "alternatives": tuple(alternatives)})
        except ConfigurationError as error:
            problems[:0] = error.problems
        if problems:
            raise ConfigurationError(problems)
        self.alternatives: tuple[Alternative, ...] = tuple(a for a in converted if a is not None)
        delay_option = self.options.delay
        self._fixed = delay_option if isinstance(delay_option, float) else None
        self._learned = _Latencies(delay_option.options) if isinstance(delay_option, Percentile) else None
        self._calls = self._hedged_calls = self._hedges = 0
        self._wins: dict[int, int] = {}

    def on_build(self, pipeline: Pipeline) -> None:
        """Warn when a Cache is below (hedges coalesce onto the attempt they should overtake) or a RateLimiter or
        Bulkhead above (hedges would run without their own admission)."""
        outer, inner = pipeline.layers_around(self)
        if "cache" in roles(inner):
            warnings.warn(
                f"layer order: {self.name} is above a Cache: a hedge waits for the identical call it should overtake "
                "(single-flight) and a cache hit is hedged for nothing. List the Cache before (above) the Hedge.",
                ResilienceWarning,
                stacklevel=4,
            )
        limits = sorted(roles(outer) & {"ratelimit", "bulkhead"})
        if limits:
            warnings.warn(
                f"layer order: {self.name} is below a {' and a '.join(limits)} layer: its hedges run without their own "
                "admission, so the provider sees more calls than the limit says. List the Hedge before (above) it.",
                ResilienceWarning,
                stacklevel=4,
            )

    def current_delay(self) -> float:
        """The delay a call starting now waits before its first hedge (learned, clamped, or the fixed one)."""
        return self._fixed if self._fixed is not None else self._learned.delay()  # type: ignore[union-attr]

    async def __call__(self, call: Call, next: Handler) -> Any:
        self._calls += 1
        if current_relay() is not None:  # a streamed call: a second answer's chunks would mix with the first's
            return await next(call)
        with usage_scope() as scope:
            race = _Race(self, call, next)
            try:
                value = await race.run()
            finally:
                hedges = len(race.tasks) - 1
                call.record.hedges += hedges
                if hedges:
                    self._hedged_calls += 1
                    self._hedges += hedges
            attach_usage(value, scope)
        return value

    def _won(self, call: Call, attempt: int, hedges: int, latency: float) -> None:
        self._wins[attempt] = self._wins.get(attempt, 0) + 1
        if self._learned is not None:
            self._learned.add(latency)
        call.record.served_hedge = attempt
        if attempt and self.alternatives:
            call.record.served_by = self.alternatives[attempt - 1].name
        self.emit(call, HedgeWon, attempt=attempt, hedges=hedges, latency=latency)

    def snapshot(self) -> HedgeSnapshot:
        """Calls, hedged calls, hedges started, wins by attempt, and the delay a call would wait now."""
        learned = self._learned
        return HedgeSnapshot(
            self._calls,
            self._hedged_calls,
            self._hedges,
            dict(sorted(self._wins.items())),
            self.current_delay(),
            learned is not None and learned.ready(),
        )

    def health(self) -> LayerHealth:
        """Degraded when more than half of the calls were hedged (the delay is too short, or the provider slow):
        each hedge is an extra request. Never down: a hedge only adds attempts."""
        snapshot = self.snapshot()
        details = {
            "calls": snapshot.calls,
            "hedged_calls": snapshot.hedged_calls,
            "hedges": snapshot.hedges,
            "delay": snapshot.delay,
        }
        busy = snapshot.calls >= 20 and snapshot.hedged_calls * 2 > snapshot.calls
        return LayerHealth(self.name, "degraded" if busy else "ok", details)

    def describe(self) -> dict[str, Any]:
        """The options as names, not objects: the delay as seconds or ``pNN`` with its window, the alternatives."""
        delay = self.options.delay
        options = {
            "delay": delay if isinstance(delay, float) else {"percentile": delay.label(), **delay.options.model_dump()},
            "max_hedges": self.options.max_hedges,
            "alternatives": [alternative.name for alternative in self.alternatives],
            "name": self.options.name,
        }
        return {"layer": "Hedge", "name": self.name, "options": options}


class _Race:
    """One call's attempts: started on time, judged as they end, and every loser cancelled and awaited."""

    __slots__ = ("call", "hedge", "last_error", "next", "tasks", "wakeup")

    def __init__(self, hedge: Hedge, call: Call, next: Handler) -> None:
        self.hedge = hedge
        self.call = call
        self.next = next
        self.tasks: list[asyncio.Task[tuple[Any, float]]] = []
        self.last_error: Exception | None = None
        self.wakeup: asyncio.Future[None] | None = None

    async def run(self) -> Any:
        hedge, call, clock = self.hedge, self.call, self.call.clock
        max_hedges = hedge.options.max_hedges
        delay = hedge.current_delay()
        self._start(0)
        next_at: float | None = clock.now() + delay
        reason = "delay"
        judged: set[int] = set()
        try:
            while True:
                for index, task in enumerate(self.tasks):
                    if index in judged or not task.done():
                        continue
                    judged.add(index)
                    if task.cancelled():  # cancelled from inside the attempt, not by us: as a cancellation
                        raise asyncio.CancelledError
                    error = task.exception()
                    if error is None:
                        value, latency = task.result()
                        hedge._won(call, index, len(self.tasks) - 1, latency)
                        return value
                    if not isinstance(error, Exception):
                        raise error
                    info = classify(error)
                    if info.kind is ErrorKind.REJECTED:  # never reached the provider: drop this attempt only
                        self.last_error = self.last_error or error
                        continue
                    if not info.retryable:
                        raise error
                    self.last_error = error
                    if next_at is not None:
                        next_at, reason = clock.now(), "failure"
                now = clock.now()
                started = len(self.tasks) - 1
                if next_at is not None and (
                    started >= max_hedges or (call.deadline is not None and next_at >= call.deadline)
                ):
                    next_at = None
                if next_at is not None and now >= next_at:
                    self._start(started + 1)
                    hedge.emit(
                        call, HedgeStarted, hedge=started + 1, runs=self._runs(started + 1), reason=reason, delay=delay
                    )
                    next_at, reason = now + delay, "delay"
                    continue
                if len(judged) == len(self.tasks):
                    assert self.last_error is not None
                    raise self.last_error
                self.wakeup = asyncio.get_running_loop().create_future()
                if not any(task.done() and i not in judged for i, task in enumerate(self.tasks)):
                    await wait_until(clock, self.wakeup, next_at)
        finally:
            await self._cancel_rest()

    def _runs(self, index: int) -> str:
        alternatives = self.hedge.alternatives
        return alternatives[index - 1].name if index and alternatives else "primary"

    def _start(self, index: int) -> None:
        alternatives = self.hedge.alternatives
        runner = self.next if not index or not alternatives else alternatives[index - 1]
        task = asyncio.get_running_loop().create_task(self._attempt(runner, self.call.replace()))
        task.add_done_callback(self._wake)
        self.tasks.append(task)

    async def _attempt(self, runner: Handler | Alternative, call: Call) -> tuple[Any, float]:
        clock = call.clock
        began = clock.now()
        value = await (runner.run(call, self.next) if isinstance(runner, Alternative) else runner(call))
        return value, clock.now() - began

    def _wake(self, _: asyncio.Task[tuple[Any, float]]) -> None:
        wakeup = self.wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def _cancel_rest(self) -> None:
        """Cancel every attempt still running and wait until each has ended; a second cancellation of the caller
        meanwhile is passed on once they have (never an orphan task)."""
        running = [task for task in self.tasks if not task.done()]
        for task in running:
            task.cancel()
        interrupted = False
        while running:
            try:
                await asyncio.wait(running)
            except asyncio.CancelledError:
                interrupted = True
            running = [task for task in running if not task.done()]
        for task in self.tasks:
            if not task.cancelled():
                task.exception()  # retrieved: a loser's error is no "never retrieved" warning
        if interrupted:
            raise asyncio.CancelledError


class _Latencies:
    """The last ``window`` successful latencies, kept sorted too, for a quantile in O(1) and an update in O(window)."""

    __slots__ = ("options", "order", "sorted")

    def __init__(self, options: PercentileOptions) -> None:
        self.options = options
        self.order: deque[float] = deque()
        self.sorted: list[float] = []

    def add(self, latency: float) -> None:
        if len(self.order) >= self.options.window:
            del self.sorted[bisect.bisect_left(self.sorted, self.order.popleft())]
        self.order.append(latency)
        bisect.insort(self.sorted, latency)

    def ready(self) -> bool:
        return len(self.sorted) >= self.options.min_samples

    def delay(self) -> float:
        """The nearest-rank quantile, clamped to [floor, ceiling]; the ceiling until ``min_samples`` are in."""
        options = self.options
        if not self.ready():
            return options.ceiling
        rank = max(1, math.ceil(options.q * len(self.sorted)))
        return min(max(self.sorted[rank - 1], options.floor), options.ceiling)


def _as_alternative(candidate: Any, index: int, problems: list[tuple[str, str]]) -> Alternative | None:
    """An alternative as Fallback describes it; only ones that run a program (a static answer is no hedge)."""
    where = f"Hedge.alternatives[{index}]"
    if isinstance(candidate, UseLM | UseProgram):
        if candidate.on is not None:
            problems.append((where, "on= has no meaning for a hedge (it starts on slowness, not on an error)"))
        return candidate
    if isinstance(candidate, Alternative):
        problems.append((where, "must be UseLM or UseProgram: a static answer is no hedge (use Timeout + Fallback)"))
        return None
    if isinstance(candidate, dspy.BaseLM):
        return UseLM(candidate)
    try:
        return UseProgram(candidate)
    except ConfigurationError:
        problems.append(
            (where, f"must be UseLM/UseProgram, a dspy.LM, a program or an async callable (got {candidate!r:.80})")
        )
        return None
