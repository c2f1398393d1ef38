"""What observability costs per call: no listener vs logging, OpenTelemetry, Prometheus and cost tracking.

Run ``python benchmarks/bench_observe.py [--quick] [--json out.json]``; see ``docs/observability.md``.

Groups (each times ``Pipeline(program, [observer], Timeout(10), Retry(...))`` around a trivial program):

- ``success``: every call succeeds at once, so no layer emits an event: the cost of the observer middleware
  alone (a listener that hears nothing costs nothing).
- ``retry``: every call fails its first attempt (``ConnectionError``) and succeeds on the second, after a
  zero-delay retry, so each call emits one ``RetryScheduled``: the per-event cost.

Variants of a group run round-robin in one event loop, the order rotating every round; each sample is one batch
of sequential awaits ending with one ``asyncio.sleep(0)``. ``min`` and ``median`` are over rounds; ``ratio`` is
the median of per-round ratios to ``none`` (paired, so drift cancels). The script also counts the events built
with and without a listener, to confirm that a silent pipeline builds none.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import resilient_dspy.middleware.retry as retry_module
from resilient_dspy import Pipeline, Retry, Timeout
from resilient_dspy.observe import CostTracker, LoggingListener, OpenTelemetry, PriceTable, PrometheusMetrics

Runner = Callable[[int], Awaitable[None]]


async def program(question: str) -> str:
    return question


class FailsFirst:
    """An async program whose first attempt of every call raises ``ConnectionError`` (a retryable error)."""

    def __init__(self) -> None:
        self.fail_next = True

    async def __call__(self, question: str) -> str:
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("injected")
        return question


@dataclass
class Variant:
    name: str
    run: Runner
    note: str
    after_batch: Callable[[], None] = lambda: None
    samples: list[float] = field(default_factory=list)


def calls(pipeline: Pipeline, flaky: FailsFirst | None = None) -> Runner:
    async def run(n: int) -> None:
        for _ in range(n):
            if flaky is not None:
                flaky.fail_next = True
            await pipeline(question="q")

    return run


def quiet_logger(name: str, disabled: bool) -> logging.Logger:
    """An INFO logger with a NullHandler that does not propagate (so records are built and dropped)."""
    logger = logging.getLogger(name)
    logger.handlers[:] = [logging.NullHandler()]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.disabled = disabled
    return logger


class Otel:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])


def variants(failing: bool) -> list[Variant]:
    """The same variants for both groups; ``failing`` makes every call retry once."""

    def stack(*outer: Any, attempts: Any = None, listeners: tuple[Any, ...] = ()) -> tuple[Pipeline, FailsFirst | None]:
        flaky = FailsFirst() if failing else None
        retry = Retry(3, base_delay=0, jitter="none", budget=None) if failing else Retry(3)
        inner = (attempts,) if attempts is not None else ()
        target = flaky if flaky is not None else program
        return Pipeline(target, *outer, Timeout(10), retry, *inner, listeners=listeners), flaky

    def variant(name: str, note: str, *outer: Any, after: Callable[[], None] = lambda: None, **kw: Any) -> Variant:
        pipeline, flaky = stack(*outer, **kw)
        return Variant(name, calls(pipeline, flaky), note, after)

    log_on = LoggingListener(quiet_logger("bench.observe.on", disabled=False))
    log_off = LoggingListener(quiet_logger("bench.observe.off", disabled=True))
    otel = Otel()
    telemetry = OpenTelemetry(otel.tracer_provider, otel.meter_provider)
    otel2 = Otel()
    telemetry2 = OpenTelemetry(otel2.tracer_provider, otel2.meter_provider)
    prices = PriceTable(litellm=False)
    return [
        variant("none", "no listener, no observer"),
        variant("logging", "LoggingListener, logger at INFO, NullHandler", listeners=(log_on,)),
        variant("logging-off", "LoggingListener, logger.disabled = True", listeners=(log_off,)),
        variant(
            "otel-noop",
            "OpenTelemetry outermost, no-op API providers (our own cost)",
            OpenTelemetry(trace.NoOpTracerProvider(), metrics.NoOpMeterProvider()),
        ),
        variant("otel", "OpenTelemetry outermost (SDK, in-memory exporter)", telemetry, after=otel.exporter.clear),
        variant(
            "otel+attempts",
            "OpenTelemetry outermost + attempts() under Retry",
            telemetry2,
            attempts=telemetry2.attempts(),
            after=otel2.exporter.clear,
        ),
        variant("prometheus", "PrometheusMetrics outermost (own registry)", PrometheusMetrics(prices=prices)),
        variant("cost", "CostTracker outermost", CostTracker(prices)),
    ]


async def time_batch(variant: Variant, n: int) -> float:
    start = time.perf_counter_ns()
    await variant.run(n)
    await asyncio.sleep(0)
    elapsed = (time.perf_counter_ns() - start) / n
    variant.after_batch()
    return elapsed


async def measure(group: list[Variant], batch: int, rounds: int) -> None:
    for variant in group:
        for _ in range(2):
            await time_batch(variant, batch)
    gc.collect()
    for round_ in range(rounds):
        for i in range(len(group)):
            variant = group[(round_ + i) % len(group)]
            variant.samples.append(await time_batch(variant, batch))


def summarize(group: list[Variant]) -> dict[str, dict[str, Any]]:
    base = group[0]
    return {
        v.name: {
            "note": v.note,
            "min_ns": min(v.samples),
            "median_ns": statistics.median(v.samples),
            "overhead_ns": statistics.median(x - y for x, y in zip(v.samples, base.samples, strict=True)),
            "ratio": statistics.median(x / y for x, y in zip(v.samples, base.samples, strict=True)),
            "samples_ns": [round(s, 1) for s in v.samples],
        }
        for v in group
    }


def print_table(title: str, rows: dict[str, dict[str, Any]]) -> None:
    print(f"\n{title}")
    print(f"{'variant':<15} {'min ns':>9} {'median ns':>10} {'overhead ns':>12} {'ratio':>7}  note")
    for name, row in rows.items():
        print(
            f"{name:<15} {row['min_ns']:>9,.0f} {row['median_ns']:>10,.0f} {row['overhead_ns']:>12,.0f} "
            f"{row['ratio']:>6.2f}x  {row['note']}"
        )


async def events_built(calls_: int) -> dict[str, int]:
    """Events constructed by ``calls_`` retrying calls, without and with a listener (RetryScheduled counted)."""
    built = 0
    original = retry_module.RetryScheduled

    def counting(**fields: Any) -> Any:
        nonlocal built
        built += 1
        return original(**fields)

    counts = {}
    retry_module.RetryScheduled = counting  # type: ignore[assignment,misc]
    try:
        for label, listeners in (("no_listener", ()), ("with_listener", ((lambda event: None),))):
            built = 0
            flaky = FailsFirst()
            pipeline = Pipeline(flaky, Retry(2, base_delay=0, budget=None), listeners=listeners)
            await calls(pipeline, flaky)(calls_)
            counts[label] = built
    finally:
        retry_module.RetryScheduled = original  # type: ignore[misc]
    return counts


async def main(quick: bool) -> dict[str, Any]:
    batch, rounds = (200, 15) if quick else (500, 40)
    started = time.perf_counter()
    built = await events_built(1000)
    print(
        f"events built by 1000 retrying calls: no listener {built['no_listener']}, with a listener "
        f"{built['with_listener']}"
    )
    results: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "batch": batch,
        "rounds": rounds,
        "events_built": built,
    }
    for name, failing, title in (
        ("success", False, "Success path: Pipeline(program, [observer], Timeout(10), Retry(3)), ns per call"),
        ("retry", True, "One retry per call (one RetryScheduled event): same stack, ns per call"),
    ):
        group = variants(failing)
        await measure(group, batch, rounds)
        rows = summarize(group)
        print_table(title, rows)
        results[name] = rows
    print(f"\n({time.perf_counter() - started:.0f} s; batch {batch}, {rounds} rounds)")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, smaller batches (~15 s)")
    parser.add_argument("--json", type=Path, default=None, help="write every sample here")
    arguments = parser.parse_args()
    results = asyncio.run(main(arguments.quick))
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(results, indent=2))
