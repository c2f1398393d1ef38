"""The demo: one batch of questions through a production-style pipeline and through the bare program.

By default both run against a local fault-injecting LM (rate limits with Retry-After, 5xx, timeouts, hangs)
so it needs no key and no network; ``model=`` points it at a real provider instead. An answer is one the program
gave: a fallback's answer (another LM, the static apology) is counted apart, and a run where the program never
answered fails (:func:`exit_status`).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import dspy
from dspy.utils.callback import BaseCallback

from resilient_dspy.core.pipeline import Pipeline
from resilient_dspy.middleware import (
    Bulkhead,
    Cache,
    CircuitBreaker,
    Fallback,
    RateLimiter,
    Retry,
    RetryBudget,
    Static,
    Timeout,
    UseLM,
)
from resilient_dspy.middleware._shared.partitions import by_model
from resilient_dspy.observe.progress import ProgressBar
from resilient_dspy.testing import FaultInjectingLM, FaultProfile

__all__ = ["DemoConfig", "DemoReport", "NoAnswerError", "RunStats", "build_pipeline", "exit_status", "run_demo"]


class NoAnswerError(Exception):
    """The bare program gave no answer within the demo's patience (it hung)."""


QUESTIONS: dict[str, str] = {
    "What is DSPy?": "A framework for programming, not prompting, language models.",
    "What does dspy.ChainOfThought add to a signature?": "A reasoning output field before the answer.",
    "What is a DSPy signature?": "A declaration of a module's input and output fields.",
    "Why cap retries with jitter?": "So clients that failed together do not retry together.",
    "What does a circuit breaker protect?": "A struggling dependency, by failing fast while it recovers.",
    "What is a bulkhead?": "A limit on concurrent calls so one dependency cannot take every slot.",
    "What does HTTP 429 mean?": "Too many requests: slow down, ideally after Retry-After.",
    "What is a fallback chain?": "Ordered alternatives tried when the primary fails.",
    "What is a total deadline?": "A bound on the whole call, retries included.",
    "What is a per-attempt timeout?": "A bound on one try, so a hang can be retried.",
    "What is a retry budget?": "A cap on retries relative to traffic, against retry storms.",
    "Why is cancellation never retried?": "Because the caller asked the work to stop.",
    "What is decorrelated jitter?": "A delay drawn between the base and three times the previous delay.",
    "What does Retry-After tell a client?": "How long the server wants it to wait.",
    "What is a 503?": "Service unavailable: usually transient overload.",
    "Why set num_retries=0 on a DSPy LM under a pipeline?": "So DSPy's retries do not multiply ours.",
    "What does dspy.context do?": "Overrides DSPy settings for the current task only.",
    "What is an optimizer in DSPy?": "An algorithm that tunes prompts or weights against a metric.",
    "What is a DSPy module?": "A composable building block that calls language models.",
    "What is single-flight caching?": "Concurrent identical misses share one call.",
}


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs: how many questions, how concurrently, against which LM and fault mix."""

    questions: int = 40
    concurrency: int = 10
    seed: int = 7
    model: str | None = None
    api_base: str | None = None
    chaos: float = 1.0
    patience: float = 6.0
    progress: bool = True

    def profile(self) -> FaultProfile:
        rates = {"rate_limit": 0.14, "server_error": 0.10, "timeout": 0.04, "hang": 0.04, "malformed": 0.02}
        scale = min(self.chaos, 1 / sum(rates.values()))
        return FaultProfile(
            **{name: rate * scale for name, rate in rates.items()},
            retry_after=(0.2, 0.8),
            latency=(0.05, 0.35),
        )


@dataclass
class RunStats:
    """The figures of one batch."""

    label: str
    answered: int = 0
    fallback: int = 0
    failed: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    served_by: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    lm_calls: int = 0
    latencies: list[float] = field(default_factory=list)
    wall: float = 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "answered": self.answered,
            "fallback": self.fallback,
            "failed": self.failed,
            "failures": dict(self.failures),
            "served_by": dict(self.served_by),
            "retries": self.retries,
            "lm_calls": self.lm_calls,
            "wall": self.wall,
            "p50": self.percentile(0.5),
            "p95": self.percentile(0.95),
            "mean": statistics.fmean(self.latencies or [0.0]),
        }


@dataclass
class DemoReport:
    config: DemoConfig
    resilient: RunStats
    bare: RunStats
    layers: list[dict[str, Any]]


class _LMCalls(BaseCallback):  # type: ignore[misc]  # dspy is untyped
    """Counts every request made to a real ``dspy.LM`` (failed ones included), through DSPy's callback hook."""

    def __init__(self) -> None:
        self.requests = 0

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self.requests += 1


def _lms(config: DemoConfig) -> tuple[dspy.BaseLM, dspy.BaseLM, list[Any]]:
    """The primary and backup LMs, and counters of their requests (each with ``requests``)."""
    if config.model:
        counter = _LMCalls()
        primary = dspy.LM(config.model, api_base=config.api_base, num_retries=0, cache=False, callbacks=[counter])
        return primary, primary, [counter]
    primary_lm = FaultInjectingLM("fault/primary", profile=config.profile(), seed=config.seed, answers=QUESTIONS)
    backup_profile = FaultProfile(server_error=0.05, latency=(0.1, 0.5))
    backup_lm = FaultInjectingLM("fault/backup", profile=backup_profile, seed=config.seed + 1, answers=QUESTIONS)
    return primary_lm, backup_lm, [primary_lm, backup_lm]


