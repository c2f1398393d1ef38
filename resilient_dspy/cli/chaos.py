"""``resilient-dspy chaos TARGET``: a battery of fault scenarios against your pipeline, and a scorecard.

Each scenario runs N calls (some concurrently) through the pipeline on virtual time (a ``looptime`` loop), with a
:class:`~resilient_dspy.testing.FaultInjectingLM` set by ``dspy.context(lm=...)`` (and put in place of LMs pinned
on the program's predictors), then checks the invariants of :mod:`resilient_dspy.testing.invariants`. The LM
mirrors the ``num_retries`` of the LM the program would have used, so DSPy's own retries show up in the score.
A loop-lag monitor measures, in real seconds, the longest the event loop was blocked in each scenario (a sync
call inside an async program: virtual time stands still then, and no Timeout can fire); a block longer than
``--max-block`` breaks the scenario. Exit status: 0 every invariant held, 1 one broke, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from resilient_dspy.cli.target import TargetError, load_target

__all__ = ["SCENARIOS", "Scenario", "ScenarioScore", "TargetError", "load_target", "main", "run_battery"]


@dataclass(frozen=True, slots=True)
class Scenario:
    """One failure mode (or a mix): the LM's fault profile (after ``script``, the exact faults of the first
    requests), and which calls the caller cancels, and when."""

    name: str
    description: str
    profile: dict[str, Any]
    cancel_share: float = 0.0
    cancel_after: float = 0.5
    script: tuple[str, ...] = ()


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("rate_limit", "429s with Retry-After", {"rate_limit": 0.3, "retry_after": (0.5, 2.0)}),
    Scenario("server_error", "5xx errors", {"server_error": 0.3}),
    Scenario("timeout", "provider-side timeouts (504)", {"timeout": 0.3}),
    Scenario("hang", "requests that never answer", {"hang": 0.15}),
    Scenario("transport", "dropped connections", {"transport": 0.3}),
    Scenario("malformed", "answers that do not parse", {"malformed": 0.3}),
    Scenario("context_window", "context-window errors (permanent)", {"context_window": 0.2}),
    Scenario("cancellation", "callers cancelling slow calls", {"latency": (0.2, 2.0)}, 0.25, 0.5),
    Scenario("tail_latency", "5 % of requests 10x slower", {"latency": (0.2, 0.4), "tail": 0.05, "tail_factor": 10.0}),
    Scenario(
        "mixed",
        "a bit of everything, with latency",
        {
            "rate_limit": 0.1,
            "server_error": 0.1,
            "hang": 0.05,
            "transport": 0.05,
            "malformed": 0.05,
            "context_window": 0.02,
            "latency": (0.05, 1.0),
        },
        0.05,
        1.0,
    ),
    Scenario("storm", "an outage: most requests fail", {"rate_limit": 0.4, "server_error": 0.3, "hang": 0.1}),
    Scenario(
        "overload",
        "the provider sheds load: its first 20 requests answer 429 or 503, then it recovers",
        {"latency": (0.05, 0.5)},
        script=("rate_limit", "server_error") * 10,
    ),
)
_BY_NAME = {scenario.name: scenario for scenario in SCENARIOS}

MAX_BLOCK = 1.0
"""Real seconds the event loop may go without running anything else before a scenario is scored broken."""


@dataclass
class ScenarioScore:
    """The outcome of one scenario: invariant violations, answers (``ok`` by the primary only; a fallback's answer
    is counted apart, never as an answer), lost calls, LM requests, latency and the longest loop block."""

    name: str
    description: str
    calls: int
    ok: int
    failed: int
    lost: int
    lm_calls: int
    p50: float
    p99: float
    longest_block: float = 0.0
    fallback: int = 0
    violations: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def handled(self) -> bool:
        return not self.violations

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "handled": self.handled,
            "calls": self.calls,
            "ok": self.ok,
            "fallback": self.fallback,
            "failed": self.failed,
            "lost": self.lost,
            "lm_calls": self.lm_calls,
            "p50": round(self.p50, 6),
            "p99": round(self.p99, 6),
            "longest_block": round(self.longest_block, 3),
            "broken": sorted({v["invariant"] for v in self.violations}),
            "violations": self.violations,
            "warnings": self.warnings,
        }


def _predictors(pipeline: Any) -> list[Any]:
    import dspy

    program = pipeline.program
    return list(program.predictors()) if isinstance(program, dspy.Module) else []


@contextmanager
def _pinned(predictors: Sequence[Any], lm: Any) -> Iterator[None]:
    """Put ``lm`` in place of LMs pinned on predictors for the scenario, and restore them after."""
    saved = [(predictor, predictor.lm) for predictor in predictors if getattr(predictor, "lm", None) is not None]
    for predictor, _ in saved:
        predictor.lm = lm
    try:
        yield
    finally:
        for predictor, original in saved:
            predictor.lm = original


def _mirrored_retries(pipeline: Any) -> int:
    """The ``num_retries`` of the LM the program would use: a pinned one, else ``dspy.settings.lm``."""
    import dspy

    lms = [p.lm for p in _predictors(pipeline) if getattr(p, "lm", None) is not None] or [dspy.settings.lm]
    return max((int(getattr(lm, "num_retries", 0) or 0) for lm in lms if lm is not None), default=0)


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def run_scenario(
    factory: Callable[[], Any],
    scenario: Scenario,
    *,
    calls: int,
    seed: int,
    concurrency: int,
    max_block: float | None = MAX_BLOCK,
) -> ScenarioScore:
    """Run one scenario on a fresh virtual-time loop and score it."""
    import dspy
    import looptime

    from resilient_dspy.testing import FaultInjectingLM
    from resilient_dspy.testing.harness import run_calls
    from resilient_dspy.testing.invariants import check_run

    pipeline = factory()
    lm = FaultInjectingLM(
        "fault/chaos",
        profile=scenario.profile,
        script=scenario.script,
        seed=seed,
        num_retries=_mirrored_retries(pipeline),
    )
    predictors = _predictors(pipeline)
    per_attempt = 2 * max(1, len(predictors))  # Chat → JSON adapter fallback: two requests per predictor at most
    cancels = {
        i: scenario.cancel_after
        for i in range(calls)
        if scenario.cancel_share and (i * 7919 + seed) % 100 < scenario.cancel_share * 100
    }
    questions = [f"Question {i} ({scenario.name}): what makes a DSPy program resilient?" for i in range(calls)]

    async def scenario_run() -> Any:
        with dspy.context(lm=lm), _pinned(predictors, lm):
            return await run_calls(pipeline, questions, concurrency=concurrency, cancel_after=cancels, horizon=600.0)

    loop = looptime.new_event_loop()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run = loop.run_until_complete(scenario_run())
        finally:
            loop.close()
    violations = check_run(run, pipeline, journal=lm.journal, requests_per_attempt=per_attempt, max_block=max_block)
    durations = sorted(call.duration for call in run.calls if not call.hung and not call.cancel_requested)
    lost = {v.call for v in violations if v.invariant == "no_lost_call"}
    return ScenarioScore(
        name=scenario.name,
        description=scenario.description,
        calls=calls,
        ok=sum(1 for call in run.calls if call.ok and call.served_by == "primary"),
        failed=sum(1 for call in run.calls if not call.ok),
        lost=len(lost),
        lm_calls=lm.requests,
        p50=_quantile(durations, 0.5),
        p99=_quantile(durations, 0.99),
        longest_block=run.longest_block,
        fallback=sum(1 for call in run.calls if call.ok and call.served_by != "primary"),
        violations=[{"invariant": v.invariant, "call": v.call, "message": v.message} for v in violations],
        warnings=sorted({f"{w.category.__name__}: {w.message}" for w in caught})[:5],
    )


def run_battery(
    factory: Callable[[], Any],
    scenarios: Sequence[Scenario],
    *,
    calls: int,
    seed: int,
    concurrency: int,
    max_block: float | None = MAX_BLOCK,
) -> list[ScenarioScore]:
    """Every scenario in order, each on its own loop and (with a factory) its own fresh pipeline."""
    return [
        run_scenario(factory, s, calls=calls, seed=seed, concurrency=concurrency, max_block=max_block)
        for s in scenarios
    ]


def _render(target: str, scores: list[ScenarioScore]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"chaos scorecard: {target}")
    columns = ("scenario", "handled", "broken invariants", "ok", "fallback", "failed", "lost", "LM calls", "p50 s")
    for column in (*columns, "p99 s", "block s"):
        table.add_column(column, justify="left" if column in ("scenario", "broken invariants") else "right")
    for score in scores:
        broken = ", ".join(sorted({v["invariant"] for v in score.violations})) or "-"
        table.add_row(
            score.name,
            "[green]yes[/]" if score.handled else "[red]NO[/]",
            broken,
            str(score.ok),
            str(score.fallback),
            str(score.failed),
            str(score.lost),
            str(score.lm_calls),
            f"{score.p50:.2f}",
            f"{score.p99:.2f}",
            f"{score.longest_block:.2f}",
        )
    console = Console(width=max(Console().width, 120))
    console.print(table)
    for score in scores:
        for violation in score.violations[:2]:
            where = "" if violation["call"] is None else f" call {violation['call']}:"
            console.print(f"  [red]✗[/] {score.name}:{where} {violation['invariant']}: {violation['message']}")
    for warning in sorted({w for score in scores for w in score.warnings}):
        console.print(f"  [yellow]![/] {warning}")
    failed = [s.name for s in scores if not s.handled]
    verdict = (
        f"[red]{len(failed)} of {len(scores)} scenarios broke an invariant[/]" if failed else "[green]all handled[/]"
    )
    if not primary_answered(scores):
        verdict = f"[red]{NEVER_ANSWERED}[/]" + ("" if not failed else f"; {verdict}")
    console.print(verdict)


NEVER_ANSWERED = "the primary never answered: every answer came from a fallback"


def primary_answered(scores: Sequence[ScenarioScore]) -> bool:
    """Whether the program itself answered at least once in the battery: a fallback's answer is not an answer, so
    a program that always fails (a bug, a missing ``aforward``) behind a static fallback does not pass."""
    return sum(score.ok for score in scores) > 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``resilient-dspy chaos`` (shared by the main CLI and ``python -m resilient_dspy.cli.chaos``)."""
    parser.add_argument("target", metavar="TARGET", help="module:attr or path/to/file.py:attr (Pipeline or factory)")
    from resilient_dspy.cli.args import _integer, _number

    parser.add_argument("--calls", type=_integer, default=40, help="calls per scenario (default 40)")
    parser.add_argument("--concurrency", type=_integer, default=10, help="calls in flight (default 10)")
    parser.add_argument("--seed", type=_integer, default=0, help="seed of the fault draws (default 0)")
    parser.add_argument(
        "--scenarios", help=f"comma-separated subset of: {', '.join(_BY_NAME)} (default: all)", default=None
    )
    parser.add_argument(
        "--max-block",
        type=_number,
        default=MAX_BLOCK,
        metavar="SECONDS",
        help=f"longest the event loop may be blocked, in real seconds (default {MAX_BLOCK:g})",
    )
    parser.add_argument("--json", action="store_true", help="print the scorecard as JSON")


