"""AdaptiveThrottle: client-side throttling (Google SRE book, "Handling Overload"), so a fleet of clients stops
hammering a provider that sheds load.

Over a sliding window of ``window`` seconds (counted in ``buckets``) it counts ``requests`` (calls that reached the
provider, and calls it refused locally) and ``accepts`` (calls the provider did not refuse for overload). Before a
call it refuses it locally, with :class:`~resilient_dspy.errors.ThrottledError` (a ``RejectedError``: Retry never
retries it), with probability ``max(0, (requests - k * accepts) / (requests + 1))``, drawn from the injected ``rng``
(default the pipeline's), capped at ``max_probability``. So while the provider accepts more than ``1/k`` of the
calls nothing is refused; beyond, about ``k`` times what it accepts still reaches it, enough to see it recover.
Overload is a 429, a 503 (or 529), a timeout (:func:`~resilient_dspy.errors.classify` says which), or what
``overload_on`` matches; every other answer or error is an accept. Outcomes that never reached the provider (a cache
hit, an inner rejection) and cancellations count as nothing.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field, field_validator

from resilient_dspy.core.health import LayerHealth, key_name
from resilient_dspy.core.layer import Layer
from resilient_dspy.core.options import Options, options_from
from resilient_dspy.errors import ErrorKind, ThrottledError, classify
from resilient_dspy.events import Rejected
from resilient_dspy.middleware._shared.filters import check_filter
from resilient_dspy.middleware._shared.partitions import Hold, KeyedStates, KeyFunction, PartitionOptions

if TYPE_CHECKING:
    from resilient_dspy.core.call import Call, Handler

__all__ = [
    "AdaptiveThrottle",
    "AdaptiveThrottleOptions",
    "ThrottleRejected",
    "ThrottleSnapshot",
    "is_overload",
]

_OVERLOAD_STATUS = frozenset({503, 529})  # 503 Service Unavailable; 529 is Anthropic's "overloaded"


def is_overload(error: BaseException) -> bool:
    """The default test: a rate limit (429), a timeout, or a server error with status 503 or 529."""
    info = classify(error)
    if info.kind in (ErrorKind.RATE_LIMIT, ErrorKind.TIMEOUT):
        return True
    return info.kind is ErrorKind.SERVER and getattr(error, "status", None) in _OVERLOAD_STATUS


class AdaptiveThrottleOptions(PartitionOptions):
    """The formula's ``k``, its window and what counts as overload; see docs/patterns/adaptive-throttle.md."""

    k: float = Field(
        default=2.0, ge=1, allow_inf_nan=False, description="Requests allowed per accept before refusing locally."
    )
    window: float = Field(default=120.0, gt=0, allow_inf_nan=False, description="Seconds of history counted.")
    buckets: int = Field(default=12, ge=1, le=1000, description="Buckets the window is counted in.")
    max_probability: float = Field(
        default=1.0, gt=0, le=1, allow_inf_nan=False, description="Cap on the refusal probability (1 = the formula's)."
    )
    overload_on: Any = Field(default=None, description="Errors that are overload (types or predicate); None: 429/503.")
    rng: random.Random | None = Field(default=None, description="Randomness of the draws; None = the pipeline's.")
    name: str | None = Field(default=None, description="Label in events and describe().")

    _check_overload_on = field_validator("overload_on")(classmethod(lambda cls, v: check_filter(v)))


@dataclass(frozen=True, slots=True, kw_only=True)
class ThrottleRejected(Rejected):
    """The call was refused locally with ``probability``, from ``requests`` and ``accepts`` in the window."""

    key: Hashable
    probability: float
    requests: int
    accepts: int

    def rejection_reason(self) -> str:
        return "throttled"


@dataclass(frozen=True, slots=True)
class ThrottleSnapshot:
    """One key's window (see :meth:`AdaptiveThrottle.snapshot`)."""

    key: Hashable
    requests: int
    accepts: int
    reject_probability: float


