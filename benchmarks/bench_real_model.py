"""Real model: the bare program, today's stack and the new defaults on SmolLM2-135M (llama.cpp, 127.0.0.1).

Same questions, same run, same server: answered / parse failures / apologies / p50 and p95 latency per stack, then,
for the questions whose first answer failed to parse, how many each retry choice recovers in one more attempt (the
same request, a fresh rollout_id at temperature 0.7, the other adapter, both). Needs the real-model extra; NOT in
the smoke run (tests/test_benchmarks.py skips it): ChainOfThought on 2 cores takes seconds to minutes per call.

    python benchmarks/bench_real_model.py --questions 30 --max-tokens 256 --concurrency 2 --out results.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dspy

from resilient_dspy import (
    AdaptiveTimeout,
    CircuitBreaker,
    Fallback,
    Pipeline,
    Retry,
    Static,
    Timeout,
    by_model,
)
from resilient_dspy.testing.real_model import QUESTIONS, LlamaServer, unavailable

APOLOGY = "Sorry, I cannot answer right now."


def bare(program: dspy.Module) -> Callable[..., Any]:
    acall: Callable[..., Any] = program.acall
    return acall


def todays_stack(program: dspy.Module) -> Pipeline:
    """The README's stack before issue 22: a 1 s attempt timeout, a parse retry that re-asks the same request."""
    return Pipeline(
        program,
        Fallback(Static(answer=APOLOGY)),
        Timeout(30.0),
        Retry(4, resample=False, max_tokens_cap=None),
        CircuitBreaker(failure_threshold=5, key=by_model),
        Timeout(1.0),
    )


def new_defaults(program: dspy.Module, ceiling: float) -> Pipeline:
    """The README's stack now: attempt timeouts a real model meets, parse retries that resample."""
    return Pipeline(
        program,
        Fallback(Static(answer=APOLOGY)),
        Timeout(ceiling * 3),
        Retry(3),
        CircuitBreaker(failure_threshold=5, key=by_model),
        AdaptiveTimeout(ceiling, min_samples=10),
    )


def percentile(values: list[float], q: float) -> float:
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, max(0, int(q * len(ranked) + 0.999999) - 1))] if ranked else float("nan")


async def run_stack(
    name: str, call: Callable[..., Any], lm: dspy.LM, questions: tuple[str, ...], concurrency: int, out: Any
) -> dict[str, Any]:
    gate = asyncio.Semaphore(concurrency)
    rows: list[dict[str, Any]] = []

    async def one(question: str) -> None:
        async with gate:
            started = time.monotonic()
            with dspy.context(lm=lm):
                try:
                    prediction = await call(question=question)
                    answer = str(prediction.answer)
                    outcome = "apology" if answer == APOLOGY else "answered"
                except Exception as error:
                    answer, outcome = f"{type(error).__name__}", _kind(error)
            row = {"stack": name, "question": question, "outcome": outcome, "seconds": time.monotonic() - started}
            rows.append(row)
            out.write(json.dumps({**row, "answer": answer[:120]}) + "\n")
            out.flush()

    await asyncio.gather(*(one(question) for question in questions))
    seconds = [row["seconds"] for row in rows]
    summary = {
        "stack": name,
        "answered": sum(row["outcome"] == "answered" for row in rows),
        "parse_failures": sum(row["outcome"] in ("parse", "truncated") for row in rows),
        "apologies": sum(row["outcome"] == "apology" for row in rows),
        "other_errors": sum(row["outcome"] == "error" for row in rows),
        "p50": round(statistics.median(seconds), 1) if seconds else None,
        "p95": round(percentile(seconds, 0.95), 1),
    }
    out.write(json.dumps({"summary": summary}) + "\n")
    out.flush()
    print(json.dumps(summary), flush=True)
    summary["failed"] = [row["question"] for row in rows if row["outcome"] in ("parse", "truncated")]
    return summary


def _kind(error: BaseException) -> str:
    from resilient_dspy.errors import TruncatedOutputError

    last = getattr(error, "last_error", error)
    if isinstance(last, TruncatedOutputError):
        return "truncated"
    return "parse" if isinstance(last, dspy.AdapterParseError) else "error"


async def recoveries(program: dspy.Module, lm: dspy.LM, failed: list[str], out: Any) -> dict[str, int]:
    """For each question whose first answer failed to parse: does one retry of each kind answer it?"""
    choices: dict[str, dict[str, Any]] = {
        "same request": {"resample": False},
        "rollout_id + temperature 0.7": {},
        "other adapter": {"temperature_step": 0.0, "switch_adapter": True},
        "both": {"switch_adapter": True},
    }
    recovered = dict.fromkeys(choices, 0)
    for question in failed:
        for label, options in choices.items():
            pipeline = Pipeline(program, Timeout(1e6), Retry(2, base_delay=0.0, budget=None, **options))
            with dspy.context(lm=lm):
                try:
                    await pipeline(question=question)
                    recovered[label] += 1
                    ok = True
                except Exception:
                    ok = False
            out.write(json.dumps({"recovery": label, "question": question, "recovered": ok}) + "\n")
            out.flush()
    summary = {"failed_first": len(failed), **recovered}
    out.write(json.dumps({"recoveries": summary}) + "\n")
    print(json.dumps({"recoveries": summary}), flush=True)
    return recovered


async def measure(args: argparse.Namespace, server: LlamaServer, out: Any) -> list[dict[str, Any]]:
    """Each stack on the same questions, then the retry choices on the questions the bare program failed."""
    program = dspy.ChainOfThought("question -> answer")
    lm = server.lm(max_tokens=args.max_tokens)
    stacks: dict[str, Callable[..., Any]] = {
        "bare": bare(program),
        "today's stack": todays_stack(program),
        "new defaults": new_defaults(program, args.ceiling),
    }
    questions = QUESTIONS[: args.questions]
    summaries = [await run_stack(name, stacks[name], lm, questions, args.concurrency, out) for name in args.stacks]
    failed = [question for summary in summaries if summary["stack"] == "bare" for question in summary["failed"]]
    if args.recover:
        await recoveries(program, lm, failed[: args.recover], out)
    await lm.aclose()
    return summaries


def main(args: argparse.Namespace) -> None:
    with LlamaServer(start_timeout=300.0) as server, open(args.out, "a+") as out:
        summaries = asyncio.run(measure(args, server, out))
    print("| stack | answered | parse failures | apologies | p50 s | p95 s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for s in summaries:
        cells = [s["stack"], s["answered"], s["parse_failures"], s["apologies"], s["p50"], s["p95"]]
        print("| " + " | ".join(str(cell) for cell in cells) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=30, help="how many of the 30 fixed questions")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--ceiling", type=float, default=120.0, help="the new stack's attempt timeout ceiling (s)")
    parser.add_argument("--stacks", default="bare,today's stack,new defaults", type=lambda text: text.split(","))
    parser.add_argument("--recover", type=int, default=0, help="retry-choice recoveries for up to N failed questions")
    parser.add_argument("--out", default="bench_real_model.jsonl")
    args = parser.parse_args()
    reason = unavailable()
    if reason:
        print(f"skipped: {reason}")
        sys.exit(0)
    main(args)
