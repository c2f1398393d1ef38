"""Observability: events to structured logs, OpenTelemetry and Prometheus; cost accounting; redaction.

Each observer is a middleware you place outermost (``OpenTelemetry``, ``PrometheusMetrics``, ``CostTracker``,
``LogCalls``) that also subscribes to its pipeline's events when built; ``LoggingListener`` and
``AsyncListener`` are plain listeners. See ``docs/observability.md``.
"""

from resilient_dspy.observe.common import (
    CIRCUIT_STATE_VALUES,
    DURATION_BUCKETS,
    OUTCOMES,
    AsyncListener,
    CallReport,
    TokenUsage,
    UsageWindow,
    event_fields,
)
from resilient_dspy.observe.cost import (
    DEFAULT_PRICES,
    PRICES_AS_OF,
    CallCost,
    CostTotals,
    CostTracker,
    ModelPrice,
    PriceTable,
)
from resilient_dspy.observe.logging import DEFAULT_LEVELS, JsonFormatter, LogCalls, LoggingListener, RedactingFilter
from resilient_dspy.observe.otel import AttemptSpans, OpenTelemetry
from resilient_dspy.observe.prometheus import PrometheusMetrics, make_asgi_app
from resilient_dspy.observe.redact import DEFAULT_PATTERNS, DEFAULT_SECRET_KEYS, Redactor

__all__ = [
    "CIRCUIT_STATE_VALUES",
    "DEFAULT_LEVELS",
    "DEFAULT_PATTERNS",
    "DEFAULT_PRICES",
    "DEFAULT_SECRET_KEYS",
    "DURATION_BUCKETS",
    "OUTCOMES",
    "PRICES_AS_OF",
    "AsyncListener",
    "AttemptSpans",
    "CallCost",
    "CallReport",
    "CostTotals",
    "CostTracker",
    "JsonFormatter",
    "LogCalls",
    "LoggingListener",
    "ModelPrice",
    "OpenTelemetry",
    "PriceTable",
    "PrometheusMetrics",
    "RedactingFilter",
    "Redactor",
    "TokenUsage",
    "UsageWindow",
    "event_fields",
    "make_asgi_app",
]
