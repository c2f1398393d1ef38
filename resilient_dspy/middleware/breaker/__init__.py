"""The circuit breaker (docs/patterns/circuit-breaker.md): options, events, windows, circuit, layer."""

from resilient_dspy.middleware.breaker.events import (
    CircuitRejected,
    CircuitSnapshot,
    CircuitState,
    CircuitStateChanged,
    CircuitWaited,
    CircuitWaiting,
)
from resilient_dspy.middleware.breaker.layer import CircuitBreaker
from resilient_dspy.middleware.breaker.options import CircuitBreakerOptions

__all__ = [
    "CircuitBreaker",
    "CircuitBreakerOptions",
    "CircuitRejected",
    "CircuitSnapshot",
    "CircuitState",
    "CircuitStateChanged",
    "CircuitWaited",
    "CircuitWaiting",
]