def command(args: argparse.Namespace) -> int:
    """Run ``resilient-dspy chaos`` with parsed ``args``: 0 all handled, 1 an invariant broke, 2 bad input."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    problems = []
    if args.calls < 1:
        problems.append(f"--calls must be at least 1 (got {args.calls})")
    if args.concurrency < 1:
        problems.append(f"--concurrency must be at least 1 (got {args.concurrency})")
    if not 0 < args.max_block < float("inf"):
        problems.append(f"--max-block must be a number of seconds > 0 (got {args.max_block:g})")
    chosen = list(SCENARIOS)
    if args.scenarios:
        names = [name.strip() for name in args.scenarios.split(",") if name.strip()]
        unknown = [name for name in names if name not in _BY_NAME]
        if unknown:
            problems.append(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(_BY_NAME)}")
        chosen = [_BY_NAME[name] for name in names if name in _BY_NAME]
    from resilient_dspy.cli.args import fail

    if problems:
        return fail("chaos", "; ".join(problems))
    try:
        factory = load_target(args.target)
        scores = run_battery(
            factory,
            chosen,
            calls=args.calls,
            seed=args.seed,
            concurrency=args.concurrency,
            max_block=args.max_block,
        )
    except TargetError as error:
        return fail("chaos", error)
    passed = all(score.handled for score in scores) and primary_answered(scores)
    if args.json:
        report = {
            "target": args.target,
            "calls": args.calls,
            "seed": args.seed,
            "passed": passed,
            "primary_answered": sum(s.ok for s in scores),
            "scenarios": [s.to_json() for s in scores],
        }
        print(json.dumps(report, indent=2))
    else:
        _render(args.target, scores)
    return 0 if passed else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m resilient_dspy.cli.chaos TARGET [options]``, the same as ``resilient-dspy chaos``."""
    parser = argparse.ArgumentParser(prog="resilient-dspy chaos", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
