"""OpenTelemetry: a span per pipeline call, a child span per attempt, span events and metrics, through the API only.

``telemetry = OpenTelemetry(tracer_provider=..., meter_provider=...)`` is a middleware: placed outermost, it opens
the call span and records the call metrics. ``telemetry.attempts()`` is a second middleware: placed under
``Retry``, it opens one child span per attempt. Built into a pipeline, the telemetry also listens to its events:
each becomes a span event on the current span (the attempt's, else the call's) and feeds the retry, rejection,
circuit, cache, timeout and fallback metrics. Without providers, the global API ones are used — which do nothing
until the application installs an SDK.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Span, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from resilient_dspy.core.call import Call, Handler
from resilient_dspy.core.pipeline import Pipeline
from resilient_dspy.events import Event
from resilient_dspy.observe.common import (
    CIRCUIT_STATE_VALUES,
    DURATION_BUCKETS,
    CallReport,
    UsageWindow,
    circuit_snapshots,
    event_fields,
    outcome_of,
    report_call,
    safely,
    subscribe_once,
    usage_window,
)
from resilient_dspy.observe.cost import PriceTable
from resilient_dspy.observe.redact import Redactor
from resilient_dspy.observe.routing import event_router

__all__ = ["AttemptSpans", "OpenTelemetry"]

_SCOPE = "resilient_dspy"
_DEFAULT_REDACTOR = Redactor()


def _version() -> str:
    from resilient_dspy import __version__

    return __version__


def _attributes(fields: Mapping[str, Any], prefix: str = "") -> dict[str, AttributeValue]:
    """Flatten JSON-safe fields into OTel attributes: nested dicts as ``a.b``, mixed lists as text, None dropped."""
    flat: dict[str, AttributeValue] = {}
    for name, value in fields.items():
        key = f"{prefix}{name}"
        if value is None:
            continue
        if isinstance(value, str | bool | int | float):
            flat[key] = value
        elif isinstance(value, dict):
            flat.update(_attributes(value, f"{key}."))
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            flat[key] = list(value)
        else:
            flat[key] = str(value)
    return flat


class OpenTelemetry:
    """Traces and metrics for a pipeline; see the module docstring and ``docs/observability.md``.

    ``prices`` (a :class:`~resilient_dspy.observe.PriceTable`) enables the cost metric and span attribute;
    ``redactor`` cleans every string put in a span event, status or exception (None: off); ``tokens=False``
    skips measuring LM usage (no token or cost data, a few microseconds less per call).
    """

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        *,
        prices: PriceTable | None = None,
        redactor: Redactor | None = _DEFAULT_REDACTOR,
        duration_buckets: Sequence[float] = DURATION_BUCKETS,
        tokens: bool = True,
    ) -> None:
        self._route = event_router(self)
        self.measure_tokens = tokens
        self.tracer = trace.get_tracer(_SCOPE, _version(), tracer_provider)
        self.meter = metrics.get_meter(_SCOPE, _version(), meter_provider)
        self.prices = prices
        self.redactor = redactor
        meter = self.meter
        self.calls = meter.create_counter("resilient_dspy.calls", "{call}", "Pipeline calls by outcome.")
        self.attempt_count = meter.create_counter(
            "resilient_dspy.attempts", "{attempt}", "Program runs (first attempts and retries)."
        )
        self.duration = meter.create_histogram(
            "resilient_dspy.call.duration",
            "s",
            "Pipeline call duration, retries and fallbacks included.",
            explicit_bucket_boundaries_advisory=list(duration_buckets),
        )
        self.retries = meter.create_counter("resilient_dspy.retries", "{retry}", "Retries scheduled, by reason.")
        self.rejections = meter.create_counter(
            "resilient_dspy.rejections", "{call}", "Calls refused by a guard (circuit, bulkhead, rate limit)."
        )
        self.transitions = meter.create_counter(
            "resilient_dspy.circuit.transitions", "{transition}", "Circuit state changes, by new state."
        )
        self.cache_requests = meter.create_counter(
            "resilient_dspy.cache.requests", "{request}", "Cache lookups by result (hit, miss, coalesced, bypass)."
        )
        self.cache_saved_tokens = meter.create_counter(
            "resilient_dspy.cache.saved_tokens", "{token}", "LM tokens served from the cache instead of the LM."
        )
        self.timeouts = meter.create_counter("resilient_dspy.timeouts", "{timeout}", "Timeouts fired, by scope.")
        self.fallbacks = meter.create_counter(
            "resilient_dspy.fallbacks", "{fallback}", "Fallback alternatives tried, by name."
        )
        self.chaos_injected = meter.create_counter(
            "resilient_dspy.chaos.injected", "{injection}", "Faults, latency or effects injected by Chaos, by kind."
        )
        self.tokens = meter.create_counter(
            "resilient_dspy.tokens", "{token}", "LM tokens used, by model and kind (input, output)."
        )
        self.cost = meter.create_counter("resilient_dspy.cost", "USD", "LM cost in US dollars, by model.")
        self._circuits: dict[tuple[str, str, str], int] = {}
        self.circuit_state = meter.create_observable_gauge(
            "resilient_dspy.circuit.state",
            [self._observe_circuits],
            "1",
            "Circuit state: 0 closed, 1 half-open, 2 open, 3 isolated.",
        )

    def attempts(self) -> AttemptSpans:
        """The middleware to place under ``Retry``: one child span per attempt."""
        return AttemptSpans(self)

    def on_build(self, pipeline: Pipeline) -> None:
        subscribe_once(pipeline, self.on_event)
        for layer, key, state in circuit_snapshots(pipeline):
            self._circuits.setdefault((pipeline.name, layer, key), CIRCUIT_STATE_VALUES.get(state, -1))

    # ------------------------------------------------------------------------------------------------ the call

    async def __call__(self, call: Call, next: Handler) -> Any:
        name = call.runtime.name
        with self.tracer.start_as_current_span(
            f"call {name}",
            attributes={"resilient_dspy.pipeline": name},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            started = call.clock.now()
            with usage_window(self.measure_tokens) as window:
                try:
                    result = await next(call)
                except BaseException as error:
                    safely("OpenTelemetry", self._finish, call, span, started, window, error)
                    raise
                window.hand_back(result)
                safely("OpenTelemetry", self._finish, call, span, started, window, None)
                return result

    def _finish(self, call: Call, span: Span, started: float, window: UsageWindow, error: BaseException | None) -> None:
        report = report_call(call, started, window, error)
        cost = self._record(report)
        if span.is_recording():
            attributes: dict[str, AttributeValue] = {
                "resilient_dspy.outcome": report.outcome,
                "resilient_dspy.served_by": report.served_by,
                "resilient_dspy.attempts": report.attempts,
                "resilient_dspy.retries": report.retries,
            }
            if self.measure_tokens:
                attributes["gen_ai.usage.input_tokens"] = report.input_tokens
                attributes["gen_ai.usage.output_tokens"] = report.output_tokens
            models = sorted(report.usage)
            if models:
                attributes["resilient_dspy.models"] = models
            if len(models) == 1:
                attributes["gen_ai.request.model"] = models[0]
            if cost is not None:
                attributes["resilient_dspy.cost_usd"] = cost
            span.set_attributes(attributes)
            self._mark_error(span, report.outcome, error)

    def _record(self, report: CallReport) -> float | None:
        """Record the call metrics; the call's cost when prices are known."""
        pipeline = report.pipeline
        labels = {"pipeline": pipeline, "outcome": report.outcome}
        self.calls.add(1, labels)
        self.duration.record(report.duration, labels)
        if report.attempts:
            self.attempt_count.add(report.attempts, {"pipeline": pipeline})
        cost = None
        for model, usage in report.usage.items():
            if usage.input:
                self.tokens.add(usage.input, {"pipeline": pipeline, "model": model, "kind": "input"})
            if usage.output:
                self.tokens.add(usage.output, {"pipeline": pipeline, "model": model, "kind": "output"})
            dollars = None if self.prices is None else self.prices.cost_of(model, usage)
            if dollars is not None:
                self.cost.add(dollars, {"pipeline": pipeline, "model": model})
                cost = (cost or 0.0) + dollars
        return cost

    def _mark_error(self, span: Span, outcome: str, error: BaseException | None, stacktrace: bool = True) -> None:
        """Error status, ``error.type`` and an ``exception`` event (redacted; the stack trace only if asked)."""
        if error is None or outcome == "cancelled":
            return
        redact = self.redactor.redact_text if self.redactor is not None else str
        message = redact(str(error))
        span.set_attribute("error.type", type(error).__qualname__)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {message}"))
        if stacktrace:
            trace_text = redact("".join(traceback.format_exception(error)))
            span.record_exception(error, {"exception.message": message, "exception.stacktrace": trace_text})
        else:
            span.add_event("exception", {"exception.type": type(error).__qualname__, "exception.message": message})

    # ------------------------------------------------------------------------------------------------ events

    def on_event(self, event: Event) -> None:
        """Add ``event`` to the current span (if one records) and to the metrics."""
        self._route(event)
        span = trace.get_current_span()
        if span.is_recording():
            fields = event_fields(event)
            name = fields.pop("event")
            fields.pop("pipeline", None)
            if self.redactor is not None:
                fields = self.redactor.redact(fields)
            span.add_event(name, _attributes(fields))

    def retry(self, pipeline: str, layer: str, reason: str) -> None:
        self.retries.add(1, {"pipeline": pipeline, "reason": reason})

    def rejected(self, pipeline: str, layer: str, reason: str) -> None:
        self.rejections.add(1, {"pipeline": pipeline, "layer": layer, "reason": reason})

    def circuit(self, pipeline: str, layer: str, key: str, old: str, new: str) -> None:
        self._circuits[(pipeline, layer, key)] = CIRCUIT_STATE_VALUES.get(new, -1)
        self.transitions.add(1, {"pipeline": pipeline, "layer": layer, "key": key, "to": new})

    def cache(self, pipeline: str, layer: str, result: str, saved_tokens: int) -> None:
        self.cache_requests.add(1, {"pipeline": pipeline, "layer": layer, "result": result})
        if saved_tokens:
            self.cache_saved_tokens.add(saved_tokens, {"pipeline": pipeline, "layer": layer})

    def timeout(self, pipeline: str, layer: str, scope: str) -> None:
        self.timeouts.add(1, {"pipeline": pipeline, "layer": layer, "scope": scope})

    def fallback(self, pipeline: str, layer: str, alternative: str) -> None:
        self.fallbacks.add(1, {"pipeline": pipeline, "alternative": alternative})

    def chaos(self, pipeline: str, layer: str, kind: str) -> None:
        self.chaos_injected.add(1, {"pipeline": pipeline, "layer": layer, "kind": kind})

    def _observe_circuits(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(state, {"pipeline": pipeline, "layer": layer, "key": key})
            for (pipeline, layer, key), state in list(self._circuits.items())
        ]

    def describe(self) -> dict[str, Any]:
        return {"layer": "OpenTelemetry", "priced": self.prices is not None, "redacted": self.redactor is not None}


