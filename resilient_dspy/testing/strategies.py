"""Hypothesis strategies for chaos tests: fault schedules, arrival patterns and valid pipeline configurations.

Faults speak the shared vocabulary (:class:`~resilient_dspy.testing.Fault`, :class:`~resilient_dspy.testing.FaultStep`);
configurations are :class:`~resilient_dspy.testing.harness.StackConfig` values whose every option is within its
valid range, so ``config.build(program)`` always succeeds. Needs ``hypothesis``: the ``testing`` extra.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

try:
    from hypothesis import strategies as st
except ImportError as error:  # an optional extra: say which one, not just "No module named"
    raise ImportError(
        "resilient_dspy.testing.strategies needs hypothesis: pip install 'resilient-dspy[testing]'"
    ) from error

from resilient_dspy.faults import Fault, FaultStep
from resilient_dspy.middleware.ratelimit import Limit
from resilient_dspy.middleware.retry import RetryBudget
from resilient_dspy.testing.harness import StackConfig

__all__ = [
    "TRANSIENT",
    "Arrival",
    "arrivals",
    "breaker_options",
    "bulkhead_options",
    "fault_schedules",
    "fault_steps",
    "limits",
    "retry_options",
    "stack_configs",
]

TRANSIENT: tuple[Fault, ...] = (Fault.RATE_LIMIT, Fault.SERVER_ERROR, Fault.TIMEOUT, Fault.TRANSPORT)
"""The faults a retry may fix; the rest (hang, malformed, invalid_json, context_window, auth) need other layers."""

_SECONDS = st.sampled_from([0.0, 0.0, 0.01, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0])


def fault_steps(
    faults: Sequence[Fault] = tuple(Fault),
    *,
    ok_weight: int = 2,
    max_latency: float = 5.0,
    max_retry_after: float = 10.0,
) -> st.SearchStrategy[FaultStep]:
    """One request's fault (OK ``ok_weight`` times as likely as each fault), latency, Retry-After and 5xx status."""
    kinds = st.sampled_from([Fault.OK] * ok_weight + [f for f in faults if f is not Fault.OK])
    latency = st.none() | _SECONDS.filter(lambda s: s <= max_latency)

    @st.composite
    def step(draw: st.DrawFn) -> FaultStep:
        fault = draw(kinds)
        retry_after = None
        status = None
        if fault is Fault.RATE_LIMIT:
            retry_after = draw(st.none() | st.sampled_from([0.0, 0.05, 0.5, 1.0, 3.0, max_retry_after]))
        if fault is Fault.SERVER_ERROR:
            status = draw(st.none() | st.sampled_from([500, 502, 503, 504]))
        return FaultStep(fault, draw(latency), retry_after, status)

    return step()


def fault_schedules(
    faults: Sequence[Fault] = tuple(Fault), *, min_size: int = 0, max_size: int = 20, **step_options: Any
) -> st.SearchStrategy[list[FaultStep]]:
    """A script of consecutive requests (see :func:`fault_steps`); after it the program answers normally."""
    return st.lists(fault_steps(faults, **step_options), min_size=min_size, max_size=max_size)


@dataclass(frozen=True, slots=True)
class Arrival:
    """When a call starts (seconds from the start of the run) and its weight (e.g. its token estimate)."""

    at: float
    weight: int = 1


def arrivals(
    *, min_size: int = 1, max_size: int = 30, max_gap: float = 2.0, max_weight: int = 1
) -> st.SearchStrategy[list[Arrival]]:
    """Non-decreasing arrival times (bursts are gaps of 0) with weights in ``1..max_weight``."""
    gaps = st.sampled_from([g for g in (0.0, 0.0, 0.0, 0.05, 0.2, 0.5, 1.3, 2.0) if g <= max_gap])
    pairs = st.lists(st.tuples(gaps, st.integers(1, max_weight)), min_size=min_size, max_size=max_size)

    def accumulate(drawn: list[tuple[float, int]]) -> list[Arrival]:
        out, now = [], 0.0
        for gap, weight in drawn:
            now = round(now + gap, 6)
            out.append(Arrival(now, weight))
        return out

    return pairs.map(accumulate)


