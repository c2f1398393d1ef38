"""resilient_dspy: reliability middleware (timeout, retry, fallback, …) for async DSPy programs."""

from resilient_dspy.clock import Clock, LoopClock
from resilient_dspy.dspy_binding import no_dspy_retries
from resilient_dspy.errors import (
    BudgetExceededError,
    BulkheadFullError,
    CircuitOpenError,
    ConfigurationError,
    ErrorInfo,
    ErrorKind,
    FallbackFailedError,
    RateLimitedError,
    RejectedError,
    ResilienceError,
    ResilienceWarning,
    RetriesExhaustedError,
    TimeoutExceededError,
    classify,
)
from resilient_dspy.events import Event
from resilient_dspy.middleware import (
    Fallback,
    FallbackUsed,
    Retry,
    RetryBudget,
    RetryGaveUp,
    RetryScheduled,
    Static,
    Timeout,
    TimeoutFired,
    UseLM,
    UseProgram,
)
from resilient_dspy.pipeline import Call, CallRecord, Handler, Middleware, Outcome, Pipeline

__version__ = "0.1.0"

__all__ = [
    "BudgetExceededError",
    "BulkheadFullError",
    "Call",
    "CallRecord",
    "CircuitOpenError",
    "Clock",
    "ConfigurationError",
    "ErrorInfo",
    "ErrorKind",
    "Event",
    "Fallback",
    "FallbackFailedError",
    "FallbackUsed",
    "Handler",
    "LoopClock",
    "Middleware",
    "Outcome",
    "Pipeline",
    "RateLimitedError",
    "RejectedError",
    "ResilienceError",
    "ResilienceWarning",
    "RetriesExhaustedError",
    "Retry",
    "RetryBudget",
    "RetryGaveUp",
    "RetryScheduled",
    "Static",
    "Timeout",
    "TimeoutExceededError",
    "TimeoutFired",
    "UseLM",
    "UseProgram",
    "classify",
    "no_dspy_retries",
]
