"""What each request to a fault source does, and the record of what it did.

A :class:`FaultProfile` gives per-request fault probabilities; a :class:`FaultSchedule` draws from an exact script
first, then from the seeded profile; a :class:`JournalEntry` records one request. Shared by the fault LM and the
chaos HTTP server, so both draw and journal faults the same way.
"""

from __future__ import annotations

import random
import threading
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import Field, model_validator

from resilient_dspy.core.options import Options
from resilient_dspy.faults import FAULT_STATUS, Fault, FaultStep

__all__ = ["CANCELLED_BY_CALLER", "Drawn", "FaultProfile", "FaultSchedule", "JournalEntry"]


class FaultProfile(Options):
    """Per-request probabilities of each fault (the rest answer normally), the latency range, and the heavy tail: a
    ``tail`` share of requests takes ``tail_factor`` times its drawn latency (a slow answer, not a fault)."""

    rate_limit: float = Field(default=0.0, ge=0, le=1)
    server_error: float = Field(default=0.0, ge=0, le=1)
    timeout: float = Field(default=0.0, ge=0, le=1)
    transport: float = Field(default=0.0, ge=0, le=1)
    hang: float = Field(default=0.0, ge=0, le=1)
    malformed: float = Field(default=0.0, ge=0, le=1)
    truncated: float = Field(default=0.0, ge=0, le=1, description="Probability of an answer cut at max_tokens.")
    context_window: float = Field(default=0.0, ge=0, le=1)
    invalid_json: float = Field(default=0.0, ge=0, le=1, description="Probability of a 200 whose body is not JSON.")
    retry_after: tuple[float, float] | None = Field(
        default=(0.5, 2.0), description="Retry-After range (s) sent with rate limits; None sends none."
    )
    latency: tuple[float, float] = Field(default=(0.0, 0.0), description="Answer latency range (s).")
    tail: float = Field(default=0.0, ge=0, le=1, description="Share of requests slowed by tail_factor (a heavy tail).")
    tail_factor: float = Field(
        default=10.0, ge=1, allow_inf_nan=False, description="How much slower a tail request is."
    )

    @model_validator(mode="after")
    def _check(self) -> FaultProfile:
        total = sum(self.rates().values())
        if total > 1 + 1e-9:
            raise ValueError(f"fault probabilities must sum to at most 1 (got {total:g})")
        for name in ("retry_after", "latency"):
            span = getattr(self, name)
            if span is not None and not 0 <= span[0] <= span[1]:
                raise ValueError(f"{name} must be (low, high) with 0 <= low <= high (got {span})")
        return self

    def rates(self) -> dict[Fault, float]:
        return {
            Fault.RATE_LIMIT: self.rate_limit,
            Fault.SERVER_ERROR: self.server_error,
            Fault.TIMEOUT: self.timeout,
            Fault.TRANSPORT: self.transport,
            Fault.HANG: self.hang,
            Fault.MALFORMED: self.malformed,
            Fault.TRUNCATED: self.truncated,
            Fault.CONTEXT_WINDOW: self.context_window,
            Fault.INVALID_JSON: self.invalid_json,
        }


@dataclass(frozen=True, slots=True)
class Drawn:
    """What one request will do, fully resolved: the fault, its latency, Retry-After and HTTP-like status."""

    fault: Fault
    latency: float = 0.0
    retry_after: float | None = None
    status: int | None = None


class FaultSchedule:
    """The next requests' faults: an exact script first, then a seeded random profile (thread-safe)."""

    def __init__(self, profile: FaultProfile, script: Iterable[FaultStep] = (), seed: int | None = 0) -> None:
        self.profile = profile
        self.script: deque[FaultStep] = deque(script)
        self.rng = random.Random(seed)
        self.faults: Counter[Fault] = Counter()
        self._lock = threading.Lock()

    def draw(self) -> Drawn:
        """The next request's fault, with its latency, Retry-After (rate limits) and HTTP status resolved."""
        with self._lock:
            profile = self.profile
            scripted = self.script.popleft() if self.script else None
            if scripted is not None:
                fault = scripted.fault
            else:
                roll, fault = self.rng.random(), Fault.OK
                for candidate, rate in profile.rates().items():
                    if roll < rate:
                        fault = candidate
                        break
                    roll -= rate
            latency = self.rng.uniform(*profile.latency)
            if profile.tail and self.rng.random() < profile.tail:  # drawn only with a tail: old seeds replay the same
                latency *= profile.tail_factor
            retry_after = None if profile.retry_after is None else round(self.rng.uniform(*profile.retry_after), 3)
            self.faults[fault] += 1
        if scripted is not None:
            latency = latency if scripted.latency is None else scripted.latency
            retry_after = retry_after if scripted.retry_after is None else scripted.retry_after
        status = scripted.status if scripted is not None and scripted.status is not None else FAULT_STATUS.get(fault)
        return Drawn(fault, latency, retry_after if fault is Fault.RATE_LIMIT else None, status)

    def push(self, steps: Iterable[FaultStep]) -> None:
        with self._lock:
            self.script.extend(steps)

    def replace(self, steps: Iterable[FaultStep]) -> None:
        with self._lock:
            self.script = deque(steps)


CANCELLED_BY_CALLER = "cancelled by the caller"  # a JournalEntry.detail: its fault never took effect


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One request and what was done with it; ``time`` is when its fault or answer took effect (after latency);
    ``temperature`` and ``max_tokens`` are the request's, as a provider receives them (None: not sent)."""

    time: float
    model: str
    fault: Fault
    question: str
    input_tokens: int
    output_tokens: int
    latency: float = 0.0
    status: int | None = None
    retry_after: float | None = None
    adapter: str | None = None
    detail: str = ""
    temperature: float | None = None
    max_tokens: int | None = None
