"""What a RateLimiter reports: the events it emits and the snapshot of a key's limits."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from resilient_dspy.events import Event, Rejected
from resilient_dspy.middleware.ratelimit.options import Limit

__all__ = [
    "LimitUsage",
    "RateLimitReconciled",
    "RateLimitRejected",
    "RateLimitWaited",
    "RateLimiterSnapshot",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitWaited(Event):
    """Admitted after ``waited`` seconds in the queue; ``tokens`` is its estimate (None without a token limit)."""

    key: Hashable
    waited: float
    tokens: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitRejected(Rejected):
    """The call could not be admitted in time (``reason``: ``max_wait`` or ``deadline``); it did not run."""

    key: Hashable
    reason: str
    retry_after: float
    waited: float


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitReconciled(Event):
    """After the call: the token ``estimate`` charged up front, the ``actual`` usage measured, what is ``charged``."""

    key: Hashable
    estimate: int
    actual: int
    charged: int


@dataclass(frozen=True, slots=True)
class LimitUsage:
    """One limit's state: weight ``used`` in the current window (or bucket level) and ``available`` now."""

    limit: Limit
    used: float
    available: float


@dataclass(frozen=True, slots=True)
class RateLimiterSnapshot:
    """The state of one key (see :meth:`RateLimiter.snapshot`): calls ``queued`` and each limit's usage."""

    key: Hashable
    queued: int
    limits: tuple[LimitUsage, ...]
