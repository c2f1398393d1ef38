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

import warnings
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from resilient_dspy.binding.usage import attach_usage, usage_scope
from resilient_dspy.core.health import LayerHealth
from resilient_dspy.core.layer import Layer, roles
from resilient_dspy.core.options import Options, options_from
from resilient_dspy.core.stream import current_relay
from resilient_dspy.errors import ConfigurationError, ResilienceWarning
from resilient_dspy.middleware.fallback import Alternative
from resilient_dspy.middleware.hedge.events import HedgeSnapshot, HedgeWon
from resilient_dspy.middleware.hedge.options import HedgeOptions, Latencies, Percentile, as_alternative
from resilient_dspy.middleware.hedge.race import Race

if TYPE_CHECKING:
    from resilient_dspy.core.call import Call, Handler
    from resilient_dspy.core.pipeline import Pipeline

__all__ = ["Hedge"]

_RECENT = 100
_RECENT_MIN = 20


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
        given = tuple(alternatives) if isinstance(alternatives, list | tuple) else alternatives
        converted = [as_alternative(a, i, problems) for i, a in enumerate(given)] if isinstance(given, tuple) else []
        try:
            self.options = options_from(HedgeOptions, "Hedge", {**locals(), "alternatives": given})
        except ConfigurationError as error:
            problems[:0] = error.problems
        if problems:
            raise ConfigurationError(problems)
        self.alternatives: tuple[Alternative, ...] = tuple(a for a in converted if a is not None)
        delay_option = self.options.delay
        self._fixed = delay_option if isinstance(delay_option, float) else 0.0
        self._learned = Latencies(delay_option.options) if isinstance(delay_option, Percentile) else None
        self._calls = self._hedged_calls = self._hedges = 0
        self._wins: dict[int, int] = {}
        self._recent: deque[bool] = deque(maxlen=_RECENT)  # whether each of the latest calls was hedged

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
        learned = self._learned
        return learned.delay() if learned is not None else self._fixed

    async def __call__(self, call: Call, next: Handler) -> Any:
        self._calls += 1
        if current_relay() is not None:  # a streamed call: a second answer's chunks would mix with the first's
            return await next(call)
        with usage_scope() as scope:
            race = Race(self, call, next)
            try:
                value = await race.run()
            finally:
                hedges = max(0, len(race.tasks) - 1)
                call.record.hedges += hedges
                self._recent.append(hedges > 0)
                if hedges:
                    self._hedged_calls += 1
                    self._hedges += hedges
            attach_usage(value, scope)
        return value

    def record_win(self, call: Call, attempt: int, hedges: int, latency: float) -> None:
        """Attempt ``attempt`` answered: count it, learn its latency, say on the call's record who served."""
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
        """Degraded when more than half of the latest calls (20 at least, of the last 100) were hedged: the delay is
        too short for the provider's latency now, and each hedge is an extra request. Never down."""
        snapshot = self.snapshot()
        recent = self._recent
        hedged = sum(recent)
        details = {
            "calls": snapshot.calls,
            "hedged_calls": snapshot.hedged_calls,
            "hedges": snapshot.hedges,
            "delay": snapshot.delay,
            "recent_hedged": f"{hedged}/{len(recent)}",
        }
        busy = len(recent) >= _RECENT_MIN and hedged * 2 > len(recent)
        return LayerHealth(self.name, "degraded" if busy else "ok", details)

    def describe(self) -> dict[str, Any]:
        """The options as a config that rebuilds them: the delay as seconds or a ``Percentile`` table, each
        alternative's table (as a Fallback's)."""
        delay = self.options.delay
        options = {
            "delay": delay if isinstance(delay, float) else {"kind": "Percentile", **delay.options.model_dump()},
            "max_hedges": self.options.max_hedges,
            "alternatives": [alternative.describe() for alternative in self.alternatives],
            "name": self.options.name,
        }
        return {"layer": "Hedge", "name": self.name, "options": options}
