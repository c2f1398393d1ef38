"""AdaptiveTimeout: a per-attempt timeout derived from each model's observed latency, within bounds.

A fixed attempt timeout must sit above the model's p99, which differs by model, prompt and machine (a 135M model on
2 cores takes 2-46 s, a hosted one 0.5-10 s): too low and a slow, healthy model is cut on every attempt, too high and
a hung request holds its attempt for nothing. This layer times each attempt out at ``multiple`` x the recent
``quantile`` of that model's latencies (the last ``window`` attempts, per ``key``, default :func:`by_model`),
clamped to ``[min_seconds, seconds]``; until ``min_samples`` latencies are seen it uses ``seconds``, the ceiling. An
attempt that times out counts as a latency of its timeout (the true one is longer), so a model that slows down
raises its own timeout by ``multiple`` per burst instead of being cut forever. Failures other than a timeout are not
latencies and are not counted. Everything else is :class:`~resilient_dspy.middleware.timeout.Timeout`'s: the
deadline in the call context, :class:`TimeoutExceededError`, the caller's cancellation kept a cancellation.
A separate layer (not an option of ``Timeout``), so a fixed timeout's path stays as it is.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any, ClassVar

from pydantic import Field, model_validator

from resilient_dspy.core.call import Call, Handler
from resilient_dspy.core.options import Options, options_from
from resilient_dspy.errors import TimeoutExceededError
from resilient_dspy.middleware._shared.partitions import Hold, Partitions, by_model
from resilient_dspy.middleware.timeout import Timeout

_MAX_BOUNDS = 256  # distinct 0.1 s timeouts kept; past it the set starts again

__all__ = ["AdaptiveTimeout", "AdaptiveTimeoutOptions", "LatencyWindow"]


class AdaptiveTimeoutOptions(Options):
    """The ceiling and how the attempt timeout follows latency; see docs/patterns/timeout.md."""

    seconds: float = Field(gt=0, allow_inf_nan=False, description="Ceiling, and the timeout before enough samples.")
    multiple: float = Field(default=3.0, ge=1, allow_inf_nan=False, description="Timeout = multiple x the quantile.")
    quantile: float = Field(default=0.99, gt=0, le=1, description="Which latency quantile (0.99 = p99).")
    min_seconds: float = Field(default=1.0, gt=0, allow_inf_nan=False, description="Floor of the derived timeout.")
    window: int = Field(default=200, ge=1, le=100_000, description="Latencies kept per key (the most recent).")
    min_samples: int = Field(default=20, ge=1, description="Latencies seen before the timeout follows them.")
    key: Callable[[Any], Hashable] | None = Field(default=by_model, description="Key of the call's latencies.")
    max_keys: int = Field(default=256, ge=1, description="Keys whose latencies are kept (least recent go first).")
    first_chunk: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="Longest wait for a stream's first chunk."
    )
    idle: float | None = Field(default=None, gt=0, allow_inf_nan=False, description="A stream's pause between chunks.")
    name: str | None = Field(default=None, description="Label in events and describe(); default by placement.")

    @model_validator(mode="after")
    def _bounds(self) -> AdaptiveTimeoutOptions:
        if self.min_seconds > self.seconds:
            raise ValueError(f"min_seconds ({self.min_seconds:g}) must be at most seconds ({self.seconds:g})")
        if self.min_samples > self.window:
            raise ValueError(f"min_samples ({self.min_samples}) must be at most window ({self.window})")
        return self


class LatencyWindow:
    """The last ``size`` latencies of one key, also kept sorted, so a quantile costs one index."""

    __slots__ = ("_order", "_sorted", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._order: deque[float] = deque()
        self._sorted: list[float] = []

    def add(self, latency: float) -> None:
        if len(self._order) >= self.size:
            oldest = self._order.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, oldest)]
        self._order.append(latency)
        bisect.insort(self._sorted, latency)

    def __len__(self) -> int:
        return len(self._order)

    def quantile(self, q: float) -> float:
        """The nearest-rank ``q`` quantile of the latencies kept (the largest for q=1)."""
        ranked = self._sorted
        return ranked[min(len(ranked) - 1, max(0, math.ceil(q * len(ranked)) - 1))]

    def hold(self, now: float) -> Hold:
        return Hold.NOTHING  # a forgotten window only means the ceiling again until it refills


class AdaptiveTimeout(Timeout):
    """Time each attempt out at ``multiple`` x its model's recent ``quantile`` latency, within ``[min_seconds,
    seconds]`` (see the module docstring)."""

    options_type: ClassVar[type[Options]] = AdaptiveTimeoutOptions
    options: AdaptiveTimeoutOptions  # type: ignore[assignment]

    def __init__(
        self,
        seconds: float,
        *,
        multiple: float = 3.0,
        quantile: float = 0.99,
        min_seconds: float = 1.0,
        window: int = 200,
        min_samples: int = 20,
        key: Callable[[Any], Hashable] | None = by_model,
        max_keys: int = 256,
        first_chunk: float | None = None,
        idle: float | None = None,
        name: str | None = None,
    ) -> None:
        self.options = options = options_from(AdaptiveTimeoutOptions, "AdaptiveTimeout", locals())
        self.scope = "total"
        self._placed = False
        size = options.window
        self._windows: Partitions[LatencyWindow] = Partitions(
            lambda _key: LatencyWindow(size), max_keys=options.max_keys, idle_after=float("inf")
        )
        self._bounds: dict[float, Timeout] = {}

    def default_name(self) -> str:
        return f"AdaptiveTimeout({self.scope})"

    def timeout_for(self, call: Call) -> float:
        """The attempt timeout ``call`` gets now: the ceiling until enough samples, then the derived one."""
        options = self.options
        window = self._window(call)
        if len(window) < options.min_samples:
            return options.seconds
        derived = options.multiple * window.quantile(options.quantile)
        return min(options.seconds, max(options.min_seconds, derived))

    def _window(self, call: Call) -> LatencyWindow:
        key = self.options.key(call) if self.options.key is not None else None
        return self._windows.get(key, call.clock.now())

    async def __call__(self, call: Call, next: Handler) -> Any:
        window = self._window(call)
        seconds = self.timeout_for(call)
        clock = call.clock
        started = clock.now()
        try:
            result = await self._bound(seconds)(call, next)
        except TimeoutExceededError as error:
            if error.scope == self.scope and error.limit == "deadline" and error.timeout >= seconds:
                window.add(seconds)  # censored: it took at least this long
            raise
        window.add(clock.now() - started)
        return result

    def _bound(self, seconds: float) -> Timeout:
        """A fixed Timeout of ``seconds`` (rounded up to 0.1 s, so few are made) in this layer's name and scope."""
        seconds = min(self.options.seconds, math.ceil(seconds * 10) / 10)
        bound = self._bounds.get(seconds)
        if bound is None:
            if len(self._bounds) >= _MAX_BOUNDS:
                self._bounds.clear()
            options = self.options
            bound = Timeout(seconds, first_chunk=options.first_chunk, idle=options.idle, name=self.name)
            bound.scope, bound._placed = self.scope, True
            self._bounds[seconds] = bound
        return bound

    def describe_state(self) -> dict[str, Any]:
        return {"scope": self.scope, "keys": len(self._windows)}