def build_pipeline(program: dspy.Module, backup: dspy.BaseLM) -> Pipeline:
    """The production-style stack the demo recommends (see docs/concepts/order-of-layers.md)."""
    return Pipeline(
        program,
        Fallback(
            UseLM(backup, name="backup-lm"),
            Static(answer="Sorry, I cannot answer right now.", name="static-apology"),
        ),
        Timeout(8.0),
        RateLimiter(requests=50, per=1.0),
        Retry(4, base_delay=0.2, max_delay=2.0, jitter="full", max_retry_after=2.0, budget=RetryBudget(ratio=0.5)),
        CircuitBreaker(failure_rate=0.6, window_seconds=10.0, min_calls=20, break_duration=2.0, key=by_model),
        Bulkhead(8, max_queue=64),
        Timeout(1.5),
        Cache(),
        name="demo",
    )


def _questions(count: int) -> list[str]:
    base = list(QUESTIONS)
    return [base[i % len(base)] + ("" if i < len(base) else f" (#{i // len(base) + 1})") for i in range(count)]


async def _run_batch(label: str, title: str, pipeline: Pipeline, questions: list[str], config: DemoConfig) -> RunStats:
    """The batch through ``pipeline``, ``config.concurrency`` calls at a time, with a live bar (``title``) on a
    terminal."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    progress = ProgressBar(f"{title:>18}") if config.progress else False
    outcomes = await pipeline.map(questions, concurrency=config.concurrency, progress=progress)
    stats = RunStats(label, wall=loop.time() - started)
    for outcome in outcomes:
        stats.latencies.append(outcome.duration)
        stats.retries += outcome.retries
        if outcome.error is not None:
            stats.failed += 1
            stats.failures[type(outcome.error).__name__] += 1
            continue
        stats.served_by[outcome.served_by] += 1
        if outcome.served_by == "primary":
            stats.answered += 1
        else:
            stats.fallback += 1
    return stats


async def run_demo(config: DemoConfig) -> DemoReport:
    """Run the batch through the resilient pipeline, then through the bare program, and compare."""
    questions = _questions(config.questions)
    primary, backup, faulty = _lms(config)
    program = dspy.ChainOfThought("question -> answer")
    pipeline = build_pipeline(program, backup)
    with dspy.context(lm=primary):
        resilient = await _run_batch("resilient", "resilient pipeline", pipeline, questions, config)
    resilient.lm_calls = sum(lm.requests for lm in faulty)

    bare_primary, _, bare_faulty = _lms(config)

    async def bare_program(question: str) -> Any:
        # The bare program has no deadline: a hung request would wait forever, so the demo stops
        # waiting after `patience` seconds and counts it as a failure.
        try:
            return await asyncio.wait_for(program.acall(question=question), config.patience)
        except TimeoutError:
            raise NoAnswerError(f"no answer after {config.patience:g}s") from None

    with dspy.context(lm=bare_primary):
        bare = await _run_batch("bare", "bare program", Pipeline(bare_program, name="bare"), questions, config)
    bare.lm_calls = sum(lm.requests for lm in bare_faulty[:1])
    return DemoReport(config, resilient, bare, pipeline.describe())


def render(report: DemoReport) -> Any:
    """A rich Table comparing the two runs."""
    from rich.table import Table

    resilient, bare = report.resilient, report.bare
    table = Table(title=f"{report.config.questions} questions, concurrency {report.config.concurrency}")
    table.add_column("")
    table.add_column("bare program", justify="right")
    table.add_column("resilient pipeline", justify="right")

    def failures(stats: RunStats) -> str:
        return ", ".join(f"{name} {count}" for name, count in stats.failures.most_common()) or "-"

    fallbacks = sum(count for name, count in resilient.served_by.items() if name != "primary")
    by_alternative = ", ".join(f"{n} {c}" for n, c in resilient.served_by.items() if n != "primary")
    rows = [
        ("answered by the program", f"{bare.answered}", f"{resilient.answered}"),
        ("failed", f"{bare.failed}", f"{resilient.failed}"),
        ("errors seen by caller", failures(bare), failures(resilient)),
        ("retries", "0", f"{resilient.retries}"),
        ("fallbacks used", "-", f"{fallbacks}" + (f" ({by_alternative})" if by_alternative else "")),
        ("LM calls made", f"{bare.lm_calls}", f"{resilient.lm_calls}"),
        ("latency p50", f"{bare.percentile(0.5):.2f}s", f"{resilient.percentile(0.5):.2f}s"),
        ("latency p95", f"{bare.percentile(0.95):.2f}s", f"{resilient.percentile(0.95):.2f}s"),
        ("batch wall time", f"{bare.wall:.1f}s", f"{resilient.wall:.1f}s"),
    ]
    for row in rows:
        table.add_row(*row)
    return table


NEVER_ANSWERED = "the program never answered: every reply was a fallback"


def exit_status(report: DemoReport) -> tuple[int, str | None]:
    """0 when the program answered at least once through the pipeline; else 1 and why (a fallback is no answer)."""
    if report.resilient.answered == 0:
        hint = " (check --model, --api-base and the API key)" if report.config.model else " (lower --chaos)"
        return 1, NEVER_ANSWERED + hint
    return 0, None


def report_json(report: DemoReport) -> dict[str, Any]:
    return {
        "config": asdict(report.config),
        "resilient": report.resilient.summary(),
        "bare": report.bare.summary(),
        "layers": report.layers,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