class AdaptiveThrottle(Layer):
    """Refuse calls locally with the SRE book's probability while the provider refuses many; see the module doc."""

    placement: ClassVar[str] = "throttle"
    options_type: ClassVar[type[Options]] = AdaptiveThrottleOptions
    options: AdaptiveThrottleOptions

    def __init__(
        self,
        *,
        k: float = 2.0,
        window: float = 120.0,
        buckets: int = 12,
        max_probability: float = 1.0,
        overload_on: Any = None,
        rng: random.Random | None = None,
        key: KeyFunction | None = None,
        max_keys: int = 1024,
        idle_after: float = 600.0,
        name: str | None = None,
    ) -> None:
        self.options = options = options_from(AdaptiveThrottleOptions, "AdaptiveThrottle", locals())
        self._states: KeyedStates[_Window] = KeyedStates(options, lambda key: _Window(key, options))
        self._overload_on = options.overload_on

    def overloaded(self, error: BaseException) -> bool:
        """Whether ``error`` is the provider refusing for overload (``overload_on``, else :func:`is_overload`)."""
        test = self._overload_on
        if test is None:
            return is_overload(error)
        return isinstance(error, test) if isinstance(test, tuple) else bool(test(error))

    async def __call__(self, call: Call, next: Handler) -> Any:
        clock = call.clock
        key_of = self._states.key_of
        key = None if key_of is None else key_of(call)
        window = self._states.get(key, clock.now())
        window.advance(clock.now())
        probability = window.probability()
        if probability > 0 and (self.options.rng or call.rng).random() < probability:
            window.count(accepted=False)
            requests, accepts = window.totals()
            self.emit(call, ThrottleRejected, key=key, probability=probability, requests=requests, accepts=accepts)
            raise ThrottledError(
                f"{self.name}{'' if key is None else f'[{key!r}]'}: refused locally with probability "
                f"{probability:.2f} ({accepts} of {requests} requests accepted in the last {self.options.window:g}s)"
            )
        record = call.record
        reached = record.attempts
        try:
            result = await next(call)
        except Exception as error:
            if record.attempts != reached:
                window.advance(clock.now())
                window.count(accepted=not self.overloaded(error))
            raise
        if record.attempts != reached:
            window.advance(clock.now())
            window.count(accepted=True)
        return result

    def snapshot(self, key: Hashable = None) -> ThrottleSnapshot:
        """The window of ``key`` (the only one without ``key=``; an empty one for a key not seen), as of now."""
        window = self._states.peek(key)
        if window is None:
            return ThrottleSnapshot(key, 0, 0, 0.0)
        requests, accepts = window.totals()
        return ThrottleSnapshot(key, requests, accepts, window.probability())

    def snapshots(self) -> dict[Hashable, ThrottleSnapshot]:
        """Every live key's snapshot (``{None: ...}`` without ``key=``)."""
        return {key: self.snapshot(key) for key, _ in self._states.items()}

    def health(self) -> LayerHealth:
        """Degraded while any key refuses calls locally (its probability is above 0)."""
        snapshots = self.snapshots()
        throttling = sorted(key_name(key) for key, snap in snapshots.items() if snap.reject_probability > 0)
        details = {
            "windows": {
                key_name(key): {"requests": s.requests, "accepts": s.accepts, "probability": s.reject_probability}
                for key, s in snapshots.items()
            },
            "throttling": throttling,
        }
        return LayerHealth(self.name, "degraded" if throttling else "ok", details)

    def describe(self) -> dict[str, Any]:
        """The base's, without the callables and the rng (they say nothing printed): whether each is set."""
        options = self.options.model_dump(exclude={"overload_on", "rng", "key"})
        options["partitioned"] = self.options.key is not None
        options["seeded"] = self.options.rng is not None
        return {**super().describe(), "options": options}


class _Window:
    """One key's requests and accepts over the last ``window`` seconds, in ``buckets`` of equal length (a bucket
    leaves the sum whole once it is older than the window)."""

    __slots__ = ("accepts", "bucket_seconds", "cap", "current", "k", "key", "requests", "sum_accepts", "sum_requests")

    def __init__(self, key: Hashable, options: AdaptiveThrottleOptions) -> None:
        self.key = key
        self.k = options.k
        self.cap = options.max_probability
        self.bucket_seconds = options.window / options.buckets
        self.requests = [0] * options.buckets
        self.accepts = [0] * options.buckets
        self.sum_requests = 0
        self.sum_accepts = 0
        self.current = -math.inf  # the index (time // bucket_seconds) of the newest bucket

    def advance(self, now: float) -> None:
        """Move the newest bucket to ``now``, emptying every bucket that left the window."""
        index = math.floor(now / self.bucket_seconds)
        if index == self.current:
            return
        size = len(self.requests)
        stale = size if self.current == -math.inf else min(size, int(index - self.current))
        for step in range(1, stale + 1):
            slot = (index - stale + step) % size
            self.sum_requests -= self.requests[slot]
            self.sum_accepts -= self.accepts[slot]
            self.requests[slot] = self.accepts[slot] = 0
        self.current = index

    def count(self, *, accepted: bool) -> None:
        slot = int(self.current) % len(self.requests)
        self.requests[slot] += 1
        self.sum_requests += 1
        if accepted:
            self.accepts[slot] += 1
            self.sum_accepts += 1

    def totals(self) -> tuple[int, int]:
        return self.sum_requests, self.sum_accepts

    def probability(self) -> float:
        """The SRE book's ``max(0, (requests - k * accepts) / (requests + 1))``, at most ``max_probability``."""
        requests = self.sum_requests
        return min(self.cap, max(0.0, (requests - self.k * self.sum_accepts) / (requests + 1)))

    def hold(self, now: float) -> Hold:
        """A window with refusals in it still protects the provider; an all-accepted one is harmless."""
        self.advance(now)
        return Hold.PROTECTION if self.sum_requests > self.sum_accepts else Hold.NOTHING