class AttemptSpans:
    """Middleware under ``Retry``: one span per attempt, a child of the call span (from :meth:`OpenTelemetry.attempts`).

    Attributes: ``resilient_dspy.attempt``, ``resilient_dspy.outcome``, the attempt's tokens; on failure an error
    status and an ``exception`` event without stack trace (attempts fail often; the call span keeps the trace).
    """

    def __init__(self, telemetry: OpenTelemetry) -> None:
        self.telemetry = telemetry

    async def __call__(self, call: Call, next: Handler) -> Any:
        name = call.runtime.name
        with (
            self.telemetry.tracer.start_as_current_span(
                f"attempt {name}",
                attributes={"resilient_dspy.pipeline": name, "resilient_dspy.attempt": call.attempt},
                record_exception=False,
                set_status_on_exception=False,
            ) as span,
            UsageWindow() as window,
        ):
            try:
                result = await next(call)
            except BaseException as error:
                safely("OpenTelemetry.attempts", self._finish, span, window, error)
                raise
            window.hand_back(result)
            safely("OpenTelemetry.attempts", self._finish, span, window, None)
            return result

    def _finish(self, span: Span, window: UsageWindow, error: BaseException | None) -> None:
        if not span.is_recording():
            return
        outcome = outcome_of(error, "primary")
        span.set_attribute("resilient_dspy.outcome", outcome)
        if self.telemetry.measure_tokens:
            usage = window.usage()
            span.set_attribute("gen_ai.usage.input_tokens", sum(u.input for u in usage.values()))
            span.set_attribute("gen_ai.usage.output_tokens", sum(u.output for u in usage.values()))
        self.telemetry._mark_error(span, outcome, error, stacktrace=False)

    def describe(self) -> dict[str, Any]:
        return {"layer": "OpenTelemetry.attempts"}
