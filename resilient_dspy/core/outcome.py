"""What a call came to: an :class:`Outcome` (its value or its typed error, who served it, attempts, duration), and
the :class:`BatchCounts` a batch keeps of its outcomes.

Part of the core (docs/architecture.md); a batch of calls is :mod:`resilient_dspy.core.batch`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from resilient_dspy.core.trace import Trace

__all__ = ["BatchCounts", "Outcome"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """A result with the story of how it was obtained (see :meth:`Pipeline.invoke` and :meth:`Pipeline.map`).

    ``duration`` is the call's latency on the pipeline clock. In a batch a failed call is an outcome too: ``value``
    is None and ``error`` holds the typed error the call raised (``invoke`` raises it instead). ``hedges`` counts the
    extra attempts a Hedge started and ``served_hedge`` the one that answered (0 = the first attempt).
    """

    value: Any
    served_by: str
    attempts: int
    retries: int
    duration: float
    trace: Trace | None = None
    error: Exception | None = None
    hedges: int = 0
    served_hedge: int = 0

    @property
    def ok(self) -> bool:
        """Whether the call returned a value (from the program or a fallback alternative) rather than raised."""
        return self.error is None


@dataclass(slots=True)
class BatchCounts:
    """The tally of a batch: ``done`` splits into ``ok`` (the program answered), ``fallback`` (an alternative did)
    and ``failed``; ``retried`` and ``cache_hits`` count within them.

    A cache hit is an answer from the program's side that never reached the program (``attempts == 0``): a hit, or a
    call that shared a concurrent identical call's answer (single-flight).
    """

    total: int | None = None
    done: int = 0
    ok: int = 0
    fallback: int = 0
    failed: int = 0
    retried: int = 0
    cache_hits: int = 0

    def add(self, outcome: Outcome) -> None:
        """Count one finished call."""
        self.done += 1
        if outcome.error is not None:
            self.failed += 1
        elif outcome.served_by != "primary":
            self.fallback += 1
        else:
            self.ok += 1
            if outcome.attempts == 0:
                self.cache_hits += 1
        if outcome.retries:
            self.retried += 1