def retry_options(*, budget: bool = True) -> st.SearchStrategy[dict[str, Any]]:
    """Keyword options of a valid :class:`~resilient_dspy.Retry` (small delays, any backoff and jitter)."""
    budgets = st.builds(
        RetryBudget,
        ratio=st.sampled_from([0.0, 0.1, 0.5]),
        min_per_second=st.sampled_from([0.0, 0.5, 2.0]),
        window=st.sampled_from([1.0, 10.0]),
    )
    return st.fixed_dictionaries(
        {
            "max_attempts": st.integers(1, 5),
            "backoff": st.sampled_from(["constant", "linear", "exponential"]),
            "base_delay": st.sampled_from([0.0, 0.01, 0.1, 0.5]),
            "max_delay": st.sampled_from([0.5, 2.0, 10.0]),
            "jitter": st.sampled_from(["none", "full", "equal", "decorrelated"]),
            "max_retry_after": st.sampled_from([0.0, 1.0, 5.0]),
            "budget": (st.none() | budgets) if budget else st.none(),
        }
    )


def breaker_options() -> st.SearchStrategy[dict[str, Any]]:
    """Keyword options of a valid :class:`~resilient_dspy.CircuitBreaker`: consecutive or count-window rate mode."""
    common = {
        "break_duration": st.sampled_from([0.5, 2.0, 5.0]),
        "break_multiplier": st.sampled_from([1.0, 2.0]),
        "half_open_probes": st.integers(1, 3),
    }
    consecutive = st.fixed_dictionaries({"failure_threshold": st.integers(1, 4), **common})
    rate = st.integers(2, 8).flatmap(
        lambda window: st.fixed_dictionaries(
            {
                "failure_rate": st.sampled_from([0.25, 0.5, 1.0]),
                "window": st.just(window),
                "min_calls": st.integers(1, window),
                **common,
            }
        )
    )
    return consecutive | rate


def bulkhead_options() -> st.SearchStrategy[dict[str, Any]]:
    """Keyword options of a valid unpartitioned :class:`~resilient_dspy.Bulkhead`."""
    return st.fixed_dictionaries(
        {
            "max_concurrent": st.integers(1, 4),
            "max_queue": st.integers(0, 6),
            "max_wait": st.none() | st.sampled_from([0.1, 1.0, 5.0]),
        }
    )


def limits() -> st.SearchStrategy[tuple[Limit, ...]]:
    """One or two requests limits, exact or bursty."""
    one = st.builds(
        lambda amount, per, burst: Limit.requests(amount, per, burst=burst),
        st.integers(1, 5),
        st.sampled_from([0.5, 1.0, 2.0]),
        st.none() | st.integers(1, 6),
    )
    return st.lists(one, min_size=1, max_size=2).map(tuple)


def stack_configs(
    *,
    retry: bool | None = None,
    breaker: bool | None = None,
    bulkhead: bool | None = None,
    limiter: bool | None = None,
    cache: bool | None = None,
    fallback: bool | None = None,
    timeouts: bool | None = None,
) -> st.SearchStrategy[StackConfig]:
    """Valid pipeline configurations in the recommended layer order; ``True``/``False`` forces a layer in or out,
    ``None`` lets hypothesis decide. Timeouts: a total one (≥ the attempt one when both) and an attempt one."""

    def flag(forced: bool | None) -> st.SearchStrategy[bool]:
        return st.booleans() if forced is None else st.just(forced)

    @st.composite
    def config(draw: st.DrawFn) -> StackConfig:
        total = attempt = None
        if draw(flag(timeouts)):
            total = draw(st.none() | st.sampled_from([2.0, 5.0, 20.0]))
            attempt = draw(st.none() | st.sampled_from([0.3, 1.0, 3.0]))
            if total is not None and attempt is not None:
                attempt = min(attempt, total)
        return StackConfig(
            total_timeout=total,
            limiter=draw(limits()) if draw(flag(limiter)) else (),
            limiter_max_wait=draw(st.none() | st.sampled_from([0.5, 5.0])),
            retry=draw(retry_options()) if draw(flag(retry)) else None,
            breaker=draw(breaker_options()) if draw(flag(breaker)) else None,
            bulkhead=draw(bulkhead_options()) if draw(flag(bulkhead)) else None,
            attempt_timeout=attempt,
            cache=draw(flag(cache)),
            cache_ttl=draw(st.none() | st.sampled_from([0.5, 5.0, 60.0])),
            fallback=draw(flag(fallback)),
        )

    return config()
