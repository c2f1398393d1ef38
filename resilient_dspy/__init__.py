"""resilient_dspy: reliability middleware (timeout, retry, fallback, …) for async DSPy programs.

The root holds what an application imports: the pipeline, the layers it stacks with their small helpers, and the
errors a caller catches. Events are in :mod:`resilient_dspy.events`, every error in :mod:`resilient_dspy.errors`,
the layer-writing contract in :mod:`resilient_dspy.core`, state snapshots and cache backends under their layer
(docs/architecture.md, "The public surface").
"""

import logging as _logging
from typing import TYPE_CHECKING

from resilient_dspy._moved import MOVED_FROM_ROOT, moved_names
from resilient_dspy.binding.settings import no_dspy_retries
from resilient_dspy.core.dspy_module import ResilientModule
from resilient_dspy.core.pipeline import Outcome, Pipeline
from resilient_dspy.errors import (
    BudgetExceededError,
    BulkheadFullError,
    CircuitOpenError,
    FallbackFailedError,
    InvalidInputError,
    InvalidOutputError,
    RateLimitedError,
    RejectedError,
    ResilienceError,
    RetriesExhaustedError,
    StreamInterruptedError,
    TimeoutExceededError,
    TruncatedOutputError,
)
from resilient_dspy.middleware._shared.partitions import by_model, by_partition_key
from resilient_dspy.middleware.adaptive_concurrency import AdaptiveConcurrency
from resilient_dspy.middleware.adaptive_throttle import AdaptiveThrottle
from resilient_dspy.middleware.adaptive_timeout import AdaptiveTimeout
from resilient_dspy.middleware.breaker import CircuitBreaker
from resilient_dspy.middleware.budget import Budget
from resilient_dspy.middleware.bulkhead import Bulkhead
from resilient_dspy.middleware.cache import Cache
from resilient_dspy.middleware.canary import Canary
from resilient_dspy.middleware.chaos import Chaos
from resilient_dspy.middleware.fallback import Fallback, Static, UseLM, UseProgram
from resilient_dspy.middleware.guard import Guard, InputRules
from resilient_dspy.middleware.hedge import Hedge
from resilient_dspy.middleware.ratelimit import Limit, RateLimiter
from resilient_dspy.middleware.retry import Retry, RetryBudget
from resilient_dspy.middleware.timeout import Timeout
from resilient_dspy.store.redis import RedisStore

__version__ = "0.1.0"

__all__ = [
    "AdaptiveConcurrency",
    "AdaptiveThrottle",
    "AdaptiveTimeout",
    "Budget",
    "BudgetExceededError",
    "Bulkhead",
    "BulkheadFullError",
    "Cache",
    "Canary",
    "Chaos",
    "CircuitBreaker",
    "CircuitOpenError",
    "Fallback",
    "FallbackFailedError",
    "Guard",
    "Hedge",
    "InputRules",
    "InvalidInputError",
    "InvalidOutputError",
    "Limit",
    "Outcome",
    "Pipeline",
    "RateLimitedError",
    "RateLimiter",
    "RedisStore",
    "RejectedError",
    "ResilienceError",
    "ResilientModule",
    "RetriesExhaustedError",
    "Retry",
    "RetryBudget",
    "Static",
    "StreamInterruptedError",
    "Timeout",
    "TimeoutExceededError",
    "TruncatedOutputError",
    "UseLM",
    "UseProgram",
    "by_model",
    "by_partition_key",
    "no_dspy_retries",
]

if not TYPE_CHECKING:  # type checkers see only the surface above; at run time an old root name warns and resolves
    __getattr__ = moved_names(__name__, MOVED_FROM_ROOT)


def __dir__() -> list[str]:
    """The public surface (and the module's dunders): no deprecated name, no submodule, no private name."""
    return sorted({*__all__, *(name for name in globals() if name.startswith("__"))})


# a library never configures logging: without the application's handlers, its records go nowhere (not stderr)
_logging.getLogger("resilient_dspy").addHandler(_logging.NullHandler())
