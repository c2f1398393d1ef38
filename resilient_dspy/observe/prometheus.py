"""Prometheus metrics on a registry you give (a new one by default, never the global one implicitly).

``metrics = PrometheusMetrics(registry)`` is a middleware: placed outermost, it counts calls, attempts, their
duration and tokens; built into a pipeline it also listens to the pipeline's events for retries, rejections,
circuit states and transitions, cache lookups, timeouts and fallbacks. One instance per registry; share it
between pipelines (every series has a ``pipeline`` label). Serve it with :func:`make_asgi_app` or
:meth:`PrometheusMetrics.text`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import make_asgi_app as _make_asgi_app

from resilient_dspy.core.call import Call, Handler
from resilient_dspy.core.pipeline import Pipeline
from resilient_dspy.events import Event
from resilient_dspy.middleware.adaptive_concurrency.events import ConcurrencyLimitChanged
from resilient_dspy.observe.common import (
    CIRCUIT_STATE_VALUES,
    DURATION_BUCKETS,
    CallReport,
    UsageWindow,
    circuit_snapshots,
    key_label,
    report_call,
    safely,
    subscribe_once,
    usage_window,
)
from resilient_dspy.observe.cost import PriceTable
from resilient_dspy.observe.routing import event_router

__all__ = ["PrometheusMetrics", "make_asgi_app"]


class PrometheusMetrics:
    """The metric set (see ``docs/observability.md`` for names, labels and PromQL); a middleware and a listener.

    ``registry``: where the metrics live (default a new ``CollectorRegistry``; pass ``prometheus_client.REGISTRY``
    to use the global one). ``prices`` enables ``resilient_dspy_cost_usd_total``; ``tokens=False`` skips measuring
    LM usage (no token or cost series, a few microseconds less per call).
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        prices: PriceTable | None = None,
        buckets: Sequence[float] = DURATION_BUCKETS,
        namespace: str = "resilient_dspy",
        tokens: bool = True,
    ) -> None:
        self._route = event_router(self).on(
            ConcurrencyLimitChanged,
            lambda e: self.concurrency_limit.labels(e.pipeline, e.layer, key_label(e.key)).set(e.new),
        )
        self.measure_tokens = tokens
        self._call_series: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
        self.registry = CollectorRegistry() if registry is None else registry
        self.prices = prices
        options: dict[str, Any] = {"namespace": namespace, "registry": self.registry}
        self.calls = Counter("calls", "Pipeline calls by outcome.", ["pipeline", "outcome"], **options)
        self.attempts = Counter("attempts", "Program runs (first attempts and retries).", ["pipeline"], **options)
        self.duration = Histogram(
            "call_duration_seconds",
            "Pipeline call duration, retries and fallbacks included.",
            ["pipeline", "outcome"],
            buckets=tuple(buckets),
            **options,
        )
        self.retries = Counter("retries", "Retries scheduled, by reason.", ["pipeline", "reason"], **options)
        self.rejections = Counter("rejections", "Calls refused by a guard.", ["pipeline", "layer", "reason"], **options)
        self.circuit_state = Gauge(
            "circuit_state",
            "Circuit state: 0 closed, 1 half-open, 2 open, 3 isolated.",
            ["pipeline", "layer", "key"],
            **options,
        )
        self.circuit_transitions = Counter(
            "circuit_transitions", "Circuit state changes, by new state.", ["pipeline", "layer", "key", "to"], **options
        )
        self.concurrency_limit = Gauge(
            "concurrency_limit", "An AdaptiveConcurrency's current limit.", ["pipeline", "layer", "key"], **options
        )
        self.cache_requests = Counter(
            "cache_requests", "Cache lookups by result.", ["pipeline", "layer", "result"], **options
        )
        self.cache_saved_tokens = Counter(
            "cache_saved_tokens", "LM tokens served from the cache.", ["pipeline", "layer"], **options
        )
        self.timeouts = Counter("timeouts", "Timeouts fired, by scope.", ["pipeline", "layer", "scope"], **options)
        self.fallbacks = Counter("fallbacks", "Fallback alternatives tried.", ["pipeline", "alternative"], **options)
        self.chaos_injected = Counter(
            "chaos_injected", "Faults, latency or effects injected by Chaos.", ["pipeline", "layer", "kind"], **options
        )
        self.tokens = Counter("tokens", "LM tokens used, by model and kind.", ["pipeline", "model", "kind"], **options)
        self.cost = Counter("cost_usd", "LM cost in US dollars, by model.", ["pipeline", "model"], **options)

    def on_build(self, pipeline: Pipeline) -> None:
        subscribe_once(pipeline, self.on_event)
        for layer, key, state in circuit_snapshots(pipeline):
            self.circuit_state.labels(pipeline.name, layer, key).set(CIRCUIT_STATE_VALUES.get(state, -1))

    async def __call__(self, call: Call, next: Handler) -> Any:
        started = call.clock.now()
        with usage_window(self.measure_tokens) as window:
            try:
                result = await next(call)
            except BaseException as error:
                safely("PrometheusMetrics", self._finish, call, started, window, error)
                raise
            window.hand_back(result)
            safely("PrometheusMetrics", self._finish, call, started, window, None)
            return result

    def _finish(self, call: Call, started: float, window: UsageWindow, error: BaseException | None) -> None:
        report = report_call(call, started, window, error)
        self.record(report)

    def record(self, report: CallReport) -> None:
        """Count one finished call (what the middleware does; public for calls measured elsewhere)."""
        pipeline = report.pipeline
        series = self._call_series.get((pipeline, report.outcome))
        if series is None:
            series = self._call_series[(pipeline, report.outcome)] = (
                self.calls.labels(pipeline, report.outcome),
                self.duration.labels(pipeline, report.outcome),
                self.attempts.labels(pipeline),
            )
        calls, duration, attempts = series
        calls.inc()
        duration.observe(report.duration)
        if report.attempts:
            attempts.inc(report.attempts)
        for model, usage in report.usage.items():
            if usage.input:
                self.tokens.labels(pipeline, model, "input").inc(usage.input)
            if usage.output:
                self.tokens.labels(pipeline, model, "output").inc(usage.output)
            dollars = None if self.prices is None else self.prices.cost_of(model, usage)
            if dollars is not None:
                self.cost.labels(pipeline, model).inc(dollars)

    # ------------------------------------------------------------------------------------------------ events

    def on_event(self, event: Event) -> None:
        self._route(event)

    def retry(self, pipeline: str, layer: str, reason: str) -> None:
        self.retries.labels(pipeline, reason).inc()

    def rejected(self, pipeline: str, layer: str, reason: str) -> None:
        self.rejections.labels(pipeline, layer, reason).inc()

    def circuit(self, pipeline: str, layer: str, key: str, old: str, new: str) -> None:
        self.circuit_state.labels(pipeline, layer, key).set(CIRCUIT_STATE_VALUES.get(new, -1))
        self.circuit_transitions.labels(pipeline, layer, key, new).inc()

    def cache(self, pipeline: str, layer: str, result: str, saved_tokens: int) -> None:
        self.cache_requests.labels(pipeline, layer, result).inc()
        if saved_tokens:
            self.cache_saved_tokens.labels(pipeline, layer).inc(saved_tokens)

    def timeout(self, pipeline: str, layer: str, scope: str) -> None:
        self.timeouts.labels(pipeline, layer, scope).inc()

    def fallback(self, pipeline: str, layer: str, alternative: str) -> None:
        self.fallbacks.labels(pipeline, alternative).inc()

    def chaos(self, pipeline: str, layer: str, kind: str) -> None:
        self.chaos_injected.labels(pipeline, layer, kind).inc()

    # ------------------------------------------------------------------------------------------------ exposition

    def text(self) -> str:
        """The registry in the Prometheus text format (what a scrape returns)."""
        return generate_latest(self.registry).decode()

    def asgi_app(self) -> Callable[..., Any]:
        """An ASGI app serving this registry (mount it at ``/metrics``)."""
        return make_asgi_app(self.registry)

    def describe(self) -> dict[str, Any]:
        return {"layer": "PrometheusMetrics", "priced": self.prices is not None}


def make_asgi_app(registry: CollectorRegistry | PrometheusMetrics) -> Callable[..., Any]:
    """prometheus_client's ASGI app for ``registry`` (required: the global registry is never implied)."""
    if isinstance(registry, PrometheusMetrics):
        registry = registry.registry
    return _make_asgi_app(registry)
