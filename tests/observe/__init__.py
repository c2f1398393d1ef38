"""Helpers shared by the observability tests: scripted programs, captured JSON logs, in-memory OTel providers."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dspy
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from resilient_dspy.observe import JsonFormatter, Redactor


def server_error(message: str = "injected 503") -> Exception:
    return dspy.LMServerError(message, status=503)


class Scripted:
    """An async program (input ``question``): raises each queued error in turn, then answers ``"ok"``."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self, question: str) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


class AlwaysFailing:
    """An async program that always raises a 503 with ``message``."""

    def __init__(self, message: str = "injected 503") -> None:
        self.message = message
        self.calls = 0

    async def __call__(self, question: str) -> str:
        self.calls += 1
        raise server_error(self.message)


@contextmanager
def captured_json(
    name: str = "resilient_dspy", level: int = logging.DEBUG, redactor: Redactor | None = None
) -> Iterator[list[dict[str, Any]]]:
    """Route logger ``name`` (and its children) through a JsonFormatter into a list of parsed lines."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(redactor=redactor))
    logger = logging.getLogger(name)
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    lines: list[dict[str, Any]] = []
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        lines.extend(json.loads(line) for line in stream.getvalue().splitlines())
        lines.append({"__raw__": stream.getvalue()})


class Otel:
    """SDK providers with in-memory exporters, passed explicitly (no global provider is touched)."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def spans(self) -> list[Any]:
        return list(self.exporter.get_finished_spans())

    def metrics(self) -> dict[str, list[tuple[dict[str, Any], Any]]]:
        """Metric name → [(attributes, value)], value = sum / gauge value / histogram count."""
        found: dict[str, list[tuple[dict[str, Any], Any]]] = {}
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    points = found.setdefault(metric.name, [])
                    for point in metric.data.data_points:
                        value = getattr(point, "count", None) if hasattr(point, "bucket_counts") else point.value
                        points.append((dict(point.attributes or {}), value))
        return found

    def value(self, name: str, **attributes: Any) -> Any:
        """The one data point of ``name`` whose attributes include ``attributes`` (None if none)."""
        matches = [v for a, v in self.metrics().get(name, []) if all(a.get(k) == w for k, w in attributes.items())]
        assert len(matches) <= 1, (name, attributes, matches)
        return matches[0] if matches else None
